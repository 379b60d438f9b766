"""Lock throughput and handoff latency of coordlock next to the raw client, in one run.

    python benchmarks/locks.py sqlite:////tmp/bench.db [--pairs 2000] [--handoffs 200]
    python benchmarks/locks.py redis://127.0.0.1:PORT/0

Prints, for the backend of the URL:

* uncontended acquire+release pairs/s: the raw client doing the same work (SQLite:
  ``BEGIN IMMEDIATE`` insert / delete with the same pragmas; Redis/PostgreSQL/ZooKeeper: the
  functions of ``benchmarks/<backend>_raw.py``) and coordlock (fencing and renewal on), and
  their ratio;
* release→waiter handoff latency, median and p99, for coordlock (and the raw client's where
  its module provides ``raw_handoffs``);
* the same through the async API (``aacquire``, ``async with``): pairs/s next to the raw async
  client where the raw module provides ``raw_async_pairs`` (``redis.asyncio``, psycopg's
  ``AsyncConnection``), and the async handoff (waiter and holder are tasks of one loop).

Rounds alternate raw/coordlock and the median round is reported, because the machines are
noisy. Speed targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sqlite3
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile, timed_pairs, timed_pairs_async

HERE = Path(__file__).resolve().parent
RAW_MODULES = {
    "redis": "redis_raw", "rediss": "redis_raw", "unix": "redis_raw",
    "redis+sentinel": "redis_raw",
    "postgresql": "postgres_raw", "postgres": "postgres_raw",
    "zookeeper": "zookeeper_raw",
}


def load_raw(scheme: str) -> ModuleType | None:
    """The ``benchmarks/<backend>_raw.py`` module for ``scheme``, if there is one."""
    name = RAW_MODULES.get(scheme)
    if name is None or not (HERE / f"{name}.py").exists():
        return None
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sqlite_raw_pairs(url: str, n: int) -> float:
    """Raw SQLite: BEGIN IMMEDIATE insert / BEGIN IMMEDIATE delete, WAL + synchronous=FULL."""
    path = unquote(urlsplit(url).path)[1:] + ".raw"
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS raw (name TEXT PRIMARY KEY, owner TEXT, exp REAL)")
    start = time.perf_counter()
    for _ in range(n):
        owner = uuid.uuid4().hex
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO raw VALUES ('bench', ?, ?)", (owner, time.monotonic() + 30))
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM raw WHERE name = 'bench' AND owner = ?", (owner,))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return n / elapsed


def memory_raw_pairs(url: str, n: int) -> float:
    """Raw in-process: a dict under a threading.Lock (what the memory backend stores)."""
    table: dict[str, str] = {}
    guard = threading.Lock()
    start = time.perf_counter()
    for _ in range(n):
        owner = uuid.uuid4().hex
        with guard:
            table.setdefault("bench", owner)
        with guard:
            if table.get("bench") == owner:
                del table["bench"]
    return n / (time.perf_counter() - start)


def coordlock_pairs(url: str, n: int) -> float:
    """coordlock acquire + release pairs/s (fencing on, renewal on)."""
    coordinator = coordlock.connect(url)
    try:
        return timed_pairs(coordinator, n)
    finally:
        coordinator.close()


def coordlock_async_pairs(url: str, n: int) -> float:
    """coordlock ``aacquire`` + ``release`` pairs/s on one event loop."""

    async def run() -> float:
        coordinator = await coordlock.aconnect(url)
        try:
            return await timed_pairs_async(coordinator, n)
        finally:
            await coordinator.aclose()  # type: ignore[attr-defined]

    return asyncio.run(run())


def coordlock_async_handoffs(url: str, n: int) -> list[float]:
    """:func:`coordlock_handoffs` with the holder and the waiter as tasks of one loop."""

    async def run() -> list[float]:
        holder = await coordlock.aconnect(url)
        waiter = await coordlock.aconnect(url)
        samples: list[float] = []
        try:
            for i in range(n):
                name = f"ahandoff-{i % 4}"
                lease = await holder.aacquire(name, 30, wait=10)  # type: ignore[attr-defined]
                assert lease is not None
                task = asyncio.create_task(
                    waiter.aacquire(name, 30, wait=30)  # type: ignore[attr-defined]
                )
                await asyncio.sleep(0.01)  # let the waiter block
                released_at = time.perf_counter()
                await lease.release()
                waited = await task
                samples.append(time.perf_counter() - released_at)
                if waited is not None:
                    await waited.release()
        finally:
            await holder.aclose()  # type: ignore[attr-defined]
            await waiter.aclose()  # type: ignore[attr-defined]
        return samples

    return asyncio.run(run())


def coordlock_handoffs(url: str, n: int) -> list[float]:
    """Seconds from a holder releasing to a blocked waiter holding the lock.

    Measured from just before ``release()`` is called to just after the waiter's
    ``acquire(wait=...)`` returns, so it includes the release round trip.
    """
    holder = coordlock.connect(url)
    waiter = coordlock.connect(url)
    samples: list[float] = []
    try:
        for i in range(n):
            name = f"handoff-{i % 4}"
            lease = holder.acquire(name, 30, wait=10)
            assert lease is not None
            got = threading.Event()
            result: dict[str, float] = {}

            def wait_for_it(
                name: str = name, got: threading.Event = got, result: dict[str, float] = result
            ) -> None:
                waited = waiter.acquire(name, 30, wait=30)
                result["t"] = time.perf_counter()
                got.set()
                if waited is not None:
                    waited.release()

            thread = threading.Thread(target=wait_for_it)
            thread.start()
            time.sleep(0.01)  # let the waiter block
            released_at = time.perf_counter()
            lease.release()
            if not got.wait(30):
                raise RuntimeError("waiter never got the lock")
            thread.join()
            samples.append(result["t"] - released_at)
    finally:
        holder.close()
        waiter.close()
    return samples




def median_of_rounds(fn: Callable[[str, int], float], url: str, n: int, rounds: int) -> float:
    return statistics.median(fn(url, n) for _ in range(rounds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="coordinator URL of a throwaway server or file")
    parser.add_argument("--pairs", type=int, default=2000, help="acquire+release pairs a round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median kept)")
    parser.add_argument("--handoffs", type=int, default=200, help="handoffs to time")
    parser.add_argument("--no-async", action="store_true", help="skip the async API figures")
    args = parser.parse_args(argv)
    scheme = urlsplit(args.url).scheme
    raw_module = load_raw(scheme)
    raw: Callable[[str, int], float] | None
    if scheme == "sqlite":
        raw = sqlite_raw_pairs
    elif scheme == "memory":
        raw = memory_raw_pairs
    else:
        raw = getattr(raw_module, "raw_pairs", None) if raw_module else None

    raw_rounds: list[float] = []
    ours_rounds: list[float] = []
    for _ in range(args.rounds):  # alternate, so drift hits both sides alike
        if raw is not None:
            raw_rounds.append(raw(args.url, args.pairs))
        ours_rounds.append(coordlock_pairs(args.url, args.pairs))
    ours = statistics.median(ours_rounds)
    print(f"backend           {scheme}")
    print(f"pairs per round   {args.pairs} x {args.rounds} rounds (median round shown)")
    if raw_rounds:
        raw_rate = statistics.median(raw_rounds)
        print(f"raw client        {raw_rate:10.0f} acquire+release pairs/s")
        print(f"coordlock         {ours:10.0f} acquire+release pairs/s")
        print(f"ratio             {ours / raw_rate:10.2f} x raw")
    else:
        print(f"coordlock         {ours:10.0f} acquire+release pairs/s (no raw baseline)")

    samples = coordlock_handoffs(args.url, args.handoffs)
    print(
        f"handoff coordlock median {statistics.median(samples) * 1000:7.3f} ms   "
        f"p99 {percentile(samples, 0.99) * 1000:7.3f} ms   (n={len(samples)})"
    )
    raw_handoffs = getattr(raw_module, "raw_handoffs", None) if raw_module else None
    if raw_handoffs is not None:
        for label, values in raw_handoffs(args.url, args.handoffs).items():
            print(
                f"handoff {label:<9} median {statistics.median(values) * 1000:7.3f} ms   "
                f"p99 {percentile(values, 0.99) * 1000:7.3f} ms   (n={len(values)})"
            )
    if not args.no_async:
        report_async(args, raw_module, statistics.median(samples))
    return 0


def report_async(
    args: argparse.Namespace, raw_module: ModuleType | None, sync_handoff: float
) -> None:
    """The async API's figures next to the raw async client's (same alternation as above)."""
    raw_async = getattr(raw_module, "raw_async_pairs", None) if raw_module else None
    raw_rounds: list[float] = []
    ours_rounds: list[float] = []
    for _ in range(args.rounds):
        if raw_async is not None:
            raw_rounds.append(raw_async(args.url, args.pairs))
        ours_rounds.append(coordlock_async_pairs(args.url, args.pairs))
    ours = statistics.median(ours_rounds)
    if raw_rounds:
        raw_rate = statistics.median(raw_rounds)
        print(f"raw async client  {raw_rate:10.0f} acquire+release pairs/s")
        print(f"coordlock async   {ours:10.0f} acquire+release pairs/s")
        print(f"async ratio       {ours / raw_rate:10.2f} x raw async"
              f"   {'PASS' if ours >= 0.9 * raw_rate else 'FAIL'} (goal >= 0.9x)")
    else:
        print(f"coordlock async   {ours:10.0f} acquire+release pairs/s (no raw async baseline)")
    samples = coordlock_async_handoffs(args.url, args.handoffs)
    median = statistics.median(samples)
    print(
        f"handoff async     median {median * 1000:7.3f} ms   "
        f"p99 {percentile(samples, 0.99) * 1000:7.3f} ms   (n={len(samples)})   "
        f"{'PASS' if median <= sync_handoff + 0.0002 else 'FAIL'} (goal <= sync + 0.2 ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
