"""Ways in for the schedulers people already run: APScheduler 3.x, Celery beat, Django, RQ.

Each integration is a submodule with its own optional extra and is loaded only when imported;
importing this package (or ``coordlock``) loads none of those frameworks::

    pip install 'coordlock[apscheduler]'   # coordlock.integrations.apscheduler
    pip install 'coordlock[celery]'        # coordlock.integrations.celery
    pip install 'coordlock[django]'        # coordlock.integrations.django (an INSTALLED_APPS app)
    pip install 'coordlock[rq]'            # coordlock.integrations.rq

All of them claim ticks with the :class:`~coordlock.Scheduler`'s key format,
``job@<tick in UTC, ISO 8601>`` (``coordlock.scheduler.tick_key``), so a tick claimed by one of
them is claimed for all of them.
"""

from __future__ import annotations

from ._claims import DEFAULT_SKEW, claim_keys, tick_claim_key

__all__ = ["DEFAULT_SKEW", "claim_keys", "tick_claim_key"]
