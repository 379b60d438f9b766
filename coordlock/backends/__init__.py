"""Built-in backends, one module each; each imports its driver only when loaded.

For authors of third-party backends, this package also exposes what a backend builds on:
subclass :class:`BaseCoordinator`, implement its ``_try_acquire`` (returning an
:class:`Attempt`)/``_release``/``_extend``/``_claim_many`` hooks and ``from_url`` (see
docs/backend-authors.md), register the class under the ``coordlock.backends``
entry-point group (or call :func:`register_backend`), and run
:class:`coordlock.testing.contract.CoordinatorContract` against it.
"""

from .._attempt import Attempt
from .._base import BaseCoordinator
from .._protocol import (
    ClaimsMany,
    DescribesServer,
    ForceUnlocks,
    KeepsHistory,
    ListsLocks,
    LockInfo,
    RecordsMany,
    RunRecord,
    ServerInfo,
)
from .._registry import known_schemes, missing_driver, register_backend

__all__ = [
    "Attempt",
    "BaseCoordinator",
    "ClaimsMany",
    "DescribesServer",
    "ForceUnlocks",
    "ServerInfo",
    "KeepsHistory",
    "ListsLocks",
    "LockInfo",
    "RecordsMany",
    "RunRecord",
    "known_schemes",
    "missing_driver",
    "register_backend",
]
