"""Structured logs: coordlock's log records carry their facts as attributes (``extra=``), so a
JSON formatter or an OpenTelemetry log bridge sees them; the message text stays for humans."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import coordlock
from coordlock.backends import Attempt
from coordlock.backends.memory import MemoryCoordinator
from coordlock.cli._common import Context

#: What a JSON formatter adds: every attribute a plain LogRecord does not have.
STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """The kind of formatter the docs show: message plus the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        facts = {k: v for k, v in vars(record).items() if k not in STANDARD}
        return json.dumps({"level": record.levelname, "message": record.getMessage(), **facts})


@pytest.fixture
def memory() -> Iterator[Any]:
    c = coordlock.connect(f"memory://logs-{uuid.uuid4().hex}")
    yield c
    c.close()


def facts(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in STANDARD}


def test_a_lost_lease_logs_lock_fence_backend_owner_event_and_reason(
    memory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        lease = memory.acquire("logged", 0.2, renew=False)
        assert lease is not None
        deadline = time.monotonic() + 10  # the report is made on the callback thread
        while time.monotonic() < deadline and not any(
            getattr(r, "event", None) == "lost" for r in caplog.records
        ):
            time.sleep(0.02)
    record = next(r for r in caplog.records if getattr(r, "event", None) == "lost")
    assert facts(record) == {
        "lock": "logged",
        "fence": lease.fence,
        "owner": lease.owner,
        "backend": "memory",
        "event": "lost",
        "reason": "ttl elapsed (renewal is off for this lease)",
    }
    assert "logged" in record.getMessage()  # the text stays human
    line = json.loads(JsonFormatter().format(record))
    assert line["lock"] == "logged" and line["event"] == "lost" and line["level"] == "WARNING"


def test_retries_log_the_operation_and_the_error(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(MemoryCoordinator):
        failures = 1

        def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("connection reset by peer")
            return super()._try_acquire(name, owner, ttl, ticket)

    coordinator = Flaky(f"flaky-{uuid.uuid4().hex}")
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        lease = coordinator.acquire("retried", 5)
    assert lease is not None
    lease.release()
    coordinator.close()
    record = next(r for r in caplog.records if getattr(r, "event", None) == "retry")
    assert record.operation == "acquire 'retried'"  # type: ignore[attr-defined]
    assert record.outcome == "retrying"  # type: ignore[attr-defined]
    assert record.error == "ConnectionError: connection reset by peer"  # type: ignore[attr-defined]
    assert record.duration == coordinator.retry_deadline  # type: ignore[attr-defined]


def test_a_failing_callback_logs_the_lease_facts(
    memory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def bad(lease: Any) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="coordlock"):
        lease = memory.acquire("with-callback", 0.2, renew=False)
        lease.on_lost(bad)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            getattr(r, "event", None) == "callback" for r in caplog.records
        ):
            time.sleep(0.02)
    record = next(r for r in caplog.records if getattr(r, "event", None) == "callback")
    assert record.lock == "with-callback" and record.outcome == "error"  # type: ignore[attr-defined]
    assert record.state == "lost" and record.exc_info is not None  # type: ignore[attr-defined]


def test_the_cli_logs_which_backend_it_uses(caplog: pytest.LogCaptureFixture) -> None:
    ctx = Context(url="redis://:s3cret-pass@127.0.0.1:1/0", verbose=1, json=False,
                  retry_deadline=None)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="coordlock"):
        with contextlib.suppress(coordlock.CoordlockError):  # the log line comes first
            ctx.open().close()
    record = next(r for r in caplog.records if getattr(r, "event", None) == "connect")
    assert record.backend == "redis" and record.source == "--url"  # type: ignore[attr-defined]
    assert "s3cret-pass" not in record.url  # type: ignore[attr-defined]


def test_no_coordlock_record_uses_a_reserved_attribute(
    memory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``extra={"name": ...}`` would raise KeyError inside logging; every path above logged."""
    with caplog.at_level(logging.DEBUG, logger="coordlock"):
        with memory.lock("reserved", ttl=5):
            pass
        taken = memory.acquire("reserved-2", 30)
        memory.force_release("reserved-2")
        assert taken.extend() is False
        deadline = time.monotonic() + 10  # loss reports are made on the callback thread
        while time.monotonic() < deadline and not any(
            getattr(r, "lock", None) == "reserved-2" for r in caplog.records
        ):
            time.sleep(0.02)
    assert any(getattr(r, "lock", None) == "reserved-2" for r in caplog.records)


def test_every_core_and_cli_log_call_carries_facts() -> None:
    """Each ``log.<level>(...)`` in coordlock/_*.py and coordlock/cli/*.py passes ``extra=``,
    and no literal ``extra`` uses a key reserved by ``logging.LogRecord``."""
    root = Path(__file__).resolve().parents[1] / "coordlock"
    levels = {"debug", "info", "warning", "error", "exception", "critical", "log"}
    missing, reserved = [], []
    for path in sorted([*root.glob("_*.py"), *(root / "cli").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.func.attr in levels
            ):
                continue
            extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            if extra is None:
                missing.append(where)
            elif isinstance(extra, ast.Dict):
                keys = {k.value for k in extra.keys if isinstance(k, ast.Constant)}
                reserved += [f"{where} {key}" for key in keys & STANDARD]
    assert missing == [], f"log calls without extra=: {missing}"
    assert reserved == [], f"extra keys reserved by LogRecord: {reserved}"
