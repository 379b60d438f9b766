"""Argument checks shared by every entry point, so bad input fails at the call that received it."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from datetime import timedelta

from ._errors import ConfigurationError
from ._protocol import RunRecord

MAX_NAME_LENGTH = 512


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a usable lock or job name; else ``TypeError``/``ValueError``."""
    if type(name) is str and 0 < len(name) <= MAX_NAME_LENGTH and "\x00" not in name and \
            not name.isspace():
        return name  # the common case, checked in one go
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name or not name.strip():
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in name:
        raise ValueError(f"{what} must not contain NUL characters")
    return name


def check_names(names: Iterable[object], what: str = "key") -> list[str]:
    """Check every name of ``names``; a plain ``str`` is refused (it would split into letters)."""
    if isinstance(names, str):
        raise TypeError(f"expected an iterable of {what}s, not a single str")
    return [check_name(n, what) for n in names]


def check_seconds(value: object, what: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` in seconds as a float; accepts int, float and ``timedelta``."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")
    return seconds


def check_ttl(ttl: object) -> float:
    """A lease time-to-live: a positive number of seconds (at least 1 ms)."""
    if (type(ttl) is int or type(ttl) is float) and 0.001 <= ttl < math.inf:
        return float(ttl)
    seconds = check_seconds(ttl, "ttl")
    if seconds < 0.001:
        raise ValueError(f"ttl must be at least 0.001 seconds, got {ttl!r}")
    return seconds


def check_hold_at_least(value: object) -> float | None:
    """``hold_at_least``: ``None``/``0`` (no minimum hold) or a positive number of seconds."""
    if value is None:
        return None
    seconds = check_seconds(value, "hold_at_least", allow_zero=True)
    return seconds or None


def check_wait(wait: object) -> float:
    """Normalise a wait argument to seconds: ``None``/``False`` → 0, ``True`` → forever (inf)."""
    if wait is None or wait is False:
        return 0.0
    if wait is True:
        return math.inf
    if isinstance(wait, float) and math.isinf(wait) and wait > 0:
        return math.inf
    return check_seconds(wait, "wait", allow_zero=True)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Parse ``"90"``, ``"1.5s"``, ``"10m"``, ``"1h30m"``, ``"250ms"`` into seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned:
        raise ValueError("empty duration")
    try:
        return check_seconds(float(cleaned), "duration")
    except ValueError as exc:
        if "duration" in str(exc):
            raise
    pos, total = 0, 0.0
    for match in _DURATION.finditer(cleaned):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if pos != len(cleaned) or pos == 0:
        raise ValueError(
            f"bad duration {text!r}: use seconds or units ms, s, m, h, d (e.g. 30s, 10m, 1h30m)"
        )
    return check_seconds(total, "duration")


def unknown_options(what: str, unknown: Iterable[str], known: Iterable[str]) -> ConfigurationError:
    """A :class:`ConfigurationError` for unknown keyword options of ``what``, naming the valid
    ones and suggesting the closest ("did you mean")."""
    valid = sorted(set(known))
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigurationError(
        f"unknown option(s) for {what}: {', '.join(parts)}; known options: {', '.join(valid)}"
    )


def check_records(runs: object) -> list[RunRecord]:
    """``runs`` (an iterable of :class:`RunRecord`) as a list with one row per ``run_id``: the
    last one given, in the order of those last rows (what writing them one by one would
    leave); ``TypeError`` for anything else."""
    if isinstance(runs, (str, bytes, RunRecord)) or not isinstance(runs, Iterable):
        raise TypeError(f"expected an iterable of RunRecord, not {type(runs).__name__}")
    last: dict[str, RunRecord] = {}
    for run in runs:
        if not isinstance(run, RunRecord):
            raise TypeError(f"expected a RunRecord, not {type(run).__name__}")
        last.pop(run.run_id, None)
        last[run.run_id] = run
    return list(last.values())
