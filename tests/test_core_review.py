"""Regression tests for the sync/async core review: one test (or a few) per reproduced bug.

Each test drives the racy interleaving deterministically (events and gates in subclassed
hooks, stuck log handlers, forked children), waits only through bounded waits, and asserts
order and causality, never elapsed time. Only ``memory://`` and ``sqlite://`` are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import signal
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import coordlock
from coordlock import BackendError, BackendUnavailable, LockNotAcquired
from coordlock import _watchdog as watchdog_module
from coordlock._attempt import Attempt
from coordlock._watchdog import COMPACT_AFTER, watchdog
from coordlock.backends.memory import MemoryCoordinator
from coordlock.backends.sqlite import SQLiteCoordinator
from coordlock.testing.contract import PATIENCE, eventually

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="os.fork tests run on Linux")


@pytest.fixture
def mem() -> Iterator[MemoryCoordinator]:
    c = MemoryCoordinator(f"review-{uuid.uuid4().hex}")
    yield c
    c.close()


def _name() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


class _StuckLog(logging.Handler):
    """A log sink that blocks (a full pipe, a hung syslog/HTTP handler) on matching records."""

    def __init__(self, match: Callable[[str], bool]) -> None:
        super().__init__(logging.DEBUG)
        self.match = match
        self.entered = threading.Event()
        self.gate = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.match(record.getMessage()):
            self.entered.set()
            self.gate.wait(PATIENCE)


@contextlib.contextmanager
def _stuck_log(match: Callable[[str], bool]) -> Iterator[_StuckLog]:
    handler = _StuckLog(match)
    logger = logging.getLogger("coordlock")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        handler.gate.set()
        logger.removeHandler(handler)


def _wait_child(pid: int, within: float = PATIENCE) -> int | None:
    """The exit code of the forked child ``pid`` (negative: killed by that signal), or
    ``None`` when it did not end within ``within`` seconds (it is then killed)."""
    status: list[int] = []

    def ended() -> bool:
        if not status:
            got, code = os.waitpid(pid, os.WNOHANG)
            if got:
                status.append(code)
        return bool(status)

    if not eventually(ended, within=within):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    return os.waitstatus_to_exitcode(status[0])


def _run_in_child(body: Callable[[], int]) -> int:
    """Fork; in the child run ``body`` (bounded by an alarm) and leave with its exit code
    through ``os._exit``. Returns the child's pid in the parent."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
            signal.alarm(10)  # a child that hangs dies instead
            code = body()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    return pid


# -- one lock() object shared by threads and tasks -------------------------------------------


def test_lock_object_shared_by_threads_gives_each_block_its_own_lease(
    mem: MemoryCoordinator,
) -> None:
    name = _name()
    shared = mem.lock(name, ttl=10)  # a module-level `LOCK = lock(...)`, wait=False
    inside, leave = threading.Event(), threading.Event()
    first: list[Any] = []

    def holder() -> None:
        with shared as lease:
            first.append(lease)
            inside.set()
            leave.wait(PATIENCE)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert inside.wait(PATIENCE)
        with pytest.raises(LockNotAcquired):  # another thread: busy, not the holder's lease
            with shared:
                pytest.fail("a second thread entered the block while the first held the lock")
        assert shared.lease is None  # this thread holds nothing
    finally:
        leave.set()
        thread.join(PATIENCE)
    assert first[0].released and not first[0].lost
    assert shared.lease is None


def test_nested_block_of_the_same_lock_object_does_not_release_the_outer(
    mem: MemoryCoordinator,
) -> None:
    name = _name()
    shared = mem.lock(name, ttl=10)
    with shared as outer:
        with pytest.raises(LockNotAcquired):  # not re-entrant: the inner block is refused
            with shared:
                pass
        assert shared.lease is outer
        assert mem.acquire(name, ttl=5) is None  # the outer block still holds the lock
        assert not outer.released
    assert outer.released


def test_lock_object_shared_by_tasks_serialises_them(mem: MemoryCoordinator) -> None:
    name = _name()
    shared = mem.lock(name, ttl=10, wait=True)
    events: list[tuple[str, int, int]] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def task(i: int) -> None:
            async with shared as lease:
                events.append(("in", i, lease.fence))
                if i == 0:
                    await gate.wait()
                events.append(("out", i, lease.fence))

        first = asyncio.create_task(task(0))
        for _ in range(1000):  # bounded: until the first task is inside
            if events:
                break
            await asyncio.sleep(0.001)
        second = asyncio.create_task(task(1))
        for _ in range(20):  # let the second task run as far as it can
            await asyncio.sleep(0.001)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), PATIENCE)

    asyncio.run(main())
    assert [(what, i) for what, i, _ in events] == [("in", 0), ("out", 0), ("in", 1), ("out", 1)]
    assert events[0][2] < events[2][2]  # two acquisitions, increasing fences


# -- extensions and release of one lease are serialised ----------------------------------------


class _SlowReplyExtend(MemoryCoordinator):
    """``extend(100)`` is applied on the server at once, but its reply is held at a gate."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.applied = threading.Event()
        self.reply = threading.Event()
        self.second_applied = threading.Event()

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        ok = super()._extend(name, owner, ttl)
        if ttl == 100:
            self.applied.set()
            self.reply.wait(PATIENCE)
        else:
            self.second_applied.set()
        return ok


def test_concurrent_extensions_never_leave_the_local_deadline_past_the_servers() -> None:
    c = _SlowReplyExtend(f"review-{uuid.uuid4().hex}")
    name = _name()
    lease = c.acquire(name, ttl=30, renew=False)
    assert lease is not None
    results: dict[str, bool] = {}
    user = threading.Thread(target=lambda: results.update(user=lease.extend(100)))
    renewal = threading.Thread(target=lambda: results.update(renewal=lease.extend(3)))
    try:
        user.start()
        assert c.applied.wait(PATIENCE)
        renewal.start()  # a second extension while the first one's reply is in flight
        c.second_applied.wait(0.5)  # unserialised, it reaches the server now
    finally:
        c.reply.set()
        user.join(PATIENCE)
        renewal.join(PATIENCE)
    assert results == {"user": True, "renewal": True}
    server_expiry = c._t.locks[name].expires  # same clock (time.monotonic)
    # The lease must never believe it holds the lock longer than the server keeps it.
    assert lease._deadline <= server_expiry
    assert lease.release()
    c.close()


class _CountedExtend(_SlowReplyExtend):
    renewals = 0

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        ok = super()._extend(name, owner, ttl)
        if ttl != 100:
            self.renewals += 1
        return ok


def test_renewal_queued_behind_an_extension_keeps_the_extended_ttl() -> None:
    c = _CountedExtend(f"review-{uuid.uuid4().hex}")
    name = _name()
    lease = c.acquire(name, ttl=3)  # renewed by the background renewer every second
    assert lease is not None
    results: list[bool] = []
    user = threading.Thread(target=lambda: results.append(lease.extend(100)))
    try:
        user.start()
        assert c.applied.wait(PATIENCE)
        # the renewer takes the lease off its schedule when it falls due (about 1 s)
        assert eventually(lambda: all(entry[3] is not lease for entry in c._renewer._heap))
    finally:
        c.reply.set()
        user.join(PATIENCE)
    assert results == [True]
    # the queued renewal now gets the lease's lock: it must see the extension and step aside
    assert eventually(lambda: any(e[3] is lease and e[2] == lease._gen for e in c._renewer._heap))
    try:
        assert c.renewals == 0  # it did not send the old 3 s ttl
        assert lease.ttl == 100
        assert lease._deadline <= c._t.locks[name].expires
        assert lease.remaining > 3  # still the extension's ~100 s, not the old ttl's 3 s
    finally:
        lease.release()
        c.close()


class _SlowRenewal(MemoryCoordinator):
    """The renewal (``extend(5)``) is slow to reach the server: held before it is applied."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sent = threading.Event()
        self.arrive = threading.Event()
        self.linger_applied = threading.Event()

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        if ttl == 5:
            self.sent.set()
            self.arrive.wait(PATIENCE)
        ok = super()._extend(name, owner, ttl)
        if ttl != 5:
            self.linger_applied.set()
        return ok


def test_renewal_in_flight_cannot_undo_hold_at_least() -> None:
    c = _SlowRenewal(f"review-{uuid.uuid4().hex}")
    name = _name()
    lease = c.acquire(name, ttl=5, renew=False, hold_at_least=60)
    assert lease is not None
    results: dict[str, bool] = {}
    renewal = threading.Thread(target=lambda: results.update(renewal=lease.extend(5)))
    release = threading.Thread(target=lambda: results.update(release=lease.release()))
    try:
        renewal.start()
        assert c.sent.wait(PATIENCE)
        release.start()  # release (shorten to the hold) while the renewal is in flight
        c.linger_applied.wait(0.5)  # unserialised, the hold reaches the server first
    finally:
        c.arrive.set()
        renewal.join(PATIENCE)
        release.join(PATIENCE)
    assert results.get("release") is True
    assert lease._hold_until is not None
    # The name stays taken until hold_at_least (60 s), not the renewal's 5 s.
    assert c._t.locks[name].expires >= lease._hold_until - 1.0
    other = MemoryCoordinator(c.name)
    assert other.acquire(name, ttl=1) is None
    c.close()


# -- fork ----------------------------------------------------------------------------------


@linux_only
def test_forked_child_does_not_release_the_parents_lock(tmp_path: Path) -> None:
    path = tmp_path / "fork.db"
    c = SQLiteCoordinator(path)
    context = c.lock("job", ttl=30)
    with context as lease:

        def child() -> int:
            context.__exit__(SystemExit, SystemExit(0), None)  # sys.exit() in the block
            return 0 if lease.release() is False else 1

        assert _wait_child(_run_in_child(child)) == 0
        other = SQLiteCoordinator(path)
        try:
            assert [info.owner for info in other.locks()] == [lease.owner]
            assert other.acquire("job", ttl=5) is None
        finally:
            other.close()
        assert not lease.lost
    assert lease.released and not lease.lost
    c.close()


@linux_only
def test_forked_child_works_though_another_thread_held_the_sqlite_guard(tmp_path: Path) -> None:
    c = SQLiteCoordinator(tmp_path / "guard.db", timeout=2, retry_deadline=1)
    inside, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with c._guard:  # e.g. the renewer thread in the middle of a call
            inside.set()
            leave.wait(PATIENCE)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert inside.wait(PATIENCE)
        pid = _run_in_child(lambda: 0 if c.acquire("job", ttl=5) is not None else 1)
    finally:
        leave.set()
        thread.join(PATIENCE)
    assert _wait_child(pid) == 0  # not hung on the copy of a held guard
    c.close()


@linux_only
def test_forked_child_during_a_sqlite_transaction_fails_cleanly(tmp_path: Path) -> None:
    """SQLite's own rule (docs/backends/sqlite.md): a child forked while another thread of the
    parent was inside a transaction cannot write to the file — SQLite keeps per-process lock
    state that the fork copied. The child must fail with BackendUnavailable within its
    ``timeout`` (never hang), and the parent is unaffected."""
    from coordlock import BackendUnavailable

    c = SQLiteCoordinator(tmp_path / "tx.db", timeout=0.3, retry_deadline=0.3)

    def child() -> int:
        try:
            c.acquire("job", ttl=5)
        except BackendUnavailable:
            return 0
        return 1
    inside, leave = threading.Event(), threading.Event()

    def renewer_like() -> None:
        with c._tx():  # a write transaction (a renewal) in progress at the fork
            inside.set()
            leave.wait(PATIENCE)

    thread = threading.Thread(target=renewer_like)
    thread.start()
    try:
        assert inside.wait(PATIENCE)
        pid = _run_in_child(child)
    finally:
        leave.set()  # the parent commits right away
        thread.join(PATIENCE)
    assert _wait_child(pid) == 0
    lease = c.acquire("job", ttl=5)  # the parent goes on as before
    assert lease is not None and lease.release()
    c.close()


# -- async cancellation ----------------------------------------------------------------------


class _GatedTry(SQLiteCoordinator):
    """A backend on the sync hooks whose acquisition attempt is in flight until a gate opens."""

    def __init__(self, path: Path) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()
        super().__init__(path)

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        self.entered.set()
        self.go.wait(PATIENCE)
        try:
            return super()._try_acquire(name, owner, ttl, ticket)
        finally:
            self.done.set()


def test_cancelled_aacquire_leaves_no_orphan_lock(tmp_path: Path) -> None:
    path = tmp_path / "cancel.db"
    c = _GatedTry(path)

    async def main() -> bool:
        task = asyncio.create_task(c.aacquire("job", ttl=60))
        assert await asyncio.to_thread(c.entered.wait, PATIENCE)
        task.cancel()  # the caller gives up while the attempt is on its way to the server
        await asyncio.wait({task}, timeout=0.5)  # unfixed, the cleanup runs (too early) here
        c.go.set()  # the attempt reaches the server and is granted
        await asyncio.wait({task}, timeout=PATIENCE)
        assert await asyncio.to_thread(c.done.wait, PATIENCE)
        return task.cancelled()

    try:
        assert asyncio.run(main())
    finally:
        c.go.set()
    other = SQLiteCoordinator(path)
    try:
        assert other.locks() == []  # no lock owned by nobody
        assert other.acquire("job", ttl=5) is not None
    finally:
        other.close()
        c.close()


def test_cancelled_memory_waiters_are_forgotten(mem: MemoryCoordinator) -> None:
    name = _name()

    async def main() -> tuple[int, int]:
        holder = await mem.aacquire(name, ttl=30)
        assert holder is not None
        registered = 0
        for _ in range(10):
            before = len(mem._t.async_waiters.get(name, []))
            task = asyncio.create_task(mem.aacquire(name, ttl=5, wait=30))
            for _ in range(1000):  # bounded: until the waiter is registered
                if len(mem._t.async_waiters.get(name, [])) > before:
                    registered += 1
                    break
                await asyncio.sleep(0.001)
            task.cancel()
            await asyncio.wait({task}, timeout=PATIENCE)
        left = len(mem._t.async_waiters.get(name, []))
        await holder.release()
        return registered, left

    registered, left = asyncio.run(main())
    assert registered == 10
    assert left == 0


# -- ordered, single reports of state changes ------------------------------------------------


def test_on_lost_registered_while_the_loss_is_being_reported_runs_once(
    mem: MemoryCoordinator,
) -> None:
    name = _name()
    lease = mem.acquire(name, ttl=30)
    assert lease is not None
    calls: list[str] = []
    with _stuck_log(lambda m: repr(name) in m and " lost: " in m) as stuck:
        marker = threading.Thread(target=lease._mark_lost, args=("test: taken over",))
        marker.start()
        assert stuck.entered.wait(PATIENCE)  # the loss is being logged (slow log sink)
        lease.on_lost(lambda _lease: calls.append("late"))
        stuck.gate.set()
        marker.join(PATIENCE)
    done = threading.Event()
    lease.on_lost(lambda _lease: done.set())  # reported after everything before it
    assert done.wait(PATIENCE)
    assert calls == ["late"]


def test_at_risk_and_restored_are_reported_in_the_order_they_happened(
    mem: MemoryCoordinator,
) -> None:
    name = _name()
    lease = mem.acquire(name, ttl=30)
    assert lease is not None
    states: list[str] = []
    lease.on_state(lambda _lease, state: states.append(state))
    with _stuck_log(lambda m: repr(name) in m and " at risk: " in m) as stuck:
        marker = threading.Thread(target=lease._mark_at_risk, args=("test",))
        marker.start()
        assert stuck.entered.wait(PATIENCE)  # 'at risk' is being logged (slow log sink)
        assert lease._restored()  # a renewal is confirmed meanwhile
        stuck.gate.set()
        marker.join(PATIENCE)
    assert eventually(lambda: len(states) >= 2)
    assert states == ["at-risk", "restored"]
    assert lease.at_risk is False  # the last state reported agrees with the lease


def test_stalled_callback_does_not_reorder_its_lease(
    mem: MemoryCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hand stalled work over at once (the default waits STALL_AFTER seconds first).
    monkeypatch.setattr(watchdog_module, "STALL_AFTER", 0.0, raising=False)
    lease = mem.acquire(_name(), ttl=30)
    assert lease is not None
    gate, blocking = threading.Event(), threading.Event()
    seen: list[str] = []

    def slow(_lease: Any, state: str) -> None:  # e.g. a webhook
        if state == "at-risk":
            blocking.set()
            gate.wait(PATIENCE)

    lease.on_state(slow)
    lease.on_state(lambda _lease, state: seen.append(state))
    try:
        lease._mark_at_risk("test")
        assert blocking.wait(PATIENCE)
        lease._mark_lost("test")  # the next change while a callback of this lease is stuck
        eventually(lambda: bool(seen), within=0.5)  # a reordering hand-over shows it here
    finally:
        gate.set()
    assert eventually(lambda: len(seen) >= 2)
    assert seen == ["at-risk", "lost"]


def test_watchdog_flips_other_leases_while_a_log_handler_is_stuck(
    mem: MemoryCoordinator,
) -> None:
    a_name, b_name = _name(), _name()
    with _stuck_log(lambda m: repr(a_name) in m and " lost: " in m) as stuck:
        mem.acquire(a_name, ttl=0.05, renew=False)
        assert stuck.entered.wait(PATIENCE)  # a's loss report is stuck in the log handler
        b = mem.acquire(b_name, ttl=0.05, renew=False)
        assert b is not None
        # b is marked by the watchdog (not merely past its deadline)
        assert eventually(
            lambda: b.lost_reason == "ttl elapsed (renewal is off for this lease)", within=5
        )


def test_stuck_callback_of_one_lease_does_not_hold_up_another_lease(
    mem: MemoryCoordinator,
) -> None:
    a = mem.acquire(_name(), ttl=30)
    b = mem.acquire(_name(), ttl=30)
    assert a is not None and b is not None
    gate, blocking, b_heard = threading.Event(), threading.Event(), threading.Event()

    def stuck(_lease: Any, state: str) -> None:
        blocking.set()
        gate.wait(PATIENCE)

    a.on_state(stuck)
    b.on_state(lambda _lease, state: b_heard.set())
    try:
        a._mark_at_risk("test")
        assert blocking.wait(PATIENCE)
        b._mark_at_risk("test")
        assert b_heard.wait(3)  # while a's callback is still stuck
    finally:
        gate.set()


# -- event loops -----------------------------------------------------------------------------


def test_async_lease_used_from_another_event_loop_is_refused(mem: MemoryCoordinator) -> None:
    name = _name()

    async def take() -> Any:
        lease = await mem.aacquire(name, ttl=3)
        await asyncio.sleep(0.05)  # its renewer task has started and waits
        return lease

    lease = asyncio.run(take())  # loop A ends; the lease outlives it

    async def later() -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for call in (lease.extend, lease.release):
            try:
                await asyncio.wait_for(call(), PATIENCE)
                outcomes.append(None)
            except RuntimeError as exc:
                outcomes.append(exc)
        await asyncio.sleep(0.05)  # unfixed, a renewer revived on this loop spins here
        return outcomes

    out: list[list[BaseException | None]] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(later())), daemon=True)
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive(), "the second event loop froze"
    assert len(out) == 1 and all(isinstance(exc, RuntimeError) for exc in out[0])
    assert all("event loop" in str(exc) for exc in out[0])
    assert not lease.released


def test_closed_event_loops_are_not_kept(mem: MemoryCoordinator) -> None:
    name = _name()
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def once() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with mem.lock(name, ttl=0.3):
            await asyncio.sleep(0)

    for _ in range(20):
        asyncio.run(once())
    assert len(mem._loop_state) <= 1  # only the last loop's state, until another loop comes

    def freed() -> bool:
        gc.collect()
        return sum(ref() is None for ref in loops) >= len(loops) - 1

    assert eventually(freed, within=5)


# -- bookkeeping that must not grow ----------------------------------------------------------


def test_unreleased_expired_leases_are_not_kept(mem: MemoryCoordinator) -> None:
    prefix = _name()
    for i in range(200):  # fire and forget: "at most once per 50 ms"
        mem.acquire(f"{prefix}-{i}", ttl=0.05, renew=False)

    def dropped() -> bool:
        gc.collect()
        return len(mem._leases_by_owner) < 20

    assert eventually(dropped, within=5)


def test_watchdog_heap_is_compacted_while_many_leases_are_alive(mem: MemoryCoordinator) -> None:
    prefix = _name()
    held = [mem.acquire(f"{prefix}-long-{i}", ttl=3600) for i in range(COMPACT_AFTER + 100)]
    try:
        base = len(watchdog._heap)
        renewer_base = len(mem._renewer._heap)
        cycles = 4 * COMPACT_AFTER
        for i in range(cycles):  # short critical sections
            lease = mem.acquire(f"{prefix}-short-{i % 50}", ttl=3600)
            assert lease is not None
            lease.release()
        # Released entries are dropped once they are the majority; unfixed, all stay.
        assert len(watchdog._heap) - base <= max(base, COMPACT_AFTER) + 64
        assert len(mem._renewer._heap) - renewer_base <= max(renewer_base, COMPACT_AFTER) + 64
    finally:
        for lease in held:
            if lease is not None:
                lease.release()


# -- closed coordinators ---------------------------------------------------------------------


def test_async_release_after_close_returns_false(tmp_path: Path) -> None:
    c = SQLiteCoordinator(tmp_path / "closed.db")

    async def main() -> tuple[Any, bool]:
        lease = await c.aacquire("async-job", ttl=60)
        assert lease is not None
        c.close()  # application shutdown while a request is inside `async with`
        return lease, await lease.release()

    lease, released = asyncio.run(main())
    assert released is False  # not a raw RuntimeError from the shut-down worker pool
    assert lease.lost


def test_closing_a_coordinator_reports_its_leases_lost(tmp_path: Path) -> None:
    c = SQLiteCoordinator(tmp_path / "closed.db")
    lease = c.acquire("job", ttl=60)
    assert lease is not None
    heard = threading.Event()
    lease.on_lost(lambda _lease: heard.set())
    c.close()  # nothing renews it any more: its holder hears it now, not after 60 s
    assert heard.wait(5)
    assert lease.lost
    assert lease.release() is False


# -- @locked ---------------------------------------------------------------------------------


def test_locked_refuses_a_sync_callable_returning_a_coroutine(mem: MemoryCoordinator) -> None:
    name = _name()
    ran: list[int] = []

    async def job() -> None:
        ran.append(1)

    def traced(fn: Callable[..., Any]) -> Callable[..., Any]:  # a sync tracing decorator
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    locked_job = coordlock.locked(name, coordinator=mem)(traced(job))
    with pytest.raises(TypeError, match="coroutine"):
        result = locked_job()
        if asyncio.iscoroutine(result):  # unfixed: returned unlocked; do not leak it
            result.close()
    assert ran == []
    assert mem.acquire(name, ttl=5) is not None  # the lock was released


class _AsyncJob:
    """A callable object with an ``async __call__`` (not a coroutine function itself)."""

    def __init__(self) -> None:
        self.inside = asyncio.Event()
        self.leave = asyncio.Event()

    async def __call__(self) -> str:
        self.inside.set()
        await self.leave.wait()
        return "done"


async def _second_call_while_first_runs(locked_job: Any, job: _AsyncJob) -> tuple[Any, Any]:
    """Run ``locked_job`` and, while its body runs, call it again; return both outcomes
    (an exception of the second call is returned, not raised)."""
    first = asyncio.create_task(locked_job())
    await asyncio.wait_for(job.inside.wait(), PATIENCE)
    try:
        second: Any = await asyncio.wait_for(locked_job(), 2)
    except Exception as exc:  # LockNotAcquired, or a TimeoutError when it ran unlocked
        second = exc
    finally:
        job.leave.set()
    return await asyncio.wait_for(first, PATIENCE), second


def test_locked_object_with_async_call_holds_the_lock_while_it_runs(
    mem: MemoryCoordinator,
) -> None:
    async def main() -> tuple[Any, Any]:
        job = _AsyncJob()
        locked_job = coordlock.locked(_name(), coordinator=mem, on_busy="raise")(job)
        return await _second_call_while_first_runs(locked_job, job)

    first, second = asyncio.run(main())
    assert first == "done"
    assert isinstance(second, LockNotAcquired)  # the lock was held while the body ran


def test_locked_object_with_async_call_is_skipped_when_busy(mem: MemoryCoordinator) -> None:
    async def main() -> tuple[Any, Any]:
        job = _AsyncJob()
        locked_job = coordlock.locked(_name(), coordinator=mem, on_busy="skip")(job)
        return await _second_call_while_first_runs(locked_job, job)

    assert asyncio.run(main()) == ("done", None)


def test_locked_refuses_generator_functions(mem: MemoryCoordinator) -> None:
    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    for func in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            coordlock.locked(_name(), coordinator=mem)(func)


# -- error classification --------------------------------------------------------------------


class _Failing(MemoryCoordinator):
    error: OSError = OSError()
    tries = 0

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        type(self).tries += 1
        raise self.error


@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EHOSTUNREACH])
def test_network_oserrors_are_transient(code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Failing, "error", OSError(code, os.strerror(code)))
    c = _Failing(f"review-{uuid.uuid4().hex}", retry_deadline=0.2)
    try:
        monkeypatch.setattr(_Failing, "tries", 0)
        with pytest.raises(BackendUnavailable):
            c.acquire("job", 5)
        assert _Failing.tries >= 2  # retried

        monkeypatch.setattr(_Failing, "tries", 0)
        with pytest.raises(BackendUnavailable):
            asyncio.run(c.aacquire("job", 5))
        assert _Failing.tries >= 2
    finally:
        c.close()


def test_other_oserrors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Failing, "error", OSError(errno.EACCES, os.strerror(errno.EACCES)))
    monkeypatch.setattr(_Failing, "tries", 0)
    c = _Failing(f"review-{uuid.uuid4().hex}", retry_deadline=0.2)
    try:
        with pytest.raises(BackendError) as info:
            c.acquire("job", 5)
        assert not isinstance(info.value, BackendUnavailable)
        assert _Failing.tries == 1
    finally:
        c.close()


# -- release whose reply was lost ------------------------------------------------------------


class _LostReleaseReply(MemoryCoordinator):
    """The first release is applied on the server, but its reply is lost."""

    failed = False

    def _release(self, name: str, owner: str) -> bool:
        ok = super()._release(name, owner)
        if not self.failed:
            self.failed = True
            raise ConnectionError("connection reset (reply lost)")
        return ok


def test_a_release_hook_that_is_not_retry_safe_is_never_assumed_clean() -> None:
    """Issue 10 row 10 is the backends' part (docs/backend-authors.md: a networked ``_release``
    must answer True to a retry after a lost reply; Redis keeps a per-owner tombstone). The
    core never guesses: a hook that answers False is a loss, reported, not a silent success."""
    c = _LostReleaseReply(f"review-{uuid.uuid4().hex}")
    try:
        with pytest.raises(coordlock.LockLost):
            with c.lock("job", ttl=10) as lease:
                pass
        assert lease.released and lease.lost
    finally:
        c.close()


# -- renewal hand-over: the watchdog passes a lease to its renewer when the first renewal falls due


def test_a_lease_released_early_never_reaches_the_renewer(mem: MemoryCoordinator) -> None:
    leases = [mem.acquire(_name(), 30) for _ in range(50)]
    for lease in leases:
        assert lease is not None and lease.release()
    assert all(entry[3] is not lease for entry in mem._renewer._heap for lease in leases)


def test_a_held_lease_is_handed_to_the_renewer_and_renewed(mem: MemoryCoordinator) -> None:
    lease = mem.acquire(_name(), 0.6)
    assert lease is not None
    fence, first_deadline = lease.fence, lease._deadline
    assert eventually(lambda: lease._deadline > first_deadline)  # renewed after ~0.2 s
    assert eventually(lambda: lease._deadline > first_deadline + 0.6)  # and again
    assert not lease.lost and not lease.at_risk and lease.fence == fence
    assert lease.release()


def test_an_async_lease_is_renewed_on_its_own_loop(mem: MemoryCoordinator) -> None:
    async def scenario() -> tuple[bool, bool, int]:
        lease = await mem.aacquire(_name(), 0.6)
        assert lease is not None
        start = lease._deadline
        loop = asyncio.get_running_loop()
        for _ in range(100):  # up to ~5 s of loop time, the loop stays free meanwhile
            await asyncio.sleep(0.05)
            if lease._deadline > start + 0.6:
                break
        renewer = mem._loop_local("renewer", lambda: None)
        on_loop = renewer is not None and renewer._loop is loop
        renewed = lease._deadline > start + 0.6 and not lease.lost
        ok = await lease.release()
        return renewed, on_loop, int(ok)

    assert asyncio.run(scenario()) == (True, True, 1)
