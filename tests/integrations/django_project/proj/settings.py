"""Settings of the test project: the coordinator comes from $COORDLOCK_URL (set by the tests)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "coordlock-tests-only"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "coordlock.integrations.django",
    "demo",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

COORDLOCK_URL = os.environ.get("COORDLOCK_URL")
COORDLOCK_SCHEDULER = {"skew_tolerance": 30, "shutdown_grace": 5}
