"""The :class:`Lease`: what a caller holds while it owns a lock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._base import BaseCoordinator

log = logging.getLogger("coordlock")

#: Lease states reported to :meth:`Lease.on_state` callbacks.
AT_RISK = "at-risk"  # the backend may have lost the lease (e.g. ZooKeeper SUSPENDED)
RESTORED = "restored"  # an at-risk lease turned out to be still ours
LOST = "lost"  # the lease is gone: someone else may hold the lock now

StateCallback = Callable[["Lease", str], None]


class Lease:
    """One acquisition of a named lock.

    Attributes a caller may read:

    * ``name`` – the lock name.
    * ``owner`` – a token unique to this acquisition; only it can release or extend.
    * ``fence`` – an ``int`` that strictly increases across acquisitions of the same name.
      Pass it to the resource you protect and have the resource reject writes that carry a
      fence lower than the highest it has seen: that turns a stale holder (paused, partitioned)
      into a harmless one.
    * ``ttl`` – seconds the lease lives without renewal.
    * ``expires_at`` – this process's estimate (``time.time()`` seconds) of when the lease ends
      unless renewed; measured from *before* the request was sent, so it errs early.
    * ``lost`` – ``True`` once the lease is known or presumed gone. Never silent: a warning is
      logged on the ``coordlock`` logger and the :meth:`on_lost` callbacks run.
    """

    __slots__ = (
        "_callbacks",
        "_coordinator",
        "_deadline",
        "_guard",
        "_lost",
        "_lost_reason",
        "_released",
        "at_risk",
        "expires_at",
        "fence",
        "name",
        "owner",
        "renew",
        "ttl",
    )

    def __init__(
        self,
        coordinator: BaseCoordinator,
        name: str,
        owner: str,
        fence: int,
        ttl: float,
        started: float,
        *,
        renew: bool = True,
    ) -> None:
        self._coordinator = coordinator
        self.name = name
        self.owner = owner
        self.fence = fence
        self.ttl = ttl
        self.renew = renew
        self._deadline = started + ttl  # time.monotonic() based
        self.expires_at = time.time() - (time.monotonic() - started) + ttl
        self._lost = False
        self._lost_reason = ""
        self._released = False
        self.at_risk = False
        self._callbacks: list[StateCallback] = []
        self._guard = threading.Lock()

    # -- what callers use -------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """``True`` when the lease is gone, or its TTL ran out without a renewal."""
        return self._lost or (not self._released and time.monotonic() >= self._deadline)

    @property
    def lost_reason(self) -> str:
        """Why the lease was lost (empty while it is held)."""
        if not self._lost and self.lost:
            return "ttl elapsed without renewal"
        return self._lost_reason

    @property
    def released(self) -> bool:
        """``True`` after :meth:`release` was called."""
        return self._released

    @property
    def remaining(self) -> float:
        """Seconds left before the lease ends unless renewed (0 when already past)."""
        return max(0.0, self._deadline - time.monotonic())

    @property
    def coordinator(self) -> BaseCoordinator:
        """The coordinator that granted this lease."""
        return self._coordinator

    def extend(self, ttl: float | None = None) -> bool:
        """Push the expiry to ``ttl`` seconds from now (default: the lease's own ttl).

        Returns ``False`` (and marks the lease lost) when the lock is no longer ours.
        Raises :class:`~coordlock.BackendUnavailable` when the server cannot be asked.
        """
        return self._coordinator.extend(self, self.ttl if ttl is None else ttl)

    def release(self) -> bool:
        """Give the lock back. ``False`` when it was no longer ours (nothing else is touched)."""
        return self._coordinator.release(self)

    def on_lost(self, callback: Callable[[Lease], None]) -> None:
        """Call ``callback(lease)`` once when the lease is lost (at once if it already is).

        Callbacks run on the renewal thread (or the thread that noticed the loss): keep them
        short and never block in them. Exceptions they raise are logged, not propagated.
        """

        def on_state(lease: Lease, state: str) -> None:
            if state == LOST:
                callback(lease)

        self.on_state(on_state)

    def on_state(self, callback: StateCallback) -> None:
        """Call ``callback(lease, state)`` on each change: ``at-risk``, ``restored``, ``lost``.

        ``"at-risk"`` means the backend cannot currently confirm the lease (a ZooKeeper
        connection SUSPENDED, a renewal failing while the TTL still runs); ``"lost"`` follows if
        it is not confirmed in time. A callback added after the loss is called at once.
        """
        with self._guard:
            self._callbacks.append(callback)
            already_lost = self._lost
        if already_lost:
            self._fire(callback, LOST)

    # -- used by coordinators ---------------------------------------------------------------

    def _renewed(self, started: float, ttl: float) -> None:
        """Record a successful extension sent at monotonic time ``started``."""
        self.ttl = ttl
        self._deadline = started + ttl
        self.expires_at = time.time() - (time.monotonic() - started) + ttl
        self._restored()

    def _restored(self) -> bool:
        """Clear ``at_risk`` and notify ``restored`` once; True if it was at risk."""
        with self._guard:
            if not self.at_risk or self._lost:
                return False
            self.at_risk = False
        self._notify(RESTORED)
        return True

    def _mark_at_risk(self, reason: str) -> None:
        with self._guard:
            if self._lost or self._released or self.at_risk:
                return
            self.at_risk = True
        log.warning("lease %r (fence %d) at risk: %s", self.name, self.fence, reason)
        self._notify(AT_RISK)

    def _mark_lost(self, reason: str, *, even_if_released: bool = False) -> bool:
        """Mark the lease lost; logs and runs callbacks the first time. Returns True if new.

        A released lease is not marked, unless ``even_if_released`` (release found that the
        lock had already stopped being ours: the holder must still hear of it).
        """
        with self._guard:
            if self._lost or (self._released and not even_if_released):
                return False
            self._lost = True
            self._lost_reason = reason
        log.warning("lease %r (fence %d) lost: %s", self.name, self.fence, reason)
        self._notify(LOST)
        return True

    def _mark_released(self) -> None:
        with self._guard:
            self._released = True

    def _notify(self, state: str) -> None:
        with self._guard:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            self._fire(callback, state)

    def _fire(self, callback: StateCallback, state: str) -> None:
        try:
            callback(self, state)
        except Exception:
            log.exception("lease %r: %s callback %r failed", self.name, state, callback)

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost else "held"
        return (
            f"<Lease {self.name!r} fence={self.fence} owner={self.owner[:8]}… "
            f"{state} remaining={self.remaining:.3f}s>"
        )
