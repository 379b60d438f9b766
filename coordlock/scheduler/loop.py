"""The :class:`Scheduler`: asks the coordinator before every tick, so each named job runs once
per tick across every instance that registers it.

One tick of one job, on every instance:

1. The loop wakes at the tick (by this instance's clock) and collects every job due now.
2. It claims ``f"{job}@{tick_utc_iso}"`` for all of them in one ``claim_many`` call (one
   ``claim`` per job where the coordinator has no ``claim_many``). The claim is held for the
   job's period plus the skew tolerance, so an instance whose clock is late asks after the
   winner and still loses. Claims are per tick: a long hold never blocks the next tick.
3. Losers report ``skipped(claimed-elsewhere)``. The winner, for an ``overlap=False`` job, only
   now takes the name-level lease ``coordlock:job:{name}`` (renewed while the run goes); if a
   previous run still holds it anywhere the tick is ``skipped(running)``.
4. The run goes to a bounded pool of worker threads (or a child process), with retries and a
   timeout; ``started``/``finished``/``failed`` are emitted, logged and written to run history.

When the coordinator cannot be asked the tick does not run (fail closed):
``skipped(coordinator-error)``, and the loop carries on with the next tick.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, tzinfo
from types import FrameType
from typing import Any, TypeVar, overload

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from .._api import get_coordinator
from .._lease import Lease
from .._protocol import ClaimsMany, KeepsHistory, RunCoordinator, RunRecord
from .._registry import connect
from .._validate import check_name, check_seconds
from . import events as ev
from ._clock import Clock, SystemClock
from .events import Callback, Event, EventBus, utc
from .isolation import ChildFailed, ChildRegistry, JobTimeout, make_context, run_in_process
from .job import (
    DEFAULT_SKIP_GRACE,
    Job,
    JobInfo,
    RunContext,
    _set_current,
    build_options,
    check_callable,
    default_name,
)
from .triggers import (
    CronTrigger,
    IntervalTrigger,
    Trigger,
    resolve_timezone,
    tick_datetime,
    tick_key,
)

log = logging.getLogger("coordlock")

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=Callback)

#: Lease name prefixes used by the scheduler (visible in ``coordlock locks``).
JOB_LEASE_PREFIX = "coordlock:job:"
INSTANCE_LEASE_PREFIX = "coordlock:instance:"

#: Upper bound on ticks counted one by one when an instance wakes far behind.
_MAX_COUNT = 10_000


def default_instance_id() -> str:
    """``host:pid:random`` – unique per scheduler object."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Run:
    job: Job
    tick: float
    key: str
    run_id: str
    started_wall: float
    started_mono: float
    isolation: str
    stuck: bool = False


class _Pool:
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
            except BaseException:  # pragma: no cover - _execute catches everything
                log.exception("scheduler worker crashed")
            finally:
                with self._lock:
                    self._outstanding -= 1

    def shutdown(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)


class Scheduler:
    """Runs each named job once per tick across every instance that shares a coordinator.

    Parameters (all keyword except ``coordinator``):

    * ``coordinator`` – a :class:`~coordlock.RunCoordinator`, a URL (connected at
      :meth:`start`, closed at :meth:`stop`), or ``None`` for :func:`coordlock.get_coordinator`
      looked up at :meth:`start` (so ``configure()`` may come after building the scheduler).
    * ``instance_id`` – this instance's name in events and history (default ``host:pid:rand``).
    * ``timezone`` – default timezone of cron jobs (IANA name or tzinfo; default UTC).
    * ``clock`` – where the time of day comes from (:class:`SystemClock` by default; tests
      inject :class:`OffsetClock` or :class:`ManualClock`).
    * ``skew_tolerance`` – how far apart (seconds) instance clocks may be; added to every
      claim's hold (default 60).
    * ``max_workers`` – size of the thread pool that runs jobs (default 10).
    * ``shutdown_grace`` – how long :meth:`stop`/:meth:`run_forever` let running jobs finish
      (default 30 s); process-isolated jobs still running then are killed.
    * ``watchdog_interval`` – how often (real seconds) run history is scanned for runs of
      vanished instances, where the coordinator keeps history (default 30).
    * ``heartbeat_ttl`` – TTL of this instance's liveness lease (default 30 s).
    * ``mp_context`` – multiprocessing start method for ``isolation="process"`` (``spawn``).
    """

    def __init__(
        self,
        coordinator: RunCoordinator | str | None = None,
        instance_id: str | None = None,
        timezone: str | tzinfo = "UTC",
        *,
        clock: Clock | None = None,
        skew_tolerance: float | timedelta = 60.0,
        max_workers: int = 10,
        shutdown_grace: float | timedelta = 30.0,
        watchdog_interval: float | timedelta = 30.0,
        heartbeat_ttl: float | timedelta = 30.0,
        mp_context: str | None = None,
    ) -> None:
        if coordinator is not None and not isinstance(coordinator, (str, RunCoordinator)):
            raise TypeError(
                "coordinator must be a RunCoordinator, a URL or None, "
                f"not {type(coordinator).__name__}"
            )
        if isinstance(coordinator, str):
            check_name(coordinator, "coordinator URL")
        self._coordinator_arg = coordinator
        self.instance_id = check_name(
            instance_id if instance_id is not None else default_instance_id(), "instance_id"
        )
        self.timezone = resolve_timezone(timezone)
        if clock is None:
            clock = SystemClock()
        elif not isinstance(clock, Clock):
            raise TypeError("clock must have time() and wait(seconds, event) methods")
        self.clock: Clock = clock
        self.skew_tolerance = check_seconds(skew_tolerance, "skew_tolerance", allow_zero=True)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError("max_workers must be an int")
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self.shutdown_grace = check_seconds(shutdown_grace, "shutdown_grace", allow_zero=True)
        self.watchdog_interval = check_seconds(watchdog_interval, "watchdog_interval")
        self.heartbeat_ttl = check_seconds(heartbeat_ttl, "heartbeat_ttl")
        self._mp = make_context(mp_context)

        self._events = EventBus()
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._heap: list[tuple[float, int, int, Job]] = []
        self._seq = itertools.count()
        self._active = False  # next_fire of jobs computed (started or run_pending called)
        self._coordinator: RunCoordinator | None = None
        self._owns_coordinator = False
        self._history: KeepsHistory | None = None

        self._runs: dict[str, _Run] = {}
        self._runs_cond = threading.Condition(self._lock)
        self._children = ChildRegistry()
        self._pool: _Pool | None = None
        self._inline: list[Callable[[], bool]] | None = None

        self._state = "new"  # new → running → stopped
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._watch_wake = threading.Event()  # a run with a timeout started, or stopping
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._heartbeat: Lease | None = None
        self._stop_requested = threading.Event()

    # -- registration ------------------------------------------------------------------------

    def cron(
        self,
        expr: str,
        *,
        name: str | None = None,
        timezone: str | tzinfo | None = None,
        **options: Any,
    ) -> Callable[[F], F]:
        """Decorator: run the function on a cron schedule (5 fields, or 6 with seconds first).

        ``timezone`` defaults to the scheduler's. Options as for :meth:`add`. An invalid
        expression raises ``ValueError`` here, not at the first tick.
        """
        trigger = CronTrigger(expr, self.timezone if timezone is None else timezone)
        build_options(**options)  # fail at the decorator line, before the function exists

        def decorate(func: F) -> F:
            self.add(func, trigger, name=name, **options)
            return func

        return decorate

    def every(
        self,
        seconds: float | timedelta,
        *,
        name: str | None = None,
        offset: float | timedelta = 0.0,
        **options: Any,
    ) -> Callable[[F], F]:
        """Decorator: run the function every ``seconds`` (number or timedelta), at ticks aligned
        to the Unix epoch (``offset`` shifts them), so every instance computes the same ticks."""
        trigger = IntervalTrigger(seconds, offset=offset)
        build_options(**options)

        def decorate(func: F) -> F:
            self.add(func, trigger, name=name, **options)
            return func

        return decorate

    def add(
        self,
        func: Callable[..., Any],
        trigger: Trigger | str | float | timedelta,
        *,
        name: str | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Register ``func`` under ``name`` (default ``module.qualname``); returns the name.

        ``trigger``: a :class:`Trigger`, a cron string (in the scheduler's timezone) or an
        interval in seconds/timedelta. Options:

        * ``overlap=False`` – a run still going when the next tick comes makes that tick
          ``skipped(running)`` on every instance (a name-level lease held during the run).
        * ``misfire="skip"`` – a tick this instance reaches later than ``grace`` (default 1 s)
          is ``missed``; ``"run_once"`` runs the newest missed tick once, late, if no instance
          ran it (``grace`` defaults to "until the next tick"). Never a burst of catch-up runs.
        * ``timeout=`` – seconds; a thread job past it is reported ``stuck``; a process job is
          killed and ``failed``.
        * ``isolation="thread"`` | ``"process"`` – run in the worker thread or a child process.
        * ``retries=0``, ``backoff=1.0``, ``backoff_max=60`` – retry a failing run with
          exponential backoff (tenacity) within the same tick.
        * ``hold=`` – claim hold in seconds (default: the period plus ``skew_tolerance``).
        * ``lease_ttl=`` – TTL of the no-overlap lease (default 2× period, 2–30 s).
        """
        if not isinstance(args, tuple):
            raise TypeError("args must be a tuple")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError("kwargs must be a dict")
        opts = build_options(**options)
        func = check_callable(func, opts.isolation)
        trig = self._make_trigger(trigger)
        job_name = check_name(name if name is not None else default_name(func), "job name")
        job = Job(job_name, func, trig, opts, args, dict(kwargs or {}))
        with self._lock:
            if job_name in self._jobs:
                raise ValueError(f"a job named {job_name!r} is already registered")
            self._jobs[job_name] = job
            if self._active:
                self._activate(job, self.clock.time())
        self._wake.set()
        return job_name

    def remove(self, name: str) -> bool:
        """Unregister a job (a run in progress finishes). ``False`` if there was none."""
        with self._lock:
            job = self._jobs.pop(name, None)
            if job is None:
                return False
            job.version += 1
        self._wake.set()
        return True

    def _make_trigger(self, trigger: object) -> Trigger:
        if isinstance(trigger, Trigger):
            return trigger
        if isinstance(trigger, str):
            return CronTrigger(trigger, self.timezone)
        if isinstance(trigger, (int, float, timedelta)) and not isinstance(trigger, bool):
            return IntervalTrigger(trigger)
        raise TypeError(
            "trigger must be a Trigger, a cron string or an interval in seconds, "
            f"not {type(trigger).__name__}"
        )

    @overload
    def on(self, event: str, callback: C) -> C: ...

    @overload
    def on(self, event: str, callback: None = None) -> Callable[[C], C]: ...

    def on(self, event: str, callback: C | None = None) -> C | Callable[[C], C]:
        """Call ``callback(event)`` for every event of a kind (``"*"`` = all kinds).

        Kinds: ``started``, ``finished``, ``failed``, ``skipped``, ``missed``, ``stuck``.
        Without ``callback`` it works as a decorator. Callbacks run in the scheduler's
        threads: keep them short; their exceptions are logged, not raised.
        """
        if callback is None:
            if event not in (*ev.KINDS, "*"):  # fail at the decorator line
                raise ValueError(f"unknown event {event!r}; known: {', '.join((*ev.KINDS, '*'))}")

            def decorate(cb: C) -> C:
                self._events.on(event, cb)
                return cb

            return decorate
        self._events.on(event, callback)
        return callback

    def jobs(self) -> list[JobInfo]:
        """Each job with its next run and its last result, sorted by name."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.name)
            return [self._info(job) for job in jobs]

    def _info(self, job: Job) -> JobInfo:
        zone = job.trigger.zone if isinstance(job.trigger, CronTrigger) else None

        def when(ts: float | None) -> datetime | None:
            if ts is None:
                return None
            return utc(ts) if zone is None else datetime.fromtimestamp(ts, zone)

        next_fire = job.next_fire
        if not self._active:
            next_fire = job.trigger.next_after(self.clock.time())
        return JobInfo(
            name=job.name,
            trigger=job.trigger.describe(),
            next_run=when(next_fire),
            last_tick=when(job.last_tick),
            last_status=job.last_status,
            last_error=job.last_error,
            last_finished=when(job.last_finished),
            running=job.running,
            overlap=job.options.overlap,
            misfire=job.options.misfire,
            isolation=job.options.isolation,
            timeout=job.options.timeout,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """``True`` between :meth:`start` and :meth:`stop`."""
        return self._state == "running"

    @property
    def coordinator(self) -> RunCoordinator | None:
        """The coordinator in use (``None`` until :meth:`start` or :meth:`run_pending`)."""
        return self._coordinator

    def start(self) -> None:
        """Start the scheduler on a daemon thread. Resolves the coordinator now (raises
        ``NotConfigured`` if there is none)."""
        with self._lock:
            if self._state == "running":
                raise RuntimeError("the scheduler is already running")
            if self._state == "stopped":
                raise RuntimeError("a stopped scheduler cannot be restarted; create a new one")
            self._resolve()
            self._state = "running"
            self._stopping.clear()
            self._pool = _Pool(self.max_workers, f"coordlock-job-{self.instance_id}")
            self._activate_all()
        self._start_heartbeat()
        self._thread = threading.Thread(
            target=self._loop, name=f"coordlock-scheduler-{self.instance_id}", daemon=True
        )
        self._thread.start()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"coordlock-watchdog-{self.instance_id}", daemon=True
        )
        self._watchdog.start()
        log.info(
            "scheduler %s started with %d job(s) on %s",
            self.instance_id,
            len(self._jobs),
            type(self._coordinator).__name__,
        )

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop scheduling. With ``wait``, let running jobs finish for up to ``timeout`` seconds
        (default ``shutdown_grace``); process jobs still running then are killed. Won ticks not
        yet started are reported ``skipped(stopping)``. Idempotent."""
        with self._lock:
            if self._state != "running":
                self._state = "stopped" if self._state == "new" else self._state
                return
            self._state = "stopped"
        self._stopping.set()
        self._stop_requested.set()
        self._wake.set()
        self._watch_wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        if wait:
            grace = (
                self.shutdown_grace
                if timeout is None
                else check_seconds(timeout, "timeout", allow_zero=True)
            )
            if not self.wait_idle(grace):
                with self._lock:
                    left = [r.key for r in self._runs.values()]
                killed = self._children.kill_all()
                log.warning(
                    "scheduler %s stopped with %d run(s) still going after %.1fs: %s%s",
                    self.instance_id,
                    len(left),
                    grace,
                    ", ".join(left),
                    f" ({killed} child process(es) killed)" if killed else "",
                )
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(5)
        self._stop_heartbeat()
        if self._owns_coordinator and self._coordinator is not None and (wait or not self._runs):
            self._coordinator.close()
        log.info("scheduler %s stopped", self.instance_id)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no run is going or queued (``True``) or ``timeout`` real seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._runs_cond:
            while self._runs or any(j.pending for j in self._jobs.values()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._runs_cond.wait(0.1 if remaining is None else min(remaining, 0.1))
        return True

    def run_forever(self) -> None:
        """Start and block until SIGTERM/SIGINT (or :meth:`stop`), then stop cleanly, letting
        running jobs finish for up to ``shutdown_grace`` seconds."""
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def handler(signum: int, frame: FrameType | None) -> None:
                log.info(
                    "scheduler %s: %s received, stopping",
                    self.instance_id,
                    signal.Signals(signum).name,
                )
                self._stop_requested.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                installed[sig] = signal.signal(sig, handler)
        try:
            self.start()
            while not self._stop_requested.wait(0.5):
                if self._thread is not None and not self._thread.is_alive():
                    break
        finally:
            self.stop(wait=True)
            for signum, previous in installed.items():
                signal.signal(signum, previous)

    def run_pending(self) -> int:
        """Handle every tick due by the clock *now*, running won jobs in this thread.

        For tests and for programs that drive their own loop; not while :meth:`start` runs.
        Returns the number of runs started.
        """
        with self._lock:
            if self._state == "running":
                raise RuntimeError("run_pending() drives a scheduler that is not started")
            self._resolve()
            self._activate_all()
            self._inline = []
        try:
            self._step(self.clock.time())
            inline, self._inline = self._inline, None
            return sum(1 for fn in inline or [] if fn())
        finally:
            self._inline = None

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(wait=True)

    def _resolve(self) -> RunCoordinator:
        if self._coordinator is None:
            arg = self._coordinator_arg
            if arg is None:
                self._coordinator = get_coordinator()
            elif isinstance(arg, str):
                self._coordinator = connect(arg)
                self._owns_coordinator = True
            else:
                self._coordinator = arg
            coord = self._coordinator
            self._history = coord if isinstance(coord, KeepsHistory) else None
        return self._coordinator

    # -- planning ticks ----------------------------------------------------------------------

    def _activate_all(self) -> None:
        if self._active:
            return
        self._active = True
        now = self.clock.time()
        for job in self._jobs.values():
            self._activate(job, now)

    def _activate(self, job: Job, now: float) -> None:
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
        job.activated_at = now if first is not None and first <= now else None
        self._schedule(job, first)

    def _schedule(self, job: Job, fire: float | None) -> None:
        job.next_fire = fire
        job.version += 1
        if fire is not None:
            heapq.heappush(self._heap, (fire, next(self._seq), job.version, job))

    def _next_wake(self) -> float | None:
        with self._lock:
            while self._heap:
                fire, _, version, job = self._heap[0]
                if version == job.version and self._jobs.get(job.name) is job:
                    return fire
                heapq.heappop(self._heap)
        return None

    def _step(self, now: float) -> None:
        """Deal with every job due at ``now``: plan, claim, dispatch."""
        due: list[tuple[Job, float, float | None]] = []
        missed: list[tuple[Job, float, int]] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, _, version, job = heapq.heappop(self._heap)
                if version != job.version or self._jobs.get(job.name) is not job:
                    continue
                self._plan(job, now, due, missed)
        for job, tick, count in missed:
            with self._lock:
                job.last_tick, job.last_status, job.last_error = tick, "missed", None
            self._emit(ev.MISSED, job, tick, count=count)
        if due:
            self._claim_and_dispatch(due)

    def _plan(
        self,
        job: Job,
        now: float,
        due: list[tuple[Job, float, float | None]],
        missed: list[tuple[Job, float, int]],
    ) -> None:
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
            skipped_over = self._count(trigger, tick, latest)
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
                missed.append((job, newest_skipped, skipped_over))
            due.append((job, tick, following))
        else:
            missed.append((job, tick, skipped_over + 1))
        self._schedule(job, following)

    @staticmethod
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

    # -- claiming ----------------------------------------------------------------------------

    def _claim_and_dispatch(self, due: list[tuple[Job, float, float | None]]) -> None:
        coordinator = self._coordinator
        assert coordinator is not None
        by_key: dict[str, tuple[Job, float, float | None]] = {}
        by_hold: dict[float, list[str]] = {}
        for job, tick, following in due:
            key = f"{job.name}@{tick_key(tick)}"
            with self._lock:
                busy_here = job.pending > 0 or (not job.options.overlap and job.running > 0)
            if busy_here:
                # A run of this job is still going (or queued) here: for overlap=False the
                # lease would refuse anyway; don't burn the tick's claim — another instance may
                # still run it if the run ends in time.
                self._emit(ev.SKIPPED, job, tick, reason=ev.RUNNING)
                continue
            by_key[key] = (job, tick, following)
            by_hold.setdefault(job.hold_for(tick, following, self.skew_tolerance), []).append(key)
        won: set[str] = set()
        errors: dict[str, BaseException] = {}
        for hold, keys in by_hold.items():
            got, failed = self._claim(coordinator, keys, hold)
            won |= got
            errors.update(failed)
        for key, (job, tick, following) in by_key.items():
            if key in errors:
                exc = errors[key]
                with self._lock:
                    job.last_tick, job.last_status = tick, f"skipped:{ev.COORDINATOR_ERROR}"
                    job.last_error = f"{type(exc).__name__}: {exc}"
                self._emit(
                    ev.SKIPPED,
                    job,
                    tick,
                    reason=ev.COORDINATOR_ERROR,
                    error=f"{type(exc).__name__}: {exc}",
                )
            elif key not in won:
                with self._lock:
                    job.last_tick, job.last_status = tick, f"skipped:{ev.CLAIMED_ELSEWHERE}"
                    job.last_error = None
                self._emit(ev.SKIPPED, job, tick, reason=ev.CLAIMED_ELSEWHERE)
            else:
                log.debug("scheduler %s won claim %s", self.instance_id, key)
                self._dispatch(job, tick, following, key)

    def _claim(
        self, coordinator: RunCoordinator, keys: list[str], hold: float
    ) -> tuple[set[str], dict[str, BaseException]]:
        """Claim ``keys``; returns (won, {key: error}). One round trip with ``claim_many``."""
        if isinstance(coordinator, ClaimsMany):
            try:
                return set(coordinator.claim_many(keys, hold)), {}
            except Exception as exc:
                log.warning(
                    "scheduler %s: claiming %d tick(s) failed: %s: %s",
                    self.instance_id,
                    len(keys),
                    type(exc).__name__,
                    exc,
                )
                return set(), dict.fromkeys(keys, exc)
        won: set[str] = set()
        errors: dict[str, BaseException] = {}
        for key in keys:
            try:
                if coordinator.claim(key, hold):
                    won.add(key)
            except Exception as exc:
                log.warning("scheduler %s: claim %s failed: %s", self.instance_id, key, exc)
                errors[key] = exc
        return won, errors

    # -- running -----------------------------------------------------------------------------

    def _dispatch(self, job: Job, tick: float, following: float | None, key: str) -> None:
        with self._lock:
            job.pending += 1

        def task() -> bool:
            return self._execute(job, tick, following, key)

        if self._inline is not None:
            self._inline.append(task)
        elif self._pool is not None:
            self._pool.submit(task)
        else:  # pragma: no cover - dispatch only happens while running or in run_pending
            task()

    def _execute(self, job: Job, tick: float, following: float | None, key: str) -> bool:
        """Take the lease (overlap=False) and run; ``True`` if the job was started."""
        coordinator = self._coordinator
        assert coordinator is not None
        try:
            if self._stopping.is_set():
                self._skip_pending(job, tick, ev.STOPPING)
                return False
            lease: Lease | None = None
            if not job.options.overlap:
                try:
                    # Wait a little (within the tick's grace) for a run that is just ending: with
                    # skewed clocks, two instances can win *different* ticks at the same real
                    # instant; only a run that is really still going should block this tick.
                    wait = job.lease_wait(tick, following, self.clock.time())
                    lease = coordinator.acquire(
                        JOB_LEASE_PREFIX + job.name, job.lease_ttl(), wait=wait or None
                    )
                except Exception as exc:
                    self._skip_pending(job, tick, ev.COORDINATOR_ERROR, exc)
                    return False
                if lease is None:
                    self._skip_pending(job, tick, ev.RUNNING)
                    return False
            self._run(job, tick, key, lease)
            return True
        except BaseException:  # pragma: no cover - defensive: a worker must never die
            log.exception("scheduler %s: internal error running %s", self.instance_id, key)
            return False

    def _skip_pending(
        self, job: Job, tick: float, reason: str, exc: BaseException | None = None
    ) -> None:
        """A won tick that will not run: report it, then let wait_idle() see it gone."""
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        with self._lock:
            job.last_tick, job.last_status, job.last_error = tick, f"skipped:{reason}", error
        self._emit(ev.SKIPPED, job, tick, reason=reason, error=error)
        with self._runs_cond:
            job.pending -= 1
            self._runs_cond.notify_all()

    def _run(self, job: Job, tick: float, key: str, lease: Lease | None) -> None:
        run = _Run(
            job=job,
            tick=tick,
            key=key,
            run_id=uuid.uuid4().hex,
            started_wall=self.clock.time(),
            started_mono=time.monotonic(),
            isolation=job.options.isolation,
        )
        with self._runs_cond:
            job.pending -= 1
            job.running += 1
            self._runs[run.run_id] = run
        record = RunRecord(
            run_id=run.run_id,
            job=job.name,
            tick=tick_key(tick),
            instance=self.instance_id,
            started=run.started_wall,
        )
        if job.options.timeout is not None:
            self._watch_wake.set()
        self._record(record)
        self._emit(ev.STARTED, job, tick, run_id=run.run_id)
        fence = lease.fence if lease is not None else None
        attempts = [0]
        error: BaseException | None = None
        try:
            self._invoke(job, tick, key, run.run_id, fence, attempts)
        except BaseException as exc:
            error = exc
        finally:
            lease_note = None
            if lease is not None:
                if lease.lost:
                    lease_note = f"no-overlap lease lost during the run: {lease.lost_reason}"
                try:
                    lease.release()
                except Exception as exc:
                    log.warning(
                        "scheduler %s: releasing %s failed: %s", self.instance_id, lease.name, exc
                    )
        duration = time.monotonic() - run.started_mono
        finished = self.clock.time()
        if error is None:
            status, text = "finished", lease_note
        else:
            status, text = "failed", _describe(error)
        if run.stuck and error is None:
            text = f"finished after its timeout ({duration:.1f}s)"
        if self._history is not None:
            self._record(
                RunRecord(
                    run_id=record.run_id,
                    job=record.job,
                    tick=record.tick,
                    instance=record.instance,
                    started=record.started,
                    finished=finished,
                    status=status,
                    error=text,
                )
            )
        with self._lock:
            job.last_tick, job.last_status, job.last_error = tick, status, text
            job.last_finished = finished
        self._emit(
            ev.FINISHED if error is None else ev.FAILED,
            job,
            tick,
            run_id=run.run_id,
            duration=duration,
            attempts=attempts[0],
            error=None if error is None else text,
            exception=error
            if isinstance(error, Exception) and not isinstance(error, ChildFailed)
            else None,
        )
        with self._runs_cond:
            job.running -= 1
            self._runs.pop(run.run_id, None)
            self._runs_cond.notify_all()

    def _invoke(
        self, job: Job, tick: float, key: str, run_id: str, fence: int | None, attempts: list[int]
    ) -> None:
        """Run the job (with retries), counting attempts in ``attempts[0]``."""
        opts = job.options

        def once() -> None:
            attempts[0] += 1
            ctx = RunContext(
                job=job.name,
                tick=tick_datetime(tick),
                key=key,
                instance=self.instance_id,
                run_id=run_id,
                attempt=attempts[0],
                fence=fence,
            )
            if opts.isolation == "process":
                run_in_process(
                    job.func,
                    job.args,
                    job.kwargs,
                    ctx,
                    timeout=opts.timeout,
                    context=self._mp,
                    registry=self._children,
                )
                return
            _set_current(ctx)
            try:
                job.func(*job.args, **job.kwargs)
            finally:
                _set_current(None)

        if opts.retries == 0:
            once()
            return

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "job %s attempt %d failed (%s); retrying",
                key,
                state.attempt_number,
                _describe(exc) if exc else "?",
            )

        retrying = Retrying(
            stop=stop_after_attempt(opts.retries + 1),
            wait=wait_exponential(multiplier=opts.backoff, max=opts.backoff_max),
            retry=retry_if_exception_type(Exception),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        retrying(once)

    def _sleep(self, seconds: float) -> None:
        """Backoff sleep on the scheduler's clock; cut short by stop()."""
        if seconds > 0 and self._stopping.is_set():
            raise JobTimeout("scheduler stopping; retries abandoned")
        if seconds > 0:
            self.clock.wait(seconds, self._stopping)

    def _record(self, record: RunRecord) -> None:
        if self._history is None:
            return
        try:
            self._history.record_run(record)
        except Exception as exc:
            log.warning(
                "scheduler %s: recording run %s (%s) failed: %s",
                self.instance_id,
                record.run_id,
                record.status,
                exc,
            )

    def _emit(
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
        self._events.emit(
            Event(
                kind=kind,
                job=job.name,
                tick=tick_datetime(tick),
                key=f"{job.name}@{tick_key(tick)}",
                instance=self.instance_id,
                reason=reason,
                error=error,
                exception=exception,
                run_id=run_id,
                duration=duration,
                attempts=attempts,
                count=count,
            )
        )

    # -- the threads -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step(self.clock.time())
            except Exception:
                log.exception("scheduler %s: loop error (continuing)", self.instance_id)
                self._stopping.wait(0.1)
            self._wake.clear()
            if self._stopping.is_set():  # stop() may have set _wake just before the clear
                break
            wake = self._next_wake()
            timeout = 3600.0 if wake is None else wake - self.clock.time()
            if timeout > 0:
                self.clock.wait(timeout, self._wake)

    def _watch(self) -> None:
        """Watchdog: mark local runs past their timeout, and runs of vanished instances, stuck."""
        next_scan = time.monotonic() + min(self.watchdog_interval, 5.0)
        while not self._stopping.is_set():
            now = time.monotonic()
            soonest = next_scan
            with self._lock:
                runs = list(self._runs.values())
            for run in runs:
                timeout = run.job.options.timeout
                if timeout is None or run.stuck or run.isolation == "process":
                    continue
                deadline = run.started_mono + timeout
                if now >= deadline:
                    self._mark_stuck(run)
                else:
                    soonest = min(soonest, deadline)
            if now >= next_scan:
                next_scan = now + self.watchdog_interval
                soonest = min(soonest, next_scan)
                if self._history is not None:
                    try:
                        self.scan_history()
                    except Exception as exc:
                        log.warning("scheduler %s: watchdog scan failed: %s", self.instance_id, exc)
            self._watch_wake.wait(max(0.01, min(soonest - time.monotonic(), 1.0)))
            self._watch_wake.clear()

    def _mark_stuck(self, run: _Run) -> None:
        run.stuck = True
        elapsed = time.monotonic() - run.started_mono
        text = f"still running after {elapsed:.1f}s (timeout {run.job.options.timeout:g}s)"
        with self._lock:
            run.job.last_status, run.job.last_error = "stuck", text
        self._record(
            RunRecord(
                run_id=run.run_id,
                job=run.job.name,
                tick=tick_key(run.tick),
                instance=self.instance_id,
                started=run.started_wall,
                status="stuck",
                error=text,
            )
        )
        self._emit(ev.STUCK, run.job, run.tick, reason="timeout", run_id=run.run_id, error=text)

    def scan_history(self) -> int:
        """Mark ``running`` records of vanished instances ``stuck``; returns how many.

        An instance is vanished when its liveness lease (``coordlock:instance:<id>``) can be
        taken. Runs automatically every ``watchdog_interval`` where history is kept.
        """
        history, coordinator = self._history, self._coordinator
        if history is None or coordinator is None:
            return 0
        records = [
            r
            for r in history.history(None, 500)
            if r.status == "running" and r.instance != self.instance_id
        ]
        alive: dict[str, bool] = {}
        marked = 0
        for record in records:
            if record.instance not in alive:
                probe = coordinator.acquire(INSTANCE_LEASE_PREFIX + record.instance, 1.0)
                alive[record.instance] = probe is None
                if probe is not None:
                    probe.release()
            if alive[record.instance]:
                continue
            text = f"instance {record.instance} vanished during the run"
            history.record_run(replace(record, status="stuck", error=text))
            marked += 1
            with self._lock:
                job = self._jobs.get(record.job)
            event = Event(
                kind=ev.STUCK,
                job=record.job,
                tick=None,
                key=f"{record.job}@{record.tick}",
                instance=self.instance_id,
                reason="instance-vanished",
                error=text,
                run_id=record.run_id,
            )
            if job is not None:
                with self._lock:
                    job.last_status, job.last_error = "stuck", text
            self._events.emit(event)
        return marked

    def _start_heartbeat(self) -> None:
        if self._history is None or self._coordinator is None:
            return
        try:
            self._heartbeat = self._coordinator.acquire(
                INSTANCE_LEASE_PREFIX + self.instance_id, self.heartbeat_ttl, wait=5.0
            )
        except Exception as exc:
            log.warning("scheduler %s: liveness lease not taken: %s", self.instance_id, exc)
            return
        if self._heartbeat is None:
            log.warning(
                "scheduler %s: liveness lease is held by someone else (duplicate instance_id?)",
                self.instance_id,
            )

    def _stop_heartbeat(self) -> None:
        lease, self._heartbeat = self._heartbeat, None
        if lease is not None:
            try:
                lease.release()
            except Exception as exc:
                log.debug("releasing liveness lease failed: %s", exc)

    def __repr__(self) -> str:
        return (
            f"<Scheduler {self.instance_id} {self._state} jobs={len(self._jobs)} "
            f"clock={self.clock!r}>"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (ChildFailed, JobTimeout)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
