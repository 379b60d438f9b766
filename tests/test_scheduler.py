"""Unit tests of the scheduler on memory:// with injected clocks (no real minutes, no sleeps
through ticks, no wall-clock assertions)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest

import coordlock
from coordlock import (
    BackendUnavailable,
    ConfigurationError,
    NotConfigured,
    RunCoordinator,
    Scheduler,
    _api,
)
from coordlock._lease import Lease
from coordlock._protocol import ClaimsMany, RunRecord
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import (
    CronTrigger,
    Event,
    IntervalTrigger,
    ManualClock,
    OffsetClock,
    current_run,
    tick_key,
)
from coordlock.testing.contract import eventually

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z, a multiple of 10 and 20 (not of 60)


# -- helpers ---------------------------------------------------------------------------------


def mem(name: str | None = None) -> MemoryCoordinator:
    return MemoryCoordinator(name or f"sched-{uuid.uuid4().hex}")


class Recorder:
    """Collects scheduler events (thread-safe)."""

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

    def keys(self, kind: str, reason: str | None = None) -> list[str]:
        return [e.key or "" for e in self.of(kind, reason)]


class SpyCoordinator(MemoryCoordinator):
    """A memory coordinator that records claim_many/acquire calls and can be made to fail."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[tuple[str, Any]] = []
        self.fail_claims = False
        self.fail_acquire = False

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        keys = list(keys)
        self.calls.append(("claim_many", (tuple(keys), hold)))
        if self.fail_claims:
            raise BackendUnavailable("claim: server down (simulated)")
        return super().claim_many(keys, hold)

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        self.calls.append(("acquire", name))
        if self.fail_acquire:
            raise BackendUnavailable("acquire: server down (simulated)")
        return super().acquire(name, ttl, wait=wait, renew=renew)

    def of(self, what: str) -> list[Any]:
        return [arg for kind, arg in self.calls if kind == what]


class PerKeyOnly:
    """A RunCoordinator without claim_many (the scheduler must fall back to claim per job)."""

    def __init__(self, inner: MemoryCoordinator) -> None:
        self.inner = inner
        self.claims: list[str] = []

    def acquire(self, name: str, ttl: float, *, wait: float | None = None) -> Lease | None:
        return self.inner.acquire(name, ttl, wait=wait)

    def release(self, lease: Lease) -> bool:
        return self.inner.release(lease)

    def extend(self, lease: Lease, ttl: float) -> bool:
        return self.inner.extend(lease, ttl)

    def claim(self, key: str, hold: float) -> bool:
        self.claims.append(key)
        return self.inner.claim(key, hold)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def no_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COORDLOCK_URL", raising=False)
    monkeypatch.setattr(_api, "_global", None)
    monkeypatch.setattr(_api, "_global_owned", False)
    monkeypatch.setattr(_api, "_global_from_env", None)


@pytest.fixture
def stopper() -> Iterator[list[Scheduler]]:
    """Schedulers appended here are stopped after the test, whatever happens."""
    started: list[Scheduler] = []
    yield started
    for sched in started:
        sched.stop(wait=False)


def noop() -> None:
    pass


# module-level jobs for isolation="process" (must be picklable)


def child_sleeps(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)


def child_fails() -> None:
    raise RuntimeError("boom in the child")


def child_writes(path: str) -> None:
    ctx = current_run()
    assert ctx is not None
    Path(path).write_text(f"{ctx.key} {os.getpid()}")


# -- registration and validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "expr", ["61 * * * *", "* * *", "not a cron", "", "* * * * * * *", "0 0 30 2 *"]
)
def test_invalid_cron_raises_at_registration(expr: str) -> None:
    sched = Scheduler(mem())
    with pytest.raises(ValueError):
        sched.cron(expr, name="x")
    with pytest.raises(ValueError):
        sched.add(noop, expr, name="y")
    assert sched.jobs() == []


def test_cron_type_error() -> None:
    with pytest.raises(TypeError):
        CronTrigger(5)  # type: ignore[arg-type]


def test_duplicate_name_raises() -> None:
    sched = Scheduler(mem())
    sched.every(10, name="a")(noop)
    with pytest.raises(ValueError, match="already registered"):
        sched.cron("* * * * *", name="a")(noop)
    assert [j.name for j in sched.jobs()] == ["a"]


def _async_generator() -> Any:
    async def job() -> Any:
        yield 1

    return job


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"overlap": "no"}, TypeError),
        ({"misfire": "later"}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"isolation": "fiber"}, ValueError),
        ({"retries": -1}, ValueError),
        ({"retries": 1.5}, TypeError),
        ({"grace": -1}, ValueError),
        ({"hold": 0}, ValueError),
        ({"backoff": -2}, ValueError),
        ({"lease_ttl": 0}, ValueError),
        ({"bogus": 1}, ConfigurationError),  # an option that does not exist (did you mean)
    ],
)
def test_bad_job_options_raise_at_registration(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    sched = Scheduler(mem())
    with pytest.raises(error):
        sched.every(10, name="x", **kwargs)
    with pytest.raises(error):
        sched.add(noop, 10, name="x", **kwargs)
    assert sched.jobs() == []


def test_bad_arguments() -> None:
    sched = Scheduler(mem())
    with pytest.raises(ValueError):
        sched.every(0)
    with pytest.raises(TypeError):
        sched.every("5")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sched.cron("* * * * *", timezone="Mars/Olympus_Mons")
    with pytest.raises(TypeError):
        sched.add(42, 10, name="n")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator"):
        sched.add(_async_generator(), 10, name="a")
    with pytest.raises(TypeError, match="picklable"):
        sched.add(lambda: None, 10, name="p", isolation="process")
    with pytest.raises(TypeError):
        sched.add(noop, [1], name="t")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sched.add(noop, 10, name="")
    with pytest.raises(TypeError):
        sched.add(noop, 10, name="k", args=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sched.on("exploded", print)
    with pytest.raises(ValueError):
        sched.on("exploded")
    with pytest.raises(TypeError):
        sched.on("started", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Scheduler(coordinator=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Scheduler(max_workers=0)
    with pytest.raises(ValueError):
        Scheduler(timezone="Nowhere/Land")
    with pytest.raises(TypeError):
        Scheduler(clock=time.time)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Scheduler(skew_tolerance=-1)
    assert sched.jobs() == []


def test_decorators_return_the_function_and_default_names(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock)

    @sched.every(timedelta(seconds=30))
    def heartbeat() -> str:
        return "beat"

    @sched.cron("*/5 * * * *", name="sync", timezone="Europe/Berlin")
    def sync() -> None:
        pass

    assert heartbeat() == "beat"
    infos = {j.name: j for j in sched.jobs()}
    default = f"{__name__}.test_decorators_return_the_function_and_default_names.<locals>.heartbeat"
    assert set(infos) == {default, "sync"}
    assert infos["sync"].trigger == "cron '*/5 * * * *' Europe/Berlin"
    assert infos["sync"].next_run is not None
    assert infos["sync"].next_run.utcoffset() == timedelta(hours=1)  # CET in November
    assert infos[default].next_run == datetime.fromtimestamp(T0 + 10, timezone.utc)
    assert sched.remove("sync") and not sched.remove("sync")


# -- triggers ----------------------------------------------------------------------------------


def test_interval_ticks_are_aligned_to_the_epoch() -> None:
    trig = IntervalTrigger(30)
    assert trig.next_after(T0 + 1) == T0 + 10  # 1_700_000_010 is a multiple of 30
    assert trig.next_after(T0 + 10) == T0 + 40
    assert trig.previous(T0 + 10) == T0 + 10
    assert trig.previous(T0 + 9.999) == T0 - 20
    # instances started at different moments agree on the ticks
    a = [trig.next_after(T0 + 0.3)]
    b = [trig.next_after(T0 + 7.9)]
    assert a == b
    shifted = IntervalTrigger(timedelta(minutes=1), offset=15)
    assert shifted.next_after(T0) % 60 == 15
    fine = IntervalTrigger(0.1)
    tick = fine.next_after(T0)
    assert tick is not None
    for _ in range(100):
        following = fine.next_after(tick)
        assert fine.previous(following) == following
        assert 0.09 < following - tick < 0.11
        tick = following


def test_cron_with_seconds_field_and_nicknames() -> None:
    every2 = CronTrigger("*/2 * * * * *")
    assert every2.has_seconds
    assert every2.next_after(T0) == T0 + 2
    assert every2.nominal_period() == 2
    daily = CronTrigger("@daily")
    assert daily.expr == "0 0 * * *"
    nxt = daily.next_after(T0)
    assert nxt is not None and nxt % 86400 == 0
    assert CronTrigger("@hourly").nominal_period() == 3600


def test_tick_key_format() -> None:
    assert tick_key(T0) == "2023-11-14T22:13:20Z"
    assert tick_key(T0 + 0.25) == "2023-11-14T22:13:20.250000Z"


# -- once per tick -----------------------------------------------------------------------------


def test_each_tick_runs_once_across_skewed_instances() -> None:
    """Three instances (clocks -2/0/+2 s) stepped in random order: exactly one run per tick."""
    name = f"skew-{uuid.uuid4().hex}"
    offsets = (-2.0, 0.0, 2.0)
    clocks = [ManualClock(T0 + o) for o in offsets]
    scheds = [
        Scheduler(mem(name), instance_id=f"i{o:+g}", clock=c)
        for o, c in zip(offsets, clocks, strict=True)
    ]
    runs: list[tuple[str, str]] = []

    def job() -> None:
        ctx = current_run()
        assert ctx is not None
        runs.append((ctx.key, ctx.instance))

    for sched in scheds:
        sched.every(1, name="second")(job)
        sched.cron("*/2 * * * * *", name="cron2")(job)
    rng = random.Random(7)
    true_time = T0
    for _ in range(200):  # 50 s of true time in quarter seconds
        true_time += 0.25
        order = list(range(3))
        rng.shuffle(order)
        for i in order:
            clocks[i].set(true_time + offsets[i])
            scheds[i].run_pending()
    counts = Counter(key for key, _ in runs)
    assert counts and max(counts.values()) == 1
    seconds = sorted(k for k in counts if k.startswith("second@"))
    # every tick from the first to the last ran: no gaps
    assert len(seconds) == int(_ts(seconds[-1]) - _ts(seconds[0])) + 1
    crons = sorted(k for k in counts if k.startswith("cron2@"))
    assert len(crons) == int(_ts(crons[-1]) - _ts(crons[0])) // 2 + 1
    # the instance whose clock is ahead reaches every tick first
    assert Counter(inst for _, inst in runs).most_common(1)[0][0] == "i+2"


def _ts(key: str) -> float:
    return datetime.fromisoformat(key.split("@", 1)[1].replace("Z", "+00:00")).timestamp()


def test_claim_key_and_default_hold(clock: ManualClock) -> None:
    spy = SpyCoordinator(f"spy-{uuid.uuid4().hex}")
    sched = Scheduler(spy, clock=clock)
    sched.every(10, name="ten")(noop)
    sched.every(20, name="twenty", hold=5)(noop)
    clock.set(T0)  # a multiple of 10 and 20: both due
    sched.run_pending()
    claims = spy.of("claim_many")
    assert sorted((keys, hold) for keys, hold in claims) == [
        (("ten@2023-11-14T22:13:20Z",), 70.0),  # period + skew tolerance (60 s)
        (("twenty@2023-11-14T22:13:20Z",), 5.0),  # hold= overrides
    ]
    skewed = SpyCoordinator(f"spy-{uuid.uuid4().hex}")
    s2 = Scheduler(skewed, clock=ManualClock(T0), skew_tolerance=timedelta(minutes=5))
    s2.every(10, name="ten")(noop)
    s2.run_pending()
    assert skewed.of("claim_many") == [(("ten@2023-11-14T22:13:20Z",), 310.0)]


def test_one_claim_many_round_trip_per_tick(clock: ManualClock) -> None:
    spy = SpyCoordinator(f"spy-{uuid.uuid4().hex}")
    assert isinstance(spy, ClaimsMany)
    sched = Scheduler(spy, clock=clock)
    ran: list[str] = []
    for i in range(50):
        sched.add(lambda i=i: ran.append(f"j{i}"), 10, name=f"j{i}")
    clock.set(T0)
    assert sched.run_pending() == 50
    claims = spy.of("claim_many")
    assert len(claims) == 1 and len(claims[0][0]) == 50
    assert len(ran) == 50


def test_a_crowded_tick_is_claimed_in_chunks_that_instances_share(clock: ManualClock) -> None:
    """200 due jobs: 4 claim calls of 50 keys (the same chunks on every instance, each
    instance starting at a chunk of its own), so two instances each win whole chunks and
    every job runs once."""
    name = f"spy-{uuid.uuid4().hex}"
    spies = [SpyCoordinator(name), SpyCoordinator(name)]
    ran: list[str] = []
    scheds = [Scheduler(spy, clock=clock, instance_id=f"i{n}") for n, spy in enumerate(spies)]
    for sched in scheds:
        for i in range(200):
            sched.add(lambda i=i: ran.append(f"j{i:03d}"), 10, name=f"j{i:03d}")
    clock.set(T0)
    with patch("coordlock.scheduler.dispatch.random.randrange", side_effect=[0, 2]):
        won = [sched.run_pending() for sched in scheds]
    assert sorted(ran) == [f"j{i:03d}" for i in range(200)]  # each job once
    assert won == [200, 0]  # the first instance (alone) took every chunk
    for spy in spies:
        calls = spy.of("claim_many")
        assert [len(keys) for keys, _ in calls] == [50, 50, 50, 50]
        assert sorted(k for keys, _ in calls for k in keys) == sorted(
            f"j{i:03d}@2023-11-14T22:13:20Z" for i in range(200)
        )
    first = [keys[0] for keys, _ in spies[1].of("claim_many")]
    assert first[0] == "j100@2023-11-14T22:13:20Z"  # started at chunk 2, then 3, 0, 1
    assert first[1:] == [
        "j150@2023-11-14T22:13:20Z",
        "j000@2023-11-14T22:13:20Z",
        "j050@2023-11-14T22:13:20Z",
    ]


def test_a_slow_coordinator_gets_the_rest_of_a_crowded_tick_in_one_call(
    clock: ManualClock,
) -> None:
    """Past CHUNK_BUDGET seconds of claiming, the chunks not yet asked for go in one call."""

    class Slow(SpyCoordinator):
        def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
            time.sleep(0.3)  # slower than the budget (0.25 s)
            return super().claim_many(keys, hold)

    spy = Slow(f"spy-{uuid.uuid4().hex}")
    sched = Scheduler(spy, clock=clock)
    for i in range(200):
        sched.add(noop, 10, name=f"j{i:03d}")
    clock.set(T0)
    with patch("coordlock.scheduler.dispatch.random.randrange", return_value=1):
        assert sched.run_pending() == 200
    sizes = [len(keys) for keys, _ in spy.of("claim_many")]
    assert sizes == [50, 150]  # chunk 1 alone, then chunks 2, 3 and 0 at once


def test_instances_reaching_a_crowded_tick_together_share_its_runs(clock: ManualClock) -> None:
    """Two instances claiming the chunks of one tick at the same time, from different
    starting chunks, each win some: neither runs all 200 jobs while the other idles."""
    name = f"mem-{uuid.uuid4().hex}"
    ran: list[tuple[str, str]] = []
    gate = threading.Barrier(2, timeout=10)

    class Stepping(MemoryCoordinator):
        def claim_many(self, keys: Any, hold: float) -> set[str]:
            won = super().claim_many(keys, hold)
            gate.wait()  # both instances finish one chunk before either asks for the next
            return won

    scheds = [Scheduler(Stepping(name), clock=clock, instance_id=f"i{n}") for n in range(2)]
    for n, sched in enumerate(scheds):
        for i in range(200):
            sched.add(lambda i=i, n=n: ran.append((f"j{i:03d}", f"i{n}")), 10, name=f"j{i:03d}")
    clock.set(T0)
    starts = iter([0, 2])
    with patch("coordlock.scheduler.dispatch.random.randrange", lambda n: next(starts)):
        threads = [threading.Thread(target=sched.run_pending) for sched in scheds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    assert sorted(job for job, _ in ran) == [f"j{i:03d}" for i in range(200)]
    per_instance = {inst: sum(1 for _, i in ran if i == inst) for inst in ("i0", "i1")}
    assert per_instance == {"i0": 100, "i1": 100}


def test_falls_back_to_claim_per_job_without_claim_many(clock: ManualClock) -> None:
    inner = mem()
    coord = PerKeyOnly(inner)
    assert isinstance(coord, RunCoordinator) and not isinstance(coord, ClaimsMany)
    a = Scheduler(coord, clock=clock, instance_id="a")
    b = Scheduler(PerKeyOnly(MemoryCoordinator(inner.name)), clock=clock, instance_id="b")
    ran: list[str] = []
    for sched in (a, b):
        sched.every(10, name="x")(lambda: ran.append("x"))
        sched.every(20, name="y")(lambda: ran.append("y"))
    clock.set(T0)
    a.run_pending()
    b.run_pending()
    assert sorted(ran) == ["x", "y"]
    assert sorted(coord.claims) == ["x@2023-11-14T22:13:20Z", "y@2023-11-14T22:13:20Z"]


def test_lease_is_taken_only_after_winning_the_claim(clock: ManualClock) -> None:
    name = f"order-{uuid.uuid4().hex}"
    winner, loser = SpyCoordinator(name), SpyCoordinator(name)
    a = Scheduler(winner, clock=clock, instance_id="a")
    b = Scheduler(loser, clock=clock, instance_id="b")
    rec = Recorder(a, b)
    for sched in (a, b):
        sched.every(10, name="job")(noop)
    clock.set(T0)
    a.run_pending()
    b.run_pending()
    assert [kind for kind, _ in winner.calls][:2] == ["claim_many", "acquire"]
    assert winner.of("acquire") == ["coordlock:job:job"]
    assert loser.of("acquire") == []  # lost the claim: never touched the lease
    assert rec.keys("skipped", "claimed-elsewhere") == ["job@2023-11-14T22:13:20Z"]
    # overlap=True jobs take no lease at all
    c = Scheduler(SpyCoordinator(f"o-{uuid.uuid4().hex}"), clock=clock)
    c.every(10, name="free", overlap=True)(noop)
    c.run_pending()
    coord = c.coordinator
    assert isinstance(coord, SpyCoordinator) and coord.of("acquire") == []


# -- overlap -----------------------------------------------------------------------------------


def test_overlap_false_blocks_the_next_tick_on_every_instance(
    clock: ManualClock, stopper: list[Scheduler]
) -> None:
    name = f"ovl-{uuid.uuid4().hex}"
    a = Scheduler(mem(name), clock=clock, instance_id="a")
    b = Scheduler(mem(name), clock=clock, instance_id="b")
    rec = Recorder(a, b)
    release = threading.Event()
    entered = threading.Event()

    def slow() -> None:
        entered.set()
        release.wait(30)

    a.every(10, name="slow", grace=0.1)(slow)
    b.every(10, name="slow", grace=0.1)(slow)
    clock.set(T0 - 0.5)
    a.start()
    stopper.append(a)
    clock.set(T0)  # a runs T0 and blocks
    assert entered.wait(10)
    clock.set(T0 + 10)  # next tick: a is busy locally; b wins the claim but not the lease
    b.run_pending()
    assert rec.keys("skipped", "running") and all(
        k == "slow@2023-11-14T22:13:30Z" for k in rec.keys("skipped", "running")
    )
    assert eventually(lambda: len(rec.keys("skipped", "running")) == 2, within=10)
    assert len(rec.of("started")) == 1
    release.set()  # the run ends: the next tick runs again (on a or b, once)
    assert a.wait_idle(10)
    clock.set(T0 + 20)
    b.run_pending()
    assert eventually(lambda: len(rec.of("finished")) == 2, within=10)
    assert rec.keys("started")[-1] == "slow@2023-11-14T22:13:40Z"


def test_a_run_ending_within_the_grace_lets_the_next_tick_run(
    clock: ManualClock, stopper: list[Scheduler]
) -> None:
    """The winner of a tick waits (within the tick's grace) for a run that is just ending."""
    name = f"grace-{uuid.uuid4().hex}"
    a = Scheduler(mem(name), clock=clock, instance_id="a")
    b = Scheduler(mem(name), clock=clock, instance_id="b")
    rec = Recorder(a, b)
    release = threading.Event()
    entered = threading.Event()

    def job() -> None:
        entered.set()
        release.wait(30)

    a.every(10, name="j", grace=5)(job)
    b.every(10, name="j", grace=5)(job)
    clock.set(T0 - 0.5)
    a.start()
    stopper.append(a)
    clock.set(T0)
    assert entered.wait(10)
    clock.set(T0 + 10)
    threading.Timer(0.3, release.set).start()  # a's run ends 0.3 s into b's wait
    assert b.run_pending() == 1
    assert [e.key for e in rec.of("started")] == [
        "j@2023-11-14T22:13:20Z",
        "j@2023-11-14T22:13:30Z",
    ]
    assert [e.instance for e in rec.of("started")] == ["a", "b"]


def test_overlap_true_allows_concurrent_runs(clock: ManualClock, stopper: list[Scheduler]) -> None:
    sched = Scheduler(mem(), clock=clock, max_workers=4)
    stopper.append(sched)
    gate = threading.Event()
    active: list[int] = []
    peak: list[int] = [0]
    lock = threading.Lock()

    def job() -> None:
        with lock:
            active.append(1)
            peak[0] = max(peak[0], len(active))
        gate.wait(30)
        with lock:
            active.pop()

    sched.every(10, name="j", overlap=True)(job)
    clock.set(T0 - 0.5)
    sched.start()
    clock.set(T0)
    assert eventually(lambda: peak[0] == 1, within=10)
    clock.set(T0 + 10)
    assert eventually(lambda: peak[0] == 2, within=10)
    gate.set()
    assert sched.wait_idle(10)


def test_pool_is_bounded(clock: ManualClock, stopper: list[Scheduler]) -> None:
    sched = Scheduler(mem(), clock=clock, max_workers=2)
    stopper.append(sched)
    gate = threading.Event()
    active: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def job() -> None:
        with lock:
            active.append(1)
            peak[0] = max(peak[0], len(active))
        gate.wait(30)
        with lock:
            active.pop()

    for i in range(5):
        sched.add(job, 10, name=f"j{i}")
    clock.set(T0 - 0.5)
    sched.start()
    clock.set(T0)
    assert eventually(lambda: peak[0] == 2, within=10)
    time.sleep(0.2)  # give a third worker the chance to (wrongly) appear
    assert peak[0] == 2
    gate.set()
    assert sched.wait_idle(10)
    assert peak[0] == 2


# -- fail closed -------------------------------------------------------------------------------


def test_fail_closed_when_the_coordinator_cannot_be_asked(clock: ManualClock) -> None:
    spy = SpyCoordinator(f"fc-{uuid.uuid4().hex}")
    sched = Scheduler(spy, clock=clock)
    rec = Recorder(sched)
    ran: list[str] = []
    sched.every(10, name="job")(lambda: ran.append("job"))
    sched.every(10, name="free", overlap=True)(lambda: ran.append("free"))
    spy.fail_claims = True
    clock.set(T0)
    assert sched.run_pending() == 0
    assert ran == []
    errors = rec.of("skipped", "coordinator-error")
    assert sorted(e.job for e in errors) == ["free", "job"]
    assert all("server down" in (e.error or "") for e in errors)
    assert {j.last_status for j in sched.jobs()} == {"skipped:coordinator-error"}
    # it recovers on the next tick
    spy.fail_claims = False
    clock.set(T0 + 10)
    assert sched.run_pending() == 2
    assert sorted(ran) == ["free", "job"]
    # a lease that cannot be taken fails closed too (the overlap=True job still runs)
    spy.fail_acquire = True
    clock.set(T0 + 20)
    sched.run_pending()
    assert sorted(ran) == ["free", "free", "job"]
    assert rec.keys("skipped", "coordinator-error")[-1] == "job@2023-11-14T22:13:40Z"


def test_fail_closed_loop_keeps_going(clock: ManualClock, stopper: list[Scheduler]) -> None:
    spy = SpyCoordinator(f"fcl-{uuid.uuid4().hex}")
    sched = Scheduler(spy, clock=clock)
    stopper.append(sched)
    rec = Recorder(sched)
    sched.every(10, name="job")(noop)
    spy.fail_claims = True
    clock.set(T0 - 1)
    sched.start()
    clock.set(T0)
    assert eventually(lambda: len(rec.of("skipped", "coordinator-error")) == 1, within=10)
    spy.fail_claims = False
    clock.set(T0 + 10)
    assert eventually(lambda: len(rec.of("finished")) == 1, within=10)
    assert sched.running


# -- misfires ----------------------------------------------------------------------------------


def test_misfire_skip_never_bursts(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    ran: list[str] = []
    sched.every(10, name="job")(lambda: ran.append(_key()))
    clock.set(T0 + 1)
    sched.run_pending()  # activates; T0 passed 1 s ago (grace 1 s) → runs T0
    assert ran == ["job@2023-11-14T22:13:20Z"]
    clock.set(T0 + 45)  # slept through T0+10, +20, +30, +40; +40 is 5 s late (> grace 1 s)
    sched.run_pending()
    assert ran == ["job@2023-11-14T22:13:20Z"]
    (missed,) = rec.of("missed")
    assert missed.count == 4 and missed.key == "job@2023-11-14T22:14:00Z"
    clock.set(T0 + 60.5)  # +50 missed too (paused again); +60 within grace → runs alone
    sched.run_pending()
    assert ran[-1] == "job@2023-11-14T22:14:20Z" and len(ran) == 2
    assert rec.of("missed")[-1].count == 1
    assert rec.of("missed")[-1].key == "job@2023-11-14T22:14:10Z"


def test_misfire_run_once_runs_the_newest_missed_tick_once(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    ran: list[str] = []
    sched.every(10, name="job", misfire="run_once")(lambda: ran.append(_key()))
    clock.set(T0 + 0.5)
    sched.run_pending()
    clock.set(T0 + 47)
    sched.run_pending()
    assert ran == ["job@2023-11-14T22:13:20Z", "job@2023-11-14T22:14:00Z"]  # once, late
    assert rec.of("missed")[0].count == 3  # +10, +20, +30 collapsed
    # with an explicit grace, a tick later than that is missed
    s2 = Scheduler(mem(), clock=clock)
    ran2: list[str] = []
    s2.every(10, name="job", misfire="run_once", grace=3)(lambda: ran2.append(_key()))
    clock.set(T0 + 51)
    s2.run_pending()
    clock.set(T0 + 65)
    s2.run_pending()
    assert ran2 == ["job@2023-11-14T22:14:10Z"]


def test_run_once_after_restart_runs_a_tick_nobody_ran(clock: ManualClock) -> None:
    name = f"ro-{uuid.uuid4().hex}"
    ran: list[str] = []
    first = Scheduler(mem(name), clock=clock, instance_id="first")
    first.cron("0 * * * *", name="hourly", misfire="run_once")(lambda: ran.append(_key()))
    clock.set(1_700_000_000 - 1_700_000_000 % 3600 + 3600 + 1200)  # 20 min after the hour
    first.run_pending()
    assert ran == ["hourly@2023-11-14T23:00:00Z"]  # nobody ran it: this start runs it late
    again = Scheduler(mem(name), clock=clock, instance_id="again")
    rec = Recorder(again)
    again.cron("0 * * * *", name="hourly", misfire="run_once")(lambda: ran.append(_key()))
    again.run_pending()
    assert len(ran) == 1  # a restart does not run it again
    assert rec.keys("skipped", "claimed-elsewhere") == ["hourly@2023-11-14T23:00:00Z"]
    # misfire="skip" (default) does not look back past its grace
    late = Scheduler(mem(), clock=clock)
    late.cron("0 * * * *", name="hourly")(lambda: ran.append("late"))
    late.run_pending()
    assert len(ran) == 1


def _key() -> str:
    ctx = current_run()
    assert ctx is not None
    return ctx.key


# -- execution ---------------------------------------------------------------------------------


def test_retries_with_backoff(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    attempts: list[int] = []

    def flaky() -> None:
        ctx = current_run()
        assert ctx is not None
        attempts.append(ctx.attempt)
        if len(attempts) < 3:
            raise OSError("transient")

    def broken() -> None:
        raise ValueError("always")

    sched.every(10, name="flaky", retries=2, backoff=0)(flaky)
    sched.every(10, name="broken", retries=1, backoff=0)(broken)
    clock.set(T0)
    sched.run_pending()
    assert attempts == [1, 2, 3]
    (finished,) = rec.of("finished")
    assert finished.job == "flaky" and finished.attempts == 3
    (failed,) = rec.of("failed")
    assert failed.job == "broken" and failed.attempts == 2
    assert failed.error == "ValueError: always" and isinstance(failed.exception, ValueError)


def _hanging_job(
    clock: ManualClock, stopper: list[Scheduler]
) -> tuple[MemoryCoordinator, Scheduler, Recorder, threading.Event]:
    """A scheduler (instance ``me``) whose job ``hang`` (timeout 0.2 s) waits for the gate."""
    coord = mem()
    sched = Scheduler(coord, clock=clock, instance_id="me")
    stopper.append(sched)
    rec = Recorder(sched)
    gate = threading.Event()
    sched.every(10, name="hang", timeout=0.2)(lambda: gate.wait(30))
    return coord, sched, rec, gate


def _start_at_the_tick(clock: ManualClock, sched: Scheduler) -> None:
    clock.set(T0 - 0.5)
    sched.start()
    clock.set(T0)


def test_thread_job_past_its_timeout_is_stuck(clock: ManualClock, stopper: list[Scheduler]) -> None:
    coord, sched, rec, gate = _hanging_job(clock, stopper)
    _start_at_the_tick(clock, sched)
    assert eventually(lambda: bool(rec.of("stuck")), within=10)
    (stuck,) = rec.of("stuck")
    assert stuck.reason == "timeout" and stuck.key == "hang@2023-11-14T22:13:20Z"
    # rows are written by the background writers, shortly after their event
    assert eventually(lambda: [r.status for r in coord.history("hang")] == ["stuck"], within=10)
    (record,) = coord.history("hang")
    assert record.instance == "me"
    assert [j.last_status for j in sched.jobs()] == ["stuck"]
    gate.set()
    assert sched.wait_idle(10)
    (record,) = coord.history("hang")
    assert record.status == "finished" and "after its timeout" in (record.error or "")


def test_stuck_row_is_not_overwritten_by_a_late_running_row(
    clock: ManualClock, stopper: list[Scheduler]
) -> None:
    """A worker descheduled between starting the run and writing its ``running`` row (a busy
    machine) must not have that row land after the watchdog's ``stuck`` row."""
    from coordlock.scheduler.report import Reporter

    real_row = Reporter.row

    def slow_running_row(self: Reporter, *args: Any, **kwargs: Any) -> None:
        if args[4] == "running":
            for _ in range(6):  # three times the job's timeout, while the watchdog wakes up
                time.sleep(0.1)  # (for other runs) and looks at this one
                sched._watch_wake.set()
        real_row(self, *args, **kwargs)

    coord, sched, rec, gate = _hanging_job(clock, stopper)
    with patch.object(Reporter, "row", slow_running_row):
        _start_at_the_tick(clock, sched)
        assert eventually(lambda: bool(rec.of("stuck")), within=10)
        assert rec.of("started"), "stuck was reported before the run was on record"
        assert eventually(lambda: [r.status for r in coord.history("hang")] == ["stuck"], within=10)
        time.sleep(0.3)  # past PRESTART_DELAY: a late running row would have been written
        assert [r.status for r in coord.history("hang")] == ["stuck"]
        gate.set()
        assert sched.wait_idle(10)


def test_process_isolation_kills_the_child_at_the_timeout(
    clock: ManualClock, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    sched.add(
        child_sleeps, 10, name="sleepy", args=(str(pid_file),), isolation="process", timeout=5
    )
    clock.set(T0)
    sched.run_pending()
    (failed,) = rec.of("failed")
    assert "timed out after 5s" in (failed.error or "")
    pid = int(pid_file.read_text())
    assert eventually(lambda: not _alive(pid), within=10)


def test_process_isolation_reports_child_errors_and_context(
    clock: ManualClock, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    sched = Scheduler(mem(), clock=clock)
    rec = Recorder(sched)
    sched.add(child_fails, 10, name="fails", isolation="process")
    sched.add(child_writes, 10, name="writes", args=(str(out),), isolation="process")
    clock.set(T0)
    sched.run_pending()
    (failed,) = rec.of("failed")
    assert failed.job == "fails" and "RuntimeError: boom in the child" in (failed.error or "")
    key, pid = out.read_text().split()
    assert key == "writes@2023-11-14T22:13:20Z" and int(pid) != os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_current_run_context(clock: ManualClock) -> None:
    seen: list[Any] = []
    sched = Scheduler(mem(), clock=clock, instance_id="ctx")
    sched.every(10, name="fenced")(lambda: seen.append(current_run()))
    sched.every(10, name="free", overlap=True)(lambda: seen.append(current_run()))
    clock.set(T0)
    sched.run_pending()
    by_job = {c.job: c for c in seen}
    assert by_job["fenced"].fence is not None and by_job["fenced"].fence >= 1
    assert by_job["free"].fence is None
    assert by_job["fenced"].tick == datetime.fromtimestamp(T0, timezone.utc)
    assert by_job["fenced"].instance == "ctx" and by_job["fenced"].attempt == 1
    assert current_run() is None


# -- events, history, jobs() -------------------------------------------------------------------


def test_events_are_logged_and_recorded_in_history(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    coord = mem()
    sched = Scheduler(coord, clock=clock, instance_id="hist")
    sched.every(10, name="ok")(noop)
    sched.every(10, name="bad")(child_fails)
    caplog.set_level(logging.DEBUG, logger="coordlock")
    clock.set(T0)
    sched.run_pending()
    text = caplog.text
    assert "started ok@2023-11-14T22:13:20Z on hist" in text
    assert "finished ok@2023-11-14T22:13:20Z on hist" in text
    assert "failed bad@2023-11-14T22:13:20Z on hist" in text and "boom in the child" in text
    failed = [r for r in caplog.records if "failed bad@" in r.getMessage()]
    assert failed[0].levelno == logging.ERROR and failed[0].exc_info is not None
    records = {r.job: r for r in coord.history()}
    assert records["ok"].status == "finished" and records["ok"].finished is not None
    assert records["ok"].tick == "2023-11-14T22:13:20Z" and records["ok"].instance == "hist"
    assert records["bad"].status == "failed"
    assert records["bad"].error == "RuntimeError: boom in the child"
    info = {j.name: j for j in sched.jobs()}
    assert info["ok"].last_status == "finished"
    assert info["bad"].last_status == "failed"
    assert info["ok"].last_tick == datetime.fromtimestamp(T0, timezone.utc)
    assert info["ok"].next_run == datetime.fromtimestamp(T0 + 10, timezone.utc)


def test_event_callbacks_errors_are_contained(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock)
    got: list[str] = []

    @sched.on("finished")
    def boom(event: Event) -> None:
        raise RuntimeError("callback bug")

    sched.on("finished", lambda e: got.append(e.kind))
    sched.every(10, name="j")(noop)
    clock.set(T0)
    assert sched.run_pending() == 1
    assert got == ["finished"]


def test_watchdog_marks_runs_of_vanished_instances_stuck(clock: ManualClock) -> None:
    name = f"wd-{uuid.uuid4().hex}"
    coord = mem(name)
    sched = Scheduler(coord, clock=clock, instance_id="watcher", watchdog_interval=3600)
    rec = Recorder(sched)
    sched.every(10, name="job")(noop)
    alive = Scheduler(mem(name), clock=clock, instance_id="alive-one", watchdog_interval=3600)
    alive.every(10, name="other")(noop)
    coord.record_run(RunRecord("r-ghost", "job", "2023-11-14T22:13:20Z", "ghost", T0))
    coord.record_run(RunRecord("r-alive", "other", "2023-11-14T22:13:20Z", "alive-one", T0))
    clock.set(T0 + 1)
    alive.start()
    try:
        sched.run_pending()  # resolves the coordinator
        assert sched.scan_history() == 1
    finally:
        alive.stop()
    runs = {r.run_id: r for r in coord.history()}
    assert runs["r-ghost"].status == "stuck"
    assert "ghost vanished" in (runs["r-ghost"].error or "")
    assert runs["r-alive"].status == "running"
    (stuck,) = rec.of("stuck")
    assert stuck.reason == "instance-vanished" and stuck.run_id == "r-ghost"


def test_one_instance_scans_history_per_interval(clock: ManualClock) -> None:
    """The instances of a cluster take turns: the first to claim an interval's slot scans, the
    others skip it; the next interval is a new slot."""
    name = f"scan-{uuid.uuid4().hex}"
    first = Scheduler(mem(name), clock=clock, instance_id="a", watchdog_interval=60)
    second = Scheduler(mem(name), clock=clock, instance_id="b", watchdog_interval=60)
    for sched in (first, second):
        sched.every(10, name="j")(noop)
    clock.set(T0)
    first.run_pending()  # resolves the coordinators
    second.run_pending()
    assert first._watchdog.elected()
    assert not second._watchdog.elected()
    assert not first._watchdog.elected()  # once per slot, even for the winner
    clock.set(T0 + 60)
    assert second._watchdog.elected()
    assert not first._watchdog.elected()


def test_watchdog_scans_are_spread() -> None:
    """After an instance's own first scan (5 s after it starts, or one interval if shorter),
    scans come an interval apart give or take a quarter, so that instances started together
    do not all reach the next slot's claim at the same instant."""
    from coordlock.scheduler.watchdog import first_scan_delay, scan_delay

    assert first_scan_delay(30.0) == 5.0 and first_scan_delay(0.5) == 0.5
    spaced = [scan_delay(30.0) for _ in range(200)]
    assert all(22.5 <= d <= 37.5 for d in spaced) and max(spaced) - min(spaced) > 5.0


# -- lifecycle ---------------------------------------------------------------------------------


def test_coordinator_is_resolved_lazily_at_start(no_global: None, clock: ManualClock) -> None:
    sched = Scheduler(clock=clock)
    sched.every(10, name="j")(noop)
    with pytest.raises(NotConfigured):
        sched.start()
    assert not sched.running
    coord = coordlock.configure(f"memory://lazy-{uuid.uuid4().hex}")
    try:
        sched.start()
        assert sched.coordinator is coord
    finally:
        sched.stop()
        coord.close()


def test_url_coordinator_is_owned_and_closed(clock: ManualClock) -> None:
    sched = Scheduler(f"memory://own-{uuid.uuid4().hex}", clock=clock)
    sched.start()
    coord = sched.coordinator
    assert isinstance(coord, MemoryCoordinator) and not coord.closed
    sched.stop()
    assert coord.closed


def test_lifecycle_errors_and_idempotent_stop(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock)
    sched.start()
    try:
        with pytest.raises(RuntimeError):
            sched.start()
        with pytest.raises(RuntimeError):
            sched.run_pending()
    finally:
        sched.stop()
    sched.stop()
    with pytest.raises(RuntimeError):
        sched.start()
    Scheduler(mem()).stop()  # never started: fine


def test_stop_waits_for_running_jobs_and_skips_queued_ones(clock: ManualClock) -> None:
    sched = Scheduler(mem(), clock=clock, max_workers=1)
    rec = Recorder(sched)
    gate = threading.Event()
    sched.every(10, name="a")(lambda: gate.wait(30))
    sched.every(10, name="b")(noop)
    clock.set(T0 - 0.5)
    sched.start()
    clock.set(T0)
    assert eventually(lambda: len(rec.of("started")) == 1, within=10)
    threading.Timer(0.3, gate.set).start()
    sched.stop(wait=True, timeout=10)
    assert len(rec.of("finished")) == 1
    assert [e.job for e in rec.of("skipped", "stopping")] == ["b"]


def test_added_while_running_and_with_a_context_manager(clock: ManualClock) -> None:
    ran: list[str] = []
    with Scheduler(mem(), clock=clock) as sched:
        sched.every(10, name="late")(lambda: ran.append("late"))
        clock.set(T0)
        assert eventually(lambda: ran == ["late"], within=10)
    assert not sched.running


def test_started_loop_with_an_offset_clock(stopper: list[Scheduler]) -> None:
    """A fast clock (x20): real ticks happen; no sleeping through them."""
    ran: list[str] = []
    sched = Scheduler(mem(), clock=OffsetClock(0, speed=20))
    stopper.append(sched)
    sched.every(1, name="fast")(lambda: ran.append(_key()))
    sched.start()
    assert eventually(lambda: len(ran) >= 5, within=10)
    keys = sorted(set(ran))
    assert len(keys) == len(ran)


RUN_FOREVER = textwrap.dedent(
    """
    import logging, sys, time
    import coordlock
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sched = coordlock.Scheduler("memory://rf", instance_id="rf", shutdown_grace=10)

    @sched.every(0.2, name="tick")
    def tick():
        print("tick", flush=True)
        time.sleep(0.3)
        print("done", flush=True)

    sched.run_forever()
    print("exited", flush=True)
    """
)


def test_run_forever_stops_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_FOREVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "tick"
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [line.strip(), *out.split()]
    # the run in progress at SIGTERM finished before the process exited
    assert lines[-1] == "exited" and lines[-2] == "done"
    assert "SIGTERM received" in err and "scheduler rf stopped" in err


def test_events_nobody_would_see_are_not_built(clock: ManualClock) -> None:
    """A lost claim's ``skipped`` event is built only when a callback or the log at DEBUG
    would see it (an instance of a big cluster loses most of every tick's claims)."""
    import coordlock.scheduler.report as report_module

    name = f"quiet-{uuid.uuid4().hex}"
    built: list[str] = []
    real_event = report_module.Event

    def counting(**fields: Any) -> Event:
        built.append(f"{fields['kind']}:{fields['reason']}")
        return real_event(**fields)

    a = Scheduler(mem(name), clock=clock, instance_id="a")
    b = Scheduler(mem(name), clock=clock, instance_id="b")
    for sched in (a, b):
        sched.every(10, name="job")(noop)
    logger = logging.getLogger("coordlock")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with patch.object(report_module, "Event", counting):
            clock.set(T0)
            a.run_pending()
            b.run_pending()  # loses the claim: nobody listens, DEBUG is off
            assert "skipped:claimed-elsewhere" not in built
            seen = Recorder(b)
            clock.set(T0 + 10)
            a.run_pending()
            b.run_pending()  # a callback now listens: built and delivered
            assert "skipped:claimed-elsewhere" in built
            assert seen.keys("skipped", "claimed-elsewhere") == ["job@2023-11-14T22:13:30Z"]
    finally:
        logger.setLevel(level)
