"""What an instance tells about each tick: events (callbacks and the ``coordlock`` log), the
job's last status (:meth:`Scheduler.jobs`) and run history rows, in one place.

Run history statuses (``RunRecord.status``), in the order one run can go through them:

* ``claimed`` – this instance won the tick's claim and will start it (written right after the
  claim, before the no-overlap lease is asked for);
* ``running`` – the run started; ``finished`` / ``failed`` – how it ended;
* ``skipped`` – won but not started here (``error`` says why: ``running``,
  ``coordinator-error``, ``stopping``);
* ``stuck`` – past its timeout, or its instance vanished while it ran;
* ``missed`` – its instance vanished between winning the claim and starting the run.

Recording the same ``run_id`` again updates the row, so one run is one row.
"""

from __future__ import annotations

import logging
import threading

from .._protocol import KeepsHistory, RunRecord
from .claims import claim_key
from .events import Event, EventBus
from .job import Job
from .triggers import tick_datetime, tick_key

log = logging.getLogger("coordlock")

CLAIMED = "claimed"
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
SKIPPED = "skipped"
STUCK = "stuck"
MISSED = "missed"
#: Every run history status the scheduler writes.
STATUSES = (CLAIMED, RUNNING, FINISHED, FAILED, SKIPPED, STUCK, MISSED)


class Reporter:
    """Emits events, notes job status and writes history for one scheduler instance.

    History writes that fail are logged at WARNING and never raised: a run is not held up
    because its row could not be written.
    """

    def __init__(self, instance: str, bus: EventBus, lock: threading.RLock) -> None:
        self.instance = instance
        self.bus = bus
        self._lock = lock
        self.history: KeepsHistory | None = None

    def event(
        self,
        kind: str,
        job: Job,
        tick: float,
        *,
        reason: str | None = None,
        error: str | None = None,
        exception: BaseException | None = None,
        run_id: str | None = None,
        duration: float | None = None,
        attempts: int = 0,
        count: int = 1,
    ) -> None:
        """Emit an event about ``tick`` (epoch seconds) of ``job``."""
        self.bus.emit(
            Event(
                kind=kind,
                job=job.name,
                tick=tick_datetime(tick),
                key=claim_key(job.name, tick),
                instance=self.instance,
                reason=reason,
                error=error,
                exception=exception,
                run_id=run_id,
                duration=duration,
                attempts=attempts,
                count=count,
            )
        )

    def note(self, job: Job, tick: float, status: str, error: str | None = None) -> None:
        """Remember ``status`` as the job's last outcome (shown by :meth:`Scheduler.jobs`)."""
        with self._lock:
            job.note(tick, status, error)

    def row(
        self,
        run_id: str,
        job: str,
        tick: float,
        started: float,
        status: str,
        *,
        finished: float | None = None,
        error: str | None = None,
    ) -> None:
        """Write (or update) the history row of ``run_id``, where history is kept."""
        self.record(
            RunRecord(
                run_id=run_id,
                job=job,
                tick=tick_key(tick),
                instance=self.instance,
                started=started,
                finished=finished,
                status=status,
                error=error,
            )
        )

    def record(self, record: RunRecord) -> None:
        """Write ``record`` as it is (the watchdog rewrites rows of other instances)."""
        history = self.history
        if history is None:
            return
        try:
            history.record_run(record)
        except Exception as exc:
            log.warning(
                "scheduler %s: recording run %s (%s) failed: %s",
                self.instance,
                record.run_id,
                record.status,
                exc,
            )
