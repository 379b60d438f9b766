"""PostgreSQL leases never lie (issue 10 rows 2, 8, 9 and 14).

* row 2: a frozen connection (a proxy that keeps the socket open and forwards nothing) cannot
  block a renewal past the lease's deadline, nor an acquire past ``io_timeout``;
* row 8: a forked child that uses the inherited coordinator runs on sessions of its own, and
  closing it there leaves the parent's session (and locks) alone;
* row 9: ttls and waits beyond PostgreSQL's largest millisecond setting (~24.8 days) work;
* row 14: the lease clock of a lock granted after a wait starts no later than the server's
  lease row (send time + the wait the server measured, not the reply).

Real throwaway servers; every wait bounded by a count and a deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import coordlock
from coordlock import BackendUnavailable, Lease
from coordlock.backends.postgres import PostgresCoordinator
from coordlock.testing.contract import eventually
from coordlock.testing.faultproxy import FaultProxy
from coordlock.testing.servers import PostgresServer

PATIENCE = 30.0
DAYS_30 = 30 * 86400.0
MakeProxy = Callable[..., FaultProxy]


@pytest.fixture
def direct(postgres_server: PostgresServer) -> Iterator[tuple[str, PostgresServer]]:
    yield f"t_{os.urandom(8).hex()}", postgres_server


# -- row 14: the lease clock after a wait ------------------------------------------------------


def test_lease_clock_after_a_wait_starts_no_later_than_the_servers_row(
    postgres_server: PostgresServer, fault_proxy: MakeProxy
) -> None:
    """The waiter's link delays every chunk by 200 ms each way: a lease clock started at the
    reply would run 200 ms past the server's lease row. (Both clocks are this host's: the
    server is local.)"""
    schema = f"t_{os.urandom(8).hex()}"
    proxy = fault_proxy(postgres_server.port)
    proxy.delay(200)  # each way
    url = f"{postgres_server.url}?schema={schema}"
    holder = coordlock.connect(url)
    waiter = coordlock.connect(proxy.via(url))
    try:
        held = holder.acquire("clock", 30)
        assert held is not None
        got: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: got.update(lease=waiter.acquire("clock", 5, wait=PATIENCE))
        )
        thread.start()
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:
            assert eventually(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ).fetchone()
                    == (1,)
                ),
                PATIENCE,
            )
            assert held.release()
            thread.join(PATIENCE)
            lease = got.get("lease")
            assert isinstance(lease, Lease)
            row = admin.execute(
                f"SELECT extract(epoch FROM expires_at)::float8 FROM {schema}.holders"
                " WHERE name = 'clock'"
            ).fetchone()
        assert row is not None
        server_expiry = float(row[0])
        print(f"\nlocal lease end - server lease end: {lease.expires_at - server_expiry:+.4f} s")
        assert lease.expires_at <= server_expiry
        assert lease.release()
    finally:
        waiter.close()
        holder.close()


# -- row 9: ttls and waits beyond 24.8 days ----------------------------------------------------


def test_ttl_and_wait_beyond_int_milliseconds(
    direct: tuple[str, PostgresServer],
) -> None:
    schema, server = direct
    a = coordlock.connect(f"{server.url}?schema={schema}")
    b = coordlock.connect(f"{server.url}?schema={schema}")
    try:
        long = a.acquire("long", DAYS_30)  # idle_session_timeout would overflow an int
        assert long is not None and long.remaining > DAYS_30 - 60
        assert long.extend(DAYS_30 * 2)
        got: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: got.update(lease=b.acquire("long", DAYS_30, wait=DAYS_30))
        )
        thread.start()  # lock_timeout would overflow an int
        assert isinstance(b, PostgresCoordinator)
        assert eventually(lambda: any(s.mutex.locked() for s in b._registry.sessions), PATIENCE)
        time.sleep(0.1)  # (it is blocked on the server, not failing)
        assert "lease" not in got
        assert long.release()
        thread.join(PATIENCE)
        waited = got.get("lease")
        assert isinstance(waited, Lease) and waited.fence > long.fence
        assert waited.release()
    finally:
        a.close()
        b.close()


# -- row 8: fork ---------------------------------------------------------------------------------


def _holder_pid(admin: psycopg.Connection[Any], key: int) -> int | None:
    row = admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND ((classid::int8 << 32) | objid::int8) = %s",
        (key,),
    ).fetchone()
    return None if row is None else int(row[0])


def _child(coordinator: PostgresCoordinator, report: int, go: int, close: bool) -> int:
    """In the forked child: take a lock, say so, wait, then release or close."""
    try:
        lease = coordinator.acquire("child-lock", 30)
        busy = coordinator.acquire("parent-lock", 30)  # the parent's: busy for the child
        if lease is None or busy is not None:
            return 3
        os.write(report, b"ready\n")
        os.read(go, 1)
        if close:
            coordinator.close()
        else:
            lease.release()
        return 0
    except BaseException:
        return 4


@pytest.mark.parametrize("close_in_child", [False, True])
def test_a_forked_child_uses_sessions_of_its_own(
    direct: tuple[str, PostgresServer], close_in_child: bool
) -> None:
    schema, server = direct
    parent = coordlock.connect(f"{server.url}?schema={schema}&takeover=session")
    assert isinstance(parent, PostgresCoordinator)
    lease = parent.acquire("parent-lock", 30)
    assert lease is not None
    admin = psycopg.connect(server.url, autocommit=True)
    parent_pid = _holder_pid(admin, parent.key("parent-lock"))
    assert parent_pid is not None
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 5
        try:
            os.close(report_r)
            os.close(go_w)
            code = _child(parent, report_w, go_r, close_in_child)
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(go_r)
    try:
        ready, _, _ = select.select([report_r], [], [], PATIENCE)
        assert ready and os.read(report_r, 64) == b"ready\n", "the child did not report"
        child_session = _holder_pid(admin, parent.key("child-lock"))
        assert child_session is not None
        assert child_session != parent_pid  # not the parent's server session
        os.write(go_w, b"x")
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's session and lock are untouched by the child's use and close
        assert not lease.lost and lease.extend()
        assert _holder_pid(admin, parent.key("parent-lock")) == parent_pid
        assert lease.release()
        again = parent.acquire("child-lock", 30, wait=PATIENCE)  # the child's is gone
        assert again is not None and again.release()
    finally:
        for fd in (report_r, go_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(child, os.WNOHANG) == (0, 0):
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
        admin.close()
        parent.close()


# -- row 2: frozen connections -------------------------------------------------------------------


def test_a_frozen_connection_cannot_hold_a_renewal_past_the_lease(
    direct: tuple[str, PostgresServer], fault_proxy: MakeProxy
) -> None:
    """``io_timeout`` is 60 s, the ttl 2 s: only the lease's own deadline can end the renewal
    that hangs on the frozen link, and it must (the lease is lost, callbacks fire)."""
    schema, server = direct
    proxy = fault_proxy(server.port)
    c = coordlock.connect(proxy.via(f"{server.url}?schema={schema}&io_timeout=60"))
    try:
        lease = c.acquire("frozen", 2.0)
        assert lease is not None
        fired = threading.Event()
        lease.on_lost(lambda _: fired.set())
        proxy.freeze()
        frozen_at = time.monotonic()
        assert fired.wait(PATIENCE), "on_lost never fired behind a frozen connection"
        delay = time.monotonic() - frozen_at
        print(f"\nfrozen connection: on_lost after {delay:.3f} s (ttl 2 s, io_timeout 60 s)")
        assert lease.lost
        assert delay < 60  # not io_timeout: the lease deadline cut the renewal
    finally:
        proxy.heal()
        c.close()


def test_an_acquire_on_a_frozen_connection_fails_after_io_timeout(
    direct: tuple[str, PostgresServer], fault_proxy: MakeProxy
) -> None:
    schema, server = direct
    proxy = fault_proxy(server.port)
    c = coordlock.connect(
        proxy.via(f"{server.url}?schema={schema}&io_timeout=1&retry_deadline=0.5")
    )
    try:
        warm = c.acquire("warm", 10)  # the session exists; now its link freezes
        assert warm is not None and warm.release()
        proxy.freeze()
        with pytest.raises(BackendUnavailable):
            c.acquire("frozen-acquire", 10)
    finally:
        proxy.heal()
        c.close()


def test_io_timeout_is_validated(postgres_server: PostgresServer) -> None:
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(coordlock.ConfigurationError, match="io_timeout"):
            coordlock.connect(f"{postgres_server.url}?io_timeout={bad}")
    c = coordlock.connect(f"{postgres_server.url}?io_timeout=2.5")
    assert isinstance(c, PostgresCoordinator)
    assert "tcp_user_timeout=2500" in c._conninfo
    c.close()
    c = coordlock.connect(f"{postgres_server.url}?tcp_user_timeout=700")
    assert isinstance(c, PostgresCoordinator)
    assert "tcp_user_timeout=700" in c._conninfo and "tcp_user_timeout=10000" not in c._conninfo
    c.close()
