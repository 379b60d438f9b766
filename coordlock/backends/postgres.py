"""``postgresql://`` – session advisory locks, lease rows, fences from a sequence, claims.

How a lock works (details and exact bounds in ``docs/backends/postgres.md``):

* A lock is a **session-level advisory lock** on a 64-bit key (:func:`lock_key`: SHA-256 of
  ``namespace + "\0" + name``), held on the coordinator's own autocommit connection (the *lock
  session*), never inside a caller's transaction.
* **Acquire is one statement, one round trip**: ``pg_try_advisory_lock(key)`` and, only when
  taken, ``nextval`` of the ``fence`` sequence and an upsert of the key's *lease row* (holding
  session, expiry). Release takes the session's *release marker* for the key and unlocks, in one
  statement. Only the owner that took a lock can release it (tracked in this process).
* **Lease rows close PostgreSQL's gap**: a session's advisory locks are freed the moment the
  session ends, also when it ends under a holder that still believes it holds them. An acquirer
  that finds an unreleased, unexpired lease of a session that did not release the key (no
  marker) unlocks again and waits for that lease to expire. ``takeover=session`` turns this off.
* **Waiting** (``wait=``) blocks in ``pg_advisory_lock`` under ``lock_timeout`` on a spare
  connection, so a release wakes the waiter at once; that connection then *is* the holding
  session of that lock until it is released (then it goes back to the spares).
* **TTL with teeth**: a session holding locks has ``idle_session_timeout`` = the smallest ttl
  among its locks, so a holder process that stops (SIGSTOP, hang, partition) loses its session
  at most that long after its last statement; its locks are free once their leases expire. A
  holder that runs but lets a lease run out (``renew=False``, renewal stopped) has the lock
  released by this coordinator's keeper thread when the ttl passes.
* **Loss detection**: the keeper watches the sockets of lock-holding sessions; when the server
  ends one (``pg_terminate_backend``, restart, idle timeout) every lease on it is marked lost
  within milliseconds and callbacks fire. Later acquisitions reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._base import BaseCoordinator
from .._errors import ConfigurationError
from .._lease import Lease
from .._protocol import LockInfo, RunRecord
from .._registry import missing_driver, redact

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_driver("postgresql", "psycopg", "postgres") from exc

from ._pg_keys import lock_key
from ._pg_schema import SCHEMA_VERSION, Queries, check_schema_name, queries

log = logging.getLogger("coordlock")
T = TypeVar("T")

#: How often (s) the keeper wakes while locks are being taken (so that taking one needs no
#: wake-up call), and while idle; it is woken early when work comes due sooner.
KEEPER_TICK = 0.05
KEEPER_IDLE_WAKE = 1.0
#: After activity, the keeper ticks every KEEPER_TICK for this long.
KEEPER_LINGER = 5.0
#: A lock-holding session idle this long has its socket watched for a server-side end.
WATCH_AFTER = 0.01
#: Spare connections kept for blocking waits.
MAX_SPARES = 2
#: Server versions before this lack ``idle_session_timeout``.
MIN_SERVER_VERSION = 140000

#: URL query options coordlock itself understands; every other one must be a libpq parameter.
URL_OPTIONS = ("schema", "namespace", "pgbouncer", "takeover", "retry_deadline")

#: libpq defaults added to the connection string unless the URL sets them.
CONNECT_DEFAULTS = {
    "application_name": "coordlock",
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}

PGBOUNCER_ADVICE = (
    "coordlock's PostgreSQL backend holds session-level advisory locks, which silently break "
    "under PgBouncer transaction or statement pooling (each statement may run on another "
    "server session, so locks are taken and released on sessions that are not yours). Connect "
    "directly to PostgreSQL, or through a PgBouncer pool with pool_mode=session "
    "(then say ?pgbouncer=session)."
)


def _libpq_keywords() -> frozenset[str]:
    return frozenset(
        opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults() if opt.keyword
    )


def _ms(seconds: float) -> int:
    """Seconds → whole milliseconds, rounded up (so a bound is never shorter than asked)."""
    return max(1, math.ceil(seconds * 1000))


class _Session:
    """One server session: a connection, the mutex its statements take, the locks it holds."""

    __slots__ = (
        "backend_start",
        "conn",
        "cur",
        "dead",
        "fd",
        "held",
        "last_used",
        "main",
        "markers",
        "mutex",
        "pid",
        "poked",
        "timeout_ms",
    )

    def __init__(self, conn: psycopg.Connection[Any], pid: int, backend_start: datetime) -> None:
        self.conn = conn
        self.cur = conn.cursor()  # reused: statements on a session are serialized by mutex
        self.pid = pid
        self.backend_start = backend_start
        self.fd = conn.fileno()
        self.mutex = threading.Lock()
        self.held: dict[str, _Held] = {}
        self.timeout_ms = 0  # idle_session_timeout currently set on the server (0 = off)
        self.last_used = time.monotonic()
        self.dead = False
        self.main = False
        self.poked = False  # its socket turned readable while idle: the server may have ended it
        self.markers: set[int] = set()  # keys whose release marker this session holds

    def row(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> tuple[Any, ...] | None:
        """Run ``query`` (prepared) and return its first row; hold :attr:`mutex`."""
        self.cur.execute(query, params)
        return self.cur.fetchone()

    def desired_timeout(self) -> int:
        """The idle_session_timeout this session should have: its smallest ttl, or 0."""
        return min((_ms(h.ttl) for h in self.held.values()), default=0)


class _Held:
    """A lock held by this coordinator (monotonic times)."""

    __slots__ = ("deadline", "fence", "key", "lease", "name", "owner", "session", "ttl")

    def __init__(
        self,
        name: str,
        owner: str,
        key: int,
        fence: int,
        ttl: float,
        sent: float,
        session: _Session,
    ) -> None:
        self.name = name
        self.owner = owner
        self.key = key
        self.fence = fence
        self.ttl = ttl
        self.deadline = sent + ttl
        self.session = session
        self.lease: Lease | None = None


class PostgresCoordinator(BaseCoordinator):
    """Coordinator over PostgreSQL ≥ 14 with psycopg 3 (see the module docstring).

    Options (keyword arguments, or URL query options in ``postgresql://…?schema=x``):

    * ``schema`` – where the tables live (default ``coordlock``), created on first use.
    * ``namespace`` – mixed into every lock key (default: the schema name), so schemas of one
      database never share advisory keys.
    * ``takeover`` – ``lease`` (default): when a holder's session ends abnormally, its locks
      stay unavailable until its lease expires (a lease row per acquisition); ``session``:
      PostgreSQL's own rule, a lock is free the moment its session ends (no row write: faster,
      but the old holder may overlap the next one until it notices; fence your writes).
    * ``pgbouncer`` – ``session`` if you connect through PgBouncer in session pooling mode;
      ``transaction``/``statement`` are refused with an explanation.
    * ``retry_deadline`` – seconds to retry a failing server (default 10).
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
    ) -> None:
        if takeover not in ("lease", "session"):
            raise ConfigurationError(f"takeover must be 'lease' or 'session', got {takeover!r}")
        self._leases = takeover == "lease"
        if pgbouncer is not None:
            mode = str(pgbouncer).strip().lower()
            if mode in ("transaction", "statement"):
                raise ConfigurationError(
                    f"pgbouncer={mode} pooling is not supported. {PGBOUNCER_ADVICE}"
                )
            if mode != "session":
                raise ConfigurationError(
                    f"pgbouncer must be 'session' (or 'transaction'/'statement', refused), "
                    f"got {pgbouncer!r}"
                )
        try:
            self._schema = check_schema_name(schema)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        if namespace is not None and not isinstance(namespace, str):
            raise ConfigurationError("namespace must be a str")
        super().__init__(retry_deadline=retry_deadline)
        try:
            given = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"bad PostgreSQL connection string: {exc}") from exc
        defaults = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        self._conninfo = make_conninfo(conninfo, **defaults)
        self._namespace = self._schema if namespace is None else namespace
        self._keys: dict[str, int] = {}  # name -> advisory key (a bounded cache)
        self._q: Queries = queries(self._schema)

        self._state = threading.Lock()  # guards the dicts and lists below (never held for I/O)
        self._held: dict[str, _Held] = {}
        self._sessions: set[_Session] = set()
        self._spares: list[_Session] = []
        self._main: _Session | None = None
        self._aux: _Session | None = None
        self._main_lock = threading.Lock()  # serializes (re)connecting the lock session
        self._aux_lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._last_cleanup = 0.0

        self._keeper: threading.Thread | None = None
        self._keeper_stop = False
        self._keeper_wake = math.inf  # monotonic time the keeper will next wake by itself
        self._active_until = 0.0
        self._closing = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresCoordinator:
        """``postgresql://user:pw@host:port/db?schema=…&namespace=…&<libpq params>``."""
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError as exc:
            raise ConfigurationError(f"malformed URL {redact(url)!r}: {exc}") from exc
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ConfigurationError(f"not a postgresql:// URL: {redact(url)!r}")
        libpq_keywords = _libpq_keywords()
        ours: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        unknown: list[str] = []
        for key, value in query:
            if key in URL_OPTIONS:
                ours[key] = value
            elif key in libpq_keywords:
                passed.append((key, value))
            else:
                unknown.append(key)
        if unknown:
            raise ConfigurationError(
                f"unknown URL option(s) {', '.join(sorted(set(unknown)))} in {redact(url)!r}; "
                f"coordlock understands {', '.join(URL_OPTIONS)} and any libpq parameter"
            )
        kwargs: dict[str, Any] = {}
        for key in ("schema", "namespace", "pgbouncer", "takeover"):
            if key in ours:
                kwargs[key] = ours[key]
        for key in ("retry_deadline",):
            if key in ours:
                try:
                    kwargs[key] = float(ours[key])
                except ValueError as exc:
                    raise ConfigurationError(
                        f"URL option {key} must be a number of seconds, got {ours[key]!r}"
                    ) from exc
        kwargs.update(options)
        conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(passed)))
        return cls(conninfo, **kwargs)

    @property
    def schema(self) -> str:
        """The schema holding coordlock's tables."""
        return self._schema

    @property
    def namespace(self) -> str:
        """The namespace mixed into every lock key."""
        return self._namespace

    def key(self, name: str) -> int:
        """The advisory-lock key of ``name`` (see :func:`coordlock.backends._pg_keys.lock_key`)."""
        key = self._keys.get(name)
        if key is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            key = self._keys[name] = lock_key(name, self._namespace)
        return key

    # -- sessions ----------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._conninfo, autocommit=True, prepare_threshold=0)
        return conn

    def _open_session(self) -> _Session:
        """Connect, make sure the schema exists, configure the session, start the keeper."""
        self._check_open()
        conn = self._connect()
        try:
            self._ensure_schema(conn)
            row = conn.execute(self._q.session_init, prepare=False).fetchone()
            if row is None:
                raise psycopg.OperationalError("could not read this session's pid")
            pid, backend_start, version, sync_commit = row
            if int(version) < MIN_SERVER_VERSION:
                raise ConfigurationError(
                    f"PostgreSQL {version} is too old: coordlock needs PostgreSQL 14 or newer "
                    "(idle_session_timeout bounds how long a stopped holder keeps its locks)"
                )
            if sync_commit == "off":
                # Fences come from a sequence: its WAL must reach disk before a fence is used.
                conn.execute("SET synchronous_commit = local", prepare=False)
            conn.execute(self._q.bump_fence, prepare=False)
        except BaseException:
            conn.close()
            raise
        session = _Session(conn, int(pid), backend_start)
        with self._state:
            closed = self._closed
            if not closed:
                self._sessions.add(session)
        if closed:
            conn.close()
            self._check_open()
        self._start_keeper()
        return session

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Create the schema on first use, once, serialized across processes."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            version = self._schema_version(conn)
            if version != SCHEMA_VERSION:
                if version is not None and version > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"schema {self._schema!r} has coordlock schema version {version}; this "
                        f"coordlock understands version {SCHEMA_VERSION}: upgrade coordlock"
                    )
                with conn.transaction():
                    conn.execute(self._q.ddl_lock, prepare=False)
                    for statement in self._q.ddl:
                        conn.execute(statement, prepare=False)
                log.info("coordlock: schema %r ready (version %d)", self._schema, SCHEMA_VERSION)
            self._schema_ready = True

    def _schema_version(self, conn: psycopg.Connection[Any]) -> int | None:
        try:
            row = conn.execute(self._q.version, prepare=False).fetchone()
        except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
            return None
        return int(row[0]) if row is not None else None

    def _main_session(self) -> _Session:
        session = self._main
        if session is not None and not session.dead:
            return session
        with self._main_lock:
            session = self._main
            if session is None or session.dead:
                session = self._open_session()
                session.main = True
                self._main = session
            return session

    def _take_spare(self) -> _Session:
        with self._state:
            while self._spares:
                session = self._spares.pop()
                if not session.dead and not session.held:
                    return session
        return self._retry(self._open_session, "connect to PostgreSQL")

    def _recycle(self, session: _Session) -> None:
        """A non-main session that holds nothing any more goes back to the spares, or closes
        (its lease rows marked released first). The caller holds ``session.mutex``."""
        with self._state:
            if session.main or session.held or session.dead or session in self._spares:
                return
            if len(self._spares) < MAX_SPARES and not self._closed:
                self._spares.append(session)
                return
        with contextlib.suppress(psycopg.Error):
            session.cur.execute(self._q.release_all)
            session.markers.clear()
        self._drop(session, "")

    def _drop(self, session: _Session, reason: str) -> list[Lease]:
        """Forget ``session`` and close it; return the leases that went with it."""
        with self._state:
            if session.dead:
                return []
            session.dead = True
            entries = list(session.held.values())
            session.held.clear()
            for held in entries:
                if self._held.get(held.name) is held:
                    del self._held[held.name]
            self._sessions.discard(session)
            if session in self._spares:
                self._spares.remove(session)
            if self._main is session:
                self._main = None
        with contextlib.suppress(Exception):  # closing a broken socket may complain
            session.conn.close()
        if entries:
            log.warning(
                "coordlock: PostgreSQL session %d ended (%s); %d lock(s) lost: %s",
                session.pid,
                reason,
                len(entries),
                ", ".join(repr(h.name) for h in entries[:10]),
            )
        return [h.lease for h in entries if h.lease is not None]

    def _broken(self, session: _Session) -> bool:
        return bool(session.conn.broken or session.conn.closed)

    def _pooled(self, session: _Session, pid: int) -> ConfigurationError:
        """The session answered with another backend pid: a transaction-pooling proxy."""
        lost = self._drop(session, "a pooling proxy moved it to another server session")
        _notify_lost(lost, "session moved by a pooling proxy (PgBouncer transaction mode?)")
        return ConfigurationError(
            f"the server session changed under coordlock (pid {session.pid} became {pid}): "
            f"a transaction-pooling proxy such as PgBouncer is in the way. {PGBOUNCER_ADVICE}"
        )

    # -- hooks: acquire, release, extend -----------------------------------------------------

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        """See :meth:`BaseCoordinator.acquire`; the lease is also tied to its server session."""
        lease = super().acquire(name, ttl, wait=wait, renew=renew)
        if lease is not None:
            with self._state:
                held = self._held.get(lease.name)
                attached = held is not None and held.owner == lease.owner
                if held is not None and attached:
                    held.lease = lease
            if not attached:
                lease._mark_lost("its PostgreSQL session ended right after the acquisition")
        return lease

    def _try_acquire(self, name: str, owner: str, ttl: float) -> int | None:
        key = self.key(name)
        try:  # the fast path skips building a tenacity retrier
            return self._try_once(name, owner, ttl, key)
        except psycopg.OperationalError:
            pass  # retried (with backoff, up to retry_deadline) below: _try_once is idempotent
        return self._retry(lambda: self._try_once(name, owner, ttl, key), f"acquire {name!r}")

    def _try_once(self, name: str, owner: str, ttl: float, key: int) -> int | None:
        session = self._main_session()
        lost: list[Lease] = []
        try:
            with session.mutex:
                if session.dead:
                    raise psycopg.OperationalError("the lock session ended; reconnecting")
                held = self._held.get(name)
                if held is not None:  # held in this process: same owner = a retried call
                    return held.fence if held.owner == owner else None
                timeout_ms = _ms(ttl)
                lower = session.timeout_ms == 0 or timeout_ms < session.timeout_ms
                sent = time.monotonic()
                params = self._acquire_params(session, key, name, owner, ttl)
                params["it"] = str(timeout_ms) if lower else ""
                try:
                    row = session.row(
                        self._q.try_fast if self._leases else self._q.try_session, params
                    )
                    if self._leases and row is not None and row[0] is None and row[2]:
                        # locked, but nothing written: first use of the key, or an orphan
                        row = session.row(self._q.try_acquire, params)
                except psycopg.Error as exc:
                    lost = self._after_error(session, exc, key)
                    raise
                session.last_used = time.monotonic()
                if row is None:  # pragma: no cover - the function always returns a row
                    raise psycopg.OperationalError("no answer to the acquire statement")
                fence, pid, orphan = row[0], row[1], row[2]
                if pid != session.pid:
                    raise self._pooled(session, pid)
                if fence is None:
                    if orphan:
                        _log_orphan(name, None)
                    return None
                if lower:
                    session.timeout_ms = timeout_ms
                session.markers.discard(key)
                held = _Held(name, owner, key, fence, ttl, sent, session)
                with self._state:
                    self._held[name] = held
                    session.held[name] = held
            self._schedule(min(held.deadline, time.monotonic() + WATCH_AFTER))
            return int(fence)
        finally:
            _notify_lost(lost, "its PostgreSQL session ended")

    def _acquire_params(
        self, session: _Session, key: int, name: str, owner: str, ttl: float
    ) -> dict[str, Any]:
        return {
            "k": key,
            "name": name,
            "owner": owner,
            "bs": session.backend_start,
            "ttl": ttl * 1000.0,
            "rk": key in session.markers,
        }

    def _after_error(self, session: _Session, exc: BaseException, key: int | None) -> list[Lease]:
        """Clean up after a failed statement; return leases lost with a dead session.

        A session-level advisory lock taken by a statement that then failed survives the
        rollback, so on a live session the key is unlocked again (it was not held before).
        """
        if self._broken(session):
            return self._drop(session, f"{type(exc).__name__}: {exc}")
        if key is not None:
            try:
                session.row(self._q.unlock, (key,))
            except psycopg.Error as again:
                return self._drop(session, f"{type(again).__name__}: {again}")
        return []

    def _release(self, name: str, owner: str) -> bool:
        held = self._held.get(name)
        if held is None or held.owner != owner:
            return False
        session = held.session
        lost: list[Lease] = []
        try:
            with session.mutex:
                if session.dead or self._held.get(name) is not held:
                    return False  # reaped at its ttl, or its session ended: not ours any more
                mark = self._leases and held.key not in session.markers
                try:
                    if self._leases:
                        row = session.row(
                            self._q.release,
                            {"k": held.key, "mark": mark, "bs": session.backend_start},
                        )
                    else:
                        row = session.row(self._q.unlock, (held.key,))
                except psycopg.Error as exc:
                    # Unknown whether the unlock happened: end the session, which surely does.
                    lost = self._drop(session, f"release failed: {type(exc).__name__}: {exc}")
                    return False
                session.last_used = time.monotonic()
                if mark:
                    session.markers.add(held.key)
                self._forget(held)
                if not session.main:
                    self._recycle(session)
            if mark:
                self._schedule(time.monotonic() + KEEPER_TICK)  # rows to mark, markers to drop
            unlocked = bool(row and row[0])
            if not unlocked:  # pragma: no cover - the session held it; only a bug gets here
                log.error("coordlock: %r was not locked by its session at release", name)
            return unlocked
        finally:
            _notify_lost(lost, "its PostgreSQL session ended")

    def _forget(self, held: _Held) -> None:
        with self._state:
            if self._held.get(held.name) is held:
                del self._held[held.name]
            if held.session.held.get(held.name) is held:
                del held.session.held[held.name]

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        held = self._held.get(name)
        if held is None or held.owner != owner:
            return False
        session = held.session
        lost: list[Lease] = []
        try:
            with session.mutex:
                if session.dead or self._held.get(name) is not held:
                    return False
                others = [_ms(h.ttl) for h in session.held.values() if h is not held]
                desired = min([_ms(ttl), *others])
                sent = time.monotonic()
                try:
                    row = session.row(self._q.extend, (ttl * 1000.0, held.key, str(desired)))
                except psycopg.Error as exc:
                    lost = self._drop(session, f"renewal failed: {type(exc).__name__}: {exc}")
                    return False
                session.last_used = time.monotonic()
                if row is None or row[0] != session.pid:
                    raise self._pooled(session, row[0] if row else -1)
                session.timeout_ms = desired
                held.ttl = ttl
                held.deadline = sent + ttl
            self._schedule(held.deadline)
            return True
        finally:
            _notify_lost(lost, "its PostgreSQL session ended")

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        key = self.key(name)
        timeout_ms = _ms(ttl)
        while True:
            self._check_open()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            session = self._take_spare()
            lock_timeout = "0" if math.isinf(remaining) else str(_ms(remaining))
            orphan_left = 0.0
            with session.mutex:
                params = self._acquire_params(session, key, name, owner, ttl)
                params.update(lt=lock_timeout, it=str(timeout_ms))
                try:
                    row = session.row(
                        self._q.wait_acquire if self._leases else self._q.wait_session, params
                    )
                    if row is not None and row[0] is None and row[2]:  # an orphan: how long?
                        left = session.row(self._q.orphan_left, (key,))
                        orphan_left = float(left[0]) if left and left[0] is not None else 0.0
                except psycopg.Error as exc:
                    if self._broken(session):
                        self._drop(session, f"{type(exc).__name__}: {exc}")
                        continue  # a new spare, until the deadline (connects are retried)
                    self._unlock_key(session, key)
                    self._recycle(session)
                    self._check_open()
                    if isinstance(exc, pg_errors.LockNotAvailable):
                        continue  # lock_timeout: the loop re-checks the deadline
                    raise
                started = time.monotonic()
                session.last_used = started
                if row is None:  # pragma: no cover
                    raise psycopg.OperationalError("no answer to the wait statement")
                fence, pid = row[0], row[1]
                if pid != session.pid:
                    raise self._pooled(session, pid)
                if fence is not None:
                    session.timeout_ms = timeout_ms
                    session.markers.discard(key)
                    held = _Held(name, owner, key, fence, ttl, started, session)
                    with self._state:
                        self._held[name] = held
                        session.held[name] = held
                else:
                    self._recycle(session)
            if fence is None:  # the previous holder's session died: wait out its lease
                _log_orphan(name, orphan_left)
                pause = max(0.001, min(orphan_left, deadline - time.monotonic()))
                if self._closing.wait(pause):
                    self._check_open()
                continue
            self._schedule(min(held.deadline, time.monotonic() + WATCH_AFTER))
            return int(fence), started

    def _unlock_key(self, session: _Session, key: int) -> None:
        """After a failed wait on a spare (it did not hold ``key``): drop it if it was taken."""
        try:
            session.row(self._q.unlock, (key,))
        except psycopg.Error as exc:
            self._drop(session, f"{type(exc).__name__}: {exc}")

    # -- the keeper thread -------------------------------------------------------------------

    def _start_keeper(self) -> None:
        with self._state:
            if self._keeper is not None or self._keeper_stop:
                return
            self._keeper = threading.Thread(
                target=self._keeper_main, name=f"coordlock-pg-keeper-{id(self):x}", daemon=True
            )
            self._keeper.start()

    def _schedule(self, due: float) -> None:
        """Make sure the keeper wakes by ``due`` (monotonic). Cheap when it already will."""
        self._active_until = time.monotonic() + KEEPER_LINGER
        if due < self._keeper_wake - 0.002:
            self._keeper_wake = due
            # OSError: the buffer is full (the keeper will wake anyway) or closed (shutting down)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _keeper_main(self) -> None:
        while not self._keeper_stop:
            try:
                self._keeper_round()
            except Exception:  # pragma: no cover - never let the keeper die silently
                log.exception("coordlock: PostgreSQL keeper failed; continuing")
                time.sleep(0.1)

    def _keeper_round(self) -> None:
        self._keeper_wake = math.inf  # until it sleeps again, every _schedule() wakes it
        now = time.monotonic()
        with self._state:
            sessions = list(self._sessions)
        tick = KEEPER_TICK if now < self._active_until else KEEPER_IDLE_WAKE
        wake = now + tick
        watched: dict[int, _Session] = {}
        for session in sessions:
            if session.dead:
                continue
            due = self._service(session, now)
            wake = min(wake, due)
            if not session.dead and (session.held or session.timeout_ms):
                idle_since = session.last_used
                if time.monotonic() - idle_since > WATCH_AFTER:
                    watched[session.fd] = session  # the server may end it: notice at once
                else:  # in use right now (its socket is busy): watch it once it idles
                    wake = min(wake, idle_since + WATCH_AFTER + 0.001)
        self._keeper_wake = wake
        timeout = max(0.0, wake - time.monotonic())
        try:
            readable = _wait_readable([self._wake_r.fileno(), *watched], timeout)
        except (OSError, ValueError):  # a watched socket was closed meanwhile
            return
        for fd in readable:
            if fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
            elif fd in watched:
                watched[fd].poked = True

    def _service(self, session: _Session, now: float) -> float:
        """Keep one session: unlock expired locks, ping; return when it is next due."""
        with self._state:
            entries = list(session.held.values())
        expired = any(h.deadline <= now for h in entries)
        ping_due = session.timeout_ms > 0 and now - session.last_used >= session.timeout_ms / 3000
        markers = bool(session.markers)
        if expired or ping_due or markers or session.poked:
            if not session.mutex.acquire(timeout=0.02):
                return now + 0.005  # busy with a statement: try again soon
            lost_expired: list[Lease] = []
            lost_dead: list[Lease] = []
            try:
                if not session.dead:
                    lost_expired, lost_dead = self._service_locked(session)
            finally:
                session.mutex.release()
            _notify_lost(lost_expired, "ttl elapsed without renewal; the lock was released")
            _notify_lost(lost_dead, "its PostgreSQL session ended")
        with self._state:
            entries = list(session.held.values())
        due = min((h.deadline for h in entries), default=math.inf)
        if session.markers:
            due = min(due, now + KEEPER_TICK)
        if session.timeout_ms > 0:
            due = min(due, session.last_used + session.timeout_ms / 3000)
        return due

    def _service_locked(self, session: _Session) -> tuple[list[Lease], list[Lease]]:
        """The keeper's statements on one session (its mutex held); returns lost leases."""
        now = time.monotonic()
        if session.poked:
            session.poked = False
            readable = _wait_readable([session.fd], 0.0)
            if not readable and session.timeout_ms == 0 and not session.held:
                return [], []
        with self._state:
            entries = list(session.held.values())
        expired = [h for h in entries if h.deadline <= now]
        held_keys = {h.key for h in entries}
        markers = [k for k in session.markers if k not in held_keys]
        lost_expired: list[Lease] = []
        try:
            if markers:  # the rows say released first (committed), then the markers go
                session.cur.execute(self._q.mark_released, (markers, session.backend_start))
                session.row(self._q.drop_markers, (session.backend_start, markers))
                session.markers.difference_update(markers)
            if expired:
                session.row(self._q.release_expired, {"keys": [h.key for h in expired]})
                for h in expired:
                    self._forget(h)
                    if h.lease is not None:
                        lost_expired.append(h.lease)
                log.warning(
                    "coordlock: released %d lock(s) whose ttl elapsed without renewal: %s",
                    len(expired),
                    ", ".join(repr(h.name) for h in expired[:10]),
                )
            with self._state:
                desired = session.desired_timeout()
            row = session.row(self._q.ping, (str(desired),))
        except psycopg.Error as exc:
            return lost_expired, self._drop(session, f"keeper: {type(exc).__name__}: {exc}")
        session.last_used = time.monotonic()
        session.timeout_ms = desired
        if row is None or row[0] != session.pid:
            lost = self._drop(session, "a pooling proxy moved it to another server session")
            log.error("coordlock: %s", PGBOUNCER_ADVICE)
            return lost_expired, lost
        if not session.held and not session.main:
            self._recycle(session)
        return lost_expired, []

    # -- claims, history, listing (on an auxiliary connection) -------------------------------

    def _aux_call(self, fn: Callable[[psycopg.Connection[Any]], T], what: str) -> T:
        def attempt() -> T:
            with self._aux_lock:
                session = self._aux
                if session is None or session.dead:
                    session = self._open_session()
                    self._aux = session
                try:
                    return fn(session.conn)
                except psycopg.Error:
                    if self._broken(session):
                        self._drop(session, "auxiliary connection lost")
                        self._aux = None
                    raise

        return self._retry(attempt, what)

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        ordered = sorted(keys)
        claimant = uuid.uuid4().hex  # the same across retries: a retry gets its own claim back
        hold_ms = hold * 1000.0

        def claim(conn: psycopg.Connection[Any]) -> set[str]:
            rows = conn.execute(self._q.claim, (claimant, hold_ms, ordered)).fetchall()
            return {str(r[0]) for r in rows}

        won = self._aux_call(claim, "claim")
        now = time.monotonic()
        if now - self._last_cleanup > 600:
            self._last_cleanup = now
            try:
                self._aux_call(lambda c: c.execute(self._q.claims_cleanup), "claims cleanup")
            except Exception as exc:  # housekeeping only
                log.info("coordlock: claims cleanup failed: %s", exc)
        return won

    def locks(self) -> list[LockInfo]:
        """Locks held in this schema (granted advisory locks with their holder rows).

        This coordinator's own locks carry its local expiry estimate; other processes' locks the
        expiry of their lease rows (server clock). With ``takeover=session`` there are no lease
        rows, so only this coordinator's locks are listed. Other applications' advisory locks
        are never listed.
        """
        self._check_open()
        rows = self._aux_call(lambda c: c.execute(self._q.locks).fetchall(), "list locks")
        now_mono, now_wall = time.monotonic(), time.time()
        with self._state:
            mine = {(h.session.pid, h.key): h for h in self._held.values() if not h.session.dead}
        infos: dict[str, LockInfo] = {}
        for _pid, _key, name, owner, fence, expires in rows:
            infos[name] = LockInfo(name, owner, int(fence), expires)
        for held in mine.values():  # ours: exact, and listed with takeover=session too
            expires_at = now_wall + (held.deadline - now_mono)
            infos[held.name] = LockInfo(held.name, held.owner, held.fence, expires_at)
        return [infos[name] for name in sorted(infos)]

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run`` (keyed by ``run_id``)."""
        if not isinstance(run, RunRecord):
            raise TypeError(f"expected a RunRecord, not {type(run).__name__}")
        self._check_open()
        params = (
            run.run_id,
            run.job,
            run.tick,
            run.instance,
            run.started,
            run.finished,
            run.status,
            run.error,
        )
        self._aux_call(lambda c: c.execute(self._q.record_run, params), "record run")

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first, optionally of one ``job``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, got {limit!r}")
        self._check_open()

        def read(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            if job is None:
                return conn.execute(self._q.history, (limit,)).fetchall()
            return conn.execute(self._q.history_job, (job, limit)).fetchall()

        rows = self._aux_call(read, "read history")
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
        with self._state:
            self._keeper_stop = True
            keeper = self._keeper
            sessions = list(self._sessions)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(timeout=5)
        for session in sessions:
            if session.mutex.locked():  # maybe blocked in pg_advisory_lock: cancel it
                try:
                    cancel_safe = getattr(session.conn, "cancel_safe", None)
                    if cancel_safe is not None:
                        cancel_safe(timeout=2)
                    else:  # pragma: no cover - psycopg < 3.2
                        session.conn.cancel()
                except Exception:  # pragma: no cover - best effort
                    pass
        lost: list[Lease] = []
        for session in sessions:
            got = session.mutex.acquire(timeout=5)
            try:
                if got and not session.dead and not self._broken(session):
                    # our leases end now: their rows must not hold others off (best effort)
                    with contextlib.suppress(psycopg.Error):
                        session.cur.execute(self._q.release_all)
                        session.markers.clear()
                lost += self._drop(session, "coordinator closed")
            finally:
                if got:
                    session.mutex.release()
        _notify_lost(lost, "the coordinator was closed (its session and locks ended)")
        self._wake_r.close()
        self._wake_w.close()


def _wait_readable(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` readable within ``timeout`` seconds (poll where it exists)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return [fd for fd, _ in poller.poll(timeout * 1000)]
    readable, _, _ = select.select(fds, [], [], timeout)  # pragma: no cover - Windows
    return list(readable)


def _log_orphan(name: str, remaining: float | None) -> None:
    log.info(
        "coordlock: %r was freed by a session that ended while holding it; its lease has "
        "%.3fs left, so the lock stays unavailable until then",
        name,
        remaining or 0.0,
    )


def _notify_lost(leases: list[Lease], reason: str) -> None:
    for lease in leases:
        lease._mark_lost(reason)
