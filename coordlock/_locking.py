"""The ``lock(...)`` context manager shared by :func:`coordlock.lock` and coordinators; it works
with ``with`` (sync) and ``async with`` (asyncio)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import BackendUnavailable, LockLost, LockNotAcquired
from ._validate import check_hold_at_least, check_name, check_ttl, check_wait

if TYPE_CHECKING:
    from ._lease import AsyncLease, BaseLease, Lease
    from ._protocol import RunCoordinator

log = logging.getLogger("coordlock")


class LockContext:
    """Holds a lock for the duration of a ``with`` or ``async with`` block and yields its lease.

    * Entering raises :class:`LockNotAcquired` when the lock is busy (``wait=False``) or the
      wait timed out; ``wait=True`` waits forever, a number waits that many seconds.
    * Leaving releases the lock. If the lease was lost while the block ran (renewal failed,
      process paused past the ttl, taken over), leaving raises :class:`LockLost` — unless the
      block is already raising, in which case its exception wins and the loss is only logged.
    * The coordinator is looked up when the block is entered (``coordinator=None`` → the
      process-wide one), so a module can build these before ``configure()`` runs.
    * ``async with`` never blocks the event loop: it uses the coordinator's async API and the
      lease is an :class:`~coordlock.AsyncLease`. One object serves one block at a time.
    """

    def __init__(
        self,
        name: str,
        ttl: float = 30,
        wait: bool | float | None = False,
        *,
        coordinator: RunCoordinator | None = None,
        resolve: Callable[[], RunCoordinator] | None = None,
        renew: bool = True,
        hold_at_least: float | None = None,
    ) -> None:
        self.name = check_name(name)
        self.ttl = check_ttl(ttl)
        self.wait = check_wait(wait)
        if not isinstance(renew, bool):
            raise TypeError("renew must be a bool")
        if coordinator is None and resolve is None:
            raise TypeError("LockContext needs a coordinator or a resolve function")
        self._coordinator = coordinator
        self._resolve = resolve
        self.renew = renew
        self.hold_at_least = check_hold_at_least(hold_at_least)
        self.lease: BaseLease | None = None

    def _target(self) -> Any:
        coordinator = self._coordinator
        if coordinator is None:
            assert self._resolve is not None
            coordinator = self._resolve()
        return coordinator

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"wait": self.wait}
        if not self.renew:
            options["renew"] = False
        if self.hold_at_least is not None:
            options["hold_at_least"] = self.hold_at_least
        return options

    def _got(self, lease: BaseLease | None) -> None:
        if lease is None:
            if self.wait == 0:
                raise LockNotAcquired(self.name)
            waited = "forever" if math.isinf(self.wait) else f"{self.wait:g}s"
            raise LockNotAcquired(
                self.name, f"lock {self.name!r} still held by another owner after {waited}"
            )
        self.lease = lease

    def acquire(self) -> Lease:
        """Take the lock (raising :class:`LockNotAcquired` if it cannot) and return the lease."""
        lease: Lease | None = self._target().acquire(self.name, self.ttl, **self._options())
        self._got(lease)
        assert lease is not None
        return lease

    async def aacquire(self) -> AsyncLease:
        """:meth:`acquire` for ``async with``."""
        target = self._target()
        aacquire = getattr(target, "aacquire", None)
        if aacquire is None:
            raise TypeError(
                f"{type(target).__name__} has no async API (aacquire); use `with`, not `async with`"
            )
        lease: AsyncLease | None = await aacquire(self.name, self.ttl, **self._options())
        self._got(lease)
        assert lease is not None
        return lease

    def _take(self) -> tuple[BaseLease | None, bool, str]:
        lease, self.lease = self.lease, None
        if lease is None:
            return None, False, ""
        return lease, lease.lost, lease.lost_reason

    def _finish(
        self, lease: BaseLease, was_lost: bool, reason: str, ok: bool, raising: bool
    ) -> None:
        if (was_lost or not ok) and raising:
            raise LockLost(lease.name, reason or "not ours at release")

    def release(self, *, raising: bool = True) -> None:
        """Release the lease; raise :class:`LockLost` if it had been lost (when ``raising``)."""
        lease, was_lost, reason = self._take()
        if lease is None:
            return
        try:
            ok = lease.release()  # type: ignore[attr-defined]
        except BackendUnavailable as exc:
            ok = _unreleased(lease, exc)
        self._finish(lease, was_lost, reason, bool(ok), raising)

    async def arelease(self, *, raising: bool = True) -> None:
        """:meth:`release` for ``async with``."""
        lease, was_lost, reason = self._take()
        if lease is None:
            return
        try:
            ok = await lease.release()  # type: ignore[attr-defined]
        except BackendUnavailable as exc:
            ok = _unreleased(lease, exc)
        self._finish(lease, was_lost, reason, bool(ok), raising)

    def __enter__(self) -> Lease:
        if self.lease is not None:  # already taken with acquire() (as @locked does)
            return self.lease  # type: ignore[return-value]
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(raising=exc_type is None)

    async def __aenter__(self) -> AsyncLease:
        if self.lease is not None:  # already taken with aacquire() (as @locked does)
            return self.lease  # type: ignore[return-value]
        return await self.aacquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.arelease(raising=exc_type is None)


def _unreleased(lease: BaseLease, exc: BaseException) -> bool:
    log.warning("could not release %r (it expires by itself after its ttl): %s", lease.name, exc)
    return True  # unknown; a loss, if any, was already reported
