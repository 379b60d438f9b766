"""Bounded retries of transient backend errors (tenacity), and the translation of every driver
error into a :class:`~coordlock.CoordlockError` (see :mod:`coordlock._errors_table`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from ._errors import BackendError, BackendUnavailable, ConfigurationError, CoordlockError
from ._errors_table import PERMANENT, TRANSIENT, Kind, classify, is_driver_error

T = TypeVar("T")
log = logging.getLogger("coordlock")


class _StopWhen(stop_base):
    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


class RetryPolicy:
    """How one coordinator retries: which errors are transient, for how long, and how errors
    are reported. Shared by the sync and the async I/O paths (only the call differs).

    * ``deadline`` – seconds to keep retrying a transient error (the ``retry_deadline`` option).
    * ``extra_transient`` – a backend's own transient classes (for drivers the table lacks).
    * ``stopped`` – returns ``True`` once retrying is pointless (the coordinator was closed).
    """

    def __init__(
        self,
        deadline: float,
        *,
        extra_transient: tuple[type[BaseException], ...] = (),
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.deadline = deadline
        self.extra_transient = extra_transient
        self.stopped = stopped

    def kind(self, exc: BaseException) -> Kind | None:
        """``transient``, ``permanent`` or ``None`` (unknown) for ``exc``."""
        if isinstance(exc, CoordlockError):
            return None
        rule = classify(exc)
        if rule is not None:
            return rule.kind
        if self.extra_transient and isinstance(exc, self.extra_transient):
            return TRANSIENT
        return None

    def translate(self, exc: BaseException, what: str) -> BaseException:
        """The error a caller sees for ``exc`` (``exc`` itself when it is not a driver error)."""
        if isinstance(exc, CoordlockError):
            return exc
        rule = classify(exc)
        kind = rule.kind if rule is not None else self.kind(exc)
        hint = f" ({rule.hint})" if rule is not None and rule.hint else ""
        if kind == PERMANENT:
            return ConfigurationError(f"{what}: {exc}{hint}")
        if kind == TRANSIENT:
            return BackendUnavailable(f"{what}: {exc}{hint}")
        if is_driver_error(exc):
            return BackendError(f"{what}: {type(exc).__name__}: {exc}")
        return exc

    def first_failure(self, exc: BaseException, what: str, deadline: float | None) -> None:
        """Called when a call's first, bare attempt failed: raise at once unless the error is
        transient and retrying makes sense; else log the one warning of this retry sequence."""
        budget = self.deadline if deadline is None else min(deadline, self.deadline)
        if self.kind(exc) != TRANSIENT or budget <= 0 or self.stopped():
            raise self._final(exc, what)
        log.warning(
            "%s: %s; retrying for up to %gs", what, exc, budget,
            extra={"event": "retry", "operation": what, "outcome": "retrying",
                   "error": f"{type(exc).__name__}: {exc}", "duration": budget},
        )  # fmt: skip

    def _final(self, exc: BaseException, what: str) -> BaseException:
        err = self.translate(exc, what)
        if err is not exc:
            err.__cause__ = exc
        return err

    def retrying_options(self, what: str, deadline: float | None) -> dict[str, Any]:
        """tenacity options for the retries after a failed first attempt."""
        budget = self.deadline if deadline is None else min(deadline, self.deadline)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug(
                "%s: attempt %d failed (%s)", what, state.attempt_number + 1, exc,
                extra={"event": "retry", "operation": what, "outcome": "failed",
                       "attempt": state.attempt_number + 1, "error": repr(exc)},
            )  # fmt: skip

        return {
            "stop": stop_after_delay(max(budget, 0.0)) | _StopWhen(self.stopped),
            "wait": wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
            "retry": retry_if_exception(lambda e: self.kind(e) == TRANSIENT),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def call(
        self, fn: Callable[..., T], what: str, deadline: float | None = None,
        args: tuple[Any, ...] = (),
    ) -> T:
        """Run ``fn(*args)``; on a transient error retry it (only ``fn`` safe to repeat!)."""
        try:
            return fn(*args)
        except Exception as exc:
            self.first_failure(exc, what, deadline)
        try:
            return Retrying(**self.retrying_options(what, deadline))(fn, *args)
        except Exception as exc:
            raise self._final(exc, what)  # noqa: B904 (the cause is set by _final)

    async def acall(
        self, fn: Callable[..., Awaitable[T]], what: str, deadline: float | None = None,
        args: tuple[Any, ...] = (),
    ) -> T:
        """:meth:`call` for coroutine functions."""
        try:
            return await fn(*args)
        except Exception as exc:
            self.first_failure(exc, what, deadline)

        async def attempt() -> T:  # a coroutine function, so tenacity awaits each try
            return await fn(*args)

        try:
            return await AsyncRetrying(**self.retrying_options(what, deadline))(attempt)
        except Exception as exc:
            raise self._final(exc, what)  # noqa: B904 (the cause is set by _final)


def call_with_retry(
    fn: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...],
    deadline: float,
    what: str,
) -> T:
    """Run ``fn`` with retries of ``transient`` errors (and the table's) for ``deadline`` s."""
    return RetryPolicy(deadline, extra_transient=transient).call(fn, what)
