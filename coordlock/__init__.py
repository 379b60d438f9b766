"""coordlock: distributed locks with fencing tokens, and a scheduler that runs each job once per
tick across many servers. Backends: SQLite (default), in-memory, Redis, PostgreSQL, ZooKeeper.

Quick use::

    import coordlock
    coordlock.configure("sqlite:///locks.db")
    with coordlock.lock("nightly-report", ttl=30) as lease:
        write_report(fence=lease.fence)

    async with coordlock.lock("nightly-report", ttl=30) as lease:   # asyncio: same object
        await write_report(fence=lease.fence)

Importing coordlock loads no database driver; a backend loads its driver when first used. The
scheduler is loaded on first use of ``coordlock.Scheduler``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._api import aconnect, configure, get_coordinator, lock, locked
from ._errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    CoordlockError,
    LockLost,
    LockNotAcquired,
    NotConfigured,
)
from ._lease import AsyncLease, Lease
from ._protocol import AsyncRunCoordinator, RunCoordinator
from ._registry import connect

if TYPE_CHECKING:
    from .scheduler import Scheduler

__all__ = [
    "AsyncLease",
    "AsyncRunCoordinator",
    "BackendError",
    "BackendUnavailable",
    "ConfigurationError",
    "CoordlockError",
    "Lease",
    "LockLost",
    "LockNotAcquired",
    "NotConfigured",
    "RunCoordinator",
    "Scheduler",
    "aconnect",
    "configure",
    "connect",
    "get_coordinator",
    "lock",
    "locked",
]

__version__ = "0.2.0.dev0"


def __getattr__(name: str) -> Any:
    """Load the scheduler on first use (PEP 562): ``import coordlock`` stays small."""
    if name == "Scheduler":
        from .scheduler import Scheduler

        globals()["Scheduler"] = Scheduler
        return Scheduler
    raise AttributeError(f"module 'coordlock' has no attribute {name!r}")
