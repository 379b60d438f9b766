"""Listing locks, run history and server facts of the PostgreSQL backend (auxiliary session)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..._protocol import LockInfo, RunRecord, ServerInfo
from ..._validate import check_name, check_records
from .flows import Flow, one
from .session import BaseSession, Step

if TYPE_CHECKING:
    from .coordinator import PostgresCoordinator


def locks(c: PostgresCoordinator) -> list[LockInfo]:
    """Locks held in this schema (granted advisory locks with their holder rows).

    This coordinator's own locks carry its local expiry estimate; other processes' locks the
    expiry of their lease rows (server clock). With ``takeover=session`` there are no lease
    rows, so only this coordinator's locks are listed. Other applications' advisory locks
    are never listed.
    """
    c._check_open()
    step = Step(c._q.locks, (), time.monotonic() + c._io, fetch="all")
    rows = c._policy.call(lambda: c._aux(lambda s: one(c, s, step)), "list locks")
    now_mono, now_wall = time.monotonic(), time.time()
    with c._registry.state:
        mine = [h for h in c._registry.held.values() if not h.session.dead]
    infos: dict[str, LockInfo] = {}
    for _pid, _key, name, owner, fence, expires in rows:
        infos[name] = LockInfo(name, owner, int(fence), expires)
    for held in mine:  # ours: exact, and listed with takeover=session too
        if not held.linger:
            expires_at = now_wall + (held.deadline - now_mono)
            infos[held.name] = LockInfo(held.name, held.owner, held.fence, expires_at)
    return [infos[name] for name in sorted(infos)]


def record_run(c: PostgresCoordinator, run: RunRecord) -> None:
    """Store or update ``run`` (keyed by ``run_id``)."""
    if not isinstance(run, RunRecord):
        raise TypeError(f"expected a RunRecord, not {type(run).__name__}")
    c._check_open()
    params = {
        "run_id": run.run_id, "job": run.job, "tick": run.tick, "instance": run.instance,
        "started": run.started, "finished": run.finished, "status": run.status,
        "error": run.error, "result": run.result,
    }  # fmt: skip
    _store(c, "record_run", params, "record run")


def record_runs(c: PostgresCoordinator, runs: Sequence[RunRecord]) -> None:
    """Store or update each of ``runs`` in one statement (one array per column, sent as text
    on the lean path)."""
    checked = check_records(runs)
    if len(checked) <= 1:
        for run in checked:
            record_run(c, run)
        return
    c._check_open()
    params = {
        "run_ids": [r.run_id for r in checked], "jobs": [r.job for r in checked],
        "ticks": [r.tick for r in checked], "instances": [r.instance for r in checked],
        "started_at": [r.started for r in checked], "finished_at": [r.finished for r in checked],
        "statuses": [r.status for r in checked], "errors": [r.error for r in checked],
        "results": [r.result for r in checked],
    }  # fmt: skip
    _store(c, "record_runs", params, "record runs")


def _store(c: PostgresCoordinator, label: str, params: dict[str, Any], what: str) -> None:
    """Send the history statement ``label`` on the lean path of the auxiliary session."""
    step = Step(
        getattr(c._q, label), params, time.monotonic() + c._io, fetch="none",
        lean=c._q.lean[label],
    )  # fmt: skip
    c._policy.call(lambda: c._aux(lambda s: one(c, s, step)), what)


def history(c: PostgresCoordinator, job: str | None, limit: int) -> list[RunRecord]:
    """Newest runs first, optionally of one ``job``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an int >= 0, got {limit!r}")
    if job is not None:
        job = check_name(job, "job")
    c._check_open()
    query, params = (c._q.history, (limit,)) if job is None else (c._q.history_job, (job, limit))
    step = Step(query, params, time.monotonic() + c._io, fetch="all")
    rows = c._policy.call(lambda: c._aux(lambda s: one(c, s, step)), "read history")
    return [
        RunRecord(
            run_id=r[0],
            job=r[1],
            tick=r[2],
            instance=r[3],
            started=float(r[4]),
            finished=None if r[5] is None else float(r[5]),
            status=r[6],
            error=r[7],
            result=r[8],
        )
        for r in rows
    ]


def server_info(c: PostgresCoordinator) -> ServerInfo:
    """The server's version and clock (``coordlock check``): ``measured_at`` is the local
    ``time.time()`` halfway through the statement (not the connect before it)."""
    c._check_open()

    def timed(s: BaseSession) -> Flow[tuple[Any, float]]:
        before = time.time()
        row = yield from one(c, s, Step(c._q.server_info, (), time.monotonic() + c._io))
        return row, (before + time.time()) / 2

    row, measured_at = c._policy.call(lambda: c._aux(timed), "read server info")
    return ServerInfo(
        backend=c.backend_name,
        version=f"PostgreSQL {row[0]}",
        server_time=float(row[1]),
        measured_at=measured_at,
    )
