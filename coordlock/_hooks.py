"""The hooks a backend implements, with their defaults (see ``BaseCoordinator``).

Required: ``_try_acquire``, ``_release``, ``_extend``, ``_claim_many``. The rest have
defaults. Every ``_async_*`` hook defaults to running its sync twin on the coordinator's own
worker threads (:meth:`Hooks._in_thread`), so a backend written to the sync hooks serves the
async API without blocking an event loop; a backend with a native asyncio driver overrides them.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from ._attempt import Attempt
from ._errors import ConfigurationError

T = TypeVar("T")

#: Worker threads for backends' sync hooks run from the async API.
ASYNC_WORKERS = 16


class Hooks:
    """The backend hook surface of :class:`~coordlock.backends.BaseCoordinator`."""

    backend_name: ClassVar[str]
    _executor: ThreadPoolExecutor | None
    _executor_lock: threading.Lock

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking ``fn(*args)`` on the coordinator's worker threads (not the loop's
        default executor, which the application may need).

        If the awaiting task is cancelled, this still waits for ``fn`` to finish before the
        cancellation goes on: the caller's cleanup (e.g. releasing a lock an in-flight attempt
        may have taken) must run after it, not race it.
        """
        executor = self._executor
        if executor is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        ASYNC_WORKERS, thread_name_prefix=f"coordlock-{self.backend_name}"
                    )
                executor = self._executor
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(executor, functools.partial(fn, *args))
        except RuntimeError as exc:  # shut down by close()
            raise ConfigurationError(f"{type(self).__name__} is closed") from exc
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait((future,))
            raise

    @abstractmethod
    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        """One attempt to take ``name`` for ``owner`` for ``ttl`` s.

        ``ticket`` is ``None`` on the first attempt of an acquire call, else the ticket of the
        previous :class:`Attempt` of that call. Must be idempotent for the same owner (a retried
        call that finds the lock held by ``owner`` returns that acquisition's fence).
        """

    @abstractmethod
    def _release(self, name: str, owner: str) -> bool:
        """Delete the lock only if ``owner`` still holds it; True when it did."""

    @abstractmethod
    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        """Reset the expiry to ``ttl`` s only if ``owner`` still holds an unexpired lock."""

    @abstractmethod
    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        """Claim the (distinct, checked) ``keys``; return those this call won."""

    def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        """Block up to ``timeout`` s or until ``name`` may be free; return ``None`` (the base
        then tries again) or a completed :class:`Attempt`. Default: sleep (poll)."""
        if timeout > 0:
            time.sleep(timeout)
        return None

    def _abandon(self, name: str, owner: str, ticket: Any) -> None:
        """An acquire call gave up while holding waiter state in ``ticket``. Default: nothing."""

    def _release_later(self, name: str, owner: str, linger: float) -> bool:
        """Release so that ``name`` stays taken ``linger`` more seconds (``hold_at_least``),
        enforced by the server. Default: shorten the lock's expiry to ``linger``."""
        return self._extend(name, owner, linger)

    def _force_release(self, name: str) -> bool:
        """Delete the lock ``name`` whoever holds it; True when one was removed."""
        raise NotImplementedError

    def _after_fork(self) -> None:
        """In a forked child, before its first call: drop inherited connections without
        closing them on the wire (that would end the parent's sessions)."""

    def _close(self) -> None:
        """Release connections. Called once by :meth:`close`."""

    async def _async_try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        return await self._in_thread(self._try_acquire, name, owner, ttl, ticket)

    async def _async_release(self, name: str, owner: str) -> bool:
        return await self._in_thread(self._release, name, owner)

    async def _async_extend(self, name: str, owner: str, ttl: float) -> bool:
        return await self._in_thread(self._extend, name, owner, ttl)

    async def _async_claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        return await self._in_thread(self._claim_many, keys, hold)

    async def _async_wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        """Default: sleep on the loop (the base polls); never pins a worker thread."""
        await asyncio.sleep(max(timeout, 0.0))
        return None

    async def _async_abandon(self, name: str, owner: str, ticket: Any) -> None:
        await self._in_thread(self._abandon, name, owner, ticket)

    async def _async_release_later(self, name: str, owner: str, linger: float) -> bool:
        return await self._in_thread(self._release_later, name, owner, linger)

    async def _async_force_release(self, name: str) -> bool:
        return await self._in_thread(self._force_release, name)

    async def _async_close(self, state: dict[str, Any]) -> None:
        """Close the async resources kept in ``state`` (one event loop's :meth:`_loop_local`)."""


