"""Leases: what a caller holds while it owns a lock — :class:`Lease` (sync) and
:class:`AsyncLease` (``await lease.release()``), sharing their state in :class:`BaseLease`."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from . import _observe
from ._owner import process
from ._watchdog import (
    AT_RISK_CHECK,
    LOST_CHECK,
    RENEW_CHECK,
    RENEW_FRACTION,
    dispatcher,
    watchdog,
)

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

    def hand_over(self, lease: BaseLease) -> None: ...

    def forget(self) -> None: ...


class _Held:
    """``async with`` over a :class:`threading.Lock` (sync flows never suspend) or an
    :class:`asyncio.Lock`."""

    __slots__ = ("asynchronous", "lock")

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.asynchronous = isinstance(lock, asyncio.Lock)

    async def __aenter__(self) -> None:
        if self.asynchronous:
            await self.lock.acquire()
        else:
            self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


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
        "__weakref__",
        "_callbacks",
        "_coordinator",
        "_deadline",
        "_gen",
        "_guard",
        "_hold_until",
        "_lost",
        "_lost_reason",
        "_op",
        "_pid",
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

    #: What serialises this lease's extensions and release (an ``asyncio.Lock`` for async).
    _op_lock: Callable[[], Any] = threading.Lock

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
        self._renewer: _Rescheduler | None = None
        self.at_risk = False
        self._callbacks: list[StateCallback] = []
        self._guard = threading.Lock()
        # serialises extend/release (``async with lease._op``; an asyncio.Lock async)
        self._op = _Held(self._op_lock())
        self._pid = process.pid

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
        not confirmed before its deadline. A callback added after the loss is called for it
        (once). The changes of one lease reach its callbacks in the order they happened.
        """
        with self._guard:
            self._callbacks.append(callback)
            if self._lost:
                dispatcher.submit(self, functools.partial(self._run_callbacks, (callback,), LOST))

    # -- used by the coordinator ------------------------------------------------------------

    def _alive(self) -> bool:
        return not (self._released or self._lost)

    def _arm(self, renewer: _Rescheduler | None) -> None:
        """Start the deadline checks (and renewal, with ``renewer``) of a new lease.

        A renewed lease gets one watchdog entry, at its first renewal's due time (a third of
        its ttl): the watchdog then hands it to ``renewer`` and watches for at-risk (two
        thirds). Most leases are released before that and never touch the renewer.
        """
        self._renewer = renewer if self.renew else None
        if self._renewer is None:
            watchdog.watch(self, self._gen, self._deadline, LOST_CHECK)
        else:
            due = self._deadline - self.ttl * (1 - RENEW_FRACTION)
            watchdog.watch(self, self._gen, due, RENEW_CHECK)

    def _watch(self, gen: int) -> None:
        if self.renew:
            at = self._deadline - self.ttl * (1 - AT_RISK_AFTER)
            watchdog.watch(self, gen, at, AT_RISK_CHECK)
        else:
            watchdog.watch(self, gen, self._deadline, LOST_CHECK)

    def _renewed(self, sent: float, ttl: float) -> bool:
        """Record a successful extension sent at monotonic time ``sent``; False (and the lease
        marked lost) when the answer came after the local deadline had passed."""
        with self._guard:
            if self._released or self._lost:
                return False
            if time.monotonic() >= self._deadline:
                self._change(LOST, "the renewal was confirmed only after the ttl had run out",
                             kind="late-renewal")
                return False
            self.ttl = ttl
            self._deadline = sent + ttl
            self.expires_at = self._deadline + time.time() - time.monotonic()
            self._gen += 1
            gen = self._gen
            if self.at_risk:
                self._change(RESTORED)
        self._watch(gen)
        if self._renewer is not None:
            self._renewer.schedule(self)
        return True

    def _check_deadline(self, gen: int, check: int) -> None:
        """Called by the watchdog at the time it was asked to: flips state, never does I/O
        (the log lines and callbacks run on the dispatcher thread)."""
        with self._guard:
            if gen != self._gen or self._released or self._lost:
                return
            if time.monotonic() >= self._deadline:
                reason = (
                    "ttl elapsed before it could be renewed (process paused, server or "
                    "network unresponsive)"
                    if self.renew
                    else "ttl elapsed (renewal is off for this lease)"
                )
                self._change(LOST, reason, kind="expired")
                return
            if check == RENEW_CHECK:
                renewer = self._renewer
                at_risk_at = self._deadline - self.ttl * (1 - AT_RISK_AFTER)
            elif check != AT_RISK_CHECK:
                return
            else:
                if not self.at_risk:
                    self._change(AT_RISK, "no renewal confirmed for two thirds of the ttl")
                deadline = self._deadline
        if check == RENEW_CHECK:
            watchdog.watch(self, gen, at_risk_at, AT_RISK_CHECK)
            if renewer is not None:
                renewer.hand_over(self)
            return
        watchdog.watch(self, gen, deadline, LOST_CHECK)

    def _restored(self) -> bool:
        """Clear ``at_risk`` and notify ``restored`` once; True if it was at risk."""
        with self._guard:
            return self._change(RESTORED)

    def _mark_at_risk(self, reason: str) -> None:
        with self._guard:
            self._change(AT_RISK, reason)

    def _mark_lost(
        self, reason: str, *, even_if_released: bool = False, kind: str = "backend"
    ) -> bool:
        """Mark the lease lost; reported (log, metrics, callbacks) the first time. Returns True
        if new.

        A released lease is not marked, unless ``even_if_released`` (release found that the
        lock had already stopped being ours: the holder must still hear of it). ``kind`` is
        the reason's class for metrics (one of :data:`coordlock._observe.LOST_REASONS`;
        ``backend`` when a backend reports the loss).
        """
        with self._guard:
            return self._change(LOST, reason, kind=kind, even_if_released=even_if_released)

    def _change(
        self, state: str, reason: str = "", *, kind: str = "backend",
        even_if_released: bool = False,
    ) -> bool:
        """Flip to ``state`` (the caller holds ``_guard``) and queue its report, so that flags,
        log lines and callbacks of one lease always agree and keep their order."""
        if state == LOST:
            if self._lost or (self._released and not even_if_released):
                return False
            self._lost = True
            self._lost_reason = reason
            live = getattr(self._coordinator, "_leases_by_owner", None)
            if live is not None:
                live.pop(self.owner, None)
            if self._renewer is not None:
                self._renewer.forget()
            watchdog.forget()
        elif state == AT_RISK:
            if self._lost or self._released or self.at_risk:
                return False
            self.at_risk = True
        elif state == RESTORED:
            if not self.at_risk or self._lost:
                return False
            self.at_risk = False
        dispatcher.submit(
            self,
            functools.partial(self._report, state, reason, kind, tuple(self._callbacks)),
        )
        return True

    def _report(
        self, state: str, reason: str, kind: str, callbacks: tuple[StateCallback, ...]
    ) -> None:
        """Log, count and call back one state change (on the dispatcher thread)."""
        if state == LOST:
            log.warning("lease %r (fence %d) lost: %s", self.name, self.fence, reason,
                        extra=self._facts("lost", reason))
            if _observe.observers:
                _observe.lease_lost(self._backend(), self.name, kind)
        elif state == AT_RISK:
            log.warning("lease %r (fence %d) at risk: %s", self.name, self.fence, reason,
                        extra=self._facts("at-risk", reason))
        else:
            log.info("lease %r (fence %d) confirmed again", self.name, self.fence,
                     extra=self._facts("restored"))
        self._run_callbacks(callbacks, state)

    def _begin_release(self) -> bool | None:
        """Mark the lease released: ``None`` when it already was, else whether it had been
        lost by then (its deadline passed or it was marked lost)."""
        with self._guard:
            if self._released:
                return None
            self._released = True
            was_lost = self._lost or time.monotonic() >= self._deadline
        if self._renewer is not None:
            self._renewer.forget()
        watchdog.forget()
        return was_lost

    def _linger(self) -> float:
        """Seconds the name must stay taken after release (``hold_at_least``), else 0."""
        if self._hold_until is None:
            return 0.0
        return max(0.0, self._hold_until - time.monotonic())

    def _exclusive(self) -> _Held:
        """An async context manager serialising this lease's extensions and its release, so a
        late renewal can never undo an extension, a release or a ``hold_at_least``."""
        return self._op

    def _backend(self) -> str:
        return getattr(self._coordinator, "backend_name", "") or type(self._coordinator).__name__

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

    def _run_callbacks(self, callbacks: tuple[StateCallback, ...], state: str) -> None:
        for callback in callbacks:
            try:
                result = callback(self, state)
                if inspect.iscoroutine(result):
                    self._run_coroutine(result)
            except BaseException:  # sys.exit() in one callback must not skip the next ones
                log.exception(
                    "lease %r: %s callback %r failed", self.name, state, callback,
                    extra=self._facts("callback", outcome="error", state=state),
                )

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
    _op_lock = asyncio.Lock

    _coordinator: AsyncRunCoordinator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = asyncio.get_running_loop()

    def _check_loop(self) -> None:
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError(
                f"{self!r} belongs to the event loop that acquired it; release or extend it there"
            )

    async def extend(self, ttl: float | None = None) -> bool:
        """Push the expiry to ``ttl`` seconds from now; see :meth:`Lease.extend`."""
        self._check_loop()
        return await self._coordinator.aextend(self, self.ttl if ttl is None else ttl)

    async def release(self) -> bool:
        """Give the lock back; see :meth:`Lease.release`."""
        self._check_loop()
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
