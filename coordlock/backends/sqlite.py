"""``sqlite:///path.db`` – locks shared by the processes of one host, in one SQLite file.

The embedded default: no server, processes on one machine. WAL journal, every write in a
``BEGIN IMMEDIATE`` transaction, ``synchronous=FULL`` so a committed fence survives a power
loss (fences never regress). Expiry is judged with the host's ``CLOCK_MONOTONIC`` (shared by
all processes of a boot) tagged with the kernel's boot id, so wall-clock jumps neither expire
nor stretch a lease; after a reboot every lease is free (its holders are gone) and claims fall
back to wall-clock expiry. Waiters poll with plain reads (0.5 ms growing to 4 ms; WAL reads never
block writers) and only try a write when the lock looks free: SQLite cannot wake them. Where
the kernel has no boot id (not Linux), expiry falls back to the wall clock, and a wall-clock
jump there can expire or stretch leases.
Not for network filesystems (NFS, SMB): their file locking breaks SQLite.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential, wait_random

from .._attempt import Attempt
from .._base import BaseCoordinator
from .._errors import BackendUnavailable, ConfigurationError
from .._protocol import LockInfo, RunRecord
from .._validate import check_records, check_seconds

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordlock_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS coordlock_fences (name TEXT PRIMARY KEY, fence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS coordlock_locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    fence INTEGER NOT NULL,
    expires REAL NOT NULL,       -- CLOCK_MONOTONIC seconds of boot `boot`
    expires_wall REAL NOT NULL,  -- the same instant as epoch seconds (for display)
    boot TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS coordlock_claims (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL,
    expires_wall REAL NOT NULL,
    boot TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS coordlock_runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    tick TEXT NOT NULL,
    instance TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS coordlock_runs_job ON coordlock_runs (job, started);
"""

#: Run-history rows kept per job; older ones are pruned as new runs are recorded.
HISTORY_PER_JOB = 1000


WALL_CLOCK = "wall-clock"


def boot_id() -> str:
    """The kernel's boot id (Linux), else :data:`WALL_CLOCK` (expiry by ``time.time()``)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return WALL_CLOCK


class SQLiteCoordinator(BaseCoordinator):
    """Coordinator over one SQLite file. Options: ``timeout`` (seconds to wait for SQLite's
    write lock, default 30), ``synchronous`` (``"full"`` default, or ``"normal"``: faster, but a
    power loss may roll back the last fences), ``retry_deadline``."""

    backend_name = "sqlite"
    transient_errors = ()

    #: Bounds of the read-only poll of a waiter (seconds).
    POLL_MIN = 0.0005
    POLL_MAX = 0.004

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        synchronous: str = "full",
        clock: Callable[[], float] = time.monotonic,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.path = Path(path)
        self.timeout = check_seconds(timeout, "timeout")
        if str(synchronous).lower() not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        self._synchronous = str(synchronous).upper()
        self._boot = boot_id()
        # Without a boot id, CLOCK_MONOTONIC is not comparable across processes: use wall time.
        self._clock = time.time if self._boot == WALL_CLOCK and clock is time.monotonic else clock
        self._guard = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        _coordinators.add(self)
        with self._tx() as db:  # create the schema now: a bad path fails at connect()
            db.execute(
                "INSERT OR IGNORE INTO coordlock_meta VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteCoordinator:
        """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``; query options
        ``timeout`` and ``synchronous`` are accepted too."""
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc:
            raise ConfigurationError(
                f"bad SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////abs/path.db"
            )
        path = unquote(parts.path)[1:]
        if not path or path.endswith("/"):
            raise ConfigurationError(f"bad SQLite URL {url!r}: no file name")
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "timeout":
                try:
                    options.setdefault("timeout", float(value))
                except ValueError:
                    raise ConfigurationError(
                        f"SQLite URL option timeout={value!r} is not a number of seconds"
                    ) from None
            elif key == "synchronous":
                options.setdefault("synchronous", value)
            else:
                raise ConfigurationError(
                    f"unknown option {key!r} in SQLite URL; known: timeout, synchronous"
                )
        return cls(path, **options)

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path.parent != Path("") and not self.path.parent.exists():
            raise ConfigurationError(f"SQLite file {self.path}: folder does not exist")
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            # Concurrent first opens of a fresh file: SQLite may answer the switch to WAL (and
            # the schema creation) with "database is locked" at once, without its busy
            # timeout. Retry those within the same ``timeout``.
            for attempt in Retrying(
                stop=stop_after_delay(self.timeout),
                wait=wait_exponential(multiplier=0.005, max=0.2) + wait_random(0, 0.01),
                retry=retry_if_exception(_is_busy),
                reraise=True,
            ):
                with attempt:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute(f"PRAGMA synchronous={self._synchronous}")
                    conn.executescript(_SCHEMA)
                    _upgrade(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction; SQLite errors become coordlock errors."""
        with self._guard:
            try:
                if self._conn is None or self._pid != os.getpid():  # forked child: reconnect
                    self._conn = self._connect()
                    self._pid = os.getpid()
                db = self._conn
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._reset()
                text = str(exc)
                if "locked" in text or "busy" in text:
                    raise BackendUnavailable(
                        f"SQLite file {self.path} stayed locked by another process for "
                        f"{self.timeout:g}s ({exc}); is a process stuck holding a write "
                        "transaction (paused, or a long-running writer)?"
                    ) from exc
                raise ConfigurationError(f"SQLite file {self.path}: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                self._reset()
                raise ConfigurationError(
                    f"SQLite file {self.path} is not a usable database: {exc}"
                ) from exc

    def _reset(self) -> None:
        if self._conn is not None:
            with suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None

    def _close(self) -> None:
        with self._guard:
            self._reset()

    # -- hooks -------------------------------------------------------------------------------

    def _live(self, expires: float, boot: str, now: float) -> bool:
        return boot == self._boot and expires > now

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        with self._tx() as db:
            now = self._clock()
            row = db.execute(
                "SELECT owner, fence, expires, boot FROM coordlock_locks WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and self._live(row[2], row[3], now):
                if row[0] == owner:
                    return Attempt.granted(int(row[1]))
                return Attempt.busy(retry_in=row[2] - now)
            (fence,) = db.execute(
                "INSERT INTO coordlock_fences VALUES (?, 1) ON CONFLICT (name) "
                "DO UPDATE SET fence = fence + 1 RETURNING fence",
                (name,),
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO coordlock_locks VALUES (?, ?, ?, ?, ?, ?)",
                (name, owner, fence, now + ttl, time.time() + ttl, self._boot),
            )
            return Attempt.granted(int(fence))

    def _release(self, name: str, owner: str) -> bool:
        with self._tx() as db:
            row = db.execute(
                "DELETE FROM coordlock_locks WHERE name = ? AND owner = ? RETURNING expires, boot",
                (name, owner),
            ).fetchone()
            return row is not None and self._live(row[0], row[1], self._clock())

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        with self._tx() as db:
            now = self._clock()
            cur = db.execute(
                "UPDATE coordlock_locks SET expires = ?, expires_wall = ? "
                "WHERE name = ? AND owner = ? AND boot = ? AND expires > ?",
                (now + ttl, time.time() + ttl, name, owner, self._boot, now),
            )
            return cur.rowcount == 1

    def _force_release(self, name: str) -> bool:
        with self._tx() as db:
            row = db.execute(
                "DELETE FROM coordlock_locks WHERE name = ? RETURNING expires, boot", (name,)
            ).fetchone()
            return row is not None and self._live(row[0], row[1], self._clock())

    def _peek(self, name: str, ticket: Any) -> Attempt | None:
        """A plain read (never blocks writers under WAL): a busy :class:`Attempt` while the
        lock is live, ``None`` when it looks free (the base then tries a real acquire)."""
        with self._guard:
            if self._conn is None or self._pid != os.getpid():
                return None  # let the next acquire (re)connect and report errors
            try:
                row = self._conn.execute(
                    "SELECT expires, boot FROM coordlock_locks WHERE name = ?", (name,)
                ).fetchone()
            except sqlite3.Error:
                return None
        now = self._clock()
        if row is None or not self._live(row[0], row[1], now):
            return None
        return Attempt.busy(retry_in=row[0] - now, ticket=ticket)

    def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        if timeout > 0:
            time.sleep(timeout)
        return self._peek(name, ticket)

    async def _async_wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        await asyncio.sleep(max(timeout, 0.0))
        return await self._in_thread(self._peek, name, ticket)

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        won: set[str] = set()
        with self._tx() as db:
            now, wall = self._clock(), time.time()
            for key in keys:
                # Free when expired on this boot's monotonic clock, or (after a reboot) by the
                # wall clock.
                cur = db.execute(
                    "INSERT INTO coordlock_claims VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE "
                    "SET expires = excluded.expires, expires_wall = excluded.expires_wall, "
                    "boot = excluded.boot "
                    "WHERE (boot = ? AND expires <= ?) OR (boot <> ? AND expires_wall <= ?)",
                    (key, now + hold, wall + hold, self._boot, self._boot, now, self._boot, wall),
                )
                if cur.rowcount == 1:
                    won.add(key)
            if won and hash(min(won)) % 64 == 0:  # now and then, drop long-expired claims
                db.execute(
                    "DELETE FROM coordlock_claims WHERE expires_wall < ?", (wall - 86400,)
                )
        return won

    # -- optional capabilities ---------------------------------------------------------------

    def locks(self) -> list[LockInfo]:
        """Every live lock in the file."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT name, owner, fence, expires_wall FROM coordlock_locks "
                "WHERE boot = ? AND expires > ? ORDER BY name",
                (self._boot, self._clock()),
            ).fetchall()
        return [LockInfo(r[0], r[1], int(r[2]), float(r[3])) for r in rows]

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run``; keeps the newest ``HISTORY_PER_JOB`` runs per job."""
        self.record_runs([run])

    def record_runs(self, runs: Sequence[RunRecord]) -> None:
        """Store or update each of ``runs`` in one transaction (one file sync); keeps the
        newest ``HISTORY_PER_JOB`` runs per job."""
        checked = check_records(runs)
        if not checked:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO coordlock_runs (run_id, job, tick, instance, started, "
                "finished, status, error, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (run.run_id, run.job, run.tick, run.instance, run.started, run.finished,
                     run.status, run.error, run.result)
                    for run in checked
                ],
            )  # fmt: skip
            db.executemany(
                "DELETE FROM coordlock_runs WHERE job = ? AND run_id NOT IN (SELECT run_id FROM "
                "coordlock_runs WHERE job = ? ORDER BY started DESC LIMIT ?)",
                [(job, job, HISTORY_PER_JOB) for job in dict.fromkeys(r.job for r in checked)],
            )

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first, optionally of one ``job``."""
        query = (
            "SELECT run_id, job, tick, instance, started, finished, status, error, result "
            "FROM coordlock_runs"
        )
        args: tuple[Any, ...] = ()
        if job is not None:
            query += " WHERE job = ?"
            args = (job,)
        query += " ORDER BY started DESC LIMIT ?"
        with self._tx() as db:
            rows = db.execute(query, (*args, int(limit))).fetchall()
        return [RunRecord(*row) for row in rows]


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a file made by an older coordlock up to date (idempotent)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(coordlock_runs)")}
    if "result" not in columns:  # added in 0.2: the job's return value (JSON text)
        conn.execute("ALTER TABLE coordlock_runs ADD COLUMN result TEXT")


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


_coordinators: weakref.WeakSet[SQLiteCoordinator] = weakref.WeakSet()
#: Connections a forked child inherited: kept (never closed from the child) so that the
#: garbage collector does not close a connection the parent still uses.
_inherited: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    # A fork while another thread was inside a transaction copies a locked guard: the child
    # would hang on its first call. Start the child with a fresh guard and no connection.
    for coordinator in list(_coordinators):
        coordinator._guard = threading.Lock()
        if coordinator._conn is not None:
            _inherited.append(coordinator._conn)
            coordinator._conn = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
