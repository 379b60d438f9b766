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


class _Process:
    """This process's pid and owner prefix ``<host>:<pid>:``, kept up to date across fork()
    (``os.getpid()`` is a system call: the hot path reads the cached value)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.prefix = f"{_host()}:{self.pid}:"

    def _after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]


process = _Process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=process._after_fork_in_child)


def current_pid() -> int:
    """``os.getpid()``, without the system call."""
    return process.pid


def new_owner() -> str:
    """A fresh owner token ``<host>:<pid>:<32 hex>`` (128 random bits, like a uuid4)."""
    return process.prefix + os.urandom(16).hex()


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
