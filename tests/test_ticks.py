"""Tick-aware locks: which tick a call belongs to, its claim, and what ``@locked``/``lock()``
do with ticks claimed elsewhere or calls off every tick. In-process (memory://) and with an
injected time of day; the cross-process, cross-backend behaviour is in
``test_ticks_multiprocess.py``."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import coordlock
from coordlock import LockNotAcquired, _locking
from coordlock._ticks import TickSpec, tick_spec
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import CronTrigger, IntervalTrigger, ManualClock, Scheduler, tick_key
from coordlock.scheduler.job import Job, build_options

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z: a multiple of 4, 10 and 20 seconds


def mem() -> MemoryCoordinator:
    return MemoryCoordinator(f"ticks-{uuid.uuid4().hex}")


class Clock:
    """The time of day tick-aware locks read (``coordlock._locking.wall_clock``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    at = Clock(T0)
    monkeypatch.setattr(_locking, "wall_clock", at)
    return at


@pytest.fixture
def pair() -> Iterator[tuple[MemoryCoordinator, MemoryCoordinator]]:
    """Two coordinators of one memory:// table: two servers."""
    a = mem()
    b = MemoryCoordinator(a.name)
    yield a, b
    a.close()
    b.close()


# -- resolution (pure) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(0.0, T0), (0.8, T0), (1.6, T0), (2.0, T0), (-1.9, T0), (-2.0, T0 - 4),
     (2.1, T0 + 4), (-2.1, T0 - 4), (4.0, T0 + 4)],
)  # fmt: skip
def test_nearest_tick_within_the_default_skew(offset: float, expected: float) -> None:
    spec = TickSpec("job", IntervalTrigger(4))
    assert spec.skew == 2.0  # min(period / 2, 60): every moment belongs to one tick
    decision = spec.resolve(T0 + offset)
    assert decision.tick == expected and decision.on_tick
    assert decision.key == f"job@{tick_key(expected)}"


@pytest.mark.parametrize("offset", [1.01, -1.01, 2.0, 3.0 - 0.01])
def test_off_tick_beyond_a_smaller_skew(offset: float) -> None:
    spec = TickSpec("job", IntervalTrigger(4), skew=1)
    decision = spec.resolve(T0 + offset)
    assert decision.tick is None and decision.key is None and not decision.on_tick
    assert "outside the 1s skew tolerance of every 4s" in decision.reason
    assert spec.resolve(T0 + 1.0).tick == T0 and spec.resolve(T0 + 3.0).tick == T0 + 4


def test_halfway_belongs_to_the_earlier_tick() -> None:
    spec = TickSpec("job", IntervalTrigger(10), skew=5)
    assert spec.resolve(T0 + 5).tick == T0
    assert spec.resolve(T0 + 5.001).tick == T0 + 10


def test_default_skew_is_capped_at_a_minute() -> None:
    assert TickSpec("j", IntervalTrigger(3600)).skew == 60.0
    assert TickSpec("j", CronTrigger("*/5 * * * *")).skew == 60.0
    assert TickSpec("j", CronTrigger("*/10 * * * * *")).skew == 5.0  # seconds first: every 10 s


def test_key_is_the_scheduler_key_format() -> None:
    spec = TickSpec("nightly", CronTrigger("30 2 * * *", "Europe/Berlin"))
    at = datetime(2024, 7, 1, 0, 30, 20, tzinfo=timezone.utc).timestamp()  # 02:30:20 in Berlin
    decision = spec.resolve(at)
    assert decision.key == "nightly@2024-07-01T00:30:00Z"
    assert decision.tick_datetime == datetime(2024, 7, 1, 0, 30, tzinfo=timezone.utc)
    assert decision.tick_iso == "2024-07-01T00:30:00Z"


def test_hold_matches_the_schedulers_hold() -> None:
    """The claim is held as long as the Scheduler holds the same key's claim with the same
    skew: the period plus the skew, counted from the tick."""
    trigger = IntervalTrigger(300)
    spec = TickSpec("job", trigger, skew=30)
    job = Job("job", lambda: None, trigger, build_options())
    tick = 1_700_000_100.0  # a multiple of 300
    scheduler_hold = job.hold_for(tick, trigger.next_after(tick), 30)
    assert spec.resolve(tick).hold == scheduler_hold == 330
    # early by 10 s (cron of a fast clock): held 10 s longer, to the same instant
    assert spec.resolve(tick - 10).hold == scheduler_hold + 10
    late = spec.resolve(tick + 20)
    assert late.hold == scheduler_hold  # from now: outlives every later caller's claim
    cron = TickSpec("job", CronTrigger("0 9,17 * * *"), skew=60)
    nine = datetime(2024, 1, 2, 9, 0, tzinfo=timezone.utc).timestamp()
    assert cron.resolve(nine).hold == 8 * 3600 + 60  # to the next tick, as the Scheduler


def test_every_with_offset() -> None:
    spec = tick_spec("job", every=timedelta(minutes=1), offset=15)
    assert spec is not None
    assert spec.resolve(T0 - 20 + 60 + 15 + 1).tick == T0 - 20 + 60 + 15  # :15 past a minute


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"cron": "* * * * *", "every": 60}, ValueError, "not both"),
        ({"timezone": "UTC", "every": 60}, ValueError, "timezone= only applies with cron"),
        ({"offset": 5, "cron": "* * * * *"}, ValueError, "offset= only applies with every"),
        ({"skew": 5}, ValueError, "skew= only applies"),
        ({"off_tick": "run"}, ValueError, "off_tick= only applies"),
        ({"every": 10, "skew": 6}, ValueError, "more than half the period"),
        ({"every": 10, "skew": 0}, ValueError, "skew must be > 0"),
        ({"every": 10, "skew": "2"}, TypeError, "skew must be a number"),
        ({"every": 10, "off_tick": "raise"}, ValueError, "off_tick must be"),
        ({"every": 0}, ValueError, "interval"),
        ({"cron": "61 * * * *"}, ValueError, "invalid cron"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, ValueError, "unknown timezone"),
    ],
)
def test_bad_options_fail_at_the_call(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        coordlock.lock("job", **options)
    with pytest.raises(error, match=match):
        coordlock.locked("job", **options)
    with pytest.raises(error, match=match):
        coordlock.locked(**options)  # the default name: still checked before decorating


def test_plain_locks_do_not_load_the_scheduler() -> None:
    code = (
        "import sys, coordlock\n"
        "c = coordlock.connect('memory://plain')\n"
        "with coordlock.lock('x', coordinator=c): pass\n"
        "coordlock.locked('y', coordinator=c)(lambda: None)()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('coordlock.scheduler', "
        "'coordlock._ticks', 'cronsim'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- @locked with ticks -----------------------------------------------------------------------


def test_each_tick_runs_once_across_servers(clock: Clock, pair: Any) -> None:
    a, b = pair
    ran: list[tuple[str, float]] = []

    def job_on(coordinator: MemoryCoordinator, server: str) -> Any:
        @coordlock.locked("report", every=4, coordinator=coordinator)
        def report() -> str:
            ran.append((server, clock.now))
            return server

        return report

    on_a, on_b = job_on(a, "a"), job_on(b, "b")
    results = []
    for k in range(5):  # five ticks; the servers' crons fire 0, 0.8 and 1.6 s after each
        tick = T0 + 4 * k
        for offset, job in ((0.0, on_b if k % 2 else on_a), (0.8, on_a), (1.6, on_b)):
            clock.now = tick + offset
            results.append(job())
    assert len(ran) == 5 and [r for r in results if r is not None] == [s for s, _ in ran]
    assert [t for _, t in ran] == [T0 + 4 * k for k in range(5)]


def test_a_short_job_cannot_rerun_its_tick(clock: Clock, pair: Any) -> None:
    """The issue's reproduction: a plain lock lets a second server run the same tick once the
    first one finished; a tick-aware lock does not."""
    a, b = pair
    ran: list[str] = []
    plain_a = coordlock.locked("plain", coordinator=a)(lambda: ran.append("plain-a"))
    plain_b = coordlock.locked("plain", coordinator=b)(lambda: ran.append("plain-b"))
    tick_a = coordlock.locked("ticked", every=60, coordinator=a)(lambda: ran.append("tick-a"))
    tick_b = coordlock.locked("ticked", every=60, coordinator=b)(lambda: ran.append("tick-b"))
    clock.now = T0 - 20 + 60  # a whole minute
    plain_a(), tick_a()
    clock.now += 1  # server B's cron, a second late
    plain_b(), tick_b()
    assert ran == ["plain-a", "tick-a", "plain-b"]


def test_claimed_elsewhere_by_on_busy(clock: Clock, pair: Any, caplog: Any) -> None:
    a, b = pair
    coordlock.locked("job", every=4, coordinator=a)(lambda: None)()  # a wins T0
    calls: list[str] = []
    for on_busy in ("skip", "wait"):
        fn = coordlock.locked("job", every=4, on_busy=on_busy, coordinator=b)(
            lambda: calls.append("ran")
        )
        with caplog.at_level(logging.INFO, logger="coordlock"):
            assert fn() is None
        assert "already claimed elsewhere" in caplog.text
    raising = coordlock.locked("job", every=4, on_busy="raise", coordinator=b)(
        lambda: calls.append("ran")
    )
    with pytest.raises(LockNotAcquired) as info:
        raising()
    assert calls == []
    exc = info.value
    assert exc.reason == "claimed-elsewhere"  # type: ignore[attr-defined]
    assert exc.tick == datetime.fromtimestamp(T0, timezone.utc)  # type: ignore[attr-defined]
    assert exc.key == f"job@{tick_key(T0)}"  # type: ignore[attr-defined]


def test_off_tick_does_not_run_and_says_why(clock: Clock, pair: Any, caplog: Any) -> None:
    a, _ = pair
    calls: list[str] = []
    fn = coordlock.locked("job", every=60, skew=5, coordinator=a)(lambda: calls.append("x"))
    clock.now = T0 - 20 + 60 + 7  # 7 s after a whole minute, skew 5 s
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        assert fn() is None
    assert calls == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "outside the 5s skew tolerance" in warnings[0].getMessage()
    assert "7.0s after" in warnings[0].getMessage()
    raising = coordlock.locked("job", every=60, skew=5, on_busy="raise", coordinator=a)(
        lambda: calls.append("x")
    )
    with pytest.raises(LockNotAcquired, match="off_tick='run'") as info:
        raising()
    assert info.value.reason == "off-tick" and info.value.tick is None  # type: ignore[attr-defined]


def test_off_tick_run_takes_the_lock_without_a_claim(clock: Clock, pair: Any) -> None:
    a, b = pair
    clock.now = T0 - 20 + 60 + 30  # halfway between two minutes, skew 5 s
    runs: list[str] = []
    fn = coordlock.locked("job", every=60, skew=5, off_tick="run", coordinator=a)(
        lambda: runs.append("x")
    )
    fn()
    fn()
    assert runs == ["x", "x"]  # no tick, no claim: only the lock excludes (overlapping) runs
    assert b.claim_many([f"job@{tick_key(T0 - 20 + 60)}", f"job@{tick_key(T0 - 20 + 120)}"],
                        10) == {f"job@{tick_key(T0 - 20 + 60)}", f"job@{tick_key(T0 - 20 + 120)}"}


def test_won_tick_but_a_run_still_holds_the_lock(clock: Clock, pair: Any) -> None:
    a, b = pair
    holder = a.acquire("job", 30)  # a run of the previous tick, still going
    assert holder is not None
    fn = coordlock.locked("job", every=4, on_busy="raise", coordinator=b)(lambda: "ran")
    with pytest.raises(LockNotAcquired) as info:
        fn()
    assert info.value.reason == "running"  # type: ignore[attr-defined]
    holder.release()
    # the tick was claimed (burned) by that call: nobody runs it now, as with the Scheduler
    assert fn.__wrapped__() == "ran"  # the function itself is untouched
    with pytest.raises(LockNotAcquired, match="claimed elsewhere"):
        fn()


def test_wait_waits_for_the_lock_of_a_won_tick(clock: Clock, pair: Any) -> None:
    a, b = pair
    holder = a.acquire("job", 30)
    assert holder is not None
    fn = coordlock.locked("job", every=4, on_busy="wait", wait=10, coordinator=b)(lambda: "ran")
    import threading

    threading.Timer(0.2, holder.release).start()
    assert fn() == "ran"


def test_async_locked_with_ticks(clock: Clock, pair: Any) -> None:
    a, b = pair
    ran: list[str] = []

    def make(coordinator: MemoryCoordinator, who: str) -> Any:
        @coordlock.locked("ajob", every=4, coordinator=coordinator)
        async def job() -> str:
            await asyncio.sleep(0.01)
            ran.append(who)
            return who

        return job

    async def main() -> list[Any]:
        return list(await asyncio.gather(make(a, "a")(), make(b, "b")()))

    results = asyncio.run(main())
    assert len(ran) == 1 and sorted(results, key=str) == sorted([ran[0], None], key=str)
    clock.now = T0 + 4
    assert asyncio.run(make(b, "b")()) == "b"


def test_lock_context_tells_the_tick(clock: Clock, pair: Any) -> None:
    a, b = pair
    clock.now = T0 + 1.5
    held = coordlock.lock("export", ttl=10, every=4, coordinator=a)
    assert held.tick is None
    with held as lease:
        assert held.tick == datetime.fromtimestamp(T0, timezone.utc)
        assert held.tick_key == f"export@{tick_key(T0)}"
        assert lease.fence > 0
    with pytest.raises(LockNotAcquired, match="already claimed"):
        with coordlock.lock("export", ttl=10, every=4, coordinator=b):
            pass

    async def on_b() -> None:
        async with coordlock.lock("export", ttl=10, every=4, coordinator=b):
            pass

    with pytest.raises(LockNotAcquired, match="already claimed"):
        asyncio.run(on_b())
    clock.now = T0 + 4.2
    asyncio.run(on_b())  # the next tick


def test_hold_at_least_with_ticks(clock: Clock, pair: Any) -> None:
    a, b = pair
    fn = coordlock.locked("held", every=4, hold_at_least=30, coordinator=a)(lambda: "ran")
    assert fn() == "ran"
    assert b.acquire("held", 10) is None  # released, but held for at least 30 s


# -- interoperation with the Scheduler --------------------------------------------------------


def test_scheduler_and_decorator_share_claims(clock: Clock, pair: Any) -> None:
    a, b = pair
    ran: list[str] = []
    sched = Scheduler(a, clock=ManualClock(T0), instance_id="sched")
    sched.every(10, name="sync")(lambda: ran.append("scheduler"))
    decorated = coordlock.locked("sync", every=10, coordinator=b)(lambda: ran.append("locked"))
    assert sched.run_pending() == 1  # the Scheduler wins T0
    clock.now = T0 + 0.8
    assert decorated() is None  # same key: already claimed
    clock.now = T0 + 10 - 1.0  # the decorator fires first for the next tick
    decorated()
    sched.clock.set(T0 + 10)  # type: ignore[attr-defined]
    assert sched.run_pending() == 0  # the Scheduler finds T0 + 10 claimed
    assert ran == ["scheduler", "locked"]


def test_a_won_tick_waits_for_a_run_just_ending(clock: Clock, pair: Any) -> None:
    """As the Scheduler: a won tick waits for the lock within what is left of its skew (at
    most 5 s), so a previous tick's run that ends a moment late does not cost this tick."""
    import threading

    a, b = pair
    holder = a.acquire("job", 30)  # the previous tick's run, about to end
    assert holder is not None
    threading.Timer(0.3, holder.release).start()
    clock.now = T0 + 0.5  # skew 2 s: up to 1.5 s left for the lock
    assert coordlock.locked("job", every=4, coordinator=b)(lambda: "ran")() == "ran"
    spec = TickSpec("job", IntervalTrigger(60))
    assert spec.lease_wait(T0, T0 + 1) == 5.0  # at most 5 s
    assert spec.lease_wait(T0, T0 + 29) == 1.0 and spec.lease_wait(T0, T0 + 31) == 0.0


def test_a_stalled_call_does_not_claim_after_the_next_tick(clock: Clock, pair: Any) -> None:
    """A call that named its tick, then stalled (GC pause, an overloaded host) until after the
    next tick, does not claim it: the first claim may have expired, so it could run twice."""
    a, _ = pair
    held = coordlock.lock("job", ttl=10, every=4, coordinator=a)
    clock.now = T0 + 4.5  # now: after the next tick of T0
    with pytest.raises(LockNotAcquired, match="too late to claim it safely") as info:
        held.acquire(now=T0 + 1.0)  # named T0 when the call came, 3.5 s ago
    assert info.value.reason == "off-tick"  # type: ignore[attr-defined]
    assert info.value.tick == datetime.fromtimestamp(T0, timezone.utc)  # type: ignore[attr-defined]
    assert a.claim(f"job@{tick_key(T0)}", 10)  # nothing was claimed
    clock.now = T0 + 3.9  # still before the next tick: fine
    assert coordlock.lock("job2", ttl=10, every=4, coordinator=a).acquire(now=T0 + 1.0)
    spec = TickSpec("job", CronTrigger("0 9,17 * * *"))
    nine = datetime(2024, 1, 2, 9, 0, tzinfo=timezone.utc).timestamp()
    assert spec.claim_deadline(nine) == nine + 8 * 3600
