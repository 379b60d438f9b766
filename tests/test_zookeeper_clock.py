"""The ZooKeeper backend judges other owners' expiry against a LOWER bound of server time.

Issue 10 row 1: the server-clock estimate used to be anchored at the time a request was SENT,
so it ran ahead of the server by that request's in-flight delay. With one of a waiter's
requests delayed, the waiter judged a live holder's node expired, deleted it and took the lock
while the holder still believed it held it. The same estimate judges claims.

The delay is injected at the kazoo call: the patched method waits before handing the request
to kazoo, which is what an in-flight delay looks like to the caller (it noted the send time
before calling). Every test checks that the delay really happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooClient

# Fixtures shared with the backend's main test module (pytest finds them by name here).
from test_zookeeper_backend import holder_path, kz, make, zk_url  # noqa: F401

from coordlock.backends.zookeeper import ZooKeeperCoordinator

DELAY = 4.0  # seconds: longer than the ttls below, so an estimate that runs ahead is obvious


def delay_calls(
    client: Any, method: str, match: Callable[..., bool], seconds: float
) -> list[float]:
    """Patch ``client.<method>``: calls for which ``match(*args)`` is true wait ``seconds``
    before the request goes out. Returns the list of delays applied (one entry per call)."""
    original = getattr(client, method)
    applied: list[float] = []

    def delayed(*args: Any, **kwargs: Any) -> Any:
        if match(*args):
            began = time.monotonic()
            time.sleep(seconds)
            applied.append(time.monotonic() - began)
        return original(*args, **kwargs)

    setattr(client, method, delayed)
    return applied


def test_delayed_restamp_does_not_make_a_waiter_delete_a_live_holder(
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
    kz: KazooClient,  # noqa: F811
) -> None:
    holder, waiter = make(), make()
    lease = holder.acquire("clock", 3)  # renewed every second: never within 2 s of expiring
    assert lease is not None
    # The waiter re-stamps its own queued node after ttl/3; that set_data is delayed 4 s.
    applied = delay_calls(waiter._client, "set_async", lambda path, *a: "-lock-" in path, DELAY)
    got = waiter.acquire("clock", 3, wait=DELAY + 3)
    assert applied and applied[0] >= DELAY, "the delay was not injected"
    if got is not None:
        got.release()
    assert got is None, "the waiter took the lock from a live, renewing holder"
    assert not lease.lost, lease.lost_reason
    assert len(holder_path(kz, holder, "clock")) == 1  # the holder's node was never deleted
    assert lease.extend() is True
    assert lease.release() is True


def test_delayed_claim_does_not_replace_a_live_claim(
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    first, second = make(), make()
    # second's clock reading comes from a claim whose request reaches the server 4 s late.
    applied: list[float] = []
    original = second._client.transaction

    def transaction() -> Any:
        tx = original()
        commit = tx.commit_async

        def late_commit() -> Any:
            if not applied:
                began = time.monotonic()
                time.sleep(DELAY)
                applied.append(time.monotonic() - began)
            return commit()

        tx.commit_async = late_commit
        return tx

    second._client.transaction = transaction
    assert second.claim("warm-up@t", 60) is True
    assert applied and applied[0] >= DELAY, "the delay was not injected"
    assert first.claim("job@t", 2) is True  # held for 2 s of server time
    assert second.claim("job@t", 60) is False, "a live claim was judged expired"


def test_clock_estimate_is_a_lower_bound_after_a_delayed_write(
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
    kz: KazooClient,  # noqa: F811
) -> None:
    c = make()
    lease = c.acquire("bound", 30)
    assert lease is not None
    applied = delay_calls(c._client, "set_async", lambda path, *a: "-lock-" in path, 1.0)
    assert lease.extend() is True  # its set_data reaches the server 1 s after it was "sent"
    assert applied, "the delay was not injected"
    estimate = c._session.clock.at_least_ms()
    kz.ensure_path(f"{c.root}/probe")
    stat = kz.set(f"{c.root}/probe", b"")
    # A write that starts after the estimate was taken is stamped no earlier than it (whole ms).
    assert estimate <= stat.mtime + 1, f"estimate runs {estimate - stat.mtime:.0f} ms ahead"
    assert lease.release()


def test_lease_deadline_counts_from_the_send(
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    # The holder's own deadline needs the opposite bound: it must end no later than the node
    # expires on the server, so it counts from before the (delayed) request went out.
    c = make()
    lease = c.acquire("deadline", 30)
    assert lease is not None
    applied = delay_calls(c._client, "set_async", lambda path, *a: "-lock-" in path, 1.0)
    before = time.monotonic()
    assert lease.extend(5) is True
    assert applied
    assert lease._deadline <= before + 5 + 0.05  # not reply time + 5 (which is >= before + 6)
    assert lease.release()
