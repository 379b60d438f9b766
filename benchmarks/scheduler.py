"""Scheduler benchmarks: claiming a crowded tick, and 10,000 registered jobs.

    python benchmarks/scheduler.py [URL ...] [--jobs 1000] [--rounds 5]
                                   [--scale-jobs 10000] [--scale-seconds 20] [--scale-url URL]

For every backend URL given (default: ``memory://`` and a temporary SQLite file):

1. **Crowded tick** – ``--jobs`` (1,000) jobs due on the same tick, claimed

   * raw: one ``claim_many(keys)`` call vs one ``claim(key)`` per job, on fresh keys;
   * end to end: one scheduler tick (``run_pending()`` with no-op jobs, ``overlap=True``, no
     history) through a proxy that counts coordinator calls, with ``claim_many`` vs with the
     per-job fallback.

   Rounds alternate the two ways; the median round is reported with the ratio
   (goal: claim_many ≥ 10× faster; the scheduler tick makes one claim call per 64 due jobs, at
   most 8: a crowded tick is claimed in chunks the instances share, see docs/scheduler.md).

2. **Scale** (once, on ``--scale-url``, default ``memory://``) – ``--scale-jobs`` (10,000) jobs
   registered (90 % ``every(60)`` with offsets spread over the minute, 10 % cron
   ``S * * * * *`` spread over the minute, in ten timezones), run on the real clock for
   ``--scale-seconds``: resident memory of the process (and its growth since before the
   scheduler was built) and the dispatch lag (tick → job start) p50/p99/max
   (goals: < 50 MB, p99 < 50 ms).

Figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordlock
from coordlock._lease import Lease
from coordlock.scheduler import (
    CronTrigger,
    IntervalTrigger,
    ManualClock,
    Scheduler,
    current_run,
)

TICK = 1_900_000_020.0  # a multiple of 60


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Counting:
    """A coordinator proxy that counts calls; ``many=False`` hides ``claim_many``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.claim_seconds = 0.0  # time spent inside claim()/claim_many()

    def acquire(self, name: str, ttl: float, *, wait: float | None = None) -> Lease | None:
        self.calls += 1
        lease: Lease | None = self.inner.acquire(name, ttl, wait=wait)
        return lease

    def release(self, lease: Lease) -> bool:
        self.calls += 1
        return bool(self.inner.release(lease))

    def extend(self, lease: Lease, ttl: float) -> bool:
        self.calls += 1
        return bool(self.inner.extend(lease, ttl))

    def claim(self, key: str, hold: float) -> bool:
        self.calls += 1
        started = time.perf_counter()
        try:
            return bool(self.inner.claim(key, hold))
        finally:
            self.claim_seconds += time.perf_counter() - started

    def close(self) -> None:
        pass


class CountingMany(Counting):
    def claim_many(self, keys: Iterable[str], hold: float) -> set[str]:
        self.calls += 1
        started = time.perf_counter()
        try:
            return set(self.inner.claim_many(keys, hold))
        finally:
            self.claim_seconds += time.perf_counter() - started


def noop() -> None:
    pass


def raw_round(coordinator: Any, jobs: int) -> tuple[float, float]:
    """Seconds for claim_many over ``jobs`` fresh keys, and for one claim per key."""
    tag = uuid.uuid4().hex[:8]
    many_keys = [f"bench-{tag}-m{i}@2030-01-01T00:00:00Z" for i in range(jobs)]
    one_keys = [f"bench-{tag}-o{i}@2030-01-01T00:00:00Z" for i in range(jobs)]
    started = time.perf_counter()
    won = coordinator.claim_many(many_keys, 120)
    many = time.perf_counter() - started
    assert len(won) == jobs
    started = time.perf_counter()
    for key in one_keys:
        assert coordinator.claim(key, 120)
    single = time.perf_counter() - started
    return many, single


def tick_round(coordinator: Any, jobs: int, many: bool) -> tuple[float, float, int]:
    """One scheduler tick with ``jobs`` due jobs: (claim seconds, tick seconds, claim calls)."""
    proxy = CountingMany(coordinator) if many else Counting(coordinator)
    clock = ManualClock(TICK - 30)
    sched = Scheduler(proxy, clock=clock, instance_id=f"bench-{uuid.uuid4().hex[:6]}")
    tag = uuid.uuid4().hex[:8]
    for i in range(jobs):
        sched.add(noop, 60, name=f"{tag}-{i}", overlap=True)
    clock.set(TICK)  # every job is due now (names, hence claim keys, are fresh per round)
    started = time.perf_counter()
    ran = sched.run_pending()
    elapsed = time.perf_counter() - started
    assert ran == jobs, ran
    return proxy.claim_seconds, elapsed, proxy.calls


def crowded_tick(url: str, jobs: int, rounds: int) -> None:
    coordinator = coordlock.connect(url)
    raw: dict[str, list[float]] = {"many": [], "one": []}
    claim: dict[str, list[float]] = {"many": [], "one": []}
    tick: dict[str, list[float]] = {"many": [], "one": []}
    calls = {"many": 0, "one": 0}
    try:
        raw_round(coordinator, min(jobs, 50))  # warm up connections and statements
        for _ in range(rounds):
            m, o = raw_round(coordinator, jobs)
            raw["many"].append(m)
            raw["one"].append(o)
            for way in ("many", "one"):
                c, t, calls[way] = tick_round(coordinator, jobs, many=way == "many")
                claim[way].append(c)
                tick[way].append(t)
    finally:
        coordinator.close()

    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000

    print(f"\n{url}: {jobs} jobs due on one tick (median of {rounds} rounds, ms)")
    print(f"  {'':34} {'claim_many':>11} {'claim each':>11} {'ratio':>7}")
    rows = [
        ("raw claims", med(raw["many"]), med(raw["one"])),
        ("scheduler tick: claim phase", med(claim["many"]), med(claim["one"])),
        (f"scheduler tick: claim + {jobs} runs", med(tick["many"]), med(tick["one"])),
    ]
    for label, many_ms, one_ms in rows:
        print(f"  {label:34} {many_ms:11.2f} {one_ms:11.2f} {one_ms / many_ms:6.1f}x")
    print(
        f"  coordinator claim calls per tick: {calls['many']} with claim_many, "
        f"{calls['one']} without"
    )


def scale(url: str, jobs: int, seconds: float) -> None:
    gc.collect()
    before = rss_mb()
    coordinator = coordlock.connect(url)
    sched = Scheduler(coordinator, instance_id="scale", max_workers=16, shutdown_grace=5)
    lags: list[tuple[float, float]] = []
    lock = threading.Lock()

    def job() -> None:
        ctx = current_run()
        assert ctx is not None
        tick = ctx.tick.timestamp()
        lag = time.time() - tick
        with lock:
            lags.append((tick, lag))

    zones = [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Asia/Tokyo",
        "Australia/Sydney",
        "America/Sao_Paulo",
        "Africa/Cairo",
        "Asia/Kolkata",
        "Europe/London",
        "Pacific/Auckland",
    ]
    crons = jobs // 10
    started = time.perf_counter()
    for i in range(jobs - crons):
        # offsets spread over the minute: ~150 jobs due per second, a tick every ~7 ms
        offset = (i * 60 / (jobs - crons)) % 60
        sched.add(job, IntervalTrigger(60, offset=round(offset, 3)), name=f"e{i}")
    for i in range(crons):
        # cron jobs spread over the minute too (6 fields: seconds first)
        sched.add(job, CronTrigger(f"{i % 60} * * * * *", zones[i % 10]), name=f"c{i}")
    registered = time.perf_counter() - started
    gc.collect()
    after_register = rss_mb()
    began = time.time()
    sched.start()
    started_in = time.time() - began
    time.sleep(seconds)
    sched.stop(wait=True, timeout=10)
    coordinator.close()
    gc.collect()
    after_run = rss_mb()
    with lock:
        samples = list(lags)
    print(f"\nscale on {url}: {jobs} registered jobs ({jobs - crons} every 60 s, {crons} cron)")
    print(f"  registration: {registered:.2f} s; start(): {started_in * 1000:.0f} ms")
    print(
        f"  resident memory: {after_register:.1f} MB after registering "
        f"(+{after_register - before:.1f} MB), {after_run:.1f} MB after running "
        f"(+{after_run - before:.1f} MB over the process before the scheduler)"
    )
    if not samples:
        print("  no job ran: run longer (--scale-seconds)")
        return

    def line(label: str, values: list[float]) -> None:
        data = sorted(values)
        if not data:
            return

        def pct(p: float) -> float:
            return data[min(len(data) - 1, int(p * len(data)))] * 1000

        print(
            f"  dispatch lag, {label}: {len(data)} runs, p50 {pct(0.50):.1f} ms, "
            f"p99 {pct(0.99):.1f} ms, max {data[-1] * 1000:.1f} ms"
        )

    line("ticks after start()", [g for t, g in samples if t >= began])
    line("ticks after start() + 2 s", [g for t, g in samples if t >= began + 2])
    before_start = [g for t, g in samples if t < began]
    line("ticks < 1 s before start() (run late, within grace)", before_start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="*", help="backend URLs (default: memory and SQLite)")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale-jobs", type=int, default=10_000)
    parser.add_argument("--scale-seconds", type=float, default=20.0)
    parser.add_argument("--scale-url", default=None, help="backend of the scale run (memory)")
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="coordlock-bench-")
    urls = args.urls or [f"memory://bench-{uuid.uuid4().hex}", f"sqlite:///{tmp.name}/bench.db"]
    if not args.skip_scale:  # first, so its memory figures start from a clean process
        scale(
            args.scale_url or f"memory://scale-{uuid.uuid4().hex}",
            args.scale_jobs,
            args.scale_seconds,
        )
    for url in urls:
        crowded_tick(url, args.jobs, args.rounds)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
