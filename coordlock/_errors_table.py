"""The one table that says which backend errors are worth retrying.

Every driver error that reaches coordlock is classified here, by the exception's class (matched
by qualified name along its MRO, so no driver is imported), its SQLSTATE (``exc.sqlstate``,
PostgreSQL) and its message:

* ``transient`` – the server is down, restarting, unreachable for now: retried with backoff up
  to the coordinator's ``retry_deadline``, then :class:`~coordlock.BackendUnavailable` (69).
* ``permanent`` – retrying cannot help (wrong password, no such database or role, a bad option,
  a host name that does not exist, a Redis DB index out of range, an ACL refusal):
  :class:`~coordlock.ConfigurationError` at once (78).

Anything else raised by a driver becomes :class:`~coordlock.BackendError`. The first matching
rule wins, so specific rules come before general ones. Backend authors add their driver's rules
here (one place), not in their module.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["transient", "permanent"]
TRANSIENT: Kind = "transient"
PERMANENT: Kind = "permanent"


@dataclass(frozen=True)
class Rule:
    """``cls`` (qualified class name, matched along the MRO), optional ``sqlstate`` prefix and
    ``message`` regex (searched, case-insensitive) → ``kind``; ``hint`` is added to the error."""

    cls: str
    kind: Kind
    sqlstate: str | None = None
    message: str | None = None
    hint: str = ""
    errnos: frozenset[int] | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.message is not None:
            object.__setattr__(self, "_pattern", re.compile(self.message, re.IGNORECASE))

    def matches(self, names: frozenset[str], exc: BaseException) -> bool:
        if self.cls not in names:
            return False
        if self.errnos is not None and getattr(exc, "errno", None) not in self.errnos:
            return False
        if self.sqlstate is not None:
            state = getattr(exc, "sqlstate", None)
            if not isinstance(state, str) or not state.startswith(self.sqlstate):
                return False
        return self._pattern is None or bool(self._pattern.search(str(exc)))


_DNS = (
    r"name or service not known|nodename nor servname|could not translate host name|"
    r"no address associated with hostname"
)

RULES: tuple[Rule, ...] = (
    # -- anything socket-level ----------------------------------------------------------------
    Rule("socket.gaierror", PERMANENT, message=_DNS, hint="check the host name in the URL"),
    Rule("socket.gaierror", TRANSIENT),  # "temporary failure in name resolution"
    # -- Redis (redis-py) ----------------------------------------------------------------------
    Rule("redis.exceptions.AuthenticationError", PERMANENT, hint="check the user and password"),
    Rule("redis.exceptions.AuthorizationError", PERMANENT, hint="check the ACL of the user"),
    Rule("redis.exceptions.NoPermissionError", PERMANENT, hint="check the ACL of the user"),
    Rule("redis.exceptions.ResponseError", PERMANENT, message=r"DB index is out of range",
         hint="the /db part of the URL is larger than the server's 'databases' setting"),
    Rule("redis.exceptions.ResponseError", PERMANENT, message=r"^(NOAUTH|WRONGPASS|NOPERM)"),
    Rule("redis.exceptions.ConnectionError", PERMANENT, message=_DNS,
         hint="check the host name in the URL"),
    # (TLS set-up errors are permanent: a retry meets the same certificates.)
    Rule("redis.exceptions.ConnectionError", PERMANENT, message=r"CERTIFICATE_VERIFY_FAILED",
         hint="TLS: the server's certificate is not trusted; check ssl_ca_certs"),
    Rule("redis.exceptions.ConnectionError", PERMANENT, message=r"alert certificate required",
         hint="TLS: the server wants a client certificate; set ssl_certfile and ssl_keyfile"),
    Rule("redis.exceptions.ConnectionError", PERMANENT,
         message=r"alert (unknown ca|bad certificate)",
         hint="TLS: the server refused the client certificate"),
    Rule("redis.exceptions.ResponseError", PERMANENT,
         message=r"can't run this command|no permissions|^unknown command",
         hint="the Redis user lacks a command; see the ACL line in docs/backends/redis.md"),
    Rule("redis.exceptions.ConnectionError", TRANSIENT),
    Rule("redis.exceptions.TimeoutError", TRANSIENT),
    Rule("redis.exceptions.BusyLoadingError", TRANSIENT),
    Rule("redis.exceptions.ReadOnlyError", TRANSIENT),
    Rule("redis.exceptions.TryAgainError", TRANSIENT),
    Rule("redis.exceptions.ClusterDownError", TRANSIENT),
    # -- PostgreSQL (psycopg 3) ----------------------------------------------------------------
    Rule("psycopg.Error", PERMANENT, sqlstate="28"),  # invalid authorization specification
    Rule("psycopg.Error", PERMANENT, sqlstate="3D000", hint="create the database first"),
    Rule("psycopg.Error", PERMANENT, sqlstate="42501", hint="grant the role what it needs"),
    Rule("psycopg.OperationalError", PERMANENT, message=r"database \".*\" does not exist",
         hint="create the database first"),
    Rule("psycopg.OperationalError", PERMANENT, message=r"role \".*\" does not exist"),
    Rule("psycopg.OperationalError", PERMANENT,
         message=r"password authentication failed|no pg_hba\.conf entry|"
         r"authentication failed|password is required|no password supplied"),
    Rule("psycopg.OperationalError", PERMANENT, message=_DNS,
         hint="check the host name in the URL"),
    Rule("psycopg.OperationalError", PERMANENT,
         message=r"invalid (sslmode|connection option|integer value|value for)|"
         r"invalid URI query parameter|missing \"=\" after"),
    Rule("psycopg.ProgrammingError", PERMANENT, message=r"invalid connection option|sslmode|"
         r"couldn't parse connection string|invalid dsn"),
    Rule("psycopg.OperationalError", PERMANENT,
         message=r"invalid \w+ value|unrecognized configuration parameter|"
         r"pg_hba\.conf rejects connection"),
    Rule("psycopg.OperationalError", PERMANENT, hint="check the TLS options (sslmode, sslrootcert)",
         message=r"server does not support SSL, but SSL was required|certificate verify failed|"
         r"root certificate file .* does not exist|could not read root certificate file|"
         r"server certificate for .* does not match host name|"
         r"could not (open|load) (certificate|private key) file"),
    Rule("psycopg.Error", PERMANENT, sqlstate="3F000",  # invalid_schema_name
         hint="run `coordlock init URL` as an admin"),
    Rule("psycopg.errors.SerializationFailure", TRANSIENT),
    Rule("psycopg.errors.DeadlockDetected", TRANSIENT),
    Rule("psycopg.errors.AdminShutdown", TRANSIENT),
    Rule("psycopg.errors.CannotConnectNow", TRANSIENT),
    Rule("psycopg.OperationalError", TRANSIENT),
    Rule("psycopg.InterfaceError", TRANSIENT),  # the connection was closed under us
    Rule("psycopg_pool.PoolTimeout", TRANSIENT),
    # -- ZooKeeper (kazoo) ---------------------------------------------------------------------
    Rule("kazoo.exceptions.AuthFailedError", PERMANENT, hint="check the digest credentials"),
    Rule("kazoo.exceptions.NoAuthError", PERMANENT,
         hint="ZooKeeper refused access (NoAuth): the node's ACL does not allow this identity; "
         "check the user:password in the URL"),
    Rule("kazoo.exceptions.ConnectionLoss", TRANSIENT),
    Rule("kazoo.exceptions.ConnectionClosedError", TRANSIENT),
    Rule("kazoo.exceptions.SessionExpiredError", TRANSIENT),
    Rule("kazoo.exceptions.SessionMovedError", TRANSIENT),  # the session moved to another server
    Rule("kazoo.exceptions.OperationTimeoutError", TRANSIENT),
    Rule("kazoo.handlers.threading.KazooTimeoutError", TRANSIENT),
    Rule("kazoo.handlers.utils.KazooTimeoutError", TRANSIENT),
    # -- SQLite --------------------------------------------------------------------------------
    Rule("sqlite3.OperationalError", TRANSIENT, message=r"locked|busy"),
    # -- plain sockets (connection refused/reset, timeouts) -------------------------------------
    Rule("builtins.ConnectionError", TRANSIENT),
    Rule("builtins.TimeoutError", TRANSIENT),
    Rule("builtins.OSError", TRANSIENT, errnos=frozenset(
        {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EPIPE,
         errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT}
    )),
)

#: Top-level modules whose exceptions are driver errors (translated, never passed through raw).
DRIVER_MODULES = frozenset(
    {"redis", "psycopg", "psycopg_pool", "kazoo", "sqlite3", "socket", "ssl"}
)


def _names(exc: BaseException) -> frozenset[str]:
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__)


def classify(exc: BaseException) -> Rule | None:
    """The first rule matching ``exc``, or ``None``."""
    names = _names(exc)
    for rule in RULES:
        if rule.matches(names, exc):
            return rule
    return None


def is_driver_error(exc: BaseException) -> bool:
    """``True`` for exceptions raised by a database driver or the network stack."""
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.split(".")[0] in DRIVER_MODULES for c in type(exc).__mro__[:-2])
