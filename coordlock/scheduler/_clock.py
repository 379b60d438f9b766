"""Clocks for the scheduler: the system clock, a skewed/accelerated one, and a manual one.

The scheduler reads the time of day from a clock to decide which ticks are due, and waits on
it between ticks. Tests inject a clock instead of sleeping through real minutes or touching
the machine's clock:

* :class:`SystemClock` – ``time.time()``; the default.
* :class:`OffsetClock` – the system clock shifted by ``offset`` seconds and optionally running
  ``speed`` times faster: plays an instance whose clock is skewed, or compresses a test.
* :class:`ManualClock` – stands still until the test calls :meth:`~ManualClock.advance` or
  :meth:`~ManualClock.set`.

Only the time of day comes from the clock. Durations that protect a run (lease TTLs, claim
holds, job timeouts) are real seconds measured by the coordinator and ``time.monotonic()``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

#: How often (real seconds) a waiter on a :class:`ManualClock` re-checks its stop event.
_MANUAL_POLL = 0.01


@runtime_checkable
class Clock(Protocol):
    """What the scheduler needs from a clock."""

    def time(self) -> float:
        """Seconds since the epoch (UTC), like ``time.time()``."""
        ...

    def wait(self, seconds: float, event: threading.Event) -> bool:
        """Wait ``seconds`` of this clock's time, or until ``event`` is set.

        Returns ``True`` when ``event`` is set. May return early (the caller re-reads the time).
        """
        ...


class SystemClock:
    """The machine's clock (``time.time()``)."""

    def time(self) -> float:
        return time.time()

    def wait(self, seconds: float, event: threading.Event) -> bool:
        return event.wait(max(seconds, 0.0))

    def __repr__(self) -> str:
        return "SystemClock()"


class OffsetClock:
    """The system clock shifted by ``offset`` seconds, running ``speed`` times as fast.

    ``OffsetClock(-2)`` is an instance whose clock is 2 s behind. With ``speed=10`` one real
    second is ten clock seconds, counted from the moment the clock was created.
    """

    def __init__(self, offset: float = 0.0, speed: float = 1.0) -> None:
        if isinstance(offset, bool) or not isinstance(offset, (int, float)):
            raise TypeError("offset must be a number of seconds")
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or speed <= 0:
            raise ValueError("speed must be a positive number")
        self.offset = float(offset)
        self.speed = float(speed)
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def time(self) -> float:
        if self.speed == 1.0:
            return time.time() + self.offset
        return self._wall0 + (time.monotonic() - self._mono0) * self.speed + self.offset

    def wait(self, seconds: float, event: threading.Event) -> bool:
        return event.wait(max(seconds, 0.0) / self.speed)

    def __repr__(self) -> str:
        return f"OffsetClock(offset={self.offset:+g}, speed={self.speed:g})"


class ManualClock:
    """A clock that only moves when told to. Thread-safe.

    Waiters wake when the clock is moved past their deadline (or their stop event is set).
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise TypeError("start must be a number of seconds since the epoch")
        self._now = float(start)
        self._cond = threading.Condition()

    def time(self) -> float:
        with self._cond:
            return self._now

    def set(self, now: float) -> None:
        """Move the clock to ``now`` (forward or backward) and wake waiters."""
        with self._cond:
            self._now = float(now)
            self._cond.notify_all()

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("advance() moves forward; use set() to go back")
        with self._cond:
            self._now += float(seconds)
            self._cond.notify_all()
            return self._now

    def wait(self, seconds: float, event: threading.Event) -> bool:
        with self._cond:
            deadline = self._now + max(seconds, 0.0)
            while self._now < deadline:
                if event.is_set():
                    return True
                self._cond.wait(_MANUAL_POLL)
        return event.is_set()

    def __repr__(self) -> str:
        return f"ManualClock({self.time()!r})"
