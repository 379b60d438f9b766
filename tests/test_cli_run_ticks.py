"""``coordlock run --every/--cron/--tz/--skew/--off-tick/--min-hold``: once per tick from a
crontab line. Most tests call the CLI in process with an injected time of day
(``coordlock._locking.wall_clock``); one runs the real ``coordlock`` executable twice for
the same tick."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from coordlock import _locking
from coordlock.cli import main
from coordlock.testing.contract import eventually

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z: a multiple of 4 and 10 s, 20 s past a minute
MINUTE = T0 - 20 + 60  # 2023-11-14T22:14:00Z


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'locks.db'}"


@pytest.fixture
def at(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``at(t)``: the time of day coordlock reads from now on."""

    def set_time(when: float) -> None:
        monkeypatch.setattr(_locking, "wall_clock", lambda: when)

    set_time(T0)
    return set_time


def run(url: str, *options: str, out: Path | None = None) -> int:
    """``coordlock run`` whose CMD writes ``$COORDLOCK_TICK $COORDLOCK_FENCE`` to ``out``."""
    cmd = ["true"] if out is None else [
        "sh", "-c", f'echo "${{COORDLOCK_TICK:-none}} $COORDLOCK_FENCE" >> {out}'
    ]  # fmt: skip
    return main(["run", "--url", url, "--name", "sync", *options, "--", *cmd])


def test_the_tick_runs_once_and_cmd_learns_it(url: str, at: Any, tmp_path: Path,
                                              capsys: Any) -> None:  # fmt: skip
    out = tmp_path / "out"
    assert run(url, "--every", "10s", out=out) == 0
    at(T0 + 1.0)  # a second server, its cron a second late
    assert run(url, "--every", "10s", out=out) == 75
    assert "tick 2023-11-14T22:13:20Z of 'sync' already ran elsewhere; not running sh" in (
        capsys.readouterr().err
    )
    assert run(url, "--every", "10s", "--busy-ok", out=out) == 0
    assert run(url, "--every", "10s", "--busy-ok", "-q", out=out) == 0
    assert capsys.readouterr().err.count("already ran elsewhere") == 1  # -q says nothing
    at(T0 + 9.0)  # the next tick, a second early
    assert run(url, "--every", "10s", out=out) == 0
    lines = out.read_text().split("\n")
    assert lines[0].split()[0] == "2023-11-14T22:13:20Z"
    assert lines[1].split()[0] == "2023-11-14T22:13:30Z"
    fences = [int(line.split()[1]) for line in lines if line]
    assert len(fences) == 2 and fences[1] > fences[0] > 0


def test_cron_with_a_timezone(url: str, at: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 23:14 in Berlin (UTC+1 in November) is 22:14 UTC
    at(MINUTE + 3)
    options = ("--cron", "14 23 * * *", "--tz", "Europe/Berlin")
    assert run(url, *options, out=out) == 0
    assert run(url, *options, out=out) == 75
    assert out.read_text().split()[0] == "2023-11-14T22:14:00Z"


def test_off_tick_always_says_why(url: str, at: Any, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    at(MINUTE + 30)  # halfway between two minutes; the skew is 10 s
    assert run(url, "--every", "1m", "--skew", "10s", "--busy-ok", "-q", out=out) == 75
    err = capsys.readouterr().err
    assert "not running sh: 'sync' called at 2023-11-14T22:14:30.000Z, 30.0s after" in err
    assert "outside the 10s skew tolerance of every 60s" in err and "--off-tick run" in err
    assert not out.exists()
    assert run(url, "--every", "1m", "--skew", "10s", "--off-tick", "run", out=out) == 0
    assert out.read_text().split()[0] == "none"  # ran under the lock alone, without a tick


def test_the_lock_still_keeps_runs_apart(url: str, at: Any, tmp_path: Path,
                                         capsys: Any) -> None:  # fmt: skip
    from coordlock import connect

    other = connect(url)
    try:
        held = other.acquire("sync", 30)  # the previous tick's run, still going
        assert held is not None
        assert run(url, "--every", "10s") == 75
        assert "was won here, but lock 'sync' is still held" in capsys.readouterr().err
        held.release()
    finally:
        other.close()


def test_min_hold_keeps_the_lock_taken(url: str, capsys: Any) -> None:
    started = time.monotonic()
    assert run(url, "--min-hold", "1.5s") == 0
    assert run(url) == 75  # the command ended, the hold did not
    assert eventually(lambda: run(url, "-q") == 0)
    assert time.monotonic() - started >= 1.5 * 0.9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tz", "UTC"], "--tz only applies with --cron"),
        (["--every", "1m", "--tz", "UTC"], "--tz only applies with --cron"),
        (["--skew", "5s"], "--skew only applies with --every or --cron"),
        (["--off-tick", "run"], "--off-tick only applies with --every or --cron"),
        (["--cron", "61 * * * *"], "--cron: invalid cron expression"),
        (["--cron", "* * * * *", "--tz", "Nowhere/Land"], "unknown timezone"),
        (["--every", "10s", "--skew", "6s"], "more than half the period"),
        (["--every", "10s", "--cron", "* * * * *"], "not allowed with argument"),
        (["--every", "soon"], "bad duration"),
        (["--min-hold", "-1"], "--min-hold"),
        (["--every", "1m", "--off-tick", "maybe"], "invalid choice"),
    ],
)
def test_bad_options_exit_64(url: str, capsys: Any, options: list[str], message: str) -> None:
    assert main(["run", "--url", url, "--name", "sync", *options, "--", "true"]) == 64
    assert message in capsys.readouterr().err


def test_help_describes_the_tick_options(capsys: Any) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--every", "--cron", "--tz", "--skew", "--off-tick", "--min-hold", "--busy-ok"):
        assert flag in text
    assert "COORDLOCK_TICK" in text


def test_the_crontab_line_with_the_real_executable(tmp_path: Path) -> None:
    """Two servers' crontab lines started together for one tick: one runs CMD, the other
    exits 75. (A start that straddles a tick boundary names two ticks: then try again.)"""
    exe = shutil.which("coordlock", path=str(Path(sys.executable).parent))
    assert exe is not None
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    for attempt in range(3):
        time.sleep(4 - time.time() % 4 + 0.05)  # just after a tick of --every 4s (skew 2 s)
        out = tmp_path / f"out{attempt}"
        procs = [
            subprocess.Popen(
                [exe, "run", "--url", url, "--name", "report", "--every", "4s", "--busy-ok",
                 "--", "sh", "-c", f'echo "$COORDLOCK_TICK" >> {out}'],
                stderr=subprocess.PIPE, text=True, env={**os.environ, "COORDLOCK_URL": ""},
            )
            for _ in range(2)
        ]  # fmt: skip
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        ran = out.read_text().split() if out.exists() else []
        refused = [e for e in errors if "already ran elsewhere" in e]
        if len(ran) == 1 and len(refused) == 1 and ran[0] in refused[0]:
            return  # one ran, the other found the same tick claimed
        assert len(ran) == 2 and ran[0] != ran[1], (ran, errors)  # two different ticks
    pytest.fail("three attempts straddled a tick boundary")


def test_the_crontab_lines_of_the_docs_and_examples_are_valid() -> None:
    """Every ``coordlock run`` in the example crontab, README and docs parses and validates
    (as it would before connecting): a typo in a flag fails here, not in someone's cron."""
    import re
    import shlex

    from coordlock.cli import build_parser
    from coordlock.cli.run import check_run_args, tick_spec_of

    root = Path(__file__).resolve().parents[1]
    sources = [root / "examples" / "crontab", root / "README.md", root / "docs" / "cli.md",
               root / "docs" / "which-tool.md"]  # fmt: skip
    lines = [
        line
        for source in sources
        for line in source.read_text().splitlines()
        if re.match(r"^\s*(\S+\s+){5}\S*coordlock run ", line)  # five cron fields first
    ]
    assert len(lines) >= 8
    with_ticks = 0
    for line in lines:
        argv = shlex.split(line.split("coordlock ", 1)[1])
        args = build_parser().parse_args(argv)
        assert check_run_args(args), line
        with_ticks += tick_spec_of(args) is not None
    assert with_ticks >= 5
