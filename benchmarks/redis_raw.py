"""Redis baselines for ``benchmarks/locks.py``, and a stand-alone Redis lock benchmark.

Functions (used by ``benchmarks/locks.py``):

* :func:`raw_pairs` – acquire/release pairs per second done by hand with the raw client:
  a fresh token, ``SET key token NX PX 30000``, then a Lua compare-and-delete (``EVALSHA``).
* :func:`coordlock_pairs` – the same pairs through coordlock (fencing and renewal on).
* :func:`redis_py_lock` – redis-py's ``Lock`` (pairs/s and hand-off latency).
* :func:`coordlock_handoff` / :func:`redis_py_handoff` – release → waiter-holds latency, the
  waiter in another process.
* :func:`interleaved_pairs` – raw and coordlock pairs/s measured in alternating chunks: use it
  for the ratio (two separate runs on a busy machine differ by more than the ratio's margin).
* :func:`compare` – all of the above, as printed by the command line.

Run alone against a throwaway server (never a production one; keys use their own prefix and
are deleted afterwards)::

    python benchmarks/redis_raw.py redis://127.0.0.1:PORT [--pairs 20000] [--handoffs 300]

It prints raw vs coordlock pairs/s and their ratio, and hand-off median/p99 for coordlock and
redis-py's ``Lock``. Measured in one run, on the same server, so only the ratios matter.
"""

from __future__ import annotations

import argparse
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

import coordlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timed_pairs

RAW_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: coordlock's own URL options, which redis-py does not understand.
_COORDLOCK_OPTIONS = {"prefix", "retry_deadline", "history_limit"}
TTL = 30.0


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
        keys = [
            *client.scan_iter(match=f"*{prefix}*", count=1000),
        ]
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def raw_pairs(url: str, n: int) -> float:
    """Pairs/s of a hand-written lock: fresh token + ``SET NX PX`` + Lua compare-and-delete."""
    prefix = _bench_prefix()
    client = redis.Redis.from_url(_raw_url(url))
    release = client.register_script(RAW_RELEASE)
    key = prefix + "raw"
    ttl_ms = int(TTL * 1000)
    try:
        for _ in range(min(n, 200)):  # warm up (connection, script cache)
            token = uuid.uuid4().hex
            client.set(key, token, nx=True, px=ttl_ms)
            release(keys=[key], args=[token])
        started = time.perf_counter()
        for _ in range(n):
            token = uuid.uuid4().hex
            if not client.set(key, token, nx=True, px=ttl_ms):
                raise RuntimeError("raw lock unexpectedly busy")
            if not release(keys=[key], args=[token]):
                raise RuntimeError("raw release failed")
        elapsed = time.perf_counter() - started
    finally:
        client.close()
        _cleanup(url, prefix)
    return n / elapsed


def coordlock_pairs(url: str, n: int) -> float:
    """Pairs/s of ``coordinator.acquire(name, 30)`` + ``lease.release()`` (renewal on)."""
    prefix = _bench_prefix()
    coordinator = coordlock.connect(_coordlock_url(url, prefix))
    try:
        return timed_pairs(coordinator, n, ttl=TTL)
    finally:
        coordinator.close()
        _cleanup(url, prefix)


LockOps = tuple[Callable[[], Any], Callable[[], Any], Callable[[Any], Any], Callable[[], None]]


def _lock_ops(kind: str, url: str, prefix: str) -> LockOps:
    """(take, take_waiting, give, close) for ``kind`` "coordlock", "python-redis-lock" or
    "redis-py"."""
    if kind == "python-redis-lock":
        import redis_lock  # python-redis-lock: SET NX EX, BLPOP on a signal list

        prl_client = redis.Redis.from_url(_raw_url(url))
        prl_name = prefix + "prl-handoff"

        def prl_take() -> Any:
            lock = redis_lock.Lock(prl_client, prl_name, expire=int(TTL))
            return lock if lock.acquire(blocking=False) else None

        def prl_take_waiting() -> Any:
            lock = redis_lock.Lock(prl_client, prl_name, expire=int(TTL))
            return lock if lock.acquire(blocking=True, timeout=20) else None

        return prl_take, prl_take_waiting, lambda lock: lock.release(), prl_client.close
    if kind == "coordlock":
        coordinator = coordlock.connect(_coordlock_url(url, prefix))
        return (
            lambda: coordinator.acquire("handoff", TTL),
            lambda: coordinator.acquire("handoff", TTL, wait=20),
            lambda lease: lease.release(),
            coordinator.close,
        )
    client = redis.Redis.from_url(_raw_url(url))
    name = prefix + "pylock-handoff"

    def take() -> Any:
        lock = client.lock(name, timeout=TTL, thread_local=False)
        return lock if lock.acquire(blocking=False) else None

    def take_waiting() -> Any:
        lock = client.lock(name, timeout=TTL, blocking_timeout=20, thread_local=False)
        return lock if lock.acquire(blocking=True) else None

    return take, take_waiting, lambda lock: lock.release(), client.close


def _handoff_child(kind: str, url: str, prefix: str, rounds: int) -> None:
    """The waiter process: per round, wait for "go", block in acquire, print when it holds."""
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
    releases once the waiter really waits (the server reports a client blocked in BLPOP, or
    after 5 ms for redis-py's polling ``Lock``) and the waiter reports when it holds the lock.
    """

    def __init__(self, kind: str, url: str, rounds: int) -> None:
        self.kind = kind
        self.url = url
        self.prefix = _bench_prefix()
        self.take, _, self.give, self._close = _lock_ops(kind, url, self.prefix)
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
            if self.kind == "redis-py":
                time.sleep(0.005)
            else:
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


def handoff_comparison(
    url: str,
    rounds: int,
    kinds: tuple[str, ...] = ("coordlock", "python-redis-lock"),
    chunk: int = 20,
) -> dict[str, list[float]]:
    """Hand-off samples (seconds) of each of ``kinds``, measured in alternating chunks of
    ``chunk`` hand-offs with the same harness, so machine load drifts hit all alike."""
    rigs = {kind: _HandoffRig(kind, url, rounds + chunk) for kind in kinds}
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for rig in rigs.values():
            rig.run(min(chunk, 5))  # warm-up: connections, script cache
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


def _handoff(kind: str, url: str, rounds: int) -> list[float]:
    """Seconds from "holder calls release" to "the blocked waiter holds", ``rounds`` times.

    Holder and waiter are separate processes, as they would be in real use (and so they do not
    share one GIL); ``time.perf_counter`` is the system-wide monotonic clock on Linux. Each
    round the holder takes the lock and lets the waiter start a blocking acquire; it releases
    once the waiter really waits: for coordlock when the server reports a client blocked in
    BLPOP, for redis-py's ``Lock`` (which sleeps between polls, invisible to the server) after
    5 ms.
    """
    prefix = _bench_prefix()
    take, _, give, close = _lock_ops(kind, url, prefix)
    child = subprocess.Popen(
        [sys.executable, __file__, "--handoff-child", kind, url, prefix, str(rounds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    probe = redis.Redis.from_url(_raw_url(url))
    samples: list[float] = []
    try:
        for _ in range(rounds):
            held = take()
            if held is None:
                raise RuntimeError("holder did not get the lock")
            child.stdin.write("go\n")
            child.stdin.flush()
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("waiter process failed")
            if kind == "coordlock":
                _wait_blocked(probe)
            else:
                time.sleep(0.005)
            released = time.perf_counter()
            give(held)
            line = child.stdout.readline().strip()
            if not line or line == "failed":
                raise RuntimeError("waiter did not get the lock")
            samples.append(float(line) - released)
    finally:
        child.stdin.close()
        child.wait(30)
        probe.close()
        close()
        _cleanup(url, prefix)
    return samples


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "handoff_median_ms": statistics.median(ordered) * 1000,
        "handoff_p99_ms": p99 * 1000,
        "handoffs": float(len(ordered)),
    }


def coordlock_handoff(url: str, rounds: int) -> dict[str, float]:
    """Hand-off median/p99 (ms) of coordlock: ``acquire(wait=…)`` woken by the release."""
    return _summary(_handoff("coordlock", url, rounds))


def redis_py_handoff(url: str, rounds: int) -> dict[str, float]:
    """Hand-off median/p99 (ms) of redis-py's ``Lock`` (it polls every 0.1 s while blocked)."""
    return _summary(_handoff("redis-py", url, rounds))


def raw_handoffs(url: str, rounds: int) -> dict[str, list[float]]:
    """Hand-off samples (seconds) of redis-py's ``Lock``, for ``benchmarks/locks.py``."""
    return {"redis-py": _handoff("redis-py", url, min(rounds, 40))}


def redis_py_lock(url: str, n: int, handoffs: int = 40) -> dict[str, float]:
    """redis-py ``Lock``: ``pairs_per_s`` (n pairs) and hand-off median/p99 (``handoffs``)."""
    prefix = _bench_prefix()
    client = redis.Redis.from_url(_raw_url(url))
    name = prefix + "pylock"
    try:
        for _ in range(min(n, 200)):
            lock = client.lock(name, timeout=TTL, thread_local=False)
            lock.acquire(blocking=False)
            lock.release()
        started = time.perf_counter()
        for _ in range(n):
            lock = client.lock(name, timeout=TTL, thread_local=False)
            if not lock.acquire(blocking=False):
                raise RuntimeError("redis-py lock unexpectedly busy")
            lock.release()
        elapsed = time.perf_counter() - started
    finally:
        client.close()
        _cleanup(url, prefix)
    result = {"pairs_per_s": n / elapsed}
    result.update(redis_py_handoff(url, handoffs))
    return result


def interleaved_pairs(url: str, n: int, chunk: int = 250) -> dict[str, float]:
    """Raw and coordlock pairs/s measured in alternating chunks of ``chunk`` pairs.

    On a busy machine the load drifts over seconds; alternating small chunks exposes both
    sides to the same drift, so the ratio is much steadier than two separate runs.
    """
    prefix = _bench_prefix()
    client = redis.Redis.from_url(_raw_url(url))
    release = client.register_script(RAW_RELEASE)
    coordinator = coordlock.connect(_coordlock_url(url, prefix))
    key = prefix + "raw"
    ttl_ms = int(TTL * 1000)

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
            if lease is None:
                raise RuntimeError("coordlock lock unexpectedly busy")
            if not lease.release():
                raise RuntimeError("coordlock release failed")
        return time.perf_counter() - started

    try:
        raw(min(n, 200))
        ours(min(n, 200))
        raw_time = ours_time = 0.0
        ratios: list[float] = []
        done = 0
        while done < n:
            count = min(chunk, n - done)
            r = raw(count)
            o = ours(count)
            raw_time += r
            ours_time += o
            ratios.append(r / o)
            done += count
    finally:
        coordinator.close()
        client.close()
        _cleanup(url, prefix)
    return {
        "raw_pairs_per_s": n / raw_time,
        "coordlock_pairs_per_s": n / ours_time,
        "ratio": raw_time / ours_time,
        "ratio_median_chunk": statistics.median(ratios),
    }


def compare(url: str, pairs: int, handoffs: int) -> dict[str, float]:
    """Raw vs coordlock pairs/s (interleaved), hand-offs, and redis-py's ``Lock``."""
    result = interleaved_pairs(url, pairs)
    mine = coordlock_handoff(url, handoffs)
    result.update({f"coordlock_{k}": v for k, v in mine.items()})
    theirs = redis_py_lock(url, max(200, pairs // 4), handoffs=max(10, handoffs // 8))
    result.update({f"redis_py_lock_{k}": v for k, v in theirs.items()})
    return result


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--handoff-child"]:
        kind, url, prefix, rounds = args_in[1:5]
        _handoff_child(kind, url, prefix, int(rounds))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="redis://127.0.0.1:PORT of a throwaway server")
    parser.add_argument("--pairs", type=int, default=20000, help="pairs per measurement")
    parser.add_argument("--handoffs", type=int, default=300, help="coordlock hand-offs")
    args = parser.parse_args(args_in)
    r = compare(args.url, args.pairs, args.handoffs)
    print(f"redis: {redis.__version__} (hiredis: {redis.utils.HIREDIS_AVAILABLE})")
    print(f"raw SET NX PX + Lua release : {r['raw_pairs_per_s']:10.0f} pairs/s")
    print(f"coordlock acquire + release : {r['coordlock_pairs_per_s']:10.0f} pairs/s")
    print(
        f"ratio coordlock / raw       : {r['ratio']:10.3f}  "
        f"(median over chunks {r['ratio_median_chunk']:.3f})"
    )
    print(f"redis-py Lock               : {r['redis_py_lock_pairs_per_s']:10.0f} pairs/s")
    print(
        f"hand-off coordlock          : median {r['coordlock_handoff_median_ms']:.3f} ms, "
        f"p99 {r['coordlock_handoff_p99_ms']:.3f} ms "
        f"({int(r['coordlock_handoffs'])} hand-offs)"
    )
    print(
        f"hand-off redis-py Lock      : median {r['redis_py_lock_handoff_median_ms']:.3f} ms, "
        f"p99 {r['redis_py_lock_handoff_p99_ms']:.3f} ms "
        f"({int(r['redis_py_lock_handoffs'])} hand-offs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
