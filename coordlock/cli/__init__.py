"""The ``coordlock`` command: run a command under a lock (crontab lines), list and force-release
locks, show run history and jobs, check a backend, and the demo.

Each subcommand lives in its own module (``run``, ``locks``, ``history``, ``check``,
``init``, ``demo``, ``dashboard``); this module builds the parser and maps errors and signals
to exit statuses.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .._errors import (
    BackendUnavailable,
    ConfigurationError,
    CoordlockError,
    LockNotAcquired,
)
from .._redact import redact_url
from .._registry import known_schemes
from . import check, dashboard, demo, history, init, locks, run
from ._common import (
    EX_CONFIG,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Context,
    Interrupted,
    UsageError,
    cli_logging,
    default_state_file,
    default_url,
    duration,
    exit_status_for_signal,
    signals_raise,
)

__all__ = [
    "EX_CONFIG",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "build_parser",
    "default_state_file",
    "default_url",
    "main",
]

EPILOG = f"""\
The URL: --url, else $COORDLOCK_URL, else the SQLite file
  {default_state_file()}
(one host only; use redis://, postgresql:// or zookeeper:// across servers). An empty
--url or a set-but-blank $COORDLOCK_URL is an error, never a silent fallback.
Known schemes: {", ".join(s + "://" for s in known_schemes())}

Global options (-v, --url, --retry-deadline, --json) go before or after the command.

Exit statuses: 0 done (for 'run': the command's own status, 128+N if signal N killed it);
{EX_USAGE} bad usage; {EX_UNAVAILABLE} backend unavailable; {EX_TEMPFAIL} lock busy, or the tick ran
elsewhere; {EX_CONFIG} configuration error (bad URL, unknown scheme, missing driver);
130 / 143 / 129 interrupted by SIGINT (Ctrl-C) / SIGTERM / SIGHUP.
"""


class _Parser(argparse.ArgumentParser):
    """Exits with EX_USAGE (64) on bad usage, as documented, instead of argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _global_options(where: str) -> argparse.ArgumentParser:
    """The options accepted both before and after the subcommand (``where``: pre or post)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")
    group.add_argument(
        "-v",
        "--verbose",
        dest=f"verbose_{where}",
        action="count",
        default=0,
        help="log more: -v the backend used and retries, -vv debug",
    )
    group.add_argument(
        "--url",
        dest=f"url_{where}",
        default=None,
        metavar="URL",
        help="coordinator URL (default: $COORDLOCK_URL, else the local SQLite file)",
    )
    group.add_argument(
        "--retry-deadline",
        dest=f"retry_deadline_{where}",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how long to retry an unreachable backend before giving up (default 10s)",
    )
    group.add_argument(
        "--json",
        dest=f"json_{where}",
        action="store_true",
        help="machine-readable output (locks, unlock, history, jobs, check)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``coordlock`` command."""
    parser = _Parser(
        prog="coordlock",
        description="Distributed locks and once-per-tick scheduling across servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options("pre")],
    )
    parser.add_argument("--version", action="version", version=f"coordlock {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    parents = [_global_options("post")]
    run.add_parser(sub, parents, EPILOG)
    locks.add_parsers(sub, parents)
    history.add_parsers(sub, parents)
    check.add_parser(sub, parents)
    init.add_parser(sub, parents)
    demo.add_parser(sub, parents)
    dashboard.add_parser(sub, parents)
    return parser


def _context(args: argparse.Namespace) -> Context:
    urls = [u for u in (args.url_pre, args.url_post) if u is not None]
    if len(urls) == 2 and urls[0] != urls[1]:
        raise UsageError("--url given twice, with different values")
    deadline = args.retry_deadline_post
    if deadline is None:
        deadline = args.retry_deadline_pre
    return Context(
        url=urls[-1] if urls else None,
        verbose=args.verbose_pre + args.verbose_post,
        json=args.json_pre or args.json_post,
        retry_deadline=deadline,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coordlock`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    if args.cmd is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    try:
        ctx = _context(args)
    except UsageError as exc:
        print(f"coordlock: {exc}", file=sys.stderr)
        return EX_USAGE
    return _dispatch(args, ctx)


def _dispatch(args: argparse.Namespace, ctx: Context) -> int:
    with cli_logging(ctx):
        try:
            with signals_raise():
                if ctx.json and not getattr(args, "supports_json", False):
                    raise UsageError(f"'{args.cmd}' has no --json output")
                status: int = args.func(args, ctx)
                return status
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else 2
            print("coordlock: interrupted", file=sys.stderr)
            return exit_status_for_signal(signum)
        except (UsageError, ValueError, TypeError) as exc:
            _say(ctx, exc)
            return EX_USAGE
        except ConfigurationError as exc:
            _say(ctx, exc)
            return EX_CONFIG
        except BackendUnavailable as exc:
            where = redact_url(ctx.resolved) if ctx.resolved else "backend"
            _say(ctx, f"backend unavailable ({where}): {exc}")
            return EX_UNAVAILABLE
        except LockNotAcquired as exc:
            _say(ctx, exc)
            return EX_TEMPFAIL
        except CoordlockError as exc:
            _say(ctx, exc)
            return EX_UNAVAILABLE
        except BrokenPipeError:
            return 0  # `coordlock locks | head`: the reader had enough
        except Exception as exc:  # a driver error the core did not classify
            _say(ctx, f"unexpected {type(exc).__name__}: {exc}")
            if ctx.verbose > 1:
                import traceback

                print(ctx.scrub(traceback.format_exc()), file=sys.stderr)
            return EX_SOFTWARE


def _say(ctx: Context, message: object) -> None:
    print(f"coordlock: {ctx.scrub(str(message))}", file=sys.stderr)


def script() -> NoReturn:  # pragma: no cover - the console script and python -m
    """Run :func:`main` as a program and exit with its status."""
    threading.current_thread().name = "coordlock-cli"
    sys.exit(main())
