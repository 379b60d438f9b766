"""``coordlock run`` and signals: the child gets each signal exactly once, no tracebacks.

The child is a small Python program that counts the SIGINTs (or SIGTERMs) it receives and
exits with that count, so a doubled signal shows as exit status 2. The terminal case uses a
real pseudo-terminal: coordlock is a session leader with the pty as its controlling terminal,
and the test types Ctrl-C (``\\x03``) into it, exactly as a person would.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest
from cli_helpers import COORDLOCK, cli_env, run_cli

import coordlock

COUNTER = textwrap.dedent(
    """
    import os, signal, sys, time

    ready, which = sys.argv[1], getattr(signal, sys.argv[2])
    count = 0

    def handler(signum, frame):
        global count
        count += 1

    signal.signal(which, handler)
    with open(ready, "w") as f:
        f.write(f"{os.getpid()} {os.getpgrp()}")
    deadline = time.monotonic() + 60
    while count == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    settle = time.monotonic() + 1.0  # a second copy of the signal would land in this window
    while time.monotonic() < settle:
        time.sleep(0.02)
    sys.exit(count)
    """
)


def _wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture
def counter(tmp_path: Path) -> Path:
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    return script


def _make_controlling_tty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _drain(fd: int, until: subprocess.Popen[bytes], timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every slave end closed
                break
            if not chunk:
                break
            out += chunk
        elif until.poll() is not None:
            break
    return out


def test_ctrl_c_at_a_terminal_reaches_the_child_once(tmp_path: Path, counter: Path) -> None:
    ready = tmp_path / "ready"
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*COORDLOCK, "run", "--name", "tty", "--url", f"sqlite:///{tmp_path}/l.db", "--",
         sys.executable, str(counter), str(ready), "SIGINT"],
        stdin=slave, stdout=slave, stderr=slave, env=cli_env(),
        start_new_session=True, preexec_fn=_make_controlling_tty,
    )
    os.close(slave)
    try:
        child_pid, child_pgid = map(int, _wait_for(ready).split())
        assert child_pgid == child_pid != proc.pid  # the child leads a process group of its own
        assert os.tcgetpgrp(master) == proc.pid  # coordlock's group has the terminal
        os.write(master, b"\x03")  # Ctrl-C: the terminal signals its foreground group
        output = _drain(master, proc, 30)
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert status == 1, output  # the child's exit status: the number of SIGINTs it got
    assert b"Traceback" not in output


def test_ctrl_c_to_the_foreground_group_reaches_the_child_once(
    tmp_path: Path, counter: Path
) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*COORDLOCK, "run", "--name", "fg", "--url", f"sqlite:///{tmp_path}/l.db", "--",
         sys.executable, str(counter), str(ready), "SIGINT"],
        env=cli_env(), start_new_session=True, stderr=subprocess.PIPE, text=True,
    )
    _wait_for(ready)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C, without one
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_to_coordlock_is_forwarded_once(
    tmp_path: Path, counter: Path, sig: str
) -> None:
    ready = tmp_path / "ready"
    url = f"sqlite:///{tmp_path}/l.db"
    proc = subprocess.Popen(
        [*COORDLOCK, "run", "--name", "sig", "--url", url, "--",
         sys.executable, str(counter), str(ready), sig],
        env=cli_env(), stderr=subprocess.PIPE, text=True,
    )
    _wait_for(ready)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    # and the lock was released on the way out
    assert run_cli("run", "--name", "sig", "--url", url, "--", "true").returncode == 0


def test_sigterm_that_kills_the_child_exits_143(tmp_path: Path) -> None:
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [*COORDLOCK, "run", "--name", "t", "--url", f"sqlite:///{tmp_path}/l.db", "--",
         "sh", "-c", f"touch {started}; exec sleep 60"],
        env=cli_env(), stderr=subprocess.PIPE, text=True,
    )
    _wait_for_file(started)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "Traceback" not in err


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_while_waiting_forever(tmp_path: Path, sig: int, status: int) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    holder = coordlock.connect(url)
    lease = holder.acquire("busy", 30)
    assert lease is not None
    try:
        proc = subprocess.Popen(
            [*COORDLOCK, "-vv", "run", "--name", "busy", "--wait", "forever", "--url", url,
             "--", "echo", "ran"],
            env=cli_env(), start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stderr is not None
        line = proc.stderr.readline()  # -v: "backend sqlite at ..." comes before acquiring
        assert "backend sqlite" in line, line
        time.sleep(0.3)  # let it reach the wait (the outcome is the same if it has not yet)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == status, err
        assert "Traceback" not in err and "interrupted" in err
        assert "ran" not in out
        assert lease.extend() is True  # the holder's lock was not touched
    finally:
        lease.release()
        holder.close()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, wanted: str) -> str:
    deadline = time.monotonic() + 20
    state = _state(pid)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.02)
        state = _state(pid)
    return state


def test_ctrl_z_stops_the_child_and_fg_continues_it(tmp_path: Path, counter: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*COORDLOCK, "run", "--name", "z", "--url", f"sqlite:///{tmp_path}/l.db", "--",
         sys.executable, str(counter), str(ready), "SIGTERM"],
        env=cli_env(), stderr=subprocess.PIPE, text=True,
        # a job of this session in a group of its own, as a shell starts it
        **({"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}),
    )
    try:
        child = int(_wait_for(ready).split()[0])
        os.killpg(proc.pid, signal.SIGTSTP)  # Ctrl-Z: the terminal signals the foreground job
        assert _wait_state(child, "T") == "T"
        assert _wait_state(proc.pid, "T") == "T"
        os.killpg(proc.pid, signal.SIGCONT)  # fg
        assert _wait_state(child, "S") in ("S", "R")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err  # and the SIGTERM still arrived exactly once
    assert "Traceback" not in err
