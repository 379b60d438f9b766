"""ZooKeeper baselines for ``benchmarks/locks.py``, and a stand-alone ZooKeeper lock benchmark.

Functions (``benchmarks/locks.py`` uses ``raw_pairs`` and ``raw_handoffs``):

* :func:`ceiling_pairs` (alias ``raw_pairs``) – the physical floor of any ZooKeeper lock: a
  bare ephemeral ``create`` + ``delete`` (two synced writes), no lock logic at all, on a kazoo
  client with the same handler as coordlock's (its cheaper ``select``), so the ratio measures
  coordlock's own work.
* :func:`kazoo_lock_pairs` – acquire/release pairs per second of kazoo's ``Lock`` recipe (one
  ``Lock`` object reused, as kazoo recommends).
* :func:`coordlock_pairs` – the same pairs through coordlock (fencing and renewal on).
* :func:`kazoo_lock_handoffs` / :func:`coordlock_handoffs` – seconds from "holder calls
  release" to "the blocked waiter holds"; ``raw_handoffs`` returns kazoo's under ``"kazoo"``.

Run alone against a throwaway server (never a production one; everything lives under its own
chroot and is deleted afterwards)::

    python benchmarks/zookeeper_raw.py zookeeper://127.0.0.1:PORT [--pairs 2000] [--handoffs 200]

It prints pairs/s of the ceiling, kazoo's Lock, coordlock ``acquire``+``release`` and
``with coordinator.lock(...)`` (the four sides run in alternating chunks of 50 pairs on
long-lived clients, so load drift hits them alike), client CPU per pair, hand-off median/p99
of kazoo and coordlock, and the issue-16 goals as PASS/FAIL: ``lock()`` >= 0.9x the ceiling,
coordlock's hand-off median <= kazoo's. Then the async mode: ``async with coordinator.lock()``
against the raw async ceiling (kazoo's ``create_async``/``delete_async`` awaited through
asyncio futures, as kazoo has no asyncio client), alternating chunks, and the async hand-off
median (goals: >= 0.9x, and <= the sync hand-off + 0.2 ms). Measured in one run, on the same
server: only the ratios carry over to another machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kazoo.client import KazooClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timed_pairs

from coordlock.backends.zookeeper._handler import PollingHandler

TTL = 30.0


def _split(url: str) -> tuple[str, str]:
    """``zookeeper://hosts/chroot`` → (hosts, chroot)."""
    parts = urlsplit(url)
    if parts.scheme != "zookeeper":
        raise SystemExit(f"not a zookeeper:// URL: {url}")
    return parts.netloc.rpartition("@")[2], parts.path.rstrip("/")


def _bench_root(url: str) -> str:
    return f"{_split(url)[1]}/bench-{uuid.uuid4().hex[:8]}"


def _client(url: str, *, polling: bool = False) -> KazooClient:
    """A started kazoo client; ``polling``: with the kazoo handler coordlock itself uses
    (:class:`~coordlock.backends.zookeeper._handler.PollingHandler`), for the ceiling, so
    the ratio against it measures coordlock's own work, not a faster handler. kazoo's
    ``Lock`` runs on kazoo's own handler, as its users run it."""
    handler = PollingHandler() if polling else None
    client = KazooClient(hosts=_split(url)[0], timeout=10.0, handler=handler)
    client.start(timeout=30)
    return client


def _coordlock_url(url: str, root: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=root))


def _cleanup(url: str, root: str) -> None:
    client = _client(url)
    try:
        client.delete(root, recursive=True)
    except Exception:  # best effort
        pass
    finally:
        client.stop()
        client.close()


def kazoo_lock_pairs(url: str, n: int) -> float:
    """Pairs/s of kazoo's ``Lock`` recipe: ``acquire()`` + ``release()``, uncontended."""
    root = _bench_root(url)
    client = _client(url)
    try:
        lock = client.Lock(f"{root}/kazoo-lock", "bench")
        for _ in range(min(n, 50)):  # warm up (path creation, JIT of the server)
            lock.acquire()
            lock.release()
        started = time.perf_counter()
        for _ in range(n):
            if not lock.acquire(blocking=False):
                raise RuntimeError("kazoo lock unexpectedly busy")
            lock.release()
        elapsed = time.perf_counter() - started
    finally:
        client.stop()
        client.close()
        _cleanup(url, root)
    return n / elapsed


def _ceiling_once(client: KazooClient, path: str) -> None:
    """One bare pair: ephemeral create, then delete (each waits for its synced write)."""
    client.create(path, b"30000", ephemeral=True)
    client.delete(path)


def ceiling_pairs(url: str, n: int) -> float:
    """Pairs/s of the bare ephemeral create + delete: the ceiling of any ZooKeeper lock."""
    root = _bench_root(url)
    client = _client(url, polling=True)
    path = f"{root}/ceiling"
    try:
        client.ensure_path(root)
        for _ in range(min(n, 50)):
            _ceiling_once(client, path)
        started = time.perf_counter()
        for _ in range(n):
            _ceiling_once(client, path)
        elapsed = time.perf_counter() - started
    finally:
        client.stop()
        client.close()
        _cleanup(url, root)
    return n / elapsed


raw_pairs = ceiling_pairs


def coordlock_pairs(url: str, n: int) -> float:
    """Pairs/s of ``coordinator.acquire(name, 30)`` + ``lease.release()`` (renewal on)."""
    root = _bench_root(url)
    coordinator = coordlock.connect(_coordlock_url(url, root))
    try:
        return timed_pairs(coordinator, n, warmup=50, ttl=TTL)
    finally:
        coordinator.close()
        _cleanup(url, root)


def _handoff(
    rounds: int,
    take: Callable[[], Any],
    take_waiting: Callable[[], Any],
    give: Callable[[Any], Any],
) -> list[float]:
    """Seconds from "holder calls release" to "the blocked waiter holds", ``rounds`` times.

    The holder and the waiter are two threads with their own clients. Each round the holder
    takes the lock, lets the waiter start a blocking acquire, waits 10 ms so it is really
    queued, then releases.
    """
    samples: list[float] = []
    go = threading.Event()
    ready = threading.Event()
    got = threading.Event()
    stamp = [0.0]
    failures: list[BaseException] = []

    def waiter() -> None:
        try:
            for _ in range(rounds):
                if not go.wait(30):
                    raise RuntimeError("holder never took the lock")
                go.clear()
                ready.set()
                held = take_waiting()
                taken = time.perf_counter()
                if held is None:
                    raise RuntimeError("waiter did not get the lock")
                samples.append(taken - stamp[0])
                give(held)
                got.set()
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
            ready.set()
            got.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    for _ in range(rounds):
        holder = take()
        if holder is None:
            raise RuntimeError("holder did not get the lock")
        go.set()
        if not ready.wait(30) or failures:
            raise RuntimeError(f"waiter never got ready: {failures}")
        ready.clear()
        time.sleep(0.01)
        stamp[0] = time.perf_counter()
        give(holder)
        if not got.wait(30) or failures:
            raise RuntimeError(f"hand-off failed: {failures}")
        got.clear()
    thread.join(30)
    return samples


def kazoo_lock_handoffs(url: str, rounds: int) -> list[float]:
    """Hand-off samples (seconds) of kazoo's ``Lock``: two clients, one lock path."""
    root = _bench_root(url)
    holder_client, waiter_client = _client(url), _client(url)
    path = f"{root}/kazoo-handoff"
    holder_lock = holder_client.Lock(path, "holder")
    waiter_lock = waiter_client.Lock(path, "waiter")

    def take() -> Any:
        return holder_lock if holder_lock.acquire(timeout=20) else None

    def take_waiting() -> Any:
        return waiter_lock if waiter_lock.acquire(timeout=20) else None

    try:
        return _handoff(rounds, take, take_waiting, lambda lock: lock.release())
    finally:
        for client in (holder_client, waiter_client):
            client.stop()
            client.close()
        _cleanup(url, root)


def coordlock_handoffs(url: str, rounds: int) -> list[float]:
    """Hand-off samples (seconds) of coordlock: ``acquire(wait=…)`` woken by the release."""
    root = _bench_root(url)
    holder = coordlock.connect(_coordlock_url(url, root))
    waiter = coordlock.connect(_coordlock_url(url, root))
    try:
        return _handoff(
            rounds,
            lambda: holder.acquire("handoff", TTL, wait=20),
            lambda: waiter.acquire("handoff", TTL, wait=20),
            lambda lease: lease.release(),
        )
    finally:
        holder.close()
        waiter.close()
        _cleanup(url, root)


def raw_handoffs(url: str, rounds: int) -> dict[str, list[float]]:
    """For ``benchmarks/locks.py``: kazoo ``Lock`` hand-off samples, labelled."""
    return {"kazoo": kazoo_lock_handoffs(url, rounds)}


def _ms(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


def interleaved_pairs(url: str, n: int, chunk: int = 50) -> dict[str, Any]:
    """The ceiling, kazoo's Lock, coordlock ``acquire``+``release`` and coordlock ``lock()``,
    in alternating chunks of ``chunk`` pairs.

    On a busy machine the load drifts over seconds; alternating small chunks on long-lived
    clients exposes every side to the same drift, so the ratios are much steadier than separate
    runs. Also reports client CPU (all threads of this process) per pair.
    """
    root = _bench_root(url)
    client = _client(url)
    lock = client.Lock(f"{root}/kazoo-lock", "bench")
    ceiling_client = _client(url, polling=True)
    ceiling_path = f"{root}/ceiling"
    client.ensure_path(root)
    coordinator = coordlock.connect(_coordlock_url(url, f"{root}/coordlock"))

    def ceiling(count: int) -> None:
        for _ in range(count):
            _ceiling_once(ceiling_client, ceiling_path)

    def kazoo_lock(count: int) -> None:
        for _ in range(count):
            if not lock.acquire(blocking=False):
                raise RuntimeError("kazoo lock unexpectedly busy")
            lock.release()

    def acquire(count: int) -> None:
        for _ in range(count):
            lease = coordinator.acquire("bench", TTL)
            if lease is None:
                raise RuntimeError("coordlock lock unexpectedly busy")
            if not lease.release():
                raise RuntimeError("coordlock release failed")

    def lock_cm(count: int) -> None:
        for _ in range(count):
            with coordinator.lock("bench-cm", TTL):
                pass

    sides = {"ceiling": ceiling, "kazoo": kazoo_lock, "acquire": acquire, "lock": lock_cm}
    wall = dict.fromkeys(sides, 0.0)
    cpu = dict.fromkeys(sides, 0.0)
    chunk_ratios: list[float] = []
    try:
        for fn in sides.values():  # warm up
            fn(min(n, 50))
        done = 0
        order = list(sides)
        while done < n:
            count = min(chunk, n - done)
            spent = {}
            turn = (done // chunk) % len(order)  # rotate the order: drift hits every side alike
            for label in order[turn:] + order[:turn]:
                fn = sides[label]
                w, c = time.perf_counter(), time.process_time()
                fn(count)
                spent[label] = time.perf_counter() - w
                wall[label] += spent[label]
                cpu[label] += time.process_time() - c
            chunk_ratios.append(spent["ceiling"] / spent["lock"])
            done += count
    finally:
        coordinator.close()
        for kazoo_client in (client, ceiling_client):
            kazoo_client.stop()
            kazoo_client.close()
        _cleanup(url, root)
    result: dict[str, Any] = {label: n / wall[label] for label in sides}
    result.update({f"{label}_cpu_us": cpu[label] / n * 1e6 for label in sides})
    result["lock_ratio_median_chunk"] = statistics.median(chunk_ratios)
    return result


async def _awaited(result: Any) -> Any:
    """Await a kazoo async result from asyncio (completed from kazoo's thread)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle() -> None:
        if future.done():
            return
        if result.successful():
            future.set_result(result.value)
        else:
            future.set_exception(result.exception)

    result.rawlink(lambda _result: loop.call_soon_threadsafe(settle))
    return await future


async def _async_pairs(url: str, n: int, chunk: int = 50) -> dict[str, float]:
    """Async ceiling vs ``async with coordinator.lock()``, alternating chunks (pairs/s)."""
    root = _bench_root(url)
    client = _client(url, polling=True)
    client.ensure_path(root)
    path = f"{root}/async-ceiling"
    coordinator = coordlock.connect(_coordlock_url(url, f"{root}/coordlock"))

    async def ceiling(count: int) -> None:
        for _ in range(count):
            await _awaited(client.create_async(path, b"30000", ephemeral=True))
            await _awaited(client.delete_async(path))

    async def lock_cm(count: int) -> None:
        for _ in range(count):
            async with coordinator.lock("bench-async", TTL):
                pass

    sides = {"async_ceiling": ceiling, "async_lock": lock_cm}
    wall = dict.fromkeys(sides, 0.0)
    try:
        for fn in sides.values():
            await fn(min(n, 50))
        done = 0
        while done < n:
            count = min(chunk, n - done)
            for label, fn in sides.items():
                began = time.perf_counter()
                await fn(count)
                wall[label] += time.perf_counter() - began
            done += count
    finally:
        await coordinator.aclose()
        client.stop()
        client.close()
        _cleanup(url, root)
    return {label: n / wall[label] for label in sides}


async def _async_handoffs(url: str, rounds: int) -> list[float]:
    """Seconds from "holder task calls release" to "the waiting task holds", one loop."""
    root = _bench_root(url)
    holder = coordlock.connect(_coordlock_url(url, root))
    waiter = coordlock.connect(_coordlock_url(url, root))
    samples: list[float] = []
    try:
        for _ in range(rounds):
            lease = await holder.aacquire("handoff", TTL, wait=20)
            if lease is None:
                raise RuntimeError("holder did not get the lock")
            waiting = asyncio.ensure_future(waiter.aacquire("handoff", TTL, wait=20))
            await asyncio.sleep(0.01)  # really queued behind the holder
            released = time.perf_counter()
            await lease.release()
            got = await waiting
            samples.append(time.perf_counter() - released)
            if got is None:
                raise RuntimeError("waiter did not get the lock")
            await got.release()
    finally:
        await holder.aclose()
        await waiter.aclose()
        _cleanup(url, root)
    return samples


def compare(url: str, pairs: int, handoffs: int) -> dict[str, Any]:
    """Interleaved pairs of every side, then hand-offs (kazoo and coordlock alternating in
    halves, so drift hits both)."""
    result = interleaved_pairs(url, pairs)
    half = max(1, handoffs // 2)
    kazoo = kazoo_lock_handoffs(url, half)
    ours = coordlock_handoffs(url, half)
    kazoo += kazoo_lock_handoffs(url, handoffs - half)
    ours += coordlock_handoffs(url, handoffs - half)
    result["kazoo_handoff"] = _ms(kazoo)
    result["coordlock_handoff"] = _ms(ours)
    result.update(asyncio.run(_async_pairs(url, max(pairs // 2, 50))))
    result["async_handoff"] = _ms(asyncio.run(_async_handoffs(url, max(handoffs // 2, 10))))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="zookeeper://127.0.0.1:PORT of a throwaway server")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per side")
    parser.add_argument("--handoffs", type=int, default=200, help="hand-offs to time")
    args = parser.parse_args(argv)
    import kazoo

    r = compare(args.url, args.pairs, args.handoffs)
    print(f"kazoo {kazoo.version.__version__}; {args.pairs} pairs per side, alternating chunks")
    for label, text in (
        ("ceiling", "ceiling: ephemeral create+delete"),
        ("kazoo", "kazoo Lock recipe               "),
        ("acquire", "coordlock acquire + release     "),
        ("lock", "coordlock with lock()           "),
    ):
        print(
            f"{text} : {r[label]:8.0f} pairs/s  {r[label] / r['ceiling']:5.2f}x ceiling  "
            f"client CPU {r[label + '_cpu_us']:5.0f} us/pair"
        )
    for label in ("kazoo", "coordlock"):
        median, p99 = r[f"{label}_handoff"]
        print(
            f"hand-off {label:<9}: median {median:.3f} ms, p99 {p99:.3f} ms "
            f"({args.handoffs} hand-offs)"
        )
    print(
        f"async ceiling (kazoo async API): {r['async_ceiling']:8.0f} pairs/s\n"
        f"async with coordinator.lock()  : {r['async_lock']:8.0f} pairs/s  "
        f"{r['async_lock'] / r['async_ceiling']:5.2f}x async ceiling"
    )
    median, p99 = r["async_handoff"]
    print(f"hand-off async    : median {median:.3f} ms, p99 {p99:.3f} ms")
    lock_ratio = r["lock"] / r["ceiling"]
    async_ratio = r["async_lock"] / r["async_ceiling"]
    goals = [
        (
            f"lock() >= 0.90x ceiling (median chunk {r['lock_ratio_median_chunk']:.2f}x)",
            lock_ratio >= 0.9,
            f"{lock_ratio:.2f}x",
        ),
        (
            "hand-off median <= kazoo Lock's",
            r["coordlock_handoff"][0] <= r["kazoo_handoff"][0],
            f"{r['coordlock_handoff'][0]:.3f} vs {r['kazoo_handoff'][0]:.3f} ms",
        ),
        ("async lock() >= 0.90x async ceiling", async_ratio >= 0.9, f"{async_ratio:.2f}x"),
        (
            "async hand-off median <= sync + 0.2 ms",
            r["async_handoff"][0] <= r["coordlock_handoff"][0] + 0.2,
            f"{r['async_handoff'][0]:.3f} vs {r['coordlock_handoff'][0]:.3f} ms",
        ),
    ]
    for text, ok, figure in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {text}: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
