"""The ``coordlock`` command, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import coordlock
from coordlock.cli import EX_CONFIG, EX_TEMPFAIL, EX_USAGE, default_url


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "coordlock.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


def test_help_reads_well() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("run", "locks", "history", "demo", "COORDLOCK_URL", str(EX_TEMPFAIL)):
        assert word in out.stdout
    run_help = run_cli("run", "--help")
    assert "--busy-ok" in run_help.stdout and "--ttl" in run_help.stdout


def test_second_concurrent_run_is_skipped(url: str, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    first = subprocess.Popen(
        [sys.executable, "-m", "coordlock.cli", "run", "--name", "x", "--ttl", "10m", "--url",
         url, "--", "sh", "-c", f"touch {marker}; sleep 30"],
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the first run never started its command"
        second = run_cli("run", "--name", "x", "--url", url, "--", "echo", "ran")
        assert second.returncode == EX_TEMPFAIL
        assert "ran" not in second.stdout and "held elsewhere" in second.stderr
        busy_ok = run_cli("run", "--name", "x", "--busy-ok", "-q", "--url", url, "--", "true")
        assert busy_ok.returncode == 0 and busy_ok.stderr == ""
        listed = run_cli("locks", "--url", url)
        assert listed.returncode == 0 and "x" in listed.stdout.split()
    finally:
        first.terminate()  # forwarded to sh, which dies of SIGTERM
        status = first.wait(30)
    assert status == 128 + 15
    after = run_cli("run", "--name", "x", "--url", url, "--", "echo", "ran")
    assert after.returncode == 0 and after.stdout.strip() == "ran"  # released on the way out


def test_exit_status_is_the_commands(url: str) -> None:
    assert run_cli("run", "--name", "y", "--url", url, "--", "sh", "-c", "exit 7").returncode == 7
    missing = run_cli("run", "--name", "y", "--url", url, "--", "no-such-command-xyz")
    assert missing.returncode == 127


def test_wait_for_busy_lock(url: str) -> None:
    holder = coordlock.connect(url)
    lease = holder.acquire("w", 30)
    assert lease is not None
    waited = run_cli("run", "--name", "w", "--wait", "0.3s", "--url", url, "--", "true")
    assert waited.returncode == EX_TEMPFAIL
    lease.release()
    holder.close()
    assert run_cli("run", "--name", "w", "--wait", "5s", "--url", url, "--", "true").returncode == 0


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["run", "--name", "z", "--ttl", "0", "--", "true"], EX_USAGE),
        (["run", "--name", "z", "--ttl", "soon", "--", "true"], EX_USAGE),
        (["run", "--name", "z"], EX_USAGE),
        (["run", "--", "true"], EX_USAGE),
        (["run", "--name", "z", "--url", "nope://x", "--", "true"], EX_CONFIG),
        (["run", "--name", "", "--url", "memory://x", "--", "true"], EX_USAGE),
        ([], EX_USAGE),
    ],
)
def test_bad_usage(args: list[str], status: int) -> None:
    out = run_cli(*args)
    assert out.returncode == status, out.stderr


def test_default_url_is_in_the_state_dir(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path), "COORDLOCK_URL": ""}
    out = run_cli("run", "--name", "d", "--", "true", env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "coordlock" / "locks.db").exists()
    os.environ.pop("COORDLOCK_URL", None)


def test_default_url_prefers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDLOCK_URL", "redis://example:6379/0")
    assert default_url() == "redis://example:6379/0"


def test_history_and_empty_locks(url: str) -> None:
    assert run_cli("locks", "--url", url).stdout.strip() == "no locks held"
    c = coordlock.connect(url)
    from coordlock._protocol import RunRecord

    c.record_run(RunRecord("r1", "nightly", "2026-01-01T00:00:00Z", "host-a", time.time(),
                           time.time() + 1, "failed", "boom"))
    c.close()
    out = run_cli("history", "--url", url)
    assert out.returncode == 0 and "nightly" in out.stdout and "boom" in out.stdout
