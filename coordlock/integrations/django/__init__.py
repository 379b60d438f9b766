"""Django: coordlock as an installed app (``pip install 'coordlock[django]'``).

In ``settings.py``::

    INSTALLED_APPS = [..., "coordlock.integrations.django"]
    COORDLOCK_URL = "redis://redis.internal:6379/1"     # → coordlock.configure() at startup
    COORDLOCK_OPTIONS = {}                              # keyword options for configure()
    COORDLOCK_SCHEDULER = {"skew_tolerance": 60}        # keyword options for the Scheduler

In any app's ``jobs.py`` (found like Celery finds ``tasks.py``)::

    from coordlock.integrations.django import cron, every

    @cron("0 3 * * *", name="purge-sessions")
    def purge_sessions():
        Session.objects.filter(expire_date__lt=now()).delete()

then ``python manage.py coordlock_scheduler`` on every server: each job runs once per tick
across all of them, runs are written to run history (``coordlock history``), and
``python manage.py check`` reports a missing or bad ``COORDLOCK_URL``.
``@coordlock.locked(...)`` works on ``BaseCommand.handle`` for commands run from crontab.

Importing this package loads no part of Django beyond what the registry needs at call time.
"""

from __future__ import annotations

from .registry import add, autodiscover, cron, every, get_scheduler

__all__ = ["add", "autodiscover", "cron", "every", "get_scheduler"]
