"""What every ``coordlock`` subcommand shares: exit statuses, the URL, logging, signals."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .._errors import ConfigurationError
from .._protocol import RunCoordinator
from .._redact import redact_url, scrub
from .._registry import connect
from .._validate import parse_duration

# Exit statuses (sysexits.h), documented in --help and docs/cli.md.
EX_OK = 0
EX_FAILED = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75  # the lock was busy, or the tick ran elsewhere
EX_CONFIG = 78

ENV_URL = "COORDLOCK_URL"

log = logging.getLogger("coordlock")


class UsageError(Exception):
    """Bad command-line usage: exit status 64."""


class Interrupted(Exception):
    """A terminating signal (SIGINT, SIGTERM, SIGHUP) arrived: exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


# -- the URL ----------------------------------------------------------------------------------


def default_state_file() -> Path:
    """``$XDG_STATE_HOME/coordlock/locks.db`` (default ``~/.local/state/coordlock/locks.db``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "coordlock" / "locks.db"


def default_url() -> str:
    """``$COORDLOCK_URL`` if set, else the per-user SQLite file.

    Raises :class:`ConfigurationError` when the variable is set but empty or blank (a crontab
    line with an unset variable must not fall back to a one-host SQLite file unnoticed).
    """
    return resolve_url(None)[0]


def resolve_url(explicit: str | None) -> tuple[str, str]:
    """The URL to use and where it came from (``--url``, ``$COORDLOCK_URL``, ``default``)."""
    if explicit is not None:
        if not explicit.strip():
            raise ConfigurationError(
                "--url is empty: give a coordinator URL such as redis://host:6379/0 "
                "(or leave --url out to use $COORDLOCK_URL)"
            )
        return explicit.strip(), "--url"
    env = os.environ.get(ENV_URL)
    if env is not None:
        if not env.strip():
            raise ConfigurationError(
                f"${ENV_URL} is set but empty: set it to a coordinator URL such as "
                f"redis://host:6379/0, or unset it to use the local SQLite file"
            )
        return env.strip(), f"${ENV_URL}"
    return f"sqlite:///{default_state_file()}", "default (one host only)"


@dataclass
class Context:
    """The global options of one invocation (given before or after the subcommand)."""

    url: str | None
    verbose: int
    json: bool
    retry_deadline: float | None
    resolved: str | None = None  # the URL actually used, once known (for scrubbing)

    def open(self, url: str | None = None) -> RunCoordinator:
        """Connect to ``url`` (else ``--url``, ``$COORDLOCK_URL``, the default SQLite file)."""
        target, source = resolve_url(url if url is not None else self.url)
        self.resolved = target
        if target == f"sqlite:///{default_state_file()}":
            default_state_file().parent.mkdir(parents=True, exist_ok=True)
        scheme = target.split("://", 1)[0].lower()
        log.info(
            "backend %s at %s (from %s)", scheme, redact_url(target), source,
            extra={"event": "connect", "backend": scheme, "url": redact_url(target),
                   "source": source},
        )  # fmt: skip
        options: dict[str, Any] = {}
        if self.retry_deadline is not None:
            options["retry_deadline"] = self.retry_deadline
        return connect(target, **options)

    def scrub(self, text: str) -> str:
        """``text`` without any secret of the URLs this invocation saw."""
        return scrub(text, self.url, self.resolved, os.environ.get(ENV_URL))


# -- argument types ---------------------------------------------------------------------------


def duration(text: str) -> float:
    """argparse type: ``90``, ``1.5``, ``250ms``, ``30s``, ``10m``, ``1h30m`` → seconds."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def wait_duration(text: str) -> float:
    """argparse type: a duration, or ``forever``/``inf``."""
    if text.strip().lower() in ("forever", "inf"):
        return float("inf")
    return duration(text)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- owners: "<host>:<pid>:<random hex>" --------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, parsed from its owner token (``host:pid:hex``)."""

    host: str
    pid: int
    token: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


def parse_owner(owner: str) -> Holder | None:
    """``Holder`` for an owner token ``<host>:<pid>:<random hex>``; ``None`` for any other form.

    The host part may itself contain colons (an IPv6 address); pid and token are the last two.
    """
    host, sep1, rest = owner.rpartition(":")
    if not sep1:
        return None
    host, sep2, pid = host.rpartition(":")
    if not sep2 or not host or not pid.isdigit():
        return None
    if not rest or any(c not in "0123456789abcdefABCDEF" for c in rest):
        return None
    return Holder(host, int(pid), rest)


def holder_text(owner: str) -> str:
    """``host:pid`` when the token has that form, else the raw token."""
    holder = parse_owner(owner)
    return str(holder) if holder else owner


# -- output -----------------------------------------------------------------------------------


def print_json(data: object, stream: TextIO | None = None) -> None:
    """Write ``data`` as indented JSON with a trailing newline."""
    out = stream or sys.stdout
    out.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


class _ScrubFilter(logging.Filter):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.ctx.scrub(record.getMessage())
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            message = f"{message}\n{self.ctx.scrub(text)}"
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = message, None
        return True


@contextmanager
def cli_logging(ctx: Context) -> Iterator[None]:
    """Route the ``coordlock`` logger to stderr at the level ``-v`` asked for, scrubbed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("coordlock: %(levelname)s %(message)s"))
    handler.addFilter(_ScrubFilter(ctx))
    level = logging.DEBUG if ctx.verbose > 1 else logging.INFO if ctx.verbose else logging.WARNING
    previous_level, previous_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
        log.propagate = previous_propagate


# -- signals ----------------------------------------------------------------------------------

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in TERMINATING}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_status_for_signal(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
    return 128 + signum
