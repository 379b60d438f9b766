"""``postgresql://`` – session advisory locks, lease rows, fences from a sequence, claims.

The backend is split by job: :mod:`.coordinator` (the hooks, sync and async), :mod:`.flows`
(what each operation sends and what the answers mean, written once for both), :mod:`.session`
(connections, spares, the registry of held locks), :mod:`.keeper` (the background thread),
:mod:`.statements` (every SQL statement), :mod:`.schema` (DDL, versions, grants),
:mod:`.admin` (``coordlock init``), :mod:`.markers` (why a dying session's marker is freed
first) and :mod:`.options`.
"""

from __future__ import annotations

from ..._registry import missing_driver

try:
    import psycopg  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_driver("postgresql", "psycopg", "postgres") from exc

from .admin import init_schema
from .coordinator import PostgresCoordinator
from .options import URL_OPTIONS
from .schema import SCHEMA_VERSION, grant_statements

__all__ = [
    "SCHEMA_VERSION",
    "URL_OPTIONS",
    "PostgresCoordinator",
    "grant_statements",
    "init_schema",
]
