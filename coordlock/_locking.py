"""The ``lock(...)`` context manager shared by :func:`coordlock.lock` and coordinators; it works
with ``with`` (sync) and ``async with`` (asyncio)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._errors import BackendUnavailable, LockLost, LockNotAcquired
from ._validate import check_hold_at_least, check_name, check_ttl, check_wait

if TYPE_CHECKING:
    from ._lease import AsyncLease, BaseLease, Lease
    from ._protocol import RunCoordinator
    from ._ticks import TickDecision, TickSpec

log = logging.getLogger("coordlock")

#: Where tick-aware locks read the time of day (epoch seconds); tests may replace it.
wall_clock: Callable[[], float] = time.time

#: Outcomes of a tick-aware call (:attr:`TickNotRun.reason`; ``won`` when it ran).
WON = "won"  # this call won the tick's claim (and the lock)
CLAIMED_ELSEWHERE = "claimed-elsewhere"  # another caller claimed (ran) the tick
OFF_TICK = "off-tick"  # no scheduled tick within the skew tolerance of the call
RUNNING = "running"  # the tick was won, but a run still holds the lock (no overlap)
COORDINATOR_ERROR = "coordinator-error"  # the coordinator could not be asked: fail closed


class TickNotRun(LockNotAcquired):
    """A tick-aware lock (``cron=``/``every=``) did not let this call run.

    ``reason``: ``"claimed-elsewhere"`` (the tick was claimed — run — by another caller),
    ``"off-tick"`` (no scheduled tick within the skew tolerance of the call) or ``"running"``
    (the tick was won, but a run still holds the lock). ``tick`` is the tick (an aware UTC
    datetime, ``None`` off tick) and ``key`` its claim key ``name@<tick UTC>``.
    """

    def __init__(
        self, name: str, reason: str, message: str, decision: TickDecision | None = None
    ) -> None:
        super().__init__(name, message)
        self.reason = reason
        self.detail = message if decision is None or not decision.reason else decision.reason
        self.tick: datetime | None = None if decision is None else decision.tick_datetime
        self.key: str | None = None if decision is None else decision.key


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
      lease is an :class:`~coordlock.AsyncLease`. One object may serve many threads and tasks
      at once (each block has its own lease); the lock itself is not re-entrant.
    * With a ``tick`` spec (``cron=``/``every=`` of :func:`coordlock.lock`), entering first
      names the scheduled tick nearest to now and claims ``name@<tick UTC>`` (one round trip),
      then takes the lock; a tick claimed elsewhere, or a call off every tick, raises
      :class:`TickNotRun` (a :class:`LockNotAcquired`). ``tick``/``tick_key`` tell the tick.
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
        tick: TickSpec | None = None,
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
        self.tick_spec = tick

    def _innermost(self) -> _Block | None:
        for block in reversed(_held_blocks.get()):
            if block.context is self:
                return block
        return None

    @property
    def lease(self) -> BaseLease | None:
        """The lease of the innermost block this thread or task holds, else ``None``."""
        block = self._innermost()
        return None if block is None else block.lease

    @property
    def decision(self) -> TickDecision | None:
        """The tick decision of the innermost block this thread or task holds."""
        block = self._innermost()
        return None if block is None else block.decision

    @property
    def tick(self) -> datetime | None:
        """The tick this block runs for (aware UTC datetime), once entered; else ``None``."""
        return None if self.decision is None else self.decision.tick_datetime

    @property
    def tick_key(self) -> str | None:
        """The claim key of :attr:`tick` (``name@2026-01-01T00:05:00Z``), else ``None``."""
        return None if self.decision is None else self.decision.key

    def _target(self) -> Any:
        coordinator = self._coordinator
        if coordinator is None:
            assert self._resolve is not None
            coordinator = self._resolve()
        return coordinator

    def _options(self, decision: TickDecision | None) -> dict[str, Any]:
        wait = self.wait
        if decision is None and self.renew and self.hold_at_least is None:
            return {"wait": wait}  # a plain lock (every lock()'s path)
        if decision is not None and decision.tick is not None and decision.key is not None:
            # A won tick waits a little for a run (of an earlier tick) that is just ending,
            # as the Scheduler does: within what is left of the tick's skew, at most 5 s.
            assert self.tick_spec is not None
            wait = max(wait, self.tick_spec.lease_wait(decision.tick, wall_clock()))
        options: dict[str, Any] = {"wait": wait}
        if not self.renew:
            options["renew"] = False
        if self.hold_at_least is not None:
            options["hold_at_least"] = self.hold_at_least
        return options

    def _decide(self, now: float | None) -> TickDecision | None:
        """Name the tick of a call at ``now`` (``None`` without a tick spec); raises
        :class:`TickNotRun` for a call off every tick unless ``off_tick='run'``."""
        spec = self.tick_spec
        if spec is None:
            return None
        decision = spec.resolve(wall_clock() if now is None else now)
        if decision.key is not None:
            return decision
        if spec.off_tick == "run":
            log.info(
                "%s; running under the lock alone (off_tick='run')",
                decision.reason,
                extra={"lock": self.name, "event": "off-tick", "outcome": "run"},
            )
            return decision
        raise TickNotRun(
            self.name, OFF_TICK, f"{decision.reason} (off_tick='run' runs such calls anyway)",
            decision,
        )  # fmt: skip

    def _check_fresh(self, decision: TickDecision) -> None:
        """Refuse to claim a tick named so long ago (a stalled process) that its next tick
        has come: the first claim of it may have expired by now, so it could run twice."""
        assert decision.tick is not None and self.tick_spec is not None
        now = wall_clock()
        if now > self.tick_spec.claim_deadline(decision.tick):
            raise TickNotRun(
                self.name, OFF_TICK,
                f"tick {decision.key!r} was named {now - decision.now:.1f}s ago and its next "
                "tick has come: too late to claim it safely (the process was stalled)",
                decision,
            )  # fmt: skip

    def _claimed(self, decision: TickDecision, won: bool) -> None:
        if not won:
            raise TickNotRun(
                self.name, CLAIMED_ELSEWHERE,
                f"tick {decision.key!r} was already claimed elsewhere (it runs once across "
                "servers)",
                decision,
            )  # fmt: skip

    def _got(self, lease: BaseLease | None, decision: TickDecision | None) -> None:
        if lease is None and decision is not None and decision.key is not None:
            raise TickNotRun(
                self.name, RUNNING,
                f"won tick {decision.key!r}, but lock {self.name!r} is still held by a "
                "run that has not ended (no overlap)",
                decision,
            )  # fmt: skip
        if lease is None:
            if self.wait == 0:
                raise LockNotAcquired(self.name)
            waited = "forever" if math.isinf(self.wait) else f"{self.wait:g}s"
            raise LockNotAcquired(
                self.name, f"lock {self.name!r} still held by another owner after {waited}"
            )
        _held_blocks.set((*_held_blocks.get(), _Block(self, lease, decision)))

    def acquire(self, *, now: float | None = None) -> Lease:
        """Take the lock (raising :class:`LockNotAcquired` if it cannot) and return the lease.

        With a tick spec, first claim the tick of a call at ``now`` (epoch seconds; default:
        the time of day now).
        """
        if self.tick_spec is not None and now is None:
            now = wall_clock()  # when the call came, not when a first connection was made
        target = self._target()
        decision = self._decide(now)
        if decision is not None and decision.key is not None:
            self._check_fresh(decision)
            self._claimed(decision, bool(target.claim(decision.key, decision.hold)))
        lease: Lease | None = target.acquire(self.name, self.ttl, **self._options(decision))
        self._got(lease, decision)
        assert lease is not None
        return lease

    async def aacquire(self, *, now: float | None = None) -> AsyncLease:
        """:meth:`acquire` for ``async with``."""
        if self.tick_spec is not None and now is None:
            now = wall_clock()
        target = self._target()
        aacquire = getattr(target, "aacquire", None)
        if aacquire is None:
            raise TypeError(
                f"{type(target).__name__} has no async API (aacquire); use `with`, not `async with`"
            )
        decision = self._decide(now)
        if decision is not None and decision.key is not None:
            self._check_fresh(decision)
            self._claimed(decision, bool(await target.aclaim(decision.key, decision.hold)))
        lease: AsyncLease | None = await aacquire(self.name, self.ttl, **self._options(decision))
        self._got(lease, decision)
        assert lease is not None
        return lease

    def _take(self) -> tuple[BaseLease | None, bool, str]:
        blocks = _held_blocks.get()
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i].context is self:
                _held_blocks.set(blocks[:i] + blocks[i + 1 :])
                lease = blocks[i].lease
                if not lease._lost and time.monotonic() < lease._deadline:  # still held: cheap
                    return lease, False, ""
                return lease, lease.lost, lease.lost_reason
        return None, False, ""

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
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(raising=exc_type is None)

    async def __aenter__(self) -> AsyncLease:
        return await self.aacquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.arelease(raising=exc_type is None)


class _Block(NamedTuple):
    """What one ``with``/``async with`` block of a :class:`LockContext` holds."""

    context: LockContext
    lease: BaseLease
    decision: TickDecision | None


#: The blocks held by this thread / asyncio task, innermost last, for every LockContext (one
#: variable for all: a ContextVar per LockContext would stay in the thread's context for good,
#: so a ``with coordinator.lock(...)`` per job would grow it without bound). A module-level
#: ``lock(...)`` object serves every thread and task that enters it, each with its own lease.
_held_blocks: ContextVar[tuple[_Block, ...]] = ContextVar("coordlock-held-blocks", default=())


def _unreleased(lease: BaseLease, exc: BaseException) -> bool:
    log.warning(
        "could not release %r (it expires by itself after its ttl): %s",
        lease.name,
        exc,
        extra=lease._facts("release", outcome="error", error=f"{type(exc).__name__}: {exc}"),
    )
    return True  # unknown; a loss, if any, was already reported
