"""Pieces shared by the benchmark scripts (timed loops and percentiles)."""

from __future__ import annotations

from coordlock import RunCoordinator


def timed_pairs(
    coordinator: RunCoordinator, n: int, *, warmup: int = 200, name: str = "bench",
    ttl: float = 30.0,
) -> float:
    """Uncontended ``acquire`` + ``release`` pairs/s of ``coordinator`` (renewal on), after
    ``min(n, warmup)`` untimed pairs. Raises ``RuntimeError`` if the lock is ever busy."""
    import time

    for _ in range(min(n, warmup)):
        lease = coordinator.acquire(name, ttl)
        if lease is None:
            raise RuntimeError("coordlock lock unexpectedly busy")
        lease.release()
    started = time.perf_counter()
    for _ in range(n):
        lease = coordinator.acquire(name, ttl)
        if lease is None:
            raise RuntimeError("coordlock lock unexpectedly busy")
        if not lease.release():
            raise RuntimeError("coordlock release failed")
    return n / (time.perf_counter() - started)


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples`` by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed_pairs_async(
    coordinator: RunCoordinator, n: int, *, warmup: int = 200, name: str = "bench",
    ttl: float = 30.0,
) -> float:
    """:func:`timed_pairs` through the async API (``aacquire`` + ``AsyncLease.release``)."""
    import time

    aacquire = coordinator.aacquire  # type: ignore[attr-defined]
    for _ in range(min(n, warmup)):
        lease = await aacquire(name, ttl)
        if lease is None:
            raise RuntimeError("coordlock lock unexpectedly busy")
        await lease.release()
    started = time.perf_counter()
    for _ in range(n):
        lease = await aacquire(name, ttl)
        if lease is None:
            raise RuntimeError("coordlock lock unexpectedly busy")
        if not await lease.release():
            raise RuntimeError("coordlock release failed")
    return n / (time.perf_counter() - started)
