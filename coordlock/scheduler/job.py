"""Job definitions, their validated options, and the context a running job can read."""

from __future__ import annotations

import inspect
import pickle
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from .._validate import check_name, check_seconds, check_ttl
from .triggers import Trigger

Misfire = Literal["skip", "run_once"]
Isolation = Literal["thread", "process"]

#: How late a tick may still start under ``misfire="skip"`` unless ``grace=`` says otherwise.
DEFAULT_SKIP_GRACE = 1.0
#: Bounds of the default no-overlap lease TTL (twice the period, clamped to these).
LEASE_TTL_MIN = 2.0
LEASE_TTL_MAX = 30.0
#: Longest a won tick waits for a run that is just ending to release the no-overlap lease.
LEASE_WAIT_MAX = 5.0


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


_current = threading.local()


def current_run() -> RunContext | None:
    """The :class:`RunContext` of the job running in this thread (or child process), else None."""
    ctx = getattr(_current, "ctx", None)
    return ctx if isinstance(ctx, RunContext) else None


def _set_current(ctx: RunContext | None) -> None:
    _current.ctx = ctx


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
) -> JobOptions:
    """Check every option; raise ``TypeError``/``ValueError`` naming the bad one."""
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


def check_callable(func: object, isolation: str) -> Callable[..., Any]:
    """A job function must be a plain (sync) callable; a process job must be picklable."""
    if not callable(func):
        raise TypeError(f"a job must be callable, not {type(func).__name__}")
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError("async job functions are not supported yet; wrap them in asyncio.run")
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
        check_name(self.name, "job name")

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


def as_seconds(value: float | timedelta) -> float:
    return check_seconds(value, "seconds")
