"""``coordlock init [URL]``: create what a backend needs, once, as an administrator.

For PostgreSQL this creates (or upgrades) coordlock's schema, so that applications can run as
a role without ``CREATE`` (``?create_schema=false``; see docs/security.md for the grants). The
other backends create what they need on first use; ``init`` then only checks the connection.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._redact import redact_url
from ._common import EX_CONFIG, EX_UNAVAILABLE, Context, UsageError, print_json, resolve_url

POSTGRES_SCHEMES = ("postgresql", "postgres")


def cmd_init(args: argparse.Namespace, ctx: Context) -> int:
    """Create the schema (PostgreSQL) or check the connection (other backends)."""
    url, _ = resolve_url(args.init_url if args.init_url is not None else ctx.url)
    ctx.resolved = url
    scheme = url.split("://", 1)[0].lower()
    roles: list[str] = args.grant_to or []
    report: dict[str, Any] = {"url": redact_url(url), "backend": scheme, "schema_version": None,
                              "granted_to": roles}  # fmt: skip
    if scheme in POSTGRES_SCHEMES:
        from ..backends.postgres import init_schema

        options: dict[str, Any] = {}
        if ctx.retry_deadline is not None:
            options["retry_deadline"] = ctx.retry_deadline
        report["schema_version"] = init_schema(url, grant_to=roles, **options)
        message = f"schema ready (version {report['schema_version']}) at {report['url']}"
        if roles:
            message += f"; granted to {', '.join(roles)}"
    else:
        if roles:
            raise UsageError("--grant-to is for PostgreSQL only")
        ctx.open(url).close()
        message = (
            f"nothing to create for {scheme}://: it creates what it needs on first use "
            f"(connection to {report['url']} ok)"
        )
    if ctx.json:
        print_json(report)
    else:
        print(f"coordlock: {message}")
    return 0


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``coordlock init``."""
    init = sub.add_parser(
        "init",
        parents=parents,
        help="create the backend's schema once, as an administrator (PostgreSQL)",
        description=(
            "Create or upgrade coordlock's schema in a PostgreSQL database (URL, else --url,\n"
            "else $COORDLOCK_URL), once, as a role that may create it. Safe to run again and\n"
            "while applications run. --grant-to ROLE grants a run-time role exactly what\n"
            "coordlock needs, so the applications can connect with ?create_schema=false and\n"
            "never issue DDL (docs/security.md lists the grants). Other backends create what\n"
            "they need on first use: init only checks the connection. Exit status: 0 done,\n"
            f"{EX_UNAVAILABLE} unavailable, {EX_CONFIG} configuration error. --json prints\n"
            '{"url", "backend", "schema_version", "granted_to"}.'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("init_url", nargs="?", metavar="URL", help="the backend to initialise")
    init.add_argument(
        "--grant-to", action="append", metavar="ROLE",
        help="a PostgreSQL role to grant coordlock's run-time privileges (repeatable)",
    )  # fmt: skip
    init.set_defaults(func=cmd_init, supports_json=True)
