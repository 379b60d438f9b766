"""The ZooKeeper backend's kazoo handler: ``poll_select`` keeps ``select``'s contract."""

from __future__ import annotations

import socket
import time

import pytest

from coordlock.backends.zookeeper._handler import PollingHandler, poll_select


def test_reports_what_is_ready_and_only_that() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert poll_select([a], [], [], 0) == ([], [], [])  # nothing to read yet
        assert poll_select([], [a], [], 0) == ([], [a], [])  # room to write
        b.send(b"x")
        assert poll_select([a, b], [], [], 1.0) == ([a], [], [])
        assert poll_select([a.fileno()], [], [], 1.0) == ([a.fileno()], [], [])  # plain fds too
        r, w, x = poll_select([a], [a], [a], 1.0)
        assert (r, w, x) == ([a], [a], [])  # both ways at once; exceptional never reported


def test_a_hung_up_peer_wakes_the_reader() -> None:
    a, b = socket.socketpair()
    with a:
        b.close()
        assert poll_select([a], [], [], 1.0)[0] == [a]
        assert a.recv(1) == b""  # the read that follows sees the end


def test_waits_up_to_the_timeout_and_no_longer() -> None:
    a, b = socket.socketpair()
    with a, b:
        began = time.monotonic()
        assert poll_select([a], [], [], 0.05) == ([], [], [])
        assert time.monotonic() - began >= 0.04


def test_bad_input_fails_as_kazoo_expects() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError):
            poll_select([a], [], [], -1)
        with pytest.raises(TypeError):
            poll_select([a], [], [], "1")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            poll_select([object()], [], [], 0)
    closed = socket.socket()
    closed.close()
    with pytest.raises(TypeError):
        poll_select([closed], [], [], 0)  # fileno() is -1


def test_the_handler_uses_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.send(b"x")
        assert PollingHandler().select([a], [], [], 1.0) == ([a], [], [])
