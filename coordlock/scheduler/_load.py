"""Many scheduler processes sharing many jobs: the load harness of ``benchmarks/scale.py`` and
``tests/test_scheduler_scale.py``.

    python -m coordlock.scheduler._load --url URL --instance NAME --jobs N --period S
        --out OUT.json --ready READY.jsonl [--duration S] [--max-workers N] [--overlap]

One worker process runs a :class:`~coordlock.scheduler.Scheduler` with ``--jobs`` jobs
``every(--period)`` (names ``j0000`` …); each run records its tick (from
:func:`~coordlock.scheduler.current_run`) and its dispatch lag (the wall clock at the job's
start minus the tick). ``claim_many`` is timed (one sample per call: when it was called
relative to the tick, its round trip, keys asked and won). On SIGTERM (or after
``--duration``) the worker stops its scheduler and writes everything as one JSON object to
``--out``; it appends ``{"instance", "pid", "t"}`` to ``--ready`` once its scheduler runs.

:func:`run_cluster` starts the workers, waits for all of them to be ready, lets ``ticks``
whole ticks pass and stops them; :func:`judge` counts duplicates and misses per (job, tick)
over the ticks every worker was up for, and summarises lag and claim round trips. Figures
only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._registry import connect
from .job import current_run
from .loop import Scheduler
from .triggers import IntervalTrigger

#: Seconds a cluster may take until every worker's scheduler runs.
READY_WITHIN = 120.0


def job_name(index: int) -> str:
    return f"j{index:04d}"


# -- the worker process ---------------------------------------------------------------------


class Recorder:
    """What one worker saw: runs (job index, tick, lag) and claim calls."""

    def __init__(self, period: float, job_seconds: float = 0.0) -> None:
        self.period = period
        self.job_seconds = job_seconds
        self.lock = threading.Lock()
        self.runs: list[tuple[int, float, float]] = []
        #: (tick, seconds after the tick the call began, round trip, keys, won)
        self.claims: list[tuple[float, float, float, int, int]] = []

    def job(self, index: int) -> None:
        now = time.time()
        ctx = current_run()
        assert ctx is not None
        tick = ctx.tick.timestamp()
        with self.lock:
            self.runs.append((index, tick, now - tick))
        if self.job_seconds > 0:
            time.sleep(self.job_seconds)

    def timed_claims(self, claim_many: Callable[[Iterable[str], float], set[str]]) -> Any:
        def timed(keys: Iterable[str], hold: float) -> set[str]:
            keys = list(keys)
            began = time.time()
            t0 = time.perf_counter()
            won = claim_many(keys, hold)
            rtt = time.perf_counter() - t0
            tick = math.floor(began / self.period + 1e-9) * self.period
            with self.lock:
                self.claims.append((tick, began - tick, rtt, len(keys), len(won)))
            return won

        return timed


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordlock.scheduler._load")
    parser.add_argument("--url", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--period", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--max-workers", type=int, default=10)
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--grace", type=float, default=None, help="misfire grace (seconds)")
    parser.add_argument("--job-seconds", type=float, default=0.0, help="how long a run lasts")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rec = Recorder(args.period, args.job_seconds)
    coordinator = connect(args.url)
    claim_many = getattr(coordinator, "claim_many", None)
    if claim_many is not None:
        coordinator.claim_many = rec.timed_claims(claim_many)  # type: ignore[attr-defined]
    calls: Counter[str] = Counter()
    for method in ("acquire", "record_run", "history"):
        inner = getattr(coordinator, method, None)
        if inner is not None:
            setattr(coordinator, method, _counted(calls, method, inner))
    sched = Scheduler(
        coordinator,
        instance_id=args.instance,
        max_workers=args.max_workers,
        shutdown_grace=5.0,
    )
    trigger = IntervalTrigger(args.period)
    for i in range(args.jobs):
        sched.add(
            rec.job, trigger, name=job_name(i), args=(i,), overlap=args.overlap, grace=args.grace
        )
    parent = os.getppid()
    deadline = time.monotonic() + args.duration
    sched.start()
    started = time.time()
    cpu_started = _cpu()
    with open(args.ready, "a") as ready:
        ready.write(json.dumps({"instance": args.instance, "pid": os.getpid(), "t": started}))
        ready.write("\n")
    while not stop.wait(0.2):
        if time.monotonic() > deadline or os.getppid() != parent:
            break
    stopped = time.time()
    cpu_running = _cpu() - cpu_started
    sched.stop(wait=True, timeout=10)
    coordinator.close()
    with rec.lock:
        out = {
            "instance": args.instance,
            "started": started,
            "stopped": stopped,
            "cpu": _cpu(),
            "cpu_running": cpu_running,
            "calls": dict(calls),
            "runs": rec.runs,
            "claims": rec.claims,
        }
    Path(args.out).write_text(json.dumps(out))
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _counted(calls: Counter[str], name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return inner(*args, **kwargs)

    return counted


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Worker processes of one load run (see :func:`run_cluster`)."""

    url: str
    workdir: Path
    procs: int
    jobs: int
    period: float
    max_workers: int = 10
    overlap: bool = False
    #: the jobs' misfire grace in seconds (``None``: the default, 1 s)
    grace: float | None = None
    #: how long each run lasts (seconds)
    job_seconds: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)
    #: how a worker is started after the interpreter (a profiler wrapper may replace it)
    entry: list[str] = field(default_factory=lambda: ["-m", "coordlock.scheduler._load"])
    popen: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ready_path(self) -> Path:
        return self.workdir / "ready.jsonl"

    def out_path(self, index: int) -> Path:
        return self.workdir / f"worker-{index:02d}.json"

    def start(self, duration: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.extra_env}
        for index in range(self.procs):
            command = [
                sys.executable, *self.entry,
                "--url", self.url, "--instance", f"w{index:02d}",
                "--jobs", str(self.jobs), "--period", str(self.period),
                "--out", str(self.out_path(index)), "--ready", str(self.ready_path),
                "--duration", str(duration), "--max-workers", str(self.max_workers),
            ]  # fmt: skip
            if self.overlap:
                command.append("--overlap")
            if self.grace is not None:
                command += ["--grace", str(self.grace)]
            if self.job_seconds:
                command += ["--job-seconds", str(self.job_seconds)]
            log = open(self.workdir / f"worker-{index:02d}.log", "wb")  # noqa: SIM115
            self.popen.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
                )
            )
            log.close()

    def ready_times(self) -> list[float]:
        if not self.ready_path.exists():
            return []
        lines = self.ready_path.read_text().splitlines()
        return [json.loads(line)["t"] for line in lines if line.strip()]

    def wait_ready(self, within: float = READY_WITHIN) -> float:
        """Wait until every worker's scheduler runs; returns when the last one started."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            times = self.ready_times()
            if len(times) >= self.procs:
                return max(times)
            dead = [p for p in self.popen if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{len(dead)} worker(s) exited early; see {self.workdir}")
            time.sleep(0.1)
        raise RuntimeError(f"workers not ready within {within:.0f}s; see {self.workdir}")

    def stop(self, timeout: float = 60.0) -> None:
        for proc in self.popen:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.popen:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def results(self) -> list[dict[str, Any]]:
        found = []
        for index in range(self.procs):
            path = self.out_path(index)
            if path.exists():
                found.append(json.loads(path.read_text()))
        return found


def run_cluster(
    cluster: Cluster,
    ticks: int,
    *,
    during: Callable[[float, float], None] | None = None,
) -> tuple[list[dict[str, Any]], float, float]:
    """Start the workers, let ``ticks`` whole ticks pass once all are ready, stop them.

    Returns (worker results, first tick of the window, last tick of the window). The window
    starts one period after the last worker became ready (so every worker competes for every
    tick in it) and ends one period before the stop. ``during(first, last)`` is called once the
    workers are ready (to sample the server, say); it must return before the window ends.
    """
    period = cluster.period
    cluster.start(duration=READY_WITHIN + (ticks + 4) * period + 60)
    try:
        ready = cluster.wait_ready()
        first = (math.floor(ready / period) + 2) * period
        last = first + (ticks - 1) * period
        if during is not None:
            during(first, last)
        pause = last + period + min(period, 2.0) - time.time()
        if pause > 0:
            time.sleep(pause)
    finally:
        cluster.stop()
    return cluster.results(), first, last


@dataclass
class Verdict:
    """Duplicates and misses over a window, with the lag and claim figures (seconds)."""

    ticks: int
    expected: int
    runs: int
    duplicates: int
    misses: int
    lags: list[float]
    claim_rtts: list[float]
    claim_starts: list[float]
    cpu: list[float]
    workers: int
    #: CPU seconds of all workers while their schedulers ran, per run in the window
    cpu_per_run: float = float("nan")
    #: coordinator calls of all workers (acquire, record_run, history, claim_many) per run
    calls_per_run: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "ticks": self.ticks,
            "expected": self.expected,
            "runs": self.runs,
            "duplicates": self.duplicates,
            "misses": self.misses,
            "lag_p50_ms": pct_ms(self.lags, 0.50),
            "lag_p99_ms": pct_ms(self.lags, 0.99),
            "lag_max_ms": pct_ms(self.lags, 1.0),
            "claim_rtt_p50_ms": pct_ms(self.claim_rtts, 0.50),
            "claim_rtt_p99_ms": pct_ms(self.claim_rtts, 0.99),
            "claim_start_p50_ms": pct_ms(self.claim_starts, 0.50),
            "claim_start_p99_ms": pct_ms(self.claim_starts, 0.99),
            "cpu_per_worker_s": sum(self.cpu) / len(self.cpu) if self.cpu else float("nan"),
            "cpu_per_run_ms": self.cpu_per_run * 1000,
            "calls_per_run": self.calls_per_run,
        }


def pct_ms(samples: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``samples`` (seconds), in milliseconds."""
    if not samples:
        return float("nan")
    data = sorted(samples)
    return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))] * 1000


def judge(
    results: list[dict[str, Any]], jobs: int, period: float, first: float, last: float
) -> Verdict:
    """Count every (job, tick) run: duplicates anywhere, misses inside ``[first, last]``."""
    seen: Counter[tuple[int, float]] = Counter()
    lags: list[float] = []
    for result in results:
        for index, tick, lag in result["runs"]:
            key = (int(index), round(tick / period))
            seen[key] += 1
            if first - 1e-6 <= tick <= last + 1e-6:
                lags.append(lag)
    duplicates = sum(count - 1 for count in seen.values() if count > 1)
    lo, hi = round(first / period), round(last / period)
    ticks = hi - lo + 1
    misses = sum(1 for i in range(jobs) for t in range(lo, hi + 1) if (i, t) not in seen)
    rtts = [
        rtt
        for result in results
        for tick, _, rtt, _, _ in result["claims"]
        if first - 1e-6 <= tick <= last + 1e-6
    ]
    starts = [
        start
        for result in results
        for tick, start, _, _, _ in result["claims"]
        if first - 1e-6 <= tick <= last + 1e-6
    ]
    total_runs = sum(len(result["runs"]) for result in results) or 1
    calls: Counter[str] = Counter()
    for result in results:
        calls.update(result.get("calls", {}))
        calls["claim_many"] += len(result["claims"])
    return Verdict(
        cpu_per_run=sum(r.get("cpu_running", 0.0) for r in results) / total_runs,
        calls_per_run={k: round(v / total_runs, 2) for k, v in sorted(calls.items())},
        ticks=ticks,
        expected=ticks * jobs,
        runs=len(lags),
        duplicates=duplicates,
        misses=misses,
        lags=lags,
        claim_rtts=rtts,
        claim_starts=starts,
        cpu=[float(result["cpu"]) for result in results],
        workers=len(results),
    )


if __name__ == "__main__":  # pragma: no cover - process entry point
    raise SystemExit(worker_main())
