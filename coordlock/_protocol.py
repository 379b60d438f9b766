"""The protocols a backend implements: :class:`RunCoordinator` and its optional extensions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._lease import AsyncLease, Lease


@runtime_checkable
class RunCoordinator(Protocol):
    """What every backend provides. Units are seconds.

    * ``acquire`` returns a :class:`Lease`, or ``None`` when the lock is held by someone else
      (after waiting up to ``wait`` seconds; ``None``/``0`` = try once, ``math.inf`` = forever).
    * ``release`` and ``extend`` are compare-and-act: they only touch the lock while it is still
      owned by ``lease.owner`` and return ``False`` otherwise.
    * ``claim(key, hold)`` is once-only: among all callers asking for ``key`` within ``hold``
      seconds of the first success, exactly one gets ``True``.
    * Server failures raise :class:`~coordlock.BackendUnavailable` after bounded retries.
    """

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None: ...

    def release(self, lease: Lease) -> bool: ...

    def extend(self, lease: Lease, ttl: float) -> bool: ...

    def claim(self, key: str, hold: float) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncRunCoordinator(Protocol):
    """The async side of a coordinator (every :class:`~coordlock.backends.BaseCoordinator`
    has it): the same operations as :class:`RunCoordinator`, as coroutines."""

    async def aacquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> AsyncLease | None: ...

    async def arelease(self, lease: AsyncLease) -> bool: ...

    async def aextend(self, lease: AsyncLease, ttl: float) -> bool: ...

    async def aclaim(self, key: str, hold: float) -> bool: ...

    async def aclaim_many(self, keys: Iterable[str], hold: float) -> set[str]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ForceUnlocks(Protocol):
    """Optional: operator force-unlock (``coordlock unlock NAME --force``)."""

    def force_release(self, name: str) -> bool: ...


@runtime_checkable
class ClaimsMany(Protocol):
    """Optional: claim every key of a tick in one round trip."""

    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]: ...


@dataclass(frozen=True)
class LockInfo:
    """One held lock, as listed by :meth:`ListsLocks.locks` (``expires_at``: epoch seconds)."""

    name: str
    owner: str
    fence: int
    expires_at: float | None


@runtime_checkable
class ListsLocks(Protocol):
    """Optional: tell who holds what (used by ``coordlock locks``)."""

    def locks(self) -> list[LockInfo]: ...


@dataclass(frozen=True)
class RunRecord:
    """One run of a scheduled job, as kept in run history. Times are epoch seconds.

    ``status`` is one of ``claimed``, ``running``, ``finished``, ``failed``, ``skipped``,
    ``stuck``, ``missed``. ``run_id`` identifies the run; recording the same ``run_id`` again
    updates it. ``result`` is the job's return value as JSON text (size-capped by the
    scheduler), ``None`` when it returned nothing or has not finished; a backend stores it
    as it stores ``error``.
    """

    run_id: str
    job: str
    tick: str
    instance: str
    started: float
    finished: float | None = None
    status: str = "running"
    error: str | None = None
    result: str | None = None


@runtime_checkable
class KeepsHistory(Protocol):
    """Optional: store run history for the scheduler."""

    def record_run(self, run: RunRecord) -> None: ...

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]: ...


@runtime_checkable
class RecordsMany(Protocol):
    """Optional, with :class:`KeepsHistory`: store several rows in one round trip.

    The same as ``record_run`` for each row in order (a later row of the same ``run_id``
    wins), written at once: the scheduler's history writers send the rows that queued up
    while they wrote the last ones (a tick won with many jobs queues one ``claimed`` row per
    job). Raises as ``record_run`` does; on an error the rows may be partly written.
    """

    def record_runs(self, runs: Sequence[RunRecord]) -> None: ...


@dataclass(frozen=True)
class ServerInfo:
    """What ``coordlock check`` reports about a backend's server.

    ``server_time``: the server's clock (epoch seconds) read at ``measured_at`` (the local
    ``time.time()`` halfway through the request), so ``server_time - measured_at`` estimates the
    clock offset; ``None`` when the backend cannot tell.
    """

    backend: str
    version: str | None = None
    server_time: float | None = None
    measured_at: float | None = None


@runtime_checkable
class DescribesServer(Protocol):
    """Optional: report the server's version and clock (``coordlock check``)."""

    def server_info(self) -> ServerInfo: ...
