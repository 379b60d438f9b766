"""The PostgreSQL schema of coordlock (version 2): creation, upgrade, checks and grants.

Objects, all in one schema (default ``coordlock``, URL option ``?schema=``):

* ``meta`` – a ``schema_version`` row.
* ``fence`` – a ``bigint`` sequence: an acquisition takes ``nextval`` in the statement that takes
  the lock. WAL-logged (a crash never sets it back: PostgreSQL logs 32 values ahead and flushes
  that record before any of them is used); a new session moves it up to the server clock in
  microseconds when it lags by more than a second (``bump_fence()``, SECURITY DEFINER so that
  the run-time role needs no UPDATE on the sequence), so a restore from backup or a failover to
  a replica that missed the last WAL does not set it back either, as long as the new server's
  clock is not behind the old one.
* ``holders`` – UNLOGGED: one *lease row* per key (holding session's marker and pid, owner,
  fence, expiry, released). Written by every acquisition (the one write of a lock/unlock pair);
  read by the next acquirer (the takeover rule in ``statements.py``) and by ``locks()``. A
  crash empties it (then the next holder gets a lock as soon as the server is back).
* ``claims`` – once-per-tick claims (logged: a tick claimed before a crash stays claimed).
* ``runs`` – scheduler run history.

The DDL runs in one transaction serialized with ``pg_advisory_xact_lock``, so any number of
processes may start at once on an empty database. Version 1 (the release-marker design) is
upgraded in place: its lease rows have no session marker and count as orphans until they
expire (safe, at worst one ttl of waiting). Stop coordlock 0.1 clients before upgrading: they
refuse a version-2 schema when they reconnect.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql

from ..._errors import ConfigurationError
from .session import Step
from .statements import check_schema_name, ddl_lock_key, render

log = logging.getLogger("coordlock")

SCHEMA_VERSION = 2

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
        marker bigint,
        acquired_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        released boolean NOT NULL DEFAULT false
    ) WITH (fillfactor = 50)""",
    # version 1 → 2: the holding session's marker (no index: row updates stay HOT)
    "ALTER TABLE {s}.holders ADD COLUMN IF NOT EXISTS marker bigint",
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
        error text,
        result text
    )""",
    "ALTER TABLE {s}.runs ADD COLUMN IF NOT EXISTS result text",
    "CREATE INDEX IF NOT EXISTS runs_job_started ON {s}.runs (job, started DESC)",
    # Moves the fence sequence up to the server clock (µs since 1970) when it lags by more than
    # a second. Serialized, so two sessions never set it back below a value handed out.
    """CREATE OR REPLACE FUNCTION {s}.bump_fence() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', {version})"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    " WHERE meta.value::int < excluded.value::int",
]

#: Privileges of a run-time role (``{s}`` the schema, ``{role}`` the role): no DDL, no DELETE
#: on lease rows, no setval on the fence sequence.
_GRANTS = [
    "GRANT USAGE ON SCHEMA {s} TO {role}",
    "GRANT SELECT ON {s}.meta TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON {s}.holders TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.claims TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON {s}.runs TO {role}",
    "GRANT USAGE ON SEQUENCE {s}.fence TO {role}",
    "GRANT EXECUTE ON FUNCTION {s}.bump_fence() TO {role}",
]

Flow = Generator[Step, Any, Any]


def ddl(schema: str) -> list[str]:
    """The DDL statements that create (or upgrade) ``schema``, rendered."""
    return [render(t, schema) for t in _DDL]


def grant_statements(schema: str, role: str) -> list[str]:
    """The ``GRANT`` statements that let ``role`` use ``schema`` at run time (and no more)."""
    check_schema_name(schema)
    if not isinstance(role, str) or not role:
        raise ValueError("role must be a non-empty str")
    return [
        sql.SQL(t).format(s=sql.Identifier(schema), role=sql.Identifier(role)).as_string(None)
        for t in _GRANTS
    ]


def init_hint(schema: str) -> str:
    return (
        f"run `coordlock init URL` (or coordlock.backends.postgres.init_schema(url)) once as a "
        f"role that may create schema {schema!r}, then grant the run-time role what "
        f"docs/backends/postgres.md lists"
    )


def version_flow(schema: str) -> Generator[Step, Any, int | None]:
    """The schema version recorded in ``schema``; None if the schema or table is missing
    (never an error for a missing schema, so it is safe inside a transaction)."""
    table = sql.Identifier(schema).as_string(None) + ".meta"
    try:
        exists = yield Step("SELECT to_regclass(%s) IS NOT NULL", (table,), prepare=False)
        if exists is None or not exists[0]:
            return None
        row = yield Step(
            render("SELECT value FROM {s}.meta WHERE key = 'schema_version'", schema),
            prepare=False,
        )
    except pg_errors.InsufficientPrivilege as exc:
        raise ConfigurationError(
            f"this role may not read coordlock's schema {schema!r}: {exc}. Grant it USAGE on "
            f"the schema and the privileges docs/backends/postgres.md lists"
        ) from exc
    return int(row[0]) if row is not None else None


def schema_flow(schema: str, *, create: bool) -> Generator[Step, Any, None]:
    """Make sure ``schema`` is at :data:`SCHEMA_VERSION`: create or upgrade it when ``create``
    (in one transaction, serialized across processes), else raise ConfigurationError naming
    ``coordlock init``."""
    version = yield from version_flow(schema)
    if version == SCHEMA_VERSION:
        return
    if version is not None and version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"schema {schema!r} has coordlock schema version {version}; this coordlock "
            f"understands version {SCHEMA_VERSION}: upgrade coordlock"
        )
    state = "does not exist" if version is None else f"is at version {version}"
    if not create:
        raise ConfigurationError(
            f"coordlock's schema {schema!r} {state} and create_schema is off: " + init_hint(schema)
        )
    yield Step("BEGIN", fetch="none", prepare=False)
    try:
        yield Step(f"SELECT pg_advisory_xact_lock({ddl_lock_key(schema)})", prepare=False)
        if (yield from version_flow(schema)) != SCHEMA_VERSION:  # another process was first?
            for statement in ddl(schema):
                yield Step(statement, fetch="none", prepare=False)
        yield Step("COMMIT", fetch="none", prepare=False)
    except BaseException as exc:
        try:
            yield Step("ROLLBACK", fetch="none", prepare=False)
        except Exception:  # the session is broken: it goes anyway
            log.debug("rollback after failed DDL failed", exc_info=True)
        if isinstance(exc, pg_errors.InsufficientPrivilege):
            raise ConfigurationError(
                f"coordlock's schema {schema!r} {state} and this role may not create it "
                f"({exc}): " + init_hint(schema)
            ) from exc
        raise
    log.info("coordlock: schema %r ready (version %d)", schema, SCHEMA_VERSION)


def grants_flow(schema: str, roles: Sequence[str]) -> Generator[Step, Any, None]:
    """Grant each of ``roles`` the run-time privileges on ``schema``."""
    for role in roles:
        for statement in grant_statements(schema, role):
            yield Step(statement, fetch="none", prepare=False)
