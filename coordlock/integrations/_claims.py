"""What every integration shares: the tick key format, one claim round trip, the coordinator.

Pure coordlock code: no framework is imported here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime

from .._api import get_coordinator
from .._protocol import ClaimsMany, RunCoordinator
from .._registry import connect
from .._validate import check_name, check_seconds
from ..scheduler.triggers import tick_key

log = logging.getLogger("coordlock")

DEFAULT_SKEW = 60.0
"""Default clock-skew tolerance between instances, seconds (the Scheduler's default)."""


def tick_claim_key(job: str, tick: datetime | float) -> str:
    """The claim key of one tick of ``job``: ``job@2024-03-31T01:00:00Z``.

    ``tick`` is an aware datetime or epoch seconds; naive datetimes are refused (they have no
    single UTC time). The same format as :class:`coordlock.Scheduler`, so all interoperate.
    """
    check_name(job, "job name")
    if isinstance(tick, datetime):
        if tick.tzinfo is None or tick.utcoffset() is None:
            raise ValueError(f"tick {tick!r} is a naive datetime: give it a timezone")
        seconds = tick.timestamp()
    elif isinstance(tick, (int, float)) and not isinstance(tick, bool):
        seconds = float(tick)
    else:
        raise TypeError(f"tick must be a datetime or epoch seconds, not {type(tick).__name__}")
    return f"{job}@{tick_key(seconds)}"


def claim_keys(
    coordinator: RunCoordinator, keys: Iterable[str], hold: float
) -> tuple[set[str], dict[str, BaseException]]:
    """Claim ``keys`` for ``hold`` seconds: returns (won keys, {key: error}).

    One ``claim_many`` round trip where the coordinator has it (an error then fails every key),
    else one ``claim`` per key. Errors are returned, not raised, so that callers can fail
    closed per key: a key in the error map must not run.
    """
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return set(), {}
    if isinstance(coordinator, ClaimsMany):
        try:
            return set(coordinator.claim_many(wanted, hold)) & set(wanted), {}
        except Exception as exc:
            return set(), dict.fromkeys(wanted, exc)
    won: set[str] = set()
    errors: dict[str, BaseException] = {}
    for key in wanted:
        try:
            if coordinator.claim(key, hold):
                won.add(key)
        except Exception as exc:
            errors[key] = exc
    return won, errors


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an exception, for logs and events."""
    return f"{type(exc).__name__}: {exc}"


class CoordinatorRef:
    """A coordinator given as an object, a URL (connected on first use, closed by
    :meth:`close`) or ``None`` (``coordlock.get_coordinator()`` looked up on first use, so
    ``coordlock.configure()`` may come after building the integration)."""

    def __init__(self, target: RunCoordinator | str | None) -> None:
        if target is not None and not isinstance(target, (str, RunCoordinator)):
            raise TypeError(
                f"coordinator must be a RunCoordinator, a URL or None, not {type(target).__name__}"
            )
        if isinstance(target, str):
            check_name(target, "coordinator URL")
        self._target = target
        self._resolved: RunCoordinator | None = (
            target if isinstance(target, RunCoordinator) else None
        )
        self._lock = threading.Lock()

    def get(self) -> RunCoordinator:
        """The coordinator; raises ``ConfigurationError``/``NotConfigured`` when there is none."""
        with self._lock:
            if self._resolved is None:
                if isinstance(self._target, str):
                    self._resolved = connect(self._target)
                else:
                    return get_coordinator()  # the global one may be reconfigured: don't cache
            return self._resolved

    def close(self) -> None:
        """Close the coordinator if this reference connected it from a URL."""
        with self._lock:
            resolved, owned = self._resolved, isinstance(self._target, str)
            if owned:
                self._resolved = None
        if owned and resolved is not None:
            resolved.close()


def check_skew(value: object, what: str = "skew") -> float:
    """Seconds (number or ``timedelta``), ``>= 0``; ``None`` gives :data:`DEFAULT_SKEW`."""
    return DEFAULT_SKEW if value is None else check_seconds(value, what, allow_zero=True)


def check_hold(value: object, what: str = "hold") -> float | None:
    """``None`` or seconds (number or ``timedelta``), ``> 0``."""
    return None if value is None else check_seconds(value, what)
