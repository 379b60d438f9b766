"""Every statement the PostgreSQL backend sends at run time, rendered once per schema.

The acquire, release and renewal statements are each one round trip. Parameters are named
(``%(k)s``…): psycopg sends a repeated name once. Shared by the sync and async code paths:
only the call that sends a statement differs between them.

The *takeover rule* (``_TAKEABLE``) decides, on the newest version of a key's lease row, whether
this session may take the key it has just locked: the row is its own (same session marker),
released (by a closing coordinator or the keeper), expired by the server clock, or its holding
session is alive (its marker lock is held, so the key was let go on purpose). Otherwise the
holding session ended while it held the key (an *orphan*, see ``markers.py``) and the key stays
unavailable until the lease expires. Rows without a marker (written by schema version 1) count
as orphans until they expire.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from .._pg_keys import lock_key
from .markers import PROBE_TEXT

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
_NAMED = re.compile(r"%\((\w+)\)s")

#: Types of the named parameters of the lean statements (PostgreSQL type OIDs).
PARAM_OIDS = {
    "k": 20, "m": 20, "owner": 25, "name": 25, "it": 25, "lt": 25, "ttl": 701, "keys": 1016,
    # a run's history row (RunRecord's fields)
    "run_id": 25, "job": 25, "tick": 25, "instance": 25, "started": 701, "finished": 701,
    "status": 25, "error": 25, "result": 25,
    # many history rows at once: one array per column
    "run_ids": 1009, "jobs": 1009, "ticks": 1009, "instances": 1009, "started_at": 1022,
    "finished_at": 1022, "statuses": 1009, "errors": 1009, "results": 1009,
}  # fmt: skip


@dataclass(frozen=True)
class Lean:
    """A statement sent on the lean path (``Session.run`` with ``Step.lean``): prepared once
    per session under ``name``, with ``$n`` placeholders for the named ``params``, its
    arguments sent as text. Used for what runs on every lock and unlock: the cursor layer of
    psycopg costs more client CPU than the statement itself."""

    name: bytes
    sql: bytes
    params: tuple[str, ...]
    oids: tuple[int, ...]
    encoders: tuple[Callable[[Any], bytes], ...] = ()


def _text(value: Any) -> bytes:
    return str(value).encode()


def _float(value: Any) -> bytes:
    return repr(float(value)).encode()


def _array(value: Any) -> bytes:
    return ("{" + ",".join(str(v) for v in value) + "}").encode()


def _quoted(value: str | None) -> str:
    """One element of a text array literal: quoted, with ``\\`` and ``"`` escaped."""
    if value is None:
        return "NULL"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text_array(value: Any) -> bytes:
    return ("{" + ",".join(map(_quoted, value)) + "}").encode()


def _float_array(value: Any) -> bytes:
    return ("{" + ",".join("NULL" if v is None else repr(float(v)) for v in value) + "}").encode()


#: How a parameter of each type is sent (text format); None is sent as NULL.
ENCODERS: dict[int, Callable[[Any], bytes]] = {
    20: _text, 25: _text, 701: _float, 1016: _array, 1009: _text_array, 1022: _float_array,
}  # fmt: skip


def lean(label: str, query: str) -> Lean:
    """``query`` with ``%(name)s`` placeholders as a :class:`Lean` statement."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = _NAMED.sub(number, query)
    oids = tuple(PARAM_OIDS[n] for n in names)
    return Lean(
        f"coordlock_{label}".encode(),
        sql.encode(),
        tuple(names),
        oids,
        tuple(ENCODERS[oid] for oid in oids),
    )


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


def channel(schema: str) -> str:
    """The NOTIFY channel of force-unlock requests for ``schema``."""
    return f"coordlock_{schema}"


def render(template: str, schema: str) -> str:
    """Fill ``{s}`` (schema), ``{seq}`` (fence sequence literal), ``{bump_key}``, ``{version}``."""
    from .schema import SCHEMA_VERSION  # (a cycle: the DDL renders through this function)

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


_TAKEABLE = """CASE WHEN r.marker = %(m)s OR r.released OR r.expires_at <= clock_timestamp()
         THEN true
         WHEN r.marker IS NULL THEN false
         ELSE NOT pg_try_advisory_xact_lock_shared(r.marker) END"""

_SET_ROW = """owner = %(owner)s, fence = nextval({seq}), pid = pg_backend_pid(), marker = %(m)s,
        acquired_at = clock_timestamp(),
        expires_at = clock_timestamp() + %(ttl)s * interval '1 millisecond', released = false"""

_IDLE = "set_config('idle_session_timeout', %(it)s, false)"

# Lease mode, try: lock the key and move its lease row to us in one statement. No row back
# although the key was locked (column 2): first use of the key, or an orphan; then
# ``take_row`` runs (it inserts, or lets the key go again).
_TRY_LEASE = (
    """WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock(%(k)s) AS got),
u AS (
    UPDATE {s}.holders AS r SET """
    + _SET_ROW
    + """
    WHERE r.key = %(k)s AND (SELECT got FROM l) AND """
    + _TAKEABLE
    + """
    RETURNING r.fence)
SELECT (SELECT fence FROM u), (SELECT got FROM l), pg_backend_pid()"""
)

# Lease mode, the key already locked by this session: insert or take over its row; if the row
# is an orphan's, let the key go again and say how long its lease has left (s).
_UPSERT = (
    """u AS (
    INSERT INTO {s}.holders AS r
        (key, name, owner, fence, pid, marker, acquired_at, expires_at, released)
    SELECT %(k)s, %(name)s, %(owner)s, nextval({seq}), pg_backend_pid(), %(m)s,
           clock_timestamp(), clock_timestamp() + %(ttl)s * interval '1 millisecond', false
    FROM g
    ON CONFLICT (key) DO UPDATE SET
        name = excluded.name, owner = excluded.owner, fence = excluded.fence,
        pid = excluded.pid, marker = excluded.marker, acquired_at = excluded.acquired_at,
        expires_at = excluded.expires_at, released = false
    WHERE """
    + _TAKEABLE
    + """
    RETURNING r.fence)
SELECT (SELECT fence FROM u), pg_backend_pid(),
       CASE WHEN NOT EXISTS (SELECT 1 FROM u) THEN pg_advisory_unlock(%(k)s) END,
       CASE WHEN NOT EXISTS (SELECT 1 FROM u) THEN
            (SELECT extract(epoch FROM h.expires_at - clock_timestamp())::float8
             FROM {s}.holders AS h WHERE h.key = %(k)s) END,
       extract(epoch FROM (SELECT t FROM g) - statement_timestamp())::float8"""
)

# The blocking wait: ``pg_advisory_lock`` under ``lock_timeout`` (%(lt)s ms, '0' = none), then
# the clock at the grant: the last column is the server-measured wait (s) since the statement
# arrived, so the caller can start its lease clock at send time + that wait (never later than
# the server's lease start).
_WAIT_PREFIX = """WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', %(lt)s, true) AS v),
l AS MATERIALIZED (SELECT pg_advisory_lock(%(k)s)::text AS v FROM cfg),
g AS MATERIALIZED (SELECT clock_timestamp() AS t FROM l),
"""

_TAKE_PREFIX = "WITH g AS MATERIALIZED (SELECT clock_timestamp() AS t),\n"

# Session mode: PostgreSQL's own rule, no lease rows; the fence comes with the lock.
_TRY_SESSION = """WITH x AS MATERIALIZED (
    SELECT CASE WHEN pg_try_advisory_lock(%(k)s) THEN nextval({seq}) END AS f)
SELECT (SELECT f FROM x), (SELECT f FROM x) IS NOT NULL, pg_backend_pid()"""

_WAIT_SESSION = (
    _WAIT_PREFIX.rstrip().rstrip(",")
    + """,
n AS MATERIALIZED (SELECT nextval({seq}) AS f FROM g)
SELECT (SELECT f FROM n), pg_backend_pid(), NULL::boolean, NULL::float8,
       extract(epoch FROM (SELECT t FROM g) - statement_timestamp())::float8"""
)


def _with_idle(statement: str, acquired: str) -> str:
    """``statement`` plus a column that sets idle_session_timeout when ``acquired`` is true."""
    return f"{statement},\n       CASE WHEN {acquired} THEN {_IDLE} END"


@dataclass(frozen=True)
class Statements:
    """Every run-time statement of the backend for one schema (prepared per session)."""

    session_init: str
    session_setup: str
    try_lease: str
    try_lease_idle: str
    take_row: str
    take_row_idle: str
    wait_lease: str
    try_session: str
    try_session_idle: str
    wait_session: str
    unlock: str
    lean: dict[str, Lean]
    ping: str
    extend_lease: str
    extend_session: str
    release_expired: str
    release_rows: str
    version: str
    locks: str
    claim: str
    claims_cleanup: str
    record_run: str
    record_runs: str
    history: str
    history_job: str
    server_info: str
    listen: str
    linger: str
    force_revoke: str
    force_wait: str
    force_terminate: str


_RUN_UPSERT = (
    " ON CONFLICT (run_id) DO UPDATE SET job = excluded.job, tick = excluded.tick,"
    " instance = excluded.instance, started = excluded.started,"
    " finished = excluded.finished, status = excluded.status, error = excluded.error,"
    " result = excluded.result"
)


def statements(schema: str) -> Statements:
    """Render every run-time statement for ``schema``."""
    q = _statements(schema)
    for label in ("try_lease", "try_lease_idle", "try_session", "try_session_idle",
                  "wait_lease", "wait_session", "extend_lease", "extend_session"):  # fmt: skip
        q.lean[label] = lean(label, getattr(q, label))
    q.lean["unlock"] = lean("unlock", "SELECT pg_advisory_unlock(%(k)s)")
    q.lean["release_rows"] = lean("release_rows", q.release_rows)
    q.lean["record_run"] = lean("record_run", q.record_run)  # a scheduler writes 2 per run
    q.lean["record_runs"] = lean("record_runs", q.record_runs)  # (its writers batch them)
    return q


def _statements(schema: str) -> Statements:
    check_schema_name(schema)

    def r(template: str) -> str:
        return render(template, schema)

    got_row = "EXISTS (SELECT 1 FROM u)"
    return Statements(
        session_init=(
            "SELECT pg_backend_pid(), current_setting('server_version_num')::int,"
            " current_setting('synchronous_commit'),"
            " (SELECT oid FROM pg_database WHERE datname = current_database())::int8,"
            f" hashtext('{PROBE_TEXT}' COLLATE \"C\")"
        ),
        # Takes the session marker (NULL: none), moves the fence sequence up to the clock if it
        # lags, and keeps fence WAL flushed before use.
        session_setup=r(
            "SELECT coalesce(pg_try_advisory_lock(%(m)s::int8), true), {s}.bump_fence(),"
            " CASE WHEN %(sc)s THEN set_config('synchronous_commit', 'local', false) END"
        ),
        try_lease=r(_TRY_LEASE),
        try_lease_idle=r(_with_idle(_TRY_LEASE, "(SELECT fence FROM u) IS NOT NULL")),
        take_row=r(_TAKE_PREFIX + _UPSERT),
        take_row_idle=r(_with_idle(_TAKE_PREFIX + _UPSERT, got_row)),
        wait_lease=r(_with_idle(_WAIT_PREFIX + _UPSERT, got_row)),
        try_session=r(_TRY_SESSION),
        try_session_idle=r(_with_idle(_TRY_SESSION, "(SELECT f FROM x) IS NOT NULL")),
        wait_session=r(_with_idle(_WAIT_SESSION, "true")),
        unlock="SELECT pg_advisory_unlock(%s)",
        lean={},
        ping="SELECT pg_backend_pid(), set_config('idle_session_timeout', %s, false)",
        # Renewal: push the lease row's expiry (never back) and keep the session busy.
        extend_lease=r(
            "WITH u AS (UPDATE {s}.holders SET expires_at = GREATEST(expires_at,"
            " clock_timestamp() + %(ttl)s * interval '1 millisecond')"
            " WHERE key = %(k)s AND marker = %(m)s AND NOT released RETURNING 1)"
            " SELECT pg_backend_pid(), " + _IDLE + ", EXISTS (SELECT 1 FROM u)"
        ),
        extend_session="SELECT pg_backend_pid(), " + _IDLE + ", true",
        # Leases the keeper ends at their ttl: the rows say released before the unlock.
        release_expired=r(
            "WITH d AS (UPDATE {s}.holders SET released = true"
            " WHERE key = ANY(%(keys)s::int8[]) AND marker = %(m)s RETURNING 1)"
            " SELECT count(*) FILTER (WHERE pg_advisory_unlock(k))"
            " FROM (SELECT count(*) FROM d) AS x, unnest(%(keys)s::int8[]) AS k"
        ),
        # A session about to close: its rows stop holding anyone off (its marker goes with it).
        release_rows=r(
            "UPDATE {s}.holders SET released = true"
            " WHERE key = ANY(%(keys)s::int8[]) AND marker = %(m)s AND NOT released"
        ),
        version=r("SELECT value FROM {s}.meta WHERE key = 'schema_version'"),
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
            "INSERT INTO {s}.runs (run_id, job, tick, instance, started, finished, status, error,"
            " result) VALUES (%(run_id)s, %(job)s, %(tick)s, %(instance)s, %(started)s,"
            " %(finished)s, %(status)s, %(error)s, %(result)s)" + _RUN_UPSERT
        ),
        # Several rows (distinct run_ids) in one statement: one array per column.
        record_runs=r(
            "INSERT INTO {s}.runs (run_id, job, tick, instance, started, finished, status, error,"
            " result) SELECT * FROM unnest(%(run_ids)s::text[], %(jobs)s::text[],"
            " %(ticks)s::text[], %(instances)s::text[], %(started_at)s::float8[],"
            " %(finished_at)s::float8[], %(statuses)s::text[], %(errors)s::text[],"
            " %(results)s::text[])" + _RUN_UPSERT
        ),
        history=r(
            "SELECT run_id, job, tick, instance, started, finished, status, error, result"
            " FROM {s}.runs ORDER BY started DESC LIMIT %s"
        ),
        history_job=r(
            "SELECT run_id, job, tick, instance, started, finished, status, error, result"
            " FROM {s}.runs WHERE job = %s ORDER BY started DESC LIMIT %s"
        ),
        server_info=(
            "SELECT current_setting('server_version'),"
            " extract(epoch FROM clock_timestamp())::float8"
        ),
        # Force-unlock requests reach every lock session of the schema (payload "<key> <pid>").
        listen=sql.SQL("LISTEN {}").format(sql.Identifier(channel(schema))).as_string(None),
        # hold_at_least: the lock stays held until the hold ends (the keeper unlocks then); if
        # this session dies first, its row still holds others off until then (an orphan).
        linger=r(
            "WITH u AS (UPDATE {s}.holders SET expires_at = clock_timestamp()"
            " + %(linger)s * interval '1 millisecond'"
            " WHERE key = %(k)s AND marker = %(m)s RETURNING 1)"
            " SELECT pg_backend_pid(), " + _IDLE + ", EXISTS (SELECT 1 FROM u)"
        ),
        # Force-unlock, step 1: the lease row stops holding anyone off, and every session that
        # holds the key is asked (NOTIFY) to let it go.
        force_revoke=r(
            "WITH r AS (UPDATE {s}.holders SET released = true"
            " WHERE key = %(k)s AND NOT released AND expires_at > clock_timestamp() RETURNING 1),"
            " h AS (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND ((classid::int8 << 32) | objid::int8) = %(k)s"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND pid <> pg_backend_pid()),"
            " n AS (SELECT pg_notify(%(ch)s, %(k)s::text || ' ' || pid::text) FROM h)"
            " SELECT (SELECT count(*) FROM r), (SELECT array_agg(pid) FROM h),"
            " (SELECT count(*) FROM n)"
        ),
        # Step 2: wait (bounded) until the holders let go; the lock is passed on at once.
        force_wait=(
            "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', %(lt)s, true) AS v),"
            " l AS MATERIALIZED (SELECT pg_advisory_lock(%(k)s)::text AS v FROM cfg)"
            " SELECT pg_advisory_unlock(%(k)s) FROM l"
        ),
        # Fallback for a holder that did not let go in time (hung, or not coordlock).
        force_terminate=(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND ((classid::int8 << 32) | objid::int8) = %(k)s"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND pid <> pg_backend_pid()"
        ),
    )
