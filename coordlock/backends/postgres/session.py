"""Server sessions of one coordinator, sync (``psycopg.Connection``) and async
(``psycopg.AsyncConnection``, one set per event loop), and the registry of what they hold.

A coordinator holds its locks on a *main* session; blocking waits run on *spare* sessions (a
spare that got its lock holds it until release, then goes back to the spares); claims, history
and listing use an *auxiliary* session. Every session that may hold locks takes its marker
(``markers.py``) when it connects (``takeover=lease``) and LISTENs for force-unlock requests.
The two session kinds differ only in how a statement is sent (:meth:`Session.run`,
:meth:`AsyncSession.run`); everything a statement means is in ``flows.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.generators import execute as pq_execute
from psycopg.types.numeric import Int8Dumper

from .statements import Lean

#: Server versions before this lack ``idle_session_timeout``.
MIN_SERVER_VERSION = 140000
#: Spare connections kept (per kind and event loop) for blocking waits.
MAX_SPARES = 2
#: The largest value of an ``int`` millisecond setting (lock_timeout, idle_session_timeout).
MAX_MS = 2**31 - 1

INF = math.inf

#: Connections abandoned in a forked child: kept referenced so that they are never closed
#: (closing would end the parent's server session) nor warned about.
_ABANDONED: list[Any] = []

Params = Sequence[Any] | Mapping[str, Any]
Fetch = Literal["one", "all", "none"]


def ms(seconds: float) -> int:
    """Seconds → whole milliseconds, rounded up, capped at the largest int setting."""
    if seconds >= MAX_MS / 1000:
        return MAX_MS
    return max(1, math.ceil(seconds * 1000))


class Step(NamedTuple):
    """One statement of a flow: what to send, until when it may take (monotonic), what to read.
    (A tuple: built on every lock and unlock, so it must be cheap.)"""

    query: str
    params: Params = ()
    deadline: float = INF
    fetch: Fetch = "one"
    prepare: bool | None = None  # False: DDL and one-off statements
    lean: Lean | None = None  # sent on the lean path (``params`` a mapping; one row back)


_INT_OIDS = frozenset({20, 21, 23, 26})
_FLOAT_OIDS = frozenset({700, 701, 1700})
_OK = frozenset({pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK})


def lean_values(lean: Lean, params: Any) -> list[bytes | None]:
    """The text form of ``params`` (a mapping) in ``lean``'s placeholder order."""
    return [
        None if (value := params[name]) is None else encode(value)
        for name, encode in zip(lean.params, lean.encoders, strict=True)
    ]


def _decoder(oid: int) -> Callable[[bytes], Any]:
    if oid in _INT_OIDS:
        return int
    if oid == 16:
        return lambda value: value == b"t"
    if oid in _FLOAT_OIDS:
        return float
    return lambda value: value.decode()


_DECODERS: dict[int, Callable[[bytes], Any]] = {}


def lean_row(results: list[pq.abc.PGresult]) -> tuple[Any, ...] | None:
    """The first row of a lean statement's result (by column type), or raise its error."""
    res = results[-1]
    if res.status not in _OK:
        raise pg_errors.error_from_result(res)
    if res.ntuples == 0:
        return None
    row: list[Any] = []
    for i in range(res.nfields):
        value = res.get_value(0, i)
        if value is None:
            row.append(None)
            continue
        oid = res.ftype(i)
        decode = _DECODERS.get(oid)
        if decode is None:
            decode = _DECODERS[oid] = _decoder(oid)
        row.append(decode(value))
    return tuple(row)


class BaseSession:
    """What the two session kinds share: identity, the locks held, the keeper's bookkeeping."""

    __slots__ = (
        "dead",
        "deadline",
        "fd",
        "held",
        "last_used",
        "main",
        "marker",
        "pid",
        "poked",
        "pool",
        "prepared",
        "recent",
        "revoked",
        "servicing",
        "timeout_ms",
    )

    def __init__(self, fd: int, pid: int, marker: int | None) -> None:
        self.fd = fd
        self.pid = pid
        self.marker = marker
        self.held: dict[str, Held] = {}
        self.timeout_ms = 0  # idle_session_timeout currently set on the server (0 = off)
        self.last_used = time.monotonic()
        self.deadline = INF  # an in-flight statement must be answered by then (keeper cuts)
        self.dead = False
        self.main = False
        self.poked = False  # its socket turned readable while idle: the server may have ended it
        self.servicing = False  # an async session's keeper visit is scheduled on its loop
        self.pool: Pool | None = None  # the pool it belongs to (main, spare or auxiliary)
        # keys this session released, with when their lease rows expire (monotonic): rows
        # that would look orphaned if the session ended now (marked released before closing)
        self.recent: dict[int, float] = {}
        self.revoked: set[int] = set()  # keys an operator force-released (NOTIFY)
        self.prepared: set[bytes] = set()  # lean statements prepared on this session

    @property
    def broken(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def stranded(self) -> bool:
        """True when nothing can use this session any more (its event loop is closed)."""
        return False

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

    def on_notify(self, payload: str, wake: Callable[[], None]) -> None:
        """A force-unlock request (``"<key> <pid>"``) arrived: note it if it is for us."""
        key, _, pid = payload.partition(" ")
        with contextlib.suppress(ValueError):
            if int(pid) == self.pid:
                self.revoked.add(int(key))
                wake()


class Session(BaseSession):
    """A sync session: a ``psycopg.Connection`` and the mutex its statements take."""

    __slots__ = ("conn", "cur", "mutex")
    kind = "sync"

    def __init__(self, conn: psycopg.Connection[Any], pid: int, marker: int | None) -> None:
        super().__init__(conn.fileno(), pid, marker)
        self.conn = conn
        self.cur = conn.cursor()  # reused: statements on a session are serialized by mutex
        self.mutex = threading.Lock()

    @property
    def broken(self) -> bool:
        return bool(self.conn.broken or self.conn.closed)

    def run(self, step: Step) -> Any:
        """Send ``step`` (prepared); the caller holds :attr:`mutex`. The keeper cuts the
        connection if no answer came by ``step.deadline``."""
        self.deadline = step.deadline
        try:
            if step.lean is not None:
                return self._lean(step.lean, step.params)
            self.cur.execute(step.query, step.params, prepare=step.prepare)
            if step.fetch == "one":
                return self.cur.fetchone()
            return self.cur.fetchall() if step.fetch == "all" else None
        finally:
            self.deadline = INF

    def _lean(self, lean: Lean, params: Any) -> tuple[Any, ...] | None:
        pg = self.conn.pgconn
        if lean.name not in self.prepared:
            pg.send_prepare(lean.name, lean.sql, param_types=lean.oids)
            lean_row(self.conn.wait(pq_execute(pg)))
            self.prepared.add(lean.name)
        pg.send_query_prepared(lean.name, lean_values(lean, params))
        return lean_row(self.conn.wait(pq_execute(pg)))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken socket may complain
            self.conn.close()


class AsyncSession(BaseSession):
    """An async session: a ``psycopg.AsyncConnection`` bound to one event loop."""

    __slots__ = ("conn", "cur", "lock", "loop")
    kind = "async"

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        pid: int,
        marker: int | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(conn.fileno(), pid, marker)
        self.conn = conn
        self.cur = conn.cursor()
        self.lock = asyncio.Lock()
        self.loop = loop

    @property
    def broken(self) -> bool:
        return bool(self.conn.broken or self.conn.closed)

    @property
    def stranded(self) -> bool:
        return self.loop.is_closed()

    async def run(self, step: Step) -> Any:
        """:meth:`Session.run` on the event loop (the caller holds :attr:`lock`)."""
        self.deadline = step.deadline
        try:
            if step.lean is not None:
                return await self._lean(step.lean, step.params)
            await self.cur.execute(step.query, step.params, prepare=step.prepare)
            if step.fetch == "one":
                return await self.cur.fetchone()
            return await self.cur.fetchall() if step.fetch == "all" else None
        finally:
            self.deadline = INF

    async def _lean(self, lean: Lean, params: Any) -> tuple[Any, ...] | None:
        pg = self.conn.pgconn
        if lean.name not in self.prepared:
            pg.send_prepare(lean.name, lean.sql, param_types=lean.oids)
            lean_row(await self.conn.wait(pq_execute(pg)))
            self.prepared.add(lean.name)
        pg.send_query_prepared(lean.name, lean_values(lean, params))
        return lean_row(await self.conn.wait(pq_execute(pg)))

    def run_blocking(self, lean: Lean, params: Any) -> None:
        """Send a statement without the event loop (which has ended): libpq's blocking call,
        from the keeper thread, on a connection nothing else can use any more."""
        lean_row([self.conn.pgconn.exec_params(lean.sql, lean_values(lean, params), lean.oids)])

    def close(self) -> None:
        """Close from any thread: ends the server session (no loop needed)."""
        with contextlib.suppress(Exception):
            self.conn.pgconn.finish()


class Held:
    """A lock held by this coordinator (monotonic times). ``linger``: released by its owner,
    held on until ``deadline`` for ``hold_at_least`` (then unlocked without a loss report)."""

    __slots__ = ("deadline", "fence", "key", "linger", "name", "owner", "session", "ttl")

    def __init__(
        self,
        name: str,
        owner: str,
        key: int,
        fence: int,
        ttl: float,
        started: float,
        session: BaseSession,
    ) -> None:
        self.name = name
        self.owner = owner
        self.key = key
        self.fence = fence
        self.ttl = ttl
        self.deadline = started + ttl
        self.session = session
        self.linger = False


def configure(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """Every Python int is sent as a ``bigint`` (keys, markers): one prepared plan per statement."""
    conn.adapters.register_dumper(int, Int8Dumper)


class Registry:
    """Every session of a coordinator (all kinds, all loops) and the locks they hold."""

    def __init__(self) -> None:
        self.state = threading.Lock()  # guards the dicts and sets (never held for I/O)
        self.held: dict[str, Held] = {}  # name -> the lock this coordinator holds
        self.sessions: set[BaseSession] = set()
        self.closed = False
        self.pid = os.getpid()

    def register(self, session: BaseSession) -> bool:
        with self.state:
            if self.closed:
                return False
            self.sessions.add(session)
            return True

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

    def discard(self, session: BaseSession) -> list[Held]:
        """Mark ``session`` dead and forget it; return the locks that went with it."""
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
        return entries

    def live(self) -> list[BaseSession]:
        with self.state:
            return [s for s in self.sessions if not s.dead]

    def after_fork(self) -> None:
        """In a forked child: forget the parent's sessions WITHOUT closing them on the wire
        (that would end the parent's server sessions and free its locks); the child's copies of
        their sockets are closed, so the parent's death still ends them."""
        self.state = threading.Lock()
        for session in list(self.sessions):
            _ABANDONED.append(session)
            with contextlib.suppress(OSError):
                os.close(session.fd)
            session.dead = True
        self.sessions = set()
        self.held = {}
        self.pid = os.getpid()


class Pool:
    """The main, spare and auxiliary sessions of one kind (sync, or one event loop's)."""

    def __init__(self) -> None:
        self.main: BaseSession | None = None
        self.aux: BaseSession | None = None
        self.spares: list[BaseSession] = []

    def take_spare(self, registry: Registry) -> BaseSession | None:
        with registry.state:
            while self.spares:
                session = self.spares.pop()
                if not session.dead and not session.held:
                    return session
        return None

    def keep_spare(self, registry: Registry, session: BaseSession) -> bool:
        """A non-main session that holds nothing goes back to the spares: True; False when
        there are enough (the caller retires it)."""
        with registry.state:
            if session.main or session.held or session.dead or session in self.spares:
                return True
            if len(self.spares) < MAX_SPARES and not registry.closed:
                self.spares.append(session)
                return True
        return False

    def forget(self, session: BaseSession) -> None:
        if self.main is session:
            self.main = None
        if self.aux is session:
            self.aux = None
        if session in self.spares:
            self.spares.remove(session)

    def sessions(self) -> list[BaseSession]:
        found = [s for s in (self.main, self.aux, *self.spares) if s is not None]
        return list(dict.fromkeys(found))
