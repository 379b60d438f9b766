"""The Django app: configures coordlock from settings when Django starts."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks

from ... import _api
from ..._registry import redact

log = logging.getLogger("coordlock")


class CoordlockConfig(AppConfig):  # type: ignore[misc]
    """``coordlock.integrations.django`` (label ``coordlock``)."""

    name = "coordlock.integrations.django"
    label = "coordlock"
    verbose_name = "coordlock"
    default = True

    #: The error ``configure()`` raised at startup (``manage.py check`` reports it too).
    configure_error: BaseException | None = None

    def ready(self) -> None:
        from .checks import check_deploy, check_settings

        checks.register(check_settings, "coordlock")
        checks.register(check_deploy, "coordlock", deploy=True)
        self.configure_error = None
        url = getattr(settings, "COORDLOCK_URL", None)
        if not url:
            return  # $COORDLOCK_URL, or the system check's warning
        options: Any = getattr(settings, "COORDLOCK_OPTIONS", None) or {}
        try:
            if not isinstance(url, str):
                raise TypeError(f"COORDLOCK_URL must be a str, not {type(url).__name__}")
            if not isinstance(options, dict):
                raise TypeError(
                    f"COORDLOCK_OPTIONS must be a dict, not {type(options).__name__}"
                )
            _api.configure(url, **options)
        except Exception as exc:  # reported by `manage.py check`, never a crash at startup
            self.configure_error = exc
            log.error(
                "coordlock: COORDLOCK_URL=%r could not be configured: %s",
                redact(url) if isinstance(url, str) else url,
                exc,
            )
