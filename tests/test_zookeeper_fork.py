"""A forked child never speaks on its parent's ZooKeeper session (issue 10 row 8).

kazoo's threads do not survive ``fork()``; a child that used the inherited client would queue
requests that nobody sends (or, worse, write on the parent's socket), and closing it would end
the parent's session and with it the parent's locks. The coordinator notices the fork at the
child's first call, drops the inherited client without a word to the server and opens the
child's own session; the parent's leases are not the child's to renew or release.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from kazoo.client import KazooClient

# Fixtures shared with the backend's main test module (pytest finds them by name here).
from test_zookeeper_backend import holder_path, kz, make, zk_url  # noqa: F401

from coordlock.backends.zookeeper import ZooKeeperCoordinator, escape


def _in_child(fn: Callable[[], dict[str, Any]], timeout: float = 60.0) -> dict[str, Any]:
    """Run ``fn`` in a forked child; return its JSON result (or ``{"error": ...}``)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            signal.alarm(int(timeout))
            try:
                result = fn()
            except BaseException as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout + 5
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], 1.0)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
        if not chunks:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert chunks, "the child reported nothing"
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
def test_forked_child_uses_its_own_session(
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
    kz: KazooClient,  # noqa: F811
) -> None:
    c = make(retry_deadline=3, session_timeout=4)
    lease = c.acquire("forked", 30)
    assert lease is not None
    parent_session = c._client.client_id[0]
    parent_children = holder_path(kz, c, "forked")

    def child() -> dict[str, Any]:
        busy = c.acquire("forked", 5)  # the parent holds it: busy, whatever the session
        mine = c.acquire("child-lock", 5)
        assert mine is not None
        parent = f"{c.root}/locks/{escape('child-lock')}"
        owners = [
            c._client.exists(f"{parent}/{n}").ephemeralOwner for n in c._client.get_children(parent)
        ]
        released_parents = lease.release()  # not the child's: must not delete the node
        mine_released = mine.release()
        c.close()  # must not end the parent's session
        return {
            "busy": busy is None,
            "owners": owners,
            "released_parents": released_parents,
            "mine_released": mine_released,
        }

    result = _in_child(child)
    assert "error" not in result, result["error"]
    assert result["busy"] is True
    assert result["owners"] and all(o != parent_session for o in result["owners"])
    assert result["released_parents"] is False
    assert result["mine_released"] is True
    # The parent is untouched: same session, same node, lease still ours and renewable.
    assert c._client.client_id[0] == parent_session
    assert holder_path(kz, c, "forked") == parent_children
    assert not lease.lost and lease.extend() is True
    assert lease.release() is True
    again = c.acquire("forked", 5)
    assert again is not None and again.fence > lease.fence
    assert again.release()
