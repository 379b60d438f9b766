"""The two I/O modes of the one core.

The coordinator's decisions (wait loop, renewal, cleanup) are written once as coroutines that
``await`` an I/O object. :class:`AsyncIO` awaits the backends' async hooks; :class:`SyncIO`
calls the sync hooks directly, so its coroutines never suspend and :func:`drive` runs them to
completion on the calling thread — no event loop, no thread hop, no copy of the logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ._retry import RetryPolicy

T = TypeVar("T")


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (one built on :class:`SyncIO`) and return its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("internal error: a synchronous coordlock call tried to suspend")


class SyncIO:
    """Blocking I/O on the calling thread."""

    asynchronous = False

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def call(
        self,
        what: str,
        sync_fn: Callable[..., T],
        async_fn: Callable[..., Awaitable[T]],
        *args: Any,
        deadline: float | None = None,
    ) -> T:
        """Call ``sync_fn(*args)`` with the retry policy (``deadline``: retry budget, s)."""
        return self.policy.call(lambda: sync_fn(*args), what, deadline)

    async def once(self, sync_fn: Callable[..., T], async_fn: Callable[..., Awaitable[T]],
                   *args: Any) -> T:
        """Call ``sync_fn(*args)`` once, without retries or translation (cleanup paths)."""
        return sync_fn(*args)

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def wait(self, event: Any, timeout: float | None) -> None:
        """Block until ``event`` (a :class:`threading.Event`) is set or ``timeout`` passes."""
        event.wait(timeout)

    @staticmethod
    def new_event() -> threading.Event:
        return threading.Event()


class AsyncIO:
    """Non-blocking I/O on the running event loop."""

    asynchronous = True

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def call(
        self,
        what: str,
        sync_fn: Callable[..., T],
        async_fn: Callable[..., Awaitable[T]],
        *args: Any,
        deadline: float | None = None,
    ) -> T:
        """Await ``async_fn(*args)`` with the retry policy (``deadline``: retry budget, s)."""
        return await self.policy.acall(lambda: async_fn(*args), what, deadline)

    async def once(self, sync_fn: Callable[..., T], async_fn: Callable[..., Awaitable[T]],
                   *args: Any) -> T:
        """Await ``async_fn(*args)`` once, without retries or translation (cleanup paths)."""
        return await async_fn(*args)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    async def wait(self, event: Any, timeout: float | None) -> None:
        """Wait until ``event`` (an :class:`asyncio.Event`) is set or ``timeout`` passes."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    @staticmethod
    def new_event() -> asyncio.Event:
        return asyncio.Event()
