"""Scheduler and lock scale on throwaway servers: many processes, many jobs, one server.

    python benchmarks/scale.py [--backends redis,postgres,zookeeper,sqlite]
        [--procs 8] [--jobs 200] [--period 2] [--ticks 15]      # one load configuration
        [--growth 1,5,10,20]                                     # the same, per process count
        [--contend] [--threads 32] [--contend-procs 8] [--names 100] [--contend-seconds 10]

**Load** – ``--procs`` scheduler processes (:mod:`coordlock.scheduler._load`) share
``--jobs`` jobs ``every(--period)`` (default options: ``overlap=False``, history kept), for
``--ticks`` whole ticks once every process runs. Per backend: duplicates and misses per
(job, tick) (tick identity from ``current_run().tick``), dispatch lag (tick → job start)
p50/p99/max, the ``claim_many`` round trip p50/p99 and when it began after the tick, client CPU
per process, server CPU (all processes of the server, as a share of one core) and server
connections per process (established TCP connections on the server's port, sampled mid-run).
``--growth 1,5,10,20`` repeats the configuration per process count.

**Contention** (``--contend``) – ``--contend-procs`` processes × ``--threads`` threads take and
release locks on ``--names`` names (``acquire(wait=5)``, random name) for ``--contend-seconds``:
pairs/s and fairness (max/min acquisitions per process).

The machine's load average is printed before and after every run. Figures only: nothing here
asserts a time. Throwaway servers (``coordlock.testing.servers``) have durable settings
(fsync on), as a real deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from coordlock.scheduler._load import Cluster, judge, run_cluster  # noqa: E402
from coordlock.testing.servers import (  # noqa: E402
    PostgresServer,
    RedisServer,
    ZooKeeperServer,
)
from coordlock.testing.servers._managed import ManagedServer  # noqa: E402

BACKENDS = ("redis", "postgres", "zookeeper", "sqlite")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tree_cpu(root: int | None) -> float:
    """CPU seconds (user + system) of process ``root`` and every live descendant, plus what
    its exited children used (PostgreSQL's backends are children of the postmaster, each in a
    session of its own)."""
    if root is None:
        return 0.0
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = (
                    Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                )
            except OSError:
                continue
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is None:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        todo.extend(children.get(pid, []))
    return total / CLK_TCK


def connections(port: int) -> int:
    """Established TCP connections whose local end is ``port`` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


@contextmanager
def server(kind: str, tmp: Path) -> Iterator[tuple[str, ManagedServer | None]]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp}/scale.db", None
        return
    factory: dict[str, Callable[[], ManagedServer]] = {
        "redis": RedisServer,
        "postgres": PostgresServer,
        "zookeeper": ZooKeeperServer,
    }
    with factory[kind]() as srv:
        yield srv.url, srv


def load_run(
    kind: str,
    url: str,
    srv: ManagedServer | None,
    tmp: Path,
    args: argparse.Namespace,
    procs: int,
) -> dict[str, Any]:
    """One load configuration on one backend; returns its figures."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-{procs}p-", dir=tmp))
    cluster = Cluster(
        url=url,
        workdir=workdir,
        procs=procs,
        jobs=args.jobs,
        period=args.period,
        max_workers=args.max_workers,
        overlap=args.overlap,
        job_seconds=args.job_seconds,
    )
    sample: dict[str, float] = {}

    def during(first: float, last: float) -> None:
        pgid = srv.pid if srv is not None else None
        wait = first - time.time()
        if wait > 0:
            time.sleep(wait)
        sample["cpu0"], sample["t0"] = tree_cpu(pgid), time.monotonic()
        middle = (first + last) / 2 + args.period / 2 - time.time()
        if middle > 0:
            time.sleep(middle)
        sample["conns"] = connections(srv.port) if srv is not None else float("nan")
        sample["load"] = float(loadavg().split()[0])
        end = last + args.period - time.time()
        if end > 0:
            time.sleep(end)
        sample["cpu1"], sample["t1"] = tree_cpu(pgid), time.monotonic()

    load_before = loadavg()
    results, first, last = run_cluster(cluster, args.ticks, during=during)
    verdict = judge(results, args.jobs, args.period, first, last)
    figures = verdict.summary()
    span = sample.get("t1", 0) - sample.get("t0", 0)
    figures.update(
        backend=kind,
        procs=procs,
        jobs=args.jobs,
        period=args.period,
        server_cpu_pct=(
            100 * (sample["cpu1"] - sample["cpu0"]) / span if srv is not None and span else None
        ),
        conns_per_proc=sample.get("conns", float("nan")) / procs if srv is not None else None,
        load_before=load_before,
        load_mid=sample.get("load"),
        load_after=loadavg(),
        workdir=str(workdir),
    )
    return figures


def print_load(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'backend':10} {'procs':>5} {'jobs':>5} {'ticks':>5} {'runs':>6} {'dup':>4} "
        f"{'miss':>5} {'lag p50':>8} {'p99':>7} {'max':>7} {'claim p50':>9} {'p99':>7} "
        f"{'claim@':>7} {'cpu/run':>8} {'srv cpu':>8} {'conn/proc':>9}  load"
    )
    print(head)
    for r in rows:
        srv_cpu = "-" if r["server_cpu_pct"] is None else f"{r['server_cpu_pct']:.0f}%"
        conns = "-" if r["conns_per_proc"] is None else f"{r['conns_per_proc']:.1f}"
        print(
            f"{r['backend']:10} {r['procs']:5} {r['jobs']:5} {r['ticks']:5} {r['runs']:6} "
            f"{r['duplicates']:4} {r['misses']:5} {r['lag_p50_ms']:8.1f} {r['lag_p99_ms']:7.1f} "
            f"{r['lag_max_ms']:7.0f} {r['claim_rtt_p50_ms']:9.1f} {r['claim_rtt_p99_ms']:7.1f} "
            f"{r['claim_start_p99_ms']:7.1f} {r['cpu_per_run_ms']:6.2f}ms {srv_cpu:>8} "
            f"{conns:>9}  {r['load_before']} → {r['load_after']}",
            flush=True,
        )


# -- contention -------------------------------------------------------------------------------


def contend_worker(argv: list[str]) -> int:
    """``contend URL THREADS NAMES SECONDS START OUT``: count pairs until the deadline."""
    import coordlock

    url, threads, names, seconds, start, out = argv
    coordinator = coordlock.connect(url)
    counts = [0] * int(threads)
    errors = [0] * int(threads)
    begin = float(start)
    end = begin + float(seconds)

    def body(slot: int) -> None:
        rnd = random.Random(slot * 7919 + os.getpid())
        while time.time() < begin:
            time.sleep(0.01)
        while time.time() < end:
            name = f"contend-{rnd.randrange(int(names))}"
            try:
                lease = coordinator.acquire(name, 10, wait=5, renew=False)
            except Exception:
                errors[slot] += 1
                continue
            if lease is not None:
                lease.release()
                counts[slot] += 1

    workers = [threading.Thread(target=body, args=(i,)) for i in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    coordinator.close()
    Path(out).write_text(json.dumps({"pairs": sum(counts), "errors": sum(errors)}))
    return 0


def contend_run(kind: str, url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.time() + 5 + args.contend_procs * 0.5
    outs = [tmp / f"contend-{kind}-{i}.json" for i in range(args.contend_procs)]
    load_before = loadavg()
    procs = [
        subprocess.Popen([
            sys.executable, __file__, "contend", url, str(args.threads), str(args.names),
            str(args.contend_seconds), str(start), str(out),
        ])
        for out in outs
    ]  # fmt: skip
    for proc in procs:
        proc.wait(timeout=args.contend_seconds + 120)
    per = [json.loads(out.read_text()) for out in outs if out.exists()]
    pairs = [p["pairs"] for p in per]
    return {
        "backend": kind,
        "pairs_s": sum(pairs) / args.contend_seconds,
        "fairness": max(pairs) / max(1, min(pairs)) if pairs else float("nan"),
        "min": min(pairs) if pairs else 0,
        "max": max(pairs) if pairs else 0,
        "errors": sum(p["errors"] for p in per),
        "load": f"{load_before} → {loadavg()}",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "contend":
        return contend_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="redis,postgres,zookeeper")
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--period", type=float, default=2.0)
    parser.add_argument("--ticks", type=int, default=15)
    parser.add_argument("--max-workers", type=int, default=10)
    parser.add_argument("--overlap", action="store_true", help="jobs with overlap=True")
    parser.add_argument("--job-seconds", type=float, default=0.0, help="how long a run lasts")
    parser.add_argument("--growth", default="", help="process counts, e.g. 1,5,10,20")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--contend", action="store_true")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--contend-procs", type=int, default=8)
    parser.add_argument("--names", type=int, default=100)
    parser.add_argument("--contend-seconds", type=float, default=10.0)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    for kind in kinds:
        if kind not in BACKENDS:
            parser.error(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")
    counts = [int(n) for n in args.growth.split(",") if n.strip()] or [args.procs]
    print(f"cores: {os.cpu_count()}, load average: {loadavg()}", flush=True)
    load_rows: list[dict[str, Any]] = []
    contend_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="coordlock-scale-") as tmp_name:
        tmp = Path(tmp_name)
        for kind in kinds:
            with ExitStack() as stack:
                url, srv = stack.enter_context(server(kind, tmp))
                if not args.skip_load:
                    for procs in counts:
                        print(
                            f"\n== {kind}: {procs} processes × {args.jobs} jobs every "
                            f"{args.period:g} s, {args.ticks} ticks",
                            flush=True,
                        )
                        row = load_run(kind, url, srv, tmp, args, procs)
                        load_rows.append(row)
                        print_load([row])
                if args.contend:
                    row = contend_run(kind, url, tmp, args)
                    contend_rows.append(row)
                    print(
                        f"== {kind} contention: {args.contend_procs} processes × {args.threads} "
                        f"threads on {args.names} names: {row['pairs_s']:.0f} pairs/s, "
                        f"fairness max/min {row['fairness']:.2f} ({row['max']}/{row['min']}), "
                        f"errors {row['errors']}, load {row['load']}",
                        flush=True,
                    )
        if load_rows:
            print("\nload summary (ms; server CPU as % of one core):")
            print_load(load_rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load_rows, "contend": contend_rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
