"""``coordlock run``: run a command while holding a lock (a crontab line's ``flock -n``).

Once per tick. With ``--every DURATION`` or ``--cron EXPR [--tz TZ]`` the same crontab line on
every server runs ``CMD`` once per scheduled tick in total, not once per server: coordlock
names the scheduled tick nearest to now (within ``--skew``, default ``min(period / 2, 60s)``),
claims ``NAME@<tick UTC>`` (the Scheduler's claim key), and only the winner takes the lock and
runs ``CMD``; the others exit 75 (0 with ``--busy-ok``). ``CMD`` gets ``COORDLOCK_TICK`` (the
tick, ISO 8601 UTC) and ``COORDLOCK_FENCE`` (the lease's fencing token) in its environment.
A start outside every tick's tolerance does not run ``CMD`` and always says why (exit 75,
even with ``--busy-ok`` or ``-q``: the crontab schedule and ``--every``/``--cron`` disagree,
or cron started it very late) unless ``--off-tick run``.

Signals. ``CMD`` runs in a process group of its own, and coordlock passes each SIGINT,
SIGTERM and SIGHUP it receives to that group exactly once. At a terminal, Ctrl-C goes to the
terminal's foreground process group, which is coordlock's and not ``CMD``'s, so ``CMD`` hears
it once (from coordlock) rather than twice. For the same reason ``CMD`` gets ``/dev/null`` as
stdin when coordlock's stdin is a terminal: a background process group that reads the
terminal would be stopped (SIGTTIN). Ctrl-Z stops ``CMD``'s group and then coordlock; ``fg``
continues both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

from .. import _locking
from .._errors import BackendUnavailable, LockNotAcquired
from .._lease import Lease
from .._locking import OFF_TICK, LockContext, TickNotRun
from .._validate import check_name
from ._common import (
    EX_TEMPFAIL,
    TERMINATING,
    Context,
    Interrupted,
    UsageError,
    duration,
    exit_status_for_signal,
    signals_raise,
    wait_duration,
)

#: The shortest ``--ttl`` accepted (seconds): below it a renewal every ttl/3 cannot keep up
#: with a round trip to a server across the network, so the lease would be lost at once.
MIN_TTL = 1.0


def _group_kwargs() -> dict[str, Any]:
    """Popen arguments that put the child in a new process group of its own."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"start_new_session": True}  # pragma: no cover - Python 3.10


def check_run_args(args: argparse.Namespace) -> list[str]:
    """Validate ``coordlock run``'s arguments; return the command to run."""
    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError(
            "no command given: put it after --, e.g. coordlock run --name sync -- ./sync.sh"
        )
    check_name(args.name, "--name")
    if args.ttl < MIN_TTL:
        raise UsageError(
            f"--ttl {args.ttl:g}s is too short: at least {MIN_TTL:g}s (the lease is renewed "
            "every ttl/3 while CMD runs, and each renewal is a round trip to the backend)"
        )
    return command


def tick_spec_of(args: argparse.Namespace) -> Any:
    """The :class:`~coordlock._ticks.TickSpec` of ``--every``/``--cron`` (``None`` without
    them); ``UsageError`` for options that do not go together."""
    ticking = args.every is not None or args.cron is not None
    if args.tz is not None and args.cron is None:
        raise UsageError("--tz only applies with --cron (--every ticks are aligned to UTC)")
    if not ticking:
        for flag, value in (("--skew", args.skew), ("--off-tick", args.off_tick)):
            if value is not None:
                raise UsageError(f"{flag} only applies with --every or --cron")
        return None
    from .._ticks import tick_spec

    try:
        return tick_spec(
            args.name, cron=args.cron, timezone=args.tz, every=args.every, skew=args.skew,
            off_tick=args.off_tick or "skip",
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        flag = "--cron" if args.cron is not None else "--every"
        raise UsageError(f"{flag}: {exc}") from exc


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """Take the lock, run the command, release the lock; see ``coordlock run --help``."""
    command = check_run_args(args)
    spec = tick_spec_of(args)
    started = _locking.wall_clock()  # cron started us for this tick, however slow the connect
    coordinator = ctx.open()
    try:
        held = LockContext(
            args.name, args.ttl, args.wait, coordinator=coordinator,
            hold_at_least=args.min_hold, tick=spec,
        )  # fmt: skip
        try:
            with signals_raise():  # Ctrl-C during --wait: exit 130, no traceback
                lease = held.acquire(now=started)
        except TickNotRun as exc:
            return _tick_not_run(exc, command, args)
        except LockNotAcquired:
            if not args.quiet:
                print(
                    f"coordlock: lock {args.name!r} is held elsewhere; not running {command[0]}",
                    file=sys.stderr,
                )
            return 0 if args.busy_ok else EX_TEMPFAIL
        env = {"COORDLOCK_FENCE": str(lease.fence)}
        if held.decision is not None and held.decision.tick_iso is not None:
            env["COORDLOCK_TICK"] = held.decision.tick_iso
        return _run_locked(lease, command, args, env)
    finally:
        coordinator.close()


def _tick_not_run(exc: TickNotRun, command: list[str], args: argparse.Namespace) -> int:
    """Say why the tick did not run here; 75, or 0 with ``--busy-ok`` (never for off-tick)."""
    if exc.reason == OFF_TICK:
        hint = " (--off-tick run runs such starts anyway)" if exc.tick is None else ""
        print(f"coordlock: not running {command[0]}: {exc.detail}{hint}", file=sys.stderr)
        return EX_TEMPFAIL
    if not args.quiet:
        tick = exc.key.rpartition("@")[2] if exc.key else "?"
        why = (
            "already ran elsewhere"
            if exc.reason != "running"
            else f"was won here, but lock {args.name!r} is still held by a run that has not ended"
        )
        print(f"coordlock: tick {tick} of {args.name!r} {why}; not running {command[0]}",
              file=sys.stderr)
    return 0 if args.busy_ok else EX_TEMPFAIL


class _Forwarder:
    """Signal handlers that pass each signal on to the child's process group, once."""

    def __init__(self) -> None:
        self.pgid: int | None = None
        self.pending: list[int] = []
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # pragma: no cover - main() runs in the main thread
        for sig in TERMINATING:
            self._previous[sig] = signal.signal(sig, self._forward)
        self._previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._stop)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def attach(self, pgid: int) -> None:
        self.pgid = pgid
        pending, self.pending = self.pending, []
        for sig in pending:
            self._send(sig)

    def _send(self, sig: int) -> None:
        if self.pgid is None:
            self.pending.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):  # the child's group is gone already
            os.killpg(self.pgid, sig)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        self._send(signum)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        # Ctrl-Z: stop the child's group, then stop ourselves; continue it when we continue.
        self._send(signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, self._stop)  # running again: SIGCONT arrived
        self._send(signal.SIGCONT)


def _run_locked(
    lease: Lease, command: list[str], args: argparse.Namespace, env: dict[str, str]
) -> int:
    forwarder = _Forwarder()
    forwarder.install()
    try:
        stdin = subprocess.DEVNULL if _stdin_is_terminal() else None
        try:
            child = subprocess.Popen(
                command, stdin=stdin, env={**os.environ, **env}, **_group_kwargs()
            )
        except OSError as exc:
            print(f"coordlock: cannot run {command[0]}: {exc}", file=sys.stderr)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        forwarder.attach(child.pid)

        def on_lost(lost: Lease) -> None:
            print(
                f"coordlock: lost lock {lost.name!r} while {command[0]} runs "
                f"({lost.lost_reason}); another instance may start it",
                file=sys.stderr,
            )
            if args.kill_on_lost and child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)

        lease.on_lost(on_lost)
        status = child.wait()
    finally:
        forwarder.restore()
        try:
            with signals_raise():
                lease.release()
        except BackendUnavailable as exc:
            print(f"coordlock: could not release {lease.name!r}: {exc}", file=sys.stderr)
        except Interrupted:
            pass  # a second signal while releasing: the lock expires after its ttl
    return exit_status_for_signal(-status) if status < 0 else status


def _stdin_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def add_parser(sub: Any, parents: list[argparse.ArgumentParser], epilog: str) -> None:
    """Register ``coordlock run``."""
    run = sub.add_parser(
        "run",
        parents=parents,
        help="run a command while holding a lock (like flock -n, across servers)",
        description=(
            "Run CMD while holding the lock NAME; skip it when the lock is held elsewhere.\n"
            "For crontab lines (the same line on every server; CMD runs once per tick in all):\n"
            "  */5 * * * * coordlock run --name sync --every 5m --busy-ok -q -- /app/sync.sh\n\n"
            "--every/--cron: claim the scheduled tick nearest to now (within --skew) first;\n"
            "a tick that already ran on another server exits 75 (0 with --busy-ok). CMD gets\n"
            "COORDLOCK_TICK (the tick, UTC) and COORDLOCK_FENCE in its environment.\n\n"
            "CMD runs in its own process group; SIGINT, SIGTERM and SIGHUP sent to coordlock\n"
            "are passed on to it once, then coordlock waits for it and releases the lock.\n"
            "At a terminal CMD's stdin is /dev/null."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--name", required=True, help="lock name, the same on every server")
    run.add_argument(
        "--ttl",
        type=duration,
        default=60.0,
        metavar="TTL",
        help=f"lease time-to-live, renewed every ttl/3 while CMD runs (e.g. 30s, 10m; "
        f"default 60s, at least {MIN_TTL:g}s)",
    )
    run.add_argument(
        "--wait",
        type=wait_duration,
        default=0.0,
        metavar="WAIT",
        help="wait this long for a busy lock (e.g. 30s, or 'forever'; default: don't wait)",
    )
    ticks = run.add_mutually_exclusive_group()
    ticks.add_argument(
        "--every",
        type=duration,
        default=None,
        metavar="DURATION",
        help="run once per tick of this interval across servers (ticks aligned to the Unix "
        "epoch, UTC: --every 5m fires at :00, :05, ...)",
    )
    ticks.add_argument(
        "--cron",
        default=None,
        metavar="EXPR",
        help="run once per tick of this cron expression across servers (quote it: "
        "--cron '*/5 * * * *'; the crontab line's own schedule)",
    )
    run.add_argument(
        "--tz",
        default=None,
        metavar="TZ",
        help="timezone of --cron (IANA name, e.g. Europe/Berlin; default UTC)",
    )
    run.add_argument(
        "--skew",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how early or late a start may be for its tick (default: half the period, at "
        "most 60s; at most half the period)",
    )
    run.add_argument(
        "--off-tick",
        choices=("skip", "run"),
        default=None,
        help="a start outside every tick's skew: skip (default, exit 75 with a message) or "
        "run under the lock alone",
    )
    run.add_argument(
        "--min-hold",
        type=duration,
        default=None,
        metavar="DURATION",
        help="keep the lock taken at least this long after it was acquired, even if CMD "
        "ends sooner (ShedLock's lockAtLeastFor)",
    )
    run.add_argument(
        "--busy-ok",
        action="store_true",
        help="exit 0 instead of 75 when busy or when the tick ran elsewhere",
    )
    run.add_argument(
        "--kill-on-lost",
        action="store_true",
        help="send SIGTERM to CMD's process group if the lock is lost while it runs",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="say nothing when busy")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(func=cmd_run)

