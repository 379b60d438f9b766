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
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import psycopg
from psycopg import errors as pg_errors

from ..._base import BaseCoordinator
from ..._errors import ConfigurationError, CoordlockError
from ..._lease import Lease
from ..._protocol import LockInfo, RunRecord
from .._pg_keys import lock_key
from .errors import classify
from .keeper import TICK, Keeper
from .options import (
    DEFAULT_IO_TIMEOUT,
    PGBOUNCER_ADVICE,
    PgOptions,
    build_options,
    split_url,
)
from .session import MAX_MS, Held, Session, SessionPool, ms
from .statements import Statements, statements

log = logging.getLogger("coordlock")
T = TypeVar("T")

#: The server's and this host's clocks may run at rates this far apart (ratio): the lease
#: clock of a granted wait starts that much earlier than the measured wait says.
CLOCK_RATE_SLACK = 1e-3

_live: weakref.WeakSet[PostgresCoordinator] = weakref.WeakSet()


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

    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (psycopg.OperationalError,)

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
        self._pool = SessionPool(opts, self._q, self._start_keeper)
        self._keeper = Keeper(self._pool, self._q, self._report_lost_held, self._retire)
        self._closing = threading.Event()
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

    # -- loss reporting (phase 1: through the Lease) ------------------------------------------

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        """See :meth:`BaseCoordinator.acquire`; the lease is also tied to its server session."""
        self._check_fork()
        lease = super().acquire(name, ttl, wait=wait, renew=renew)
        if lease is not None:
            held = self._pool.held.get(name)
            if held is not None and held.owner == lease.owner:
                held.lease = lease
            else:
                lease._mark_lost("its PostgreSQL session ended right after the acquisition")
        return lease

    def _report_lost_held(self, entries: list[Held], reason: str) -> None:
        for held in entries:
            if held.lease is not None:
                held.lease._mark_lost(reason)

    # -- helpers -----------------------------------------------------------------------------

    def _start_keeper(self) -> None:
        self._keeper.start()

    def _check_fork(self) -> None:
        if self._pool.pid != os.getpid():
            self._after_fork()

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's sessions without ending them; reconnect
        lazily. The parent's locks stay the parent's (the child does not hold them)."""
        self._pool.after_fork()
        self._keeper.after_fork()
        self._closing = threading.Event()

    def _fail(self, session: Session, exc: psycopg.Error, key: int | None) -> BaseException:
        """After a failed statement: clean up, report lost locks, and return what to raise.

        A session-level advisory lock taken by a statement that then failed survives the
        rollback, so on a live session the key is unlocked again (it was not held before).
        """
        lost: list[Held] = []
        if session.broken:
            lost = self._pool.drop(session, f"{type(exc).__name__}: {exc}")
        elif key is not None:
            try:
                session.run(self._q.unlock, (key,), time.monotonic() + self._io)
            except psycopg.Error as again:
                lost = self._pool.drop(session, f"{type(again).__name__}: {again}")
        self._report_lost_held(lost, "its PostgreSQL session ended")
        return self._translate(exc)

    def _translate(self, exc: psycopg.Error) -> BaseException:
        verdict = classify(exc)
        if verdict == "permanent":
            if isinstance(exc, pg_errors.InsufficientPrivilege):
                return ConfigurationError(
                    f"PostgreSQL refused a coordlock statement: {exc}. Grant the role the "
                    "privileges listed in docs/backends/postgres.md (or run `coordlock init`)"
                )
            return ConfigurationError(f"PostgreSQL: {exc}")
        if verdict == "transient" or isinstance(exc, psycopg.OperationalError):
            return exc  # retried
        return CoordlockError(f"PostgreSQL error: {type(exc).__name__}: {exc}")

    def _raise(self, exc: BaseException, cause: psycopg.Error) -> None:
        if exc is cause:
            raise cause
        raise exc from cause

    def _pooled(self, session: Session, pid: int) -> ConfigurationError:
        """The session answered with another backend pid: a transaction-pooling proxy."""
        lost = self._pool.drop(session, "a pooling proxy moved it to another server session")
        self._report_lost_held(lost, "session moved by a pooling proxy (PgBouncer transaction?)")
        return ConfigurationError(
            f"the server session changed under coordlock (pid {session.pid} became {pid}): "
            f"a transaction-pooling proxy such as PgBouncer is in the way. {PGBOUNCER_ADVICE}"
        )

    def _retire(self, session: Session) -> None:
        """Close a session that holds nothing (its mutex held): its unexpired lease rows are
        marked released first, or they would look orphaned once its marker is gone."""
        if self._leases and not session.dead and not session.broken:
            keys = session.row_keys(time.monotonic())
            if keys:
                with contextlib.suppress(psycopg.Error):
                    session.execute(
                        self._q.release_rows,
                        {"keys": keys, "m": session.marker},
                        time.monotonic() + self._io,
                    )
        self._report_lost_held(self._pool.drop(session, "closing"), "its session was closed")

    def _recycle(self, session: Session) -> None:
        if not self._pool.recycle(session):
            self._retire(session)

    # -- hooks: acquire ----------------------------------------------------------------------

    def _try_acquire(self, name: str, owner: str, ttl: float) -> int | None:
        key = self.key(name)
        try:  # the fast path skips building a tenacity retrier
            return self._try_once(name, owner, ttl, key)
        except psycopg.OperationalError:
            pass  # retried (with backoff, up to retry_deadline) below: _try_once is idempotent
        return self._retry(lambda: self._try_once(name, owner, ttl, key), f"acquire {name!r}")

    def _try_once(self, name: str, owner: str, ttl: float, key: int) -> int | None:
        session = self._pool.main_session()
        q = self._q
        with session.mutex:
            if session.dead:
                raise psycopg.OperationalError("the lock session ended; reconnecting")
            held = self._pool.held.get(name)
            if held is not None:  # held in this process: same owner = a retried call
                return held.fence if held.owner == owner else None
            want = ms(ttl)
            lower = session.timeout_ms == 0 or want < session.timeout_ms
            params: dict[str, Any] = {"k": key, "owner": owner, "ttl": ttl * 1000.0}
            if lower:
                params["it"] = str(want)
            sent = time.monotonic()
            bound = sent + self._io
            try:
                if self._leases:
                    params["m"] = session.marker
                    row = session.run(q.try_lease_idle if lower else q.try_lease, params, bound)
                    if row is None:  # pragma: no cover - the statement always returns a row
                        raise psycopg.OperationalError("no answer to the acquire statement")
                    fence, got, pid = row[0], row[1], row[2]
                    if fence is None and got:  # locked, nothing written: first use, or orphan
                        params["name"] = name
                        row = session.run(q.take_row_idle if lower else q.take_row, params, bound)
                        if row is None:  # pragma: no cover
                            raise psycopg.OperationalError("no answer to the acquire statement")
                        fence, pid = row[0], row[1]
                        if fence is None:
                            log_orphan(name, row[3])
                else:
                    row = session.run(q.try_session_idle if lower else q.try_session, params, bound)
                    if row is None:  # pragma: no cover
                        raise psycopg.OperationalError("no answer to the acquire statement")
                    fence, pid = row[0], row[2]
            except psycopg.Error as exc:
                self._raise(self._fail(session, exc, key), exc)
            session.last_used = time.monotonic()
            if pid != session.pid:
                raise self._pooled(session, pid)
            if fence is None:
                return None
            if lower:
                session.timeout_ms = want
            held = Held(name, owner, key, fence, ttl, sent, session)
            self._pool.add(held)
        self._keeper.schedule(min(held.deadline, session.last_used + TICK))
        return int(fence)

    # -- hooks: release, extend --------------------------------------------------------------

    def _release(self, name: str, owner: str) -> bool:
        held = self._pool.held.get(name)
        if held is None or held.owner != owner:
            return False
        session = held.session
        lost: list[Held] = []
        try:
            with session.mutex:
                if session.dead or self._pool.held.get(name) is not held:
                    return False  # reaped at its ttl, or its session ended: not ours any more
                try:
                    row = session.run(self._q.unlock, (held.key,), time.monotonic() + self._io)
                except psycopg.Error as exc:
                    # Unknown whether the unlock happened: end the session, which surely does.
                    lost = self._pool.drop(session, f"release failed: {type(exc).__name__}: {exc}")
                    return False
                session.last_used = time.monotonic()
                if self._leases:
                    session.recent[held.key] = held.deadline + 1.0
                self._pool.forget(held)
                if not session.main:
                    self._recycle(session)
            unlocked = bool(row and row[0])
            if not unlocked:  # pragma: no cover - the session held it; only a bug gets here
                log.error("coordlock: %r was not locked by its session at release", name)
            return unlocked
        finally:
            others = [h for h in lost if h is not held]
            self._report_lost_held(others, "its PostgreSQL session ended")

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        held = self._pool.held.get(name)
        if held is None or held.owner != owner:
            return False
        session = held.session
        lost: list[Held] = []
        try:
            with session.mutex:
                if session.dead or self._pool.held.get(name) is not held:
                    return False
                ttls = [ms(h.ttl) for h in session.held.values() if h is not held]
                desired = min([ms(ttl), *ttls])
                sent = time.monotonic()
                # beyond the lease's own deadline an answer is useless: it is lost by then
                bound = min(sent + self._io, max(held.deadline, sent + 0.001))
                self._keeper.schedule(bound)
                params = {"ttl": ttl * 1000.0, "k": held.key, "m": session.marker,
                          "it": str(desired)}  # fmt: skip
                try:
                    row = session.run(
                        self._q.extend_lease if self._leases else self._q.extend_session,
                        params,
                        bound,
                    )
                except psycopg.Error as exc:
                    lost = self._pool.drop(session, f"renewal failed: {type(exc).__name__}: {exc}")
                    return False
                session.last_used = time.monotonic()
                if row is None or row[0] != session.pid:
                    raise self._pooled(session, row[0] if row else -1)
                session.timeout_ms = desired
                held.ttl = ttl
                held.deadline = sent + ttl
            self._keeper.schedule(held.deadline)
            return True
        finally:
            others = [h for h in lost if h is not held]
            self._report_lost_held(others, "its PostgreSQL session ended")

    # -- hooks: waiting ----------------------------------------------------------------------

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        key = self.key(name)

        def attempt() -> WaitOutcome:
            left = deadline - time.monotonic()
            if left <= 0:
                return WaitOutcome()
            return self._wait_once(name, owner, ttl, key, left)

        while True:
            self._check_open()
            if deadline <= time.monotonic():
                return None
            outcome = self._retry(attempt, f"wait for {name!r}")
            if outcome.fence is not None:
                return outcome.fence, outcome.started
            if outcome.orphan_left is not None:  # the holder's session died: wait out its lease
                log_orphan(name, outcome.orphan_left)
                pause = max(0.001, min(outcome.orphan_left, deadline - time.monotonic()))
                if self._closing.wait(pause):
                    self._check_open()

    def _wait_once(
        self, name: str, owner: str, ttl: float, key: int, timeout: float
    ) -> WaitOutcome:
        """Block in ``pg_advisory_lock`` on a spare session for up to ``timeout`` s.

        Granted: the spare now holds the lock (``fence``, ``started`` = send time + the wait
        the server measured). Not granted: ``orphan_left`` s of a dead holder's lease, or a
        timeout (both None)."""
        session = self._pool.take_spare() or self._pool.open()
        lock_timeout = "0" if math.isinf(timeout) else str(min(ms(timeout), MAX_MS))
        want = ms(ttl)
        with session.mutex:
            params = {"k": key, "name": name, "owner": owner, "ttl": ttl * 1000.0,
                      "m": session.marker, "lt": lock_timeout, "it": str(want)}  # fmt: skip
            sent = time.monotonic()
            bound = sent + (timeout if ms(timeout) < MAX_MS else math.inf) + self._io
            try:
                row = session.run(
                    self._q.wait_lease if self._leases else self._q.wait_session, params, bound
                )
            except psycopg.Error as exc:
                error = self._fail(session, exc, key)
                if not session.dead:
                    self._recycle(session)
                self._check_open()
                if isinstance(exc, pg_errors.LockNotAvailable):
                    return WaitOutcome()  # lock_timeout: the caller re-checks its deadline
                self._raise(error, exc)
                raise  # pragma: no cover - _raise always raises
            received = time.monotonic()
            session.last_used = received
            if row is None:  # pragma: no cover
                raise psycopg.OperationalError("no answer to the wait statement")
            fence, pid, orphan_left, waited = row[0], row[1], row[3], row[4]
            if pid != session.pid:
                raise self._pooled(session, pid)
            if fence is None:
                self._recycle(session)
                return WaitOutcome(orphan_left=float(orphan_left or 0.0))
            started = lease_start(sent, received, waited)
            session.timeout_ms = want
            held = Held(name, owner, key, fence, ttl, started, session)
            self._pool.add(held)
        self._keeper.schedule(min(held.deadline, received + TICK))
        return WaitOutcome(fence=int(fence), started=started)

    # -- claims, history, listing (on an auxiliary connection) -------------------------------

    def _aux_call(self, fn: Callable[[Session], T], what: str) -> T:
        def attempt() -> T:
            with self._pool.aux_lock:
                session = self._pool.aux_session()
                try:
                    with session.mutex:
                        return fn(session)
                except psycopg.Error as exc:
                    self._raise(self._fail(session, exc, None), exc)
                    raise  # pragma: no cover

        self._check_fork()
        return self._retry(attempt, what)

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        ordered = sorted(keys)
        claimant = uuid.uuid4().hex  # the same across retries: a retry gets its own claim back
        hold_ms = hold * 1000.0

        def claim(session: Session) -> set[str]:
            rows = session.run_all(
                self._q.claim, (claimant, hold_ms, ordered), time.monotonic() + self._io
            )
            return {str(r[0]) for r in rows}

        won = self._aux_call(claim, "claim")
        now = time.monotonic()
        if now - self._last_cleanup > 600:
            self._last_cleanup = now
            try:
                self._aux_call(
                    lambda s: s.execute(self._q.claims_cleanup, (), now + self._io),
                    "claims cleanup",
                )
            except CoordlockError as exc:  # housekeeping only
                log.info("coordlock: claims cleanup failed: %s", exc)
            except psycopg.Error as exc:  # pragma: no cover - translated above
                log.info("coordlock: claims cleanup failed: %s", exc)
        return won

    def _fetch_all(self, query: str, params: Sequence[Any], what: str) -> list[tuple[Any, ...]]:
        return self._aux_call(lambda s: s.run_all(query, params, time.monotonic() + self._io), what)

    def locks(self) -> list[LockInfo]:
        """Locks held in this schema (granted advisory locks with their holder rows).

        This coordinator's own locks carry its local expiry estimate; other processes' locks the
        expiry of their lease rows (server clock). With ``takeover=session`` there are no lease
        rows, so only this coordinator's locks are listed. Other applications' advisory locks
        are never listed.
        """
        self._check_open()
        rows = self._fetch_all(self._q.locks, (), "list locks")
        now_mono, now_wall = time.monotonic(), time.time()
        with self._pool.state:
            mine = [h for h in self._pool.held.values() if not h.session.dead]
        infos: dict[str, LockInfo] = {}
        for _pid, _key, name, owner, fence, expires in rows:
            infos[name] = LockInfo(name, owner, int(fence), expires)
        for held in mine:  # ours: exact, and listed with takeover=session too
            expires_at = now_wall + (held.deadline - now_mono)
            infos[held.name] = LockInfo(held.name, held.owner, held.fence, expires_at)
        return [infos[name] for name in sorted(infos)]

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run`` (keyed by ``run_id``)."""
        if not isinstance(run, RunRecord):
            raise TypeError(f"expected a RunRecord, not {type(run).__name__}")
        self._check_open()
        params = (run.run_id, run.job, run.tick, run.instance, run.started, run.finished,
                  run.status, run.error)  # fmt: skip
        self._aux_call(
            lambda s: s.execute(self._q.record_run, params, time.monotonic() + self._io),
            "record run",
        )

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first, optionally of one ``job``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        self._check_open()
        if job is None:
            rows = self._fetch_all(self._q.history, (limit,), "read history")
        else:
            rows = self._fetch_all(self._q.history_job, (job, limit), "read history")
        return [
            RunRecord(
                run_id=r[0],
                job=r[1],
                tick=r[2],
                instance=r[3],
                started=float(r[4]),
                finished=None if r[5] is None else float(r[5]),
                status=r[6],
                error=r[7],
            )
            for r in rows
        ]

    # -- closing -----------------------------------------------------------------------------

    def _close(self) -> None:
        self._closing.set()
        pool = self._pool
        if pool.pid != os.getpid():  # a forked child: the sessions are the parent's
            self._after_fork()
        with pool.state:
            pool.closed = True
            sessions = list(pool.sessions)
        self._keeper.stop()
        for session in sessions:
            if session.mutex.locked():  # maybe blocked in pg_advisory_lock: cancel it
                with contextlib.suppress(Exception):  # best effort
                    cancel_safe = getattr(session.conn, "cancel_safe", None)
                    if cancel_safe is not None:
                        cancel_safe(timeout=2)
                    else:  # pragma: no cover - psycopg < 3.2
                        session.conn.cancel()
        lost: list[Held] = []
        for session in sessions:
            got = session.mutex.acquire(timeout=5)
            try:
                if got:
                    self._mark_released(session)
                lost += pool.drop(session, "coordinator closed")
            finally:
                if got:
                    session.mutex.release()
        _live.discard(self)
        self._report_lost_held(lost, "the coordinator was closed (its session and locks ended)")

    def _mark_released(self, session: Session) -> None:
        """Our lease rows on ``session`` stop holding others off (best effort, mutex held)."""
        if not self._leases or session.dead or session.broken:
            return
        keys = session.row_keys(time.monotonic())
        if keys:
            with contextlib.suppress(psycopg.Error):
                session.execute(
                    self._q.release_rows,
                    {"keys": keys, "m": session.marker},
                    time.monotonic() + min(self._io, 2.0),
                )

    def _at_exit(self) -> None:
        """Interpreter exit: mark this process's lease rows released (the sessions end with
        the process), so the next process need not wait out leases that were let go."""
        if self.closed or self._pool.pid != os.getpid():
            return
        for session in self._pool.live_sessions():
            if session.mutex.acquire(timeout=1):
                try:
                    self._mark_released(session)
                finally:
                    session.mutex.release()


class WaitOutcome:
    """What one blocking wait gave: a fence (and lease start), or an orphan's remaining lease."""

    __slots__ = ("fence", "orphan_left", "started")

    def __init__(
        self,
        fence: int | None = None,
        started: float = 0.0,
        orphan_left: float | None = None,
    ) -> None:
        self.fence = fence
        self.started = started
        self.orphan_left = orphan_left


def lease_start(sent: float, received: float, waited: float | None) -> float:
    """A monotonic time no later than the server's start of a lease granted after a wait.

    ``waited`` is the server's own measure (s) from the statement's arrival to the grant. The
    statement arrived after ``sent``, so ``sent + waited`` is no later than the grant (in this
    host's clock, give or take the clocks' rate difference: :data:`CLOCK_RATE_SLACK`), and never
    later than the reply."""
    wait = max(0.0, min(float(waited or 0.0), received - sent))
    return sent + wait * (1.0 - CLOCK_RATE_SLACK)


def log_orphan(name: str, remaining: float | None) -> None:
    log.info(
        "coordlock: %r was freed by a session that ended while holding it; its lease has "
        "%.3fs left, so the lock stays unavailable until then",
        name,
        remaining or 0.0,
    )


def _after_fork_in_child() -> None:
    for coordinator in list(_live):
        coordinator._after_fork()


def _at_exit() -> None:
    for coordinator in list(_live):
        with contextlib.suppress(Exception):
            coordinator._at_exit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
