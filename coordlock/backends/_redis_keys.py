"""Key layout of the Redis backend (pure string functions, no I/O).

Every key starts with the prefix, so a Redis 6+ ACL user confined to ``~<prefix>*`` can use
coordlock. The keys of one lock name share the hash tag ``{<name>}`` (one Cluster slot per
name); claims share ``{claims}`` and run history ``{runs}``::

    <prefix>{<name>}:lock                 owner token, PX = ttl
    <prefix>{<name>}:fence                latest fence (kept)
    <prefix>{<name>}:queue                waiting owners, first come first served (short-lived)
    <prefix>{<name>}:waiting              each waiter's registration (short-lived)
    <prefix>{<name>}:wake:<owner>         a hand-over to the waiter <owner> (short-lived)
    <prefix>{<name>}:released:<owner>     "released by <owner>" tombstone (short-lived)
    <prefix>claim:{claims}:<key>          once-only claims
    <prefix>run:{runs}:<run_id>, <prefix>runs:{runs}:job:<job>, <prefix>runs:{runs}:all

A name that starts with ``}`` would make an empty hash tag (Redis then hashes the whole key,
scattering one name's keys over several slots), so such names, and names starting with the
escape character ``\\``, are written with one ``\\`` in front inside the braces. The mapping
stays one-to-one.

Versions before this layout used ``{<prefix><name>}:lock`` / ``:fence``; :meth:`legacy_fence`
names the old fence key, which the acquire script reads as a floor (see ``_redis_scripts``).
"""

from __future__ import annotations

import math

ESCAPE = "\\"
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def escape_name(name: str) -> str:
    """``name`` as written between the braces (one-to-one, never an empty hash tag)."""
    return ESCAPE + name if name[:1] in ("}", ESCAPE) else name


def unescape_name(text: str) -> str:
    """The inverse of :func:`escape_name`."""
    return text[1:] if text[:1] == ESCAPE else text


def ms(seconds: float) -> int:
    """Seconds → whole milliseconds, rounded up so the server never expires a key earlier
    than the client believes it holds it."""
    return max(1, math.ceil(seconds * 1000))


class KeyLayout:
    """The keys of one prefix (the prefix must be non-empty and free of ``{``/``}``)."""

    __slots__ = (
        "_lock_head",
        "all_index",
        "claim_prefix",
        "job_index_prefix",
        "prefix",
        "run_prefix",
    )

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock_head = prefix + "{"
        self.claim_prefix = f"{prefix}claim:{{claims}}:"
        self.run_prefix = f"{prefix}run:{{runs}}:"
        self.job_index_prefix = f"{prefix}runs:{{runs}}:job:"
        self.all_index = f"{prefix}runs:{{runs}}:all"

    def tag(self, name: str) -> str:
        """``<prefix>{<name>}``: the common head of every key of lock ``name``."""
        return self._lock_head + escape_name(name) + "}"

    def lock(self, name: str) -> str:
        if name[:1] in ("}", ESCAPE):
            name = ESCAPE + name
        return self._lock_head + name + "}:lock"  # tag(name) + ":lock", inlined (hot path)

    def fence(self, name: str) -> str:
        return self.tag(name) + ":fence"

    def queue(self, name: str) -> str:
        return self.tag(name) + ":queue"

    def waiting(self, name: str) -> str:
        return self.tag(name) + ":waiting"

    def wake(self, name: str, owner: str) -> str:
        return self.tag(name) + ":wake:" + owner

    def released(self, name: str, owner: str) -> str:
        return self.tag(name) + ":released:" + owner

    def legacy_fence(self, name: str) -> str:
        """The fence key of the layout before 0.2 (``{<prefix><name>}:fence``)."""
        return "{" + self.prefix + name + "}:fence"

    def claim(self, key: str) -> str:
        return self.claim_prefix + key

    def lock_pattern(self) -> str:
        """``SCAN MATCH`` pattern of this prefix's lock keys."""
        return self._lock_head.translate(_GLOB_SPECIAL) + "*}:lock"

    def name_of_lock(self, key: str) -> str | None:
        """The lock name of a key matched by :meth:`lock_pattern`, or None if it is not one."""
        if key.startswith(self._lock_head) and key.endswith("}:lock"):
            return unescape_name(key[len(self._lock_head) : -len("}:lock")])
        return None
