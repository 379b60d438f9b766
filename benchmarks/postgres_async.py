"""The PostgreSQL async figures of ``benchmarks/postgres_raw.py`` (issue 11 goals).

* :func:`raw_async_pairs` – ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pairs/s on one
  psycopg ``AsyncConnection`` (also used by ``benchmarks/locks.py``);
* :func:`run_async` – in one event loop: coordlock ``async with lock()`` pairs/s next to the
  raw async client in rotating blocks, the release → waiter handoff of two tasks (coordlock and
  raw ``pg_advisory_lock``), and the event-loop stall test: 50 tasks lock, wait and release on
  five names while a ticker task measures how late each 1 ms tick comes (wall time), and how
  much CPU the loop thread spent in that gap (what coordlock's own code costs; the wall figure
  also contains the machine's scheduling, so a ticker alone is measured in the same run).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

import coordlock

TTL = 30.0
RAW_KEY = 0x636F6F72646C6F64


async def _aconnect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)


def _raw_loop(cur: psycopg.AsyncCursor[Any]) -> Callable[[int], Awaitable[float]]:
    async def block(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await cur.execute("SELECT pg_try_advisory_lock(%s)", (RAW_KEY,))
            row = await cur.fetchone()
            assert row is not None and row[0], "uncontended raw lock failed"
            await cur.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))
            await cur.fetchone()
        return n / (time.perf_counter() - start)

    return block


def raw_async_pairs(url: str, n: int) -> float:
    """Raw async ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pairs/s (``url``: a
    libpq URL without coordlock's own options)."""
    from postgres_raw import _raw_url  # type: ignore[import-not-found]

    async def run() -> float:
        async with await _aconnect(_raw_url(url)) as conn:
            block = _raw_loop(conn.cursor())
            await block(min(n, 200))
            return await block(n)

    return asyncio.run(run())


def _lock_loop(coordinator: Any) -> Callable[[int], Awaitable[float]]:
    async def block(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            async with coordinator.lock("bench-async", TTL):
                pass
        return n / (time.perf_counter() - start)

    return block


async def _handoffs(
    n: int,
    take: Callable[[], Awaitable[Any]],
    wait_take: Callable[[], Awaitable[Any]],
    give: Callable[[Any], Awaitable[Any]],
) -> list[float]:
    samples: list[float] = []
    for _ in range(n):
        held = await take()
        task = asyncio.create_task(wait_take())
        await asyncio.sleep(0.01)  # the waiter blocks on the server
        released = time.perf_counter()
        await give(held)
        got = await task
        samples.append(time.perf_counter() - released)
        await give(got)
    return samples


async def _stall(coordinator: Any | None, tasks: int = 50, rounds: int = 6) -> tuple[float, float]:
    """(max wall stall, max loop-thread CPU between two ticks) in seconds, with ``tasks``
    tasks locking (``coordinator``) or idle (None: the machine's own noise)."""
    stalls: list[float] = []
    cpu: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last, last_cpu = time.monotonic(), time.thread_time()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now, now_cpu = time.monotonic(), time.thread_time()
            stalls.append(now - last - 0.001)
            cpu.append(now_cpu - last_cpu)
            last, last_cpu = now, now_cpu

    async def worker(i: int) -> None:
        for _ in range(rounds):
            if coordinator is None:
                await asyncio.sleep(0.005)
                continue
            async with coordinator.lock(f"stall-{i % 5}", ttl=10, wait=60):
                await asyncio.sleep(0.001)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    done.set()
    await tick
    return max(stalls), max(cpu)


def run_async(
    url: str, raw_url: str, *, block: int, blocks: int, handoffs: int, sync_handoff_ms: float
) -> list[tuple[str, bool, str]]:
    """Print the async figures; return the goals as (text, ok, detail)."""

    async def main() -> list[tuple[str, bool, str]]:
        coordinator = await coordlock.aconnect(url)
        waiter = await coordlock.aconnect(url)
        raw = await _aconnect(raw_url)
        raw_b = await _aconnect(raw_url)
        try:
            sides = {"raw async": _raw_loop(raw.cursor()), "lock() async": _lock_loop(coordinator)}
            rates: dict[str, list[float]] = {label: [] for label in sides}
            for side in sides.values():
                await side(max(50, block // 3))
            order = list(sides)
            for i in range(blocks):
                for label in order[i % 2 :] + order[: i % 2]:
                    rates[label].append(await sides[label](block))
            pairs = zip(rates["lock() async"], rates["raw async"], strict=True)
            ratios = sorted(a / b for a, b in pairs)
            for label, values in rates.items():
                print(f"{label:<19} {statistics.median(values):8.0f} pairs/s")
            print(f"async / raw async   {statistics.median(ratios):.3f}")

            async def take_ours() -> Any:
                return await coordinator.aacquire("ahandoff", TTL, wait=10)

            async def wait_ours() -> Any:
                return await waiter.aacquire("ahandoff", TTL, wait=30)

            async def give_ours(lease: Any) -> None:
                await lease.release()

            async def take_raw() -> Any:
                await raw.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
                return raw

            async def wait_raw() -> Any:
                await raw_b.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
                return raw_b

            async def give_raw(conn: Any) -> None:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))

            await _handoffs(5, take_ours, wait_ours, give_ours)
            ours: list[float] = []
            raws: list[float] = []
            for _ in range(3):
                ours += await _handoffs(handoffs // 3, take_ours, wait_ours, give_ours)
                raws += await _handoffs(handoffs // 3, take_raw, wait_raw, give_raw)
            ours_ms = statistics.median(ours) * 1000
            raw_ms = statistics.median(raws) * 1000
            print(f"handoff async       median {ours_ms:7.3f} ms (raw async {raw_ms:7.3f} ms)")
            idle_wall, _idle_cpu = await _stall(None)
            busy_wall, busy_cpu = await _stall(coordinator)
            print(
                f"loop stall          50 tasks: max {busy_wall * 1000:.1f} ms wall, "
                f"{busy_cpu * 1000:.1f} ms loop CPU between ticks; idle ticker in the same "
                f"run: {idle_wall * 1000:.1f} ms wall"
            )
            ratio = statistics.median(ratios)
            return [
                ("async lock() >= 0.9x raw AsyncConnection", ratio >= 0.9, f"{ratio:.3f}x"),
                (
                    "async handoff <= sync handoff + 0.2 ms",
                    ours_ms <= sync_handoff_ms + 0.2,
                    f"{ours_ms:.3f} ms vs {sync_handoff_ms:.3f} + 0.2 ms",
                ),
                (
                    "event-loop stall < 20 ms (loop CPU between ticks)",
                    busy_cpu < 0.020,
                    f"{busy_cpu * 1000:.1f} ms (wall {busy_wall * 1000:.1f} ms, idle "
                    f"{idle_wall * 1000:.1f} ms)",
                ),
            ]
        finally:
            await coordinator.aclose()  # type: ignore[attr-defined]
            await waiter.aclose()  # type: ignore[attr-defined]
            await raw.close()
            await raw_b.close()

    return asyncio.run(main())
