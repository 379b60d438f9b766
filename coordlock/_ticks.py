"""Once per tick outside the Scheduler: which scheduled tick a call belongs to, and its claim.

A crontab line, a ``@locked`` callback or an HTTP-triggered cron endpoint fires on every server
at *about* the scheduled time: cron daemons start late, clocks are skewed, deliveries are
retried. :class:`TickSpec` names the tick such a call belongs to — the scheduled tick nearest
to the call, if it lies within ``skew`` seconds — so that every server claims the same key,
``f"{name}@{tick in UTC, ISO 8601}"``, the format of :class:`coordlock.Scheduler`'s claims
(so the two interoperate). Only the winner of that claim runs the tick.

Pure code: no I/O, no clock of its own (the caller passes ``now``). Ticks come from
:mod:`coordlock.scheduler.triggers` (cron via cronsim, epoch-aligned intervals), the same
triggers the Scheduler uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Literal

from ._validate import check_name, check_seconds
from .scheduler.job import LEASE_WAIT_MAX
from .scheduler.triggers import CronTrigger, IntervalTrigger, Trigger, tick_datetime, tick_key

OffTick = Literal["skip", "run"]

#: Upper bound of the default skew tolerance (seconds); the default is min(period / 2, this).
DEFAULT_SKEW_MAX = 60.0


@dataclass(frozen=True)
class TickDecision:
    """The tick a call at ``now`` belongs to.

    ``tick`` is epoch seconds, ``None`` when the call is off tick (``reason`` then says why).
    ``key`` is the claim key, ``hold`` how long to hold the claim (seconds from now).
    """

    now: float
    tick: float | None
    key: str | None
    hold: float
    reason: str = ""

    @property
    def on_tick(self) -> bool:
        return self.tick is not None

    @property
    def tick_datetime(self) -> datetime | None:
        """The tick as an aware UTC datetime (``None`` off tick)."""
        return None if self.tick is None else tick_datetime(self.tick)

    @property
    def tick_iso(self) -> str | None:
        """The tick in UTC, ISO 8601 (``2026-01-01T00:05:00Z``), as in claim keys."""
        return None if self.tick is None else tick_key(self.tick)


class TickSpec:
    """When a tick-aware lock's ticks are, how far from one a call may be, and what then.

    * ``trigger`` – the schedule (:class:`CronTrigger` or :class:`IntervalTrigger`).
    * ``skew`` – seconds a call may be early or late for a tick and still belong to it
      (default ``min(period / 2, 60)``; at most half the shortest period, so that a call never
      lies within reach of two ticks).
    * ``off_tick`` – ``"skip"`` (default): a call outside every tick's tolerance does not run;
      ``"run"``: it runs under the lock alone, without a tick claim.

    The claim of a tick is held for the tick's period plus ``skew``, counted from the tick (as
    the Scheduler holds its claims for the period plus its skew tolerance), so a server whose
    cron fires late, or a retried delivery, still finds the tick taken.
    """

    def __init__(
        self, name: str, trigger: Trigger, skew: float | None = None, off_tick: OffTick = "skip"
    ) -> None:
        self.name = check_name(name)
        if not isinstance(trigger, Trigger):
            raise TypeError(f"trigger must be a Trigger, not {type(trigger).__name__}")
        self.trigger = trigger
        self.period = trigger.nominal_period()
        if skew is None:
            self.skew = min(self.period / 2, DEFAULT_SKEW_MAX)
        else:
            self.skew = check_seconds(skew, "skew")
            if self.skew > self.period / 2:
                raise ValueError(
                    f"skew {self.skew:g}s is more than half the period ({self.period:g}s) of "
                    f"{trigger.describe()}: a call could belong to two ticks"
                )
        if off_tick not in ("skip", "run"):
            raise ValueError(f"off_tick must be 'skip' or 'run', not {off_tick!r}")
        self.off_tick: OffTick = off_tick

    def describe(self) -> str:
        return f"{self.trigger.describe()}, skew {self.skew:g}s"

    def __repr__(self) -> str:
        return f"<TickSpec {self.name!r} {self.describe()}>"

    def nearest(self, now: float) -> float | None:
        """The scheduled tick nearest to ``now`` if it lies within ``skew``, else ``None``.

        A call exactly halfway between two ticks (possible only with ``skew = period / 2``)
        belongs to the earlier one.
        """
        candidates = []
        before = self.trigger.previous(now)
        if before is not None and now - before <= self.skew:
            candidates.append((now - before, before))
        after = self.trigger.next_after(now)
        if after is not None and after - now <= self.skew:
            candidates.append((after - now, after))
        if not candidates:
            return None
        return min(candidates)[1]

    def hold_for(self, tick: float, now: float) -> float:
        """Seconds from ``now`` to hold the claim of ``tick``: until ``tick + period + skew``
        at least (the Scheduler's hold), and never less than ``period + skew`` from now."""
        following = self.trigger.next_after(tick)
        period = (following - tick) if following is not None else self.period
        return period + self.skew + max(0.0, tick - now)

    def claim_deadline(self, tick: float) -> float:
        """The latest moment (epoch seconds) the claim of ``tick`` may still be made: its next
        tick. Every claim of a tick lives until ``tick + period + skew`` at least; a caller
        stalled past the next tick (clocks may differ by ``skew``) could find an expired
        claim and run the tick again, so it must not claim."""
        following = self.trigger.next_after(tick)
        return following if following is not None else tick + self.period

    def lease_wait(self, tick: float, now: float) -> float:
        """How long a call that won ``tick`` waits (at ``now``) for a lock still held by a run
        that is just ending: what is left of the tick's skew window, at most
        :data:`~coordlock.scheduler.job.LEASE_WAIT_MAX` (the Scheduler's bound)."""
        return max(0.0, min(tick + self.skew - now, LEASE_WAIT_MAX))

    def resolve(self, now: float) -> TickDecision:
        """The tick of a call at ``now`` (epoch seconds), with its claim key and hold."""
        if not isinstance(now, (int, float)) or isinstance(now, bool) or not math.isfinite(now):
            raise TypeError(f"now must be epoch seconds, not {now!r}")
        tick = self.nearest(now)
        if tick is None:
            return TickDecision(now, None, None, 0.0, self._off_tick_reason(now))
        return TickDecision(now, tick, f"{self.name}@{tick_key(tick)}", self.hold_for(tick, now))

    def _off_tick_reason(self, now: float) -> str:
        gaps = []
        before = self.trigger.previous(now)
        if before is not None:
            gaps.append((now - before, f"{_span(now - before)} after {tick_key(before)}"))
        after = self.trigger.next_after(now)
        if after is not None:
            gaps.append((after - now, f"{_span(after - now)} before {tick_key(after)}"))
        where = min(gaps)[1] if gaps else "and the schedule has no ticks"
        at = tick_datetime(now).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return (
            f"{self.name!r} called at {at}, {where}: outside the {self.skew:g}s skew "
            f"tolerance of {self.trigger.describe()}"
        )


def _span(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 100 else f"{seconds:.0f}s"


def tick_spec(
    name: str,
    *,
    cron: str | None = None,
    timezone: str | tzinfo | None = None,
    every: float | timedelta | None = None,
    offset: float | timedelta | None = None,
    skew: float | timedelta | None = None,
    off_tick: object = "skip",
) -> TickSpec | None:
    """A :class:`TickSpec` from the keyword options of ``lock()``/``locked()``/``coordlock
    run``; ``None`` when neither ``cron`` nor ``every`` is given (a plain lock).

    Raises ``TypeError``/``ValueError`` at once for bad values or options that do not go
    together (``cron`` and ``every``; ``timezone`` without ``cron``; ``offset`` without
    ``every``; ``skew`` or ``off_tick`` without either).
    """
    if cron is not None and every is not None:
        raise ValueError("give cron= or every=, not both")
    if timezone is not None and cron is None:
        raise ValueError("timezone= only applies with cron= (every= ticks are epoch-aligned)")
    if offset is not None and every is None:
        raise ValueError("offset= only applies with every=")
    if cron is None and every is None:
        if skew is not None:
            raise ValueError("skew= only applies with cron= or every=")
        if off_tick != "skip":
            raise ValueError("off_tick= only applies with cron= or every=")
        return None
    trigger: Trigger
    if cron is not None:
        trigger = CronTrigger(cron, "UTC" if timezone is None else timezone)
    else:
        assert every is not None
        trigger = IntervalTrigger(every, offset=0.0 if offset is None else offset)
    if off_tick not in ("skip", "run"):
        raise ValueError(f"off_tick must be 'skip' or 'run', not {off_tick!r}")
    return TickSpec(
        name,
        trigger,
        None if skew is None else check_seconds(skew, "skew"),
        "run" if off_tick == "run" else "skip",
    )
