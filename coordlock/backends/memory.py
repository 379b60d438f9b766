"""``memory://name`` – locks shared by the threads of one process (tests, single-process apps).

Every coordinator connected to the same ``memory://name`` in a process shares one lock table,
so a test can play several instances. Nothing survives the process. Waiters are woken on
release (no polling): threads by a condition variable, asyncio tasks by a future of their loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .._attempt import Attempt
from .._base import BaseCoordinator
from .._errors import ConfigurationError
from .._protocol import LockInfo, RunRecord
from .._validate import check_records

Clock = Callable[[], float]


@dataclass
class _Held:
    owner: str
    fence: int
    expires: float  # table clock


@dataclass
class _Table:
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)
    locks: dict[str, _Held] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    claims: dict[str, float] = field(default_factory=dict)
    claims_live: int = 0  # claim count after the last prune of expired claims
    runs: dict[str, RunRecord] = field(default_factory=dict)
    # asyncio waiters by lock name: (their loop, a future to resolve on release)
    async_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = (
        field(default_factory=dict)
    )

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    def wake(self, name: str) -> None:
        """Wake every waiter of ``name`` (call with ``cond`` held)."""
        self.cond.notify_all()
        for loop, future in self.async_waiters.pop(name, ()):
            with contextlib.suppress(RuntimeError):  # a closed loop
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_tables: dict[str, _Table] = {}
_tables_lock = threading.Lock()


def _table(name: str) -> _Table:
    with _tables_lock:
        return _tables.setdefault(name, _Table())


class MemoryCoordinator(BaseCoordinator):
    """In-process coordinator. Its hooks never block on I/O, so the async API calls them
    directly on the event loop (no worker threads). ``clock`` (seconds, default
    ``time.monotonic``) can be injected to test clock jumps; expiry is judged by that clock."""

    backend_name = "memory"
    wakes_waiters = True

    def __init__(self, name: str = "default", *, clock: Clock = time.monotonic, **kw: Any):
        super().__init__(**kw)
        self.name = name
        self._clock = clock
        self._t = _table(name)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryCoordinator:
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigurationError(f"not a memory:// URL: {url!r}")
        name = (parts.netloc + parts.path).strip("/") or "default"
        return cls(name, **options)

    def _live(self, name: str, now: float) -> _Held | None:
        held = self._t.locks.get(name)
        if held is not None and held.expires <= now:
            del self._t.locks[name]
            self._t.wake(name)
            return None
        return held

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        with self._t.lock:
            now = self._clock()
            held = self._live(name, now)
            if held is not None:
                if held.owner == owner:
                    return Attempt(held.fence)
                return Attempt.busy(retry_in=held.expires - now)
            fence = self._t.fences.get(name, 0) + 1
            self._t.fences[name] = fence
            self._t.locks[name] = _Held(owner, fence, now + ttl)
            return Attempt(fence)

    def _release(self, name: str, owner: str) -> bool:
        with self._t.lock:
            held = self._live(name, self._clock())
            if held is None or held.owner != owner:
                return False
            del self._t.locks[name]
            self._t.wake(name)
            return True

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        with self._t.lock:
            now = self._clock()
            held = self._live(name, now)
            if held is None or held.owner != owner:
                return False
            held.expires = now + ttl
            return True

    def _force_release(self, name: str) -> bool:
        with self._t.lock:
            held = self._live(name, self._clock())
            if held is None:
                return False
            del self._t.locks[name]
            self._t.wake(name)
            return True

    def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        with self._t.cond:
            held = self._live(name, self._clock())
            if held is not None:
                # Wake on release, or when the holder's ttl runs out (whichever is first).
                self._t.cond.wait(min(timeout, max(held.expires - self._clock(), 0.0)))
        return None

    async def _async_wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._t.lock:
            held = self._live(name, self._clock())
            if held is None:
                return None
            timeout = min(timeout, max(held.expires - self._clock(), 0.0))
            self._t.async_waiters.setdefault(name, []).append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:  # timed out or cancelled: stop being a waiter
            with self._t.lock:
                waiters = self._t.async_waiters.get(name, [])
                with contextlib.suppress(ValueError):
                    waiters.remove((loop, future))
        return None

    # The hooks below only take an in-process lock: run them on the loop itself.

    async def _async_try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        return self._try_acquire(name, owner, ttl, ticket)

    async def _async_release(self, name: str, owner: str) -> bool:
        return self._release(name, owner)

    async def _async_extend(self, name: str, owner: str, ttl: float) -> bool:
        return self._extend(name, owner, ttl)

    async def _async_claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        return self._claim_many(keys, hold)

    async def _async_release_later(self, name: str, owner: str, linger: float) -> bool:
        return self._release_later(name, owner, linger)

    async def _async_force_release(self, name: str) -> bool:
        return self._force_release(name)

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        with self._t.lock:
            now = self._clock()
            if len(self._t.claims) > 2 * max(512, self._t.claims_live):  # drop expired claims
                self._t.claims = {k: t for k, t in self._t.claims.items() if t > now}
                self._t.claims_live = len(self._t.claims)
            won = set()
            for key in keys:
                until = self._t.claims.get(key)
                if until is None or until <= now:
                    self._t.claims[key] = now + hold
                    won.add(key)
            return won

    def locks(self) -> list[LockInfo]:
        """Every live lock of this table."""
        with self._t.lock:
            now = self._clock()
            wall = time.time()
            return [
                LockInfo(name, h.owner, h.fence, wall + (h.expires - now))
                for name, h in sorted(self._t.locks.items())
                if h.expires > now
            ]

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run`` (keyed by ``run_id``)."""
        with self._t.lock:
            self._t.runs[run.run_id] = run

    def record_runs(self, runs: Sequence[RunRecord]) -> None:
        """Store or update each of ``runs`` in order (a later row of a ``run_id`` wins)."""
        checked = check_records(runs)
        with self._t.lock:
            for run in checked:
                self._t.runs[run.run_id] = run

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first, optionally of one ``job``."""
        with self._t.lock:
            runs = [r for r in self._t.runs.values() if job is None or r.job == job]
        runs.sort(key=lambda r: r.started, reverse=True)
        return runs[:limit]
