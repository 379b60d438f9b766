"""The scheduler's history writers: rows queued together go in one ``record_runs`` call, a
refused batch is written row by row, a coordinator that cannot be asked costs one warning."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence

import pytest

from coordlock import BackendUnavailable, Scheduler
from coordlock._protocol import RunRecord
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import ManualClock
from coordlock.scheduler.control import REGISTERED
from coordlock.scheduler.report import BATCH
from coordlock.testing.contract import eventually

T0 = 1_700_000_000.0
JOBS = 40


class CountingHistory(MemoryCoordinator):
    """Counts history calls of run rows; ``fail`` makes ``record_runs`` raise it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.singles = 0
        self.batches: list[int] = []
        self.fail: BaseException | None = None
        self.delay = 0.0  # seconds each call takes (a round trip)
        self.calls = threading.Lock()

    def record_run(self, run: RunRecord) -> None:
        if run.status != REGISTERED:  # (the job registry's rows are written one by one)
            with self.calls:
                self.singles += 1
        time.sleep(self.delay)
        super().record_run(run)

    def record_runs(self, runs: Sequence[RunRecord]) -> None:
        with self.calls:
            self.batches.append(sum(1 for run in runs if run.status != REGISTERED))
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        super().record_runs(runs)


def _tick_of_many(coord: CountingHistory) -> Scheduler:
    """A scheduler that won and ran a tick of JOBS jobs (overlap=True: history rows only)."""
    clock = ManualClock(T0 - 0.5)
    sched = Scheduler(coord, clock=clock, instance_id="me", max_workers=4)
    ended: list[str] = []
    sched.on("finished", lambda event: ended.append(event.job))
    for i in range(JOBS):
        sched.every(10, name=f"j{i}", overlap=True)(lambda: None)
    sched.start()
    clock.set(T0)
    assert eventually(lambda: len(ended) == JOBS, within=20)
    return sched


def _statuses(coord: MemoryCoordinator) -> list[str]:
    """The statuses of the run rows (not the job registry's rows)."""
    rows = MemoryCoordinator(coord.name).history(None, 1000)
    return sorted(r.status for r in rows if r.status != REGISTERED)


def test_rows_queued_together_go_in_few_calls() -> None:
    coord = CountingHistory(f"batch-{uuid.uuid4().hex}")
    coord.delay = 0.02  # rows queue up while a write is on its way
    sched = _tick_of_many(coord)
    try:
        assert sched.wait_idle(20)
    finally:
        sched.stop()
    assert _statuses(coord) == ["finished"] * JOBS  # every run on record, final status
    writes = coord.singles + len(coord.batches)
    rows = coord.singles + sum(coord.batches)
    # a claimed and a final row per run, but far fewer calls than rows
    assert rows >= 2 * JOBS and writes <= rows / 3, (coord.singles, coord.batches)
    assert max(coord.batches) <= BATCH


def test_a_refused_batch_is_written_row_by_row(caplog: pytest.LogCaptureFixture) -> None:
    coord = CountingHistory(f"batch-{uuid.uuid4().hex}")
    coord.fail = ValueError("a row this backend cannot store")
    with caplog.at_level(logging.INFO, logger="coordlock"):
        sched = _tick_of_many(coord)
        try:
            assert sched.wait_idle(20)
        finally:
            sched.stop()
    assert coord.batches, "no batch was tried"
    assert _statuses(coord) == ["finished"] * JOBS  # nothing lost
    assert coord.singles >= sum(coord.batches)  # each refused batch went row by row
    assert any("writing them one by one" in r.getMessage() for r in caplog.records)


def test_a_coordinator_that_cannot_be_asked_costs_one_warning_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    coord = CountingHistory(f"batch-{uuid.uuid4().hex}")
    coord.fail = BackendUnavailable("down")
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        sched = _tick_of_many(coord)
        try:
            assert eventually(lambda: sum(coord.batches) + coord.singles >= 2 * JOBS, within=20)
            assert sched.wait_idle(20)
        finally:
            sched.stop()
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == len(coord.batches)  # one per call, not one per row
    assert any(n > 1 for n in coord.batches)
    assert coord.singles < JOBS  # batches were not retried row by row


class RowByRow(MemoryCoordinator):
    """History written one row at a time (no ``record_runs``); writes of runs in ``hold``
    wait until ``release`` is set."""

    record_runs = None

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.hold: set[str] = set()
        self.release = threading.Event()
        self.written: list[tuple[str, str]] = []  # (thread name, run_id)

    def record_run(self, run: RunRecord) -> None:
        if run.run_id in self.hold:
            self.release.wait(10)
        self.written.append((threading.current_thread().name, run.run_id))
        super().record_run(run)


def test_row_by_row_a_worker_writes_only_its_own_row() -> None:
    """Where rows go one per call, settle() writes the row of its own run and leaves the
    others to the writers: a run never waits for other runs' round trips."""
    from coordlock.scheduler.events import EventBus
    from coordlock.scheduler.report import Reporter

    history = RowByRow(f"rows-{uuid.uuid4().hex}")
    report = Reporter("me", EventBus(), threading.RLock())
    report.history = history
    history.hold = {"r0", "r1"}
    report.start_writer("test-writer")
    try:
        for i in range(6):
            report.row(f"r{i}", "job", T0, T0, "claimed")
        # both writers are stuck on r0 and r1; r2..r5 wait
        assert eventually(lambda: len(report._inflight) == 2, within=10)
        report.settle("r4")
        assert history.written == [(threading.current_thread().name, "r4")]
    finally:
        history.release.set()
        report.stop_writer(10)
    assert sorted(run for _, run in history.written) == [f"r{i}" for i in range(6)]
