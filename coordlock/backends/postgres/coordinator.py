"""``PostgresCoordinator``: advisory locks with lease rows, fences from a sequence, claims.

How a lock works (details and exact bounds in ``docs/backends/postgres.md``):

* A lock is a **session-level advisory lock** on a 64-bit key (SHA-256 of ``namespace + "\\0" +
  name``), held on the coordinator's own autocommit connection, never inside a caller's
  transaction.
* **Acquire is one statement**: ``pg_try_advisory_lock(key)`` and, only when taken, ``nextval``
  of the ``fence`` sequence and an UPDATE of the key's UNLOGGED *lease row* (holding session's
  marker, expiry by the server clock): the one write of a pair. **Release is one statement**,
  ``pg_advisory_unlock(key)``, with no write. Nothing runs in the background per pair.
* **Orphans**: PostgreSQL frees a session's advisory locks the moment the session ends, also
  under a holder that still believes it holds them. An acquirer that finds a key free but its
  lease row unexpired and another session's checks that session's *marker* lock: held means
  the key was released on purpose; free means the session died holding it, and the key stays
  unavailable until the lease expires (``markers.py``). ``takeover=session`` turns this off.
* **Waiting** blocks in ``pg_advisory_lock`` under ``lock_timeout`` on a spare connection; a
  release wakes the waiter at once, and the lease clock starts at send time + the wait the
  server measured (never later than the server's lease start).
* **TTL with teeth**: a session holding locks has ``idle_session_timeout`` = the smallest ttl it
  holds; the keeper thread unlocks leases whose ttl passed without renewal, notices sessions the
  server ended, and cuts statements that got no answer within ``io_timeout`` (frozen links).

Sync hooks run flows (``flows.py``) on ``psycopg.Connection`` sessions; async hooks run the same
flows on ``psycopg.AsyncConnection`` sessions of the running event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import psycopg

from ..._attempt import Attempt
from ..._base import BaseCoordinator
from ..._errors import ConfigurationError
from ..._protocol import LockInfo, RunRecord, ServerInfo
from .._pg_keys import lock_key
from . import reports
from .flows import (
    Flow,
    Ticket,
    adrive,
    drive,
    extend_flow,
    force_flow,
    linger_flow,
    mark_rows_flow,
    one,
    release_flow,
    retire_flow,
    service_flow,
    setup_flow,
    try_flow,
    wait_flow,
)
from .keeper import Keeper
from .options import DEFAULT_IO_TIMEOUT, PgOptions, build_options, split_url
from .session import (
    AsyncSession,
    BaseSession,
    Held,
    Pool,
    Registry,
    Session,
    Step,
    configure,
)
from .statements import Statements, statements

log = logging.getLogger("coordlock")
T = TypeVar("T")

_live: weakref.WeakSet[PostgresCoordinator] = weakref.WeakSet()

#: The key of this backend's per-event-loop state (see ``BaseCoordinator._loop_local``).
LOOP_KEY = "postgres"


class LoopPool(Pool):
    """The async sessions of one event loop, and the locks that serialize connecting them."""

    def __init__(self) -> None:
        super().__init__()
        self.main_lock = asyncio.Lock()
        self.aux_lock = asyncio.Lock()


class PostgresCoordinator(BaseCoordinator):
    """Coordinator over PostgreSQL >= 14 with psycopg 3 (see the module docstring).

    Options (keyword arguments, or URL query options in ``postgresql://…?schema=x``):

    * ``schema`` – where the tables live (default ``coordlock``).
    * ``create_schema`` – create (or upgrade) the schema on first use when it is missing
      (default true). False: never issue DDL; a missing schema raises ConfigurationError
      naming ``coordlock init`` (:func:`init_schema` run once by an admin).
    * ``namespace`` – mixed into every lock key (default: the schema name), so schemas of one
      database never share advisory keys.
    * ``takeover`` – ``lease`` (default): when a holder's session ends abnormally, its locks
      stay unavailable until its lease expires; ``session``: PostgreSQL's own rule, a lock is
      free the moment its session ends (no row write; the old holder may overlap the next one
      until it notices: fence your writes).
    * ``pgbouncer`` – ``session`` if you connect through PgBouncer in session pooling mode;
      ``transaction``/``statement`` are refused with an explanation.
    * ``retry_deadline`` – seconds to retry a failing server (default 10).
    * ``io_timeout`` – seconds one statement may go unanswered before its connection is cut
      (default 10; also libpq's ``tcp_user_timeout`` unless the URL sets it). Blocking waits
      get their wait on top, renewals at most the lease's remaining time.
    """

    backend_name: ClassVar[str] = "postgres"
    wakes_waiters: ClassVar[bool] = True

    def __init__(
        self,
        conninfo: str = "",
        *,
        schema: str = "coordlock",
        namespace: str | None = None,
        pgbouncer: str | None = None,
        takeover: str = "lease",
        retry_deadline: float = 10.0,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        create_schema: bool | str = True,
    ) -> None:
        opts = build_options(
            conninfo,
            schema=schema,
            namespace=namespace,
            pgbouncer=pgbouncer,
            takeover=takeover,
            retry_deadline=retry_deadline,
            io_timeout=io_timeout,
            create_schema=create_schema,
        )
        super().__init__(retry_deadline=retry_deadline)
        self._opts: PgOptions = opts
        self._leases = opts.leases
        self._io = opts.io_timeout
        self._q: Statements = statements(opts.schema)
        self._keys: dict[str, int] = {}  # name -> advisory key (a bounded cache)
        self._registry = Registry()
        self._sync = Pool()
        self._main_lock = threading.Lock()  # serializes connecting the sync main session
        self._aux_lock = threading.Lock()  # serializes use of the sync auxiliary session
        self._keeper = Keeper(self._registry, self._visit)
        self._closing = threading.Event()
        self._schema_ready = False
        self._last_cleanup = 0.0
        _live.add(self)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresCoordinator:
        """``postgresql://user:pw@host:port/db?schema=…&namespace=…&<libpq params>``."""
        conninfo, ours = split_url(url)
        return cls(conninfo, **{**ours, **options})

    @property
    def schema(self) -> str:
        """The schema holding coordlock's tables."""
        return self._opts.schema

    @property
    def namespace(self) -> str:
        """The namespace mixed into every lock key."""
        return self._opts.namespace

    @property
    def _conninfo(self) -> str:
        return self._opts.conninfo

    def key(self, name: str) -> int:
        """The advisory-lock key of ``name`` (see :func:`coordlock.backends._pg_keys.lock_key`)."""
        key = self._keys.get(name)
        if key is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            key = self._keys[name] = lock_key(name, self._opts.namespace)
        return key

    def _report_held(self, entries: list[Held], reason: str) -> None:
        for held in entries:
            self._report_lost(held.owner, reason)

    # -- sync sessions -----------------------------------------------------------------------

    def _enlist(self, s: BaseSession, pool: Pool, *, main: bool = False) -> None:
        s.pool = pool
        s.main = main
        s.conn.add_notify_handler(  # type: ignore[attr-defined]
            lambda n: s.on_notify(n.payload, self._keeper.wake)
        )
        if not self._registry.register(s):
            s.close()
            raise ConfigurationError(f"{type(self).__name__} is closed")
        self._keeper.start()

    def _open(self, pool: Pool, *, marker: bool = True, main: bool = False) -> Session:
        if self._registry.closed:
            raise ConfigurationError(f"{type(self).__name__} is closed")
        conn = psycopg.connect(self._opts.conninfo, autocommit=True, prepare_threshold=0)
        configure(conn)
        s = Session(conn, 0, None)
        try:
            with s.mutex:
                drive(s, setup_flow(self, s, marker=marker and self._leases))
        except BaseException:
            s.close()
            raise
        self._enlist(s, pool, main=main)
        return s

    def _main_session(self) -> Session:
        s = self._sync.main
        if s is not None and not s.dead:
            return s  # type: ignore[return-value]
        with self._main_lock:
            s = self._sync.main
            if s is None or s.dead:
                s = self._sync.main = self._open(self._sync, main=True)
            return s  # type: ignore[return-value]

    def _aux_session(self) -> Session:
        """The sync auxiliary session (the caller holds ``_aux_lock``)."""
        s = self._sync.aux
        if s is None or s.dead:
            s = self._sync.aux = self._open(self._sync, marker=False)
        return s  # type: ignore[return-value]

    def _on(self, s: BaseSession, make: Callable[[Any], Flow[T]]) -> T:
        """Run ``make(s)``'s flow on ``s`` from sync code, whatever kind ``s`` is."""
        if isinstance(s, Session):
            with s.mutex:
                return drive(s, make(s))
        assert isinstance(s, AsyncSession)
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is s.loop:
                raise ConfigurationError("an AsyncLease must be released or renewed with await")
        future = asyncio.run_coroutine_threadsafe(self._alocked(s, make), s.loop)
        return future.result(self._io + 5)

    def _aux(self, make: Callable[[Session], Flow[T]]) -> T:
        with self._aux_lock:
            s = self._aux_session()
            with s.mutex:
                return drive(s, make(s))

    # -- async sessions ----------------------------------------------------------------------

    def _loop_pool(self) -> LoopPool:
        return self._loop_local(LOOP_KEY, LoopPool)

    async def _aopen(self, pool: Pool, *, marker: bool = True, main: bool = False) -> AsyncSession:
        if self._registry.closed:
            raise ConfigurationError(f"{type(self).__name__} is closed")
        conn = await psycopg.AsyncConnection.connect(
            self._opts.conninfo, autocommit=True, prepare_threshold=0
        )
        configure(conn)
        s = AsyncSession(conn, 0, None, asyncio.get_running_loop())
        try:
            async with s.lock:
                await adrive(s, setup_flow(self, s, marker=marker and self._leases))
        except BaseException:
            s.close()
            raise
        self._enlist(s, pool, main=main)
        return s

    async def _amain_session(self) -> AsyncSession:
        lp = self._loop_pool()
        s = lp.main
        if s is not None and not s.dead:
            return s  # type: ignore[return-value]
        async with lp.main_lock:
            s = lp.main
            if s is None or s.dead:
                s = lp.main = await self._aopen(lp, main=True)
            return s  # type: ignore[return-value]

    async def _alocked(self, s: AsyncSession, make: Callable[[Any], Flow[T]]) -> T:
        async with s.lock:
            return await adrive(s, make(s))

    async def _aon(self, s: BaseSession, make: Callable[[Any], Flow[T]]) -> T:
        """Run ``make(s)``'s flow on ``s`` from the running event loop, whatever ``s`` is."""
        if isinstance(s, AsyncSession):
            if s.loop is asyncio.get_running_loop():
                return await self._alocked(s, make)
            future = asyncio.run_coroutine_threadsafe(self._alocked(s, make), s.loop)
            return await asyncio.wrap_future(future)
        return await self._in_thread(self._on, s, make)

    async def _aaux(self, make: Callable[[AsyncSession], Flow[T]]) -> T:
        lp = self._loop_pool()
        async with lp.aux_lock:
            s = lp.aux
            if s is None or s.dead:
                s = lp.aux = await self._aopen(lp, marker=False)
            return await self._alocked(s, make)  # type: ignore[arg-type]

    # -- hooks: acquire and wait -------------------------------------------------------------

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        s = self._main_session()
        with s.mutex:
            if s.dead:
                raise psycopg.OperationalError("the lock session ended; reconnecting")
            return drive(s, try_flow(self, s, name, owner, ttl, self.key(name)))

    async def _async_try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        s = await self._amain_session()
        async with s.lock:
            if s.dead:
                raise psycopg.OperationalError("the lock session ended; reconnecting")
            return await adrive(s, try_flow(self, s, name, owner, ttl, self.key(name)))

    def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        assert isinstance(ticket, Ticket)
        pause = min(ticket.orphan_until - time.monotonic(), timeout)
        if pause > 0:  # a dead holder's lease: nothing to wake us before it ends
            self._closing.wait(pause)
            return None
        s = self._sync.take_spare(self._registry) or self._open(self._sync)
        return self._on(s, lambda s: wait_flow(self, s, name, ticket, timeout))

    async def _async_wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        assert isinstance(ticket, Ticket)
        pause = min(ticket.orphan_until - time.monotonic(), timeout)
        if pause > 0:
            await asyncio.sleep(pause)
            return None
        lp = self._loop_pool()
        s = lp.take_spare(self._registry) or await self._aopen(lp)
        return await self._aon(s, lambda s: wait_flow(self, s, name, ticket, timeout))

    # -- hooks: release, extend, hold --------------------------------------------------------

    def _mine(self, name: str, owner: str) -> Held | None:
        held = self._registry.held.get(name)
        return held if held is not None and held.owner == owner and not held.linger else None

    def _release(self, name: str, owner: str) -> bool:
        held = self._mine(name, owner)
        if held is None:
            return False
        s = held.session
        if isinstance(s, Session):  # (the common case, without a closure)
            with s.mutex:
                return drive(s, release_flow(self, s, held))
        return self._on(s, lambda s: release_flow(self, s, held))

    async def _async_release(self, name: str, owner: str) -> bool:
        held = self._mine(name, owner)
        if held is None:
            return False
        return await self._aon(held.session, lambda s: release_flow(self, s, held))

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        held = self._mine(name, owner)
        return held is not None and self._on(
            held.session, lambda s: extend_flow(self, s, held, ttl)
        )

    async def _async_extend(self, name: str, owner: str, ttl: float) -> bool:
        held = self._mine(name, owner)
        if held is None:
            return False
        return await self._aon(held.session, lambda s: extend_flow(self, s, held, ttl))

    def _release_later(self, name: str, owner: str, linger: float) -> bool:
        held = self._mine(name, owner)
        if held is None:
            return False
        return self._on(held.session, lambda s: linger_flow(self, s, held, linger))

    async def _async_release_later(self, name: str, owner: str, linger: float) -> bool:
        held = self._mine(name, owner)
        if held is None:
            return False
        return await self._aon(held.session, lambda s: linger_flow(self, s, held, linger))

    # -- hooks: force-unlock, claims ---------------------------------------------------------

    def _force_release(self, name: str) -> bool:
        key = self.key(name)
        return self._aux(lambda s: force_flow(self, s, key))

    async def _async_force_release(self, name: str) -> bool:
        key = self.key(name)
        return await self._aaux(lambda s: force_flow(self, s, key))

    def _claim_step(self, keys: Sequence[str], hold: float) -> Step:
        # the claimant is the same across retries: a retry gets its own claim back
        claimant = uuid.uuid4().hex
        params = (
            claimant,
            hold * 1000.0,
            sorted(keys),
        )  # sorted: concurrent claimers never deadlock
        return Step(self._q.claim, params, time.monotonic() + self._io, fetch="all")

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        step = self._claim_step(keys, hold)
        won = {str(r[0]) for r in self._aux(lambda s: one(self, s, step))}
        self._cleanup_claims()
        return won

    async def _async_claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        step = self._claim_step(keys, hold)
        return {str(r[0]) for r in await self._aaux(lambda s: one(self, s, step))}

    def _cleanup_claims(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup < 600:
            return
        self._last_cleanup = now
        step = Step(self._q.claims_cleanup, (), now + self._io, fetch="none")
        try:
            self._aux(lambda s: one(self, s, step))
        except psycopg.Error as exc:  # housekeeping only
            log.info("coordlock: claims cleanup failed: %s", exc)

    # -- the keeper's visits -----------------------------------------------------------------

    def _visit(self, s: BaseSession) -> bool:
        """Run the service flow on ``s`` (keeper thread); False when ``s`` is busy."""
        if isinstance(s, Session):
            if not s.mutex.acquire(timeout=0.02):
                return False
            try:
                if not s.dead:
                    drive(s, service_flow(self, s))
            except Exception:  # (service_flow handles psycopg errors itself)
                log.exception("coordlock: PostgreSQL keeper visit failed")
            finally:
                s.mutex.release()
            return True
        assert isinstance(s, AsyncSession)
        if s.stranded:  # its loop ended without aclose(): its rows first, then close it
            keys = s.row_keys(time.monotonic())
            if self._leases and keys and not s.broken:
                try:
                    s.run_blocking(self._q.lean["release_rows"], {"keys": keys, "m": s.marker})
                except psycopg.Error as exc:
                    log.debug("coordlock: marking rows of a stranded session failed: %s", exc)
            drop_session(self, s, "its event loop closed")
            return True
        if not s.servicing:
            s.servicing = True
            try:
                asyncio.run_coroutine_threadsafe(self._aservice(s), s.loop)
            except RuntimeError:  # its event loop closed just now: the next round frees it
                s.servicing = False
        return True

    async def _aservice(self, s: AsyncSession) -> None:
        try:
            async with s.lock:
                if not s.dead:
                    await adrive(s, service_flow(self, s))
        except Exception:
            log.exception("coordlock: PostgreSQL keeper visit failed")
        finally:
            s.servicing = False

    # -- listing, history, server --------------------------------------------------------------

    def locks(self) -> list[LockInfo]:
        """Locks held in this schema (granted advisory locks with their holder rows).

        This coordinator's own locks carry its local expiry estimate; other processes' locks the
        expiry of their lease rows (server clock). With ``takeover=session`` there are no lease
        rows, so only this coordinator's locks are listed. Other applications' advisory locks
        are never listed.
        """
        return reports.locks(self)

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run`` (keyed by ``run_id``)."""
        reports.record_run(self, run)

    def record_runs(self, runs: Sequence[RunRecord]) -> None:
        """Store or update each of ``runs`` (keyed by ``run_id``) in one statement."""
        reports.record_runs(self, runs)

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first, optionally of one ``job``."""
        return reports.history(self, job, limit)

    def server_info(self) -> ServerInfo:
        """The server's version and clock (``coordlock check``)."""
        return reports.server_info(self)

    # -- fork, closing, exit -----------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's sessions without ending them; reconnect
        lazily. The parent's locks stay the parent's (the child does not hold them)."""
        self._registry.after_fork()
        self._sync = Pool()
        self._main_lock = threading.Lock()
        self._aux_lock = threading.Lock()
        self._keeper.after_fork()
        self._closing = threading.Event()

    def _close(self) -> None:
        self._closing.set()
        registry = self._registry
        if registry.pid != os.getpid():  # a forked child: the sessions are the parent's
            self._after_fork()
        with registry.state:
            registry.closed = True
        self._keeper.stop()
        sessions = registry.live()
        for s in sessions:
            if isinstance(s, Session) and s.mutex.locked():  # maybe in pg_advisory_lock
                with contextlib.suppress(Exception):  # best effort
                    s.conn.cancel_safe(timeout=2)
        reason = "the coordinator was closed (its session and locks ended)"
        for s in sessions:
            if isinstance(s, Session):
                got = s.mutex.acquire(timeout=5)
                try:
                    if got:
                        drive(s, retire_flow(self, s, "coordinator closed", reason))
                    else:
                        drop_session(self, s, "coordinator closed", reason)
                finally:
                    if got:
                        s.mutex.release()
            else:  # async sessions of loops that did not aclose(): end them from here
                drop_session(self, s, "coordinator closed", reason)
        _live.discard(self)

    async def _async_close(self, state: dict[str, Any]) -> None:
        """``aclose()``: retire this event loop's sessions properly (rows released first)."""
        lp = state.get(LOOP_KEY)
        if not isinstance(lp, LoopPool):
            return
        reason = "the coordinator was closed (its session and locks ended)"
        for s in lp.sessions():
            if isinstance(s, AsyncSession) and not s.dead:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._alocked(s, lambda s: retire_flow(self, s, "closed", reason)),
                        self._io,
                    )
                if not s.dead:
                    drop_session(self, s, "closed", reason)

    def _at_exit(self) -> None:
        """Interpreter exit: mark this process's lease rows released (the sessions end with
        the process), so the next process need not wait out leases that were let go."""
        if self.closed or self._registry.pid != os.getpid():
            return
        for s in self._registry.live():
            if isinstance(s, Session) and s.mutex.acquire(timeout=1):
                try:
                    drive(s, mark_rows_flow(self, s))
                finally:
                    s.mutex.release()


def drop_session(
    c: PostgresCoordinator, s: BaseSession, reason: str, report: str | None = None
) -> None:
    from .flows import drop

    drop(c, s, reason, report=report)


def _after_fork_in_child() -> None:
    for coordinator in list(_live):
        with contextlib.suppress(Exception):
            coordinator._check_open()  # notices the new pid and drops the parent's sessions


def _at_exit() -> None:
    for coordinator in list(_live):
        with contextlib.suppress(Exception):
            coordinator._at_exit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
