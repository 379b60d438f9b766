"""A scheduler instance in its own process, for ``coordlock demo`` and the multi-process tests.

    python -m coordlock.scheduler._worker --url URL --instance NAME [--offset S] [--speed X]
        --runs RUNS.jsonl [--events EVENTS.jsonl] [--log LOG.txt]
        [--interval S] [--cron EXPR] [--job-seconds S] [--duration S] [--import MODULE]
        [--heartbeat-ttl S] [--watchdog-interval S] [--die-on-lease]

Each run of a job appends ``{"job", "key", "instance", "pid", "phase": "begin"|"end", "t"}``
to ``--runs`` (one ``write`` with ``O_APPEND`` per line, so lines of concurrent processes never
interleave); ``--events`` gets every scheduler event plus a ``ready`` line; ``--log`` gets the
``coordlock`` logger at DEBUG (claim wins included). The process stops cleanly on SIGTERM, after
``--duration`` seconds, or when its parent goes away. ``--die-on-lease`` plays the crash between
a won claim and the run: the process SIGKILLs itself when it asks for a job's no-overlap lease.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .._lease import Lease
from .._protocol import RunCoordinator
from .._registry import connect
from ._clock import OffsetClock
from .claims import JOB_LEASE_PREFIX
from .events import Event
from .job import current_run
from .loop import Scheduler


class DieOnJobLease:
    """Delegates to a coordinator, but SIGKILLs this process when a job's no-overlap lease is
    asked for: the instance dies after winning a tick's claim (and recording it), before the
    run."""

    def __init__(self, inner: RunCoordinator) -> None:
        self._inner = inner

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        if name.startswith(JOB_LEASE_PREFIX):
            os.kill(os.getpid(), signal.SIGKILL)
        return self._inner.acquire(name, ttl, wait=wait, renew=renew)

    def __getattr__(self, name: str) -> Any:  # release, extend, claim(_many), history…
        return getattr(self._inner, name)


def append_line(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write."""
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def event_logger(path: str) -> Callable[[Event], None]:
    """A scheduler event callback that appends each event to ``path`` as one JSON line."""

    def on_event(event: Event) -> None:
        append_line(
            path,
            {
                "kind": event.kind,
                "job": event.job,
                "key": event.key,
                "instance": event.instance,
                "reason": event.reason,
                "count": event.count,
                "error": event.error,
                "t": time.time(),
            },
        )

    return on_event


def record_run(path: str, seconds: float) -> None:
    """The job every worker runs: log begin, optionally work, log end."""
    ctx = current_run()
    assert ctx is not None
    base = {"job": ctx.job, "key": ctx.key, "instance": ctx.instance, "pid": os.getpid()}
    append_line(path, {**base, "phase": "begin", "t": time.time()})
    if seconds > 0:
        time.sleep(seconds)
    append_line(path, {**base, "phase": "end", "t": time.time()})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m coordlock.scheduler._worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--offset", type=float, default=0.0, help="clock skew in seconds")
    parser.add_argument("--speed", type=float, default=1.0, help="clock speed factor")
    parser.add_argument("--runs", required=True, help="JSONL file the job appends to")
    parser.add_argument("--events", help="JSONL file for scheduler events")
    parser.add_argument("--log", help="text file for the coordlock logger (DEBUG)")
    parser.add_argument("--interval", type=float, default=1.0, help="interval job period (0: off)")
    parser.add_argument("--cron", help="also a cron job with this expression")
    parser.add_argument("--job-seconds", type=float, default=0.0, help="how long a run lasts")
    parser.add_argument("--duration", type=float, default=600.0, help="exit after this long")
    parser.add_argument("--import", dest="imports", action="append", default=[])
    parser.add_argument("--heartbeat-ttl", type=float, default=30.0)
    parser.add_argument("--watchdog-interval", type=float, default=30.0)
    parser.add_argument("--die-on-lease", action="store_true", help="SIGKILL at a job lease")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    if args.log:
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(created).6f %(levelname)s %(message)s"))
        logger = logging.getLogger("coordlock")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    coordinator = connect(args.url)
    sched = Scheduler(
        DieOnJobLease(coordinator) if args.die_on_lease else coordinator,
        instance_id=args.instance,
        clock=OffsetClock(args.offset, args.speed),
        shutdown_grace=5.0,
        heartbeat_ttl=args.heartbeat_ttl,
        watchdog_interval=args.watchdog_interval,
    )
    if args.interval > 0:
        sched.add(
            record_run,
            args.interval,
            name="interval",
            args=(args.runs, args.job_seconds),
        )
    if args.cron:
        sched.add(record_run, args.cron, name="cron", args=(args.runs, args.job_seconds))
    events_path = args.events

    if events_path:
        sched.on("*", event_logger(events_path))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()
    deadline = time.monotonic() + args.duration

    def guard() -> None:
        # Stop (through the SIGTERM path) when the parent dies or the duration runs out.
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=guard, name="worker-guard", daemon=True).start()
    sched.start()
    if events_path:
        append_line(
            events_path,
            {"kind": "ready", "instance": args.instance, "pid": os.getpid(), "t": time.time()},
        )
    while not stop.wait(0.5):
        pass
    sched.stop(wait=True)
    coordinator.close()
    return 0


if __name__ == "__main__":  # pragma: no cover - process entry point
    raise SystemExit(main())
