"""Helpers for the integration tests: child processes whose output is read as it comes, and
the tally of which ticks ran how often."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordlock.integrations import tick_claim_key

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "integrations"
BIN = Path(sys.executable).parent


class Proc:
    """A child process (own session) whose stdout+stderr lines are collected by a thread."""

    def __init__(
        self, args: Sequence[str], *, env: dict[str, str], cwd: Path | str, name: str = ""
    ) -> None:
        self.name = name or Path(args[1] if len(args) > 1 else args[0]).name
        self.popen = subprocess.Popen(
            list(args),
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching ``pattern``; fails after ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within {timeout} s "
                        f"(exit {self.popen.poll()}); output:\n" + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(min(left, 0.5))

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the process group, SIGKILL it after ``timeout``; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)
        self._reader.join(10)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process group (a crash: no cleanup runs)."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)
        self._reader.join(10)


def env_with(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(EXAMPLES), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def next_tick(after: float, period: float) -> float:
    """The first multiple of ``period`` (since the epoch) strictly after ``after``."""
    return (math.floor(after / period) + 1) * period


def sleep_until(when: float) -> None:
    while True:
        left = when - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


@dataclass
class Tally:
    """Which of the expected ticks ran how often."""

    expected: list[str]
    ran: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, job: str, first: float, period: float, count: int, ran: Iterable[str]) -> Tally:
        expected = [tick_claim_key(job, first + i * period) for i in range(count)]
        return cls(expected, Counter(ran))

    @property
    def duplicates(self) -> int:
        """Extra runs of any tick (in or out of the window)."""
        return sum(n - 1 for n in self.ran.values() if n > 1)

    @property
    def misses(self) -> list[str]:
        return [key for key in self.expected if self.ran[key] == 0]

    def summary(self, what: str, processes: int) -> str:
        return (
            f"{what}: processes={processes} ticks={len(self.expected)} "
            f"runs_in_window={sum(self.ran[k] for k in self.expected)} "
            f"duplicates={self.duplicates} misses={len(self.misses)}"
        )
