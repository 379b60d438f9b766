"""``coordlock dashboard``: serve the status page and its JSON API (Starlette on uvicorn)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import sys
from typing import Any

from .._errors import ConfigurationError
from .._redact import redact_url
from ._common import EX_UNAVAILABLE, Context, duration, positive_int

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_dashboard(args: argparse.Namespace, ctx: Context) -> int:
    """Serve the dashboard until interrupted (Ctrl-C, SIGTERM)."""
    try:
        import uvicorn

        from .. import dashboard
    except ImportError as exc:
        raise ConfigurationError(
            f"coordlock dashboard needs {exc.name or 'Starlette and uvicorn'}: "
            "pip install 'coordlock[dashboard]'"
        ) from exc
    coordinator = ctx.open()
    try:
        label = f"{getattr(coordinator, 'backend_name', '')} · {redact_url(ctx.resolved or '')}"
        app = dashboard.app(
            coordinator, refresh=args.refresh, window=args.window, label=label
        )
        unlock = app.state.dashboard.unlock
        where = f"http://{args.host}:{args.port}/"
        mode = "force-unlock enabled" if unlock else (
            f"read-only; set ${dashboard.TOKEN_ENV} to allow force-unlock"
        )
        print(f"coordlock dashboard on {where} ({mode}); Ctrl-C stops it", file=sys.stderr)
        if not _loopback(args.host):
            print(
                f"coordlock: warning: listening on {args.host}, not loopback: anyone who can "
                "reach it sees lock and job names, hosts and errors; put it behind your own "
                "authentication",
                file=sys.stderr,
            )
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", lifespan="on"
        )
        server: Any = uvicorn.Server(config)
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind
            server.run()
        if not server.started:
            print(f"coordlock: could not listen on {args.host}:{args.port}", file=sys.stderr)
            return EX_UNAVAILABLE
    finally:
        coordinator.close()
    return 0


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``coordlock dashboard``."""
    parser = sub.add_parser(
        "dashboard",
        parents=parents,
        help="serve the status page: instances, jobs, runs, held locks (needs [dashboard])",
        description=(
            "Serve a web page and a JSON API (api/overview, api/runs, api/jobs, api/locks,\n"
            "api/instances) from the coordinator's own data: scheduler instances, jobs with\n"
            "their last run, the recent runs (failed, stuck and missed highlighted) and the\n"
            "held locks. Read-only unless $COORDLOCK_DASHBOARD_TOKEN holds a token (16+\n"
            "characters): then each lock has a force-unlock button that needs the token and a\n"
            "confirmation. Listens on loopback by default. Needs pip install\n"
            "'coordlock[dashboard]'. Runs until Ctrl-C or SIGTERM, then shuts down cleanly and\n"
            f"exits 130 / 143 (as every command does); exits {EX_UNAVAILABLE} when it cannot\n"
            "listen."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--refresh", type=duration, default=5.0, metavar="DURATION",
        help="how often the page refreshes itself (default 5s; 0 = never)",
    )  # fmt: skip
    parser.add_argument(
        "--window", type=positive_int, default=500, metavar="N",
        help="newest runs read for the jobs and instances tables (default 500)",
    )  # fmt: skip
    parser.set_defaults(func=cmd_dashboard, supports_json=False)
