"""HTTP-triggered cron, once per tick across replicas (Vercel cron, Cloud Scheduler, a
Kubernetes CronJob that curls the endpoint).

The cron service calls ``GET /api/cron/report`` every 10 seconds with
``Authorization: Bearer $CRON_SECRET``. Deliveries are retried and may reach every replica;
the guard answers each one, but the job — append the tick (ISO 8601, UTC) as one line to the
file ``$REPORT_FILE`` — runs once per tick across all replicas. Run two replicas::

    export COORDLOCK_URL=sqlite:///cron-locks.db CRON_SECRET=s3cret REPORT_FILE=report.txt
    uvicorn examples.http_cron:app --port 8001 & uvicorn examples.http_cron:app --port 8002 &
    for port in 8001 8002 8001; do
        curl -s -H "Authorization: Bearer $CRON_SECRET" localhost:$port/api/cron/report; echo
    done
    cat report.txt      # one line: the tick the three deliveries belong to

The first answer says ``"ran": true``, the others ``"ran": false, "reason":
"claimed-elsewhere"`` (status 200, so the platform does not retry); a request without the
secret gets 401 and nothing runs. Without ``CRON_SECRET`` the app refuses to start. Across
servers, point ``COORDLOCK_URL`` at Redis, PostgreSQL or ZooKeeper.
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import Depends, FastAPI

from coordlock.web import CronTick
from coordlock.web.fastapi import cron_tick

app = FastAPI(title="coordlock HTTP cron example")

# The job's schedule is the one the cron service uses: every 10 s.
report_tick = cron_tick("report", every=10)


@app.get("/api/cron/report")
def report(tick: Annotated[CronTick, Depends(report_tick)]) -> dict[str, object]:
    if tick.won:  # this delivery won the tick: run the job, under the lock
        with open(os.environ["REPORT_FILE"], "a", encoding="utf-8") as out:
            out.write(f"{tick.tick_iso}\n")
    return tick.body()  # {"job", "tick", "ran", "reason"}
