"""The options of the PostgreSQL backend: URL parsing, checks and libpq defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..._errors import ConfigurationError
from ..._registry import redact
from .statements import check_schema_name

#: URL query options coordlock itself understands; every other one must be a libpq parameter.
URL_OPTIONS = (
    "schema",
    "namespace",
    "pgbouncer",
    "takeover",
    "retry_deadline",
    "io_timeout",
    "create_schema",
)

#: libpq defaults added to the connection string unless the URL sets them. ``tcp_user_timeout``
#: is added too (``io_timeout`` in ms): unacknowledged data for that long closes the socket.
CONNECT_DEFAULTS = {
    "application_name": "coordlock",
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}

#: Default bound (s) on one statement's round trip (``io_timeout``).
DEFAULT_IO_TIMEOUT = 10.0

PGBOUNCER_ADVICE = (
    "coordlock's PostgreSQL backend holds session-level advisory locks, which silently break "
    "under PgBouncer transaction or statement pooling (each statement may run on another "
    "server session, so locks are taken and released on sessions that are not yours). Connect "
    "directly to PostgreSQL, or through a PgBouncer pool with pool_mode=session "
    "(then say ?pgbouncer=session)."
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def libpq_keywords() -> frozenset[str]:
    """Every connection parameter the installed libpq understands."""
    return frozenset(
        opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults() if opt.keyword
    )


@dataclass(frozen=True)
class PgOptions:
    """The checked options of one coordinator (see :class:`PostgresCoordinator`)."""

    conninfo: str
    schema: str
    namespace: str
    leases: bool
    retry_deadline: float
    io_timeout: float
    create_schema: bool


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return seconds


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"{name} must be true or false, got {value!r}")


def build_options(
    conninfo: str,
    *,
    schema: str,
    namespace: str | None,
    pgbouncer: str | None,
    takeover: str,
    retry_deadline: float,
    io_timeout: float,
    create_schema: bool | str,
) -> PgOptions:
    """Check every option and build the connection string (raises ConfigurationError)."""
    if takeover not in ("lease", "session"):
        raise ConfigurationError(f"takeover must be 'lease' or 'session', got {takeover!r}")
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
        schema = check_schema_name(schema)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    if namespace is not None and not isinstance(namespace, str):
        raise ConfigurationError("namespace must be a str")
    io_timeout = _seconds(io_timeout, "io_timeout")
    if not isinstance(conninfo, str):
        raise ConfigurationError("the connection string must be a str")
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad PostgreSQL connection string: {exc}") from exc
    defaults = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
    if "tcp_user_timeout" not in given:
        defaults["tcp_user_timeout"] = str(math.ceil(io_timeout * 1000))
    return PgOptions(
        conninfo=make_conninfo(conninfo, **defaults),
        schema=schema,
        namespace=schema if namespace is None else namespace,
        leases=takeover == "lease",
        retry_deadline=retry_deadline,
        io_timeout=io_timeout,
        create_schema=_flag(create_schema, "create_schema"),
    )


def split_url(url: str) -> tuple[str, dict[str, Any]]:
    """``postgresql://…?opts`` → (libpq URL without coordlock's options, coordlock's options)."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise ConfigurationError(f"malformed URL {redact(url)!r}: {exc}") from exc
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a postgresql:// URL: {redact(url)!r}")
    known = libpq_keywords()
    ours: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    unknown: list[str] = []
    for key, value in query:
        if key in URL_OPTIONS:
            ours[key] = value
        elif key in known:
            passed.append((key, value))
        else:
            unknown.append(key)
    if unknown:
        raise ConfigurationError(
            f"unknown URL option(s) {', '.join(sorted(set(unknown)))} in {redact(url)!r}; "
            f"coordlock understands {', '.join(URL_OPTIONS)} and any libpq parameter"
        )
    for key in ("retry_deadline", "io_timeout"):
        if key in ours:
            try:
                ours[key] = float(ours[key])
            except ValueError as exc:
                raise ConfigurationError(
                    f"URL option {key} must be a number of seconds, got {ours[key]!r}"
                ) from exc
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(passed)))
    return conninfo, ours
