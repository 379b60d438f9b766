"""What one acquire attempt of a backend did: granted (with a fence) or busy (with hints)."""

from __future__ import annotations

from typing import Any, NamedTuple


class Attempt(NamedTuple):
    """The result of a backend's ``_try_acquire`` (or of a ``_wait`` that acquired).

    * ``fence`` – not ``None``: the lock was granted with this fence.
    * ``retry_in`` – busy: the holder's lease ends within this many seconds at the latest, so a
      waiter should look again by then (``None``: unknown).
    * ``ticket`` – opaque per-call backend state (a waiter node, a holder's expiry…) handed back
      to the next ``_try_acquire``/``_wait``/``_abandon`` of the same acquire call. Backends keep
      per-call state here, never in thread-locals (asyncio tasks share a thread).
    * ``started`` – granted: a ``time.monotonic()`` value no later than the moment the server
      started the lease, when the backend knows a tighter bound than "when the request was
      sent" (the default). It must never be later, or the local deadline would outlive the
      server's lease.
    """

    fence: int | None = None
    retry_in: float | None = None
    ticket: Any = None
    started: float | None = None

    @classmethod
    def granted(cls, fence: int, *, started: float | None = None, ticket: Any = None) -> Attempt:
        """The lock is ours with ``fence``."""
        return cls(fence=fence, started=started, ticket=ticket)

    @classmethod
    def busy(cls, *, retry_in: float | None = None, ticket: Any = None) -> Attempt:
        """Someone else holds the lock (their lease ends within ``retry_in`` s, if known)."""
        return cls(retry_in=retry_in, ticket=ticket)

    @property
    def ok(self) -> bool:
        """``True`` when the lock was granted."""
        return self.fence is not None
