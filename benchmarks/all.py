"""Run the lock and scheduler benchmarks against every backend, on throwaway servers.

    python benchmarks/all.py [--pairs 2000] [--rounds 5] [--handoffs 200] [--skip-scheduler]

Starts a Redis, a PostgreSQL and a ZooKeeper server with :mod:`coordlock.testing.servers`
(durable settings: fsync on, as a real deployment), then runs ``benchmarks/locks.py`` for
SQLite, Redis, PostgreSQL and ZooKeeper, each backend's ``*_raw.py`` (the performance goals as
PASS/FAIL against the same-run reference) and ``benchmarks/scheduler.py`` for all five
backends.
Figures only; the servers are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from coordlock.testing.servers import PostgresServer, RedisServer, ZooKeeperServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--skip-scheduler", action="store_true")
    parser.add_argument(
        "--scale", action="store_true",
        help="also run benchmarks/scale.py (8 processes x 200 jobs every 2 s, 15 ticks, on its "
        "own servers) and judge it against the goals: no duplicates, no misses, dispatch lag "
        "p99 < 100 ms on Redis and PostgreSQL, < 250 ms on ZooKeeper",
    )  # fmt: skip
    args = parser.parse_args(argv)
    lock_args = ["--pairs", str(args.pairs), "--rounds", str(args.rounds),
                 "--handoffs", str(args.handoffs)]
    status = 0
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis, \
            PostgresServer() as postgres, ZooKeeperServer() as zookeeper:
        urls = [f"sqlite:///{tmp}/locks.db", redis.url, postgres.url, zookeeper.url]
        for url in urls:
            print(f"\n===== benchmarks/locks.py {url}", flush=True)
            done = subprocess.run([sys.executable, str(HERE / "locks.py"), url, *lock_args])
            status = status or done.returncode
        goals = [  # each prints the goals as PASS/FAIL against its same-run reference
            ("redis_raw.py", redis.url,
             ["--pairs", str(max(4 * args.pairs, 8000)), "--handoffs", str(args.handoffs)]),
            ("postgres_raw.py", postgres.url, ["--handoffs", str(args.handoffs)]),
            ("zookeeper_raw.py", zookeeper.url,
             ["--pairs", str(args.pairs), "--handoffs", str(args.handoffs)]),
        ]  # fmt: skip
        for script, url, extra in goals:
            print(f"\n===== benchmarks/{script} {url} (goals: PASS/FAIL)", flush=True)
            done = subprocess.run([sys.executable, str(HERE / script), url, *extra])
            status = status or done.returncode
        if not args.skip_scheduler:
            print("\n===== benchmarks/scheduler.py", flush=True)
            sched_urls = ["memory://bench", f"sqlite:///{tmp}/sched.db", *urls[1:]]
            done = subprocess.run([sys.executable, str(HERE / "scheduler.py"), *sched_urls])
            status = status or done.returncode
    if args.scale:  # after the servers above are gone: scale.py starts its own
        with tempfile.TemporaryDirectory() as tmp:
            status = scale_goals(Path(tmp) / "scale.json") or status
    return status


#: Dispatch lag p99 goals of the 8 x 200 scale run (ms).
SCALE_LAG_P99_MS = {"redis": 100.0, "postgres": 100.0, "zookeeper": 250.0}


def scale_goals(json_path: Path) -> int:
    """Run the 8 x 200 scale configuration and print its goals as PASS/FAIL (1 if any failed)."""
    print("\n===== benchmarks/scale.py 8 x 200 every 2 s (goals: PASS/FAIL)", flush=True)
    command = [
        sys.executable, str(HERE / "scale.py"), "--backends", ",".join(SCALE_LAG_P99_MS),
        "--procs", "8", "--jobs", "200", "--period", "2", "--ticks", "15",
        "--json", str(json_path),
    ]  # fmt: skip
    done = subprocess.run(command)
    if done.returncode or not json_path.exists():
        print("FAIL  scale.py did not finish")
        return 1
    failed = False
    for row in json.loads(json_path.read_text())["load"]:
        goal = SCALE_LAG_P99_MS[row["backend"]]
        checks = [
            (f"{row['backend']}: no duplicate runs", row["duplicates"] == 0,
             str(row["duplicates"])),
            (f"{row['backend']}: no missed ticks", row["misses"] == 0, str(row["misses"])),
            (f"{row['backend']}: dispatch lag p99 < {goal:.0f} ms", row["lag_p99_ms"] < goal,
             f"{row['lag_p99_ms']:.1f} ms (load {row['load_before']})"),
        ]  # fmt: skip
        for label, ok, figure in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {label}: {figure}")
            failed = failed or not ok
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
