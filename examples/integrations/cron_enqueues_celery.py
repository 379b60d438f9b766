"""Cron enqueues, Celery workers execute (``pip install 'coordlock[celery]'``).

Every copy runs a coordlock Scheduler whose job only sends a Celery task, with the tick's
claim key as the task id; ``OncePerTickTask`` on the worker drops any second message with that
id (a redelivery, or a duplicate send)::

    export COORDLOCK_URL=redis://127.0.0.1:6379/0 CELERY_BROKER_URL=redis://127.0.0.1:6379/0
    python cron_enqueues_celery.py                    # on every server
    celery -A cron_enqueues_celery worker             # the workers
"""

import os

from celery import Celery

import coordlock
from coordlock.integrations.celery import OncePerTickTask, send_tick
from coordlock.scheduler import current_run

EVERY = float(os.environ.get("TICK_SECONDS", "60"))
app = Celery(
    "cron_enqueues_celery",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
)
sched = coordlock.Scheduler()


@app.task(base=OncePerTickTask, acks_late=True)
def build_report(tick: str) -> str:
    return f"report for {tick}"


@sched.every(EVERY, name="enqueue-report")
def enqueue_report() -> None:
    run = current_run()
    assert run is not None
    send_tick(build_report, args=(run.key,))  # task id = run.key, e.g. enqueue-report@...Z
    print(f"sent {run.key}", flush=True)


if __name__ == "__main__":
    coordlock.configure(os.environ.get("COORDLOCK_URL", "sqlite:///cron-enqueues.db"))
    print(f"ready {sched.instance_id}", flush=True)
    sched.run_forever()
