"""Jobs of the demo app, found by ``manage.py coordlock_scheduler``."""

from django.db import connection

from coordlock.integrations.django import every


@every(1, name="demo-tick")
def demo_tick() -> None:
    with connection.cursor() as cursor:  # a job may use the ORM / the database
        cursor.execute("SELECT 1")
