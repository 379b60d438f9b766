"""Triggers: when a job's ticks are. Every instance computes the same ticks from the same
trigger, so a tick can be named by its UTC time and claimed once across instances.

* :class:`CronTrigger` – a cron expression in a timezone, evaluated by `cronsim`_ (5 fields, or
  6 with a leading seconds field). cronsim was chosen over croniter because it reproduces
  Debian cron's daylight-saving rules (a job at a fixed local time that falls into the skipped
  hour runs right after the jump; one in the repeated hour runs once; jobs with a ``*`` in the
  minute or hour field keep running at their real-time intervals), and because it is small,
  typed and actively maintained.
* :class:`IntervalTrigger` – every N seconds, aligned to the Unix epoch (plus an optional
  offset), so instances started at different moments agree on the ticks.

.. _cronsim: https://github.com/cuu508/cronsim
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .._validate import check_seconds

UTC = timezone.utc

#: Cron nicknames, mapped to the 5-field expressions Vixie/Debian cron gives them.
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: Upper bound on cron iterations in one call (guards against pathological expressions).
_MAX_STEPS = 100_000
#: How far before a reverse-search candidate the forward check starts (longer than any DST jump).
_DST_MARGIN = 3 * 3600.0


def resolve_timezone(value: object) -> tzinfo:
    """A ``tzinfo`` from an IANA name (``"Europe/Berlin"``) or a ``tzinfo`` object."""
    if isinstance(value, tzinfo):
        return value
    if not isinstance(value, str):
        raise TypeError(f"timezone must be an IANA name or a tzinfo, not {type(value).__name__}")
    if value.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {value!r}") from exc


@lru_cache(maxsize=4096)
def tick_key(tick: float) -> str:
    """The UTC ISO name of a tick: ``2024-03-31T01:00:00Z`` (microseconds when not whole)."""
    dt = datetime.fromtimestamp(tick, UTC)
    spec = "seconds" if dt.microsecond == 0 else "microseconds"
    return dt.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


@lru_cache(maxsize=4096)
def tick_datetime(tick: float) -> datetime:
    """The tick as an aware UTC datetime (cached: many jobs share a tick)."""
    return datetime.fromtimestamp(tick, UTC)


class Trigger(ABC):
    """When a job fires. Ticks are epoch seconds (floats); implementations must be pure."""

    @abstractmethod
    def next_after(self, ts: float) -> float | None:
        """The first tick strictly after ``ts``, or ``None`` if there is none."""

    @abstractmethod
    def previous(self, ts: float) -> float | None:
        """The last tick at or before ``ts``, or ``None``."""

    @abstractmethod
    def nominal_period(self) -> float:
        """A typical distance between ticks (seconds), used for default lease TTLs."""

    @abstractmethod
    def describe(self) -> str:
        """A short human description (``cron '*/5 * * * *' Europe/Berlin``)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class IntervalTrigger(Trigger):
    """Every ``seconds`` seconds, at ``offset + k * seconds`` since the epoch (UTC)."""

    def __init__(self, seconds: float | timedelta, *, offset: float | timedelta = 0.0) -> None:
        period = check_seconds(seconds, "interval")
        if period < 0.001:
            raise ValueError(f"interval must be at least 0.001 seconds, got {seconds!r}")
        shift = check_seconds(offset, "offset", allow_zero=True)
        self.seconds = period
        self.offset = math.fmod(shift, period)

    def _at(self, k: int) -> float:
        return self.offset + k * self.seconds

    def _floor_index(self, ts: float) -> int:
        k = math.floor((ts - self.offset) / self.seconds)
        # Float division can land one step off; settle on the last k with _at(k) <= ts.
        while self._at(k + 1) <= ts:
            k += 1
        while self._at(k) > ts:
            k -= 1
        return k

    def next_after(self, ts: float) -> float:
        return self._at(self._floor_index(ts) + 1)

    def previous(self, ts: float) -> float:
        return self._at(self._floor_index(ts))

    def count_between(self, after: float, upto: float) -> int:
        """How many ticks lie in ``(after, upto]``."""
        return max(0, self._floor_index(upto) - self._floor_index(after))

    def nominal_period(self) -> float:
        return self.seconds

    def describe(self) -> str:
        text = f"every {self.seconds:g}s"
        return f"{text} (+{self.offset:g}s)" if self.offset else text

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, IntervalTrigger)
            and other.seconds == self.seconds
            and other.offset == self.offset
        )

    def __hash__(self) -> int:
        return hash((self.seconds, self.offset))


class CronTrigger(Trigger):
    """A cron expression evaluated in ``timezone`` (an IANA name or tzinfo; default UTC).

    Five fields (minute hour day-of-month month day-of-week), six with a leading seconds field,
    or a nickname (``@hourly``, ``@daily``…). Daylight-saving transitions follow Debian cron
    (see the module docstring). Invalid expressions raise ``ValueError`` here.
    """

    def __init__(self, expr: str, timezone: str | tzinfo = "UTC") -> None:
        if not isinstance(expr, str):
            raise TypeError(f"cron expression must be a str, not {type(expr).__name__}")
        text = " ".join(expr.split())
        if not text:
            raise ValueError("empty cron expression")
        self.expr = NICKNAMES.get(text.lower(), text)
        self.zone = resolve_timezone(timezone)
        self.timezone = str(getattr(self.zone, "key", self.zone))
        try:
            probe = CronSim(self.expr, datetime.now(self.zone))
            next(probe)
        except CronSimError as exc:
            raise ValueError(f"invalid cron expression {expr!r}: {exc}") from exc
        except StopIteration:
            raise ValueError(f"cron expression {expr!r} never fires") from None
        fields = self.expr.split()
        self.has_seconds = len(fields) == 6
        self._nominal: float | None = None

    def _iter(self, ts: float, *, reverse: bool = False) -> CronSim:
        return CronSim(self.expr, datetime.fromtimestamp(ts, self.zone), reverse=reverse)

    def next_after(self, ts: float) -> float | None:
        it = self._iter(ts)
        try:
            for _ in range(_MAX_STEPS):
                tick = next(it).timestamp()
                if tick > ts:
                    return tick
        except StopIteration:
            return None
        return None

    def previous(self, ts: float) -> float | None:
        # cronsim searches backwards from a datetime with microseconds starting at the whole
        # second itself, so a tick exactly at floor(ts) is found.
        start = math.floor(ts) + 0.5
        try:
            candidate = next(self._iter(start, reverse=True)).timestamp()
        except StopIteration:
            return None
        candidate = min(candidate, ts)
        # The backward search can disagree with the forward one around DST transitions, and
        # the forward one is what the scheduler runs: confirm by walking forward from before
        # the candidate.
        for margin in (1.0, _DST_MARGIN):
            found = None
            tick = self.next_after(candidate - margin)
            steps = 0
            while tick is not None and tick <= ts and steps < _MAX_STEPS:
                found = tick
                tick = self.next_after(tick)
                steps += 1
            if found is not None:
                return found
        return None

    def _estimate_period(self) -> float:
        # The smallest gap among the next few ticks from a fixed reference point.
        ref = 1_704_067_200.0  # 2024-01-01T00:00:00Z
        gaps = []
        tick = self.next_after(ref)
        for _ in range(8):
            if tick is None:
                break
            following = self.next_after(tick)
            if following is None:
                break
            gaps.append(following - tick)
            tick = following
        return min(gaps) if gaps else 86400.0

    def nominal_period(self) -> float:
        if self._nominal is None:
            self._nominal = self._estimate_period()
        return self._nominal

    def describe(self) -> str:
        return f"cron {self.expr!r} {self.timezone}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CronTrigger)
            and other.expr == self.expr
            and other.timezone == self.timezone
        )

    def __hash__(self) -> int:
        return hash((self.expr, self.timezone))


#: Default grace and claim-hold base of a one-shot job (:class:`OnceTrigger`): a day.
ONCE_WINDOW = 86400.0


class OnceTrigger(Trigger):
    """One tick at ``when`` (an aware ``datetime`` or epoch seconds): a one-shot job.

    A naive ``datetime`` is refused (``ValueError``): the instant must not depend on the
    instance's timezone. Its nominal period is :data:`ONCE_WINDOW` (the claim's hold and the
    default grace of :meth:`Scheduler.at`).
    """

    def __init__(self, when: datetime | float) -> None:
        if isinstance(when, datetime):
            if when.tzinfo is None or when.utcoffset() is None:
                raise ValueError(
                    "a one-shot time must be timezone-aware (datetime(..., tzinfo=...)); "
                    "a naive datetime would mean a different instant on each instance"
                )
            self.when = when.timestamp()
        elif isinstance(when, (int, float)) and not isinstance(when, bool):
            if not math.isfinite(when):
                raise ValueError(f"a one-shot time must be finite, got {when!r}")
            self.when = float(when)
        else:
            raise TypeError(
                f"a one-shot time must be an aware datetime or epoch seconds, not "
                f"{type(when).__name__}"
            )

    def next_after(self, ts: float) -> float | None:
        return self.when if ts < self.when else None

    def previous(self, ts: float) -> float | None:
        return self.when if self.when <= ts else None

    def nominal_period(self) -> float:
        return ONCE_WINDOW

    def describe(self) -> str:
        return f"at {tick_key(self.when)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OnceTrigger) and other.when == self.when

    def __hash__(self) -> int:
        return hash(("once", self.when))
