"""Transitional support for backends written to the hooks before the sync/async rewrite.

Such a backend's ``_try_acquire(name, owner, ttl)`` returns a fence or ``None`` and it may
override ``_acquire_waiting``/``_wait_for_release``. It keeps working through the sync API;
the async API refuses it with a clear error. Port it to the hooks of
:class:`~coordlock.backends.BaseCoordinator` (``_try_acquire(..., ticket) -> Attempt``).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ._errors import ConfigurationError
from ._owner import new_owner

if TYPE_CHECKING:
    from ._lease import AsyncLease, Lease
    from ._retry import RetryPolicy

T = TypeVar("T")


class LegacyHooks:
    """Mixin of :class:`~coordlock._base.BaseCoordinator` holding the pre-rewrite path."""

    _legacy: ClassVar[bool] = False

    @classmethod
    def _detect_legacy(cls) -> None:
        fn = getattr(cls, "_try_acquire", None)
        if fn is None or getattr(fn, "__isabstractmethod__", False):
            return
        params = list(inspect.signature(fn).parameters)
        cls._legacy = "ticket" not in params and len(params) == 4

    def _legacy_acquire(
        self, name: str, ttl: float, timeout: float, renew: bool, hold_at_least: float | None
    ) -> Lease | None:
        from ._lease import Lease

        me: Any = self
        me._check_open()
        owner = new_owner()
        started = time.monotonic()
        fence = me._try_acquire(name, owner, ttl)
        if fence is None and timeout > 0:
            granted = self._acquire_waiting(name, owner, ttl, started + timeout)
            if granted is not None:
                fence, started = granted
        if fence is None:
            return None
        lease = Lease(
            self, name, owner, fence, ttl, started, renew=renew, hold_at_least=hold_at_least
        )
        me._adopt(lease, me._sync_io)
        return lease

    async def _legacy_aacquire(
        self, name: str, ttl: float, timeout: float, renew: bool, hold_at_least: float | None
    ) -> AsyncLease | None:
        raise ConfigurationError(
            f"the {getattr(self, 'backend_name', type(self).__name__)} backend has not been "
            "ported to the async core yet: use the sync API"
        )

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        """Pre-rewrite wait loop: poll with :meth:`_wait_for_release` until ``deadline``."""
        me: Any = self
        interval = me.POLL_MIN
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if me.wakes_waiters:
                self._wait_for_release(name, deadline - now)
            else:
                self._wait_for_release(name, min(deadline - now, interval))
                interval = min(interval * 2, me.POLL_MAX)
            me._check_open()
            started = time.monotonic()
            fence = me._try_acquire(name, owner, ttl)
            if fence is not None:
                return fence, started

    def _wait_for_release(self, name: str, timeout: float) -> None:
        """Pre-rewrite wait hook. Default: sleep (poll)."""
        if timeout > 0 and not math.isinf(timeout):
            time.sleep(timeout)

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Pre-rewrite helper: run ``fn`` under the coordinator's retry policy."""
        policy: RetryPolicy = getattr(self, "_policy")  # noqa: B009
        return policy.call(fn, what)
