"""``python manage.py coordlock_scheduler``: run every app's ``jobs.py`` once per tick."""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from .....scheduler.events import Event
from ...registry import autodiscover, get_scheduler, set_instance_id

log = logging.getLogger("coordlock")


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Run coordlock's Scheduler with the jobs of every installed app's jobs.py. Start it on "
        "every server: each job runs once per tick across all of them. Stops cleanly on "
        "SIGTERM/SIGINT, letting running jobs finish."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--list", action="store_true", help="list the discovered jobs and exit"
        )
        parser.add_argument(
            "--instance-id", help="this process's name in events and run history"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options.get("instance_id"):
            set_instance_id(options["instance_id"])
        names = autodiscover()
        scheduler = get_scheduler()
        if options.get("list"):
            for job in scheduler.jobs():
                self.stdout.write(f"{job.name}\t{job.trigger}")
            return
        if not names:
            raise CommandError(
                "no jobs found: register them with coordlock.integrations.django.cron/every "
                "in an installed app's jobs.py"
            )
        verbosity = int(options.get("verbosity", 1))
        if verbosity >= 2 and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("coordlock: %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.DEBUG if verbosity >= 3 else logging.INFO)
        if verbosity >= 1:
            scheduler.on("*", self._print)
        self.stdout.write(
            f"coordlock scheduler {scheduler.instance_id}: {len(names)} job(s): "
            + ", ".join(sorted(names))
        )
        self.stdout.flush()
        scheduler.run_forever()

    def _print(self, event: Event) -> None:
        if event.kind == "skipped" and event.reason == "claimed-elsewhere":
            return
        text = event.describe()
        self.stdout.write(text)
        self.stdout.flush()

