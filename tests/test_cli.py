"""The ``coordlock`` command, run as a real process: run, locks, history, usage and the URL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import COORDLOCK, cli_env, run_cli

import coordlock
from coordlock._protocol import RunRecord
from coordlock.cli import EX_CONFIG, EX_TEMPFAIL, EX_USAGE, default_url, main
from coordlock.testing.servers import free_port


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


SUBCOMMANDS = ("run", "locks", "unlock", "history", "jobs", "check", "demo")


def test_help_reads_well() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for word in (*SUBCOMMANDS, "COORDLOCK_URL", str(EX_TEMPFAIL), "130", "143", "64", "78"):
        assert word in out.stdout, word
    for command in SUBCOMMANDS:
        sub = run_cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert f"usage: coordlock {command}" in sub.stdout
        assert "--url" in sub.stdout and "-v" in sub.stdout  # the global options, everywhere
    run_help = run_cli("run", "--help").stdout
    assert "--busy-ok" in run_help and "--ttl" in run_help and "process group" in run_help
    assert "next run" in run_cli("jobs", "--help").stdout  # says it is not shown yet


def test_python_dash_m_coordlock_and_cli_agree() -> None:
    via_package = subprocess.run(
        [sys.executable, "-m", "coordlock", "--version"], capture_output=True, text=True,
        timeout=60,
    )
    via_cli = subprocess.run(
        [sys.executable, "-m", "coordlock.cli", "--version"], capture_output=True, text=True,
        timeout=60,
    )
    assert via_package.returncode == via_cli.returncode == 0
    assert via_package.stdout == via_cli.stdout == f"coordlock {coordlock.__version__}\n"


def test_second_concurrent_run_is_skipped(url: str, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    first = subprocess.Popen(
        [*COORDLOCK, "run", "--name", "x", "--ttl", "10m", "--url", url, "--",
         "sh", "-c", f"touch {marker}; sleep 30"],
        env=cli_env(),
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
        first.terminate()  # forwarded to sh's process group, which dies of SIGTERM
        status = first.wait(30)
    assert status == 128 + 15
    after = run_cli("run", "--name", "x", "--url", url, "--", "echo", "ran")
    assert after.returncode == 0 and after.stdout.strip() == "ran"  # released on the way out


def test_exit_status_is_the_commands(url: str) -> None:
    assert run_cli("run", "--name", "y", "--url", url, "--", "sh", "-c", "exit 7").returncode == 7
    missing = run_cli("run", "--name", "y", "--url", url, "--", "no-such-command-xyz")
    assert missing.returncode == 127
    assert "Traceback" not in missing.stderr


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
    ("args", "status", "says"),
    [
        (["run", "--name", "z", "--ttl", "0", "--", "true"], EX_USAGE, "duration"),
        (["run", "--name", "z", "--ttl", "soon", "--", "true"], EX_USAGE, "bad duration"),
        (["run", "--name", "z", "--ttl", "1ms", "--", "true"], EX_USAGE, "too short"),
        (["run", "--name", "z", "--ttl", "0.5", "--", "true"], EX_USAGE, "at least 1s"),
        (["run", "--name", "z"], EX_USAGE, "no command"),
        (["run", "--", "true"], EX_USAGE, "--name"),
        (["run", "--name", "z", "--url", "nope://x", "--", "true"], EX_CONFIG, "unknown URL"),
        (["run", "--name", "", "--url", "memory://x", "--", "true"], EX_USAGE, "empty"),
        (["run", "--name", "z", "--url", "", "--", "true"], EX_CONFIG, "--url is empty"),
        (["run", "--name", "z", "--url", "   ", "--", "true"], EX_CONFIG, "--url is empty"),
        (["locks", "--url", ""], EX_CONFIG, "--url is empty"),
        (["run", "--name", "z", "--json", "--url", "memory://", "--", "true"], EX_USAGE,
         "no --json"),
        (["history", "--limit", "0", "--url", "memory://"], EX_USAGE, "at least 1"),
        (["unlock", "z", "--url", "memory://"], EX_USAGE, "--force"),
        (["unlock", "z", "--force", "--url", "memory://"], EX_USAGE, "--yes"),
        (["demo", "--url", "memory://x"], EX_USAGE, "memory://"),
        (["demo", "--seconds", "1"], EX_USAGE, "at least 4"),
        (["--url", "memory://a", "locks", "--url", "memory://b"], EX_USAGE, "twice"),
        ([], EX_USAGE, "usage"),
    ],
)
def test_bad_usage(args: list[str], status: int, says: str) -> None:
    out = run_cli(*args)
    assert out.returncode == status, out.stderr
    assert says in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_blank_coordlock_url_is_an_error_not_a_fallback(value: str, tmp_path: Path) -> None:
    env = {"COORDLOCK_URL": value, "XDG_STATE_HOME": str(tmp_path)}
    out = run_cli("run", "--name", "d", "--", "echo", "ran", env=env)
    assert out.returncode == EX_CONFIG, out.stderr
    assert "COORDLOCK_URL is set but empty" in out.stderr
    assert "ran" not in out.stdout
    assert not (tmp_path / "coordlock").exists()  # no silent SQLite file either


def test_default_url_is_in_the_state_dir(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path), "COORDLOCK_URL": None}
    out = run_cli("-v", "run", "--name", "d", "--", "true", env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "coordlock" / "locks.db").exists()
    # -v says which backend was used, and why
    assert f"backend sqlite at sqlite:///{tmp_path}/coordlock/locks.db" in out.stderr
    assert "default (one host only)" in out.stderr


def test_verbose_names_the_backend_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    out = run_cli("locks", "-v", env={"COORDLOCK_URL": url})
    assert out.returncode == 0, out.stderr
    assert f"backend sqlite at {url} (from $COORDLOCK_URL)" in out.stderr


def test_default_url_prefers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDLOCK_URL", "redis://example:6379/0")
    assert default_url() == "redis://example:6379/0"
    monkeypatch.setenv("COORDLOCK_URL", " ")
    with pytest.raises(coordlock.ConfigurationError, match="set but empty"):
        default_url()


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "--url", "{url}", "--json", "locks"],
        ["locks", "-v", "--url", "{url}", "--json"],
        ["-v", "locks", "--json", "--url", "{url}"],
        ["--json", "--url", "{url}", "locks", "-v"],
    ],
)
def test_global_flags_before_or_after_the_subcommand(argv: list[str], url: str) -> None:
    out = run_cli(*(a.format(url=url) for a in argv))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("{") and '"locks": []' in out.stdout
    assert "backend sqlite" in out.stderr  # -v took effect


def test_verbose_counts_on_both_sides(
    url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []
    import coordlock.cli as cli

    real = cli._dispatch

    def spy(args, ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx.verbose)
        return real(args, ctx)

    cli._dispatch = spy  # type: ignore[assignment]
    try:
        assert main(["-v", "locks", "-v", "--url", url]) == 0
    finally:
        cli._dispatch = real  # type: ignore[assignment]
    assert seen == [2]


def test_retry_deadline_reaches_the_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import coordlock.cli._common as common

    given: list[dict[str, object]] = []
    real = common.connect

    def spy(url: str, **options: object) -> coordlock.RunCoordinator:
        given.append(options)
        return real(url, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(common, "connect", spy)
    assert main(["locks", "--retry-deadline", "1.5s", "--url", "memory://rd"]) == 0
    assert main(["--retry-deadline", "250ms", "locks", "--url", "memory://rd"]) == 0
    assert main(["locks", "--url", "memory://rd"]) == 0
    assert given == [{"retry_deadline": 1.5}, {"retry_deadline": 0.25}, {}]
    assert main(["locks", "--retry-deadline", "soon", "--url", "memory://rd"]) == EX_USAGE


def test_unreachable_backend_gives_up_after_the_retry_deadline() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    out = run_cli("run", "--name", "u", "--retry-deadline", "1s",
                  "--url", f"redis://127.0.0.1:{port}/0", "--", "echo", "ran")
    took = time.monotonic() - started
    assert out.returncode == 69, out.stderr
    assert "backend unavailable" in out.stderr and "ran" not in out.stdout
    assert "Traceback" not in out.stderr
    assert took >= 1.0  # it did retry for the deadline given (a lower bound, not a speed check)


def test_history_and_empty_locks(url: str) -> None:
    assert run_cli("locks", "--url", url).stdout.strip() == "no locks held"
    c = coordlock.connect(url)
    c.record_run(RunRecord("r1", "nightly", "2026-01-01T00:00:00Z", "host-a", time.time(),  # type: ignore[attr-defined]
                           time.time() + 1, "failed", "boom"))
    c.close()
    out = run_cli("history", "--url", url)
    assert out.returncode == 0 and "nightly" in out.stdout and "boom" in out.stdout


def test_exit_statuses_are_documented() -> None:
    from coordlock.cli import _common

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for name in ("EX_USAGE", "EX_UNAVAILABLE", "EX_SOFTWARE", "EX_TEMPFAIL", "EX_CONFIG"):
        assert f"| {getattr(_common, name)} (`{name}`) |" in page, name
    assert "| 130, 143, 129 |" in page
    help_text = run_cli("--help").stdout
    for status in (64, 69, 75, 78, 130, 143):
        assert str(status) in help_text
