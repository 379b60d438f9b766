"""Operator commands: locks (holder as host:pid), unlock --force, history, jobs, check, --json.

Commands that need to see a lock held by this test run in-process (``coordlock.cli.main``) on
a ``memory://`` table, which only this process shares; the others run as real processes on an
SQLite file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

import coordlock
from coordlock._protocol import LockInfo, RunRecord
from coordlock.backends.memory import MemoryCoordinator
from coordlock.cli import main
from coordlock.cli._common import Holder, holder_text, parse_owner
from coordlock.testing.servers import free_port


@pytest.mark.parametrize(
    ("token", "holder"),
    [
        ("web-1:4242:9f86d081884c7d65", Holder("web-1", 4242, "9f86d081884c7d65")),
        ("db.internal.example:1:ABCDEF", Holder("db.internal.example", 1, "ABCDEF")),
        ("fe80::1:77:00ff", Holder("fe80::1", 77, "00ff")),  # an IPv6 host keeps its colons
        ("a86fc1367308432798f525ff592b08f2", None),  # today's bare random token
        ("host:pid:abc", None),
        ("host:12:", None),
        (":12:abc", None),
        ("host:12:xyz", None),
    ],
)
def test_owner_tokens_parse_as_host_pid(token: str, holder: Holder | None) -> None:
    assert parse_owner(token) == holder
    assert holder_text(token) == (f"{holder.host}:{holder.pid}" if holder else token)


@pytest.fixture
def table(request: pytest.FixtureRequest) -> str:
    return f"memory://cli-{request.node.name}-{time.monotonic_ns()}"


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = capsys.readouterr().out
    data: dict[str, object] = json.loads(out)
    return data


def test_locks_shows_the_holder_and_json_fields(
    table: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = coordlock.connect(table)
    lease = coordinator.acquire("nightly", 30)
    assert lease is not None
    # Pretend the owner token has the host:pid:hex form the core gives owners.
    monkeypatch.setattr(
        MemoryCoordinator, "locks",
        lambda self: [LockInfo("nightly", "web-1:4242:9f86d081", lease.fence, time.time() + 20)],
    )
    try:
        assert main(["locks", "--url", table]) == 0
        text = capsys.readouterr().out
        assert "HOLDER" in text and "web-1:4242" in text and "9f86d081" not in text
        assert main(["locks", "--json", "--url", table]) == 0
        data = _json(capsys)
        (record,) = data["locks"]  # type: ignore[misc]
        assert set(record) == {
            "name", "fence", "holder", "host", "pid", "owner", "expires_at", "expires_in",
        }
        assert record["name"] == "nightly" and record["fence"] == lease.fence
        assert (record["holder"], record["host"], record["pid"]) == ("web-1:4242", "web-1", 4242)
        assert record["owner"] == "web-1:4242:9f86d081"
        assert 0 < record["expires_in"] <= 20
    finally:
        lease.release()
        coordinator.close()


def test_locks_falls_back_to_the_raw_owner(
    table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    coordinator = coordlock.connect(table)
    lease = coordinator.acquire("raw", 30)
    assert lease is not None
    try:
        assert main(["--json", "locks", "--url", table]) == 0
        (record,) = _json(capsys)["locks"]  # type: ignore[misc]
        assert record["owner"] == lease.owner
        if parse_owner(lease.owner) is None:
            assert record["holder"] is None and record["pid"] is None
            assert main(["locks", "--url", table]) == 0
            assert lease.owner in capsys.readouterr().out
    finally:
        lease.release()
        coordinator.close()


def test_empty_locks_json(tmp_path: Path) -> None:
    out = run_cli("locks", "--json", "--url", f"sqlite:///{tmp_path}/l.db")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"locks": []}


def test_unlock_force_frees_the_lock_and_the_next_fence_increases(
    table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = coordlock.connect(table)
    other = coordlock.connect(table)
    lease = holder.acquire("stuck", 60)
    assert lease is not None
    try:
        assert other.acquire("stuck", 60) is None
        assert main(["unlock", "stuck", "--force", "--yes", "--url", table]) == 0
        assert "released lock 'stuck'" in capsys.readouterr().out
        taken = other.acquire("stuck", 60)
        assert taken is not None and taken.fence > lease.fence
        assert lease.extend() is False and lease.lost  # the old holder learns it
        taken.release()
        assert main(["unlock", "stuck", "--force", "--yes", "--json", "--url", table]) == 0
        assert _json(capsys)["released"] is False  # nothing held: still exit 0
    finally:
        lease.release()
        holder.close()
        other.close()


def test_unlock_says_when_the_backend_cannot(
    table: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordlock.backends import BaseCoordinator

    monkeypatch.setattr(MemoryCoordinator, "_force_release", BaseCoordinator._force_release)
    assert main(["unlock", "x", "--force", "--yes", "--url", table]) == 69
    assert "cannot force-unlock" in capsys.readouterr().err


def test_unlock_asks_at_a_terminal(
    table: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import coordlock.cli.locks as locks_cli

    released: list[str] = []
    monkeypatch.setattr(
        MemoryCoordinator, "force_release", lambda self, name: released.append(name) or True,
        raising=False,
    )
    monkeypatch.setattr(locks_cli, "_is_terminal", lambda: True)
    coordinator = coordlock.connect(table)
    lease = coordinator.acquire("x", 30)
    assert lease is not None
    try:
        monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
        assert main(["unlock", "x", "--force", "--url", table]) == 1
        err = capsys.readouterr().err
        assert "force-release lock 'x' held by" in err and f"(fence {lease.fence})" in err
        assert "[y/N]" in err and "not unlocked" in err
        assert released == []
        monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
        assert main(["unlock", "x", "--force", "--url", table]) == 0
        assert released == ["x"]
    finally:
        lease.release()
        coordinator.close()


def _record(url: str, *runs: RunRecord) -> None:
    coordinator = coordlock.connect(url)
    try:
        for run in runs:
            coordinator.record_run(run)  # type: ignore[attr-defined]
    finally:
        coordinator.close()


def test_history_and_jobs_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/h.db"
    t = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    _record(
        url,
        RunRecord("r1", "sync", "2026-01-01T00:00:00Z", "web-1:10:aa", t, t + 2.5, "finished"),
        RunRecord("r2", "sync", "2026-01-01T00:05:00Z", "web-2:11:bb", t + 300, t + 301,
                  "failed", "boom"),
        RunRecord("r3", "backup", "2026-01-01T00:00:00Z", "web-1:10:aa", t + 10, None,
                  "running"),
    )
    out = run_cli("history", "--json", "--url", url)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)["runs"]
    assert [r["run_id"] for r in runs] == ["r2", "r3", "r1"]  # newest first
    assert set(runs[0]) == {
        "run_id", "job", "tick", "instance", "status", "started", "finished", "duration", "error",
    }
    assert runs[0]["error"] == "boom" and runs[0]["duration"] == pytest.approx(1.0)
    assert runs[1]["finished"] is None and runs[1]["duration"] is None

    only = json.loads(run_cli("history", "--json", "--job", "backup", "--url", url).stdout)
    assert [r["run_id"] for r in only["runs"]] == ["r3"]

    out = run_cli("jobs", "--json", "--url", url)
    assert out.returncode == 0, out.stderr
    jobs = json.loads(out.stdout)["jobs"]
    assert [j["job"] for j in jobs] == ["backup", "sync"]
    last = jobs[1]["last_run"]
    assert last["status"] == "failed" and last["instance"] == "web-2:11:bb"
    assert last["started_iso"] == "2026-01-01T00:05:00.000Z"
    assert last["duration"] == pytest.approx(1.0) and last["error"] == "boom"

    text = run_cli("jobs", "--url", url)
    assert text.returncode == 0
    assert "sync" in text.stdout and "2026-01-01 00:05:00" in text.stdout


def test_check_a_healthy_backend(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    out = run_cli("check", url)
    assert out.returncode == 0, out.stderr
    for label in ("backend:", "server:", "round trip:", "clock offset:", "schema/keys:"):
        assert label in out.stdout
    assert "status:       healthy" in out.stdout
    out = run_cli("check", "--json", "--url", url)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {
        "url", "backend", "status", "error", "server_version", "round_trip_ms", "clock_offset",
        "schema",
    }
    assert report["backend"] == "sqlite" and report["status"] == "healthy"
    assert report["schema"] == "ok" and report["error"] is None
    assert report["round_trip_ms"]["claim"] > 0 and report["round_trip_ms"]["lock"] > 0


def test_check_reports_server_info_when_offered(
    table: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        MemoryCoordinator, "server_info",
        lambda self: {"version": "memory 1.0", "time": time.time() + 30.0},
        raising=False,
    )
    assert main(["check", "--json", table]) == 0
    report = _json(capsys)
    assert report["server_version"] == "memory 1.0"
    assert report["clock_offset"] == pytest.approx(30.0, abs=5.0)
    assert main(["check", table]) == 0
    text = capsys.readouterr().out
    assert "memory 1.0" in text and "ahead of" in text


def test_check_unavailable_and_misconfigured() -> None:
    port = free_port()
    down = run_cli("check", "--json", "--retry-deadline", "0.2s", f"redis://127.0.0.1:{port}/0")
    assert down.returncode == 69, down.stderr
    report = json.loads(down.stdout)
    assert report["status"] == "unavailable" and report["backend"] == "redis" and report["error"]
    bad = run_cli("check", "nope://x")
    assert bad.returncode == 78 and "status:       configuration-error" in bad.stdout
    assert "unknown URL scheme" in bad.stderr
    empty = run_cli("check", "--json", "")
    assert empty.returncode == 78
    assert json.loads(empty.stdout)["status"] == "configuration-error"
