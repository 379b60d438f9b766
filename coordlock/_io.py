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
SyncHook = Callable[..., T]
AsyncHook = Callable[..., Awaitable[T]]


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (one built on :class:`SyncIO`) and return its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("internal error: a synchronous coordlock call tried to suspend")


class _IO:
    """What both modes offer the core; subclasses only say how a hook is called."""

    asynchronous = False

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def call(self, what: str, sync_fn: SyncHook[T], async_fn: AsyncHook[T], *args: Any,
                   deadline: float | None = None) -> T:
        """Run the hook (``sync_fn`` or ``async_fn``, by mode) on ``args`` under the retry
        policy; ``deadline`` caps the retry budget (seconds)."""
        raise NotImplementedError

    async def once(self, sync_fn: Callable[..., T], async_fn: Callable[..., Awaitable[T]],
                   *args: Any) -> T:
        """Run the hook once, without retries or translation (cleanup paths)."""
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    async def wait(self, event: Any, timeout: float | None) -> None:
        """Wait until ``event`` (of :meth:`new_event`) is set or ``timeout`` passes."""
        raise NotImplementedError

    @staticmethod
    def new_event() -> Any:
        raise NotImplementedError


class SyncIO(_IO):
    """Blocking I/O on the calling thread: the sync hooks, called directly."""

    async def call(self, what: str, sync_fn: SyncHook[T], async_fn: AsyncHook[T], *args: Any,
                   deadline: float | None = None) -> T:
        return self.policy.call(sync_fn, what, deadline, args)

    async def once(self, sync_fn: Callable[..., T], async_fn: Callable[..., Awaitable[T]],
                   *args: Any) -> T:
        return sync_fn(*args)

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def wait(self, event: Any, timeout: float | None) -> None:
        event.wait(timeout)

    @staticmethod
    def new_event() -> threading.Event:
        return threading.Event()


class AsyncIO(_IO):
    """Non-blocking I/O on the running event loop: the async hooks, awaited."""

    asynchronous = True

    async def call(self, what: str, sync_fn: SyncHook[T], async_fn: AsyncHook[T], *args: Any,
                   deadline: float | None = None) -> T:
        return await self.policy.acall(async_fn, what, deadline, args)

    async def once(self, sync_fn: Callable[..., T], async_fn: Callable[..., Awaitable[T]],
                   *args: Any) -> T:
        return await async_fn(*args)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    async def wait(self, event: Any, timeout: float | None) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    @staticmethod
    def new_event() -> asyncio.Event:
        return asyncio.Event()
