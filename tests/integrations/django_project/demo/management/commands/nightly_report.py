"""A crontab-run command guarded by ``@coordlock.locked``: one server runs it at a time."""

from typing import Any

from django.core.management.base import BaseCommand

import coordlock


class Command(BaseCommand):
    help = "Write the nightly report (skipped when another server is writing it)."

    @coordlock.locked("nightly-report", ttl=60)
    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write("report written")
