"""Leases: what a caller holds while it owns a lock — :class:`Lease` (sync) and
:class:`AsyncLease` (``await lease.release()``), sharing their state in :class:`BaseLease`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from . import _observe
from ._watchdog import AT_RISK_CHECK, LOST_CHECK, dispatcher, watchdog

if TYPE_CHECKING:
    from ._protocol import AsyncRunCoordinator, RunCoordinator

log = logging.getLogger("coordlock")

#: Lease states reported to :meth:`BaseLease.on_state` callbacks.
AT_RISK = "at-risk"  # the lease may be gone (renewal failing, connection suspended)
RESTORED = "restored"  # an at-risk lease turned out to be still ours
LOST = "lost"  # the lease is gone: someone else may hold the lock now

StateCallback = Callable[[Any, str], object]

#: Share of the ttl after which a lease without a confirmed renewal is reported at risk.
AT_RISK_AFTER = 2 / 3


class _Rescheduler(Protocol):
    def schedule(self, lease: BaseLease) -> None: ...

    def forget(self) -> None: ...


class BaseLease:
    """One acquisition of a named lock. Attributes a caller may read:

    * ``name`` – the lock name; ``owner`` – a token unique to this acquisition
      (``<host>:<pid>:<hex>``); only it can release or extend.
    * ``fence`` – an ``int`` that strictly increases across acquisitions of the same name. Pass
      it to the resource you protect and have the resource reject writes that carry a fence
      lower than the highest it has seen: a stale holder (paused, partitioned) becomes harmless.
    * ``ttl`` – seconds the lease lives without renewal.
    * ``expires_at`` – this process's estimate (``time.time()`` seconds) of when the lease ends
      unless renewed; measured from *before* the request was sent, so it errs early.
    * ``lost`` – ``True`` once the lease is known or presumed gone, and from then on for good.
      Never silent: a warning is logged on the ``coordlock`` logger and the callbacks run — at
      the local deadline at the latest, even when the network is frozen.
    * ``at_risk`` – the lease cannot currently be confirmed (renewal failing, connection
      suspended); it turns ``lost`` at its deadline unless confirmed in time.
    """

    __slots__ = (
        "_callbacks",
        "_coordinator",
        "_deadline",
        "_gen",
        "_guard",
        "_hold_until",
        "_lost",
        "_lost_reason",
        "_observed",
        "_released",
        "_renewer",
        "acquired_at",
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
        coordinator: Any,
        name: str,
        owner: str,
        fence: int,
        ttl: float,
        started: float,
        *,
        renew: bool = True,
        hold_at_least: float | None = None,
    ) -> None:
        self._coordinator = coordinator
        self.name = name
        self.owner = owner
        self.fence = fence
        self.ttl = ttl
        self.renew = renew
        self._deadline = started + ttl  # time.monotonic() based
        wall_offset = time.time() - time.monotonic()
        self.acquired_at = started + wall_offset
        self.expires_at = self._deadline + wall_offset
        self._hold_until = started + hold_at_least if hold_at_least else None
        self._gen = 0
        self._lost = False
        self._lost_reason = ""
        self._released = False
        self._observed: tuple[_observe.Observer, ...] = ()  # the metrics observers that counted it
        self._renewer: _Rescheduler | None = None
        self.at_risk = False
        self._callbacks: list[StateCallback] = []
        self._guard = threading.Lock()

    # -- what callers read ------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """``True`` when the lease is gone or its ttl ran out without renewal. Once ``True``,
        always ``True``: a renewal answered after the deadline does not bring it back."""
        if self._lost:
            return True
        with self._guard:
            return not self._released and time.monotonic() >= self._deadline

    @property
    def lost_reason(self) -> str:
        """Why the lease was lost (empty while it is held)."""
        if not self._lost and self.lost:
            return "ttl elapsed without renewal"
        return self._lost_reason

    @property
    def released(self) -> bool:
        """``True`` after the lease was released."""
        return self._released

    @property
    def remaining(self) -> float:
        """Seconds left before the lease ends unless renewed (0 when already past)."""
        return max(0.0, self._deadline - time.monotonic())

    @property
    def coordinator(self) -> Any:
        """The coordinator that granted this lease."""
        return self._coordinator

    def on_lost(self, callback: Callable[[Any], object]) -> None:
        """Call ``callback(lease)`` once when the lease is lost (soon, if it already is).

        Callbacks run one after another on coordlock's callback thread: keep them short and
        never block in them. Whatever they raise is logged and ignored. For an
        :class:`AsyncLease`, a callback that returns a coroutine has it run on the lease's
        event loop.
        """

        def on_state(lease: BaseLease, state: str) -> object:
            return callback(lease) if state == LOST else None

        self.on_state(on_state)

    def on_state(self, callback: StateCallback) -> None:
        """Call ``callback(lease, state)`` on each change: ``at-risk``, ``restored``, ``lost``.

        ``"at-risk"`` means the lease cannot currently be confirmed; ``"lost"`` follows if it is
        not confirmed before its deadline. A callback added after the loss is called for it.
        """
        with self._guard:
            self._callbacks.append(callback)
            already_lost = self._lost
        if already_lost:
            self._dispatch([callback], LOST)

    # -- used by the coordinator ------------------------------------------------------------

    def _alive(self) -> bool:
        return not (self._released or self._lost)

    def _arm(self, renewer: _Rescheduler | None) -> None:
        """Start the deadline checks (and renewal, with ``renewer``) of a new lease."""
        self._renewer = renewer if self.renew else None
        self._watch()
        if self._renewer is not None:
            self._renewer.schedule(self)

    def _watch(self) -> None:
        if self.renew:
            at = self._deadline - self.ttl * (1 - AT_RISK_AFTER)
            watchdog.watch(self, self._gen, at, AT_RISK_CHECK)
        else:
            watchdog.watch(self, self._gen, self._deadline, LOST_CHECK)

    def _renewed(self, sent: float, ttl: float) -> bool:
        """Record a successful extension sent at monotonic time ``sent``; False (and the lease
        marked lost) when the answer came after the local deadline had passed."""
        with self._guard:
            if self._released or self._lost:
                return False
            late = time.monotonic() >= self._deadline
            if not late:
                self.ttl = ttl
                self._deadline = sent + ttl
                self.expires_at = self._deadline + time.time() - time.monotonic()
                self._gen += 1
        if late:
            self._mark_lost(
                "the renewal was confirmed only after the ttl had run out", kind="late-renewal"
            )
            return False
        self._watch()
        if self._renewer is not None:
            self._renewer.schedule(self)
        self._restored()
        return True

    def _check_deadline(self, gen: int, check: int) -> None:
        """Called by the watchdog at the time it was asked to (no I/O here)."""
        with self._guard:
            if gen != self._gen or self._released or self._lost:
                return
            now = time.monotonic()
            expired = now >= self._deadline
        if expired:
            self._mark_lost(
                "ttl elapsed before it could be renewed (process paused, server or network "
                "unresponsive)"
                if self.renew
                else "ttl elapsed (renewal is off for this lease)",
                kind="expired",
            )
            return
        if check == AT_RISK_CHECK:
            self._mark_at_risk("no renewal confirmed for two thirds of the ttl")
            watchdog.watch(self, gen, self._deadline, LOST_CHECK)

    def _restored(self) -> bool:
        """Clear ``at_risk`` and notify ``restored`` once; True if it was at risk."""
        with self._guard:
            if not self.at_risk or self._lost:
                return False
            self.at_risk = False
        log.info("lease %r (fence %d) confirmed again", self.name, self.fence,
                 extra=self._facts("restored"))
        self._notify(RESTORED)
        return True

    def _mark_at_risk(self, reason: str) -> None:
        with self._guard:
            if self._lost or self._released or self.at_risk:
                return
            self.at_risk = True
        log.warning("lease %r (fence %d) at risk: %s", self.name, self.fence, reason,
                    extra=self._facts("at-risk", reason))
        self._notify(AT_RISK)

    def _mark_lost(
        self, reason: str, *, even_if_released: bool = False, kind: str = "backend"
    ) -> bool:
        """Mark the lease lost; logs and runs callbacks the first time. Returns True if new.

        A released lease is not marked, unless ``even_if_released`` (release found that the
        lock had already stopped being ours: the holder must still hear of it). ``kind`` is
        the reason's class for metrics (one of :data:`coordlock._observe.LOST_REASONS`;
        ``backend`` when a backend reports the loss).
        """
        with self._guard:
            if self._lost or (self._released and not even_if_released):
                return False
            self._lost = True
            self._lost_reason = reason
            ended = not self._released
        log.warning("lease %r (fence %d) lost: %s", self.name, self.fence, reason,
                    extra=self._facts("lost", reason))
        if _observe.observers:
            _observe.lease_lost(self._backend(), self.name, kind)
        if ended and self._observed:
            _observe.lease_ended(self._observed, self._backend(), self.name, "lost", self._held())
        self._notify(LOST)
        if self._renewer is not None:
            self._renewer.forget()
        watchdog.forget()
        return True

    def _begin_release(self) -> bool:
        """Mark the lease released; False when it already was."""
        with self._guard:
            if self._released:
                return False
            self._released = True
            ended = not self._lost
        if ended and self._observed:
            _observe.lease_ended(
                self._observed, self._backend(), self.name, "released", self._held()
            )
        if self._renewer is not None:
            self._renewer.forget()
        watchdog.forget()
        return True

    def _mark_released(self) -> None:  # kept for backends written before the hook rewrite
        self._begin_release()

    def _linger(self) -> float:
        """Seconds the name must stay taken after release (``hold_at_least``), else 0."""
        if self._hold_until is None:
            return 0.0
        return max(0.0, self._hold_until - time.monotonic())

    def _backend(self) -> str:
        return getattr(self._coordinator, "backend_name", "") or type(self._coordinator).__name__

    def _held(self) -> float:
        """Seconds since the lease was granted (wall clock, never negative)."""
        return max(0.0, time.time() - self.acquired_at)

    def _facts(self, event: str, reason: str = "", **more: object) -> dict[str, object]:
        """The ``extra=`` fields of this lease's log records (never a ``name`` key: that one
        belongs to :class:`logging.LogRecord`)."""
        facts: dict[str, object] = {
            "lock": self.name,
            "fence": self.fence,
            "owner": self.owner,
            "backend": getattr(self._coordinator, "backend_name", ""),
            "event": event,
        }
        if reason:
            facts["reason"] = reason
        facts.update(more)
        return facts

    def _notify(self, state: str) -> None:
        with self._guard:
            callbacks = list(self._callbacks)
        if callbacks:
            self._dispatch(callbacks, state)

    def _dispatch(self, callbacks: list[StateCallback], state: str) -> None:
        def run() -> None:
            for callback in callbacks:
                try:
                    result = callback(self, state)
                    if inspect.iscoroutine(result):
                        self._run_coroutine(result)
                except Exception:
                    log.exception(
                        "lease %r: %s callback %r failed", self.name, state, callback,
                        extra=self._facts("callback", outcome="error", state=state),
                    )

        dispatcher.submit(run)

    def _run_coroutine(self, coro: Any) -> None:
        coro.close()
        raise TypeError("a lease callback returned a coroutine; use an AsyncLease for that")

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost else "held"
        return (
            f"<{type(self).__name__} {self.name!r} fence={self.fence} "
            f"owner={self.owner[-32:][:8]}… {state} remaining={self.remaining:.3f}s>"
        )


class Lease(BaseLease):
    """A lease taken with the synchronous API (``coordinator.acquire``, ``with lock(...)``)."""

    __slots__ = ()

    _coordinator: RunCoordinator

    def extend(self, ttl: float | None = None) -> bool:
        """Push the expiry to ``ttl`` seconds from now (default: the lease's own ttl).

        Returns ``False`` (and marks the lease lost) when the lock is no longer ours.
        Raises :class:`~coordlock.BackendUnavailable` when the server cannot be asked.
        """
        return self._coordinator.extend(self, self.ttl if ttl is None else ttl)

    def release(self) -> bool:
        """Give the lock back. ``False`` when it was no longer ours (nothing else is touched)."""
        return self._coordinator.release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class AsyncLease(BaseLease):
    """A lease taken with the async API (``await coordinator.aacquire``, ``async with``);
    ``extend`` and ``release`` are coroutines, renewal runs as a task on its event loop."""

    __slots__ = ("loop",)

    _coordinator: AsyncRunCoordinator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = asyncio.get_running_loop()

    async def extend(self, ttl: float | None = None) -> bool:
        """Push the expiry to ``ttl`` seconds from now; see :meth:`Lease.extend`."""
        return await self._coordinator.aextend(self, self.ttl if ttl is None else ttl)

    async def release(self) -> bool:
        """Give the lock back; see :meth:`Lease.release`."""
        return await self._coordinator.arelease(self)

    def _run_coroutine(self, coro: Any) -> None:
        try:
            asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            log.warning(
                "lease %r: its event loop is closed; async callback not run", self.name,
                extra=self._facts("callback", outcome="loop-closed"),
            )

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()
