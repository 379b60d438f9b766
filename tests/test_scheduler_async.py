"""Coroutine jobs: ``async def`` jobs run on the application's event loop (``await
sched.astart()``) or on the scheduler's own, with the same claims, leases, timeouts (task
cancellation), retries and events as sync jobs; the scheduler never blocks the loop.

The FastAPI-style flow is played without FastAPI: an asyncio "app" that awaits ``astart()`` of
three instances at startup and ``astop()`` at shutdown, on memory:// and on Redis.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordlock import RunCoordinator, Scheduler, connect
from coordlock._lease import Lease
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import Event, ManualClock, current_run, tick_key

T0 = 1_700_000_000.0
TICK = "2023-11-14T22:13:20Z"


class Recorder:
    def __init__(self, *scheds: Scheduler) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        for sched in scheds:
            sched.on("*", self)

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: str, reason: str | None = None) -> list[Event]:
        with self._lock:
            return [
                e for e in self.events if e.kind == kind and (reason is None or e.reason == reason)
            ]


def mem() -> MemoryCoordinator:
    return MemoryCoordinator(f"async-{uuid.uuid4().hex}")


# -- on the scheduler's own loop -----------------------------------------------------------------


def test_a_coroutine_job_runs_on_the_schedulers_own_loop() -> None:
    clock = ManualClock(T0)
    sched = Scheduler(mem(), clock=clock, instance_id="own")
    rec = Recorder(sched)
    seen: list[Any] = []

    @sched.every(10, name="co")
    async def co() -> None:
        await asyncio.sleep(0)
        seen.append((current_run(), threading.get_ident(), asyncio.get_running_loop()))

    try:
        assert sched.run_pending() == 1
        ((ctx, thread, loop),) = seen
        assert ctx.key == f"co@{TICK}" and ctx.instance == "own" and ctx.fence is not None
        assert thread != threading.get_ident()  # the scheduler's loop thread, not the caller's
        assert current_run() is None
        (finished,) = rec.of("finished")
        assert finished.job == "co" and finished.attempts == 1
        clock.set(T0 + 10)
        assert sched.run_pending() == 1
        assert seen[1][2] is loop  # one loop for every run: resources made there stay usable
    finally:
        sched.stop()
    assert loop.is_closed()


def test_coroutine_timeout_cancels_the_task() -> None:
    clock = ManualClock(T0)
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    cancelled = threading.Event()

    @sched.every(10, name="slow", timeout=0.3)
    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        sched.run_pending()
    finally:
        sched.stop()
    assert cancelled.is_set()
    (failed,) = rec.of("failed")
    assert failed.reason == "timeout" and "cancelled" in (failed.error or "")
    assert rec.of("stuck") == []


def test_coroutine_retries_and_errors() -> None:
    clock = ManualClock(T0)
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    attempts: list[int] = []

    @sched.every(10, name="flaky", retries=2, backoff=0)
    async def flaky() -> None:
        ctx = current_run()
        assert ctx is not None
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")

    @sched.every(10, name="broken")
    async def broken() -> None:
        raise ValueError("nope")

    try:
        sched.run_pending()
    finally:
        sched.stop()
    assert attempts == [1, 2, 3]
    (finished,) = rec.of("finished")
    assert finished.job == "flaky" and finished.attempts == 3
    (failed,) = rec.of("failed")
    assert failed.job == "broken" and failed.error == "ValueError: nope"
    assert isinstance(failed.exception, ValueError)


def test_a_sync_wrapper_returning_a_coroutine_is_awaited() -> None:
    clock = ManualClock(T0)
    sched = Scheduler(mem(), clock=clock)
    ran: list[str] = []

    async def work() -> None:
        ran.append("awaited")

    sched.add(lambda: work(), 10, name="wrapped")
    try:
        assert sched.run_pending() == 1
    finally:
        sched.stop()
    assert ran == ["awaited"]


async def async_child(path: str) -> None:
    """A coroutine process job (module level: picklable)."""
    await asyncio.sleep(0)
    ctx = current_run()
    assert ctx is not None
    Path(path).write_text(f"{ctx.key} {os.getpid()}")


def test_a_coroutine_job_with_process_isolation_runs_under_asyncio_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sched = Scheduler(mem(), clock=ManualClock(T0))
    rec = Recorder(sched)
    sched.add(async_child, 10, name="child", args=(str(out),), isolation="process", timeout=60)
    sched.run_pending()
    assert rec.of("failed") == []
    key, pid = out.read_text().split()
    assert key == f"child@{TICK}" and int(pid) != os.getpid()


# -- on the application's loop: a FastAPI-style lifespan -------------------------------------


@dataclass
class App:
    """An asyncio application with scheduler instances started in its lifespan."""

    url: str
    instances: int = 3
    period: float = 1.0
    runs: list[tuple[str, str]] = field(default_factory=list)
    loops: set[int] = field(default_factory=set)
    threads: set[int] = field(default_factory=set)

    async def serve(self, seconds: float) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        coordinators = [connect(self.url) for _ in range(self.instances)]
        scheds = [
            Scheduler(c, instance_id=f"app-{i}", shutdown_grace=5)
            for i, c in enumerate(coordinators)
        ]
        for sched in scheds:
            sched.every(self.period, name="beat")(self.beat)
        try:
            for sched in scheds:  # the lifespan's startup
                await sched.astart()
            started = time.time()
            await asyncio.sleep(seconds)  # the app serves requests meanwhile
            ended = time.time()
        finally:
            for sched in scheds:  # the lifespan's shutdown
                await sched.astop()
            for c in coordinators:
                c.close()
        assert self.loops == {id(loop)} and self.threads == {threading.get_ident()}
        return started, ended

    async def beat(self) -> None:
        ctx = current_run()
        assert ctx is not None
        self.loops.add(id(asyncio.get_running_loop()))
        self.threads.add(threading.get_ident())
        await asyncio.sleep(0.01)
        self.runs.append((ctx.key, ctx.instance))


@pytest.mark.parametrize("backend_name", ["memory", "redis"], indirect=True)
def test_fastapi_style_app_runs_each_tick_once_on_its_own_loop(
    backend_name: str, backend_url: str
) -> None:
    app = App(backend_url)
    started, ended = asyncio.run(app.serve(9.0))
    counts = Counter(key for key, _ in app.runs)
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    first = (int(started / app.period) + 2) * app.period  # margin: ticks after every start
    window = [first + i * app.period for i in range(int((ended - 1 - first) / app.period))]
    expected = {f"beat@{tick_key(t)}" for t in window}
    misses = sorted(expected - set(counts))
    by_instance = Counter(instance for _, instance in app.runs)
    print(
        f"[{backend_name}] instances {app.instances}, ticks {len(window)}, runs {len(app.runs)}, "
        f"duplicates {len(duplicates)}, misses {len(misses)}, by instance {dict(by_instance)}"
    )
    assert len(window) >= 5
    assert duplicates == []
    assert misses == []


# -- the loop is never blocked by the scheduler --------------------------------------------------


class Slow:
    """A coordinator whose every call blocks its thread for ``delay`` real seconds, and notes
    the thread and the loop ticker's count before and after each call."""

    def __init__(self, inner: MemoryCoordinator, delay: float, ticker: Ticker) -> None:
        self.inner = inner
        self.delay = delay
        self.ticker = ticker
        self.calls: list[tuple[str, int, int, int]] = []  # (what, thread, ticks before, after)

    def _slow(self, what: str) -> None:
        before = self.ticker.count
        time.sleep(self.delay)
        self.calls.append((what, threading.get_ident(), before, self.ticker.count))

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        self._slow(f"acquire {name}")
        return self.inner.acquire(name, ttl, wait=wait, renew=renew)

    def release(self, lease: Lease) -> bool:
        return self.inner.release(lease)

    def extend(self, lease: Lease, ttl: float) -> bool:
        return self.inner.extend(lease, ttl)

    def claim(self, key: str, hold: float) -> bool:
        return key in self.claim_many([key], hold)

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        self._slow("claim_many")
        return self.inner.claim_many(keys, hold)

    def record_run(self, run: Any) -> None:
        self.inner.record_run(run)

    def history(self, job: str | None = None, limit: int = 100) -> list[Any]:
        return self.inner.history(job, limit)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Ticker:
    """A task on the loop that counts its wake-ups and the longest gap between them."""

    count: int = 0
    max_gap: float = 0.0
    thread: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        self.thread = threading.get_ident()
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            self.count += 1


def test_slow_coordinator_calls_never_block_the_event_loop() -> None:
    ticker = Ticker()
    coord = Slow(mem(), delay=0.5, ticker=ticker)
    assert isinstance(coord, RunCoordinator)
    ran: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()
        ticking = asyncio.create_task(ticker.run(stop))
        sched = Scheduler(coord, instance_id="slow", heartbeat_ttl=30)

        @sched.every(1, name="quick")
        async def quick() -> None:
            ran.append(threading.get_ident())

        await sched.astart()  # takes the liveness lease: a slow call too
        deadline = time.monotonic() + 20
        while len(ran) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sched.astop()
        stop.set()
        await ticking

    asyncio.run(main())
    kinds = Counter(what.split()[0] for what, *_ in coord.calls)
    print(
        f"slow calls {dict(kinds)} of {coord.delay}s each; ticker {ticker.count} ticks, "
        f"max gap {ticker.max_gap * 1000:.0f} ms"
    )
    assert len(ran) >= 2 and set(ran) == {ticker.thread}  # the jobs ran on the app's loop
    assert kinds["claim_many"] >= 2 and kinds["acquire"] >= 3  # liveness + 2 job leases
    for what, thread, before, after in coord.calls:
        assert thread != ticker.thread, f"{what} ran on the event loop's thread"
        assert after > before, f"the loop did not tick during {what} ({coord.delay}s)"


# -- lifecycle on a loop ------------------------------------------------------------------------


def test_astop_cancels_coroutine_jobs_still_running_after_the_grace() -> None:
    sched = Scheduler(mem(), instance_id="cancel")
    rec = Recorder(sched)
    entered = threading.Event()

    @sched.every(1, name="forever")
    async def forever() -> None:
        entered.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        await sched.astart()
        while not entered.is_set():
            await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="astop"):
            sched.stop()  # would block the loop its job runs on
        await sched.astop(timeout=0.2)

    asyncio.run(asyncio.wait_for(main(), 60))
    (failed,) = rec.of("failed")
    assert "cancelled" in (failed.error or "") and "stopped" in (failed.error or "")
    assert not sched.running


def test_astart_twice_and_after_stop_is_refused() -> None:
    sched = Scheduler(mem())

    async def main() -> None:
        await sched.astart()
        try:
            with pytest.raises(RuntimeError):
                await sched.astart()
        finally:
            await sched.astop()
        with pytest.raises(RuntimeError):
            await sched.astart()

    asyncio.run(main())


def test_a_run_after_the_apps_loop_ended_fails_clearly() -> None:
    """An app that never awaited astop(): the next coroutine run fails with a clear error."""
    clock = ManualClock(T0 - 0.5)
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    sched.every(10, name="orphan")(_noop_async)

    async def app() -> None:
        await sched.astart()

    asyncio.run(app())  # the loop ends; the scheduler still runs
    try:
        clock.set(T0)
        deadline = time.monotonic() + 10
        while not rec.of("failed") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sched.stop()
    (failed,) = rec.of("failed")
    assert "astop" in (failed.error or "")


async def _noop_async() -> None:
    pass
