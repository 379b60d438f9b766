"""The ``with lock(...)`` context manager shared by :func:`coordlock.lock` and coordinators."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from ._errors import BackendUnavailable, LockLost, LockNotAcquired
from ._validate import check_name, check_ttl, check_wait

if TYPE_CHECKING:
    from ._lease import Lease
    from ._protocol import RunCoordinator

log = logging.getLogger("coordlock")


class LockContext:
    """Holds a lock for the duration of a ``with`` block and yields its :class:`Lease`.

    * Entering raises :class:`LockNotAcquired` when the lock is busy (``wait=False``) or the
      wait timed out; ``wait=True`` waits forever, a number waits that many seconds.
    * Leaving releases the lock. If the lease was lost while the block ran (renewal failed,
      process paused past the ttl, taken over), leaving raises :class:`LockLost` — unless the
      block is already raising, in which case its exception wins and the loss is only logged.
    * The coordinator is looked up when the block is entered (``coordinator=None`` → the
      process-wide one), so a module can build these before ``configure()`` runs.
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
        self.lease: Lease | None = None

    def acquire(self) -> Lease:
        """Take the lock (raising :class:`LockNotAcquired` if it cannot) and return the lease."""
        coordinator = self._coordinator
        if coordinator is None:
            assert self._resolve is not None
            coordinator = self._resolve()
        acquire = coordinator.acquire
        kwargs: dict[str, object] = {"wait": self.wait}
        if not self.renew:
            kwargs["renew"] = False
        lease = acquire(self.name, self.ttl, **kwargs)  # type: ignore[arg-type]
        if lease is None:
            if self.wait == 0:
                raise LockNotAcquired(self.name)
            waited = "forever" if math.isinf(self.wait) else f"{self.wait:g}s"
            raise LockNotAcquired(
                self.name, f"lock {self.name!r} still held by another owner after {waited}"
            )
        self.lease = lease
        return lease

    def release(self, *, raising: bool = True) -> None:
        """Release the lease; raise :class:`LockLost` if it had been lost (when ``raising``)."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        was_lost = lease.lost
        reason = lease.lost_reason
        try:
            ok = lease.release()
        except BackendUnavailable as exc:
            log.warning(
                "could not release %r (it expires by itself after its ttl): %s", lease.name, exc
            )
            ok = True  # unknown; the loss, if any, was already reported by the renewer
        if (was_lost or not ok) and raising:
            raise LockLost(lease.name, reason or "not ours at release")

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(raising=exc_type is None)
