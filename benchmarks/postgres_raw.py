"""PostgreSQL baselines for ``benchmarks/locks.py``, and a stand-alone PostgreSQL lock benchmark.

Functions (used by ``benchmarks/locks.py``):

* :func:`raw_pairs` – ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pairs per second on one
  autocommit psycopg connection: the floor any advisory-lock library pays.
* :func:`raw_handoffs` – release → waiter-holds latency by hand (``pg_advisory_lock`` blocked
  on a second connection), and tooz's PostgreSQL driver when tooz is installed.
* :func:`coordlock_pairs` / :func:`coordlock_handoffs` – the same through coordlock (fencing,
  renewal and the session keeper on).

Run alone against a throwaway server (never a production one: it creates a schema of its own
and drops it afterwards); without a URL it starts a throwaway PostgreSQL with fsync ON::

    python benchmarks/postgres_raw.py postgresql://postgres@127.0.0.1:PORT/postgres
        [--pairs 3000] [--rounds 5] [--handoffs 300]

It prints raw vs coordlock pairs/s and their ratio, and handoff median/p99. Short blocks of
raw and coordlock pairs alternate on one open connection and one open coordinator, and the
median of the per-block ratios is reported, because loopback numbers on a shared machine drift;
only ratios measured in one run mean anything.
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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile, timed_pairs

from coordlock.backends.postgres import URL_OPTIONS

TTL = 30.0
RAW_KEY = 0x636F6F72646C6F63  # any key; a raw benchmark needs no hashing


def _raw_url(url: str) -> str:
    """``url`` without coordlock-only query options (for psycopg)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in URL_OPTIONS]
    return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))


def _bench_url(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    query.append(("schema", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


def raw_pairs(url: str, n: int) -> float:
    """Raw ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pairs/s on one autocommit
    connection (psycopg 3, statements prepared as coordlock's are)."""
    with psycopg.connect(_raw_url(url), autocommit=True, prepare_threshold=0) as conn:
        for _ in range(min(n, 200)):  # warm up: prepare, fill caches
            conn.execute("SELECT pg_try_advisory_lock(%s)", (RAW_KEY,)).fetchone()
            conn.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,)).fetchone()
        start = time.perf_counter()
        for _ in range(n):
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (RAW_KEY,)).fetchone()
            assert row is not None and row[0], "uncontended raw lock failed"
            conn.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,)).fetchone()
        return n / (time.perf_counter() - start)


def coordlock_pairs(url: str, n: int) -> float:
    """coordlock acquire + release pairs/s (fencing on, renewal on)."""
    coordinator = coordlock.connect(url)
    try:
        return timed_pairs(coordinator, n, ttl=TTL)
    finally:
        coordinator.close()


def _handoffs(
    n: int,
    take: Callable[[], Any],
    wait_take: Callable[[], Any],
    give: Callable[[Any], None],
) -> list[float]:
    """Seconds from just before the holder's release to just after the blocked waiter holds."""
    samples: list[float] = []
    for _ in range(n):
        held = take()
        box: dict[str, Any] = {}
        got = threading.Event()

        def waiter(box: dict[str, Any] = box, got: threading.Event = got) -> None:
            box["lease"] = wait_take()
            box["t"] = time.perf_counter()
            got.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.01)  # let the waiter block on the server
        released = time.perf_counter()
        give(held)
        if not got.wait(30):
            raise RuntimeError("the waiter never got the lock")
        thread.join()
        samples.append(box["t"] - released)
        give(box["lease"])
    return samples


def coordlock_handoffs(url: str, n: int) -> list[float]:
    """Release → waiter-holds latency through coordlock (two coordinators)."""
    holder = coordlock.connect(url)
    waiter = coordlock.connect(url)
    try:

        def take() -> Any:
            return holder.acquire("handoff", TTL, wait=10)

        def wait_take() -> Any:
            return waiter.acquire("handoff", TTL, wait=30)

        def give(lease: Any) -> None:
            lease.release()

        _handoffs(min(n, 20), take, wait_take, give)  # warm up the spare connections
        return _handoffs(n, take, wait_take, give)
    finally:
        holder.close()
        waiter.close()


def raw_handoffs(url: str, n: int) -> dict[str, list[float]]:
    """Release → waiter-holds latency: by hand with psycopg, and tooz's driver if installed."""
    out: dict[str, list[float]] = {}
    raw = _raw_url(url)
    with (
        psycopg.connect(raw, autocommit=True, prepare_threshold=0) as a,
        psycopg.connect(raw, autocommit=True, prepare_threshold=0) as b,
    ):
        conns = {"a": a, "b": b}

        def take() -> Any:
            a.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
            return "a"

        def wait_take() -> Any:
            b.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
            return "b"

        def give(which: Any) -> None:
            conns[which].execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))

        out["raw"] = _handoffs(n, take, wait_take, give)
    tooz = _tooz(url)
    if tooz is not None:
        first, second = tooz
        try:
            lock_a = first.get_lock(b"coordlock-bench-handoff")
            lock_b = second.get_lock(b"coordlock-bench-handoff")

            def tz_take() -> Any:
                lock_a.acquire(blocking=True)
                return lock_a

            def tz_wait() -> Any:
                lock_b.acquire(blocking=True)
                return lock_b

            def tz_give(lock: Any) -> None:
                lock.release()

            out["tooz"] = _handoffs(n, tz_take, tz_wait, tz_give)
        finally:
            first.stop()
            second.stop()
    return out


def _tooz(url: str) -> tuple[Any, Any] | None:
    """Two started tooz PostgreSQL coordinators, or None when tooz is not installed."""
    try:
        from tooz import coordination  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    raw = _raw_url(url)
    members = []
    for i in range(2):
        member = coordination.get_coordinator(raw, f"bench-{i}-{uuid.uuid4().hex[:6]}".encode())
        member.start()
        members.append(member)
    return members[0], members[1]


def tooz_pairs(url: str, n: int) -> float | None:
    """tooz's PostgreSQL driver: non-blocking acquire + release pairs/s (None without tooz)."""
    tooz = _tooz(url)
    if tooz is None:
        return None
    first, second = tooz
    try:
        lock = first.get_lock(b"coordlock-bench")
        start = time.perf_counter()
        for _ in range(n):
            assert lock.acquire(blocking=False)
            lock.release()
        return n / (time.perf_counter() - start)
    finally:
        first.stop()
        second.stop()




def _ms(samples: list[float]) -> str:
    return (
        f"median {statistics.median(samples) * 1000:7.3f} ms   "
        f"p99 {percentile(samples, 0.99) * 1000:7.3f} ms   (n={len(samples)})"
    )


def interleaved(url: str, block: int, blocks: int) -> tuple[list[float], list[float]]:
    """Raw and coordlock pairs/s over ``blocks`` alternating blocks of ``block`` pairs each,
    on one open connection and one open coordinator (so load drift hits both alike)."""
    raw_rates: list[float] = []
    ours_rates: list[float] = []
    coordinator = coordlock.connect(url)
    try:
        with psycopg.connect(_raw_url(url), autocommit=True, prepare_threshold=0) as conn:
            cur = conn.cursor()

            def raw_block() -> float:
                start = time.perf_counter()
                for _ in range(block):
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (RAW_KEY,))
                    row = cur.fetchone()
                    assert row is not None and row[0], "uncontended raw lock failed"
                    cur.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))
                    cur.fetchone()
                return block / (time.perf_counter() - start)

            def ours_block() -> float:
                start = time.perf_counter()
                for _ in range(block):
                    lease = coordinator.acquire("bench", TTL)
                    assert lease is not None, "uncontended acquire failed"
                    lease.release()
                return block / (time.perf_counter() - start)

            raw_block()  # warm up both
            ours_block()
            for i in range(blocks):
                if i % 2:
                    ours_rates.append(ours_block())
                    raw_rates.append(raw_block())
                else:
                    raw_rates.append(raw_block())
                    ours_rates.append(ours_block())
    finally:
        coordinator.close()
    return raw_rates, ours_rates


def run(url: str, pairs: int, rounds: int, handoffs: int) -> None:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    bench = _bench_url(url, schema)
    try:
        with psycopg.connect(_raw_url(url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), current_setting('fsync'),"
                " current_setting('synchronous_commit')"
            ).fetchone()
        assert row is not None
        block = max(50, pairs // rounds)
        raw_rates, ours_rates = interleaved(bench, block, rounds * 2)
        ratios = sorted(o / r for o, r in zip(ours_rates, raw_rates, strict=True))
        raw_rate = statistics.median(raw_rates)
        ours = statistics.median(ours_rates)
        print(f"server            PostgreSQL {row[0]}, fsync={row[1]}, synchronous_commit={row[2]}")
        print(f"pairs             {len(raw_rates)} alternating blocks of {block} pairs per side")
        print(f"raw psycopg       {raw_rate:10.0f} pg_try_advisory_lock+pg_advisory_unlock pairs/s")
        print(f"coordlock         {ours:10.0f} acquire+release pairs/s (fenced, renewed)")
        print(
            f"ratio             {statistics.median(ratios):10.2f} x raw (median of block ratios;"
            f" quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f})"
        )
        fast = _bench_url(bench, schema) + "&takeover=session"
        raw_s, ours_s = interleaved(fast, block, rounds * 2)
        ratios_s = sorted(o / r for o, r in zip(ours_s, raw_s, strict=True))
        print(
            f"coordlock session {statistics.median(ours_s):10.0f} pairs/s with takeover=session"
            f" (no lease row): {statistics.median(ratios_s):.2f} x raw"
        )
        tz = tooz_pairs(bench, pairs)
        if tz is not None:
            print(f"tooz postgresql   {tz:10.0f} pairs/s ({tz / raw_rate:.2f} x raw)")
        else:
            print("tooz postgresql   (tooz not installed: skipped)")
        print(f"handoff coordlock {_ms(coordlock_handoffs(bench, handoffs))}")
        print(f"handoff session   {_ms(coordlock_handoffs(fast, handoffs))}")
        for label, values in raw_handoffs(bench, handoffs).items():
            print(f"handoff {label:<9} {_ms(values)}")
    finally:
        with psycopg.connect(_raw_url(url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "url", nargs="?", help="postgresql:// URL of a throwaway server (default: start one)"
    )
    parser.add_argument("--pairs", type=int, default=3000, help="pairs per side, in blocks")
    parser.add_argument("--rounds", type=int, default=15, help="blocks per side (alternating)")
    parser.add_argument("--handoffs", type=int, default=300, help="handoffs to time")
    args = parser.parse_args(argv)
    if args.url:
        run(args.url, args.pairs, args.rounds, args.handoffs)
        return 0
    from coordlock.testing.servers import PostgresServer

    server = PostgresServer(fast=False)  # fsync ON: the real cost of every WAL flush
    server.start()
    try:
        print(f"started a throwaway PostgreSQL at {server.url} (fsync on)")
        run(server.url, args.pairs, args.rounds, args.handoffs)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
