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
rows of one run at once, so rows of a run never go back in time. A writer takes every row due
(at most :data:`BATCH`) and, where the coordinator stores several rows in one round trip
(``record_runs``), writes them in one call: the ``claimed`` rows of a tick won with many jobs
cost one write, not one each (with 8 instances × 200 jobs on PostgreSQL, history writes were
the largest part of the dispatch lag). A ``claimed`` row is written before its run may start –
by a writer, or by the worker taking the run (:meth:`settle`, which takes the other due rows
along) – and a ``running`` row waits :data:`PRESTART_DELAY` so that a short run's final row
replaces it. A row may therefore be written shortly after its event is emitted;
:meth:`Scheduler.wait_idle` waits until every row is written, :meth:`Scheduler.stop` up to 5 s
(rows the coordinator has not taken by then are dropped with a warning).
Outside :meth:`Scheduler.start` (``run_pending()``) rows are written on the spot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .. import _observe
from .._protocol import KeepsHistory, RunRecord
from .claims import WHOLE_BATCH_ERRORS, claim_key
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
#: Seconds a ``running`` row waits before a writer takes it: a ``running`` row of a run that
#: ends within them is replaced by the final row (one write instead of two).
PRESTART_DELAY = 0.1
#: Most rows one write carries, where the coordinator takes several at once
#: (:class:`~coordlock._protocol.RecordsMany`).
BATCH = 64


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
        if not _observe.observers and not self.bus.wants(kind, reason):
            return  # nobody would see it
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
        self.enqueue(record, PRESTART_DELAY if status == RUNNING else 0.0)

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
        """Make sure the newest row of ``run_id`` is written: write it now if it still waits
        (with every other row due, in one batch), or wait for the writer that is writing it.
        A worker calls this before a run may start, so that a won tick is on record
        (``claimed``) before anything of it runs."""
        if self.history is None:
            return
        with self._writes:
            while run_id in self._inflight:
                self._writes.wait()
            if run_id not in self._pending and run_id not in self._later:
                return
            batch = self._take(run_id)
        self._write_batch(batch)

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

    def _many(self) -> Callable[[Sequence[RunRecord]], None] | None:
        """The coordinator's ``record_runs`` (several rows in one call), ``None`` without."""
        many = getattr(self.history, "record_runs", None)
        return many if callable(many) else None

    def _take(self, first: str | None = None) -> list[RunRecord]:
        """With the lock held: ``first``'s row (if given), then the due rows of runs not being
        written, oldest first, at most :data:`BATCH` (one row where the coordinator writes
        rows one at a time: a worker waiting for its ``claimed`` row must not wait behind
        other runs' rows); marks their runs in flight."""
        limit = BATCH if self._many() is not None else 1
        batch: list[RunRecord] = []
        if first is not None:
            record = self._pending.pop(first, None)
            if record is None:
                record = self._later.pop(first)[1]
            batch.append(record)
        for run_id in list(self._pending):
            if len(batch) >= limit:
                break
            if run_id not in self._inflight and run_id != first:
                batch.append(self._pending.pop(run_id))
        if len(batch) < limit:
            now = time.monotonic()
            hurry = self._flushing or self._writer_stop
            for run_id, (due, record) in list(self._later.items()):
                if len(batch) >= limit or (due > now and not hurry):
                    break  # (oldest first: the rest are due later still)
                if run_id not in self._inflight:
                    del self._later[run_id]
                    batch.append(record)
        self._inflight.update(record.run_id for record in batch)
        return batch

    def _next(self) -> list[RunRecord] | None:
        """The next rows to write (lock held), at most :data:`BATCH`; ``None`` to stop."""
        while True:
            batch = self._take()
            if batch:
                return batch
            if self._writer_stop and not self._pending and not self._later:
                return None
            due = next((d for r, (d, _) in self._later.items() if r not in self._inflight), None)
            self._writes.wait(None if due is None else max(0.0, due - time.monotonic()))

    def _serve(self) -> None:
        while True:
            with self._writes:
                batch = self._next()
                if batch is None:
                    return  # stopping, nothing left
            self._write_batch(batch)

    def _write_batch(self, batch: list[RunRecord]) -> None:
        """Write ``batch`` (its runs are marked in flight): in one call where the coordinator
        takes several rows at once, else row by row; then let the next rows of its runs go."""
        try:
            many = self._many()
            if many is None or len(batch) == 1:
                for record in batch:
                    self._write(record)
                return
            try:
                many(batch)
            except WHOLE_BATCH_ERRORS as exc:  # the coordinator cannot be asked: one warning
                log.warning(
                    "scheduler %s: recording %d run(s) failed: %s", self.instance, len(batch), exc
                )
            except Exception as exc:  # a row it refused: write them one by one to find it
                log.info(
                    "scheduler %s: recording %d runs at once failed (%s: %s); writing them one "
                    "by one",
                    self.instance,
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
                for record in batch:
                    self._write(record)
        finally:
            with self._writes:
                self._inflight.difference_update(record.run_id for record in batch)
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
