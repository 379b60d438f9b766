"""Session markers: one advisory lock per lock session, released first when the session ends.

A lock session takes its *marker* (an advisory lock on a random 64-bit key) once, when it
connects, and holds it for its whole life. Every lease row records the marker of the session
that took it. An acquirer that finds a key free but its lease row unexpired and not its own
tests the marker with ``pg_try_advisory_xact_lock_shared``:

* the marker is held: the holding session is alive, so it let the key go on purpose (a
  release): take the lock over;
* the marker is free: the session ended while it held the key (terminated, crashed, idle
  timeout): the key is an *orphan*; leave it until its lease expires.

That test is only sound if a dying session frees its marker **no later than** any key it holds:
a waiter woken by the key must find the marker free. PostgreSQL frees a session's advisory
locks at exit (``LockReleaseAll``) one lock-manager partition after the other, 0 to 15, with
everything of one partition freed under that partition's lock (so atomically for others). A
marker in partition 0 is therefore freed first. The partition of a lock is its lock tag's hash
(``hash_bytes`` over the 16-byte ``LOCKTAG``) modulo the number of partitions
(``NUM_LOCK_PARTITIONS``, 16 since PostgreSQL 8.4, a compile-time constant); markers are
chosen with the hash's low 4 bits zero. ``tests/test_postgres_markers.py`` checks the hash
against the server's ``hashtext`` and the release order against a real dying session (with a
marker outside partition 0 as the negative control).

Layout facts used (PostgreSQL 13 to 17): ``LOCKTAG`` = (uint32 database oid, uint32 key high
half, uint32 key low half, uint16 1, uint8 ``LOCKTAG_ADVISORY`` = 10, uint8 ``USER_LOCKMETHOD``
= 2), hashed in the server's native byte order (little-endian assumed; checked at connect by
comparing :data:`PROBE_TEXT`'s ``hashtext`` with :func:`hash_bytes`).
"""

from __future__ import annotations

import secrets
import struct

_M32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

#: ``LOCKTAG_ADVISORY`` and ``USER_LOCKMETHOD`` in PostgreSQL 13+.
LOCKTAG_ADVISORY = 10
USER_LOCKMETHOD = 2
#: Partitions of the lock manager (``NUM_LOCK_PARTITIONS``, 16 since 8.4).
LOCK_PARTITIONS = 16
#: Markers have these low hash bits zero: partition 0.
MARKER_HASH_MASK = LOCK_PARTITIONS - 1

#: Text whose ``hashtext`` the server computes at connect, to check :func:`hash_bytes`.
PROBE_TEXT = "coordlock marker probe"


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


#: lookup3's ``mix``: (i, j, k, r) means s[i] -= s[j]; s[i] ^= rot(s[j], r); s[j] += s[k].
_MIX = ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4))
#: lookup3's ``final``: (i, j, r) means s[i] ^= s[j]; s[i] -= rot(s[j], r).
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def hash_bytes(data: bytes) -> int:
    """PostgreSQL's ``hash_bytes`` (Bob Jenkins' lookup3, little-endian): an unsigned 32-bit int."""
    n = len(data)
    state = [(0x9E3779B9 + n + 3923095) & _M32] * 3
    i = 0
    while n - i >= 12:
        for w, word in enumerate(struct.unpack_from("<III", data, i)):
            state[w] = (state[w] + word) & _M32
        for x, y, z, r in _MIX:
            state[x] = ((state[x] - state[y]) & _M32) ^ _rot(state[y], r)
            state[y] = (state[y] + state[z]) & _M32
        i += 12
    rest = n - i
    tail = struct.unpack_from("<III", data[i:] + bytes(12), 0)
    if rest > 8:  # the lowest byte of c is reserved for the length
        state[2] = (state[2] + (tail[2] << 8)) & _M32
    if rest > 4:
        state[1] = (state[1] + tail[1]) & _M32
    if rest > 0:
        state[0] = (state[0] + tail[0]) & _M32
    for x, y, r in _FINAL:
        state[x] = ((state[x] ^ state[y]) - _rot(state[y], r)) & _M32
    return state[2]


def hashtext_probe() -> int:
    """The signed ``int4`` the server's ``hashtext(PROBE_TEXT COLLATE "C")`` must return."""
    value = hash_bytes(PROBE_TEXT.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def advisory_tag_hash(database_oid: int, key: int) -> int:
    """The lock-manager hash of the advisory lock on the ``bigint`` ``key`` in a database."""
    unsigned = key & _U64
    tag = struct.pack(
        "<IIIHBB",
        database_oid & _M32,
        unsigned >> 32,
        unsigned & _M32,
        1,
        LOCKTAG_ADVISORY,
        USER_LOCKMETHOD,
    )
    return hash_bytes(tag)


def advisory_partition(database_oid: int, key: int) -> int:
    """The lock-manager partition (0-15) of the advisory lock on ``key``."""
    return advisory_tag_hash(database_oid, key) % LOCK_PARTITIONS


def choose_marker(database_oid: int) -> int:
    """A random signed 64-bit advisory key whose lock lands in partition 0 (about 16 tries,
    well under a millisecond)."""
    while True:
        key = int.from_bytes(secrets.token_bytes(8), "big", signed=True)
        if advisory_tag_hash(database_oid, key) & MARKER_HASH_MASK == 0:
            return key
