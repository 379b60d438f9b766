"""``coordlock demo``: streams its rows, tells the truth, shows fences, leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import COORDLOCK, cli_env

ROW = re.compile(r"^   (\d\d:\d\d:\d\d)\s+(.+?)\s+(\d+)(  <-- !)?$")


def _start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*COORDLOCK, "demo", *args],
        env=cli_env({"TMPDIR": str(tmp_path)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _workers_of(folder: str) -> list[int]:
    """Processes whose command line mentions ``folder`` (the demo's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if folder in cmdline:
            found.append(int(entry.name))
    return found


def test_demo_streams_true_rows_and_shows_fences(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--seconds", "6")
    assert proc.stdout is not None
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:
        lines.append((time.monotonic(), line.rstrip("\n")))
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(60) == 0, (lines, err)
    text = "\n".join(line for _, line in lines)
    assert "Traceback" not in err

    # Part 1: the fenced lock
    assert re.search(r"a takes 'coordlock-demo:report': fence (\d+); writes with it: accepted",
                     text)
    assert re.search(r"b takes it: fence \d+; writes with it: accepted", text)
    assert "finishes its write with fence" in text and "rejected by the register" in text
    assert "a's lease: lost=True" in text

    # Part 2: one row per tick, streamed as the ticks happen (not all at the end)
    rows = [(i, t, m) for i, (t, line) in enumerate(lines) if (m := ROW.match(line))]
    assert len(rows) >= 6
    assert rows[-1][1] - rows[0][1] >= 2.0, "rows arrived all at once"
    assert all(m.group(3) == "1" for _, _, m in rows), text

    # The summary is computed from the rows: check it against them.
    kill_line = next(i for i, (_, line) in enumerate(lines) if "killed (SIGKILL)" in line)
    before = [m for i, _, m in rows if i < kill_line]
    won = sum(1 for m in before if m.group(2).startswith("b "))
    assert f"{len(rows)} ticks, each ran exactly once: duplicates 0, missed 0" in text
    assert f"it won {won} of {len(before)} ticks" in text, text
    after = len(rows) - len(before)
    assert f"ran the {after} tick(s) that followed, without a gap or a double run" in text

    folder = re.search(r"on sqlite:///(/\S+)/demo\.db", text)
    assert folder is not None
    assert not Path(folder.group(1)).exists()  # the temporary folder is gone
    assert not list(tmp_path.glob("coordlock-demo-*"))


@pytest.mark.parametrize(
    ("sig", "status", "when"),
    [
        (signal.SIGINT, 130, "tick (UTC)"),  # Ctrl-C while the scheduler part runs
        (signal.SIGINT, 130, "a freezes"),  # Ctrl-C during the fence part
        (signal.SIGTERM, 143, "tick (UTC)"),
    ],
)
def test_interrupted_demo_leaves_nothing_behind(
    tmp_path: Path, sig: int, status: int, when: str
) -> None:
    proc = _start(tmp_path)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if when in line:
            break
    assert any(when in line for line in seen), seen
    folder = re.search(r"on sqlite:///(/\S+)/demo\.db", seen[0])
    assert folder is not None
    os.killpg(proc.pid, sig)  # the terminal's Ctrl-C goes to the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "interrupted" in err
    assert not Path(folder.group(1)).exists()
    assert not list(tmp_path.glob("coordlock-demo-*"))
    deadline = time.monotonic() + 20  # the workers were waited for; allow zombies to be reaped
    while _workers_of(folder.group(1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers_of(folder.group(1)) == []
