"""Node names and node data of the ZooKeeper backend: pure functions, no I/O.

Layout (under the optional chroot; ``<x>`` is a percent-escaped name, so ``/`` in names is safe):

* ``/coordlock/locks/<name>/<owner>-lock-<seq>`` – one EPHEMERAL_SEQUENTIAL node per contender;
  data: the lease ttl in milliseconds (ASCII).
* ``/coordlock/claims/<key>`` (data: JSON hold and claimer token) with one child named by the
  claimer's token.
* ``/coordlock/runs/<job>/<run_id>`` – run history (JSON).
* ``/coordlock/clock`` – written when a fresh reading of the server clock is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

ROOT = "coordlock"
LOCK_MARK = "-lock-"


def escape(name: str) -> str:
    """The node name for a lock name, claim key or job: percent-escaped, never ``.``/``..``."""
    escaped = quote(name, safe="")
    if escaped in (".", ".."):
        escaped = escaped.replace(".", "%2E")
    return escaped


def seq_of(child: str) -> int | None:
    """The sequence number of a lock child ``<owner>-lock-<seq>``; None for foreign nodes."""
    owner, mark, seq = child.rpartition(LOCK_MARK)
    if not mark or not owner:
        return None
    try:
        return int(seq)
    except ValueError:
        return None


def distance(seq: int, ref: int) -> int:
    """Signed distance from ``ref`` to ``seq`` in the 32-bit circular sequence space.

    ZooKeeper sequence numbers are a signed 32-bit counter per directory that wraps; comparing
    circularly keeps the order right across a wrap while fewer than 2**31 contenders are live.
    """
    return ((seq - ref + 2**31) % 2**32) - 2**31


def ordered(children: Iterable[str], ref: int) -> list[tuple[int, str]]:
    """Lock children with their circular distance from ``ref``, lowest first."""
    found = []
    for child in children:
        seq = seq_of(child)
        if seq is not None:
            found.append((distance(seq, ref), child))
    found.sort()
    return found


def ttl_ms(data: bytes | None) -> int | None:
    """The ttl (ms) stamped in a lock node, or None when the data is not ours."""
    if not data or not data.isdigit():
        return None
    return int(data)


def stamp(ttl: float) -> bytes:
    """Lock node data for a lease of ``ttl`` seconds: whole milliseconds, rounded up."""
    return str(max(1, math.ceil(ttl * 1000))).encode()


def claim_data(hold: float, token: str) -> bytes:
    """Claim node data: the hold (ms, rounded up) and the claimer's token."""
    return json.dumps({"hold_ms": math.ceil(hold * 1000), "by": token}).encode()


def batch_id(keys: Iterable[str]) -> str:
    """The identity of a set of claim keys created in one multi (order does not matter)."""
    return hashlib.sha256("\0".join(sorted(keys)).encode()).hexdigest()[:32]


def claim_info(raw: bytes) -> dict[str, Any]:
    """The parsed data of a claim node (``{}`` when unreadable)."""
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
