#!/usr/bin/env python
"""Example Django site using coordlock (``pip install 'coordlock[django]'``).

    export COORDLOCK_URL=redis://127.0.0.1:6379/0
    python manage.py check --deploy            # reports a missing/bad COORDLOCK_URL
    python manage.py coordlock_scheduler       # on every server: each job once per tick
    coordlock history --url $COORDLOCK_URL     # who ran what
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
