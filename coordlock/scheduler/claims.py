"""What the scheduler asks the coordinator for, and under which names.

* Tick claims ``f"{job}@{tick_utc_iso}"`` (:func:`claim_key`), all the jobs due on a tick in one
  ``claim_many`` call (:func:`claim_keys`); a batch refused because of *one* key is split until
  that key stands alone, so one bad key never costs the other jobs their tick.
* Leases: ``coordlock:job:<name>`` (no-overlap), ``coordlock:instance:<id>`` (liveness), and
  the once-only verdict claims of the watchdog, ``coordlock:verdict:<run_id>``, and its scan
  claims ``coordlock:scan:<interval>:<slot>`` (one instance scans history per interval).
"""

from __future__ import annotations

import logging

from .._errors import BackendUnavailable, ConfigurationError
from .._protocol import ClaimsMany, RunCoordinator
from .._validate import MAX_NAME_LENGTH, check_name
from .triggers import tick_key

log = logging.getLogger("coordlock")

#: Lease name prefixes used by the scheduler (visible in ``coordlock locks``).
JOB_LEASE_PREFIX = "coordlock:job:"
INSTANCE_LEASE_PREFIX = "coordlock:instance:"
#: Claim prefix of the watchdog's verdicts (one instance reports a vanished run, not all).
VERDICT_PREFIX = "coordlock:verdict:"
#: Claim prefix of the watchdog's history scans (one instance scans per interval, not all).
SCAN_PREFIX = "coordlock:scan:"

#: Errors that say the coordinator cannot be asked at all (not that one key is bad): the whole
#: batch fails closed, without splitting it (each split would wait out the retries again).
WHOLE_BATCH_ERRORS: tuple[type[BaseException], ...] = (BackendUnavailable, ConfigurationError)

#: Bound on the batches one tick may split into while isolating bad keys.
_MAX_SPLIT_CALLS = 64


def claim_key(job: str, tick: float) -> str:
    """The claim key of one tick of one job: ``f"{job}@{tick_utc_iso}"``."""
    return f"{job}@{tick_key(tick)}"


def claim_keys(
    coordinator: RunCoordinator, keys: list[str], hold: float, instance: str
) -> tuple[set[str], dict[str, BaseException]]:
    """Claim ``keys`` for ``hold`` seconds; returns (keys won, {key: error}).

    One ``claim_many`` round trip where the coordinator has it (one ``claim`` per key
    otherwise). When the batch raises an error that is not the coordinator's
    (:data:`WHOLE_BATCH_ERRORS`), such as a ``ValueError`` a backend raises for a key it cannot
    store, the batch is split in halves, recursively, so the keys that can be claimed still
    are and the error is reported for the bad key(s) alone. Backends check every key before
    any I/O, so the failed batch claimed nothing.
    """
    if not isinstance(coordinator, ClaimsMany):
        return _claim_each(coordinator, keys, hold, instance)
    won: set[str] = set()
    errors: dict[str, BaseException] = {}
    budget = [_MAX_SPLIT_CALLS]

    def batch(part: list[str]) -> None:
        budget[0] -= 1
        try:
            won.update(coordinator.claim_many(part, hold))
            return
        except WHOLE_BATCH_ERRORS as exc:
            _warn(instance, part, exc)
            errors.update(dict.fromkeys(part, exc))
            return
        except Exception as exc:
            if len(part) == 1 or budget[0] <= 1:
                _warn(instance, part, exc)
                errors.update(dict.fromkeys(part, exc))
                return
            log.info(
                "scheduler %s: claiming %d tick(s) failed (%s: %s); isolating the bad key",
                instance,
                len(part),
                type(exc).__name__,
                exc,
            )
        middle = len(part) // 2
        batch(part[:middle])
        batch(part[middle:])

    if keys:
        batch(list(keys))
    return won, errors


def _claim_each(
    coordinator: RunCoordinator, keys: list[str], hold: float, instance: str
) -> tuple[set[str], dict[str, BaseException]]:
    won: set[str] = set()
    errors: dict[str, BaseException] = {}
    for key in keys:
        try:
            if coordinator.claim(key, hold):
                won.add(key)
        except Exception as exc:
            _warn(instance, [key], exc)
            errors[key] = exc
    return won, errors


def _warn(instance: str, keys: list[str], exc: BaseException) -> None:
    what = keys[0] if len(keys) == 1 else f"{len(keys)} tick(s)"
    log.warning("scheduler %s: claiming %s failed: %s: %s", instance, what, type(exc).__name__, exc)


def check_instance_id(instance_id: object) -> str:
    """An instance id whose liveness lease name ``coordlock:instance:<id>`` every backend can
    store (at most 512 characters, valid UTF-8); ``TypeError``/``ValueError`` otherwise."""
    limit = MAX_NAME_LENGTH - len(INSTANCE_LEASE_PREFIX)
    if isinstance(instance_id, str) and len(instance_id) > limit:
        raise ValueError(f"instance_id is {len(instance_id)} characters long; at most {limit}")
    checked = check_name(instance_id, "instance_id")
    try:
        checked.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"instance_id {checked!r} is not valid Unicode text: lone surrogate at position "
            f"{exc.start}"
        ) from None
    return checked
