"""Run one test body through the sync API or the async API, without writing it twice.

:func:`view` returns the coordinator itself in ``"sync"`` mode; in ``"async"`` mode it returns
an :class:`AsyncCoordinatorView`: the same sync surface (``acquire``, ``release``, ``claim``,
``with lock(...)``…), each call served by the coordinator's *async* API (``aacquire``,
``arelease``, ``async with``…) on a real event loop running in a background thread. Leases come
back as :class:`AsyncLeaseView` (``lease.release()`` awaits ``AsyncLease.release`` there).
The contract suite and the fenced-register workers use it to run every behaviour in both modes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

from .._lease import AsyncLease, BaseLease
from .._locking import LockContext

T = TypeVar("T")
Mode = Literal["sync", "async"]
MODES: tuple[Mode, ...] = ("sync", "async")


class AsyncRunner:
    """An event loop on a daemon thread; :meth:`run` blocks the caller until a coroutine ends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="coordlock-test-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class AsyncLeaseView:
    """A sync handle on an :class:`~coordlock.AsyncLease` (see the module docstring)."""

    def __init__(self, lease: AsyncLease, runner: AsyncRunner) -> None:
        self.lease = lease
        self._runner = runner

    def release(self) -> bool:
        return self._runner.run(self.lease.release())

    def extend(self, ttl: float | None = None) -> bool:
        return self._runner.run(self.lease.extend(ttl))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lease, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("lease", "_runner"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.lease, name, value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncLeaseView):
            return other.lease is self.lease
        return other is self.lease

    def __hash__(self) -> int:
        return hash(self.lease)

    def __repr__(self) -> str:
        return f"<view of {self.lease!r}>"


class AsyncLockView:
    """``with view.lock(...)`` served by ``async with coordinator.lock(...)``: one task of the
    loop enters the block, waits while the caller's block runs, and leaves it (an exception of
    the caller's block is raised inside the ``async with``, as it would be in real code)."""

    def __init__(self, context: LockContext, runner: AsyncRunner) -> None:
        self._context = context
        self._runner = runner
        self._leave: asyncio.Future[BaseException | None] | None = None
        self._task: concurrent.futures.Future[None] | None = None

    def __enter__(self) -> AsyncLeaseView:
        entered: concurrent.futures.Future[AsyncLease] = concurrent.futures.Future()

        async def hold() -> None:
            self._leave = asyncio.get_running_loop().create_future()
            try:
                async with self._context as lease:
                    entered.set_result(lease)
                    error = await self._leave
                    if error is not None:
                        raise error
            except BaseException as exc:
                if not entered.done():
                    entered.set_exception(exc)
                    return
                raise

        self._task = asyncio.run_coroutine_threadsafe(hold(), self._runner.loop)
        return AsyncLeaseView(entered.result(), self._runner)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._leave is not None and self._task is not None
        leave = self._leave
        self._runner.loop.call_soon_threadsafe(leave.set_result, exc)
        try:
            self._task.result()
        except BaseException as raised:
            if raised is not exc:  # e.g. LockLost on leaving a clean block
                raise


def _unwrap(lease: Any) -> Any:
    return lease.lease if isinstance(lease, AsyncLeaseView) else lease


class AsyncCoordinatorView:
    """A coordinator's sync surface served by its async API (see the module docstring)."""

    def __init__(self, coordinator: Any, runner: AsyncRunner) -> None:
        self.coordinator = coordinator
        self.runner = runner

    def acquire(self, name: str, ttl: float, **options: Any) -> AsyncLeaseView | None:
        lease = self.runner.run(self.coordinator.aacquire(name, ttl, **options))
        return None if lease is None else AsyncLeaseView(lease, self.runner)

    def release(self, lease: Any) -> bool:
        return bool(self.runner.run(self.coordinator.arelease(_unwrap(lease))))

    def extend(self, lease: Any, ttl: float) -> bool:
        return bool(self.runner.run(self.coordinator.aextend(_unwrap(lease), ttl)))

    def claim(self, key: str, hold: float) -> bool:
        return bool(self.runner.run(self.coordinator.aclaim(key, hold)))

    def claim_many(self, keys: Any, hold: float) -> set[str]:
        return self.runner.run(self.coordinator.aclaim_many(keys, hold))

    def force_release(self, name: str) -> bool:
        return bool(self.runner.run(self.coordinator.aforce_release(name)))

    def lock(self, name: str, ttl: float = 30, wait: bool | float = False,
             **options: Any) -> AsyncLockView:
        return AsyncLockView(self.coordinator.lock(name, ttl, wait, **options), self.runner)

    def forge(self, lease: Any, owner: str) -> AsyncLeaseView:
        """A lease object naming ``lease``'s lock with another owner token (for T6 tests)."""
        lease = _unwrap(lease)

        async def make() -> AsyncLease:
            return AsyncLease(self.coordinator, lease.name, owner, lease.fence, lease.ttl,
                              time.monotonic())

        return AsyncLeaseView(self.runner.run(make()), self.runner)

    def close(self) -> None:
        self.runner.run(self.coordinator.aclose())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.coordinator, name)


def view(coordinator: Any, mode: Mode, runner: AsyncRunner | None = None) -> Any:
    """``coordinator`` itself (sync) or an :class:`AsyncCoordinatorView` on ``runner``."""
    if mode == "sync":
        return coordinator
    if runner is None:
        raise ValueError("async mode needs an AsyncRunner")
    return AsyncCoordinatorView(coordinator, runner)


def forge(coordinator: Any, lease: Any, owner: str) -> Any:
    """A lease naming ``lease``'s lock under another ``owner`` token, in the view's mode."""
    if isinstance(coordinator, AsyncCoordinatorView):
        return coordinator.forge(lease, owner)
    from .._lease import Lease

    base: BaseLease = lease
    return Lease(coordinator, base.name, owner, base.fence, base.ttl, time.monotonic())
