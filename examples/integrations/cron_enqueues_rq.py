"""Cron enqueues, RQ workers execute (``pip install 'coordlock[rq]'``).

Every copy of this program runs a coordlock Scheduler whose job only *enqueues*; RQ workers
do the work. The Scheduler's claim makes one copy enqueue per tick, and the RQ job id is the
tick's claim key (made RQ-safe), enqueued with ``unique=True``: the queue refuses a second job
for the same tick too::

    export COORDLOCK_URL=redis://127.0.0.1:6379/0 QUEUE_URL=redis://127.0.0.1:6379/0
    python cron_enqueues_rq.py            # on every server
    rq worker reports --url $QUEUE_URL    # as many workers as you like
"""

import os

from redis import Redis
from rq import Queue

import coordlock
from coordlock.integrations.rq import enqueue_tick
from coordlock.scheduler import current_run

EVERY = float(os.environ.get("TICK_SECONDS", "60"))
queue = Queue("reports", connection=Redis.from_url(
    os.environ.get("QUEUE_URL", "redis://127.0.0.1:6379/0")))
sched = coordlock.Scheduler()


def build_report(tick: str) -> str:
    """The work, run by an RQ worker (a module-level function, so workers can import it)."""
    return f"report for {tick}"


@sched.every(EVERY, name="enqueue-report")
def enqueue_report() -> None:
    run = current_run()
    assert run is not None
    # By dotted name: workers import it (this file runs as __main__ here).
    job = enqueue_tick(queue, "cron_enqueues_rq.build_report", run.key)
    print(f"enqueued {run.key} as {job.id if job else 'duplicate'}", flush=True)


if __name__ == "__main__":
    coordlock.configure(os.environ.get("COORDLOCK_URL", "sqlite:///cron-enqueues.db"))
    print(f"ready {sched.instance_id}", flush=True)
    sched.run_forever()
