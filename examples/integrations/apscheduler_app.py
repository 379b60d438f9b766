"""APScheduler on every server, each fire time run once (``pip install 'coordlock[apscheduler]'``).

Run several copies, on one host or many, with the same coordinator URL::

    COORDLOCK_URL=redis://127.0.0.1:6379/0 python apscheduler_app.py   # in 3 terminals

Every 2 seconds exactly one of them prints ``ran report@<fire time>``. Kill one (even with
``kill -9``): the others carry on, and no fire time runs twice.
"""

import os
import signal
import sys

from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

import coordlock
from coordlock.integrations.apscheduler import coordinate, run_time_key


def report() -> None:
    """The job: whatever your cron callback does."""


def ran(event) -> None:  # EVENT_JOB_EXECUTED listener: only the process that ran it
    print(f"ran {run_time_key(event.job_id, event.scheduled_run_time)} pid {os.getpid()}",
          flush=True)


def main() -> None:
    coordlock.configure(os.environ.get("COORDLOCK_URL", "sqlite:///apscheduler-locks.db"))
    scheduler = BlockingScheduler(
        timezone="UTC", job_defaults={"misfire_grace_time": 30, "coalesce": True}
    )
    scheduler.add_job(report, CronTrigger(second="*/2"), id="report")  # same id everywhere
    scheduler.add_listener(ran, EVENT_JOB_EXECUTED)
    coordinate(scheduler)  # wraps every executor: claims each fire time before running it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"ready pid {os.getpid()}", flush=True)
    scheduler.start()


if __name__ == "__main__":
    main()
