"""What the framework adapters share: building the guard from their arguments."""

from __future__ import annotations

from typing import Any

from ._core import CronGuard


def guard_of(job: str | CronGuard, options: dict[str, Any]) -> CronGuard:
    """``job`` itself when it is a :class:`CronGuard` (then no options), else a new guard."""
    if isinstance(job, CronGuard):
        if options:
            raise TypeError("pass either a CronGuard or a job name with options, not both")
        return job
    return CronGuard(job, **options)


def copy_identity(target: Any, func: Any) -> None:
    """Give ``target`` the name and docstring of ``func`` without ``__wrapped__`` (frameworks
    would read ``func``'s signature through it and pass the wrong arguments)."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        value = getattr(func, attr, None)
        if value is not None:
            setattr(target, attr, value)
