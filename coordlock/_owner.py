"""Owner tokens: unique per acquisition, and readable enough to tell which host and process
holds a lock (``coordlock locks``)."""

from __future__ import annotations

import os
import re
import socket
from typing import NamedTuple

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_HOST = 64


def _host() -> str:
    try:
        name = socket.gethostname()
    except OSError:  # pragma: no cover - no hostname at all
        name = ""
    return _UNSAFE.sub("-", name)[:MAX_HOST] or "host"


class _Prefix:
    """``<host>:<pid>:``, recomputed in a forked child (its pid differs)."""

    def __init__(self) -> None:
        self.pid = -1
        self.text = ""

    def get(self) -> str:
        pid = os.getpid()
        if pid != self.pid:
            self.text = f"{_host()}:{pid}:"
            self.pid = pid
        return self.text


_prefix = _Prefix()


def new_owner() -> str:
    """A fresh owner token ``<host>:<pid>:<32 hex>`` (128 random bits, like a uuid4)."""
    return _prefix.get() + os.urandom(16).hex()


class OwnerParts(NamedTuple):
    """An owner token split for display; ``host``/``pid`` are empty for foreign tokens."""

    host: str
    pid: str
    token: str

    @property
    def holder(self) -> str:
        """``host:pid`` when known, else the raw token."""
        return f"{self.host}:{self.pid}" if self.host else self.token


def parse_owner(owner: str) -> OwnerParts:
    """Split an owner token made by :func:`new_owner`; other tokens come back whole."""
    host, sep1, rest = owner.partition(":")
    pid, sep2, token = rest.partition(":")
    if sep1 and sep2 and pid.isdigit() and token:
        return OwnerParts(host, pid, token)
    return OwnerParts("", "", owner)
