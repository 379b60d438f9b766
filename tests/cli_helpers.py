"""Helpers shared by the command-line tests (tests/test_cli*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

COORDLOCK = [sys.executable, "-m", "coordlock"]


def cli_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """``os.environ`` without ``COORDLOCK_URL``, plus ``env`` (a ``None`` value removes)."""
    merged = {k: v for k, v in os.environ.items() if k != "COORDLOCK_URL"}
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def run_cli(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 60,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m coordlock ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [*COORDLOCK, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
