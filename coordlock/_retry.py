"""Bounded retries of transient backend errors (tenacity), ending in BackendUnavailable."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from ._errors import BackendUnavailable

T = TypeVar("T")
log = logging.getLogger("coordlock")


def call_with_retry(
    fn: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...],
    deadline: float,
    what: str,
) -> T:
    """Run ``fn``; retry it on ``transient`` errors for up to ``deadline`` seconds.

    Waits grow exponentially from 50 ms to 1 s with jitter. When the deadline passes the last
    error is raised as :class:`BackendUnavailable` (chained). Other errors pass straight through.
    Only pass functions that are safe to repeat (idempotent for the same owner token).
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s: attempt %d failed (%s); retrying", what, state.attempt_number, exc)

    retrying = Retrying(
        stop=stop_after_delay(max(deadline, 0.0)),
        wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
        retry=retry_if_exception_type(transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except transient as exc:
        raise BackendUnavailable(f"{what}: {exc}") from exc
