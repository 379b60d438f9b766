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
    return status


if __name__ == "__main__":
    sys.exit(main())
