"""How a won tick's job is executed: one attempt in a worker thread, on an event loop or in a
child process, and the retry policy around the attempts.

Retries (tenacity, exponential backoff on the scheduler's clock) stop as soon as the run's
no-overlap lease is known lost – another instance may hold it now – or the scheduler stops; the
attempt in progress is never interrupted, but no new one starts.
"""

from __future__ import annotations

import inspect
import logging
import threading
from multiprocessing.context import BaseContext

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from .._lease import Lease
from ._clock import Clock
from .aio import LoopHost, RunCancelled
from .isolation import ChildFailed, ChildRegistry, JobTimeout, run_in_process
from .job import ASYNC, PROCESS, Run, RunContext, _set_current
from .triggers import tick_datetime

log = logging.getLogger("coordlock")


class Attempts:
    """Executes the attempts of runs for one scheduler instance."""

    def __init__(
        self,
        *,
        instance: str,
        clock: Clock,
        stopping: threading.Event,
        host: LoopHost,
        mp: BaseContext,
        children: ChildRegistry,
    ) -> None:
        self._instance = instance
        self._clock = clock
        self._stopping = stopping
        self._host = host
        self._mp = mp
        self._children = children

    def run(self, run: Run, lease: Lease | None) -> tuple[BaseException | None, int, str | None]:
        """Run the job, retrying as its options say; returns (error, attempts, why retries
        stopped early)."""
        opts = run.job.options
        fence = lease.fence if lease is not None else None
        count = 0
        last: list[BaseException] = []

        def once() -> None:
            nonlocal count
            count += 1
            try:
                self.attempt(run, fence, count)
            except BaseException as exc:
                last[:] = [exc]
                raise

        if opts.retries == 0:
            try:
                once()
            except BaseException as exc:
                return exc, count, None
            return None, count, None

        def why_stop() -> str | None:
            if run.abort.is_set():
                return run.why
            if lease is not None and lease.lost:
                return lost_text(lease)
            if self._stopping.is_set():
                return "scheduler stopping"
            return None

        def worth_retrying(exc: BaseException) -> bool:
            return isinstance(exc, Exception) and why_stop() is None

        def backoff(seconds: float) -> None:
            if seconds > 0 and why_stop() is None:
                self._clock.wait(seconds, run.abort)
            if why_stop() is not None:
                raise _Abandon

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "job %s attempt %d failed (%s); retrying",
                run.key,
                state.attempt_number,
                describe(exc) if exc else "?",
            )

        retrying = Retrying(
            stop=stop_after_attempt(opts.retries + 1),
            wait=wait_exponential(multiplier=opts.backoff, max=opts.backoff_max),
            retry=retry_if_exception(worth_retrying),
            sleep=backoff,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(once)
        except _Abandon:
            return (last[0] if last else None), count, why_stop()
        except BaseException as exc:
            return exc, count, why_stop()
        return None, count, None

    def attempt(self, run: Run, fence: int | None, attempt: int) -> None:
        job = run.job
        opts = job.options
        ctx = RunContext(
            job=job.name,
            tick=tick_datetime(run.tick),
            key=run.key,
            instance=self._instance,
            run_id=run.run_id,
            attempt=attempt,
            fence=fence,
        )
        if run.kind == PROCESS:
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
        if job.is_async:
            self._host.run(lambda: job.func(*job.args, **job.kwargs), ctx, opts.timeout)
            return
        _set_current(ctx)
        try:
            result = job.func(*job.args, **job.kwargs)
        finally:
            _set_current(None)
        if inspect.isawaitable(result):  # a sync wrapper around a coroutine function
            run.kind = ASYNC
            awaitable = result
            self._host.run(lambda: awaitable, ctx, opts.timeout)


class _Abandon(Exception):
    """Raised from the backoff sleep to stop retrying."""


def lost_text(lease: Lease) -> str:
    """Why retries stop when ``lease`` is lost."""
    return f"no-overlap lease lost: {lease.lost_reason or 'unknown reason'}"


def describe(exc: BaseException) -> str:
    """The exception as event/history text: ``Type: message`` (our own errors: the message)."""
    text = str(exc)
    if isinstance(exc, (ChildFailed, JobTimeout, RunCancelled)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
