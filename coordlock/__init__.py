"""coordlock: distributed locks with fencing tokens, and a scheduler that runs each job once per
tick across many servers. Backends: SQLite (default), in-memory, Redis, PostgreSQL, ZooKeeper.

Quick use::

    import coordlock
    coordlock.configure("sqlite:///locks.db")
    with coordlock.lock("nightly-report", ttl=30) as lease:
        write_report(fence=lease.fence)

Importing coordlock loads no database driver; a backend loads its driver when first used.
"""

from ._api import configure, get_coordinator, lock, locked
from ._errors import (
    BackendUnavailable,
    ConfigurationError,
    CoordlockError,
    LockLost,
    LockNotAcquired,
    NotConfigured,
)
from ._lease import Lease
from ._protocol import RunCoordinator
from ._registry import connect
from .scheduler import Scheduler

__all__ = [
    "BackendUnavailable",
    "ConfigurationError",
    "CoordlockError",
    "Lease",
    "LockLost",
    "LockNotAcquired",
    "NotConfigured",
    "RunCoordinator",
    "Scheduler",
    "configure",
    "connect",
    "get_coordinator",
    "lock",
    "locked",
]

__version__ = "0.1.0"
