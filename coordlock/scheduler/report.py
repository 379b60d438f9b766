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

While the scheduler runs, rows are handed to background writer threads instead of being
written on the spot: a tick won with many jobs would otherwise make the loop wait for one
history round trip per won job before the last of them is dispatched (measured: 200 won jobs
held the last run back by 130–240 ms on Redis). The writers keep one pending row per run (a
newer status replaces a pending older one), write the runs oldest first, and never write two
rows of one run at once, so rows of a run never go back in time. A ``claimed`` row is written
before its run may start – by a writer, or by the worker taking the run (:meth:`settle`) –
and a ``running`` row waits :data:`PRESTART_DELAY` so that a short run's final row replaces
it. A row may therefore be written shortly after its event is emitted;
:meth:`Scheduler.wait_idle` waits until every row is written, :meth:`Scheduler.stop` up to 5 s
(rows the coordinator has not taken by then are dropped with a warning).
Outside :meth:`Scheduler.start` (``run_pending()``) rows are written on the spot.
"""

from __future__ import annotations

import logging
import threading
import time

from .. import _observe
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
#: Background writer threads per scheduler (rows of different runs are written in parallel).
WRITERS = 2
#: Seconds a ``claimed`` or ``running`` row waits before a writer takes it: a ``running`` row
#: of a run that ends within them is replaced by the final row (one write instead of two); a
#: ``claimed`` row is written by the worker itself before the run may start, if still waiting.
PRESTART_DELAY = 0.1


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
        self._writes = threading.Condition(threading.Lock())
        self._pending: dict[str, RunRecord] = {}  # run_id → newest row not yet written
        #: claimed/running rows waiting PRESTART_DELAY: run_id → (due, row), oldest first
        self._later: dict[str, tuple[float, RunRecord]] = {}
        self._flushing = 0
        self._inflight: set[str] = set()  # run_ids being written right now
        self._writers: list[threading.Thread] = []
        self._writer_stop = False

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
        """Emit an event about ``tick`` (epoch seconds) of ``job`` (to the subscribers and to
        the metrics exporters, when any is enabled)."""
        event = Event(
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
        self.emit(event)

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the metrics exporters (when any is enabled) and the subscribers."""
        if _observe.observers:
            _observe.scheduler_event(event)
        self.bus.emit(event)

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
        result: str | None = None,
    ) -> None:
        """Write (or update) the history row of ``run_id``, where history is kept: by the
        background writers while they run, else now."""
        if self.history is None:
            return
        record = RunRecord(
            run_id=run_id,
            job=job,
            tick=tick_key(tick),
            instance=self.instance,
            started=started,
            finished=finished,
            status=status,
            error=error,
            result=result,
        )
        self.enqueue(record, PRESTART_DELAY if status in (CLAIMED, RUNNING) else 0.0)

    def enqueue(self, record: RunRecord, delay: float = 0.0) -> None:
        """Hand ``record`` to the background writers while they run (to be written after
        ``delay`` seconds unless a newer row of the run replaces it), else write it now."""
        run_id = record.run_id
        with self._writes:
            if self._writers:
                self._pending.pop(run_id, None)  # queued again at the end, newest status
                self._later.pop(run_id, None)
                if delay > 0:
                    self._later[run_id] = (time.monotonic() + delay, record)
                else:
                    self._pending[run_id] = record
                self._writes.notify_all()
                return
        self.record(record)

    def record(self, record: RunRecord) -> None:
        """Write ``record`` now (the watchdog rewrites rows of other instances): after a write
        of the same run in progress, and instead of a row of it still pending."""
        if self.history is None:
            return
        with self._writes:
            self._pending.pop(record.run_id, None)
            self._later.pop(record.run_id, None)
            while record.run_id in self._inflight:
                self._writes.wait()
            self._inflight.add(record.run_id)
        try:
            self._write(record)
        finally:
            with self._writes:
                self._inflight.discard(record.run_id)
                self._writes.notify_all()

    def settle(self, run_id: str) -> None:
        """Make sure the newest row of ``run_id`` is written: write it now if it still waits,
        or wait for a writer that is writing it. A worker calls this before a run may start,
        so that a won tick is on record (``claimed``) before anything of it runs."""
        if self.history is None:
            return
        with self._writes:
            record = self._pending.pop(run_id, None)
            if record is None:
                waiting = self._later.pop(run_id, None)
                record = None if waiting is None else waiting[1]
            if record is None:
                while run_id in self._inflight:
                    self._writes.wait()
                return
        self.record(record)

    # -- the background writer --------------------------------------------------------------

    def start_writer(self, name: str) -> None:
        """Start the background writers (where history is kept)."""
        if self.history is None:
            return
        with self._writes:
            if self._writers:
                return
            self._writer_stop = False
            self._writers = [
                threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                for i in range(WRITERS)
            ]
            for writer in self._writers:
                writer.start()

    def flush(self, timeout: float | None) -> bool:
        """Wait until every pending row is written; ``False`` if ``timeout`` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._writes:
            self._flushing += 1  # waiting rows are due now
            self._writes.notify_all()
            try:
                while self._pending or self._later or self._inflight:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._writes.wait(0.1 if remaining is None else min(remaining, 0.1))
            finally:
                self._flushing -= 1
        return True

    def stop_writer(self, timeout: float) -> None:
        """Let the writers write what is pending for up to ``timeout`` seconds, then stop
        them. Rows still pending then (the coordinator is down or very slow) are dropped with
        a warning: stopping must not wait out one retry deadline per row."""
        self.flush(timeout)
        with self._writes:
            writers, self._writers = self._writers, []
            self._writer_stop = True
            left = len(self._pending) + len(self._later)
            self._pending.clear()
            self._later.clear()
            self._writes.notify_all()
        if left:
            log.warning(
                "scheduler %s: %d history row(s) not written before stopping (the coordinator "
                "did not take them within %.1fs)",
                self.instance,
                left,
                timeout,
            )
        for writer in writers:
            if writer is not threading.current_thread():
                writer.join(min(timeout, 1.0))

    def _next(self) -> tuple[str, RunRecord] | None:
        """The next row to write (lock held): a due one, oldest first; ``None`` to stop."""
        while True:
            run_id = next((r for r in self._pending if r not in self._inflight), None)
            if run_id is not None:
                return run_id, self._pending.pop(run_id)
            waiting = next((r for r in self._later if r not in self._inflight), None)
            if waiting is not None:
                due, record = self._later[waiting]
                wait = due - time.monotonic()
                if wait <= 0 or self._flushing or self._writer_stop:
                    del self._later[waiting]
                    return waiting, record
                self._writes.wait(wait)
                continue
            if self._writer_stop and not self._pending and not self._later:
                return None
            self._writes.wait()

    def _serve(self) -> None:
        while True:
            with self._writes:
                found = self._next()
                if found is None:
                    return  # stopping, nothing left
                run_id, record = found
                self._inflight.add(run_id)
            try:
                self._write(record)
            finally:
                with self._writes:
                    self._inflight.discard(run_id)
                    self._writes.notify_all()

    def _write(self, record: RunRecord) -> None:
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
