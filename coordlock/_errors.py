"""The exceptions coordlock raises. All of them subclass :class:`CoordlockError`."""

from __future__ import annotations


class CoordlockError(Exception):
    """Base class of every error raised by coordlock."""


class ConfigurationError(CoordlockError):
    """A bad URL, an unknown scheme, a bad option, a missing driver package, or a server that
    refuses us for a reason retrying cannot fix (wrong password, no such database, no
    permission). Exit status 78 in the CLI."""


class NotConfigured(ConfigurationError):
    """No process-wide coordinator was configured and ``$COORDLOCK_URL`` is not set."""


class LockNotAcquired(CoordlockError):
    """The lock is held by someone else (``on_busy="raise"``), or waiting for it timed out."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(message or f"lock {name!r} is held by another owner")


class LockLost(CoordlockError):
    """A lease stopped being ours while the caller still relied on it.

    Raised when leaving a ``with coordlock.lock(...)`` block (or a ``@locked`` call) whose
    lease was lost meanwhile: another owner may have run at the same time, so whatever the
    block wrote should be fenced with ``lease.fence``.
    """

    def __init__(self, name: str, reason: str = "") -> None:
        self.name = name
        self.reason = reason
        text = f"lock {name!r} was lost while held"
        super().__init__(f"{text}: {reason}" if reason else text)


class BackendError(CoordlockError):
    """The backend server answered with an error coordlock did not expect (the driver's error
    is chained as ``__cause__``)."""


class BackendUnavailable(BackendError):
    """The backend server could not be reached, even after bounded retries. Exit status 69."""
