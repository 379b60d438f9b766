"""``coordlock check [URL]``: is the backend reachable and usable from here?"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._errors import BackendUnavailable, ConfigurationError
from .._protocol import RunCoordinator
from .._redact import redact_url
from ._common import EX_CONFIG, EX_UNAVAILABLE, Context, print_json


def _field(info: object, *names: str) -> Any:
    for name in names:
        if isinstance(info, Mapping) and name in info:
            return info[name]
        if hasattr(info, name):
            return getattr(info, name)
    return None


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000.0


def probe(coordinator: RunCoordinator) -> dict[str, Any]:
    """Measure one claim and one acquire/release; ask ``server_info()`` where offered.

    Returns the fields of ``coordlock check --json`` that a working backend fills in.
    Raises what the backend raises (``ConfigurationError``, ``BackendUnavailable``, ...).
    """
    result: dict[str, Any] = {
        "server_version": None,
        "clock_offset": None,
        "claim_ms": None,
        "lock_ms": None,
        "schema": None,
    }
    server_info = getattr(coordinator, "server_info", None)
    if callable(server_info):
        before = time.time()
        info = server_info()
        after = time.time()
        version = _field(info, "version", "server_version")
        result["server_version"] = None if version is None else str(version)
        server_time = _field(info, "time", "server_time")
        if isinstance(server_time, (int, float)) and not isinstance(server_time, bool):
            result["clock_offset"] = float(server_time) - (before + after) / 2
    token = os.urandom(6).hex()
    key = f"coordlock-check:{token}"
    result["claim_ms"] = _timed(lambda: coordinator.claim(key, 1.0))

    def lock_round_trip() -> None:
        lease = coordinator.acquire(key, 5.0)
        if lease is None:  # a name made of 48 random bits: someone else cannot hold it
            raise BackendUnavailable(f"could not take the fresh lock {key!r}")
        lease.release()

    result["lock_ms"] = _timed(lock_round_trip)
    result["schema"] = "ok"
    return result


def cmd_check(args: argparse.Namespace, ctx: Context) -> int:
    """Connect, measure, report; exit 0 healthy, 69 unavailable, 78 misconfigured."""
    url = args.check_url
    report: dict[str, Any] = {
        "url": None,
        "backend": None,
        "status": None,
        "error": None,
        "server_version": None,
        "round_trip_ms": {"claim": None, "lock": None},
        "clock_offset": None,
        "schema": None,
    }
    status = 0
    coordinator: RunCoordinator | None = None
    try:
        coordinator = ctx.open(url)
        report["url"] = redact_url(ctx.resolved or "")
        report["backend"] = (ctx.resolved or "").split("://", 1)[0].lower()
        measured = probe(coordinator)
        report["server_version"] = measured["server_version"]
        report["clock_offset"] = measured["clock_offset"]
        report["round_trip_ms"] = {"claim": measured["claim_ms"], "lock": measured["lock_ms"]}
        report["schema"] = measured["schema"]
        report["status"] = "healthy"
    except ConfigurationError as exc:
        report.update(status="configuration-error", error=ctx.scrub(str(exc)), schema="failed")
        status = EX_CONFIG
    except Exception as exc:  # any backend or driver failure: the backend is not usable
        report.update(status="unavailable", error=ctx.scrub(f"{exc}"), schema=None)
        status = EX_UNAVAILABLE
    finally:
        if coordinator is not None:
            with contextlib.suppress(Exception):
                coordinator.close()
    if report["url"] is None and ctx.resolved:
        report["url"] = redact_url(ctx.resolved)
        report["backend"] = ctx.resolved.split("://", 1)[0].lower()
    if ctx.json:
        print_json(report)
    else:
        _print(report)
    return status


def _print(report: dict[str, Any]) -> None:
    def line(label: str, value: object) -> None:
        print(f"{label + ':':<14}{value}")

    line("url", report["url"] or "-")
    line("backend", report["backend"] or "-")
    if report["status"] == "healthy":
        line("server", report["server_version"] or "unknown")
        trips = report["round_trip_ms"]
        line("round trip", f"claim {trips['claim']:.1f} ms, acquire+release {trips['lock']:.1f} ms")
        offset = report["clock_offset"]
        if offset is None:
            line("clock offset", "unknown (the backend does not report its time)")
        else:
            side = "ahead of" if offset >= 0 else "behind"
            line("clock offset", f"{offset:+.3f} s (the server's clock is {side} this host's)")
        line("schema/keys", "ok (created or already there)")
    line("status", report["status"])
    if report["error"]:
        print(f"coordlock: {report['error']}", file=sys.stderr)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``coordlock check``."""
    check = sub.add_parser(
        "check",
        parents=parents,
        help="check a backend: reachable, server version, round trip, clock offset",
        description=(
            "Connect to the backend (URL, else --url, else $COORDLOCK_URL, else the default\n"
            "SQLite file) and report: the backend, the server's version and its clock offset\n"
            "from this host where the backend tells them (else 'unknown'), the round trip of\n"
            "one claim and of one acquire+release of a fresh 'coordlock-check:<random>' name,\n"
            "and whether coordlock could create its schema or keys. Exit status: 0 healthy,\n"
            f"{EX_UNAVAILABLE} unavailable, {EX_CONFIG} configuration error. --json prints\n"
            '{"url", "backend", "status", "error", "server_version", "round_trip_ms":\n'
            '{"claim", "lock"}, "clock_offset", "schema"}.'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("check_url", nargs="?", metavar="URL", help="the backend to check")
    check.set_defaults(func=cmd_check, supports_json=True)
