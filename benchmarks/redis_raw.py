"""Redis baselines for ``benchmarks/locks.py``, and the Redis lock benchmark with its goals.

Functions (used by ``benchmarks/locks.py``):

* :func:`raw_pairs` – acquire/release pairs per second done by hand with the raw client:
  a fresh token, ``SET key token NX PX 30000``, then a Lua compare-and-delete (``EVALSHA``).
* :func:`raw_handoffs` – hand-off samples of python-redis-lock (``SET NX`` + ``BLPOP``
  signal list), the waiter in another process.

Stand-alone (what ``benchmarks/all.py`` runs for Redis), against a throwaway server (never a
production one; keys use their own prefix and are deleted afterwards)::

    python benchmarks/redis_raw.py redis://127.0.0.1:PORT [--pairs 8000] [--handoffs 200]

prints, all measured in one run on the same server, in alternating chunks so that the load
drift of a busy machine hits both sides alike:

* sync pairs/s: raw (``SET NX PX`` + Lua release, redis-py) vs coordlock ``acquire`` +
  ``release`` (fencing and renewal on);
* async pairs/s: raw ``redis.asyncio`` (the same two commands) vs ``await aacquire`` +
  ``await release()``;
* hand-off (holder calls release → a waiter blocked in another process holds the lock),
  median and p99: coordlock sync, coordlock async (waiter on an event loop) and
  python-redis-lock, released once the server reports the waiter blocked;
* the goals of issues 11 and 16 as PASS/FAIL lines against those same-run references.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio

import coordlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile

RAW_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: coordlock's own URL options, which redis-py does not understand.
_COORDLOCK_OPTIONS = {"prefix", "retry_deadline", "history_limit", "legacy_fences"}
TTL = 30.0
CHUNK = 250


def _bench_prefix() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}:"


def _raw_url(url: str) -> str:
    """``url`` without coordlock-only query options (for redis-py)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _COORDLOCK_OPTIONS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _coordlock_url(url: str, prefix: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "prefix"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("prefix", prefix)])))


def _cleanup(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(_raw_url(url))
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


# -- pairs/s -----------------------------------------------------------------------------------


def raw_pairs(url: str, n: int) -> float:
    """Pairs/s of a hand-written lock: fresh token + ``SET NX PX`` + Lua compare-and-delete."""
    result = interleaved_pairs(url, n, coordlock_too=False)
    return result["raw_pairs_per_s"]


def interleaved_pairs(url: str, n: int, *, coordlock_too: bool = True) -> dict[str, float]:
    """Raw and coordlock pairs/s (sync), measured in alternating chunks of :data:`CHUNK`."""
    prefix = _bench_prefix()
    client = redis.Redis.from_url(_raw_url(url))
    release = client.register_script(RAW_RELEASE)
    coordinator = coordlock.connect(_coordlock_url(url, prefix))
    key, ttl_ms = prefix + "raw", int(TTL * 1000)

    def raw(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            token = uuid.uuid4().hex
            if not client.set(key, token, nx=True, px=ttl_ms):
                raise RuntimeError("raw lock unexpectedly busy")
            if not release(keys=[key], args=[token]):
                raise RuntimeError("raw release failed")
        return time.perf_counter() - started

    def ours(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            lease = coordinator.acquire("bench", TTL)
            if lease is None or not lease.release():
                raise RuntimeError("coordlock pair failed")
        return time.perf_counter() - started

    try:
        return _alternate(raw, ours if coordlock_too else None, n)
    finally:
        coordinator.close()
        client.close()
        _cleanup(url, prefix)


def _alternate(
    raw: Callable[[int], float], ours: Callable[[int], float] | None, n: int
) -> dict[str, float]:
    raw(min(n, 200))  # warm-up: connections, script cache
    if ours is None:
        return {"raw_pairs_per_s": n / sum(raw(count) for count in _chunks(n))}
    ours(min(n, 200))
    raw_times: list[float] = []
    ours_times: list[float] = []
    for i, count in enumerate(_chunks(n)):
        if i % 2:  # alternate which side goes first, so drift hits both alike
            ours_times.append(ours(count))
            raw_times.append(raw(count))
        else:
            raw_times.append(raw(count))
            ours_times.append(ours(count))
    return _paired(n, raw_times, ours_times)


def _chunks(n: int) -> list[int]:
    return [min(CHUNK, n - done) for done in range(0, n, CHUNK)]


def _paired(n: int, raw_times: list[float], ours_times: list[float]) -> dict[str, float]:
    """Pairs/s of both sides, and their ratio: the median of the per-chunk ratios (robust to
    a hiccup of the shared machine landing in one side's chunk), and the ratio of the totals."""
    raw_time, ours_time = sum(raw_times), sum(ours_times)
    return {
        "raw_pairs_per_s": n / raw_time,
        "coordlock_pairs_per_s": n / ours_time,
        "ratio": statistics.median(r / o for r, o in zip(raw_times, ours_times, strict=True)),
        "ratio_of_totals": raw_time / ours_time,
    }


def interleaved_async_pairs(url: str, n: int) -> dict[str, float]:
    """Raw ``redis.asyncio`` (``SET NX PX`` + Lua release) and coordlock's async API
    (``await aacquire`` + ``await release()``), in alternating chunks on one event loop."""

    async def main() -> dict[str, float]:
        prefix = _bench_prefix()
        client = redis.asyncio.Redis.from_url(_raw_url(url))
        release = client.register_script(RAW_RELEASE)
        coordinator = coordlock.connect(_coordlock_url(url, prefix))
        key, ttl_ms = prefix + "raw", int(TTL * 1000)

        async def raw(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                token = uuid.uuid4().hex
                if not await client.set(key, token, nx=True, px=ttl_ms):
                    raise RuntimeError("raw lock unexpectedly busy")
                if not await release(keys=[key], args=[token]):
                    raise RuntimeError("raw release failed")
            return time.perf_counter() - started

        async def ours(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                lease = await coordinator.aacquire("bench", TTL)
                if lease is None or not await lease.release():
                    raise RuntimeError("coordlock pair failed")
            return time.perf_counter() - started

        try:
            await raw(min(n, 200))
            await ours(min(n, 200))
            raw_times: list[float] = []
            ours_times: list[float] = []
            for i, count in enumerate(_chunks(n)):
                if i % 2:  # alternate which side goes first
                    ours_times.append(await ours(count))
                    raw_times.append(await raw(count))
                else:
                    raw_times.append(await raw(count))
                    ours_times.append(await ours(count))
        finally:
            await coordinator.aclose()
            await client.aclose()
        _cleanup(url, prefix)
        return _paired(n, raw_times, ours_times)

    return asyncio.run(main())


# -- hand-offs ---------------------------------------------------------------------------------

LockOps = tuple[Callable[[], Any], Callable[[], Any], Callable[[Any], Any], Callable[[], None]]


def _lock_ops(kind: str, url: str, prefix: str) -> LockOps:
    """(take, take_waiting, give, close) for ``kind`` "coordlock" or "python-redis-lock"."""
    if kind == "python-redis-lock":
        import redis_lock  # python-redis-lock: SET NX EX, BLPOP on a signal list

        client = redis.Redis.from_url(_raw_url(url))
        name = prefix + "prl-handoff"

        def prl(blocking: bool) -> Any:
            lock = redis_lock.Lock(client, name, expire=int(TTL))
            taken = lock.acquire(blocking=True, timeout=20) if blocking else lock.acquire(False)
            return lock if taken else None

        return lambda: prl(False), lambda: prl(True), lambda lock: lock.release(), client.close
    coordinator = coordlock.connect(_coordlock_url(url, prefix))
    return (
        lambda: coordinator.acquire("handoff", TTL),
        lambda: coordinator.acquire("handoff", TTL, wait=20),
        lambda lease: lease.release(),
        coordinator.close,
    )


def _handoff_child(kind: str, url: str, prefix: str, rounds: int) -> None:
    """The waiter process: per round, wait for "go", block in acquire, print when it holds."""
    if kind == "coordlock-async":
        asyncio.run(_async_handoff_child(url, prefix, rounds))
        return
    _, take_waiting, give, close = _lock_ops(kind, url, prefix)
    try:
        for _ in range(rounds):
            if not sys.stdin.readline():
                return
            print("ready", flush=True)
            held = take_waiting()
            taken = time.perf_counter()
            if held is None:
                print("failed", flush=True)
                return
            give(held)
            print(repr(taken), flush=True)
    finally:
        close()


async def _async_handoff_child(url: str, prefix: str, rounds: int) -> None:
    """The async waiter: ``await aacquire(wait=…)`` on an event loop."""
    loop = asyncio.get_running_loop()
    coordinator = coordlock.connect(_coordlock_url(url, prefix))
    try:
        for _ in range(rounds):
            if not await loop.run_in_executor(None, sys.stdin.readline):
                return
            print("ready", flush=True)
            held = await coordinator.aacquire("handoff", TTL, wait=20)
            taken = time.perf_counter()
            if held is None:
                print("failed", flush=True)
                return
            await held.release()
            print(repr(taken), flush=True)
    finally:
        await coordinator.aclose()


def _wait_blocked(probe: redis.Redis, limit: float = 5.0) -> None:
    """Wait until the server reports a client blocked (our waiter in BLPOP)."""
    stop = time.monotonic() + limit
    while int(probe.info("clients").get("blocked_clients", 0)) < 1:
        if time.monotonic() > stop:
            raise RuntimeError("the waiter never blocked")
        time.sleep(0.0005)


class _HandoffRig:
    """A holder (this process) and a waiter process for ``kind``; :meth:`run` times hand-offs.

    Each round the holder takes the lock and lets the waiter start a blocking acquire; it
    releases once the server reports the waiter blocked in BLPOP, and the waiter reports when
    it holds the lock (``time.perf_counter`` is the system-wide monotonic clock on Linux).
    """

    def __init__(self, kind: str, url: str, rounds: int) -> None:
        self.url = url
        self.prefix = _bench_prefix()
        holder_kind = "coordlock" if kind == "coordlock-async" else kind
        self.take, _, self.give, self._close = _lock_ops(holder_kind, url, self.prefix)
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--handoff-child", kind, url, self.prefix, str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.probe = redis.Redis.from_url(_raw_url(url))

    def run(self, rounds: int) -> list[float]:
        child = self.child
        assert child.stdin is not None and child.stdout is not None
        samples: list[float] = []
        for _ in range(rounds):
            held = self.take()
            if held is None:
                raise RuntimeError("holder did not get the lock")
            child.stdin.write("go\n")
            child.stdin.flush()
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("waiter process failed")
            _wait_blocked(self.probe)
            released = time.perf_counter()
            self.give(held)
            line = child.stdout.readline().strip()
            if not line or line == "failed":
                raise RuntimeError("waiter did not get the lock")
            samples.append(float(line) - released)
        return samples

    def close(self) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()
        self.child.wait(30)
        self.probe.close()
        self._close()
        _cleanup(self.url, self.prefix)


KINDS = ("coordlock", "coordlock-async", "python-redis-lock")


def handoff_comparison(
    url: str, rounds: int, kinds: tuple[str, ...] = KINDS, chunk: int = 20
) -> dict[str, list[float]]:
    """Hand-off samples (seconds) of each of ``kinds``, measured in alternating chunks of
    ``chunk`` hand-offs with the same harness, so machine load drifts hit all alike."""
    rigs: dict[str, _HandoffRig] = {}
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for kind in kinds:
            rigs[kind] = _HandoffRig(kind, url, rounds + chunk)
        for rig in rigs.values():
            rig.run(min(chunk, 5))  # warm-up: connections, script cache, imports
        done = 0
        while done < rounds:
            count = min(chunk, rounds - done)
            for kind, rig in rigs.items():
                samples[kind] += rig.run(count)
            done += count
    finally:
        for rig in rigs.values():
            rig.close()
    return samples


def raw_handoffs(url: str, rounds: int) -> dict[str, list[float]]:
    """Hand-off samples (seconds) of python-redis-lock, for ``benchmarks/locks.py``."""
    return handoff_comparison(url, rounds, kinds=("python-redis-lock",))


# -- the whole comparison, with the goals ---------------------------------------------------


def compare(url: str, pairs: int, handoffs: int) -> dict[str, Any]:
    """Everything the command line prints (see the module docstring)."""
    return {
        "sync": interleaved_pairs(url, pairs),
        "async": interleaved_async_pairs(url, pairs),
        "handoffs": handoff_comparison(url, handoffs),
    }


def verdicts(result: dict[str, Any]) -> list[tuple[bool, str]]:
    """The goals of issues 11 and 16 against the same run's references."""
    med = {k: statistics.median(v) * 1000 for k, v in result["handoffs"].items()}
    sync, asy = result["sync"]["ratio"], result["async"]["ratio"]
    return [
        (sync >= 0.9, f"sync lock() pairs/s >= 0.9x raw redis-py: {sync:.3f}x"),
        (asy >= 0.9, f"async lock() pairs/s >= 0.9x raw redis.asyncio: {asy:.3f}x"),
        (
            med["coordlock"] <= med["python-redis-lock"],
            f"hand-off median <= python-redis-lock's: {med['coordlock']:.3f} ms vs "
            f"{med['python-redis-lock']:.3f} ms",
        ),
        (
            med["coordlock-async"] <= med["coordlock"] + 0.2,
            f"async hand-off median <= sync + 0.2 ms: {med['coordlock-async']:.3f} ms vs "
            f"{med['coordlock']:.3f} ms",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--handoff-child"]:
        kind, url, prefix, rounds = args_in[1:5]
        _handoff_child(kind, url, prefix, int(rounds))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="redis://127.0.0.1:PORT of a throwaway server")
    parser.add_argument("--pairs", type=int, default=8000, help="pairs per measurement")
    parser.add_argument("--handoffs", type=int, default=200, help="hand-offs per kind")
    args = parser.parse_args(args_in)
    r = compare(args.url, args.pairs, args.handoffs)
    print(f"redis-py {redis.__version__} (hiredis: {redis.utils.HIREDIS_AVAILABLE})")
    for mode in ("sync", "async"):
        m = r[mode]
        print(
            f"{mode:5s} pairs/s  raw {m['raw_pairs_per_s']:8.0f}  coordlock "
            f"{m['coordlock_pairs_per_s']:8.0f}  ratio {m['ratio']:.3f} (median of "
            f"{CHUNK}-pair chunks; of the totals {m['ratio_of_totals']:.3f})"
        )
    for kind, samples in r["handoffs"].items():
        print(
            f"hand-off {kind:18s} median {statistics.median(samples) * 1000:7.3f} ms   "
            f"p99 {percentile(samples, 0.99) * 1000:7.3f} ms   (n={len(samples)})"
        )
    for ok, line in verdicts(r):
        print(f"{'PASS' if ok else 'FAIL'}  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
