"""System checks (``manage.py check``): the coordinator settings.

* ``coordlock.E001`` – ``COORDLOCK_URL`` cannot be used (not a str, unknown scheme, bad URL,
  missing driver: the message says which ``pip install`` brings it).
* ``coordlock.E002`` – ``COORDLOCK_OPTIONS`` or ``COORDLOCK_SCHEDULER`` is not a dict, or the
  Scheduler refuses its options.
* ``coordlock.W001`` – neither ``COORDLOCK_URL`` nor ``$COORDLOCK_URL`` is set: every lock and
  scheduled job would raise ``NotConfigured``.
* ``coordlock.W002`` (``--deploy``) – the URL coordinates one host or one process only
  (``sqlite://``, ``memory://``).
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning

from ..._api import ENV_URL
from ..._registry import connect, redact

_HINT_URL = (
    "Set COORDLOCK_URL in settings, e.g. 'redis://redis.internal:6379/1' or "
    "'postgresql://user@db/app'; see coordlock's URL reference."
)


def _url() -> tuple[object, str]:
    url = getattr(settings, "COORDLOCK_URL", None)
    if url:
        return url, "COORDLOCK_URL"
    return os.environ.get(ENV_URL, "").strip(), f"${ENV_URL}"


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Report a missing or unusable coordinator URL and bad coordlock settings."""
    problems: list[CheckMessage] = []
    url, where = _url()
    options = getattr(settings, "COORDLOCK_OPTIONS", None) or {}
    if not isinstance(options, dict):
        problems.append(
            Error(
                f"COORDLOCK_OPTIONS must be a dict, not {type(options).__name__}",
                id="coordlock.E002",
            )
        )
        options = {}
    if not url:
        problems.append(
            Warning(
                "No coordinator configured: COORDLOCK_URL is not set (nor $COORDLOCK_URL); "
                "coordlock locks and scheduled jobs will raise NotConfigured.",
                hint=_HINT_URL,
                id="coordlock.W001",
            )
        )
    elif not isinstance(url, str):
        problems.append(
            Error(f"{where} must be a str, not {type(url).__name__}", id="coordlock.E001")
        )
    else:
        try:
            connect(url, **(options if where == "COORDLOCK_URL" else {})).close()
        except Exception as exc:
            problems.append(
                Error(
                    f"{where}={redact(url)!r} cannot be used: {exc}",
                    hint=_HINT_URL,
                    id="coordlock.E001",
                )
            )
    problems.extend(_check_scheduler_options())
    return problems


def _check_scheduler_options() -> list[CheckMessage]:
    from .registry import scheduler_options

    try:
        scheduler_options()
    except (TypeError, ValueError) as exc:
        return [Error(f"COORDLOCK_SCHEDULER: {exc}", id="coordlock.E002")]
    return []


def check_deploy(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``--deploy``: warn about URLs that cannot coordinate several servers."""
    url, where = _url()
    if isinstance(url, str) and url.split(":", 1)[0].lower() in ("sqlite", "memory"):
        return [
            Warning(
                f"{where} uses {url.split(':', 1)[0]}://, which coordinates "
                f"{'processes of one host' if url.startswith('sqlite') else 'one process'} "
                "only: copies of this site on other servers would each run every job.",
                hint="Use redis://, postgresql:// or zookeeper:// when you run several servers.",
                id="coordlock.W002",
            )
        ]
    return []
