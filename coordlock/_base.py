"""``BaseCoordinator``: the shared core of every backend, with small hooks to implement.

A backend subclasses :class:`BaseCoordinator` and fills in a few I/O hooks (filelock's
``_acquire``/``_release`` split, httpx's one core for two I/O modes):

* required: ``_try_acquire(name, owner, ttl, ticket) -> Attempt``, ``_release(name, owner)``,
  ``_extend(name, owner, ttl)``, ``_claim_many(keys, hold)`` and ``from_url``;
* optional: ``_wait`` (wake waiters instead of polling; set ``wakes_waiters``), ``_abandon``,
  ``_release_later`` (``hold_at_least``), ``_force_release``, ``_after_fork``, ``_close``, and
  the ``_async_*`` twins of each hook (by default the sync hook runs on the coordinator's own
  worker threads, so every backend gets the async API for free).

Everything else lives here once, for both the sync and the async API: validation, owner
tokens, the wait loop and its poll schedule, retries and error translation, renewal, loss
detection, cleanup after errors and cancellation. The decision code is written as coroutines
over an I/O object (:mod:`coordlock._io`); the sync methods drive them without an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from . import _observe
from ._errors import BackendUnavailable, ConfigurationError
from ._hooks import Hooks
from ._io import AsyncIO, SyncIO, drive
from ._lease import AT_RISK, LOST, RESTORED, AsyncLease, BaseLease, Lease
from ._locking import LockContext
from ._owner import current_pid, new_owner, process
from ._renewal import Renewer
from ._retry import RetryPolicy
from ._validate import (
    check_hold_at_least,
    check_name,
    check_names,
    check_seconds,
    check_ttl,
    check_wait,
    unknown_options,
)

log = logging.getLogger("coordlock")
T = TypeVar("T")
L = TypeVar("L", bound=BaseLease)
Self = TypeVar("Self", bound="BaseCoordinator")

#: Polling bounds for backends that cannot wake waiters (seconds).
POLL_MIN = 0.001
POLL_MAX = 0.05
#: A waiter told that the holder's lease ends in ``retry_in`` s looks again this much later.
EXPIRY_SLACK = 0.002


class BaseCoordinator(Hooks, ABC):
    """Common base of the built-in backends. Thread-safe; one instance serves a whole process,
    from threads and from any number of event loops.

    Options every backend accepts:

    * ``retry_deadline`` – seconds to keep retrying a failing server before raising
      :class:`~coordlock.BackendUnavailable` (default 10).
    """

    #: The backend's short name (``"redis"``), used in logs and metrics.
    backend_name: ClassVar[str] = ""

    #: True when ``_wait`` returns as soon as the lock may be free (a wake-up of its own); it is
    #: then given the whole remaining wait at once. False: the base polls (1 ms → 50 ms).
    wakes_waiters: ClassVar[bool] = False

    #: A third-party driver's transient errors, for drivers :mod:`coordlock._errors_table`
    #: does not know.
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    POLL_MIN: ClassVar[float] = POLL_MIN
    POLL_MAX: ClassVar[float] = POLL_MAX

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.backend_name:
            cls.backend_name = cls.__name__.lower().removesuffix("coordinator") or cls.__name__

    def __init__(self, *, retry_deadline: float = 10.0, **unknown: Any) -> None:
        if unknown:
            raise _unknown_backend_options(type(self), unknown)
        self.retry_deadline = check_seconds(retry_deadline, "retry_deadline", allow_zero=True)
        self._policy = RetryPolicy(
            self.retry_deadline,
            extra_transient=self.transient_errors,
            stopped=lambda: self._closed,
        )
        self._sync_io = SyncIO(self._policy)
        self._async_io = AsyncIO(self._policy)
        self._renewer = Renewer(self, self._sync_io)
        self._loop_state: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]]
        self._loop_state = weakref.WeakKeyDictionary()
        # owner -> live lease, for push-based reports; a lease leaves it when it ends
        self._leases_by_owner: dict[str, BaseLease] = {}
        self._executor_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._owner_pid = current_pid()
        _observe.coordinators.add(self)  # for the held-leases gauge of metrics

    @classmethod
    @abstractmethod
    def from_url(cls: type[Self], url: str, **options: Any) -> Self:
        """Build a coordinator from a URL (the entry point the registry calls)."""

    # -- the RunCoordinator protocol (sync) ----------------------------------------------------

    def acquire(
        self,
        name: str,
        ttl: float,
        *,
        wait: float | None = None,
        renew: bool = True,
        hold_at_least: float | None = None,
    ) -> Lease | None:
        """Take the lock ``name`` for ``ttl`` seconds; ``None`` when someone else holds it.

        ``wait``: ``None``/``0`` tries once, a number waits up to that many seconds,
        ``math.inf`` waits forever. ``renew=True`` keeps the lease alive in the background
        (every ttl/3) until it is released. ``hold_at_least``: after release the name stays
        taken until ``hold_at_least`` seconds after the acquisition (ShedLock's
        ``lockAtLeastFor``), enforced by the server. Raises ``BackendUnavailable`` when the
        server cannot be reached, ``ConfigurationError`` when it refuses us for good.
        """
        args = self._check_acquire(name, ttl, wait, renew, hold_at_least)
        return drive(self._acquire_flow(self._sync_io, Lease, *args))

    def release(self, lease: Lease) -> bool:
        """Release ``lease`` if it is still ours; never touches another owner's lock.

        With ``hold_at_least``, the name stays taken until the hold ends. ``False`` (and the
        lease marked lost) when the lock was no longer ours, or the lease had been lost before.
        """
        if type(lease) is not Lease:
            lease = self._check_lease(lease, Lease)
        return drive(self._release_flow(self._sync_io, lease))

    def extend(self, lease: Lease, ttl: float) -> bool:
        """Extend ``lease`` to ``ttl`` seconds from now if it is still ours, else mark it lost.

        A lease whose ttl already elapsed locally is never extended (someone else may have
        held the lock in between), even if the server still shows it.
        """
        return drive(self._extend_flow(self._sync_io, self._check_lease(lease, Lease), ttl))

    def claim(self, key: str, hold: float) -> bool:
        """Once-only claim: ``True`` for exactly one caller of ``key`` within ``hold`` seconds."""
        key = check_name(key, "key")
        return key in self.claim_many([key], hold)

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        """Claim every key in one round trip where the backend can; returns the keys won."""
        return drive(self._claim_flow(self._sync_io, *self._check_claims(keys, hold)))

    def force_release(self, name: str) -> bool:
        """Operator force-unlock: free ``name`` whoever holds it (``coordlock unlock --force``).

        The holder's lease is lost (it finds out at its next renewal, within its ttl); the next
        acquisition still gets a greater fence. ``True`` when a lock was removed. Raises
        ``ConfigurationError`` when the backend cannot do it.
        """
        name = check_name(name)
        self._check_open()
        return drive(self._force_flow(self._sync_io, name))

    def lock(
        self,
        name: str,
        ttl: float = 30,
        wait: bool | float = False,
        *,
        renew: bool = True,
        hold_at_least: float | None = None,
        **tick: Any,
    ) -> LockContext:
        """A context manager holding ``name`` for a ``with`` or ``async with`` block; see
        :func:`coordlock.lock` (``tick``: its ``cron=``/``timezone=``/``every=``/``offset=``/
        ``skew=``/``off_tick=`` options, once per scheduled tick)."""
        if not tick:  # a plain lock: no tick options to check (this is every lock()'s path)
            return LockContext(
                name, ttl, wait, coordinator=self, renew=renew, hold_at_least=hold_at_least
            )
        from ._api import lock

        return lock(
            name, ttl, wait, coordinator=self, renew=renew, hold_at_least=hold_at_least, **tick
        )

    def close(self) -> None:
        """Stop renewing leases and close connections. Held locks expire after their ttl."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._renewer.stop()
        for state in list(self._loop_state.values()):
            renewer = state.get("renewer")
            if renewer is not None:
                renewer.stop()
        # Nothing renews them from now on: their holders must hear it now, not at the deadline.
        for lease in list(self._leases_by_owner.values()):
            lease._mark_lost("its coordinator was closed", kind="closed")
        self._close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    @property
    def can_force_release(self) -> bool:
        """``True`` when the backend implements :meth:`force_release`."""
        return type(self)._force_release is not Hooks._force_release

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

    # -- the async API -------------------------------------------------------------------------

    async def aacquire(
        self,
        name: str,
        ttl: float,
        *,
        wait: float | None = None,
        renew: bool = True,
        hold_at_least: float | None = None,
    ) -> AsyncLease | None:
        """:meth:`acquire` for asyncio: never blocks the event loop; renewal runs as a task."""
        args = self._check_acquire(name, ttl, wait, renew, hold_at_least)
        return await self._acquire_flow(self._async_io, AsyncLease, *args)

    async def arelease(self, lease: AsyncLease) -> bool:
        """:meth:`release` for asyncio."""
        return await self._release_flow(self._async_io, self._check_lease(lease, AsyncLease))

    async def aextend(self, lease: AsyncLease, ttl: float) -> bool:
        """:meth:`extend` for asyncio."""
        lease = self._check_lease(lease, AsyncLease)
        return await self._extend_flow(self._async_io, lease, ttl)

    async def aclaim(self, key: str, hold: float) -> bool:
        """:meth:`claim` for asyncio."""
        key = check_name(key, "key")
        return key in await self.aclaim_many([key], hold)

    async def aclaim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        """:meth:`claim_many` for asyncio."""
        return await self._claim_flow(self._async_io, *self._check_claims(keys, hold))

    async def aforce_release(self, name: str) -> bool:
        """:meth:`force_release` for asyncio."""
        name = check_name(name)
        self._check_open()
        return await self._force_flow(self._async_io, name)

    async def aclose(self) -> None:
        """Close the async resources of the running loop, then everything (see :meth:`close`)."""
        state = self._loop_state.pop(asyncio.get_running_loop(), None)
        if state is not None:
            renewer = state.get("renewer")
            if renewer is not None:
                renewer.stop()
            with contextlib.suppress(Exception):
                await self._async_close(state)
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def __aenter__(self: Self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the one core: decisions written once, over an I/O object ------------------------------

    async def _acquire_flow(
        self,
        io: SyncIO | AsyncIO,
        lease_type: type[L],
        name: str,
        ttl: float,
        timeout: float,
        renew: bool,
        hold_at_least: float | None,
    ) -> L | None:
        self._check_open()
        owner = new_owner()
        begun = time.monotonic()
        deadline = begun + timeout
        what = ("acquire", name)
        wakes: bool | None = None  # can _wait wake us (looked up when first busy)
        poll = self.POLL_MIN
        ticket: Any = None
        busy_since: float | None = None  # the first busy answer (for the handoff wait)
        try:
            sent = time.monotonic()
            attempt = await io.call(
                what, self._try_acquire, self._async_try_acquire, name, owner, ttl, None
            )
            ticket = attempt.ticket
            while attempt.fence is None:
                now = time.monotonic()
                if busy_since is None:
                    busy_since = now
                if now >= deadline:
                    break
                budget = deadline - now
                if attempt.retry_in is not None:
                    budget = min(budget, max(attempt.retry_in, 0.0) + EXPIRY_SLACK)
                if wakes is None:
                    wakes = self._wakes(io)
                if not wakes:
                    budget = min(budget, poll)
                    poll = min(poll * 2, self.POLL_MAX)
                sent = time.monotonic()
                woke = await io.call(
                    ("wait for", name), self._wait, self._async_wait, name, ticket, budget
                )
                self._check_open()
                if woke is None:
                    # Always try after a wake-up, even if the deadline just passed: a wake-up
                    # meant for one waiter must not be dropped.
                    sent = time.monotonic()
                    woke = await io.call(
                        what, self._try_acquire, self._async_try_acquire, name, owner, ttl, ticket
                    )
                attempt = woke
                ticket = attempt.ticket
        except BaseException as exc:
            # a transport error or an interruption may have eaten a granting reply
            maybe = not isinstance(exc, Exception) or isinstance(exc, BackendUnavailable)
            await self._cleanup(io, name, owner, ticket, maybe_granted=maybe)
            if _observe.observers:
                outcome = "error" if isinstance(exc, Exception) else "cancelled"
                _observe.acquire(self.backend_name, name, outcome, time.monotonic() - begun, None)
            raise
        if attempt.fence is None:
            if ticket is not None:
                await self._cleanup(io, name, owner, ticket, maybe_granted=False)
            if _observe.observers:
                _observe.acquire(self.backend_name, name, "busy", time.monotonic() - begun, None)
            return None
        started = sent if attempt.started is None else min(attempt.started, time.monotonic())
        lease = lease_type(
            self, name, owner, attempt.fence, ttl, started,
            renew=renew, hold_at_least=hold_at_least,
        )  # fmt: skip
        self._adopt(lease, io)
        if _observe.observers:  # posted inline: this is every lock()'s path
            done = time.monotonic()
            waited = None if busy_since is None else done - busy_since
            _observe.post(
                (_observe.ACQUIRE, self.backend_name, name, "acquired", done - begun, waited)
            )
        return lease

    async def _cleanup(
        self, io: SyncIO | AsyncIO, name: str, owner: str, ticket: Any, *, maybe_granted: bool
    ) -> None:
        """An acquire call gave up: drop its waiter state; when a reply may have been lost (an
        error, a cancelled task, Ctrl-C), also release, since it may have granted the lock."""
        try:
            if ticket is not None:
                await io.once(self._abandon, self._async_abandon, name, owner, ticket)
            if maybe_granted:
                await io.once(self._release, self._async_release, name, owner)
        except BaseException as exc:  # best effort: the lock expires after its ttl anyway
            log.debug(
                "cleanup after acquire %r failed: %r", name, exc,
                extra={"lock": name, "owner": owner, "backend": self.backend_name,
                       "event": "cleanup", "outcome": "error", "error": repr(exc)},
            )  # fmt: skip

    def _usable(self, lease: BaseLease, what: str) -> bool:
        """False (without I/O) for a lease this process cannot act on: a forked child's copy
        of its parent's lease, or one of a closed coordinator (then marked lost)."""
        if lease._pid != process.pid:
            log.warning(
                "lease %r belongs to the parent process (pid %d); not %s in this forked child",
                lease.name, lease._pid, what, extra=lease._facts(what, outcome="refused"),
            )  # fmt: skip
            return False
        if self._closed:
            lease._mark_lost("its coordinator was closed", even_if_released=True, kind="closed")
            return False
        return True

    async def _release_flow(self, io: SyncIO | AsyncIO, lease: BaseLease) -> bool:
        # A lost lease is still released on the server (a renewal answered late may have
        # extended it there), but the caller hears False: it did not hold the lock throughout.
        if (lease._pid != process.pid or self._closed) and not self._usable(lease, "released"):
            return False
        async with lease._op:  # after any renewal in flight: it cannot undo this
            was_lost = lease._begin_release()
            if was_lost is None:  # released before
                return False
            if was_lost:  # lost at its deadline but not yet reported: make it stick
                lease._mark_lost("ttl elapsed without renewal", even_if_released=True,
                                 kind="expired")
            self._leases_by_owner.pop(lease.owner, None)
            linger = 0.0 if lease._hold_until is None else lease._linger()
            what = ("release", lease.name)
            if linger > 0:
                ok = await io.call(
                    what, self._release_later, self._async_release_later,
                    lease.name, lease.owner, linger,
                )  # fmt: skip
            else:
                ok = await io.call(
                    what, self._release, self._async_release, lease.name, lease.owner
                )
        if not ok:
            lease._mark_lost(
                "the lock was no longer ours at release", even_if_released=True, kind="not-ours"
            )
        return bool(ok) and not was_lost

    async def _extend_flow(
        self,
        io: SyncIO | AsyncIO,
        lease: BaseLease,
        ttl: float | None,
        *,
        deadline: float | None = None,
        renewal_of: int | None = None,
    ) -> bool:
        """Extend ``lease`` to ``ttl`` s (``None``: its current ttl). ``renewal_of``: the
        generation a background renewal was scheduled for; it is skipped (True) when the
        lease was extended meanwhile, so it can never undo a longer ``extend()``."""
        if ttl is not None:
            ttl = check_ttl(ttl)
        if not self._usable(lease, "extended"):
            return False
        async with lease._op:  # one extension or release of a lease at a time
            if lease.released or lease._lost:
                return False
            if renewal_of is not None and renewal_of != lease._gen:
                return True
            if ttl is None:
                ttl = lease.ttl
            sent = time.monotonic()
            if sent >= lease._deadline:
                lease._mark_lost("ttl elapsed before the extension", kind="expired")
                return False
            ok = await io.call(
                ("extend", lease.name), self._extend, self._async_extend,
                lease.name, lease.owner, ttl,
                deadline=lease._deadline - sent if deadline is None else deadline,
            )  # fmt: skip
            if ok:
                return lease._renewed(sent, ttl)
        lease._mark_lost("the lock is no longer ours (expired or taken over)", kind="not-ours")
        return False

    async def _claim_flow(self, io: SyncIO | AsyncIO, keys: list[str], hold: float) -> set[str]:
        if not keys:
            return set()
        won = await io.call("claim", self._claim_many, self._async_claim_many, keys, hold)
        return set(won)

    async def _force_flow(self, io: SyncIO | AsyncIO, name: str) -> bool:
        try:
            removed = bool(
                await io.call(
                    f"force-release {name!r}", self._force_release, self._async_force_release, name
                )
            )
        except NotImplementedError:
            raise ConfigurationError(
                f"the {self.backend_name} backend cannot force-unlock; wait for the lease to "
                "expire"
            ) from None
        for lease in list(self._leases_by_owner.values()):  # a holder in this process hears now
            if lease.name == name:
                lease._mark_lost("force-released by an operator", kind="not-ours")
        return removed

    # -- checks shared by both APIs ---------------------------------------------------------

    def _check_acquire(
        self, name: str, ttl: float, wait: object, renew: object, hold_at_least: object
    ) -> tuple[str, float, float, bool, float | None]:
        name = check_name(name)
        ttl = check_ttl(ttl)
        timeout = check_wait(wait)
        if not isinstance(renew, bool):
            raise TypeError("renew must be a bool")
        return name, ttl, timeout, renew, check_hold_at_least(hold_at_least)

    def _check_claims(self, keys: Iterable[str], hold: float) -> tuple[list[str], float]:
        checked = list(dict.fromkeys(check_names(keys)))
        hold = check_seconds(hold, "hold")
        self._check_open()
        return checked, hold

    @staticmethod
    def _check_lease(lease: object, kind: type[L]) -> L:
        if not isinstance(lease, kind):
            other = "AsyncLease (use the a-methods)" if isinstance(lease, AsyncLease) else ""
            raise TypeError(
                f"expected a {kind.__name__}, not {other or type(lease).__name__}"
            )
        return lease

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"{type(self).__name__} is closed")
        pid = process.pid
        if pid != self._owner_pid:  # a forked child: never use the parent's connections
            self._owner_pid = pid
            self._leases_by_owner.clear()
            self._renewer._reset_after_fork()
            self._loop_state = weakref.WeakKeyDictionary()
            self._executor = None
            self._after_fork()

    def _wakes(self, io: SyncIO | AsyncIO) -> bool:
        if not self.wakes_waiters:
            return False
        if io.asynchronous:  # a sync wake-up run in a thread would pin a worker thread
            return type(self)._async_wait is not Hooks._async_wait
        return True

    def _adopt(self, lease: BaseLease, io: SyncIO | AsyncIO) -> None:
        """Register a new lease: push reports, deadline checks and renewal."""
        self._leases_by_owner[lease.owner] = lease
        renewer = self._loop_local("renewer", lambda: Renewer(self, io)) if io.asynchronous \
            else self._renewer
        lease._arm(renewer)

    # -- protected API for backends ---------------------------------------------------------

    def _loop_local(self, key: str, factory: Callable[[], T]) -> T:
        """A per-event-loop object (an async client, a renewal task…), made by ``factory`` on
        first use in the running loop. Closed by :meth:`aclose` through ``_async_close``; the
        objects of loops that have closed meanwhile are dropped."""
        loop = asyncio.get_running_loop()
        state = self._loop_state.get(loop)
        if state is None:
            for other in [lp for lp in list(self._loop_state.keys()) if lp.is_closed()]:
                self._loop_state.pop(other, None)
            state = self._loop_state.setdefault(loop, {})
        if key not in state:
            state[key] = factory()
        return state[key]  # type: ignore[no-any-return]

    def _report_lost(self, owner: str, reason: str) -> None:
        """The backend learnt that the lease of ``owner`` is gone (pushed by the server)."""
        lease = self._leases_by_owner.pop(owner, None)
        if lease is not None:
            lease._mark_lost(reason)

    def _report_at_risk(self, owner: str, reason: str) -> None:
        """The lease of ``owner`` cannot be confirmed right now (e.g. connection suspended)."""
        lease = self._leases_by_owner.get(owner)
        if lease is not None:
            lease._mark_at_risk(reason)

    def _report_restored(self, owner: str) -> None:
        """The lease of ``owner`` was confirmed again before its deadline."""
        lease = self._leases_by_owner.get(owner)
        if lease is not None and time.monotonic() < lease._deadline:
            lease._restored()

    def _report_all(self, state: str, reason: str = "") -> None:
        """Report ``state`` (``"at-risk"``, ``"restored"``, ``"lost"``) for every live lease."""
        for owner in list(self._leases_by_owner):
            if state == LOST:
                self._report_lost(owner, reason)
            elif state == AT_RISK:
                self._report_at_risk(owner, reason)
            elif state == RESTORED:
                self._report_restored(owner)
            else:
                raise ValueError(f"unknown lease state {state!r}")

    def _live_owners(self) -> list[tuple[str, str]]:
        """(name, owner) of every lease this coordinator handed out and still tracks."""
        return [(lease.name, owner) for owner, lease in list(self._leases_by_owner.items())]

def _unknown_backend_options(cls: type, unknown: dict[str, Any]) -> ConfigurationError:
    """The error for options no ``__init__`` of ``cls`` accepts."""
    known: set[str] = {"retry_deadline"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD) and \
                    param.name != "self" and not param.name.startswith("_"):
                known.add(param.name)
    backend = getattr(cls, "backend_name", cls.__name__)
    return unknown_options(f"the {backend} backend", unknown, known)
