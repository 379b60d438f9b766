"""``examples/http_cron.py`` served by two real uvicorn processes (two replicas sharing an
SQLite file as the coordinator): each cron delivery is sent to both replicas at once and then
retried; over two ticks of ``every=10`` the job ran once per tick. Wrong or missing secrets get
401 and run nothing; without ``CRON_SECRET`` the app refuses to start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "uvicorn-test-secret"
PERIOD = 10  # the example's every=10
PATH = "/api/cron/report"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uvicorn(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.http_cron:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def example_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COORDLOCK_URL", "CRON_SECRET")}
    env.update(COORDLOCK_URL=f"sqlite:///{tmp_path / 'locks.db'}",
               REPORT_FILE=str(tmp_path / "report.txt"), **extra)  # fmt: skip
    return env


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[str]]:
    """Two uvicorn replicas of the example; their base URLs."""
    env = example_env(tmp_path, CRON_SECRET=SECRET)
    ports = [free_port(), free_port()]
    procs = [uvicorn(p, env, tmp_path / f"uvicorn-{p}.log") for p in ports]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        deadline = time.monotonic() + 60
        for port, base, proc in zip(ports, bases, procs, strict=True):
            while True:
                assert proc.poll() is None, (tmp_path / f"uvicorn-{port}.log").read_text()
                try:
                    httpx.get(base + "/openapi.json", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
                    time.sleep(0.1)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def deliver(base: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    reply = httpx.get(base + PATH, headers=headers or {}, timeout=30)
    return reply.status_code, reply.json()


def test_each_tick_runs_once_across_two_replicas(replicas: list[str], tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    auth = {"Authorization": f"Bearer {SECRET}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET}):
        for base in replicas:
            status, body = deliver(base, headers)
            assert status == 401, body
    assert not report.exists()  # nothing ran
    replies = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            time.sleep(PERIOD - time.time() % PERIOD + 0.3)  # just after a tick (skew: 5 s)
            replies += list(pool.map(lambda base: deliver(base, auth), replicas))  # at once
            replies.append(deliver(replicas[0], auth))  # the platform retries a delivery
    assert [status for status, _ in replies] == [200] * 6, replies
    bodies = [body for _, body in replies]
    assert all(b["job"] == "report" and b["tick"] for b in bodies), bodies
    by_tick: dict[str, list[Any]] = {}
    for body in bodies:  # (a slow machine may deliver a round's last request a tick later)
        by_tick.setdefault(body["tick"], []).append(body)
    for tick, seen in by_tick.items():
        assert sum(b["ran"] for b in seen) == 1, (tick, seen)  # once per tick, at any replica
        assert {b["reason"] for b in seen if not b["ran"]} <= {"claimed-elsewhere"}, seen
    assert len(by_tick) >= 2 and max(len(seen) for seen in by_tick.values()) >= 2
    assert report.read_text().split() == sorted(by_tick)  # each tick's job ran exactly once


def test_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    log = tmp_path / "uvicorn.log"
    proc = uvicorn(free_port(), example_env(tmp_path), log)
    try:
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "no cron secret: set $CRON_SECRET" in log.read_text()
