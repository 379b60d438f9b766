"""Which ticks are due: each job's next tick in a heap, judged against the job's grace.

Pure bookkeeping on the scheduler's clock (no coordinator calls): the loop asks
:meth:`Planner.take_due` for everything due at ``now`` and gets the ticks to claim and the
ticks this instance reached too late (``missed``). Never a burst of catch-up runs: of the ticks
an instance slept through, only the newest may still run.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .job import DEFAULT_SKIP_GRACE, Job
from .triggers import IntervalTrigger, Trigger

#: Upper bound on ticks counted one by one when an instance wakes far behind.
_MAX_COUNT = 10_000


@dataclass(frozen=True)
class Due:
    """A tick to claim: ``following`` is the job's next tick after it (``None``: none)."""

    job: Job
    tick: float
    following: float | None


@dataclass(frozen=True)
class Missed:
    """``count`` consecutive ticks of ``job`` this instance reached too late; ``tick`` is the
    newest of them."""

    job: Job
    tick: float
    count: int


class Planner:
    """The heap of next ticks. Guarded by the scheduler's lock (given)."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._heap: list[tuple[float, int, int, Job]] = []
        self._seq = itertools.count()
        #: next ticks computed (the scheduler started, or run_pending() called)
        self.active = False

    def activate_all(self, jobs: Iterable[Job], now: float) -> None:
        """Compute every job's first tick, once."""
        with self._lock:
            if self.active:
                return
            self.active = True
            for job in jobs:
                self.activate(job, now)

    def activate(self, job: Job, now: float) -> None:
        """Set the first tick to consider: the last one if it is still within its grace
        (a restart just after a tick still runs it, if nobody did), else the next one."""
        trigger = job.trigger
        grace = job.options.grace
        if grace is None and job.options.misfire == "skip":
            grace = DEFAULT_SKIP_GRACE
        first: float | None
        if grace is not None and not math.isinf(grace):
            # cheap: the first tick inside [now - grace, ...); _plan sorts out the rest
            first = trigger.next_after(now - grace - 1e-6)
        else:
            first = None
            prev = trigger.previous(now)
            if prev is not None:
                following = trigger.next_after(prev)
                if now - prev <= job.grace_for(prev, following):
                    first = prev
            if first is None:
                first = trigger.next_after(now)
        with self._lock:
            job.activated_at = now if first is not None and first <= now else None
            self._schedule(job, first)

    def next_wake(self, jobs: Mapping[str, Job]) -> float | None:
        """The earliest next tick of a registered job (``None``: nothing scheduled)."""
        with self._lock:
            while self._heap:
                fire, _, version, job = self._heap[0]
                if version == job.version and jobs.get(job.name) is job:
                    return fire
                heapq.heappop(self._heap)
        return None

    def take_due(self, now: float, jobs: Mapping[str, Job]) -> tuple[list[Due], list[Missed]]:
        """Every tick due at ``now`` (to claim) and every tick reached too late."""
        due: list[Due] = []
        missed: list[Missed] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, _, version, job = heapq.heappop(self._heap)
                if version != job.version or jobs.get(job.name) is not job:
                    continue
                self._plan(job, now, due, missed)
        return due, missed

    def _schedule(self, job: Job, fire: float | None) -> None:
        job.next_fire = fire
        job.version += 1
        if fire is not None:
            heapq.heappush(self._heap, (fire, next(self._seq), job.version, job))

    def _plan(self, job: Job, now: float, due: list[Due], missed: list[Missed]) -> None:
        trigger = job.trigger
        tick = job.next_fire
        assert tick is not None
        following = trigger.next_after(tick)
        skipped_over = 0
        newest_skipped = tick
        if following is not None and following <= now:
            # This instance fell behind (paused, suspended, overloaded): never catch up with a
            # burst; only the newest due tick may still run.
            latest = trigger.previous(now) or following
            latest = max(latest, following)
            skipped_over = _count(trigger, tick, latest)
            newest_skipped = trigger.previous(math.nextafter(latest, -math.inf)) or tick
            tick = latest
            following = trigger.next_after(tick)
        # A tick that was within its grace when the job was activated (start(), add()) is
        # judged at that moment: a slow start must not turn it into a miss.
        reference = now
        if job.activated_at is not None:
            if not skipped_over and tick <= job.activated_at:
                reference = job.activated_at
            job.activated_at = None
        if reference - tick <= job.grace_for(tick, following):
            if skipped_over:
                missed.append(Missed(job, newest_skipped, skipped_over))
            due.append(Due(job, tick, following))
        else:
            missed.append(Missed(job, tick, skipped_over + 1))
        self._schedule(job, following)


def _count(trigger: Trigger, first: float, latest: float) -> int:
    """Ticks in ``[first, latest)``."""
    if isinstance(trigger, IntervalTrigger):
        return max(1, round((latest - first) / trigger.seconds))
    count = 0
    tick: float | None = first
    while tick is not None and tick < latest and count < _MAX_COUNT:
        count += 1
        tick = trigger.next_after(tick)
    return count
