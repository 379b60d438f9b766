"""Creating the schema once as an admin (``coordlock init``), so applications need no DDL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..._errors import BackendUnavailable, ConfigurationError
from .errors import classify
from .options import DEFAULT_IO_TIMEOUT, build_options, split_url
from .schema import SCHEMA_VERSION, apply_grants, ensure_schema


def init_schema(url: str, *, grant_to: str | Sequence[str] = (), **options: Any) -> int:
    """Create (or upgrade) coordlock's schema in the database of ``url``; return its version.

    Run it once, as a role that may create the schema (``coordlock init URL``). Then the
    applications can connect with ``?create_schema=false`` as a role that only has the
    privileges :func:`~coordlock.backends.postgres.grant_statements` lists; ``grant_to`` (a
    role name or names) grants them here. Safe to run again (nothing changes) and concurrently
    with running applications. URL options: ``schema`` (and any libpq parameter).

    Raises ConfigurationError for a bad URL, a permanent connection failure or missing
    privileges; BackendUnavailable when the server cannot be reached.
    """
    roles = [grant_to] if isinstance(grant_to, str) else list(grant_to)
    conninfo, ours = split_url(url)
    merged = {**ours, **options}
    opts = build_options(
        conninfo,
        schema=merged.pop("schema", "coordlock"),
        namespace=merged.pop("namespace", None),
        pgbouncer=merged.pop("pgbouncer", None),
        takeover=merged.pop("takeover", "lease"),
        retry_deadline=merged.pop("retry_deadline", 10.0),
        io_timeout=merged.pop("io_timeout", DEFAULT_IO_TIMEOUT),
        create_schema=True,
    )
    merged.pop("create_schema", None)
    if merged:
        raise ConfigurationError(f"unknown option(s) for init_schema: {', '.join(sorted(merged))}")
    try:
        with psycopg.connect(opts.conninfo, autocommit=True) as conn:
            ensure_schema(conn, opts.schema, create=True)
            if roles:
                apply_grants(conn, opts.schema, roles)
    except psycopg.Error as exc:
        if classify(exc) == "permanent":
            raise ConfigurationError(f"coordlock init: {exc}") from exc
        raise BackendUnavailable(f"coordlock init: {exc}") from exc
    return SCHEMA_VERSION
