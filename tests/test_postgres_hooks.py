"""PostgreSQL on the hook API (issue 11): force-unlock, hold_at_least, server_info, native async.

The contract suite checks the shared behaviours in both modes; these tests check what is
PostgreSQL's own: a force-unlock asks the holder to let go (its session survives) and ends the
session only of a holder that does not; ``hold_at_least`` outlives a holder process that dies
(``takeover=lease``); the async API runs on ``psycopg.AsyncConnection`` (no worker threads) and
keeps the event loop responsive under 50 busy tasks (the maximum stall is printed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg
import pytest

import coordlock
from coordlock.backends.postgres import PostgresCoordinator
from coordlock.backends.postgres.flows import FORCE_PATIENCE
from coordlock.backends.postgres.session import AsyncSession, Session
from coordlock.testing.servers import PostgresServer

PATIENCE = 30.0

HOLDER = textwrap.dedent(
    """
    import sys, time, coordlock
    c = coordlock.connect(sys.argv[1])
    lease = c.acquire("forced", 30, hold_at_least=float(sys.argv[2]) or None)
    lease.on_lost(lambda _: print("LOST", flush=True))
    session = c._registry.held["forced"].session
    print("HELD", lease.fence, session.pid, flush=True)
    command = sys.stdin.readline().strip()
    if command == "release-and-die":
        print("RELEASED", int(lease.release()), flush=True)
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
    print("ALIVE", int(not c._registry.held.get("forced")), flush=True)
    """
)


def _url(server: PostgresServer, **extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"schema": f"t_{os.urandom(6).hex()}", **extra}.items())
    return f"{server.url}?{query}"


def _holder(url: str, hold: float = 0.0) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(hold)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "HELD", proc.stderr.read() if proc.stderr else ""
    return proc, int(line[1]), int(line[2])


def _alive(server: PostgresServer, pid: int) -> bool:
    with psycopg.connect(server.url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        return row.fetchone() == (1,)


def test_force_release_asks_the_holder_and_keeps_its_session(
    postgres_server: PostgresServer,
) -> None:
    url = _url(postgres_server)
    proc, fence, pid = _holder(url)
    operator = coordlock.connect(url)
    try:
        assert operator.force_release("forced") is True
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["LOST"]  # the holder was told
        taken = operator.acquire("forced", 10)
        assert taken is not None and taken.fence > fence
        assert _alive(postgres_server, pid)  # let go, not terminated
        assert taken.release()
        assert proc.stdin is not None
        proc.stdin.write("stay\n\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["ALIVE", "1"]  # its registry forgot the lock
    finally:
        operator.close()
        proc.kill()
        proc.wait()


def test_force_release_ends_the_session_of_a_holder_that_does_not_let_go(
    postgres_server: PostgresServer,
) -> None:
    url = _url(postgres_server)
    operator = coordlock.connect(url)
    assert isinstance(operator, PostgresCoordinator)
    key = operator.key("foreign")
    with psycopg.connect(postgres_server.url, autocommit=True) as foreign:  # not coordlock
        row = foreign.execute("SELECT pg_backend_pid(), pg_advisory_lock(%s)", (key,)).fetchone()
        assert row is not None
        try:
            started = time.monotonic()
            assert operator.force_release("foreign") is True
            assert time.monotonic() - started >= FORCE_PATIENCE * 0.9  # it asked first
            assert not _alive(postgres_server, row[0])
            taken = operator.acquire("foreign", 10)
            assert taken is not None and taken.release()
        finally:
            operator.close()
    c = coordlock.connect(url)
    try:
        assert c.force_release("nobody-holds-this") is False
    finally:
        c.close()


def test_hold_at_least_outlives_a_holder_that_dies(postgres_server: PostgresServer) -> None:
    """takeover=lease: the lease row keeps the name taken until the hold ends, even after the
    holder process released and was SIGKILLed (its session, and the advisory lock, gone)."""
    hold = 3.0
    url = _url(postgres_server)
    started = time.monotonic()
    proc, fence, pid = _holder(url, hold)
    other = coordlock.connect(url)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("release-and-die\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["RELEASED", "1"]
        assert proc.wait(PATIENCE) == -signal.SIGKILL
        deadline = time.monotonic() + PATIENCE
        while _alive(postgres_server, pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(postgres_server, pid)  # the session (and its advisory lock) is gone
        if time.monotonic() - started < hold * 0.8:
            assert other.acquire("forced", 10) is None  # still held by the row
        later = other.acquire("forced", 10, wait=PATIENCE)
        assert later is not None and later.fence > fence
        assert time.monotonic() - started >= hold * 0.9  # never before the hold ended
        assert later.release()
    finally:
        other.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_info(postgres_server: PostgresServer) -> None:
    c = coordlock.connect(_url(postgres_server))
    assert isinstance(c, PostgresCoordinator)
    try:
        info = c.server_info()
        assert info.backend == "postgres"
        assert info.version is not None and info.version.startswith("PostgreSQL ")
        assert info.server_time is not None and info.measured_at is not None
        assert abs(info.server_time - info.measured_at) < 1.0  # same host, same clock
    finally:
        c.close()


def test_async_runs_on_async_connections_without_worker_threads(
    postgres_server: PostgresServer,
) -> None:
    """50 tasks lock, wait and release on a few names while a ticker measures how long the
    event loop stalls. Every hook runs natively: no sync session, no worker thread."""
    url = _url(postgres_server)

    async def main() -> tuple[float, int, PostgresCoordinator]:
        c = coordlock.connect(url)
        assert isinstance(c, PostgresCoordinator)
        stalls: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.monotonic()
                stalls.append(now - last - 0.001)
                last = now

        async def worker(i: int) -> int:
            taken = 0
            for _ in range(6):
                async with c.lock(f"stall-{i % 5}", ttl=10, wait=PATIENCE) as lease:
                    assert not lease.lost
                    taken += 1
                    await asyncio.sleep(0.001)
            return taken

        tick = asyncio.create_task(ticker())
        counts = await asyncio.gather(*(worker(i) for i in range(50)))
        done.set()
        await tick
        await c.aclose()
        return max(stalls), sum(counts), c

    stall, count, c = asyncio.run(main())
    print(f"\n[postgres async] 50 tasks, {count} locks: max event-loop stall {stall * 1000:.1f} ms")
    assert count == 300
    assert c._executor is None  # no hook ran on a worker thread
    assert c._sync.main is None and c._sync.aux is None  # no sync session was opened


def test_async_sessions_belong_to_their_loop(postgres_server: PostgresServer) -> None:
    url = _url(postgres_server)
    c = coordlock.connect(url)
    assert isinstance(c, PostgresCoordinator)
    seen: list[Any] = []

    async def use() -> None:
        lease = await c.aacquire("per-loop", 10)
        assert lease is not None
        seen.append(type(c._registry.held["per-loop"].session))
        assert await lease.release()

    try:
        for _ in range(2):  # two loops one after the other: fresh sessions each time
            asyncio.run(use())
        assert seen == [AsyncSession, AsyncSession]
        lease = c.acquire("per-loop", 10)  # and the sync API still works next to them
        assert lease is not None
        assert isinstance(c._registry.held["per-loop"].session, Session)
        assert lease.release()
    finally:
        c.close()


def test_a_cancelled_async_wait_leaves_nothing_locked(postgres_server: PostgresServer) -> None:
    url = _url(postgres_server)
    holder = coordlock.connect(url)
    lease = holder.acquire("cancelled", 30)
    assert lease is not None
    waiter = coordlock.connect(url)
    assert isinstance(waiter, PostgresCoordinator)

    async def cancel_a_wait() -> None:
        task = asyncio.create_task(waiter.aacquire("cancelled", 10, wait=PATIENCE))
        await asyncio.sleep(0.5)  # blocked in pg_advisory_lock on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await waiter.aclose()

    try:
        asyncio.run(cancel_a_wait())
        assert lease.release()
        other = coordlock.connect(url)
        try:
            again = other.acquire("cancelled", 10)  # the cancelled wait did not keep it
            assert again is not None and again.release()
        finally:
            other.close()
    finally:
        holder.close()
        waiter.close()


def test_hooks_of_another_thread_loop(postgres_server: PostgresServer) -> None:
    """An AsyncLease released from the sync API's thread runs on its own loop."""
    url = _url(postgres_server)
    c = coordlock.connect(url)
    assert isinstance(c, PostgresCoordinator)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        lease = asyncio.run_coroutine_threadsafe(c.aacquire("cross", 10), loop).result(PATIENCE)
        assert lease is not None
        assert c._release("cross", lease.owner) is True  # (the hook, from this thread)
        assert asyncio.run_coroutine_threadsafe(lease.release(), loop).result(PATIENCE) is False
        asyncio.run_coroutine_threadsafe(c.aclose(), loop).result(PATIENCE)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(PATIENCE)
        c.close()
        loop.close()


def test_sessions_of_an_event_loop_that_ended_without_aclose_are_closed(
    postgres_server: PostgresServer,
) -> None:
    c = coordlock.connect(_url(postgres_server))
    assert isinstance(c, PostgresCoordinator)

    async def use(tick: int) -> None:
        lease = await c.aacquire("stranded", 10)
        assert lease is not None  # (the lease row of the last loop's session was released)
        assert await lease.release()
        assert await c.aclaim(f"stranded@{tick}", 10)  # the auxiliary session too

    try:
        for tick in range(3):
            asyncio.run(use(tick))  # no aclose(): the loop ends with its sessions open
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and any(
            isinstance(s, AsyncSession) for s in c._registry.live()
        ):
            time.sleep(0.05)
        assert not any(isinstance(s, AsyncSession) for s in c._registry.live())
    finally:
        c.close()
