"""APScheduler 3.x integration: real APScheduler, real processes, real coordinator servers."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _procs import EXAMPLES, Proc, Tally, env_with, next_tick, sleep_until
from apscheduler.events import (
    EVENT_ALL,
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
)
from apscheduler.executors.base import MaxInstancesReachedError
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler

import coordlock
from coordlock import BackendUnavailable
from coordlock.integrations.apscheduler import (
    EVENT_JOB_CLAIMED_ELSEWHERE,
    CoordinatedExecutor,
    coordinate,
    run_time_key,
)

PERIOD = 2.0
FIRE_TIMES = 12


@pytest.mark.parametrize("backend_name", ["redis", "sqlite"], indirect=True)
def test_three_processes_run_each_fire_time_once_with_one_killed(
    backend_url: str, tmp_path: Path
) -> None:
    """3 processes, CronTrigger(second="*/2"), 12 fire times; one SIGKILLed mid-way."""
    env = env_with(COORDLOCK_URL=backend_url)
    script = str(EXAMPLES / "apscheduler_app.py")
    procs = [Proc([sys.executable, script], env=env, cwd=tmp_path) for _ in range(3)]
    try:
        for proc in procs:
            proc.wait_for(r"^ready pid", 60)
        first = next_tick(time.time() + 1.0, PERIOD)
        last = first + (FIRE_TIMES - 1) * PERIOD
        sleep_until(first + 5 * PERIOD + PERIOD / 2)  # mid-way, between two fire times
        procs[0].kill()
        sleep_until(last + PERIOD / 2)
    finally:
        codes = [proc.stop() for proc in procs[1:]]
        procs[0].kill()
    ran = [line.split()[1] for proc in procs for line in proc.lines if line.startswith("ran ")]
    tally = Tally.of("report", first, PERIOD, FIRE_TIMES, ran)
    per_process = [sum(x.startswith("ran ") for x in proc.lines) for proc in procs]
    print(tally.summary("apscheduler", 3), f"runs_per_process={per_process} (first killed)")
    assert codes == [0, 0], [proc.text for proc in procs]
    assert tally.duplicates == 0, tally.ran
    assert tally.misses == [], tally.ran


# --- in-process behaviour: events, misfires, max_instances, fail closed, asyncio ---------------


class Spy:
    """Wraps a coordinator; records claim_many calls (keys, hold, thread)."""

    def __init__(self, inner: coordlock.RunCoordinator, fail: BaseException | None = None):
        self.inner = inner
        self.fail = fail
        self.calls: list[tuple[list[str], float, int]] = []

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        wanted = list(keys)
        self.calls.append((wanted, hold, threading.get_ident()))
        if self.fail is not None:
            raise self.fail
        return self.inner.claim_many(wanted, hold)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _scheduler(coordinator: Any, events: list[Any]) -> BackgroundScheduler:
    sched = BackgroundScheduler(timezone="UTC")
    sched.add_listener(events.append, EVENT_ALL | EVENT_JOB_CLAIMED_ELSEWHERE)
    sched.add_executor(CoordinatedExecutor(ThreadPoolExecutor(2), coordinator, skew=5))
    return sched


def test_executor_claims_in_one_round_trip_and_reports_the_losers(backend_url: str) -> None:
    first = coordlock.connect(backend_url)
    second = coordlock.connect(backend_url)
    spies = [Spy(first), Spy(second)]
    events: list[Any] = []
    scheds = [_scheduler(spy, events) for spy in spies]
    try:
        for sched in scheds:
            sched.start(paused=True)
        old = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=3)
        times = [old + timedelta(seconds=i) for i in range(3)]
        for sched in scheds:
            job = sched.add_job(lambda: None, "interval", seconds=1, id="job",
                                coalesce=False, misfire_grace_time=30)
            sched._lookup_executor("default").submit_job(job, times)
        deadline = time.monotonic() + 20
        while sum(e.code == EVENT_JOB_EXECUTED for e in events) < 3:
            assert time.monotonic() < deadline, events
            time.sleep(0.05)
    finally:
        for sched in scheds:
            sched.shutdown()
        first.close()
        second.close()
    assert [len(spy.calls) for spy in spies] == [1, 1]  # one round trip per submit
    keys, hold, _ = spies[0].calls[0]
    assert keys == [run_time_key("job", t) for t in times]
    assert keys[0] == f"job@{times[0].strftime('%Y-%m-%dT%H:%M:%SZ')}"
    assert hold == pytest.approx(30 + 5)  # max(period 1 s, misfire grace 30 s) + skew
    executed = Counter(e.scheduled_run_time for e in events if e.code == EVENT_JOB_EXECUTED)
    elsewhere = Counter(e.scheduled_run_time for e in events
                        if e.code == EVENT_JOB_CLAIMED_ELSEWHERE)
    assert executed == Counter(times)
    assert elsewhere == Counter(times)
    assert all(e.coordlock_reason == "claimed-elsewhere" for e in events
               if e.code == EVENT_JOB_CLAIMED_ELSEWHERE)


def test_misfired_run_times_are_not_claimed_and_emit_missed() -> None:
    spy = Spy(coordlock.connect("memory://aps-misfire"))
    events: list[Any] = []
    sched = _scheduler(spy, events)
    sched.start(paused=True)
    try:
        job = sched.add_job(lambda: None, "interval", seconds=5, id="late", misfire_grace_time=1)
        now = datetime.now(timezone.utc)
        sched._lookup_executor("default").submit_job(job, [now - timedelta(seconds=10)])
    finally:
        sched.shutdown()
    assert spy.calls == []
    assert [e.code for e in events if e.code & (EVENT_JOB_MISSED | EVENT_JOB_EXECUTED)] == [
        EVENT_JOB_MISSED
    ]


def test_without_misfire_grace_a_run_time_older_than_a_period_is_not_claimed() -> None:
    spy = Spy(coordlock.connect("memory://aps-nograce"))
    events: list[Any] = []
    sched = _scheduler(spy, events)
    sched.start(paused=True)
    try:
        job = sched.add_job(lambda: None, "interval", seconds=5, id="j", misfire_grace_time=None)
        now = datetime.now(timezone.utc)
        # 12 s late: the winner's claim (5 s period + 5 s skew) may have expired.
        sched._lookup_executor("default").submit_job(job, [now - timedelta(seconds=12)])
    finally:
        sched.shutdown()
    assert spy.calls == []
    assert any(e.code == EVENT_JOB_MISSED for e in events)


def test_max_instances_reached_raises_before_claiming() -> None:
    spy = Spy(coordlock.connect("memory://aps-max"))
    events: list[Any] = []
    sched = _scheduler(spy, events)
    sched.start(paused=True)
    release = threading.Event()
    try:
        job = sched.add_job(release.wait, "interval", seconds=5, id="slow", args=[10],
                            max_instances=1)
        executor = sched._lookup_executor("default")
        executor.submit_job(job, [datetime.now(timezone.utc)])
        with pytest.raises(MaxInstancesReachedError):
            executor.submit_job(job, [datetime.now(timezone.utc) + timedelta(seconds=5)])
    finally:
        release.set()
        sched.shutdown()
    assert len(spy.calls) == 1  # the second submit never asked the coordinator


def test_coordinator_down_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    down = Spy(coordlock.connect("memory://aps-down"), fail=BackendUnavailable("server down"))
    ran: list[int] = []
    events: list[Any] = []
    sched = _scheduler(down, events)
    sched.start(paused=True)
    try:
        job = sched.add_job(ran.append, "interval", seconds=5, id="j", args=[1])
        with caplog.at_level(logging.WARNING, logger="coordlock"):
            sched._lookup_executor("default").submit_job(job, [datetime.now(timezone.utc)])
        time.sleep(0.3)
    finally:
        sched.shutdown()
    assert ran == []
    errors = [e for e in events if e.code == EVENT_JOB_ERROR]
    assert len(errors) == 1 and isinstance(errors[0].exception, BackendUnavailable)
    assert errors[0].coordlock_reason == "coordinator-error"
    assert "fail closed" in caplog.text


def test_coordinator_unreachable_server_fails_closed(fresh_redis_server: Any) -> None:
    """A real Redis that is stopped: the fire time does not run and an error event says why."""
    url = f"{fresh_redis_server.url}?retry_deadline=1"  # bounded retries: 1 s
    ran: list[int] = []
    events: list[Any] = []
    sched = BackgroundScheduler(timezone="UTC")
    sched.add_listener(events.append, EVENT_ALL | EVENT_JOB_CLAIMED_ELSEWHERE)
    sched.add_executor(CoordinatedExecutor(ThreadPoolExecutor(1), url))
    sched.start(paused=True)
    try:
        job = sched.add_job(ran.append, "interval", seconds=5, id="j", args=[1])
        fresh_redis_server.stop()
        sched._lookup_executor("default").submit_job(job, [datetime.now(timezone.utc)])
    finally:
        sched.shutdown()
    assert ran == []
    assert [type(e.exception) for e in events if e.code == EVENT_JOB_ERROR] == [
        BackendUnavailable
    ]


def test_asyncio_scheduler_claims_off_the_event_loop() -> None:
    """Two AsyncIOSchedulers on one loop: each fire time once; claims run in another thread."""
    shared = coordlock.connect("memory://aps-async")
    spies = [Spy(shared), Spy(shared)]
    ran: list[datetime] = []
    events: list[Any] = []
    loop_thread: list[int] = []

    async def job(tag: int) -> None:
        ran.append(datetime.now(timezone.utc).replace(microsecond=0))

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        scheds = []
        for i, spy in enumerate(spies):
            sched = AsyncIOScheduler(timezone="UTC")
            sched.add_job(job, "cron", second="*", id="tick", args=[i])
            sched.add_listener(events.append, EVENT_ALL | EVENT_JOB_CLAIMED_ELSEWHERE)
            coordinate(sched, spy)
            sched.start()
            scheds.append(sched)
        await asyncio.sleep(3.6)
        for sched in scheds:
            sched.shutdown()
        await asyncio.sleep(0.2)

    asyncio.run(main())
    fired = [e.scheduled_run_time for e in events if e.code == EVENT_JOB_EXECUTED]
    assert len(fired) >= 2
    assert len(fired) == len(set(fired)), fired
    assert len(ran) == len(fired)
    threads = {thread for spy in spies for _, _, thread in spy.calls}
    assert threads and loop_thread[0] not in threads


def test_coordinate_wraps_every_executor_once_and_refuses_a_running_scheduler() -> None:
    sched = BackgroundScheduler(timezone="UTC")
    sched.add_executor(ThreadPoolExecutor(1), "extra")
    coordinate(sched, "memory://aps-wrap")
    coordinate(sched, "memory://aps-wrap")  # idempotent
    wrapped = dict(sched._executors)
    assert set(wrapped) == {"default", "extra"}
    assert all(isinstance(ex, CoordinatedExecutor) for ex in wrapped.values())
    assert all(not isinstance(ex.inner, CoordinatedExecutor) for ex in wrapped.values())
    sched.start(paused=True)
    try:
        with pytest.raises(RuntimeError, match="before the scheduler is started"):
            coordinate(sched)
    finally:
        sched.shutdown()


def test_bad_arguments_fail_at_the_call() -> None:
    with pytest.raises(TypeError, match="executor instance"):
        CoordinatedExecutor("threadpool")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already a CoordinatedExecutor"):
        CoordinatedExecutor(CoordinatedExecutor(ThreadPoolExecutor(1)))
    with pytest.raises(ValueError, match="skew"):
        CoordinatedExecutor(ThreadPoolExecutor(1), skew=-1)
    with pytest.raises(TypeError, match="coordinator"):
        CoordinatedExecutor(ThreadPoolExecutor(1), 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="naive"):
        run_time_key("job", datetime(2024, 1, 1))


def test_auto_generated_job_ids_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    events: list[Any] = []
    sched = _scheduler(coordlock.connect("memory://aps-ids"), events)
    sched.start(paused=True)
    try:
        job = sched.add_job(lambda: None, "interval", seconds=5)  # random uuid4 hex id
        with caplog.at_level(logging.WARNING, logger="coordlock"):
            sched._lookup_executor("default").submit_job(job, [datetime.now(timezone.utc)])
    finally:
        sched.shutdown()
    assert "auto-generated id" in caplog.text


def test_triggers_that_differ_between_processes_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[Any] = []
    sched = _scheduler(coordlock.connect("memory://aps-triggers"), events)
    sched.start(paused=True)
    try:
        executor = sched._lookup_executor("default")
        now = [datetime.now(timezone.utc)]
        with caplog.at_level(logging.WARNING, logger="coordlock"):
            executor.submit_job(sched.add_job(print, "interval", seconds=5, id="a"), now)
            executor.submit_job(sched.add_job(print, "cron", second="*", jitter=3, id="b"), now)
            fixed = sched.add_job(print, "interval", seconds=5, id="c",
                                  start_date="2024-01-01 00:00:00")
            executor.submit_job(fixed, now)
    finally:
        sched.shutdown()
    assert "'a' has no fixed start_date" in caplog.text
    assert "'b' has jitter" in caplog.text
    assert "'c'" not in caplog.text
