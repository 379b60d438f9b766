"""``python -m coordlock.testing.servers KIND``: run one throwaway server in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence

from ._common import KINDS, ServerUnavailable
from ._managed import ManagedServer
from .postgres import PostgresServer
from .redis import RedisServer
from .sentinel import SentinelServer
from .zookeeper import ZooKeeperEnsemble, ZooKeeperServer


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coordlock.testing.servers KIND``: run one server in the foreground.

    Prints ``URL=<url>`` on a line by itself (stdout, flushed) once the server answers, then
    waits; SIGINT/SIGTERM stop it cleanly. Exits 1 if it cannot start, 2 if it dies.
    """
    parser = argparse.ArgumentParser(
        prog="python -m coordlock.testing.servers",
        description="Run a throwaway server on a free loopback port until interrupted.",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="postgres: fsync/synchronous_commit off; zookeeper: forceSync=no",
    )
    parser.add_argument("--persistence", action="store_true", help="redis: append-only file")
    parser.add_argument("--size", type=int, default=3, help="zookeeper-ensemble: members")
    parser.add_argument("--timeout", type=float, default=90.0, help="startup timeout, seconds")
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    servers: list[ManagedServer] = []
    ensemble: ZooKeeperEnsemble | None = None
    try:
        if args.kind == "redis":
            servers.append(
                RedisServer(
                    persistence=args.persistence, port=args.port, start_timeout=args.timeout
                )
            )
        elif args.kind == "sentinel":
            master = RedisServer(persistence=args.persistence, start_timeout=args.timeout)
            servers += [master, SentinelServer(master, port=args.port, start_timeout=args.timeout)]
        elif args.kind == "postgres":
            servers.append(
                PostgresServer(fast=args.fast, port=args.port, start_timeout=args.timeout)
            )
        elif args.kind == "zookeeper":
            servers.append(
                ZooKeeperServer(fast=args.fast, port=args.port, start_timeout=args.timeout)
            )
        else:
            ensemble = ZooKeeperEnsemble(args.size, fast=args.fast, start_timeout=args.timeout)
            servers.extend(ensemble.members)
        began = time.monotonic()
        if ensemble is not None:
            ensemble.start()
            url = ensemble.url
        else:
            for server in servers:
                server.start()
            url = servers[-1].url
        print(f"URL={url}", flush=True)
        for server in servers:
            print(f"# {server!r} log={server.log_path}", file=sys.stderr)
        print(
            f"# ready after {time.monotonic() - began:.2f}s; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        while not stop_requested.wait(0.5):
            dead = [server for server in servers if not server.is_running()]
            if dead:
                print(f"# server died: {dead[0]!r}\n{dead[0].log_tail()}", file=sys.stderr)
                return 2
        return 0
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.close()
