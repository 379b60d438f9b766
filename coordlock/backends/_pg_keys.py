"""Lock name → PostgreSQL advisory-lock key (a documented, stable 64-bit hash).

The key of a lock is the first 8 bytes of SHA-256 over the UTF-8 bytes of
``namespace + "\\0" + name``, read as a *signed big-endian* 64-bit integer, which is exactly the
``bigint`` that ``pg_try_advisory_lock(bigint)`` takes. The same key computed in SQL::

    SELECT ('x' || left(encode(sha256(convert_to('coordlock', 'UTF8') || '\\x00'::bytea
            || convert_to('nightly-report', 'UTF8')), 'hex'), 16))::bit(64)::bigint;
    -- -8600211268409845929  (= lock_key("nightly-report"))

The namespace defaults to the schema name, so two schemas of one database never share keys.
Golden vectors in ``tests/test_postgres_backend.py`` fix this
mapping forever: changing it would let two versions of coordlock hand out the same lock twice.

With 2^64 keys, the chance that any two of ``n`` names collide is about ``n² / 2^65``: one in
37 million for a million names (tooz's 16-bit keys collide at a few hundred names).
"""

from __future__ import annotations

import hashlib

#: The namespace used when none is configured (the default schema name).
DEFAULT_NAMESPACE = "coordlock"


def lock_key(name: str, namespace: str = DEFAULT_NAMESPACE) -> int:
    """The signed 64-bit advisory-lock key of ``name`` in ``namespace``."""
    if not isinstance(name, str) or not isinstance(namespace, str):
        raise TypeError("name and namespace must be str")
    digest = hashlib.sha256(f"{namespace}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
