"""Where coroutine jobs run: the application's event loop, or one the scheduler owns.

``await sched.astart()`` binds the loop it was awaited on (a FastAPI/Starlette lifespan, an
aiohttp app): coroutine jobs then run *on that loop*, next to the application's own tasks, and
may use its connection pools. Without a bound loop (``start()``, ``run_pending()``) the
scheduler starts its own loop in a daemon thread on first use, and stops it at ``stop()``.

Only the job's coroutine runs on the loop. Everything that talks to the coordinator (claims,
leases, history) stays in the scheduler's threads: a worker thread hands the coroutine to the
loop and waits for its outcome, so a slow coordinator never stalls the application's loop. A
timeout cancels the job's task (:class:`~coordlock.scheduler.JobTimeout`).

``asyncio`` is imported on first use only: a program without coroutine jobs does not pay for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

from .isolation import JobTimeout
from .job import RunContext, _set_current

log = logging.getLogger("coordlock")


class RunCancelled(Exception):
    """A coroutine run was cancelled because its scheduler stopped before it ended."""


class LoopHost:
    """The event loop of one scheduler's coroutine jobs, and their outstanding tasks."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._bound: asyncio.AbstractEventLoop | None = None
        self._owned: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._futures: set[concurrent.futures.Future[Any]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run coroutine jobs on ``loop`` (the application's) from now on."""
        with self._lock:
            self._bound = loop

    @property
    def bound(self) -> asyncio.AbstractEventLoop | None:
        """The application's loop given to :meth:`bind` (``None``: the scheduler's own)."""
        return self._bound

    def in_bound_loop(self) -> bool:
        """``True`` when called from a coroutine or callback of the bound loop."""
        if self._bound is None:
            return False
        import asyncio

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is self._bound

    def run(
        self, make: Callable[[], Awaitable[object]], ctx: RunContext, timeout: float | None
    ) -> object:
        """Run the awaitable ``make()`` returns as a task on the loop, from a worker thread;
        block until it ends and return its result or raise its exception.

        ``make`` is called on the loop's thread, inside the task, with :func:`current_run`
        set to ``ctx``. At ``timeout`` seconds the task is cancelled and :class:`JobTimeout`
        raised once it has ended (a coroutine that swallows the cancellation keeps the worker
        until it does; the watchdog reports it ``stuck``).
        """
        import asyncio

        loop = self._loop()
        future = asyncio.run_coroutine_threadsafe(_supervise(make, ctx, timeout), loop)
        with self._lock:
            self._futures.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RunCancelled("cancelled: the scheduler stopped before the run ended") from None
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel_all(self) -> int:
        """Cancel every outstanding coroutine run; returns how many there were."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        return len(futures)

    def close(self) -> None:
        """Stop the scheduler's own loop (if one was started) and forget the bound one."""
        with self._lock:
            owned, thread = self._owned, self._thread
            self._owned = self._thread = self._bound = None
        if owned is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            owned.call_soon_threadsafe(owned.stop)
        thread.join(5)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            bound = self._bound
            if bound is not None:
                if bound.is_closed() or not bound.is_running():
                    raise RuntimeError(
                        "the event loop the scheduler was started on (await sched.astart()) is "
                        "no longer running: await sched.astop() before the application's loop "
                        "ends"
                    )
                return bound
            if self._owned is None:
                import asyncio

                ready = threading.Event()
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop, ready), name=f"{self._name}-loop", daemon=True
                )
                thread.start()
                ready.wait()
                self._owned, self._thread = loop, thread
            return self._owned


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    import asyncio

    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _supervise(
    make: Callable[[], Awaitable[object]], ctx: RunContext, timeout: float | None
) -> object:
    import asyncio

    _set_current(ctx)  # this task's own context: other tasks never see it
    task = asyncio.ensure_future(make())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:  # the scheduler stopped: cancel the job's task too
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # until the job has handled its cancellation
    if not task.cancelled() and task.exception() is not None:
        log.debug("job task raised while being cancelled: %r", task.exception())
    raise JobTimeout(f"timed out after {timeout:g}s; its task was cancelled")
