"""The examples in examples/ run as documented (real processes, an SQLite file as backend)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from coordlock.testing.servers import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "COORDLOCK_URL": f"sqlite:///{tmp_path}/example.db"}


def test_cron_callbacks_run_on_one_server_at_a_time(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / "cron_callbacks.py"), "cleanup"],
            env=_env(tmp_path), cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("cleaning up" in out for out in outputs) == 1, outputs


def test_cron_callbacks_usage(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "cron_callbacks.py"), "nope"],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 64 and "usage" in out.stderr


def _get(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        body: dict[str, object] = json.loads(reply.read())
        return body


def test_webapp_copies_run_each_tick_once(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / "webapp.py"), str(port)],
            env=_env(tmp_path), cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        )
        for port in ports
    ]
    try:
        deadline = time.monotonic() + 30
        for port in ports:  # both serve /healthz once their scheduler runs
            while True:
                try:
                    if _get(port, "/healthz") == {"scheduler": True}:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the web app never came up"
                time.sleep(0.2)
        time.sleep(21)  # two 10 s ticks of refresh-cache
        listings = [_get(port, "/jobs") for port in ports]
        names = {job["name"] for job in listings[0]["jobs"]}  # type: ignore[index]
        assert names == {"refresh-cache", "send-digest", "nightly-export"}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        logs = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    ran = re.compile(r"refreshing the cache for tick (.+)$", re.M)
    ticks = Counter(tick for log in logs for tick in ran.findall(log))
    assert len(ticks) >= 2, logs  # at least two ticks ran ...
    assert set(ticks.values()) == {1}, ticks  # ... each on exactly one copy
