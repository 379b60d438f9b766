"""``coordlock history`` (scheduler runs, newest first), ``coordlock jobs`` (last run per job)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any

from .._protocol import KeepsHistory, RunRecord
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
    ctx: Context, job: str | None, limit: int
) -> list[RunRecord] | None:
    coordinator = ctx.open()
    try:
        if not isinstance(coordinator, KeepsHistory):
            return None
        return coordinator.history(job, limit=limit)
    finally:
        coordinator.close()


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
    """Each job that has run, with its last run, from run history."""
    runs = _history(ctx, None, JOBS_SCAN)
    if runs is None:
        print("coordlock: this backend keeps no run history", file=sys.stderr)
        return EX_UNAVAILABLE
    jobs = last_runs(runs)
    if ctx.json:
        print_json(
            {
                "jobs": [
                    {
                        "job": run.job,
                        "last_run": {
                            "tick": run.tick,
                            "started": run.started,
                            "started_iso": iso(run.started),
                            "status": run.status,
                            "instance": run.instance,
                            "duration": duration_of(run),
                            "error": run.error,
                        },
                    }
                    for run in jobs
                ]
            }
        )
        return 0
    if not jobs:
        print("no runs recorded")
        return 0
    width = max(3, *(len(r.job) for r in jobs))
    print(f"{'JOB':<{width}}  {'LAST RUN (UTC)':<24}  {'STATUS':<9}  {'SECONDS':>8}  INSTANCE")
    for run in jobs:
        took = duration_of(run)
        shown = "-" if took is None else f"{took:.2f}"
        started = (iso(run.started) or "-")[:19].replace("T", " ")
        print(f"{run.job:<{width}}  {started:<24}  {run.status:<9}  {shown:>8}  {run.instance}")
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
        help="each scheduled job's last run (time, status, instance, duration)",
        description=(
            "Each job found in run history with its last run: when it started (UTC), status,\n"
            "instance and duration. Jobs that never ran are not listed, and the next run is\n"
            "not shown yet: both need the schedulers' own registrations, which a later\n"
            'version will publish. --json prints {"jobs": [{"job", "last_run": {"tick",\n'
            '"started", "started_iso", "status", "instance", "duration", "error"}}]}.\n'
            "Exits 69 when the backend keeps no history."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.set_defaults(func=cmd_jobs, supports_json=True)
