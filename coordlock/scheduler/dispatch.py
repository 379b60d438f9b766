"""One tick on this instance: claim the due jobs in one batch, report the ticks lost to other
instances (``skipped(claimed-elsewhere)``) or not claimable (``skipped(coordinator-error)``:
fail closed), and hand the won ticks to the runner.
"""

from __future__ import annotations

import logging
import threading

from .._protocol import RunCoordinator
from . import events as ev
from .claims import claim_key, claim_keys
from .planner import Due
from .report import Reporter
from .runner import Runner

log = logging.getLogger("coordlock")


def claim_and_dispatch(
    due: list[Due],
    coordinator: RunCoordinator,
    skew: float,
    lock: threading.RLock,
    report: Reporter,
    runner: Runner,
) -> None:
    """Claim every due tick (batched per hold), report the ticks lost or not claimable, and
    hand the won ones to ``runner``."""
    by_key: dict[str, Due] = {}
    by_hold: dict[float, list[str]] = {}
    for item in due:
        job = item.job
        key = claim_key(job.name, item.tick)
        with lock:
            busy_here = job.pending > 0 or (not job.options.overlap and job.running > 0)
        if busy_here:
            # A run of this job is still going (or queued) here: for overlap=False the
            # lease would refuse anyway; don't burn the tick's claim — another instance may
            # still run it if the run ends in time.
            report.event(ev.SKIPPED, job, item.tick, reason=ev.RUNNING)
            continue
        by_key[key] = item
        hold = job.hold_for(item.tick, item.following, skew)
        by_hold.setdefault(hold, []).append(key)
    won: set[str] = set()
    errors: dict[str, BaseException] = {}
    for hold, keys in by_hold.items():
        got, failed = claim_keys(coordinator, keys, hold, report.instance)
        won |= got
        errors.update(failed)
    for key, item in by_key.items():
        job, tick = item.job, item.tick
        if key in errors:
            exc = errors[key]
            text = f"{type(exc).__name__}: {exc}"
            report.note(job, tick, f"skipped:{ev.COORDINATOR_ERROR}", text)
            report.event(ev.SKIPPED, job, tick, reason=ev.COORDINATOR_ERROR, error=text)
        elif key not in won:
            report.note(job, tick, f"skipped:{ev.CLAIMED_ELSEWHERE}")
            report.event(ev.SKIPPED, job, tick, reason=ev.CLAIMED_ELSEWHERE)
        else:
            log.debug("scheduler %s won claim %s", report.instance, key)
            runner.won(job, tick, item.following, key)
