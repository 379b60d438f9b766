"""RQ: "cron enqueues, workers execute" with :class:`coordlock.Scheduler` (``coordlock[rq]``).

A Scheduler job only enqueues; RQ workers run the work::

    from redis import Redis
    from rq import Queue
    from coordlock.integrations.rq import enqueue_tick

    queue = Queue("reports", connection=Redis.from_url("redis://redis.internal:6379/0"))
    sched = coordlock.Scheduler()

    @sched.every(300, name="nightly-report")
    def enqueue_report():
        enqueue_tick(queue, build_report)

The Scheduler's claim makes one instance enqueue per tick; the RQ job id is derived from the
tick's claim key (:func:`job_id_for`) and enqueued with ``unique=True``, so the queue itself
also refuses a second job for the same tick while the first one exists.
"""

from __future__ import annotations

import logging
from typing import Any

from ..scheduler.job import current_run

__all__ = ["enqueue_tick", "job_id_for"]

log = logging.getLogger("coordlock")

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")


def job_id_for(key: str) -> str:
    """An RQ job id (letters, digits, ``_`` and ``-`` only) for a claim key, one-to-one:
    every other character becomes ``_`` plus its UTF-8 bytes in hex
    (``sync@2024-03-31T01:00:00Z`` → ``sync_402024-03-31T01_3a00_3a00Z``)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty str, got {key!r}")
    return "".join(
        ch if ch in _SAFE else "".join(f"_{b:02x}" for b in ch.encode()) for ch in key
    )


def enqueue_tick(queue: Any, func: Any, *args: Any, key: str | None = None, **kwargs: Any) -> Any:
    """Enqueue ``func(*args, **kwargs)`` on ``queue`` as the job of the running tick.

    The job id is :func:`job_id_for` of the running Scheduler tick's key (or of ``key``,
    required outside a Scheduler job). Returns the RQ job, or ``None`` when a job with that id
    already exists (logged at INFO). Other keyword arguments of ``Queue.enqueue`` pass through.
    """
    from rq.exceptions import DuplicateJobError

    if key is None:
        run = current_run()
        if run is None:
            raise RuntimeError("enqueue_tick() outside a Scheduler job: pass key=")
        key = run.key
    job_id = job_id_for(key)
    try:
        return queue.enqueue(func, *args, job_id=job_id, unique=True, **kwargs)
    except DuplicateJobError:
        log.info("rq job %s for %s already enqueued: not enqueued again", job_id, key)
        return None
