"""Once per tick for HTTP-triggered cron: Vercel cron (``CRON_SECRET``), Cloud Scheduler, a
Kubernetes CronJob that curls an endpoint. Deliveries are retried and may reach several
replicas; the guard checks the bearer secret, names the scheduled tick the request belongs to,
claims it, and runs the job once per tick across all replicas.

* :class:`CronGuard` – the framework-neutral core (this module imports no framework);
* :mod:`coordlock.web.fastapi` – a FastAPI dependency, and an endpoint decorator for Starlette
  (``pip install 'coordlock[fastapi]'``);
* :mod:`coordlock.web.flask` – a Flask view decorator (``coordlock[flask]``);
* :mod:`coordlock.web.django` – a Django view decorator (``coordlock[django]``).

Every adapter answers ``200 {"job", "tick", "ran", "reason"}`` (a duplicate delivery is a 200
with ``"ran": false``, so the platform does not retry it), ``401`` for a missing or wrong
secret (nothing runs) and ``503`` when the coordinator cannot be asked (nothing runs; the
platform retries).
"""

from __future__ import annotations

from ._core import DEFAULT_SECRET_ENV, UNAUTHORIZED, CronGuard, CronResponse, CronTick, Unauthorized

__all__ = [
    "DEFAULT_SECRET_ENV",
    "UNAUTHORIZED",
    "CronGuard",
    "CronResponse",
    "CronTick",
    "Unauthorized",
]
