"""What the status page shows, gathered from the coordinator's own data (no web framework here).

Sources, all read-only:

* ``coordinator.locks()`` – held locks. Two kinds of names are the scheduler's own: an
  instance's liveness lease ``coordlock:instance:<id>`` (the instance is alive while it is
  held) and a job's no-overlap lease ``coordlock:job:<name>`` (a run is going on).
* ``coordinator.history(None, window)`` – the newest ``window`` runs of every job: statuses
  ``claimed``, ``running``, ``finished``, ``failed``, ``skipped``, ``stuck``, ``missed`` (see
  :mod:`coordlock.scheduler.report`).
* optionally a :class:`~coordlock.Scheduler` of this process: its jobs (schedule, next run,
  last status) and the ticks it missed (events), which run history does not keep.

Every time is epoch seconds (``*_iso``: ISO 8601 UTC); durations are seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .._protocol import KeepsHistory, ListsLocks, LockInfo, RunRecord
from ..cli.history import iso, run_record
from ..cli.locks import lock_record

#: Lock-name prefixes the scheduler uses (see coordlock.scheduler.claims).
INSTANCE_PREFIX = "coordlock:instance:"
JOB_PREFIX = "coordlock:job:"

#: Run statuses a filter may ask for.
STATUSES = ("claimed", "running", "finished", "failed", "skipped", "stuck", "missed")
#: Statuses of a run that has not ended.
ACTIVE = frozenset({"claimed", "running"})
#: Statuses the page highlights.
PROBLEMS = frozenset({"failed", "stuck", "missed"})
#: Most runs one request may list.
MAX_LIMIT = 1000


class MissedTicks:
    """Keeps the newest ``size`` missed-tick events of a scheduler (history has no misses)."""

    def __init__(self, size: int = 200) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        """A scheduler callback for ``missed`` events."""
        tick = event.tick.timestamp() if isinstance(event.tick, datetime) else time.time()
        record = {
            "run_id": None,
            "job": event.job,
            "tick": (event.key or "").partition("@")[2] or iso(tick),
            "instance": event.instance,
            "status": "missed",
            "started": tick,
            "finished": None,
            "duration": None,
            "error": f"{event.count} tick(s) missed" if event.count != 1 else "tick missed",
            "count": event.count,
        }
        with self._lock:
            self._events.append(record)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)


def check_filters(job: str | None, status: str | None, limit: object) -> tuple[
    str | None, str | None, int
]:
    """Validated filters (``ValueError`` with a clear message for bad ones)."""
    if job is not None:
        job = job.strip() or None
        if job is not None and len(job) > 512:
            raise ValueError("job: at most 512 characters")
    if status is not None:
        status = status.strip().lower() or None
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {status!r}")
    if isinstance(limit, str):
        if not limit.strip().isdigit():
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}; got {limit!r}")
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}; got {limit!r}")
    return job, status, limit


def _lock_entry(info: LockInfo, now: float) -> dict[str, Any]:
    entry = lock_record(info, now)
    if info.name.startswith(INSTANCE_PREFIX):
        entry["kind"], entry["instance"] = "instance", info.name[len(INSTANCE_PREFIX):]
    elif info.name.startswith(JOB_PREFIX):
        entry["kind"], entry["job"] = "job", info.name[len(JOB_PREFIX):]
    else:
        entry["kind"] = "lock"
    return entry


def _run_entry(run: RunRecord, alive: dict[str, bool] | None) -> dict[str, Any]:
    entry = run_record(run)
    entry["started_iso"] = iso(run.started)
    entry["finished_iso"] = iso(run.finished)
    entry["warning"] = None
    if run.status in ACTIVE and alive is not None and not alive.get(run.instance, False):
        entry["warning"] = "its instance holds no liveness lease: stopped or vanished?"
    return entry


def _missed_entry(record: dict[str, Any]) -> dict[str, Any]:
    entry = dict(record)
    entry["started_iso"] = iso(entry["started"])
    entry["finished_iso"] = None
    entry["warning"] = None
    return entry


def _when(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def snapshot(
    coordinator: object,
    *,
    scheduler: Any = None,
    missed: MissedTicks | None = None,
    job: str | None = None,
    status: str | None = None,
    limit: int | str = 100,
    window: int = 500,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (see docs/monitoring.md for the fields).

    ``window``: how many of the newest runs are read to build the jobs and instances tables and
    the counts; ``job``/``status``/``limit`` filter the runs table only. Raises what the
    coordinator raises (``BackendUnavailable`` …) and ``ValueError`` for bad filters.
    """
    job, status, limit = check_filters(job, status, limit)
    now = time.time() if now is None else now
    lists_locks = isinstance(coordinator, ListsLocks)
    keeps_history = isinstance(coordinator, KeepsHistory)
    held = coordinator.locks() if isinstance(coordinator, ListsLocks) else []
    recent = coordinator.history(None, window) if isinstance(coordinator, KeepsHistory) else []
    locks = [_lock_entry(info, now) for info in held]
    alive = {e["instance"]: True for e in locks if e["kind"] == "instance"}
    known_alive = alive if lists_locks else None
    running_jobs = {e["job"] for e in locks if e["kind"] == "job"}
    misses = [_missed_entry(r) for r in (missed.records() if missed is not None else [])]

    runs_all = [_run_entry(r, known_alive) for r in recent] + misses
    runs_all.sort(key=lambda r: r["started"] or 0.0, reverse=True)
    if job is not None and keeps_history:
        # the filter may reach further back than the window
        own = [_run_entry(r, known_alive) for r in coordinator.history(job, limit)]  # type: ignore[attr-defined]
        runs = own + [m for m in misses if m["job"] == job]
        runs.sort(key=lambda r: r["started"] or 0.0, reverse=True)
    else:
        runs = runs_all
    if status is not None:
        runs = [r for r in runs if r["status"] == status]
    for run in runs_all:
        run["problem"] = run["status"] in PROBLEMS or run["warning"] is not None
    for run in runs:
        run["problem"] = run["status"] in PROBLEMS or run["warning"] is not None

    jobs = _jobs(runs_all, running_jobs, scheduler)
    instances = _instances(runs_all, locks, lists_locks)
    summary = {
        "instances_alive": sum(1 for i in instances if i["alive"]),
        "instances_gone": sum(1 for i in instances if i["alive"] is False),
        "jobs": len(jobs),
        "running": sum(1 for j in jobs if j["running"]),
        "failed": sum(1 for r in runs_all if r["status"] == "failed"),
        "stuck": sum(1 for r in runs_all if r["status"] == "stuck"),
        "missed": sum(r.get("count", 1) for r in runs_all if r["status"] == "missed"),
        "locks": sum(1 for e in locks if e["kind"] == "lock"),
        "window": len(recent),
    }
    return {
        "generated_at": now,
        "generated_iso": iso(now),
        "backend": getattr(coordinator, "backend_name", "") or type(coordinator).__name__,
        "capabilities": {
            "locks": lists_locks,
            "history": keeps_history,
            "force_unlock": bool(getattr(coordinator, "can_force_release", False)),
            "scheduler": scheduler is not None,
        },
        "filters": {"job": job, "status": status, "limit": limit},
        "job_names": sorted({r["job"] for r in runs_all} | {j["job"] for j in jobs}),
        "summary": summary,
        "instances": instances,
        "jobs": jobs,
        "runs": runs[:limit],
        "locks": locks,
    }


def _jobs(
    runs: list[dict[str, Any]], running_jobs: set[str], scheduler: Any
) -> list[dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        if name not in jobs:
            jobs[name] = {
                "job": name, "schedule": None, "next_run": None, "next_run_iso": None,
                "last_run": None, "last_status": None, "running": name in running_jobs,
                "runs": 0, "finished": 0, "failed": 0, "skipped": 0, "stuck": 0, "missed": 0,
                "registered": False,
            }  # fmt: skip
        return jobs[name]

    for run in runs:  # newest first
        e = entry(run["job"])
        if e["last_run"] is None:
            e["last_run"] = run
            e["last_status"] = run["status"]
        if run["status"] == "missed":
            e["missed"] += run.get("count", 1)
        else:
            e["runs"] += 1
            if run["status"] in ("finished", "failed", "skipped", "stuck"):
                e[run["status"]] += 1
            if run["status"] in ACTIVE:
                e["running"] = True
    if scheduler is not None:
        for info in scheduler.jobs():
            e = entry(info.name)
            e["registered"] = True
            e["schedule"] = info.trigger
            e["next_run"] = _when(info.next_run)
            e["next_run_iso"] = iso(e["next_run"])
            e["running"] = e["running"] or info.running > 0
            if info.last_status is not None and (
                e["last_run"] is None or (_when(info.last_tick) or 0) > e["last_run"]["started"]
            ):
                e["last_status"] = info.last_status
    for e in jobs.values():
        e["problem"] = (e["last_status"] or "") in PROBLEMS
    return [jobs[name] for name in sorted(jobs)]


def _instances(
    runs: Iterable[dict[str, Any]], locks: list[dict[str, Any]], lists_locks: bool
) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for lock in locks:
        if lock["kind"] == "instance":
            found[lock["instance"]] = {
                "instance": lock["instance"], "alive": True, "holder": lock["holder"],
                "host": lock["host"], "pid": lock["pid"], "expires_in": lock["expires_in"],
                "last_run": None, "last_run_iso": None, "last_job": None, "runs": 0,
            }  # fmt: skip
    for run in runs:  # newest first
        if run["status"] == "missed":
            continue
        e = found.get(run["instance"])
        if e is None:
            e = found[run["instance"]] = {
                "instance": run["instance"], "alive": False if lists_locks else None,
                "holder": None, "host": None, "pid": None, "expires_in": None,
                "last_run": None, "last_run_iso": None, "last_job": None, "runs": 0,
            }  # fmt: skip
        e["runs"] += 1
        if e["last_run"] is None:
            e["last_run"] = run["started"]
            e["last_run_iso"] = iso(run["started"])
            e["last_job"] = run["job"]
    return sorted(found.values(), key=lambda e: (e["alive"] is not True, e["instance"]))


__all__ = [
    "INSTANCE_PREFIX",
    "JOB_PREFIX",
    "MAX_LIMIT",
    "PROBLEMS",
    "STATUSES",
    "MissedTicks",
    "check_filters",
    "snapshot",
]
