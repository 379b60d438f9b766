"""Existing cron callbacks, made safe to run on every server with ``@coordlock.locked``.

The crontab on *every* server keeps calling these functions as before::

    */10 * * * *  cd /srv/app && python examples/cron_callbacks.py cleanup
    0 3 * * *     cd /srv/app && python examples/cron_callbacks.py nightly-report

Only one server at a time gets through each function; the others return at once
(``on_busy="skip"``). Point every server at the same backend with ``COORDLOCK_URL``
(``redis://...``, ``postgresql://...``); on one host the SQLite default is enough.

Note the difference to the scheduler: a lock stops *concurrent* runs, not a second run of the
same tick by a server whose cron fires a few seconds later. When "once per tick" matters, use
``coordlock.Scheduler`` (see ``webapp.py``) — its claims are per tick and survive clock skew.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import coordlock

log = logging.getLogger("example")


@coordlock.locked("cleanup", ttl=60)  # renewed every 20 s while it runs
def cleanup() -> None:
    log.info("cleaning up on pid %d", os.getpid())
    time.sleep(2)


@coordlock.locked("nightly-report", ttl=300, on_busy="skip")
def nightly_report() -> None:
    # A long job can outlive a frozen holder's lease: pass the fence to what you write so a
    # stale writer is rejected (see docs/failure-model.md). Here we only log.
    log.info("writing the nightly report on pid %d", os.getpid())


JOBS = {"cleanup": cleanup, "nightly-report": nightly_report}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # COORDLOCK_URL is read lazily by the decorator; configure() explicitly if you prefer.
    if not os.environ.get("COORDLOCK_URL"):
        coordlock.configure("sqlite:///coordlock-example.db")
    if len(argv) != 2 or argv[1] not in JOBS:
        print(f"usage: {argv[0]} {{{','.join(JOBS)}}}", file=sys.stderr)
        return 64
    JOBS[argv[1]]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
