"""ZooKeeper baselines for ``benchmarks/locks.py``, and a stand-alone ZooKeeper lock benchmark.

Functions (``benchmarks/locks.py`` uses ``raw_pairs`` and ``raw_handoffs``):

* :func:`kazoo_lock_pairs` (alias ``raw_pairs``) – acquire/release pairs per second of kazoo's
  ``Lock`` recipe (one ``Lock`` object reused, as kazoo recommends).
* :func:`seq_node_pairs` – the floor of the sequential-node design done by hand: one
  sequential ephemeral create pipelined with the children read, then a delete.
* :func:`coordlock_pairs` – the same pairs through coordlock (fencing and renewal on).
* :func:`kazoo_lock_handoffs` / :func:`coordlock_handoffs` – seconds from "holder calls
  release" to "the blocked waiter holds"; ``raw_handoffs`` returns kazoo's under ``"kazoo"``.

Run alone against a throwaway server (never a production one; everything lives under its own
chroot and is deleted afterwards)::

    python benchmarks/zookeeper_raw.py zookeeper://127.0.0.1:PORT [--pairs 2000] [--handoffs 200]

It prints kazoo Lock vs coordlock pairs/s and their ratio (the three sides run in alternating
chunks of 50 pairs on long-lived clients, so load drift hits them alike), client CPU per pair,
and hand-off median/p99 for both. Measured in one run, on the same server: only the ratios
carry over to another machine.
"""

from __future__ import annotations

import argparse
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

TTL = 30.0


def _split(url: str) -> tuple[str, str]:
    """``zookeeper://hosts/chroot`` → (hosts, chroot)."""
    parts = urlsplit(url)
    if parts.scheme != "zookeeper":
        raise SystemExit(f"not a zookeeper:// URL: {url}")
    return parts.netloc.rpartition("@")[2], parts.path.rstrip("/")


def _bench_root(url: str) -> str:
    return f"{_split(url)[1]}/bench-{uuid.uuid4().hex[:8]}"


def _client(url: str) -> KazooClient:
    client = KazooClient(hosts=_split(url)[0], timeout=10.0)
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


raw_pairs = kazoo_lock_pairs


def seq_node_pairs(url: str, n: int) -> float:
    """Pairs/s of the bare design: pipelined sequential create + children read, then delete."""
    root = _bench_root(url)
    client = _client(url)
    parent = f"{root}/seq"
    try:
        client.ensure_path(parent)

        def one() -> None:
            created = client.create_async(
                f"{parent}/x-lock-", b"30000", ephemeral=True, sequence=True, include_data=True
            )
            listed = client.get_children_async(parent)
            path, _ = created.get()
            listed.get()
            client.delete(path)

        for _ in range(min(n, 50)):
            one()
        started = time.perf_counter()
        for _ in range(n):
            one()
        elapsed = time.perf_counter() - started
    finally:
        client.stop()
        client.close()
        _cleanup(url, root)
    return n / elapsed


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
    """kazoo Lock, the bare design and coordlock, in alternating chunks of ``chunk`` pairs.

    On a busy machine the load drifts over seconds; alternating small chunks on long-lived
    clients exposes every side to the same drift, so the ratio is much steadier than separate
    runs. Also reports client CPU (all threads of this process) per pair.
    """
    root = _bench_root(url)
    client = _client(url)
    lock = client.Lock(f"{root}/kazoo-lock", "bench")
    parent = f"{root}/seq"
    client.ensure_path(parent)
    coordinator = coordlock.connect(_coordlock_url(url, f"{root}/coordlock"))

    def kazoo_lock(count: int) -> None:
        for _ in range(count):
            if not lock.acquire(blocking=False):
                raise RuntimeError("kazoo lock unexpectedly busy")
            lock.release()

    def bare(count: int) -> None:
        for _ in range(count):
            created = client.create_async(
                f"{parent}/x-lock-", b"30000", ephemeral=True, sequence=True, include_data=True
            )
            listed = client.get_children_async(parent)
            path, _ = created.get()
            listed.get()
            client.delete(path)

    def ours(count: int) -> None:
        for _ in range(count):
            lease = coordinator.acquire("bench", TTL)
            if lease is None:
                raise RuntimeError("coordlock lock unexpectedly busy")
            if not lease.release():
                raise RuntimeError("coordlock release failed")

    sides = {"kazoo": kazoo_lock, "seq": bare, "coordlock": ours}
    wall = dict.fromkeys(sides, 0.0)
    cpu = dict.fromkeys(sides, 0.0)
    chunk_ratios: list[float] = []
    try:
        for fn in sides.values():  # warm up
            fn(min(n, 50))
        done = 0
        while done < n:
            count = min(chunk, n - done)
            spent = {}
            for label, fn in sides.items():
                w, c = time.perf_counter(), time.process_time()
                fn(count)
                spent[label] = time.perf_counter() - w
                wall[label] += spent[label]
                cpu[label] += time.process_time() - c
            chunk_ratios.append(spent["kazoo"] / spent["coordlock"])
            done += count
    finally:
        coordinator.close()
        client.stop()
        client.close()
        _cleanup(url, root)
    result: dict[str, Any] = {label: n / wall[label] for label in sides}
    result.update({f"{label}_cpu_us": cpu[label] / n * 1e6 for label in sides})
    result["ratio_median_chunk"] = statistics.median(chunk_ratios)
    return result


def compare(url: str, pairs: int, handoffs: int) -> dict[str, Any]:
    """Interleaved pairs of kazoo Lock / bare design / coordlock, then hand-offs."""
    result = interleaved_pairs(url, pairs)
    result["kazoo_handoff"] = _ms(kazoo_lock_handoffs(url, handoffs))
    result["coordlock_handoff"] = _ms(coordlock_handoffs(url, handoffs))
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
        ("kazoo", "kazoo Lock recipe           "),
        ("seq", "bare seq create+children+del"),
        ("coordlock", "coordlock acquire + release "),
    ):
        print(f"{text} : {r[label]:8.0f} pairs/s   client CPU {r[label + '_cpu_us']:6.0f} us/pair")
    print(
        f"ratio coordlock / kazoo Lock : {r['coordlock'] / r['kazoo']:8.2f}  "
        f"(median over chunks {r['ratio_median_chunk']:.2f})"
    )
    for label in ("kazoo", "coordlock"):
        median, p99 = r[f"{label}_handoff"]
        print(
            f"hand-off {label:<10}          : median {median:.3f} ms, p99 {p99:.3f} ms "
            f"({args.handoffs} hand-offs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
