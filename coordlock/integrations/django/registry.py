"""The process's Scheduler for Django and the decorators that put jobs on it.

Jobs registered here run on the Scheduler that ``manage.py coordlock_scheduler`` starts. Each
thread-run job closes the database connections Django considers stale before and after the run
(as Django does around a request), so a job never inherits a broken connection.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ...scheduler import Scheduler
from ...scheduler.job import default_name

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_scheduler: Scheduler | None = None
_overrides: dict[str, Any] = {}


def scheduler_options() -> dict[str, Any]:
    """The Scheduler's keyword options: ``settings.COORDLOCK_SCHEDULER``, with the timezone
    defaulting to ``settings.TIME_ZONE``. Raises ``TypeError``/``ValueError`` when bad."""
    from django.conf import settings

    options = getattr(settings, "COORDLOCK_SCHEDULER", None) or {}
    if not isinstance(options, dict):
        raise TypeError(f"must be a dict, not {type(options).__name__}")
    options = {**options, **_overrides}
    options.setdefault("timezone", getattr(settings, "TIME_ZONE", None) or "UTC")
    if "coordinator" in options:
        raise ValueError("set the coordinator with COORDLOCK_URL, not COORDLOCK_SCHEDULER")
    Scheduler(**options)  # validates every option (no thread, no connection)
    return options


def get_scheduler() -> Scheduler:
    """The process-wide Scheduler for Django jobs (built from settings on first use; its
    coordinator is ``coordlock.get_coordinator()``, looked up when it starts)."""
    global _scheduler
    with _lock:
        if _scheduler is None:
            _scheduler = Scheduler(**scheduler_options())
        return _scheduler


def set_instance_id(instance_id: str) -> None:
    """Name this process in events and history (before the Scheduler is built)."""
    with _lock:
        if _scheduler is not None:
            raise RuntimeError("the scheduler already exists: set the instance id first")
        _overrides["instance_id"] = instance_id


def _with_connections(func: F) -> F:
    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        from django.db import close_old_connections

        close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return run  # type: ignore[return-value]


def _prepare(func: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
    if options.get("isolation", "thread") == "process":
        raise ValueError(
            "isolation='process' is not supported for Django jobs: the child process would "
            "run without Django set up; use the default isolation='thread' and timeout="
        )
    return _with_connections(func)


def add(
    func: Callable[..., Any],
    trigger: Any,
    *,
    name: str | None = None,
    **options: Any,
) -> str:
    """Register ``func`` (options as ``coordlock.Scheduler.add``); returns the job name."""
    job_name = name if name is not None else default_name(func)
    return get_scheduler().add(_prepare(func, options), trigger, name=job_name, **options)


def cron(
    expr: str, *, name: str | None = None, timezone: str | None = None, **options: Any
) -> Callable[[F], F]:
    """Decorator: run on a cron schedule (timezone: the job's, else ``TIME_ZONE``)."""
    register = get_scheduler().cron(expr, name=name, timezone=timezone, **options)

    def decorate(func: F) -> F:
        register(_prepare(func, options))
        return func

    return decorate


def every(
    seconds: float | timedelta,
    *,
    name: str | None = None,
    offset: float | timedelta = 0.0,
    **options: Any,
) -> Callable[[F], F]:
    """Decorator: run every ``seconds`` (ticks aligned to the Unix epoch, plus ``offset``)."""
    register = get_scheduler().every(seconds, name=name, offset=offset, **options)

    def decorate(func: F) -> F:
        register(_prepare(func, options))
        return func

    return decorate


def autodiscover() -> list[str]:
    """Import ``jobs.py`` of every installed app; returns the registered job names."""
    from django.utils.module_loading import autodiscover_modules

    autodiscover_modules("jobs")
    return [job.name for job in get_scheduler().jobs()]
