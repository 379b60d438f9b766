"""Issue 14: one error table; permanent errors fail fast, transient ones are retried with one
warning line, every driver error reaching a caller is a CoordlockError with the cause chained."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import uuid
from typing import Any

import pytest

from coordlock import BackendError, BackendUnavailable, ConfigurationError
from coordlock._errors_table import PERMANENT, TRANSIENT, classify
from coordlock._retry import RetryPolicy
from coordlock.backends.memory import MemoryCoordinator


class _Fake(Exception):
    """Stands for a driver exception class; its qualified name is set per test."""


def fake(qualname: str, message: str = "boom", **attrs: Any) -> Exception:
    module, _, name = qualname.rpartition(".")
    cls = type(name, (_Fake,), {"__module__": module})
    exc = cls(message)
    for key, value in attrs.items():
        setattr(exc, key, value)
    return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (fake("redis.exceptions.ResponseError", "DB index is out of range"), PERMANENT),
        (fake("redis.exceptions.AuthenticationError", "invalid password"), PERMANENT),
        (fake("redis.exceptions.ConnectionError",
              "Error -2 connecting to nohost:6379. Name or service not known."), PERMANENT),
        (fake("redis.exceptions.ConnectionError", "Connection refused"), TRANSIENT),
        (fake("psycopg.OperationalError", 'FATAL:  database "nosuchdb" does not exist'),
         PERMANENT),
        (fake("psycopg.OperationalError", 'FATAL:  role "nosuchuser" does not exist'), PERMANENT),
        (fake("psycopg.OperationalError", 'invalid sslmode value: "bogus"'), PERMANENT),
        (fake("psycopg.OperationalError", "connection refused"), TRANSIENT),
        (fake("psycopg.Error", "x", sqlstate="28P01"), PERMANENT),
        (fake("kazoo.exceptions.AuthFailedError"), PERMANENT),
        (fake("kazoo.exceptions.ConnectionLoss"), TRANSIENT),
        (sqlite3.OperationalError("database is locked"), TRANSIENT),
        (socket.gaierror(-2, "Name or service not known"), PERMANENT),
        (ConnectionRefusedError(111, "Connection refused"), TRANSIENT),
    ],
)
def test_the_table_classifies(exc: BaseException, kind: str) -> None:
    rule = classify(exc)
    assert rule is not None and rule.kind == kind


def test_unknown_errors_are_not_classified() -> None:
    assert classify(ValueError("mine")) is None
    assert classify(fake("redis.exceptions.ResponseError", "WRONGTYPE")) is None


class Failing(MemoryCoordinator):
    """A memory coordinator whose acquire hook raises ``error`` ``times`` times."""

    def __init__(self, error: BaseException, times: int = 10**9, **kw: Any) -> None:
        super().__init__(f"err-{uuid.uuid4().hex}", **kw)
        self.error = error
        self.left = times
        self.calls = 0

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Any:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise self.error
        return super()._try_acquire(name, owner, ttl, ticket)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "coordlock" and r.levelno >= logging.WARNING]


def test_transient_error_retried_with_one_warning_then_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Failing(ConnectionRefusedError(111, "Connection refused"), retry_deadline=0.6)
    with caplog.at_level(logging.DEBUG, "coordlock"), pytest.raises(BackendUnavailable) as err:
        c.acquire("x", 5)
    assert c.calls > 2  # it did retry
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert isinstance(err.value.__cause__, ConnectionRefusedError)
    c.close()


def test_transient_blip_is_survived(caplog: pytest.LogCaptureFixture) -> None:
    c = Failing(ConnectionRefusedError(111, "refused"), times=2, retry_deadline=10)
    with caplog.at_level(logging.WARNING, "coordlock"):
        lease = c.acquire("x", 5)
    assert lease is not None and lease.release()
    assert len(_warnings(caplog)) == 1
    c.close()


def test_permanent_error_fails_at_once_without_retry(caplog: pytest.LogCaptureFixture) -> None:
    exc = fake("psycopg.OperationalError", 'FATAL:  database "nosuchdb" does not exist')
    c = Failing(exc, retry_deadline=3600)  # were it retried, this would hang
    with caplog.at_level(logging.WARNING, "coordlock"), pytest.raises(ConfigurationError) as err:
        c.acquire("x", 5)
    assert c.calls == 1
    assert "nosuchdb" in str(err.value) and err.value.__cause__ is exc
    assert _warnings(caplog) == []
    c.close()


def test_unexpected_driver_error_becomes_backend_error() -> None:
    exc = fake("redis.exceptions.ResponseError", "WRONGTYPE Operation against a key")
    c = Failing(exc)
    with pytest.raises(BackendError) as err:
        c.acquire("x", 5)
    assert not isinstance(err.value, BackendUnavailable)
    assert err.value.__cause__ is exc and c.calls == 1
    c.close()


def test_our_own_bugs_are_not_disguised() -> None:
    c = Failing(KeyError("a bug"))
    with pytest.raises(KeyError):
        c.acquire("x", 5)
    c.close()


def test_async_path_uses_the_same_policy(caplog: pytest.LogCaptureFixture) -> None:
    c = Failing(ConnectionRefusedError(111, "Connection refused"), retry_deadline=0.6)

    async def main() -> None:
        with pytest.raises(BackendUnavailable):
            await c.aacquire("x", 5)
        await c.aclose()

    with caplog.at_level(logging.WARNING, "coordlock"):
        asyncio.run(main())
    assert c.calls > 2 and len(_warnings(caplog)) == 1


def test_closed_coordinator_stops_retrying() -> None:
    policy = RetryPolicy(3600, stopped=lambda: True)
    calls = []

    def fn() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "refused")

    with pytest.raises(BackendUnavailable):
        policy.call(fn, "test")
    assert len(calls) == 1


def test_unknown_backend_option_says_did_you_mean() -> None:
    match = r"'retry_dedline' \(did you mean 'retry_deadline'"
    with pytest.raises(ConfigurationError, match=match):
        MemoryCoordinator("x", retry_dedline=3)
