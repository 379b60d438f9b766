"""``BaseCoordinator``: the shared logic of every backend, with small hooks to implement.

A backend subclasses :class:`BaseCoordinator` and fills in the ``_try_acquire``, ``_release``,
``_extend`` and ``_claim_many`` hooks (plus ``_wait_for_release`` when it can wake waiters
instead of polling). Validation, leases, waiting, renewal and loss detection live here once,
so every backend behaves the same (filelock's ``_acquire``/``_release`` split).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from ._errors import ConfigurationError
from ._lease import Lease
from ._locking import LockContext
from ._renewal import Renewer
from ._retry import call_with_retry
from ._validate import check_name, check_names, check_seconds, check_ttl, check_wait

log = logging.getLogger("coordlock")
T = TypeVar("T")
Self = TypeVar("Self", bound="BaseCoordinator")

#: Polling bounds for backends that cannot wake waiters (seconds).
POLL_MIN = 0.001
POLL_MAX = 0.05


class BaseCoordinator(ABC):
    """Common base of the built-in backends. Thread-safe; one instance serves a whole process.

    Options every backend accepts:

    * ``retry_deadline`` – seconds to keep retrying a failing server before raising
      :class:`~coordlock.BackendUnavailable` (default 10).
    """

    #: True when ``_wait_for_release`` returns as soon as the lock may be free (a wake-up or a
    #: cheap check of its own); then it is given the whole remaining wait at once.
    wakes_waiters: ClassVar[bool] = False

    #: Errors of the driver that are worth retrying (connection refused, timeouts).
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, *, retry_deadline: float = 10.0) -> None:
        self.retry_deadline = check_seconds(retry_deadline, "retry_deadline", allow_zero=True)
        self._renewer = Renewer(self)
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    @abstractmethod
    def from_url(cls: type[Self], url: str, **options: Any) -> Self:
        """Build a coordinator from a URL (the entry point the registry calls)."""

    # -- the RunCoordinator protocol ---------------------------------------------------------

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        """Take the lock ``name`` for ``ttl`` seconds; ``None`` when someone else holds it.

        ``wait``: ``None``/``0`` tries once, a number waits up to that many seconds,
        ``math.inf`` waits forever. ``renew=True`` keeps the lease alive in the background
        (every ttl/3) until it is released. Raises ``BackendUnavailable`` when the server
        cannot be asked.
        """
        name = check_name(name)
        ttl = check_ttl(ttl)
        timeout = check_wait(wait)
        if not isinstance(renew, bool):
            raise TypeError("renew must be a bool")
        self._check_open()
        owner = os.urandom(16).hex()  # 128 random bits, like uuid4, at a fraction of the cost
        started = time.monotonic()
        fence = self._try_acquire(name, owner, ttl)
        if fence is None and timeout > 0:
            granted = self._acquire_waiting(name, owner, ttl, started + timeout)
            if granted is not None:
                fence, started = granted
        if fence is None:
            return None
        lease = Lease(self, name, owner, fence, ttl, started, renew=renew)
        self._renewer.watch(lease)
        return lease

    def release(self, lease: Lease) -> bool:
        """Release ``lease`` if it is still ours; never touches another owner's lock."""
        if not isinstance(lease, Lease):
            raise TypeError(f"expected a Lease, not {type(lease).__name__}")
        if lease.released:
            return False
        lease._mark_released()
        self._renewer.forget(lease)
        ok = self._release(lease.name, lease.owner)
        if not ok:
            lease._mark_lost("the lock was no longer ours at release", even_if_released=True)
        return ok

    def extend(self, lease: Lease, ttl: float) -> bool:
        """Extend ``lease`` to ``ttl`` seconds from now if it is still ours, else mark it lost.

        A lease whose ttl already elapsed locally is never extended (someone else may have
        held the lock in between), even if the server still shows it.
        """
        if not isinstance(lease, Lease):
            raise TypeError(f"expected a Lease, not {type(lease).__name__}")
        ttl = check_ttl(ttl)
        if lease.released or lease._lost:
            return False
        started = time.monotonic()
        if started >= lease._deadline:
            lease._mark_lost("ttl elapsed before the extension")
            return False
        if self._extend(lease.name, lease.owner, ttl):
            lease._renewed(started, ttl)
            return True
        lease._mark_lost("the lock is no longer ours (expired or taken over)")
        return False

    def claim(self, key: str, hold: float) -> bool:
        """Once-only claim: ``True`` for exactly one caller of ``key`` within ``hold`` seconds."""
        key = check_name(key, "key")
        return key in self.claim_many([key], hold)

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        """Claim every key in one round trip where the backend can; returns the keys won."""
        checked = list(dict.fromkeys(check_names(keys)))
        hold = check_seconds(hold, "hold")
        self._check_open()
        if not checked:
            return set()
        return self._claim_many(checked, hold)

    def lock(
        self, name: str, ttl: float = 30, wait: bool | float = False, *, renew: bool = True
    ) -> LockContext:
        """A context manager holding ``name`` for the block; see :func:`coordlock.lock`."""
        return LockContext(name, ttl, wait, coordinator=self, renew=renew)

    def close(self) -> None:
        """Stop renewing leases and close connections. Held locks expire after their ttl."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._renewer.stop()
        self._close()

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`close`."""
        return self._closed

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- hooks for backends ------------------------------------------------------------------

    @abstractmethod
    def _try_acquire(self, name: str, owner: str, ttl: float) -> int | None:
        """One attempt: take ``name`` for ``owner`` for ``ttl`` s; return the new fence or None.

        Must be idempotent for the same owner (a retried call that finds the lock already held
        by ``owner`` returns that acquisition's fence), so transport retries are safe.
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

    def _close(self) -> None:
        """Release connections. Called once by :meth:`close`."""

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        """Keep trying until ``deadline`` (``time.monotonic()``); return (fence, sent_at).

        The default waits with :meth:`_wait_for_release` between attempts. Backends that can
        block on the server (PostgreSQL ``pg_advisory_lock``) override this.
        """
        interval = POLL_MIN
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if self.wakes_waiters:
                self._wait_for_release(name, deadline - now)
            else:
                self._wait_for_release(name, min(deadline - now, interval))
                interval = min(interval * 2, POLL_MAX)
            self._check_open()
            started = time.monotonic()
            fence = self._try_acquire(name, owner, ttl)
            if fence is not None:
                return fence, started

    def _wait_for_release(self, name: str, timeout: float) -> None:
        """Block up to ``timeout`` s or until ``name`` may be free. Default: sleep (poll)."""
        if timeout > 0 and not math.isinf(timeout):
            time.sleep(timeout)

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` with bounded retries of :attr:`transient_errors` (see ``_retry.py``).

        The first attempt runs bare: the retry machinery is only built after a failure.
        """
        try:
            return fn()
        except self.transient_errors:
            pass
        return call_with_retry(
            fn, transient=self.transient_errors, deadline=self.retry_deadline, what=what
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"{type(self).__name__} is closed")
