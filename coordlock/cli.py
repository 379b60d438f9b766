"""The ``coordlock`` command: run a command under a lock (for crontab lines), list locks,
show run history, and the scheduler demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from . import __version__
from ._errors import BackendUnavailable, ConfigurationError, LockNotAcquired
from ._lease import Lease
from ._protocol import KeepsHistory, ListsLocks, RunCoordinator
from ._registry import connect, known_schemes, redact
from ._validate import parse_duration

# Exit statuses (sysexits.h), documented in --help and docs/cli.md.
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75  # the lock was busy
EX_CONFIG = 78

log = logging.getLogger("coordlock")


def default_url() -> str:
    """``$COORDLOCK_URL``, else an SQLite file in the user's state directory."""
    url = os.environ.get("COORDLOCK_URL", "").strip()
    if url:
        return url
    return f"sqlite:///{default_state_file()}"


def default_state_file() -> Path:
    """``$XDG_STATE_HOME/coordlock/locks.db`` (default ``~/.local/state/coordlock/locks.db``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "coordlock" / "locks.db"


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _wait(text: str) -> float:
    if text.strip().lower() in ("forever", "inf"):
        return float("inf")
    return _duration(text)


def _open(url: str | None) -> RunCoordinator:
    url = url or default_url()
    if url == f"sqlite:///{default_state_file()}":
        default_state_file().parent.mkdir(parents=True, exist_ok=True)
    return connect(url)


# -- coordlock run --------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    command: list[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("coordlock run: no command given (put it after --)", file=sys.stderr)
        return EX_USAGE
    coordinator = _open(args.url)
    try:
        lease = coordinator.acquire(args.name, args.ttl, wait=args.wait)
        if lease is None:
            raise LockNotAcquired(args.name)
        return _run_locked(lease, command, args)
    except LockNotAcquired:
        if not args.quiet:
            print(
                f"coordlock: lock {args.name!r} is held elsewhere; not running {command[0]}",
                file=sys.stderr,
            )
        return 0 if args.busy_ok else EX_TEMPFAIL
    finally:
        coordinator.close()


def _run_locked(lease: Lease, command: list[str], args: argparse.Namespace) -> int:
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        lease.release()
        print(f"coordlock: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126

    def on_lost(lost: Lease) -> None:
        print(
            f"coordlock: lost lock {lost.name!r} while {command[0]} runs "
            f"({lost.lost_reason}); another instance may start it",
            file=sys.stderr,
        )
        if args.kill_on_lost and child.poll() is None:
            child.terminate()

    lease.on_lost(on_lost)

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            lease.release()
        except BackendUnavailable as exc:
            print(f"coordlock: could not release {lease.name!r}: {exc}", file=sys.stderr)
    return 128 - status if status < 0 else status


# -- coordlock locks / history --------------------------------------------------------------


def cmd_locks(args: argparse.Namespace) -> int:
    coordinator = _open(args.url)
    try:
        if not isinstance(coordinator, ListsLocks):
            print("coordlock: this backend cannot list held locks", file=sys.stderr)
            return EX_UNAVAILABLE
        held = coordinator.locks()
    finally:
        coordinator.close()
    if not held:
        print("no locks held")
        return 0
    now = time.time()
    width = max(4, *(len(info.name) for info in held))
    print(f"{'NAME':<{width}}  {'FENCE':>20}  {'EXPIRES IN':>10}  OWNER")
    for info in held:
        left = "-" if info.expires_at is None else f"{max(0.0, info.expires_at - now):.1f}s"
        print(f"{info.name:<{width}}  {info.fence:>20}  {left:>10}  {info.owner}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    coordinator = _open(args.url)
    try:
        if not isinstance(coordinator, KeepsHistory):
            print("coordlock: this backend keeps no run history", file=sys.stderr)
            return EX_UNAVAILABLE
        runs = coordinator.history(args.job, limit=args.limit)
    finally:
        coordinator.close()
    if not runs:
        print("no runs recorded")
        return 0
    print(f"{'JOB':<24} {'TICK':<26} {'STATUS':<9} {'SECONDS':>8}  INSTANCE")
    for run in runs:
        took = "-" if run.finished is None else f"{run.finished - run.started:.2f}"
        print(f"{run.job:<24} {run.tick:<26} {run.status:<9} {took:>8}  {run.instance}")
        if run.error:
            print(f"    error: {run.error}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args.url, args.seconds)


# -- the parser -----------------------------------------------------------------------------

EPILOG = f"""\
URL: --url, else $COORDLOCK_URL, else the SQLite file {default_state_file()}
(one host only; use redis://, postgresql:// or zookeeper:// across servers).
Known schemes: {", ".join(s + "://" for s in known_schemes())}

Exit statuses of 'coordlock run': the command's own when it ran (128+N if signal N
killed it); {EX_TEMPFAIL} when the lock was busy (0 with --busy-ok); {EX_UNAVAILABLE} when the
backend is unreachable; {EX_CONFIG} for a bad URL or missing driver; {EX_USAGE} for bad usage.
"""


class _Parser(argparse.ArgumentParser):
    """Exits with EX_USAGE (64) on bad usage, as documented, instead of argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``coordlock`` command."""
    parser = _Parser(
        prog="coordlock",
        description="Distributed locks and once-per-tick scheduling across servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"coordlock {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a command while holding a lock (like flock -n, across servers)",
        description="Run CMD while holding the lock NAME; skip it when the lock is held "
        "elsewhere. For crontab lines: */5 * * * * coordlock run --name sync --ttl 10m -- sync.sh",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--name", required=True, help="lock name, shared by every server")
    run.add_argument(
        "--ttl", type=_duration, default=60.0,
        help="lease time-to-live, renewed every ttl/3 while CMD runs (e.g. 30s, 10m; default 60s)",
    )
    run.add_argument(
        "--wait", type=_wait, default=0.0,
        help="wait this long for a busy lock (e.g. 30s, or 'forever'; default: don't wait)",
    )
    run.add_argument("--url", help="coordinator URL (see below)")
    run.add_argument("--busy-ok", action="store_true", help="exit 0 when the lock is busy")
    run.add_argument(
        "--kill-on-lost", action="store_true",
        help="send SIGTERM to CMD if the lock is lost while it runs",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="say nothing when busy")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(func=cmd_run)

    locks = sub.add_parser("locks", help="list held locks (where the backend can tell)")
    locks.add_argument("--url", help="coordinator URL")
    locks.set_defaults(func=cmd_locks)

    history = sub.add_parser("history", help="show scheduler run history")
    history.add_argument("--url", help="coordinator URL")
    history.add_argument("--job", help="only this job")
    history.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    history.set_defaults(func=cmd_history)

    demo = sub.add_parser(
        "demo",
        help="3 scheduler instances (one skewed +2 s, one killed) run each tick exactly once",
    )
    demo.add_argument("--url", help="coordinator URL (default: a fresh SQLite file)")
    demo.add_argument("--seconds", type=float, default=12.0, help="how long to run (default 12)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coordlock`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return EX_USAGE
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("coordlock: %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else
                 logging.WARNING)
    try:
        status: int = args.func(args)
        return status
    except ConfigurationError as exc:
        print(f"coordlock: {exc}", file=sys.stderr)
        return EX_CONFIG
    except BackendUnavailable as exc:
        url = getattr(args, "url", None) or default_url()
        print(f"coordlock: backend unavailable ({redact(url)}): {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except (ValueError, TypeError) as exc:
        print(f"coordlock: {exc}", file=sys.stderr)
        return EX_USAGE


if __name__ == "__main__":  # pragma: no cover
    threading.current_thread().name = "coordlock-cli"
    sys.exit(main())
