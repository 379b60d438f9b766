"""Once-per-tick scheduling across instances: :class:`Scheduler` and its parts.

Every instance of an application runs a :class:`Scheduler` with the same jobs; before each
tick every instance asks the coordinator to claim ``f"{job}@{tick_utc_iso}"`` and only the
winner runs it. See ``docs/scheduler.md`` for the exact promise per backend.
"""

from __future__ import annotations

from ._clock import Clock, ManualClock, OffsetClock, SystemClock
from .control import JobStatus
from .events import Event
from .isolation import ChildFailed, JobTimeout
from .job import JobInfo, RunContext, current_run
from .loop import Scheduler
from .triggers import CronTrigger, IntervalTrigger, OnceTrigger, Trigger, tick_key

__all__ = [
    "ChildFailed",
    "Clock",
    "CronTrigger",
    "Event",
    "IntervalTrigger",
    "JobInfo",
    "JobStatus",
    "JobTimeout",
    "ManualClock",
    "OffsetClock",
    "OnceTrigger",
    "RunContext",
    "Scheduler",
    "SystemClock",
    "Trigger",
    "current_run",
    "tick_key",
]
