"""Job definitions, their validated options, and the context a running job can read."""

from __future__ import annotations

import inspect
import json
import pickle
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Literal

from .._validate import MAX_NAME_LENGTH, check_name, check_seconds, check_ttl, unknown_options
from .triggers import UTC, CronTrigger, Trigger

Misfire = Literal["skip", "run_once"]
Isolation = Literal["thread", "process"]

#: How late a tick may still start under ``misfire="skip"`` unless ``grace=`` says otherwise.
DEFAULT_SKIP_GRACE = 1.0
#: Bounds of the default no-overlap lease TTL (twice the period, clamped to these).
LEASE_TTL_MIN = 2.0
LEASE_TTL_MAX = 30.0
#: Longest a won tick waits for a run that is just ending to release the no-overlap lease.
LEASE_WAIT_MAX = 5.0
#: Longest JSON text of a job's return value kept in run history (characters).
RESULT_MAX = 16_384
#: Longest tick name in a claim key: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.
TICK_NAME_MAX = 27
#: Longest job name: its claim key ``f"{name}@{tick}"`` must fit the coordinator's name limit.
MAX_JOB_NAME = MAX_NAME_LENGTH - 1 - TICK_NAME_MAX


@dataclass(frozen=True)
class RunContext:
    """What a running job can learn about its run through :func:`current_run`.

    ``fence`` is the fencing token of the job's no-overlap lease (``None`` with
    ``overlap=True``): pass it to the resource the job writes so a stale run is rejected.
    """

    job: str
    tick: datetime
    key: str
    instance: str
    run_id: str
    attempt: int
    fence: int | None


def encode_result(value: object) -> str | None:
    """A job's return value as the JSON text history keeps: ``None`` for ``None``; a value
    JSON cannot encode is kept as the JSON string of its ``repr``; a text longer than
    :data:`RESULT_MAX` characters as ``{"truncated": true, "length": N, "head": "…"}``."""
    if value is None:
        return None
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(repr(value), ensure_ascii=False)
    if len(text) > RESULT_MAX:
        text = json.dumps(
            {"truncated": True, "length": len(text), "head": text[:200]}, ensure_ascii=False
        )
    return text


# A context variable, not a thread-local: coroutine jobs share the event loop's thread, and
# each asyncio task sees its own copy of the context.
_current: ContextVar[RunContext | None] = ContextVar("coordlock_current_run", default=None)


def current_run() -> RunContext | None:
    """The :class:`RunContext` of the job running in this thread, task or child process, else
    ``None``."""
    return _current.get()


def _set_current(ctx: RunContext | None) -> None:
    _current.set(ctx)


@dataclass
class JobOptions:
    """Validated per-job options (see :meth:`Scheduler.add`)."""

    overlap: bool = False
    misfire: Misfire = "skip"
    grace: float | None = None
    timeout: float | None = None
    isolation: Isolation = "thread"
    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 60.0
    hold: float | None = None
    lease_ttl: float | None = None


def build_options(
    *,
    overlap: object = False,
    misfire: object = "skip",
    grace: object = None,
    timeout: object = None,
    isolation: object = "thread",
    retries: object = 0,
    backoff: object = 1.0,
    backoff_max: object = 60.0,
    hold: object = None,
    lease_ttl: object = None,
    **unknown: object,
) -> JobOptions:
    """Check every option; raise ``TypeError``/``ValueError`` naming the bad one, and
    ``ConfigurationError`` (with "did you mean") for an option that does not exist."""
    if unknown:
        known = [p for p in inspect.signature(build_options).parameters if p != "unknown"]
        raise unknown_options("a scheduled job", unknown, known)
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, not {type(overlap).__name__}")
    if misfire not in ("skip", "run_once"):
        raise ValueError(f"misfire must be 'skip' or 'run_once', not {misfire!r}")
    if isolation not in ("thread", "process"):
        raise ValueError(f"isolation must be 'thread' or 'process', not {isolation!r}")
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, not {type(retries).__name__}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return JobOptions(
        overlap=overlap,
        misfire=misfire,
        grace=None if grace is None else check_seconds(grace, "grace", allow_zero=True),
        timeout=None if timeout is None else check_seconds(timeout, "timeout"),
        isolation=isolation,
        retries=retries,
        backoff=check_seconds(backoff, "backoff", allow_zero=True),
        backoff_max=check_seconds(backoff_max, "backoff_max", allow_zero=True),
        hold=None if hold is None else check_seconds(hold, "hold"),
        lease_ttl=None if lease_ttl is None else check_ttl(lease_ttl),
    )


def check_job_name(name: object) -> str:
    """A job name whose claim key ``f"{name}@{tick}"`` every backend can store.

    ``ValueError`` for a name longer than :data:`MAX_JOB_NAME` characters (its claim key would
    pass the 512-character limit of coordinator names) and for one that is not valid Unicode
    text (a lone surrogate cannot be encoded as UTF-8, which every server backend stores).
    """
    if isinstance(name, str) and len(name) > MAX_JOB_NAME:
        raise ValueError(
            f"job name is {len(name)} characters long: its claim key '<name>@<tick>' must fit "
            f"in {MAX_NAME_LENGTH} characters, so a job name may have at most {MAX_JOB_NAME}"
        )
    checked = check_name(name, "job name")
    try:
        checked.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"job name {checked!r} is not valid Unicode text: lone surrogate at position "
            f"{exc.start} (claim keys are stored as UTF-8)"
        ) from None
    return checked


def is_coroutine_job(func: Callable[..., Any]) -> bool:
    """``True`` for an ``async def`` function (or a partial/callable object wrapping one)."""
    if inspect.iscoroutinefunction(func):
        return True
    if inspect.isfunction(func) or inspect.ismethod(func):
        return False
    return inspect.iscoroutinefunction(type(func).__call__)


def check_callable(func: object, isolation: str) -> Callable[..., Any]:
    """A job is a callable or an ``async def`` function (not an async generator); a process
    job must be picklable."""
    if not callable(func):
        raise TypeError(f"a job must be callable, not {type(func).__name__}")
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise TypeError(
            "a job must be a function or an async def coroutine function, not a generator"
        )
    if isolation == "process":
        if inspect.isfunction(func):
            # Pickled by reference (module + qualname). Not pickle.dumps() here: under a
            # decorator the module-level name is not bound yet.
            if "<locals>" in func.__qualname__ or "<lambda>" in func.__qualname__:
                raise TypeError(
                    "isolation='process' needs a picklable job: a module-level function, "
                    f"not {func.__qualname__!r}"
                )
        else:
            try:
                pickle.dumps(func)
            except Exception as exc:
                raise TypeError(
                    f"isolation='process' needs a picklable job (a module-level function): {exc}"
                ) from exc
    return func


def default_name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or "job"
    qualname = getattr(func, "__qualname__", None) or type(func).__name__
    return f"{module}.{qualname}"


@dataclass(eq=False)
class Job:
    """A registered job and its scheduling state (owned by the scheduler loop)."""

    name: str
    func: Callable[..., Any]
    trigger: Trigger
    options: JobOptions
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: an ``async def`` job: runs on an event loop (see :mod:`.aio`)
    is_async: bool = False
    #: next tick this instance has not yet dealt with (epoch seconds; None = never again)
    next_fire: float | None = None
    #: heap entries carry this; a stale entry (older version) is ignored
    version: int = 0
    #: set while the first tick is one that passed just before activation (judged then)
    activated_at: float | None = None
    pending: int = 0  # runs won but not yet started here
    running: int = 0  # runs executing here
    last_tick: float | None = None
    last_status: str | None = None
    last_error: str | None = None
    last_finished: float | None = None

    def __post_init__(self) -> None:
        check_job_name(self.name)

    def note(self, tick: float, status: str, error: str | None = None) -> None:
        """Remember the outcome of ``tick`` for :meth:`Scheduler.jobs` (caller holds the lock)."""
        self.last_tick, self.last_status, self.last_error = tick, status, error

    def grace_for(self, tick: float, following: float | None) -> float:
        """How late ``tick`` may still start (never beyond the next tick: no catch-up bursts)."""
        opts = self.options
        if opts.grace is not None:
            grace = opts.grace
        elif opts.misfire == "run_once":
            grace = float("inf")
        else:
            grace = DEFAULT_SKIP_GRACE
        if following is not None:
            grace = min(grace, following - tick)
        return grace

    def hold_for(self, tick: float, following: float | None, skew: float) -> float:
        """Seconds the tick's claim is held: the period (or grace) plus the skew tolerance."""
        if self.options.hold is not None:
            return self.options.hold
        period = (following - tick) if following is not None else self.trigger.nominal_period()
        return period + skew

    def lease_wait(self, tick: float, following: float | None, now: float) -> float:
        """How long a won tick waits for the no-overlap lease: what is left of its grace, at
        most half a period and :data:`LEASE_WAIT_MAX`."""
        period = (following - tick) if following is not None else self.trigger.nominal_period()
        limit = min(period / 2, LEASE_WAIT_MAX)
        return max(0.0, min(tick + self.grace_for(tick, following) - now, limit))

    def lease_ttl(self) -> float:
        if self.options.lease_ttl is not None:
            return self.options.lease_ttl
        return min(max(2.0 * self.trigger.nominal_period(), LEASE_TTL_MIN), LEASE_TTL_MAX)


#: How a run executes: in a worker thread, on an event loop, or in a child process.
THREAD, ASYNC, PROCESS = "thread", "async", "process"


@dataclass(eq=False)
class Run:
    """One won tick of one job on this instance, from the claim to the outcome."""

    job: Job
    tick: float
    following: float | None
    key: str
    run_id: str
    claimed_at: float  # scheduler clock
    kind: str  # THREAD, ASYNC or PROCESS
    #: set to stop retrying (lease lost, scheduler stopping); ``why`` says which
    abort: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    started_wall: float | None = None  # None while queued
    started_mono: float = 0.0
    #: its ``running`` row is written: only then may the watchdog mark it ``stuck`` (a stuck row
    #: written first would be overwritten by the late ``running`` one)
    recorded: bool = False
    stuck: bool = False
    #: asked for by run_now(), not a tick of the schedule
    manual: bool = False
    #: the job's return value as JSON text (set when an attempt returns)
    result: str | None = None

    def stop_retrying(self, why: str) -> None:
        if not self.abort.is_set():
            self.why = why
            self.abort.set()


@dataclass(frozen=True)
class JobInfo:
    """A job as shown by :meth:`Scheduler.jobs`. Times are aware datetimes in the job's zone
    for cron jobs and UTC for interval jobs."""

    name: str
    trigger: str
    next_run: datetime | None
    last_tick: datetime | None
    last_status: str | None
    last_error: str | None
    last_finished: datetime | None
    running: int
    overlap: bool
    misfire: str
    isolation: str
    timeout: float | None


def job_info(job: Job, next_fire: float | None) -> JobInfo:
    """The :class:`JobInfo` of ``job`` (times in the job's cron zone, else UTC)."""
    zone: tzinfo = job.trigger.zone if isinstance(job.trigger, CronTrigger) else UTC

    def when(ts: float | None) -> datetime | None:
        return None if ts is None else datetime.fromtimestamp(ts, zone)

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
