"""Which psycopg errors are worth retrying, and which are a configuration mistake.

Connection failures carry no SQLSTATE (libpq reports them as text), so they are told apart by
message; errors of statements by SQLSTATE. *Permanent* errors (a missing database or role, bad
credentials, a bad connection option, a host name that does not exist, TLS that cannot be
verified, missing privileges) fail at once as :class:`~coordlock.ConfigurationError`: retrying
them for the whole retry deadline only delays the message. *Transient* ones (refused, reset,
timeouts, a server starting up or shutting down, too many connections) are retried. The rules
are data (:data:`PERMANENT_MESSAGES`, :data:`TRANSIENT_MESSAGES`, :data:`PERMANENT_SQLSTATES`,
:data:`TRANSIENT_SQLSTATES`) so that the core's error table can take them over unchanged.

The messages are libpq's and the server's in English (``lc_messages`` C/en, the default).
"""

from __future__ import annotations

import re
from typing import Literal

Verdict = Literal["permanent", "transient"]

#: Messages of connection failures that no retry can fix.
PERMANENT_MESSAGES: tuple[str, ...] = (
    r'database ".*" does not exist',
    r'role ".*" does not exist',
    r"authentication failed",  # password, peer, ident, ...
    r"no password supplied",
    r"no pg_hba\.conf entry",
    r"pg_hba\.conf rejects connection",
    r"invalid \w+ value",  # libpq option values: sslmode, target_session_attrs, ...
    r"invalid integer value .* for connection option",
    r"invalid connection option",
    r"invalid URI query parameter",
    r"unrecognized configuration parameter",
    r"failed to resolve host .*(Name or service not known|No address associated"
    r"|nodename nor servname)",
    r"could not translate host name .*(Name or service not known|No address associated"
    r"|nodename nor servname)",
    r"server does not support SSL, but SSL was required",
    r"certificate verify failed",
    r"root certificate file .* does not exist",
    r"could not read root certificate file",
    r"server certificate for .* does not match host name",
    r"could not (open|load) (certificate|private key) file",
    r"permission denied",
)

#: Messages of connection failures that a retry may fix (checked after the permanent ones).
TRANSIENT_MESSAGES: tuple[str, ...] = (
    r"Connection refused",
    r"Connection reset",
    r"timeout expired",
    r"timed out",
    r"server closed the connection unexpectedly",
    r"terminating connection",
    r"the database system is (starting up|shutting down|in recovery mode|not yet accepting)",
    r"too many clients already",
    r"remaining connection slots are reserved",
    r"Temporary failure in name resolution",
    r"No route to host",
    r"Network is unreachable",
    r"consuming input failed",
    r"sending query .*failed",
    r"the connection is lost",
    r"connection is closed",
)

#: SQLSTATEs (or classes, two characters) of statements that fail for a configuration reason.
PERMANENT_SQLSTATES: frozenset[str] = frozenset(
    {"28000", "28P01", "3D000", "3F000", "42501", "42P01", "42883"}
)
#: SQLSTATE classes/codes worth retrying: connection exceptions, serialization failures and
#: deadlocks, insufficient resources, lock_timeout, operator intervention (shutdowns,
#: terminations, cancels), system errors.
TRANSIENT_SQLSTATES: frozenset[str] = frozenset(
    {"08", "40001", "40P01", "53", "55P03", "57014", "57P01", "57P02", "57P03", "57P05", "58"}
)

_PERMANENT = re.compile("|".join(PERMANENT_MESSAGES), re.IGNORECASE)
_TRANSIENT = re.compile("|".join(TRANSIENT_MESSAGES), re.IGNORECASE)


def classify(exc: BaseException) -> Verdict | None:
    """``permanent``, ``transient`` or ``None`` (unknown) for a psycopg error."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate in PERMANENT_SQLSTATES:
            return "permanent"
        if sqlstate in TRANSIENT_SQLSTATES or sqlstate[:2] in TRANSIENT_SQLSTATES:
            return "transient"
        return None
    text = str(exc)
    if _PERMANENT.search(text):
        return "permanent"
    if _TRANSIENT.search(text):
        return "transient"
    # psycopg's OperationalError without a SQLSTATE is a connection-level failure.
    if any(cls.__name__ == "OperationalError" for cls in type(exc).__mro__):
        return "transient"
    return None
