"""The watchdog: runs past their timeout, runs of vanished instances, and ticks that were
claimed but never started are reported, never silent.

* Local runs: a thread job past its ``timeout`` is marked ``stuck`` (event and history; Python
  cannot stop a thread); a coroutine job still going :data:`CANCEL_GRACE` seconds after its
  timeout cancelled it (it swallowed the cancellation) too. Process jobs are killed instead.
* Every ``watchdog_interval`` seconds (give or take a quarter), run history is scanned (where
  the coordinator keeps it) by one instance of the cluster: the first to claim the interval's
  slot. Each instance also scans once 5 s after it starts.
  A row of another instance whose liveness lease (:class:`Liveness`) can be taken belongs to a
  vanished instance: ``running`` becomes ``stuck`` (reason ``instance-vanished``), and
  ``claimed`` – it won the tick and died before starting it – becomes ``missed`` once the
  tick's grace has passed. Rows this instance's id left before it started (a restart under the
  same ``instance_id``) count as vanished too. Each verdict is claimed once
  (``coordlock:verdict:<run_id>``), so one instance reports it, not every watcher.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from .._lease import Lease
from .._protocol import RunCoordinator, RunRecord
from . import events as ev
from . import report as st
from ._clock import Clock
from .claims import INSTANCE_LEASE_PREFIX, SCAN_PREFIX, VERDICT_PREFIX
from .job import ASYNC, DEFAULT_SKIP_GRACE, THREAD, Job, Run
from .report import Reporter
from .runner import Runner

log = logging.getLogger("coordlock")

#: Seconds a coroutine job may take to end after its timeout cancelled it before it is stuck.
CANCEL_GRACE = 1.0
#: How many of the newest history rows one scan reads.
SCAN_LIMIT = 500
#: How long a verdict claim is held (seconds): other watchers see the rewritten row by then.
VERDICT_HOLD = 3600.0
#: Longest pause (real seconds) between two passes of the watchdog.
_MAX_PAUSE = 1.0
#: Later scans are spread by up to this share of the interval either way, so that instances
#: started together (a deploy) do not all reach the next slot's claim at the same instant.
SCAN_JITTER = 0.25


def first_scan_delay(interval: float) -> float:
    """Seconds before an instance's first scan: soon (5 s, or ``interval`` if shorter), to
    report what this instance's id left before it started (nobody else can)."""
    return min(interval, 5.0)


def scan_delay(interval: float) -> float:
    """Seconds to the next scan: ``interval`` give or take :data:`SCAN_JITTER` of it."""
    return interval * random.uniform(1.0 - SCAN_JITTER, 1.0 + SCAN_JITTER)


class Liveness:
    """This instance's liveness lease ``coordlock:instance:<id>``, renewed in the background
    and taken again whenever it is lost (a renewal failed, the server forgot it), so other
    instances never take a live instance for a vanished one for longer than that gap."""

    def __init__(self, instance: str, ttl: float, wake: threading.Event) -> None:
        self.name = INSTANCE_LEASE_PREFIX + instance
        self._instance = instance
        self._ttl = ttl
        self._wake = wake
        self._lease: Lease | None = None
        self._next_try = 0.0
        self._refused = False
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        lease = self._lease
        return lease is not None and not lease.lost

    def take(self, coordinator: RunCoordinator, wait: float | None = None) -> bool:
        """Take the lease (again) unless it is held; ``True`` when held afterwards."""
        with self._lock:
            if self.held:
                return True
            lost, self._lease = self._lease, None
            self._next_try = time.monotonic() + min(self._ttl / 3, _MAX_PAUSE)
        try:
            lease = coordinator.acquire(self.name, self._ttl, wait=wait)
        except Exception as exc:
            log.warning("scheduler %s: liveness lease not taken: %s", self._instance, exc)
            return False
        if lease is None:
            log.log(
                logging.DEBUG if self._refused else logging.WARNING,
                "scheduler %s: liveness lease %s is held by someone else (a watchdog probing "
                "it, or a duplicate instance_id); trying again",
                self._instance,
                self.name,
            )
            self._refused = True
            return False
        self._refused = False
        if lost is not None:
            log.warning("scheduler %s: liveness lease taken again after a loss", self._instance)
        lease.on_lost(lambda _lease: self._wake.set())
        with self._lock:
            self._lease = lease
        return True

    def keep(self, coordinator: RunCoordinator) -> float:
        """Re-take the lease if it was lost (at most every ttl/3 s, 1 s at most); returns the
        ``time.monotonic()`` of the next attempt worth making."""
        if self.held:
            return float("inf")
        if time.monotonic() >= self._next_try:
            self.take(coordinator)
        return float("inf") if self.held else self._next_try

    def release(self) -> None:
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            try:
                lease.release()
            except Exception as exc:
                log.debug("releasing liveness lease failed: %s", exc)


class Watchdog:
    """The watchdog of one scheduler instance (its thread body is :meth:`serve`)."""

    def __init__(
        self,
        *,
        instance: str,
        clock: Clock,
        report: Reporter,
        runner: Runner,
        liveness: Liveness,
        interval: float,
        find_job: Callable[[str], Job | None],
        wake: threading.Event,
        stopping: threading.Event,
        control: Callable[[], None] | None = None,
        control_interval: float = 1.0,
    ) -> None:
        self._instance = instance
        self._clock = clock
        self._report = report
        self._runner = runner
        self._liveness = liveness
        self._interval = interval
        self._find_job = find_job
        self._wake = wake
        self._stopping = stopping
        self._control = control
        self._control_interval = control_interval
        #: when this instance started (scheduler clock): older rows of its id are leftovers
        self.since = float("inf")

    def serve(self) -> None:
        """Until the scheduler stops: keep the liveness lease, watch timeouts, scan history."""
        next_scan = time.monotonic() + first_scan_delay(self._interval)
        first_scan = True  # always: only this instance sees what its id left before it started
        next_control = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            soonest = next_scan
            if self._control is not None and self._report.history is not None:
                if now >= next_control:
                    next_control = now + self._control_interval
                    try:
                        self._control()
                    except Exception as exc:
                        log.warning(
                            "scheduler %s: job control poll failed: %s", self._instance, exc
                        )
                soonest = min(soonest, next_control)
            coordinator = self._runner.coordinator
            if coordinator is not None and self._report.history is not None:
                soonest = min(soonest, self._liveness.keep(coordinator))
            soonest = min(soonest, self.check_timeouts(now))
            if now >= next_scan:
                next_scan = now + scan_delay(self._interval)
                soonest = min(soonest, next_scan)
                if self._report.history is not None:
                    try:
                        if first_scan or self.elected():
                            self.scan()
                        first_scan = False
                    except Exception as exc:
                        log.warning("scheduler %s: watchdog scan failed: %s", self._instance, exc)
            self._wake.wait(max(0.01, min(soonest - time.monotonic(), _MAX_PAUSE)))
            self._wake.clear()

    # -- local runs -----------------------------------------------------------------------------

    def check_timeouts(self, now: float) -> float:
        """Mark local runs past their timeout stuck; returns the next deadline (monotonic)."""
        soonest = float("inf")
        for run in self._runner.runs():
            timeout = run.job.options.timeout
            if timeout is None or run.stuck or not run.recorded:
                continue  # not started, or its running row not written yet (it wakes us then)
            if run.kind == THREAD:
                deadline = run.started_mono + timeout
            elif run.kind == ASYNC:
                deadline = run.started_mono + timeout + CANCEL_GRACE
            else:
                continue  # a child process is killed at its timeout
            if now >= deadline:
                self._mark_stuck(run)
            else:
                soonest = min(soonest, deadline)
        return soonest

    def _mark_stuck(self, run: Run) -> None:
        run.stuck = True
        elapsed = time.monotonic() - run.started_mono
        text = f"still running after {elapsed:.1f}s (timeout {run.job.options.timeout:g}s)"
        if run.kind == ASYNC:
            text += "; its task ignored the cancellation"
        self._report.note(run.job, run.tick, st.STUCK, text)
        assert run.started_wall is not None
        self._report.row(run.run_id, run.job.name, run.tick, run.started_wall, st.STUCK, error=text)
        self._report.event(
            ev.STUCK, run.job, run.tick, reason=ev.TIMEOUT, run_id=run.run_id, error=text
        )

    # -- history ----------------------------------------------------------------------------------

    def elected(self) -> bool:
        """Whether this instance scans history this interval: the first instance to claim the
        interval's slot (``coordlock:scan:<interval>:<slot>``, scheduler clock) does, the
        others skip it, so a cluster reads history once per interval, not once per instance.
        (Instances whose clocks straddle a slot boundary may both scan: harmless, each verdict
        is claimed once.) Raises what the coordinator raises."""
        coordinator = self._runner.coordinator
        if coordinator is None:
            return False
        interval = self._interval
        slot = int(self._clock.time() // interval)
        return bool(coordinator.claim(f"{SCAN_PREFIX}{interval:g}:{slot}", interval))

    def scan(self) -> int:
        """One pass over run history; returns how many rows were marked stuck or missed."""
        history, coordinator = self._report.history, self._runner.coordinator
        if history is None or coordinator is None:
            return 0
        local = {run.run_id for run in self._runner.runs()}  # before reading: no false verdicts
        records = [
            r
            for r in history.history(None, SCAN_LIMIT)
            if r.status in (st.RUNNING, st.CLAIMED) and r.run_id not in local
        ]
        alive: dict[str, bool] = {}
        now = self._clock.time()
        marked = 0
        for record in records:
            if record.status == st.CLAIMED and now < self._deadline(record):
                continue  # its instance may still start it
            if not self._vanished(coordinator, record, alive):
                continue
            if not coordinator.claim(VERDICT_PREFIX + record.run_id, VERDICT_HOLD):
                continue  # another watcher reports it
            if record.status == st.RUNNING:
                self._report_stuck(record)
            else:
                self._report_missed(record)
            marked += 1
        return marked

    def _vanished(
        self, coordinator: RunCoordinator, record: RunRecord, alive: dict[str, bool]
    ) -> bool:
        if record.instance == self._instance:
            return record.started < self.since  # left by an earlier process with this id
        if record.instance not in alive:
            probe = coordinator.acquire(INSTANCE_LEASE_PREFIX + record.instance, 1.0)
            alive[record.instance] = probe is None
            if probe is not None:
                probe.release()
        return not alive[record.instance]

    def _deadline(self, record: RunRecord) -> float:
        """When a claimed tick must have started (scheduler clock): the tick plus its grace."""
        tick = _parse_tick(record.tick)
        if tick is None:
            return record.started + DEFAULT_SKIP_GRACE
        job = self._find_job(record.job)
        if job is None:
            return tick + DEFAULT_SKIP_GRACE
        return tick + job.grace_for(tick, job.trigger.next_after(tick))

    def _report_stuck(self, record: RunRecord) -> None:
        text = f"instance {record.instance} vanished during the run"
        self._verdict(record, st.STUCK, ev.STUCK, text)

    def _report_missed(self, record: RunRecord) -> None:
        text = (
            f"claimed by {record.instance}, which vanished before starting it "
            "(at most once per tick: no other instance runs it)"
        )
        self._verdict(record, st.MISSED, ev.MISSED, text)

    def _verdict(self, record: RunRecord, status: str, kind: str, text: str) -> None:
        self._report.record(replace(record, status=status, error=text))
        tick = _parse_tick(record.tick)
        job = self._find_job(record.job)
        if job is not None and tick is not None:
            self._report.note(job, tick, status, text)
        self._report.emit(
            ev.Event(
                kind=kind,
                job=record.job,
                tick=None if tick is None else ev.utc(tick),
                key=f"{record.job}@{record.tick}",
                instance=self._instance,
                reason=ev.INSTANCE_VANISHED,
                error=text,
                run_id=record.run_id,
            )
        )


def _parse_tick(text: str) -> float | None:
    """Epoch seconds of a tick name (``2024-03-31T01:00:00Z``), ``None`` if it is not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
