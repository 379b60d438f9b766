"""The :class:`Scheduler`: asks the coordinator before every tick, so each named job runs once
per tick across every instance that registers it.

One tick of one job, on every instance:

1. The loop wakes at the tick (by this instance's clock) and collects every job due now
   (:mod:`.planner`).
2. It claims ``f"{job}@{tick_utc_iso}"`` for all of them in one ``claim_many`` call (one
   ``claim`` per job where the coordinator has no ``claim_many``; :mod:`.claims`). The claim is
   held for the job's period plus the skew tolerance, so an instance whose clock is late asks
   after the winner and still loses. Claims are per tick: a long hold never blocks the next tick.
3. Losers report ``skipped(claimed-elsewhere)`` (:mod:`.dispatch`). The winner records the
   claim in run history and hands the tick to :mod:`.runner`: for an ``overlap=False`` job it
   only now takes the name-level lease ``coordlock:job:{name}`` (renewed while the run goes);
   if a previous run still holds it anywhere the tick is ``skipped(running)``.
4. The run goes to a bounded pool of worker threads (a coroutine job runs on an event loop,
   :mod:`.aio`; a process job in a child, :mod:`.isolation`), with retries and a timeout
   (:mod:`.attempts`); ``started``/``finished``/``failed`` are emitted, logged and written to
   run history (:mod:`.report`).
5. The :mod:`.watchdog` reports runs past their timeout, runs of vanished instances and ticks
   claimed by an instance that vanished before starting them.

When the coordinator cannot be asked the tick does not run (fail closed):
``skipped(coordinator-error)``, and the loop carries on with the next tick.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta, tzinfo
from types import FrameType
from typing import Any, TypeVar, overload

from .._api import get_coordinator
from .._protocol import KeepsHistory, RunCoordinator
from .._registry import connect
from .._validate import check_name, check_seconds
from . import events as ev
from ._clock import Clock, SystemClock
from .aio import LoopHost
from .claims import check_instance_id
from .dispatch import claim_and_dispatch
from .events import Callback, EventBus
from .isolation import make_context
from .job import (
    Job,
    JobInfo,
    build_options,
    check_callable,
    check_job_name,
    default_name,
    is_coroutine_job,
    job_info,
)
from .planner import Planner
from .report import Reporter
from .runner import Pool, Runner
from .triggers import CronTrigger, IntervalTrigger, Trigger, resolve_timezone
from .watchdog import Liveness, Watchdog

log = logging.getLogger("coordlock")

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=Callback)


def default_instance_id() -> str:
    """``host:pid:random`` – unique per scheduler object."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


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
    * ``max_workers`` – size of the thread pool that runs jobs (default 10); a coroutine job
      occupies a worker thread while it runs on its event loop.
    * ``shutdown_grace`` – how long :meth:`stop`/:meth:`run_forever` let running jobs finish
      (default 30 s); process-isolated jobs still running then are killed, coroutine jobs
      cancelled.
    * ``watchdog_interval`` – how often (real seconds) run history is scanned for runs and
      claimed ticks of vanished instances, where the coordinator keeps history (default 30).
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
        self.instance_id = check_instance_id(
            instance_id if instance_id is not None else default_instance_id()
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

        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._coordinator: RunCoordinator | None = None
        self._owns_coordinator = False
        self._state = "new"  # new → running → stopped
        self._stopping = threading.Event()
        self._stop_requested = threading.Event()
        self._wake = threading.Event()
        self._watch_wake = threading.Event()  # a run with a timeout started, a lease lost…
        self._thread: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None

        self._events = EventBus()
        self._report = Reporter(self.instance_id, self._events, self._lock)
        self._planner = Planner(self._lock)
        self._host = LoopHost(f"coordlock-{self.instance_id}")
        self._runner = Runner(
            instance=self.instance_id,
            clock=self.clock,
            report=self._report,
            lock=self._lock,
            stopping=self._stopping,
            host=self._host,
            mp=make_context(mp_context),
            watch_wake=self._watch_wake,
        )
        self._liveness = Liveness(self.instance_id, self.heartbeat_ttl, self._watch_wake)
        self._watchdog = Watchdog(
            instance=self.instance_id,
            clock=self.clock,
            report=self._report,
            runner=self._runner,
            liveness=self._liveness,
            interval=self.watchdog_interval,
            find_job=self._jobs.get,
            wake=self._watch_wake,
            stopping=self._stopping,
        )

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
        if name is not None:
            check_job_name(name)

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
        if name is not None:
            check_job_name(name)

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

        ``func`` is a function or an ``async def`` coroutine function (run on the event loop
        of :meth:`astart`, else on the scheduler's own). ``trigger``: a :class:`Trigger`, a
        cron string (in the scheduler's timezone) or an interval in seconds/timedelta. The name
        must leave its claim key ``name@<tick>`` within 512 characters (at most 484) and be
        valid Unicode text: ``ValueError`` here otherwise. Options:

        * ``overlap=False`` – a run still going when the next tick comes makes that tick
          ``skipped(running)`` on every instance (a name-level lease held during the run).
        * ``misfire="skip"`` – a tick this instance reaches later than ``grace`` (default 1 s)
          is ``missed``; ``"run_once"`` runs the newest missed tick once, late, if no instance
          ran it (``grace`` defaults to "until the next tick"). Never a burst of catch-up runs.
        * ``timeout=`` – seconds; a thread job past it is reported ``stuck``; a coroutine job
          is cancelled and a process job killed, both ``failed``.
        * ``isolation="thread"`` | ``"process"`` – run in a worker thread (a coroutine job: on
          the event loop) or a child process (a coroutine job: under ``asyncio.run``).
        * ``retries=0``, ``backoff=1.0``, ``backoff_max=60`` – retry a failing run with
          exponential backoff (tenacity) within the same tick; never once the run's
          no-overlap lease is lost.
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
        job_name = check_job_name(name if name is not None else default_name(func))
        job = Job(job_name, func, trig, opts, args, dict(kwargs or {}), is_coroutine_job(func))
        with self._lock:
            if job_name in self._jobs:
                raise ValueError(f"a job named {job_name!r} is already registered")
            self._jobs[job_name] = job
            if self._planner.active:
                self._planner.activate(job, self.clock.time())
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
        threads (never on the application's event loop): keep them short; their exceptions
        are logged, not raised.
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
            now = self.clock.time()
            return [
                job_info(
                    job, job.next_fire if self._planner.active else job.trigger.next_after(now)
                )
                for job in sorted(self._jobs.values(), key=lambda j: j.name)
            ]

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
        ``NotConfigured`` if there is none). Coroutine jobs run on a loop the scheduler owns;
        in an asyncio application use :meth:`astart` to run them on the application's loop."""
        with self._lock:
            if self._state == "running":
                raise RuntimeError("the scheduler is already running")
            if self._state == "stopped":
                raise RuntimeError("a stopped scheduler cannot be restarted; create a new one")
            coordinator = self._resolve()
            self._state = "running"
            self._stopping.clear()
            self._runner.pool = Pool(self.max_workers, f"coordlock-job-{self.instance_id}")
            self._planner.activate_all(self._jobs.values(), self.clock.time())
            has_async = any(job.is_async for job in self._jobs.values())
        if has_async and self._host.bound is None and _in_event_loop():
            log.warning(
                "scheduler %s: start() called inside a running event loop; its coroutine jobs "
                "run on the scheduler's own loop, not this one (use `await sched.astart()`)",
                self.instance_id,
            )
        if self._report.history is not None:
            self._liveness.take(coordinator, wait=5.0)
        self._thread = threading.Thread(
            target=self._loop, name=f"coordlock-scheduler-{self.instance_id}", daemon=True
        )
        self._thread.start()
        self._watch_thread = threading.Thread(
            target=self._watchdog.serve, name=f"coordlock-watchdog-{self.instance_id}", daemon=True
        )
        self._watch_thread.start()
        log.info(
            "scheduler %s started with %d job(s) on %s",
            self.instance_id,
            len(self._jobs),
            type(coordinator).__name__,
        )

    async def astart(self) -> None:
        """Start from inside a running event loop (a FastAPI/Starlette lifespan, an aiohttp
        startup hook): coroutine jobs then run on *this* loop. The blocking part of starting
        (connecting, taking the liveness lease) runs in a thread, and so does every later
        coordinator call: the loop is never blocked by the scheduler. Stop with
        :meth:`astop`."""
        import asyncio

        loop = asyncio.get_running_loop()
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"astart() on a scheduler that is {self._state}")
            self._host.bind(loop)
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            self._host.close()
            raise

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop scheduling. With ``wait``, let running jobs finish for up to ``timeout`` seconds
        (default ``shutdown_grace``); process jobs still running then are killed and coroutine
        jobs cancelled. Won ticks not yet started are reported ``skipped(stopping)``.
        Idempotent. From the event loop given to :meth:`astart`, use :meth:`astop`."""
        if wait and self.running and self._host.in_bound_loop():
            raise RuntimeError(
                "stop() would block the event loop its coroutine jobs run on while waiting for "
                "them: use `await sched.astop()`"
            )
        with self._lock:
            if self._state != "running":
                self._state = "stopped" if self._state == "new" else self._state
                if self._runner.idle():
                    self._host.close()  # run_pending() may have started the own loop
                return
            self._state = "stopped"
        self._stopping.set()
        self._stop_requested.set()
        self._runner.stop_retrying("scheduler stopping")
        self._wake.set()
        self._watch_wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._runner.pool is not None:
            self._runner.pool.shutdown()
        if wait:
            grace = (
                self.shutdown_grace
                if timeout is None
                else check_seconds(timeout, "timeout", allow_zero=True)
            )
            if not self._runner.wait_idle(grace):
                left = [run.key for run in self._runner.runs()]
                killed = self._runner.kill_stragglers()
                log.warning(
                    "scheduler %s stopped with %d run(s) still going after %.1fs: %s%s",
                    self.instance_id,
                    len(left),
                    grace,
                    ", ".join(left),
                    f" ({killed} child process(es) killed or task(s) cancelled)" if killed else "",
                )
                self._runner.wait_idle(5.0)
        if self._watch_thread is not None and self._watch_thread is not threading.current_thread():
            self._watch_thread.join(5)
        self._liveness.release()
        idle = self._runner.idle()
        if idle:
            self._host.close()
        if self._owns_coordinator and self._coordinator is not None and (wait or idle):
            self._coordinator.close()
        log.info("scheduler %s stopped", self.instance_id)

    async def astop(self, wait: bool = True, timeout: float | None = None) -> None:
        """:meth:`stop` for an asyncio application: waits in a thread, so coroutine jobs still
        going on this loop can finish meanwhile."""
        import asyncio

        await asyncio.to_thread(self.stop, wait, timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no run is going or queued (``True``) or ``timeout`` real seconds pass."""
        return self._runner.wait_idle(timeout)

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
            self._planner.activate_all(self._jobs.values(), self.clock.time())
            self._runner.inline = []
        try:
            self._step(self.clock.time())
            inline, self._runner.inline = self._runner.inline, None
            return sum(1 for fn in inline or [] if fn())
        finally:
            self._runner.inline = None

    def scan_history(self) -> int:
        """Report runs and claimed ticks of vanished instances; returns how many rows it marked.

        ``running`` rows become ``stuck`` and ``claimed`` rows past their grace ``missed``
        (event, history, log) when their instance's liveness lease
        (``coordlock:instance:<id>``) can be taken. Runs by itself every ``watchdog_interval``
        where history is kept.
        """
        return self._watchdog.scan()

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
            self._report.history = coord if isinstance(coord, KeepsHistory) else None
            self._runner.coordinator = coord
            self._watchdog.since = self.clock.time()
        return self._coordinator

    # -- the loop thread ---------------------------------------------------------------------

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
            wake = self._planner.next_wake(self._jobs)
            timeout = 3600.0 if wake is None else wake - self.clock.time()
            if timeout > 0:
                self.clock.wait(timeout, self._wake)

    def _step(self, now: float) -> None:
        """Deal with every job due at ``now``: plan, claim, hand the won ticks to the runner."""
        due, missed = self._planner.take_due(now, self._jobs)
        for miss in missed:
            self._report.note(miss.job, miss.tick, "missed")
            self._report.event(ev.MISSED, miss.job, miss.tick, reason=ev.LATE, count=miss.count)
        if due:
            coordinator = self._coordinator
            assert coordinator is not None
            claim_and_dispatch(
                due, coordinator, self.skew_tolerance, self._lock, self._report, self._runner
            )

    def __repr__(self) -> str:
        return (
            f"<Scheduler {self.instance_id} {self._state} jobs={len(self._jobs)} "
            f"clock={self.clock!r}>"
        )


def _in_event_loop() -> bool:
    asyncio = sys.modules.get("asyncio")  # not imported: no loop can be running
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
