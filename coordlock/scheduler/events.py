"""Scheduler events: what happened to each tick, for callbacks, the log and run history."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger("coordlock")

STARTED = "started"
FINISHED = "finished"
FAILED = "failed"
SKIPPED = "skipped"
MISSED = "missed"
STUCK = "stuck"

#: Every event kind, in the order a run can produce them.
KINDS = (STARTED, FINISHED, FAILED, SKIPPED, MISSED, STUCK)

#: Why a tick was skipped.
CLAIMED_ELSEWHERE = "claimed-elsewhere"  # another instance won this tick's claim
RUNNING = "running"  # overlap=False and a run of the job is still going (on any instance)
COORDINATOR_ERROR = "coordinator-error"  # the coordinator could not be asked: fail closed
STOPPING = "stopping"  # won, but the scheduler was stopped before the run could start
PAUSED = "paused"  # won, but the job is paused cluster-wide (Scheduler.pause)
REASONS = (CLAIMED_ELSEWHERE, RUNNING, COORDINATOR_ERROR, STOPPING, PAUSED)

#: Why a tick was missed, a run failed or was reported stuck.
LATE = "late"  # missed: this instance reached the tick past its grace (down, paused, starved)
INSTANCE_VANISHED = "instance-vanished"  # missed/stuck: the instance that held it is gone
TIMEOUT = "timeout"  # failed/stuck: the run passed its timeout
LEASE_LOST = "lease-lost"  # failed: the no-overlap lease was lost during the run

_LEVELS = {
    STARTED: logging.INFO,
    FINISHED: logging.INFO,
    FAILED: logging.ERROR,
    MISSED: logging.WARNING,
    STUCK: logging.WARNING,
}
_SKIP_LEVELS = {
    CLAIMED_ELSEWHERE: logging.DEBUG,
    RUNNING: logging.INFO,
    COORDINATOR_ERROR: logging.WARNING,
    STOPPING: logging.WARNING,
    PAUSED: logging.INFO,
}


@dataclass(frozen=True)
class Event:
    """One fact about one tick of one job.

    * ``kind`` – ``started``, ``finished``, ``failed``, ``skipped``, ``missed`` or ``stuck``.
    * ``job`` / ``tick`` – the job name and the tick (an aware UTC datetime); ``key`` is the
      claim key ``f"{job}@{tick_utc_iso}"``.
    * ``instance`` – the scheduler instance that saw it.
    * ``reason`` – for ``skipped``: ``claimed-elsewhere``, ``running``, ``coordinator-error``,
      ``stopping`` or ``paused``; for ``missed``: ``late`` (this instance reached it past its
      grace) or ``instance-vanished`` (the instance that won its claim vanished before starting it);
      for ``failed``: ``timeout``, ``lease-lost`` or ``None`` (the job raised); for ``stuck``:
      ``timeout`` or ``instance-vanished``.
    * ``error`` – the exception text for ``failed``/``coordinator-error``; ``exception`` the
      exception object where there is one (``None`` for a child process).
    * ``run_id``, ``duration`` (real seconds), ``attempts`` – for runs.
    * ``count`` – for ``missed``: how many consecutive ticks this event stands for (the
      scheduler never catches up with a burst; ``tick`` is the newest of them).
    """

    kind: str
    job: str
    tick: datetime | None
    key: str | None
    instance: str
    reason: str | None = None
    error: str | None = None
    exception: BaseException | None = None
    run_id: str | None = None
    duration: float | None = None
    attempts: int = 0
    count: int = 1

    def describe(self) -> str:
        """One log line's worth of text."""
        where = self.key or self.job
        parts = [f"{self.kind} {where} on {self.instance}"]
        if self.reason:
            parts.append(f"reason={self.reason}")
        if self.count != 1:
            parts.append(f"count={self.count}")
        if self.duration is not None:
            parts.append(f"duration={self.duration:.3f}s")
        if self.attempts > 1:
            parts.append(f"attempts={self.attempts}")
        if self.error:
            parts.append(f"error={self.error}")
        return " ".join(parts)


Callback = Callable[[Event], object]


def _level(kind: str, reason: str | None) -> int:
    """The log level of an event of ``kind`` (and ``reason``)."""
    if kind == SKIPPED:
        return _SKIP_LEVELS.get(reason or "", logging.INFO)
    return _LEVELS.get(kind, logging.INFO)


def utc(ts: float) -> datetime:
    """An aware UTC datetime for epoch seconds."""
    return datetime.fromtimestamp(ts, timezone.utc)


class EventBus:
    """Callbacks per kind (or ``"*"`` for all). Callback errors are logged, never raised."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callback]] = {kind: [] for kind in (*KINDS, "*")}
        self._lock = threading.Lock()

    def on(self, kind: str, callback: Callback) -> None:
        if not isinstance(kind, str):
            raise TypeError(f"event kind must be a str, not {type(kind).__name__}")
        if kind not in self._callbacks:
            raise ValueError(f"unknown event {kind!r}; known: {', '.join((*KINDS, '*'))}")
        if not callable(callback):
            raise TypeError("event callback must be callable")
        with self._lock:
            self._callbacks[kind].append(callback)

    def wants(self, kind: str, reason: str | None = None) -> bool:
        """Whether an event of ``kind`` (and ``reason``) would reach anyone: a callback, or
        the ``coordlock`` log at its level. An instance that loses most of a crowded tick's
        claims builds no event object for each lost one that nobody reads."""
        if self._callbacks[kind] or self._callbacks["*"]:
            return True
        return log.isEnabledFor(_level(kind, reason))

    def emit(self, event: Event) -> None:
        level = _level(event.kind, event.reason)
        if log.isEnabledFor(level):
            log.log(
                level,
                "job %s",
                event.describe(),
                exc_info=event.exception if event.kind == FAILED else None,
            )
        with self._lock:
            callbacks = [*self._callbacks[event.kind], *self._callbacks["*"]]
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("scheduler event callback %r failed on %s", callback, event.kind)
