"""The PostgreSQL schema of coordlock (version 1) and every statement the backend sends.

Objects, all in one schema (default ``coordlock``, URL option ``?schema=``):

* ``meta`` – a ``schema_version`` row.
* ``fence`` – a ``bigint`` sequence: an acquisition takes ``nextval`` in the statement that takes
  the lock. WAL-logged (a crash never sets it back: PostgreSQL logs 32 values ahead and flushes
  that record before any of them is used); a new session moves it up to the server clock in
  microseconds when it lags by more than a second (``bump_fence()``), so a restore from backup or
  a failover to a replica that missed the last WAL does not set it back either, as long as the
  new server's clock is not behind the old one.
* ``holders`` – UNLOGGED: one *lease row* per key (holding session, owner, fence, expiry,
  released). Written by every acquisition; read by the next acquirer to refuse the lock of a
  session that ended while holding it until its lease expires, and by ``locks()``. A crash
  empties it (then the next holder gets a lock as soon as the server is back).
* ``release_marker(key, pid, backend_start)`` – the advisory key a session holds between a
  voluntary release and the moment its keeper has marked the row released.
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
    # The release marker of (key, session): a session takes it just before it unlocks a key
    # (a voluntary release) and drops it once the lease row says "released" (the keeper) or
    # when it takes the key again. A session that ends while *holding* the key holds no marker.
    """CREATE OR REPLACE FUNCTION {s}.release_marker(k bigint, p integer, bs timestamptz)
    RETURNS bigint LANGUAGE sql STABLE AS $$
        SELECT hashtextextended(
            k::text || '/' || p::text || '/' || (extract(epoch FROM bs) * 1000000)::int8::text,
            7)
    $$""",
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
    try_fast: str
    try_session: str
    wait_session: str
    try_acquire: str
    wait_acquire: str
    orphan_left: str
    release: str
    mark_released: str
    drop_markers: str
    release_expired: str
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


# The acquire statement after the lock CTE ``l(got)``: one statement, one round trip.
#
# The holder row of a key is its *lease*: (pid, backend_start) of the holding session and
# expires_at (server clock). PostgreSQL frees a session's advisory locks the moment the session
# ends, also when it ends abnormally (pg_terminate_backend, a crash, idle_session_timeout) while
# its holder still believes it holds the lock. So the upsert below, which runs on the *latest*
# row version (ON CONFLICT locks it, waiting for an in-flight release), refuses to take over an
# *orphan*: a lease that is not released, not expired, of another session, whose release marker
# is not held (the session did not let the key go: it ended holding it). Then the key is
# unlocked again and the caller waits until that lease expires. Named parameters: k, name,
# owner, bs (this session's backend_start), ttl (ms), rk (this session holds k's release
# marker: drop it), it ('' or the idle_session_timeout to set, ms), lt (waits only).
_ACQUIRE = """,
u AS (
    INSERT INTO {s}.holders AS r
        (key, name, owner, fence, pid, backend_start, acquired_at, expires_at, released)
    SELECT %(k)s, %(name)s, %(owner)s, nextval({seq}), pg_backend_pid(), %(bs)s,
           clock_timestamp(), clock_timestamp() + %(ttl)s * interval '1 millisecond', false
    FROM l WHERE l.got
    ON CONFLICT (key) DO UPDATE SET
        name = excluded.name, owner = excluded.owner, fence = excluded.fence,
        pid = excluded.pid, backend_start = excluded.backend_start,
        acquired_at = excluded.acquired_at, expires_at = excluded.expires_at, released = false
    WHERE r.released OR r.expires_at <= clock_timestamp()
       OR (r.pid = pg_backend_pid() AND r.backend_start = %(bs)s)
       OR NOT pg_try_advisory_xact_lock_shared({s}.release_marker(%(k)s, r.pid, r.backend_start))
    RETURNING r.fence)
SELECT (SELECT fence FROM u), pg_backend_pid(),
       CASE WHEN (SELECT got FROM l) AND NOT EXISTS (SELECT 1 FROM u)
            THEN pg_advisory_unlock(%(k)s) END,
       CASE WHEN %(rk)s AND EXISTS (SELECT 1 FROM u)
            THEN pg_advisory_unlock({s}.release_marker(%(k)s, pg_backend_pid(), %(bs)s)) END,
       CASE WHEN %(it)s <> '' AND EXISTS (SELECT 1 FROM u)
            THEN set_config('idle_session_timeout', %(it)s, false) END"""


# The fast path of try-acquire: an UPDATE of the existing lease row under the same orphan
# rule (an UPDATE that meets a row being changed waits and re-checks the newest version).
# No row back although the lock was taken: first use of the key, or an orphan; the caller
# then runs the full statement (try_acquire), which inserts or unlocks.
_FAST = """WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock(%(k)s) AS got),
u AS (
    UPDATE {s}.holders AS r SET
        name = %(name)s, owner = %(owner)s, fence = nextval({seq}), pid = pg_backend_pid(),
        backend_start = %(bs)s, acquired_at = clock_timestamp(),
        expires_at = clock_timestamp() + %(ttl)s * interval '1 millisecond', released = false
    WHERE r.key = %(k)s AND (SELECT got FROM l)
      AND (r.released OR r.expires_at <= clock_timestamp()
           OR (r.pid = pg_backend_pid() AND r.backend_start = %(bs)s)
           OR NOT pg_try_advisory_xact_lock_shared(
               {s}.release_marker(%(k)s, r.pid, r.backend_start)))
    RETURNING r.fence)
SELECT (SELECT fence FROM u), pg_backend_pid(), (SELECT got FROM l),
       CASE WHEN %(rk)s AND EXISTS (SELECT 1 FROM u)
            THEN pg_advisory_unlock({s}.release_marker(%(k)s, pg_backend_pid(), %(bs)s)) END,
       CASE WHEN %(it)s <> '' AND EXISTS (SELECT 1 FROM u)
            THEN set_config('idle_session_timeout', %(it)s, false) END"""

# The same, with the lock already held (after _FAST took it but wrote nothing).
_HELD = "WITH l AS MATERIALIZED (SELECT true AS got)"


# takeover=session: PostgreSQL's own semantics, no lease rows (the lock is free the moment its
# session ends). Acquire = the lock and, only when taken, a fence: one statement, no write.
_TRY_SESSION = """SELECT l.f, pg_backend_pid(), l.f IS NOT NULL AND false,
    NULL::boolean,
    CASE WHEN l.f IS NOT NULL AND %(it)s <> ''
         THEN set_config('idle_session_timeout', %(it)s, false) END
FROM (SELECT CASE WHEN pg_try_advisory_lock(%(k)s) THEN nextval({seq}) END AS f OFFSET 0) AS l"""

_WAIT_SESSION = """SELECT nextval({seq}), pg_backend_pid(), false, NULL::boolean,
    set_config('idle_session_timeout', %(it)s, false)
FROM (SELECT pg_advisory_lock(%(k)s)::text AS v
      FROM (SELECT set_config('lock_timeout', %(lt)s, true) AS v OFFSET 0) AS cfg
      OFFSET 0) AS l"""


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
        try_fast=r(_FAST),
        try_session=r(_TRY_SESSION),
        wait_session=r(_WAIT_SESSION),
        try_acquire=r(_HELD + _ACQUIRE),
        wait_acquire=r(
            "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', %(lt)s, true) AS v),"
            " l AS MATERIALIZED (SELECT pg_advisory_lock(%(k)s)::text IS NOT NULL AS got"
            " FROM cfg)" + _ACQUIRE
        ),
        orphan_left=r(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8"
            " FROM {s}.holders WHERE key = %s"
        ),
        # Voluntary release: take the release marker, then unlock (the subquery runs first).
        release=r(
            "SELECT pg_advisory_unlock(%(k)s) FROM (SELECT CASE WHEN %(mark)s"
            " THEN pg_advisory_lock({s}.release_marker(%(k)s, pg_backend_pid(), %(bs)s))::text"
            " END OFFSET 0) AS x"
        ),
        # The keeper: rows of keys released here say so (committed first), then the markers go.
        mark_released=r(
            "UPDATE {s}.holders SET released = true WHERE key = ANY(%s::int8[])"
            " AND pid = pg_backend_pid() AND backend_start = %s AND NOT released"
        ),
        drop_markers=r(
            "SELECT count(*) FILTER (WHERE pg_advisory_unlock("
            "{s}.release_marker(k, pg_backend_pid(), %s))) FROM unnest(%s::int8[]) AS k"
        ),
        # Leases the keeper ends at their ttl: the row says released before the unlock.
        release_expired=r(
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
