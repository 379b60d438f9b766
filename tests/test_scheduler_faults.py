"""Scheduler under faults: every outcome is reported, never silent (issue 10's scheduler rows).

* a run whose no-overlap lease is lost stops retrying and ends ``failed(lease-lost)``;
* a process job never outlives its scheduler (SIGKILL, SIGSTOP) nor its own timeout;
* a job name the backend cannot store is refused at ``add()``, and one bad key never makes the
  other jobs of a tick skip;
* the liveness lease is taken again after a loss;
* a tick claimed by an instance that vanished before starting it is reported ``missed``.

memory:// with injected clocks; child processes where a process must die.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordlock import BackendUnavailable, Scheduler
from coordlock._lease import Lease
from coordlock._protocol import RunRecord
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import Event, ManualClock, current_run
from coordlock.testing.contract import eventually

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
TICK = "2023-11-14T22:13:20Z"
TESTS = Path(__file__).resolve().parent


class Recorder:
    """Collects scheduler events (thread-safe)."""

    def __init__(self, *scheds: Scheduler) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        for sched in scheds:
            sched.on("*", self)

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: str, reason: str | None = None) -> list[Event]:
        with self._lock:
            return [
                e for e in self.events if e.kind == kind and (reason is None or e.reason == reason)
            ]


class ServerClock:
    """The memory backend's clock (judges expiry): real time plus a jump the test makes, to
    play a server that forgot leases (their TTL ran out there)."""

    def __init__(self) -> None:
        self.jump = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.jump


class Spy(MemoryCoordinator):
    """Records the leases it grants and every history write (in order)."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.leases: list[Lease] = []
        self.writes: list[tuple[str, str, str]] = []  # (run_id, status, "acquire"…)

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        lease = super().acquire(name, ttl, wait=wait, renew=renew)
        if lease is not None:
            self.leases.append(lease)
            self.writes.append(("", "acquire", name))
        return lease

    def record_run(self, run: RunRecord) -> None:
        self.writes.append((run.run_id, run.status, run.job))
        super().record_run(run)

    def job_leases(self) -> list[Lease]:
        return [lease for lease in self.leases if lease.name.startswith("coordlock:job:")]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def stopper() -> Iterator[list[Scheduler]]:
    started: list[Scheduler] = []
    yield started
    for sched in started:
        sched.stop(wait=False)


def noop() -> None:
    pass


# -- row 5: a lost no-overlap lease stops retries and fails the run ----------------------------


def test_retries_stop_once_the_no_overlap_lease_is_lost(clock: ManualClock) -> None:
    name = f"lost-{uuid.uuid4().hex}"
    server = ServerClock()
    coord = Spy(name, clock=server)
    other = MemoryCoordinator(name, clock=server)
    sched = Scheduler(coord, clock=clock, instance_id="holder")
    rec = Recorder(sched)
    attempts: list[int] = []
    taken_over: list[Lease] = []

    def job() -> None:
        ctx = current_run()
        assert ctx is not None
        attempts.append(ctx.attempt)
        if ctx.attempt > 1:
            return  # a retry would succeed: it must not happen
        (lease,) = coord.job_leases()
        server.jump += 3600  # the server forgets the lease (its TTL ran out there) ...
        stolen = other.acquire("coordlock:job:flaky", 30)  # ... and another owner takes it
        assert stolen is not None
        taken_over.append(stolen)
        assert eventually(lambda: lease.lost, within=10), "the renewal never noticed the loss"
        raise OSError("write rejected: stale fence")

    sched.every(10, name="flaky", retries=3, backoff=0, lease_ttl=0.6)(job)
    sched.run_pending()
    assert attempts == [1]
    assert rec.of("finished") == []
    (failed,) = rec.of("failed")
    assert failed.reason == "lease-lost" and failed.attempts == 1
    assert "no-overlap lease lost during the run" in (failed.error or "")
    assert "OSError: write rejected" in (failed.error or "")
    assert "retries stopped" in (failed.error or "")
    (record,) = coord.history("flaky")
    assert record.status == "failed" and "lease lost" in (record.error or "")
    taken_over[0].release()


def test_a_run_that_returns_after_losing_its_lease_is_failed(clock: ManualClock) -> None:
    """Even without retries: the run may have overlapped another, so it is not ``finished``."""
    name = f"lost-{uuid.uuid4().hex}"
    server = ServerClock()
    coord = Spy(name, clock=server)
    sched = Scheduler(coord, clock=clock)
    rec = Recorder(sched)

    def job() -> None:
        (lease,) = coord.job_leases()
        server.jump += 3600
        assert eventually(lambda: lease.lost, within=10)

    sched.every(10, name="quiet", lease_ttl=0.6)(job)
    sched.run_pending()
    assert rec.of("finished") == []
    (failed,) = rec.of("failed")
    assert failed.reason == "lease-lost" and failed.exception is None


def test_retries_still_happen_while_the_lease_holds(clock: ManualClock) -> None:
    sched = Scheduler(MemoryCoordinator(f"r-{uuid.uuid4().hex}"), clock=clock)
    rec = Recorder(sched)
    attempts: list[int] = []

    def job() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("transient")

    sched.every(10, name="j", retries=3, backoff=0)(job)
    sched.run_pending()
    (finished,) = rec.of("finished")
    assert finished.attempts == 3 and finished.reason is None


# -- row 7: names the backend cannot store; one bad key never skips the others -----------------


def test_add_refuses_names_whose_claim_key_cannot_be_stored() -> None:
    sched = Scheduler(MemoryCoordinator(f"n-{uuid.uuid4().hex}"))
    longest = "n" * 484  # + "@" + a 27-character tick = 512
    assert sched.add(noop, 10, name=longest) == longest
    with pytest.raises(ValueError, match="at most 484"):
        sched.add(noop, 10, name="n" * 485)
    with pytest.raises(ValueError, match="surrogate"):
        sched.add(noop, 10, name="bad\udcff")
    with pytest.raises(ValueError, match="surrogate"):
        sched.every(10, name="x\ud800y")  # at the decorator line
    with pytest.raises(ValueError, match="at most 484"):
        sched.cron("* * * * *", name="c" * 600)
    with pytest.raises(ValueError, match="surrogate"):
        Scheduler(instance_id="me\udcff")
    with pytest.raises(ValueError, match="at most"):
        Scheduler(instance_id="i" * 500)
    assert [j.name for j in sched.jobs()] == [longest]


class Picky(MemoryCoordinator):
    """A backend with a rule of its own about keys: refuses a batch holding a key it cannot
    store (as SQLite, Redis, PostgreSQL and ZooKeeper refuse a lone surrogate)."""

    def __init__(self, name: str, *, down: bool = False) -> None:
        super().__init__(name)
        self.batches: list[int] = []
        self.down = down

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        keys = list(keys)
        self.batches.append(len(keys))
        if self.down:
            raise BackendUnavailable("server down (simulated)")
        bad = [k for k in keys if k.startswith("bad")]
        if bad:
            raise ValueError(f"key {bad[0]!r} cannot be stored here")
        return super().claim_many(keys, hold)


def test_one_bad_key_never_makes_the_other_jobs_of_a_tick_skip(clock: ManualClock) -> None:
    coord = Picky(f"p-{uuid.uuid4().hex}")
    sched = Scheduler(coord, clock=clock)
    rec = Recorder(sched)
    ran: list[str] = []
    for i in range(16):
        sched.add(lambda i=i: ran.append(f"good{i}"), 10, name=f"good{i}")
    sched.add(lambda: ran.append("bad"), 10, name="bad-one")
    assert sched.run_pending() == 16
    assert sorted(ran) == sorted(f"good{i}" for i in range(16))
    (skipped,) = rec.of("skipped", "coordinator-error")
    assert skipped.job == "bad-one" and "cannot be stored here" in (skipped.error or "")
    assert coord.batches[0] == 17  # one batch first; split only because it failed
    assert len(coord.batches) <= 2 * 5 + 1  # halving: about 2 * log2(17) calls, not 17
    # a healthy tick is one round trip again
    coord.batches.clear()
    sched.remove("bad-one")
    clock.set(T0 + 10)
    assert sched.run_pending() == 16
    assert coord.batches == [16]


def test_a_server_error_fails_the_whole_batch_without_splitting(clock: ManualClock) -> None:
    coord = Picky(f"p-{uuid.uuid4().hex}", down=True)
    sched = Scheduler(coord, clock=clock)
    rec = Recorder(sched)
    for i in range(8):
        sched.add(noop, 10, name=f"j{i}")
    assert sched.run_pending() == 0
    assert coord.batches == [8]  # not split: each split would wait out the retries again
    assert len(rec.of("skipped", "coordinator-error")) == 8


# -- row 11: the liveness lease is taken again after a loss ------------------------------------


def test_liveness_lease_is_taken_again_after_a_loss(
    clock: ManualClock, stopper: list[Scheduler]
) -> None:
    name = f"live-{uuid.uuid4().hex}"
    server = ServerClock()
    coord = MemoryCoordinator(name, clock=server)
    a = Scheduler(coord, clock=clock, instance_id="a", heartbeat_ttl=0.6)
    watcher = Scheduler(MemoryCoordinator(name, clock=server), clock=clock, instance_id="w")
    rec = Recorder(watcher)
    gate = threading.Event()
    a.every(10, name="long", overlap=True)(lambda: gate.wait(30))
    clock.set(T0 - 0.5)
    a.start()
    stopper.append(a)
    clock.set(T0)
    assert eventually(lambda: any(r.status == "running" for r in coord.history("long")), 10)

    def holder() -> str | None:
        return next((i.owner for i in coord.locks() if i.name == "coordlock:instance:a"), None)

    first = holder()
    assert first is not None
    server.jump += 3600  # the server forgets every lease: a's liveness lease is lost
    assert eventually(lambda: holder() not in (None, first), within=10), (
        "the liveness lease was not taken again"
    )
    watcher.run_pending()  # resolves its coordinator
    assert watcher.scan_history() == 0
    assert rec.of("stuck") == []
    assert [r.status for r in coord.history("long")] == ["running"]
    gate.set()
    assert a.wait_idle(10)


# -- row 13: a claimed tick that never runs is reported missed ----------------------------------


def test_a_won_tick_is_recorded_as_claimed_before_the_lease_and_the_run(
    clock: ManualClock,
) -> None:
    coord = Spy(f"c-{uuid.uuid4().hex}")
    sched = Scheduler(coord, clock=clock)
    seen: list[str] = []
    sched.every(10, name="job")(lambda: seen.extend(r.status for r in coord.history("job")))
    sched.run_pending()
    assert seen == ["running"]  # the claimed row became the run's row: one row per run
    statuses = [status for _, status, what in coord.writes if what in ("job", "coordlock:job:job")]
    assert statuses == ["claimed", "acquire", "running", "finished"]
    (record,) = coord.history("job")
    assert record.status == "finished" and record.tick == TICK


def test_a_won_tick_skipped_here_is_not_left_claimed(
    clock: ManualClock, stopper: list[Scheduler]
) -> None:
    name = f"s-{uuid.uuid4().hex}"
    coord = MemoryCoordinator(name)
    blocker = MemoryCoordinator(name).acquire("coordlock:job:busy", 30)
    assert blocker is not None  # a run of "busy" still going somewhere
    sched = Scheduler(coord, clock=clock)
    sched.every(10, name="busy", grace=0)(noop)
    sched.run_pending()
    (record,) = coord.history("busy")
    assert record.status == "skipped" and record.error == "running"
    blocker.release()


def _plant(coord: MemoryCoordinator, instance: str, status: str = "claimed") -> str:
    run_id = uuid.uuid4().hex
    coord.record_run(RunRecord(run_id, "job", TICK, instance, T0 + 0.01, status=status))
    return run_id


def test_watchdog_reports_a_tick_claimed_by_a_vanished_instance_as_missed(
    clock: ManualClock, caplog: pytest.LogCaptureFixture, stopper: list[Scheduler]
) -> None:
    name = f"m-{uuid.uuid4().hex}"
    coord = MemoryCoordinator(name)
    alive = Scheduler(MemoryCoordinator(name), clock=clock, instance_id="alive", heartbeat_ttl=5)
    alive.every(3600, name="other")(noop)
    alive.start()
    stopper.append(alive)
    ghost_run = _plant(coord, "ghost")
    alive_run = _plant(coord, "alive")
    watchers = [
        Scheduler(MemoryCoordinator(name), clock=clock, instance_id=f"w{i}") for i in range(2)
    ]
    rec = Recorder(*watchers)
    for w in watchers:
        w.every(3600, name="job", grace=2)(noop)  # not due at T0: only the planted rows
    clock.set(T0 + 1)  # still within the tick's grace: the ghost might yet start it
    watchers[0].run_pending()
    assert watchers[0].scan_history() == 0
    clock.set(T0 + 5)
    caplog.set_level(logging.WARNING, logger="coordlock")
    assert watchers[0].scan_history() == 1
    watchers[1].run_pending()
    assert watchers[1].scan_history() == 0  # one verdict, one report
    runs = {r.run_id: r for r in coord.history("job", 100)}
    assert runs[ghost_run].status == "missed"
    assert "ghost" in (runs[ghost_run].error or "") and "vanished" in (runs[ghost_run].error or "")
    assert runs[alive_run].status == "claimed"  # a live instance's claim is its own business
    (missed,) = rec.of("missed", "instance-vanished")
    assert missed.key == f"job@{TICK}" and missed.run_id == ghost_run
    assert missed.instance == "w0"
    assert any("missed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_restarted_instance_reports_what_its_previous_process_left(clock: ManualClock) -> None:
    name = f"rs-{uuid.uuid4().hex}"
    coord = MemoryCoordinator(name)
    left = _plant(coord, "web-1")
    stuck = _plant(coord, "web-1", status="running")
    clock.set(T0 + 30)
    again = Scheduler(coord, clock=clock, instance_id="web-1")  # same id, new process
    rec = Recorder(again)
    again.run_pending()
    assert again.scan_history() == 2
    runs = {r.run_id: r.status for r in coord.history("job")}
    assert runs == {left: "missed", stuck: "stuck"}
    assert len(rec.of("missed", "instance-vanished")) == 1


# -- row 6: a process job never outlives its scheduler -------------------------------------------


def beating_child(directory: str) -> None:
    """A process job: writes its pid, then a heartbeat file every 50 ms for up to 2 minutes."""
    Path(directory, "pid").write_text(str(os.getpid()))
    beat = Path(directory, "beat")
    for _ in range(2400):
        beat.write_text(str(time.time()))
        time.sleep(0.05)


SCHEDULER_WITH_A_PROCESS_JOB = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from coordlock.scheduler import Scheduler
    import test_scheduler_faults as t
    sched = Scheduler("memory://victim", instance_id="victim")
    sched.add(t.beating_child, 1, name="orphan", isolation="process", timeout={timeout},
              args=({directory!r},))
    sched.start()
    time.sleep(300)
    """
)

RUN_IN_PROCESS_WITHOUT_PDEATHSIG = textwrap.dedent(
    """
    import sys, time
    from datetime import datetime, timezone
    sys.path.insert(0, {tests!r})
    from coordlock.scheduler.isolation import ChildRegistry, make_context, run_in_process
    from coordlock.scheduler import RunContext
    import test_scheduler_faults as t
    ctx = RunContext("orphan", datetime.now(timezone.utc), "orphan@x", "victim", "r", 1, None)
    run_in_process(t.beating_child, ({directory!r},), {{}}, ctx, timeout=None,
                   context=make_context(None), registry=ChildRegistry(), pdeathsig=False)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _spawn(script: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``script``; return it and the pid of the job process it starts."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL)
    pid_file = tmp_path / "pid"
    if not eventually(pid_file.exists, within=60):
        proc.kill()
        pytest.fail("the job process did not start")
    return proc, int(pid_file.read_text())


def _reap(proc: subprocess.Popen[bytes], child: int) -> None:
    for pid in (proc.pid, child):
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


@pytest.mark.fault
def test_a_process_job_dies_with_its_scheduler_on_sigkill(tmp_path: Path) -> None:
    script = SCHEDULER_WITH_A_PROCESS_JOB.format(
        tests=str(TESTS), directory=str(tmp_path), timeout=600
    )
    proc, child = _spawn(script, tmp_path)
    try:
        assert _alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert eventually(lambda: not _alive(child), within=10), (
            f"job process {child} outlived its SIGKILLed scheduler"
        )
    finally:
        _reap(proc, child)


@pytest.mark.fault
def test_without_the_death_signal_the_parent_pipe_ends_the_child(tmp_path: Path) -> None:
    """The portable path alone (no prctl): the child sees its scheduler's pipe close."""
    script = RUN_IN_PROCESS_WITHOUT_PDEATHSIG.format(tests=str(TESTS), directory=str(tmp_path))
    proc, child = _spawn(script, tmp_path)
    try:
        assert _alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert eventually(lambda: not _alive(child), within=10), (
            f"job process {child} outlived its scheduler (pipe watch)"
        )
    finally:
        _reap(proc, child)


@pytest.mark.fault
def test_a_process_job_ends_at_its_timeout_while_its_scheduler_is_frozen(tmp_path: Path) -> None:
    script = SCHEDULER_WITH_A_PROCESS_JOB.format(
        tests=str(TESTS), directory=str(tmp_path), timeout=2
    )
    proc, child = _spawn(script, tmp_path)
    try:
        proc.send_signal(signal.SIGSTOP)  # the scheduler cannot kill it at the timeout now
        assert eventually(lambda: not _alive(child), within=15), (
            f"job process {child} ran past its timeout while its scheduler was frozen"
        )
    finally:
        _reap(proc, child)


# -- history writers: a coordinator that stops taking rows does not hold up stop() --------------


class SlowHistory(MemoryCoordinator):
    """Claims and leases answer at once; every history write hangs for a second, and rows
    are taken one at a time (a backend without ``record_runs``)."""

    record_runs = None  # (the scheduler writes row by row)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.writing = 0
        self.most_at_once = 0
        self.count = threading.Lock()

    def record_run(self, run: RunRecord) -> None:
        with self.count:
            self.writing += 1
            self.most_at_once = max(self.most_at_once, self.writing)
        time.sleep(1.0)
        with self.count:
            self.writing -= 1
        super().record_run(run)


def test_stop_drops_rows_a_stalled_coordinator_does_not_take(
    caplog: pytest.LogCaptureFixture,
) -> None:
    coord = SlowHistory(f"slow-{uuid.uuid4().hex}")
    clock = ManualClock(T0 - 0.5)
    sched = Scheduler(coord, clock=clock, shutdown_grace=1)
    ran: list[str] = []
    for i in range(30):
        sched.every(10, name=f"j{i}", overlap=True)(lambda i=i: ran.append(f"j{i}"))
    sched.start()
    clock.set(T0)
    assert eventually(lambda: len(ran) == 30, 30)
    # row by row, the workers write their own claimed rows beside the 2 writers (none waits
    # for a writer going through other runs' rows)
    assert coord.most_at_once > 2
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        sched.stop()  # 30 runs' rows at 1 s each on 2 writers would take 15 s: it gives up
    assert any("history row(s) not written" in r.getMessage() for r in caplog.records)
    rows = MemoryCoordinator(coord.name).history(None, 100)
    finished = [r for r in rows if r.status == "finished"]
    assert len(finished) < 30  # final rows not taken in time were dropped, not waited for
    assert {r.job for r in rows} >= {f"j{i}" for i in range(30)}  # every claim is on record
