"""Settings: coordlock is an installed app; COORDLOCK_URL is all it needs."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "change-me-" + "x" * 50)
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "Europe/Berlin"  # cron jobs run in TIME_ZONE unless they say otherwise

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "coordlock.integrations.django",
    "reports",
]
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "example-site.sqlite3"}
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

COORDLOCK_URL = os.environ.get("COORDLOCK_URL", "sqlite:///example-site-locks.db")
COORDLOCK_SCHEDULER = {"skew_tolerance": 60}
