"""ZooKeeper: bad input fails fast and clearly; an unreachable server fails after bounded,
quiet retries (issue 14).

* Bad URLs, chroots, options and credentials → ConfigurationError at ``connect()``.
* A host name DNS does not know → ConfigurationError at the first call, without waiting for the
  retry deadline (no retry can help).
* Connection refused → BackendUnavailable after ``retry_deadline``; kazoo's reconnection
  attempts (about one a second) are logged once at WARNING, not once per attempt.
"""

from __future__ import annotations

import logging
import time

import pytest

import coordlock
from coordlock import BackendUnavailable, ConfigurationError
from coordlock.testing.servers import ZooKeeperServer, free_port


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("/zookeeper/x", "reserved"),
        ("/a/../b", "empty, . or .."),
        ("/a//b", "empty, . or .."),
        ("/a%01b", "U\\+0001"),
        ("/a%EF%BF%BFb", "U\\+FFFF"),
    ],
)
def test_bad_chroot_is_a_configuration_error(
    zookeeper_server: ZooKeeperServer, path: str, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        coordlock.connect(f"{zookeeper_server.url}{path}")


def test_chroot_is_percent_decoded(zookeeper_server: ZooKeeperServer) -> None:
    c = coordlock.connect(f"{zookeeper_server.url}/my%20app")
    try:
        assert c.root == "/my app/coordlock"  # type: ignore[attr-defined]
        lease = c.acquire("x", 5)
        assert lease is not None and lease.release()
    finally:
        c.close()


@pytest.mark.parametrize(
    ("suffix", "match"),
    [
        ("/x?session_timeout=0", "session_timeout"),
        ("/x?session_timeout=soon", "session_timeout"),
        ("/x?history_limit=many", "history_limit"),
        ("/x?retry_deadline=-1", "retry_deadline"),
        ("/x?frobnicate=1", "unknown zookeeper:// option"),
    ],
)
def test_bad_options_are_configuration_errors(
    zookeeper_server: ZooKeeperServer, suffix: str, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        coordlock.connect(f"{zookeeper_server.url}{suffix}")


def test_credentials_need_a_password(zookeeper_server: ZooKeeperServer) -> None:
    with pytest.raises(ConfigurationError, match="user:password@"):
        coordlock.connect(f"zookeeper://alice@{zookeeper_server.hosts}/x")


def test_unknown_host_name_fails_fast() -> None:
    c = coordlock.connect("zookeeper://no-such-host.invalid:2181/x?retry_deadline=60")
    try:
        began = time.monotonic()
        with pytest.raises(ConfigurationError, match="resolves") as info:
            c.acquire("x", 5)
        took = time.monotonic() - began
        print(f"\n[zookeeper unknown host] ConfigurationError after {took:.2f}s: {info.value}")
        assert took < 30  # not retried for the 60 s retry deadline
    finally:
        c.close()


def test_connection_refused_is_retried_quietly_then_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    c = coordlock.connect(f"zookeeper://127.0.0.1:{port}/x?retry_deadline=2")
    try:
        with caplog.at_level(logging.DEBUG, logger="coordlock"):
            began = time.monotonic()
            with pytest.raises(BackendUnavailable, match="no connection to ZooKeeper") as info:
                c.acquire("x", 5)
            took = time.monotonic() - began
        attempts = [
            r
            for r in caplog.records
            if r.name == "coordlock.kazoo"
            and r.getMessage().startswith(("Connection dropped", "Connection time-out"))
        ]
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        print(
            f"\n[zookeeper connection refused] BackendUnavailable after {took:.2f}s "
            f"({len(attempts)} connection attempts, {len(warnings)} WARNING lines): {info.value}"
        )
        assert took >= 2  # the whole retry deadline was given
        assert len(attempts) >= 2  # kazoo did retry...
        assert len(warnings) <= 2  # ...but said so once (plus at most one line of ours)
    finally:
        c.close()
