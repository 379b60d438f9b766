"""Timezones and daylight-saving transitions (zoneinfo; Europe/Berlin and America/New_York).

Cron semantics follow Debian cron, as cronsim implements it: a job at a fixed local time that
falls into the skipped hour runs right after the jump; one in the repeated hour runs once; a
job with ``*`` in the minute or hour field keeps its real-time rhythm (so it runs in both
copies of a repeated hour). Ticks are always named in UTC.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import CronTrigger, IntervalTrigger, ManualClock, Scheduler, current_run

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def ticks(trigger: CronTrigger, start: float, end: float) -> list[str]:
    out: list[str] = []
    tick = trigger.next_after(start)
    while tick is not None and tick <= end:
        out.append(datetime.fromtimestamp(tick, UTC).strftime("%Y-%m-%d %H:%M"))
        tick = trigger.next_after(tick)
    return out


# -- the trigger ---------------------------------------------------------------------------


def test_berlin_spring_forward_fixed_time_runs_right_after_the_jump() -> None:
    # 2024-03-31: 02:00 CET → 03:00 CEST; 02:30 does not exist that night.
    trig = CronTrigger("30 2 * * *", "Europe/Berlin")
    assert ticks(trig, utc(2024, 3, 29, 12), utc(2024, 4, 1, 12)) == [
        "2024-03-30 01:30",  # 02:30 CET
        "2024-03-31 01:00",  # 03:00 CEST: right after the jump, once
        "2024-04-01 00:30",  # 02:30 CEST
    ]


def test_berlin_fall_back_fixed_time_runs_once() -> None:
    # 2024-10-27: 03:00 CEST → 02:00 CET; 02:30 happens twice, the job runs once.
    trig = CronTrigger("30 2 * * *", "Europe/Berlin")
    assert ticks(trig, utc(2024, 10, 25, 12), utc(2024, 10, 28, 12)) == [
        "2024-10-26 00:30",
        "2024-10-27 00:30",  # the first 02:30 (CEST) only
        "2024-10-28 01:30",
    ]


def test_berlin_fall_back_wildcard_keeps_real_time_rhythm() -> None:
    trig = CronTrigger("*/30 * * * *", "Europe/Berlin")
    # local 02:00–03:00 happens twice (00:00–02:00 UTC): every half hour of real time runs
    assert ticks(trig, utc(2024, 10, 26, 23, 59), utc(2024, 10, 27, 2, 1)) == [
        "2024-10-27 00:00",  # 02:00 CEST
        "2024-10-27 00:30",  # 02:30 CEST
        "2024-10-27 01:00",  # 02:00 CET
        "2024-10-27 01:30",  # 02:30 CET
        "2024-10-27 02:00",  # 03:00 CET
    ]


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2024-03-10: 02:00 EST → 03:00 EDT.  2024-11-03: 02:00 EDT → 01:00 EST.
    at_230 = CronTrigger("30 2 * * *", "America/New_York")
    assert ticks(at_230, utc(2024, 3, 9, 12), utc(2024, 3, 11, 12)) == [
        "2024-03-10 07:00",  # 03:00 EDT, right after the jump
        "2024-03-11 06:30",
    ]
    at_130 = CronTrigger("30 1 * * *", "America/New_York")
    assert ticks(at_130, utc(2024, 11, 2, 12), utc(2024, 11, 4, 12)) == [
        "2024-11-03 05:30",  # 01:30 EDT: the first of the two, once
        "2024-11-04 06:30",  # 01:30 EST
    ]
    hourly = CronTrigger("0 * * * *", "America/New_York")
    # wildcard hour: 01:00 EDT and 01:00 EST both run (real-time hourly)
    assert ticks(hourly, utc(2024, 11, 3, 4, 30), utc(2024, 11, 3, 7, 30)) == [
        "2024-11-03 05:00",  # 01:00 EDT
        "2024-11-03 06:00",  # 01:00 EST
        "2024-11-03 07:00",  # 02:00 EST
    ]


@pytest.mark.parametrize(
    ("expr", "zone", "start"),
    [
        ("30 2 * * *", "Europe/Berlin", utc(2024, 3, 30, 20)),
        ("30 2 * * *", "Europe/Berlin", utc(2024, 10, 26, 20)),
        ("*/15 * * * *", "Europe/Berlin", utc(2024, 10, 26, 22)),
        ("0-59/7 1-3 * * *", "Europe/Berlin", utc(2024, 3, 30, 22)),
        ("30 1 * * *", "America/New_York", utc(2024, 11, 2, 22)),
        ("30 2 * * *", "America/New_York", utc(2024, 3, 9, 22)),
        ("15 0-4 * * *", "America/New_York", utc(2024, 11, 3, 2)),
    ],
)
def test_previous_agrees_with_next_across_transitions(expr: str, zone: str, start: float) -> None:
    """``previous(ts)`` is the last tick the forward iteration gives at or before ``ts``."""
    trig = CronTrigger(expr, zone)
    forward: list[float] = []
    tick = trig.next_after(start - 86400)
    while tick is not None and tick <= start + 86400:
        forward.append(tick)
        tick = trig.next_after(tick)
    for minutes in range(0, 24 * 60, 7):
        ts = start + minutes * 60 + 13
        expected = max(t for t in forward if t <= ts)
        assert trig.previous(ts) == expected, datetime.fromtimestamp(ts, UTC)
        assert trig.previous(expected) == expected


@settings(max_examples=200, deadline=None)
@given(
    seconds=st.floats(min_value=0.001, max_value=10 * 86400),
    ts=st.floats(min_value=0, max_value=4e9),
)
def test_interval_previous_and_next_bracket_every_time(seconds: float, ts: float) -> None:
    trig = IntervalTrigger(seconds)
    prev, nxt = trig.previous(ts), trig.next_after(ts)
    assert prev <= ts < nxt
    assert trig.next_after(prev) == nxt
    assert trig.previous(nxt) == nxt


# -- the scheduler across a transition ------------------------------------------------------


def _drive(expr: str, zone: str, start: float, hours: float, step: float = 60) -> list[str]:
    """Step a scheduler (one per minute of clock time) and return the ticks it ran."""
    clock = ManualClock(start)
    sched = Scheduler(MemoryCoordinator(f"dst-{uuid.uuid4().hex}"), clock=clock, timezone=zone)
    ran: list[str] = []

    @sched.cron(expr, name="job")
    def job() -> None:
        ctx = current_run()
        assert ctx is not None
        ran.append(
            ctx.tick.strftime("%Y-%m-%d %H:%M")
            + " "
            + ctx.tick.astimezone(ZoneInfo(zone)).strftime("%H:%M %Z")
        )

    now = start
    while now < start + hours * 3600:
        now += step
        clock.set(now)
        sched.run_pending()
    return ran


def test_scheduler_runs_fixed_time_job_once_per_day_across_berlin_transitions() -> None:
    spring = _drive("30 2 * * *", "Europe/Berlin", utc(2024, 3, 30, 22), 28)
    assert spring == ["2024-03-31 01:00 03:00 CEST", "2024-04-01 00:30 02:30 CEST"]
    autumn = _drive("30 2 * * *", "Europe/Berlin", utc(2024, 10, 26, 22), 28)
    assert autumn == ["2024-10-27 00:30 02:30 CEST", "2024-10-28 01:30 02:30 CET"]


def test_scheduler_wildcard_job_runs_in_both_copies_of_the_repeated_hour() -> None:
    ran = _drive("*/30 * * * *", "Europe/Berlin", utc(2024, 10, 26, 23, 45), 2.5)
    assert ran == [
        "2024-10-27 00:00 02:00 CEST",
        "2024-10-27 00:30 02:30 CEST",
        "2024-10-27 01:00 02:00 CET",
        "2024-10-27 01:30 02:30 CET",
        "2024-10-27 02:00 03:00 CET",
    ]


def test_scheduler_new_york_transitions() -> None:
    spring = _drive("30 2 * * *", "America/New_York", utc(2024, 3, 10, 4), 27)
    assert spring == ["2024-03-10 07:00 03:00 EDT", "2024-03-11 06:30 02:30 EDT"]
    autumn = _drive("30 1 * * *", "America/New_York", utc(2024, 11, 3, 3), 28)
    assert autumn == ["2024-11-03 05:30 01:30 EDT", "2024-11-04 06:30 01:30 EST"]


def test_scheduler_default_timezone_and_per_job_override() -> None:
    clock = ManualClock(utc(2024, 7, 1, 0, 0))
    sched = Scheduler(
        MemoryCoordinator(f"tz-{uuid.uuid4().hex}"), clock=clock, timezone="America/New_York"
    )
    sched.cron("0 9 * * *", name="ny")(lambda: None)
    sched.cron("0 9 * * *", name="berlin", timezone=BERLIN)(lambda: None)
    sched.cron("0 9 * * *", name="utc", timezone="UTC")(lambda: None)
    nxt = {j.name: j.next_run for j in sched.jobs()}
    assert nxt["ny"] == datetime(2024, 7, 1, 9, tzinfo=NEW_YORK)
    assert nxt["berlin"] == datetime(2024, 7, 1, 9, tzinfo=BERLIN)
    assert nxt["utc"] == datetime(2024, 7, 1, 9, tzinfo=UTC)
    assert nxt["ny"] is not None and nxt["ny"].utcoffset() == timedelta(hours=-4)
