"""Server sessions of one coordinator: connecting, the session marker, spares, dropping.

A coordinator holds its locks on its *main* session; blocking waits run on *spare* sessions
(a spare that got its lock holds it until release, then goes back to the spares); claims,
history and listing use an *auxiliary* session. Every session that may hold locks takes its
marker (``markers.py``) when it connects (``takeover=lease``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from ..._errors import ConfigurationError
from .errors import classify
from .markers import choose_marker, hashtext_probe
from .options import PgOptions
from .schema import ensure_schema
from .statements import Statements

if TYPE_CHECKING:
    from ..._lease import Lease

log = logging.getLogger("coordlock")

#: Server versions before this lack ``idle_session_timeout``.
MIN_SERVER_VERSION = 140000
#: Spare connections kept for blocking waits.
MAX_SPARES = 2
#: The largest value of an ``int`` millisecond setting (lock_timeout, idle_session_timeout).
MAX_MS = 2**31 - 1

INF = math.inf

#: Connections abandoned in a forked child: kept referenced so that they are never closed
#: (closing would end the parent's server session) nor warned about.
_ABANDONED: list[Any] = []


def ms(seconds: float) -> int:
    """Seconds → whole milliseconds, rounded up, capped at the largest int setting."""
    if seconds >= MAX_MS / 1000:
        return MAX_MS
    return max(1, math.ceil(seconds * 1000))


class Session:
    """One server session: a connection, the mutex its statements take, the locks it holds."""

    __slots__ = (
        "conn",
        "cur",
        "dead",
        "deadline",
        "fd",
        "held",
        "last_used",
        "main",
        "marker",
        "mutex",
        "pid",
        "poked",
        "recent",
        "server_version",
        "timeout_ms",
    )

    def __init__(
        self, conn: psycopg.Connection[Any], pid: int, marker: int | None, server_version: int
    ) -> None:
        self.conn = conn
        self.cur = conn.cursor()  # reused: statements on a session are serialized by mutex
        self.pid = pid
        self.marker = marker
        self.server_version = server_version
        self.fd = conn.fileno()
        self.mutex = threading.Lock()
        self.held: dict[str, Held] = {}
        self.timeout_ms = 0  # idle_session_timeout currently set on the server (0 = off)
        self.last_used = time.monotonic()
        self.deadline = INF  # an in-flight statement must be answered by then (keeper cuts)
        self.dead = False
        self.main = False
        self.poked = False  # its socket turned readable while idle: the server may have ended it
        # keys this session released, with when their lease rows expire (monotonic): rows
        # that would look orphaned if the session ended now (marked released before closing)
        self.recent: dict[int, float] = {}

    def run(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] = (),
        deadline: float = INF,
    ) -> tuple[Any, ...] | None:
        """Run ``query`` (prepared) and return its first row. The caller holds :attr:`mutex`.
        ``deadline`` (monotonic): the keeper cuts the connection if no answer came by then."""
        self.deadline = deadline
        try:
            self.cur.execute(query, params)
            return self.cur.fetchone()
        finally:
            self.deadline = INF

    def execute(
        self, query: str, params: Sequence[Any] | Mapping[str, Any], deadline: float
    ) -> None:
        """Run ``query``, which returns no rows (see :meth:`run`)."""
        self.deadline = deadline
        try:
            self.cur.execute(query, params)
        finally:
            self.deadline = INF

    def run_all(
        self, query: str, params: Sequence[Any] | Mapping[str, Any], deadline: float
    ) -> list[tuple[Any, ...]]:
        """Run ``query`` and return every row (see :meth:`run`)."""
        self.deadline = deadline
        try:
            self.cur.execute(query, params)
            return self.cur.fetchall()
        finally:
            self.deadline = INF

    def prune_recent(self, now: float) -> None:
        """Forget released keys whose lease rows have expired (only when there are many)."""
        if len(self.recent) > 64:
            self.recent = {k: t for k, t in self.recent.items() if t > now}

    def row_keys(self, now: float) -> list[int]:
        """Keys whose unexpired lease rows carry this session's marker."""
        keys = {h.key for h in self.held.values()}
        keys.update(k for k, t in self.recent.items() if t > now)
        return sorted(keys)

    def desired_timeout(self) -> int:
        """The idle_session_timeout this session should have: its smallest ttl, or 0."""
        return min((ms(h.ttl) for h in self.held.values()), default=0)

    @property
    def broken(self) -> bool:
        return bool(self.conn.broken or self.conn.closed)


class Held:
    """A lock held by this coordinator (monotonic times)."""

    __slots__ = ("deadline", "fence", "key", "lease", "name", "owner", "session", "ttl")

    def __init__(
        self,
        name: str,
        owner: str,
        key: int,
        fence: int,
        ttl: float,
        started: float,
        session: Session,
    ) -> None:
        self.name = name
        self.owner = owner
        self.key = key
        self.fence = fence
        self.ttl = ttl
        self.deadline = started + ttl
        self.session = session
        self.lease: Lease | None = None


class SessionPool:
    """The sessions of one coordinator and what they hold (thread-safe)."""

    def __init__(self, options: PgOptions, q: Statements, on_open: Callable[[], None]) -> None:
        self.options = options
        self.q = q
        self._on_open = on_open  # starts the keeper
        self._init_locks()
        self.held: dict[str, Held] = {}  # name -> the lock this coordinator holds
        self.sessions: set[Session] = set()
        self.spares: list[Session] = []
        self.main: Session | None = None
        self.aux: Session | None = None
        self.schema_ready = False
        self.closed = False
        self.pid = os.getpid()

    def _init_locks(self) -> None:
        self.state = threading.Lock()  # guards the dicts and lists (never held for I/O)
        self.main_lock = threading.Lock()  # serializes (re)connecting the main session
        self.aux_lock = threading.Lock()
        self.schema_lock = threading.Lock()

    # -- connecting --------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection; a permanent failure raises ConfigurationError."""
        try:
            return psycopg.connect(self.options.conninfo, autocommit=True, prepare_threshold=0)
        except psycopg.Error as exc:
            if classify(exc) == "permanent":
                raise ConfigurationError(f"cannot connect to PostgreSQL: {exc}") from exc
            raise

    def open(self, *, marker: bool = True) -> Session:
        """Connect, check the server and schema, take the session marker, register it."""
        if self.closed:
            raise ConfigurationError("PostgresCoordinator is closed")
        conn = self.connect()
        try:
            session = self._setup(conn, marker=marker and self.options.leases)
        except BaseException:
            conn.close()
            raise
        with self.state:
            closed = self.closed
            if not closed:
                self.sessions.add(session)
        if closed:
            conn.close()
            raise ConfigurationError("PostgresCoordinator is closed")
        self._on_open()
        return session

    def _setup(self, conn: psycopg.Connection[Any], *, marker: bool) -> Session:
        row = conn.execute(self.q.session_init, prepare=False).fetchone()
        if row is None:  # pragma: no cover - the statement always returns a row
            raise psycopg.OperationalError("could not read this session's settings")
        pid, version, sync_commit, database_oid, probe = row
        if int(version) < MIN_SERVER_VERSION:
            raise ConfigurationError(
                f"PostgreSQL {version} is too old: coordlock needs PostgreSQL 14 or newer "
                "(idle_session_timeout bounds how long a stopped holder keeps its locks)"
            )
        if marker and probe != hashtext_probe():
            raise ConfigurationError(
                "this PostgreSQL server hashes lock tags differently from what coordlock's "
                "takeover=lease relies on (a big-endian server?); use ?takeover=session"
            )
        self._ensure_schema(conn)
        for _ in range(5):  # a taken marker (never in practice) is simply replaced
            key = choose_marker(int(database_oid)) if marker else None
            # Fences come from a sequence whose WAL must reach disk before a fence is used.
            params = {"m": key, "sc": sync_commit == "off"}
            got = conn.execute(self.q.session_setup, params, prepare=False).fetchone()
            if got is not None and got[0]:
                return Session(conn, int(pid), key, int(version))
        raise psycopg.OperationalError("could not take a session marker")

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        if self.schema_ready:
            return
        with self.schema_lock:
            if not self.schema_ready:
                ensure_schema(conn, self.options.schema, create=self.options.create_schema)
                self.schema_ready = True

    # -- which session -----------------------------------------------------------------------

    def main_session(self) -> Session:
        """The session that holds this coordinator's try-acquired locks (connects if needed)."""
        session = self.main
        if session is not None and not session.dead:
            return session
        with self.main_lock:
            session = self.main
            if session is None or session.dead:
                session = self.open()
                session.main = True
                self.main = session
            return session

    def aux_session(self) -> Session:
        """The session for claims, history and listing (the caller holds :attr:`aux_lock`)."""
        session = self.aux
        if session is None or session.dead:
            session = self.aux = self.open(marker=False)
        return session

    def take_spare(self) -> Session | None:
        """An idle spare session, or None (then open one)."""
        with self.state:
            while self.spares:
                session = self.spares.pop()
                if not session.dead and not session.held:
                    return session
        return None

    def recycle(self, session: Session) -> bool:
        """A non-main session that holds nothing goes back to the spares: True; False when
        there are enough spares (the caller closes it, its rows released first)."""
        with self.state:
            if session.main or session.held or session.dead or session in self.spares:
                return True
            if len(self.spares) < MAX_SPARES and not self.closed:
                self.spares.append(session)
                return True
        return False

    # -- bookkeeping -------------------------------------------------------------------------

    def add(self, held: Held) -> None:
        with self.state:
            self.held[held.name] = held
            held.session.held[held.name] = held

    def forget(self, held: Held) -> None:
        with self.state:
            if self.held.get(held.name) is held:
                del self.held[held.name]
            if held.session.held.get(held.name) is held:
                del held.session.held[held.name]

    def drop(self, session: Session, reason: str) -> list[Held]:
        """Forget ``session`` and close it; return the locks that went with it."""
        with self.state:
            if session.dead:
                return []
            session.dead = True
            entries = list(session.held.values())
            session.held.clear()
            for held in entries:
                if self.held.get(held.name) is held:
                    del self.held[held.name]
            self.sessions.discard(session)
            if session in self.spares:
                self.spares.remove(session)
            if self.main is session:
                self.main = None
            if self.aux is session:
                self.aux = None
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
        return entries

    def live_sessions(self) -> list[Session]:
        with self.state:
            return [s for s in self.sessions if not s.dead]

    # -- fork --------------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child: forget the parent's sessions WITHOUT closing them on the wire
        (that would end the parent's server sessions and free its locks); the child's copies of
        their sockets are closed, so the parent's death still ends them. Reconnect lazily."""
        self._init_locks()
        for session in list(self.sessions):
            _ABANDONED.append(session.conn)
            with contextlib.suppress(OSError):
                os.close(session.fd)
            session.dead = True
        self.sessions = set()
        self.spares = []
        self.held = {}
        self.main = None
        self.aux = None
        self.pid = os.getpid()
