"""Jobs of the reports app: ``manage.py coordlock_scheduler`` finds this file."""

from django.contrib.sessions.models import Session
from django.utils import timezone

from coordlock.integrations.django import cron, every


@cron("0 3 * * *", name="purge-expired-sessions")  # 03:00 in TIME_ZONE
def purge_expired_sessions() -> None:
    Session.objects.filter(expire_date__lt=timezone.now()).delete()


@every(300, name="refresh-stats")
def refresh_stats() -> None:
    """Every 5 minutes, on one server."""
