"""Celery beat on every server, each entry sent once per due time (``coordlock[celery]``).

Start as many beats as you like, and workers, against the same broker and coordinator::

    export CELERY_BROKER_URL=redis://127.0.0.1:6379/0 COORDLOCK_URL=redis://127.0.0.1:6379/0
    celery -A celery_beat beat        # on server 1
    celery -A celery_beat beat        # on server 2: no single point of failure
    celery -A celery_beat worker

Every 2 seconds one beat sends ``report`` with the task id ``report-every-2s@<tick>``; the
worker prints ``report for report-every-2s@<tick>`` once per tick. ``OncePerTickTask`` makes a
redelivered message (``acks_late`` after a worker crash) skip instead of running twice.
"""

import os

from celery import Celery

from coordlock.integrations.celery import OncePerTickTask

app = Celery(
    "celery_beat", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
)
app.conf.update(
    beat_scheduler="coordlock.integrations.celery:CoordinatedScheduler",
    coordlock_url=os.environ.get("COORDLOCK_URL", "sqlite:///celery-beat-locks.db"),
    beat_schedule={
        "report-every-2s": {"task": "celery_beat.report", "schedule": 2.0},
    },
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
)


@app.task(base=OncePerTickTask, bind=True)
def report(self) -> None:
    print(f"report for {self.request.id}", flush=True)
