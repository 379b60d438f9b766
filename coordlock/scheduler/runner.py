"""Running a won tick: the no-overlap lease, the run (its attempts: :mod:`.attempts`), and its
outcome as events and history; the pool of worker threads and the runs queued or going here.

A won tick becomes a :class:`Run` at once (history row ``claimed``, written by the reporter's
background writer: :mod:`.report`) and goes to a bounded pool
of worker threads. There, for an ``overlap=False`` job, the name-level lease is taken (a run
still going anywhere makes the tick ``skipped(running)``); then ``started``, the attempts, and
``finished`` or ``failed``. Retries stop as soon as the run's lease is known lost (another
instance may hold it now) or the scheduler stops; a lost lease makes the run ``failed`` with
reason ``lease-lost`` even when the job returned, since it may have overlapped another run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.context import BaseContext

from .._lease import Lease
from .._protocol import RunCoordinator
from . import events as ev
from . import report as st
from ._clock import Clock
from .aio import LoopHost, RunCancelled
from .attempts import Attempts, describe, lost_text
from .claims import JOB_LEASE_PREFIX
from .isolation import ChildFailed, ChildRegistry, JobTimeout
from .job import ASYNC, LEASE_WAIT_MAX, PROCESS, THREAD, Job, Run
from .report import Reporter

log = logging.getLogger("coordlock")


class Pool:
    """A bounded pool of daemon worker threads (a stuck job never blocks interpreter exit)."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._outstanding = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], object]) -> None:
        with self._lock:
            self._outstanding += 1
            if self._outstanding > len(self._threads) and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._queue.put(fn)

    def _work(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException:  # pragma: no cover - Runner.execute catches everything
                log.exception("scheduler worker crashed")
            finally:
                with self._lock:
                    self._outstanding -= 1

    def shutdown(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)


class Runner:
    """Runs the ticks this instance won, and knows which are queued or going."""

    def __init__(
        self,
        *,
        instance: str,
        clock: Clock,
        report: Reporter,
        lock: threading.RLock,
        stopping: threading.Event,
        host: LoopHost,
        mp: BaseContext,
        watch_wake: threading.Event,
    ) -> None:
        self._instance = instance
        self._clock = clock
        self._report = report
        self._stopping = stopping
        self._host = host
        self._watch_wake = watch_wake
        self.cond = threading.Condition(lock)
        self.children = ChildRegistry()
        self._attempts = Attempts(
            instance=instance,
            clock=clock,
            stopping=stopping,
            host=host,
            mp=mp,
            children=self.children,
        )
        self.coordinator: RunCoordinator | None = None
        self.pool: Pool | None = None
        #: run_pending(): won ticks run in the calling thread after the step
        self.inline: list[Callable[[], bool]] | None = None
        self._runs: dict[str, Run] = {}

    # -- what the loop and the watchdog use -------------------------------------------------

    def won(
        self, job: Job, tick: float, following: float | None, key: str, *, manual: bool = False
    ) -> Run:
        """Note a won tick (history row ``claimed``) and queue it. ``manual``: a run-now
        request (``tick`` is when it was asked for), not a tick of the schedule."""
        kind = PROCESS if job.options.isolation == "process" else ASYNC if job.is_async else THREAD
        run = Run(job, tick, following, key, uuid.uuid4().hex, self._clock.time(), kind)
        run.manual = manual
        with self.cond:
            job.pending += 1
            self._runs[run.run_id] = run
        self._report.row(run.run_id, job.name, tick, run.claimed_at, st.CLAIMED)

        def task() -> bool:
            return self.execute(run)

        if self.inline is not None:
            self.inline.append(task)
        elif self.pool is not None:
            self.pool.submit(task)
        else:  # pragma: no cover - ticks are only won while running or in run_pending
            task()
        return run

    def runs(self) -> list[Run]:
        """Every run queued or going here."""
        with self.cond:
            return list(self._runs.values())

    def idle(self) -> bool:
        with self.cond:
            return not self._runs

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no run is queued or going (``True``) or ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self._runs:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.cond.wait(0.1 if remaining is None else min(remaining, 0.1))
        return True

    def stop_retrying(self, why: str) -> None:
        for run in self.runs():
            run.stop_retrying(why)

    def kill_stragglers(self) -> int:
        """Kill child processes and cancel coroutine runs still going; returns how many."""
        return self.children.kill_all() + self._host.cancel_all()

    # -- one run, in a worker thread --------------------------------------------------------

    def execute(self, run: Run) -> bool:
        """Take the lease (overlap=False) and run; ``True`` if the job was started."""
        try:
            if self._stopping.is_set():
                self._skip(run, ev.STOPPING)
                return False
            self._report.settle(run.run_id)  # the claimed row is written before anything runs
            lease: Lease | None = None
            job = run.job
            if not job.options.overlap:
                coordinator = self.coordinator
                assert coordinator is not None
                try:
                    # Wait a little (within the tick's grace) for a run that is just ending: with
                    # skewed clocks, two instances can win *different* ticks at the same real
                    # instant; only a run that is really still going should block this tick.
                    wait = (
                        LEASE_WAIT_MAX
                        if run.manual
                        else job.lease_wait(run.tick, run.following, self._clock.time())
                    )
                    lease = coordinator.acquire(
                        JOB_LEASE_PREFIX + job.name, job.lease_ttl(), wait=wait or None
                    )
                except Exception as exc:
                    self._skip(run, ev.COORDINATOR_ERROR, exc)
                    return False
                if lease is None:
                    self._skip(run, ev.RUNNING)
                    return False
            self._run(run, lease)
            return True
        except BaseException:  # pragma: no cover - defensive: a worker must never die
            log.exception("scheduler %s: internal error running %s", self._instance, run.key)
            self._forget(run)
            return False

    def skip_won(self, job: Job, tick: float, reason: str) -> None:
        """A won tick that will not run here at all (its job is paused): a ``skipped`` row
        and event, nothing queued."""
        now = self._clock.time()
        self._report.note(job, tick, f"skipped:{reason}")
        self._report.row(
            uuid.uuid4().hex, job.name, tick, now, st.SKIPPED, finished=now, error=reason
        )
        self._report.event(ev.SKIPPED, job, tick, reason=reason)

    def _skip(self, run: Run, reason: str, exc: BaseException | None = None) -> None:
        """A won tick that will not run: report it, then let wait_idle() see it gone."""
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        job = run.job
        self._report.note(job, run.tick, f"skipped:{reason}", error)
        self._report.row(
            run.run_id,
            job.name,
            run.tick,
            run.claimed_at,
            st.SKIPPED,
            finished=self._clock.time(),
            error=reason if error is None else f"{reason}: {error}",
        )
        self._report.event(ev.SKIPPED, job, run.tick, reason=reason, error=error)
        self._forget(run)

    def _forget(self, run: Run) -> None:
        with self.cond:
            if self._runs.pop(run.run_id, None) is not None:
                if run.started_wall is None:
                    run.job.pending -= 1
                else:
                    run.job.running -= 1
            self.cond.notify_all()

    def _run(self, run: Run, lease: Lease | None) -> None:
        job = run.job
        with self.cond:
            job.pending -= 1
            job.running += 1
            run.started_wall = self._clock.time()
            run.started_mono = time.monotonic()
        try:
            self._report.row(run.run_id, job.name, run.tick, run.started_wall, st.RUNNING)
            run.recorded = True
            if job.options.timeout is not None:
                self._watch_wake.set()
            self._report.event(ev.STARTED, job, run.tick, run_id=run.run_id)
            if lease is not None:
                lease.on_lost(lambda lost: run.stop_retrying(lost_text(lost)))
            error, attempts, stopped = self._attempts.run(run, lease)
            lost = _release(lease, self._instance)
            self._finish(run, error, attempts, stopped, lost)
        finally:
            with self.cond:
                self._runs.pop(run.run_id, None)
                job.running -= 1
                self.cond.notify_all()

    def _finish(
        self,
        run: Run,
        error: BaseException | None,
        attempts: int,
        stopped: str | None,
        lost: str | None,
    ) -> None:
        job = run.job
        duration = time.monotonic() - run.started_mono
        parts = []
        reason = None
        if lost is not None:
            reason = ev.LEASE_LOST
            parts.append(f"no-overlap lease lost during the run ({lost})")
        elif isinstance(error, JobTimeout):
            reason = ev.TIMEOUT
        if error is not None:
            parts.append(describe(error))
        if stopped is not None and error is not None:
            parts.append("retries stopped" if lost is not None else f"retries stopped: {stopped}")
        failed = error is not None or lost is not None
        text = "; ".join(parts) or None
        if run.stuck and not failed:
            text = f"finished after its timeout ({duration:.1f}s)"
        status = st.FAILED if failed else st.FINISHED
        finished = self._clock.time()
        assert run.started_wall is not None
        self._report.row(
            run.run_id,
            job.name,
            run.tick,
            run.started_wall,
            status,
            finished=finished,
            error=text,
            result=None if failed else run.result,
        )
        with self.cond:
            job.note(run.tick, status, text)
            job.last_finished = finished
        self._report.event(
            ev.FAILED if failed else ev.FINISHED,
            job,
            run.tick,
            reason=reason,
            run_id=run.run_id,
            duration=duration,
            attempts=attempts,
            error=text if failed else None,
            exception=error
            if isinstance(error, Exception) and not isinstance(error, (ChildFailed, RunCancelled))
            else None,
        )


def _release(lease: Lease | None, instance: str) -> str | None:
    """Release the run's lease; returns why it was lost during the run (``None``: it held)."""
    if lease is None:
        return None
    lost = lease.lost_reason if lease.lost else None
    try:
        if not lease.release() and lost is None:
            lost = lease.lost_reason or "the lock was no longer ours at release"
    except Exception as exc:
        log.warning("scheduler %s: releasing %s failed: %s", instance, lease.name, exc)
    return lost
