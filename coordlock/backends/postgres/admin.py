"""Creating the schema once as an admin (``coordlock init``), so applications need no DDL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..._errors import ConfigurationError
from ..._retry import RetryPolicy
from .flows import drive
from .options import DEFAULT_IO_TIMEOUT, build_options, split_url
from .schema import SCHEMA_VERSION, grants_flow, schema_flow
from .session import Session, configure


def init_schema(url: str, *, grant_to: str | Sequence[str] = (), **options: Any) -> int:
    """Create (or upgrade) coordlock's schema in the database of ``url``; return its version.

    Run it once, as a role that may create the schema (``coordlock init URL``). Then the
    applications can connect with ``?create_schema=false`` as a role that only has the
    privileges :func:`~coordlock.backends.postgres.grant_statements` lists; ``grant_to`` (a
    role name or names) grants them here. Safe to run again (nothing changes) and concurrently
    with running applications. URL options: ``schema`` (and any libpq parameter).

    Raises ConfigurationError for a bad URL, a permanent connection failure or missing
    privileges; BackendUnavailable when the server cannot be reached (after retries up to
    ``retry_deadline``, default 10 s).
    """
    roles = [grant_to] if isinstance(grant_to, str) else list(grant_to)
    conninfo, ours = split_url(url)
    merged = {**ours, **options}
    retry_deadline = merged.pop("retry_deadline", 10.0)
    opts = build_options(
        conninfo,
        schema=merged.pop("schema", "coordlock"),
        namespace=merged.pop("namespace", None),
        pgbouncer=merged.pop("pgbouncer", None),
        takeover=merged.pop("takeover", "lease"),
        retry_deadline=retry_deadline,
        io_timeout=merged.pop("io_timeout", DEFAULT_IO_TIMEOUT),
        create_schema=True,
    )
    merged.pop("create_schema", None)
    if merged:
        raise ConfigurationError(f"unknown option(s) for init_schema: {', '.join(sorted(merged))}")

    def run() -> None:
        with psycopg.connect(opts.conninfo, autocommit=True) as conn:
            configure(conn)
            session = Session(conn, 0, None)
            drive(session, schema_flow(opts.schema, create=True))
            if roles:
                drive(session, grants_flow(opts.schema, roles))

    RetryPolicy(float(retry_deadline)).call(run, "coordlock init")
    return SCHEMA_VERSION
