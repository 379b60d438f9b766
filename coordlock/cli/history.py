"""``coordlock history`` (scheduler runs, newest first), ``coordlock jobs`` (last run per job)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any

from .._protocol import KeepsHistory, RunRecord
from ..scheduler.control import RESERVED
from . import jobs as jobs_cli
from ._common import EX_UNAVAILABLE, Context, positive_int, print_json

#: How many runs ``coordlock jobs`` reads to find each job's last run.
JOBS_SCAN = 10_000


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-01-01T00:00:00.123Z``), or ``None``."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)
    return dt.isoformat(timespec="milliseconds") + "Z"


def duration_of(run: RunRecord) -> float | None:
    """Seconds the run took, ``None`` while it runs."""
    return None if run.finished is None else max(0.0, run.finished - run.started)


def run_record(run: RunRecord) -> dict[str, Any]:
    """The ``--json`` form of one run (the fields docs/cli.md documents)."""
    return {
        "run_id": run.run_id,
        "job": run.job,
        "tick": run.tick,
        "instance": run.instance,
        "status": run.status,
        "started": run.started,
        "finished": run.finished,
        "duration": duration_of(run),
        "error": run.error,
    }


def _history(
    ctx: Context, job: str | None, limit: int, extras: dict[str, Any] | None = None
) -> list[RunRecord] | None:
    coordinator = ctx.open()
    try:
        if not isinstance(coordinator, KeepsHistory):
            return None
        runs = coordinator.history(job, limit=limit)
        if extras is not None:
            extras.update(jobs_cli.job_extras(coordinator))
    finally:
        coordinator.close()
    return [run for run in runs if run.job not in RESERVED]  # job control rows


def cmd_history(args: argparse.Namespace, ctx: Context) -> int:
    """Show the scheduler's run history, newest first."""
    runs = _history(ctx, args.job, args.limit)
    if runs is None:
        print("coordlock: this backend keeps no run history", file=sys.stderr)
        return EX_UNAVAILABLE
    if ctx.json:
        print_json({"runs": [run_record(run) for run in runs]})
        return 0
    if not runs:
        print("no runs recorded")
        return 0
    width = max(3, *(len(r.job) for r in runs))
    print(f"{'JOB':<{width}}  {'TICK':<24}  {'STATUS':<9}  {'SECONDS':>8}  INSTANCE")
    for run in runs:
        took = duration_of(run)
        shown = "-" if took is None else f"{took:.2f}"
        print(f"{run.job:<{width}}  {run.tick:<24}  {run.status:<9}  {shown:>8}  {run.instance}")
        if run.error:
            print(f"{'':<{width}}  error: {run.error}")
    return 0


def last_runs(runs: list[RunRecord]) -> list[RunRecord]:
    """The newest run of each job, sorted by job name."""
    last: dict[str, RunRecord] = {}
    for run in runs:
        seen = last.get(run.job)
        if seen is None or run.started > seen.started:
            last[run.job] = run
    return [last[job] for job in sorted(last)]


def cmd_jobs(args: argparse.Namespace, ctx: Context) -> int:
    """Each job that has run or is published by a scheduler: paused or not, next run, and
    its last run, from the coordinator."""
    extras: dict[str, dict[str, Any]] = {}
    runs = _history(ctx, None, JOBS_SCAN, extras)
    if runs is None:
        print("coordlock: this backend keeps no run history", file=sys.stderr)
        return EX_UNAVAILABLE
    last = {run.job: run for run in last_runs(runs)}
    names = sorted(set(last) | set(extras))
    none: dict[str, Any] = {"paused": False, "trigger": None, "next_run": None}
    if ctx.json:
        print_json(
            {
                "jobs": [
                    {
                        "job": name,
                        "paused": extras.get(name, none)["paused"],
                        "trigger": extras.get(name, none)["trigger"],
                        "next_run": extras.get(name, none)["next_run"],
                        "next_run_iso": iso(extras.get(name, none)["next_run"]),
                        "last_run": None if name not in last else {
                            "tick": last[name].tick,
                            "started": last[name].started,
                            "started_iso": iso(last[name].started),
                            "status": last[name].status,
                            "instance": last[name].instance,
                            "duration": duration_of(last[name]),
                            "error": last[name].error,
                            "result": last[name].result,
                        },
                    }
                    for name in names
                ]
            }
        )  # fmt: skip
        return 0
    if not names:
        print("no runs recorded")
        return 0
    width = max(3, *(len(name) for name in names))
    print(
        f"{'JOB':<{width}}  {'STATE':<6}  {'NEXT RUN (UTC)':<19}  {'LAST RUN (UTC)':<19}  "
        f"{'STATUS':<9}  {'SECONDS':>8}  INSTANCE"
    )
    for name in names:
        extra = extras.get(name, none)
        state = "paused" if extra["paused"] else "active"
        upcoming = (iso(extra["next_run"]) or "-")[:19].replace("T", " ")
        run = last.get(name)
        if run is None:
            print(f"{name:<{width}}  {state:<6}  {upcoming:<19}  {'-':<19}  {'-':<9}  {'-':>8}")
            continue
        took = duration_of(run)
        shown = "-" if took is None else f"{took:.2f}"
        started = (iso(run.started) or "-")[:19].replace("T", " ")
        print(
            f"{name:<{width}}  {state:<6}  {upcoming:<19}  {started:<19}  {run.status:<9}  "
            f"{shown:>8}  {run.instance}"
        )
    return 0


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``coordlock history`` and ``coordlock jobs``."""
    history = sub.add_parser(
        "history",
        parents=parents,
        help="show scheduler run history, newest first",
        description=(
            "The scheduler's run history, newest first: job, tick (UTC), status (claimed,\n"
            "running, finished, failed, stuck, skipped, missed), seconds and instance, plus\n"
            "the error of failed runs.\n"
            '--json prints {"runs": [{"run_id", "job", "tick", "instance", "status",\n'
            '"started", "finished", "duration", "error"}]} (epoch seconds; null while running).\n'
            "Exits 69 when the backend keeps no history."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    history.add_argument("--job", help="only this job")
    history.add_argument(
        "--limit", type=positive_int, default=20, metavar="N", help="rows to show (default 20)"
    )
    history.set_defaults(func=cmd_history, supports_json=True)

    jobs = sub.add_parser(
        "jobs",
        parents=parents,
        help="scheduled jobs: state, next run, last run; pause|resume|run NAME",
        description=(
            "Without an action: each job that ran or that a running scheduler published,\n"
            "with its state (active or paused, cluster-wide), its next run (UTC, from the\n"
            "published schedule) and its last run: when it started, status, instance and\n"
            'duration. --json prints {"jobs": [{"job", "paused", "trigger", "next_run",\n'
            '"next_run_iso", "last_run": {"tick", "started", "started_iso", "status",\n'
            '"instance", "duration", "error", "result"} or null}]}.\n'
            "Actions (on every instance at once, from its next tick on):\n"
            "  pause NAME [--note TEXT]   its ticks are recorded as skipped(paused)\n"
            "  resume NAME [--note TEXT]\n"
            "  run NAME                   run it once, now, on one instance\n"
            "Exits 69 when the backend keeps no history (78 for an action)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.set_defaults(func=cmd_jobs, supports_json=True)
    jobs_cli.add_parsers(jobs, parents)
