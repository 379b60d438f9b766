"""Owner tokens: unique per acquisition, and readable enough to tell which host and process
holds a lock (``coordlock locks``)."""

from __future__ import annotations

import os
import re
import socket
import threading
from typing import NamedTuple

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_HOST = 64


def _host() -> str:
    try:
        name = socket.gethostname()
    except OSError:  # pragma: no cover - no hostname at all
        name = ""
    return _UNSAFE.sub("-", name)[:MAX_HOST] or "host"


#: Random bytes read from the OS at a time for owner tokens (a system call per token costs more
#: than the rest of an in-memory lock/unlock pair on some kernels and sandboxes).
RANDOM_BATCH = 4096


class _Process:
    """This process's pid and owner prefix ``<host>:<pid>:``, kept up to date across fork()
    (``os.getpid()`` is a system call: the hot path reads the cached value), and a buffer of
    random hex digits for owner tokens (dropped in a forked child, which reads its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.prefix = f"{_host()}:{self.pid}:"
        self.random_hex = ""
        self.random_pos = 0
        self.random_lock = threading.Lock()

    def token_hex(self) -> str:
        """32 fresh random hex digits (128 bits from ``os.urandom``), each handed out once."""
        with self.random_lock:
            pos = self.random_pos
            if pos + 32 > len(self.random_hex):
                self.random_hex = os.urandom(RANDOM_BATCH).hex()
                pos = 0
            self.random_pos = pos + 32
            return self.random_hex[pos : pos + 32]

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
    return process.prefix + process.token_hex()


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
