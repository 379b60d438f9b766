"""Cluster-wide job control – pause, resume, run now – and each job's registration, kept in the
coordinator's run history under reserved job names, so every backend that keeps history
(all five built-in ones) supports it without code of its own.

Rows (:class:`~coordlock.RunRecord`), one job name each:

* ``coordlock:control`` – one row per job that was ever paused: ``run_id`` ``state:<job>``,
  ``tick`` the job's name, ``status`` ``paused`` or ``active``, ``instance`` who changed it,
  ``finished`` when (epoch seconds), ``error`` an optional note. Every instance reads these rows
  (one history call) at each tick it won something, so a pause applies from the next tick on.
* ``coordlock:run-now`` – one row per request: ``run_id`` ``run-now:<hex>``, ``tick`` the
  job's name, ``status`` ``requested``, later ``taken`` (``instance`` the instance that ran it,
  ``finished`` when). Instances poll the newest :data:`RUN_NOW_SCAN` rows every
  ``control_interval`` seconds; one of them wins the request's claim ``<job>@run-now-<hex>``.
* ``coordlock:jobs`` – one row per registered job: ``run_id`` ``job:<name>``, ``tick`` the
  trigger as JSON (so any process can compute the next run), ``error`` its description,
  ``instance`` the last instance that published it, ``finished`` when.

Control and registration rows have ``started = 0``: they sort after every run (history is read
newest first by ``started``), so they never crowd the rows the watchdog scans. A backend that
trims history per job keeps at most its limit of rows per reserved name (1,000 by default on
Redis, SQLite and ZooKeeper): at most that many jobs can have a control row or a registration,
and the newest requests are the ones kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .._errors import ConfigurationError
from .._protocol import KeepsHistory, RunCoordinator, RunRecord
from .job import check_job_name
from .triggers import CronTrigger, IntervalTrigger, OnceTrigger, Trigger

log = logging.getLogger("coordlock")

CONTROL_JOB = "coordlock:control"
RUN_NOW_JOB = "coordlock:run-now"
REGISTRY_JOB = "coordlock:jobs"
#: Job names reserved for these rows (a scheduled job cannot have one of them).
RESERVED = (CONTROL_JOB, RUN_NOW_JOB, REGISTRY_JOB)

PAUSED = "paused"
ACTIVE = "active"
REQUESTED = "requested"
TAKEN = "taken"
REGISTERED = "registered"

#: Rows read per control read (jobs with a pause state, at most).
CONTROL_SCAN = 10_000
#: Newest run-now requests each poll reads.
RUN_NOW_SCAN = 50
#: A run-now request older than this (seconds) is ignored.
RUN_NOW_TTL = 3600.0
#: Claim hold of a run-now request (longer than :data:`RUN_NOW_TTL`).
RUN_NOW_HOLD = 2 * RUN_NOW_TTL
#: Most characters of a note kept with a pause or resume.
NOTE_MAX = 1000


def history_of(coordinator: object) -> KeepsHistory:
    """``coordinator`` as one that keeps run history; ``ConfigurationError`` otherwise."""
    if not isinstance(coordinator, KeepsHistory):
        raise ConfigurationError(
            f"{type(coordinator).__name__} keeps no run history: job control (pause, resume, "
            "run now) and the job registry need a backend that does"
        )
    return coordinator


def check_controllable(name: object) -> str:
    """A job name that can be controlled (``ValueError`` for a reserved or bad name)."""
    checked = check_job_name(name)
    if checked in RESERVED:
        raise ValueError(f"{checked!r} is a name coordlock reserves for job control")
    return checked


def _note(note: object) -> str | None:
    if note is None:
        return None
    if not isinstance(note, str):
        raise TypeError(f"note must be a str, not {type(note).__name__}")
    return note[:NOTE_MAX]


# -- pause / resume -----------------------------------------------------------------------------


def set_paused(
    coordinator: object, name: str, paused: bool, *, by: str, note: str | None = None
) -> None:
    """Pause (or resume) ``name`` on every instance, from each instance's next tick on."""
    history = history_of(coordinator)
    job = check_controllable(name)
    history.record_run(
        RunRecord(
            run_id=f"state:{job}",
            job=CONTROL_JOB,
            tick=job,
            instance=by,
            started=0.0,
            finished=time.time(),
            status=PAUSED if paused else ACTIVE,
            error=_note(note),
        )
    )


@dataclass(frozen=True)
class ControlState:
    """A job's pause state as read from the coordinator."""

    job: str
    paused: bool
    by: str
    at: float | None
    note: str | None


def read_states(coordinator: object) -> dict[str, ControlState]:
    """Every job's pause state (jobs never paused are absent)."""
    rows = history_of(coordinator).history(CONTROL_JOB, CONTROL_SCAN)
    states: dict[str, ControlState] = {}
    for row in rows:
        if not row.run_id.startswith("state:") or row.status not in (PAUSED, ACTIVE):
            continue
        seen = states.get(row.tick)
        if seen is not None and (seen.at or 0) >= (row.finished or 0):
            continue
        states[row.tick] = ControlState(
            row.tick, row.status == PAUSED, row.instance, row.finished, row.error
        )
    return states


def paused_jobs(coordinator: object) -> set[str]:
    """The names of the jobs paused now."""
    return {job for job, state in read_states(coordinator).items() if state.paused}


# -- run now ------------------------------------------------------------------------------------


def request_run(coordinator: object, name: str, *, by: str) -> str:
    """Ask the cluster to run ``name`` once, now; returns the request id."""
    history = history_of(coordinator)
    job = check_controllable(name)
    request = uuid.uuid4().hex[:16]
    history.record_run(
        RunRecord(
            run_id=f"run-now:{request}",
            job=RUN_NOW_JOB,
            tick=job,
            instance=by,
            started=time.time(),
            status=REQUESTED,
        )
    )
    return request


def pending_requests(coordinator: object, now: float | None = None) -> list[RunRecord]:
    """Run-now requests not yet taken and younger than :data:`RUN_NOW_TTL`, oldest first."""
    now = time.time() if now is None else now
    rows = history_of(coordinator).history(RUN_NOW_JOB, RUN_NOW_SCAN)
    live = [
        r
        for r in rows
        if r.status == REQUESTED
        and r.run_id.startswith("run-now:")
        and now - r.started < RUN_NOW_TTL
    ]
    return sorted(live, key=lambda r: r.started)


def request_id(row: RunRecord) -> str:
    return row.run_id.partition(":")[2]


def run_now_key(job: str, request: str) -> str:
    """The claim that makes one instance, and one only, take a run-now request."""
    return f"{job}@run-now-{request}"


# -- the registry -------------------------------------------------------------------------------


def trigger_spec(trigger: Trigger) -> str:
    """The trigger as JSON, for the registry (``{"kind": "custom"}`` for other triggers)."""
    spec: dict[str, Any]
    if isinstance(trigger, CronTrigger):
        spec = {"kind": "cron", "expr": trigger.expr, "tz": trigger.timezone}
    elif isinstance(trigger, IntervalTrigger):
        spec = {"kind": "every", "seconds": trigger.seconds, "offset": trigger.offset}
    elif isinstance(trigger, OnceTrigger):
        spec = {"kind": "at", "when": trigger.when}
    else:
        spec = {"kind": "custom"}
    return json.dumps(spec, sort_keys=True)


def trigger_from_spec(text: str) -> Trigger | None:
    """The trigger a registry row describes (``None``: unknown or unreadable)."""
    try:
        spec = json.loads(text)
        kind = spec.get("kind")
        if kind == "cron":
            return CronTrigger(spec["expr"], spec["tz"])
        if kind == "every":
            return IntervalTrigger(float(spec["seconds"]), offset=float(spec["offset"]))
        if kind == "at":
            return OnceTrigger(float(spec["when"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return None


def registration(name: str, trigger: Trigger, instance: str) -> RunRecord:
    return RunRecord(
        run_id=f"job:{name}",
        job=REGISTRY_JOB,
        tick=trigger_spec(trigger),
        instance=instance,
        started=0.0,
        finished=time.time(),
        status=REGISTERED,
        error=trigger.describe(),
    )


def read_registry(coordinator: object) -> dict[str, RunRecord]:
    """Every published job: name → its registry row."""
    rows = history_of(coordinator).history(REGISTRY_JOB, CONTROL_SCAN)
    return {r.run_id.partition(":")[2]: r for r in rows if r.run_id.startswith("job:")}


# -- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStatus:
    """A job as the cluster sees it (:meth:`Scheduler.status`, ``coordlock jobs``).

    * ``paused`` – paused cluster-wide; ``changed_by`` / ``changed_at`` / ``note`` – the last
      pause or resume (``None`` if it never was).
    * ``trigger`` – its schedule's description; ``next_run`` – the next tick (aware UTC
      datetime; ``None`` when it has none or is unknown).
    * ``last_run`` – the newest history row of the job (any instance), ``None`` if none.
    * ``run_now_pending`` – run-now requests not yet taken.
    """

    name: str
    paused: bool
    changed_by: str | None
    changed_at: datetime | None
    note: str | None
    trigger: str | None
    next_run: datetime | None
    last_run: RunRecord | None
    run_now_pending: int


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


def job_status(
    coordinator: object,
    name: str,
    *,
    trigger: Trigger | None = None,
    now: float | None = None,
    states: dict[str, ControlState] | None = None,
    registry: dict[str, RunRecord] | None = None,
    requests: list[RunRecord] | None = None,
) -> JobStatus:
    """The cluster's view of ``name`` (``trigger``: the local one, else the registry's;
    ``now``: the time of day the next run is computed from, default the system clock)."""
    history = history_of(coordinator)
    now = time.time() if now is None else now
    states = read_states(coordinator) if states is None else states
    state = states.get(name)
    description = None
    if trigger is None:
        row = (read_registry(coordinator) if registry is None else registry).get(name)
        if row is not None:
            trigger = trigger_from_spec(row.tick)
            description = row.error
    if trigger is not None:
        description = trigger.describe()
    last = history.history(name, 1)
    pending = pending_requests(coordinator) if requests is None else requests
    return JobStatus(
        name=name,
        paused=bool(state and state.paused),
        changed_by=state.by if state else None,
        changed_at=_utc(state.at) if state else None,
        note=state.note if state else None,
        trigger=description,
        next_run=_utc(trigger.next_after(now)) if trigger is not None else None,
        last_run=last[0] if last else None,
        run_now_pending=sum(1 for r in pending if r.tick == name),
    )


# -- what one scheduler instance keeps --------------------------------------------------------


class Control:
    """One scheduler's view of the control rows: the paused set (read once per tick that won
    something) and the run-now requests it already tried."""

    def __init__(self, instance: str) -> None:
        self._instance = instance
        self._lock = threading.Lock()
        self._tried: dict[str, float] = {}  # request id → when tried (time.time())
        self.paused: frozenset[str] = frozenset()  # as last read

    def read_paused(self, coordinator: RunCoordinator) -> frozenset[str]:
        """Read the paused jobs now (raises what the coordinator raises)."""
        paused = frozenset(paused_jobs(coordinator))
        self.paused = paused
        return paused

    def untried(self, coordinator: RunCoordinator, registered: set[str]) -> list[RunRecord]:
        """Pending run-now requests for jobs registered here that this instance has not
        tried yet (each is tried once: its claim decides)."""
        now = time.time()
        rows = [r for r in pending_requests(coordinator, now) if r.tick in registered]
        with self._lock:
            for key, when in list(self._tried.items()):
                if now - when > RUN_NOW_TTL:
                    del self._tried[key]
            fresh = [r for r in rows if request_id(r) not in self._tried]
            for row in fresh:
                self._tried[request_id(row)] = now
        return fresh

    def mark_taken(self, coordinator: RunCoordinator, row: RunRecord) -> None:
        """Record that this instance took the request (other pollers then skip it)."""
        try:
            history_of(coordinator).record_run(
                RunRecord(
                    run_id=row.run_id,
                    job=RUN_NOW_JOB,
                    tick=row.tick,
                    instance=self._instance,
                    started=row.started,
                    finished=time.time(),
                    status=TAKEN,
                )
            )
        except Exception as exc:
            log.warning(
                "scheduler %s: marking run-now %s taken failed: %s", self._instance, row.run_id, exc
            )
