"""The PostgreSQL schema of coordlock (version 1) and every statement the backend sends.

Objects, all in one schema (default ``coordlock``, URL option ``?schema=``):

* ``meta`` – a ``schema_version`` row.
* ``fence`` – a ``bigint`` sequence: every acquisition takes ``nextval`` in the same statement as
  the advisory lock. WAL-logged, so a crash never makes it go back; a new session moves it up
  to the server clock in microseconds when it lags by more than a second (``bump_fence()``), so a
  restore from backup or a failover to a replica that missed the last WAL does not make it go
  back either (while the server clocks agree within that lag).
* ``holders`` – UNLOGGED: name, owner, fence and expiry of locks held longer than a moment,
  published in the background by the holder for ``locks()`` and the CLI. Never consulted for
  safety (the advisory lock itself is the truth); a crash empties it, which is harmless.
* ``claims`` – once-per-tick claims (logged: a tick claimed before a crash stays claimed).
* ``runs`` – scheduler run history.

The DDL runs once per schema, in one transaction serialized with ``pg_advisory_xact_lock``, so
any number of processes may start at once on an empty database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from ._pg_keys import lock_key

SCHEMA_VERSION = 1

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain SQL identifier (letters, digits, ``_``), else raise."""
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ValueError(
            f"schema must be a plain identifier of at most 63 letters, digits or _, got {schema!r}"
        )
    return schema


def ddl_lock_key(schema: str) -> int:
    """The advisory key that serializes schema creation (namespace ``coordlock.ddl``)."""
    return lock_key(schema, "coordlock.ddl")


def fence_bump_key(schema: str) -> int:
    """The advisory key that serializes moves of the fence sequence to the clock."""
    return lock_key(schema, "coordlock.fence")


_DDL = [
    "CREATE SCHEMA IF NOT EXISTS {s}",
    "CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE SEQUENCE IF NOT EXISTS {s}.fence AS bigint NO CYCLE",
    """CREATE UNLOGGED TABLE IF NOT EXISTS {s}.holders (
        key bigint PRIMARY KEY,
        name text NOT NULL,
        owner text NOT NULL,
        fence bigint NOT NULL,
        pid integer NOT NULL,
        backend_start timestamptz,
        acquired_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        released boolean NOT NULL DEFAULT false
    ) WITH (fillfactor = 50)""",
    """CREATE TABLE IF NOT EXISTS {s}.claims (
        key text PRIMARY KEY,
        claimant text NOT NULL,
        claimed_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS claims_expires_at ON {s}.claims (expires_at)",
    """CREATE TABLE IF NOT EXISTS {s}.runs (
        run_id text PRIMARY KEY,
        job text NOT NULL,
        tick text NOT NULL,
        instance text NOT NULL,
        started double precision NOT NULL,
        finished double precision,
        status text NOT NULL,
        error text
    )""",
    "CREATE INDEX IF NOT EXISTS runs_job_started ON {s}.runs (job, started DESC)",
    # Moves the fence sequence up to the server clock (µs since 1970) when it lags by more than
    # a second. Serialized, so two sessions never set it back below a value handed out.
    """CREATE OR REPLACE FUNCTION {s}.bump_fence() RETURNS bigint
    LANGUAGE plpgsql AS $$
    DECLARE
        last bigint;
        clock bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock({bump_key});
        SELECT last_value INTO last FROM {s}.fence;
        clock := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
        IF last < clock - 1000000 THEN
            PERFORM setval({seq}, clock);
            RETURN clock;
        END IF;
        RETURN last;
    END $$""",
    # Takes the lock (try, or wait under lock_timeout ``lt`` ms when lt is not NULL), then, in
    # fresh snapshots and under the holder row's lock, refuses an *orphan* (an unreleased,
    # unexpired lease of another session: PostgreSQL freed the lock when that session ended,
    # but its holder may still believe it holds it), else writes this acquisition's lease.
    # Returns (fence, seconds left of an orphan's lease, pid): fence NULL = not acquired.
    """CREATE OR REPLACE FUNCTION {s}.acquire(
        k bigint, n text, o text, bs timestamptz, ttl_ms float8, lt text, it text,
        OUT fence bigint, OUT orphan float8, OUT pid integer)
    LANGUAGE plpgsql AS $$
    DECLARE
        h record;
    BEGIN
        pid := pg_backend_pid();
        IF lt IS NULL THEN
            IF NOT pg_try_advisory_lock(k) THEN
                RETURN;
            END IF;
        ELSE
            PERFORM set_config('lock_timeout', lt, true);
            PERFORM pg_advisory_lock(k);
            PERFORM set_config('lock_timeout', '0', true);
        END IF;
        SELECT r.pid, r.backend_start, r.expires_at, r.released INTO h
            FROM {s}.holders AS r WHERE r.key = k FOR UPDATE;
        IF FOUND AND NOT h.released AND h.expires_at > clock_timestamp()
           AND (h.pid <> pid OR h.backend_start IS DISTINCT FROM bs) THEN
            PERFORM pg_advisory_unlock(k);
            orphan := extract(epoch FROM h.expires_at - clock_timestamp());
            RETURN;
        END IF;
        fence := nextval({seq});
        INSERT INTO {s}.holders AS r
            (key, name, owner, fence, pid, backend_start, acquired_at, expires_at, released)
        VALUES (k, n, o, fence, pid, bs, clock_timestamp(),
                clock_timestamp() + ttl_ms * interval '1 millisecond', false)
        ON CONFLICT (key) DO UPDATE SET
            name = excluded.name, owner = excluded.owner, fence = excluded.fence,
            pid = excluded.pid, backend_start = excluded.backend_start,
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
            released = false;
        IF it <> '' THEN
            PERFORM set_config('idle_session_timeout', it, false);
        END IF;
    END $$""",
    "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', {version}) "
    "ON CONFLICT (key) DO NOTHING",
]


@dataclass(frozen=True)
class Queries:
    """Every statement of the backend, rendered once for one schema (prepared per session)."""

    ddl: tuple[str, ...]
    ddl_lock: str
    version: str
    session_init: str
    bump_fence: str
    acquire: str
    release: str
    release_all: str
    unlock: str
    ping: str
    extend: str
    locks: str
    claim: str
    claims_cleanup: str
    record_run: str
    history: str
    history_job: str


def _render(template: str, schema: str) -> str:
    seq = sql.Literal(sql.Identifier(schema).as_string(None) + ".fence").as_string(None)
    return (
        sql.SQL(template)
        .format(
            s=sql.Identifier(schema),
            seq=sql.SQL(seq),
            bump_key=sql.Literal(fence_bump_key(schema)),
            version=sql.Literal(str(SCHEMA_VERSION)),
        )
        .as_string(None)
    )


def queries(schema: str) -> Queries:
    """Render every statement for ``schema``."""
    check_schema_name(schema)

    def r(template: str) -> str:
        return _render(template, schema)

    return Queries(
        ddl=tuple(r(t) for t in _DDL),
        ddl_lock=f"SELECT pg_advisory_xact_lock({ddl_lock_key(schema)})",
        version=r("SELECT value FROM {s}.meta WHERE key = 'schema_version'"),
        session_init=(
            "SELECT pg_backend_pid(), backend_start, current_setting('server_version_num')::int,"
            " current_setting('synchronous_commit')"
            " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ),
        bump_fence=r("SELECT {s}.bump_fence()"),
        acquire=r("SELECT fence, orphan, pid FROM {s}.acquire(%s, %s, %s, %s, %s, %s, %s)"),
        # Release: mark the lease row released (committed before a waiter reads it: the waiter
        # locks the row), then unlock; the CTE is read first, so the update runs first.
        release=r(
            "WITH d AS (UPDATE {s}.holders SET released = true"
            " WHERE key = ANY(%(keys)s::int8[]) AND pid = pg_backend_pid() RETURNING 1)"
            " SELECT count(*) FILTER (WHERE pg_advisory_unlock(k))"
            " FROM (SELECT count(*) FROM d) AS x, unnest(%(keys)s::int8[]) AS k"
        ),
        release_all=r(
            "UPDATE {s}.holders SET released = true WHERE pid = pg_backend_pid() AND NOT released"
        ),
        unlock="SELECT pg_advisory_unlock(%s)",
        ping="SELECT pg_backend_pid(), set_config('idle_session_timeout', %s, false)",
        # Renewal: push the lease row's expiry (never back) and keep the session busy.
        extend=r(
            "WITH u AS (UPDATE {s}.holders SET expires_at = GREATEST(expires_at,"
            " clock_timestamp() + %s * interval '1 millisecond')"
            " WHERE key = %s AND pid = pg_backend_pid() AND NOT released)"
            " SELECT pg_backend_pid(), set_config('idle_session_timeout', %s, false)"
        ),
        # Granted advisory locks of this database, with their holders' rows.
        locks=r(
            "SELECT p.pid, (p.classid::int8 << 32) | p.objid::int8, h.name, h.owner, h.fence,"
            " extract(epoch FROM h.expires_at)::float8"
            " FROM pg_locks p"
            " JOIN {s}.holders h ON h.key = ((p.classid::int8 << 32) | p.objid::int8)"
            " AND h.pid = p.pid AND NOT h.released"
            " WHERE p.locktype = 'advisory' AND p.objsubid = 1 AND p.granted"
            " AND p.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        # One statement for every key of a tick; keys sorted by the caller (no deadlocks).
        # A retry by the same claimant (same token) gets its own claim back.
        claim=r(
            "INSERT INTO {s}.claims AS c (key, claimant, claimed_at, expires_at)"
            " SELECT k, %s, now(), now() + %s * interval '1 millisecond'"
            " FROM unnest(%s::text[]) AS k"
            " ON CONFLICT (key) DO UPDATE SET claimant = excluded.claimant,"
            " claimed_at = excluded.claimed_at, expires_at = excluded.expires_at"
            " WHERE c.expires_at <= now() OR c.claimant = excluded.claimant"
            " RETURNING c.key"
        ),
        claims_cleanup=r("DELETE FROM {s}.claims WHERE expires_at < now() - interval '1 hour'"),
        record_run=r(
            "INSERT INTO {s}.runs (run_id, job, tick, instance, started, finished, status, error)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (run_id) DO UPDATE SET job = excluded.job, tick = excluded.tick,"
            " instance = excluded.instance, started = excluded.started,"
            " finished = excluded.finished, status = excluded.status, error = excluded.error"
        ),
        history=r(
            "SELECT run_id, job, tick, instance, started, finished, status, error"
            " FROM {s}.runs ORDER BY started DESC LIMIT %s"
        ),
        history_job=r(
            "SELECT run_id, job, tick, instance, started, finished, status, error"
            " FROM {s}.runs WHERE job = %s ORDER BY started DESC LIMIT %s"
        ),
    )
