"""URL schemes → backend classes, fed by the ``coordlock.backends`` entry-point group.

The built-in backends register through that group exactly as a third-party package would::

    [project.entry-points."coordlock.backends"]
    etcd = "coordlock_etcd:EtcdCoordinator"

The object an entry point names is either a class with a ``from_url(url, **options)``
classmethod or a plain callable ``factory(url, **options)`` returning a ``RunCoordinator``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import urlsplit

from ._errors import ConfigurationError
from ._protocol import RunCoordinator
from ._redact import redact_url

ENTRY_POINT_GROUP = "coordlock.backends"

Factory = Callable[..., RunCoordinator]

_extra: dict[str, Factory] = {}
_lock = threading.Lock()


def register_backend(scheme: str, factory: Factory) -> None:
    """Register ``factory`` for ``scheme`` in this process (an alternative to an entry point)."""
    if not isinstance(scheme, str) or not scheme:
        raise ValueError("scheme must be a non-empty str")
    with _lock:
        _extra[scheme.lower()] = factory


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_schemes() -> list[str]:
    """Every URL scheme that :func:`connect` understands, sorted."""
    with _lock:
        extra = set(_extra)
    return sorted(set(_entry_points()) | extra)


def redact(url: str) -> str:
    """``url`` with its password and secret query parameters (``password``, ``token``, ...)
    replaced by ``***``: safe to log or show in errors (see :mod:`coordlock._redact`)."""
    return redact_url(url)


def missing_driver(scheme: str, package: str, extra: str) -> ConfigurationError:
    """The error a backend module raises when its driver package is not installed."""
    return ConfigurationError(
        f"the {scheme}:// backend needs the {package!r} package, which is not installed: "
        f"pip install 'coordlock[{extra}]'"
    )


def _factory_for(scheme: str) -> Factory:
    with _lock:
        factory = _extra.get(scheme)
    if factory is not None:
        return factory
    ep = _entry_points().get(scheme)
    if ep is None:
        raise ConfigurationError(
            f"unknown URL scheme {scheme + '://'!r}; known schemes: "
            + ", ".join(s + "://" for s in known_schemes())
        )
    try:
        loaded = ep.load()
    except ConfigurationError:
        raise
    except ImportError as exc:
        raise ConfigurationError(
            f"the {scheme}:// backend could not be loaded ({exc}); "
            "is its driver installed? e.g. pip install 'coordlock[all]'"
        ) from exc
    from_url = getattr(loaded, "from_url", None)
    result: Factory = from_url if callable(from_url) else loaded
    return result


def connect(url: str, **options: Any) -> RunCoordinator:
    """Build a coordinator for ``url`` (``sqlite:///locks.db``, ``redis://host``, ...).

    Options are passed to the backend (see each backend's page). Raises
    :class:`ConfigurationError` for a malformed URL, an unknown scheme (the message lists the
    known ones) or a missing driver (the message names the extra to install).
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    if not url.strip():
        raise ConfigurationError(
            "empty coordinator URL: give one such as sqlite:///locks.db or "
            "redis://host:6379/0; known schemes: " + ", ".join(s + "://" for s in known_schemes())
        )
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError as exc:
        raise ConfigurationError(f"malformed URL {redact(url)!r}: {exc}") from exc
    if not scheme or "://" not in url:
        raise ConfigurationError(
            f"malformed URL {redact(url)!r}: expected scheme://..., e.g. sqlite:///locks.db; "
            "known schemes: " + ", ".join(s + "://" for s in known_schemes())
        )
    coordinator = _factory_for(scheme)(url.strip(), **options)
    return coordinator
