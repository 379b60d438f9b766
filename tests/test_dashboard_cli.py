"""``coordlock dashboard``: the real command in a subprocess, on a loopback port."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import COORDLOCK, cli_env, run_cli

import coordlock
from coordlock.cli.dashboard import _loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_serves_the_page_and_api_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    port = free_port()
    proc = subprocess.Popen(
        [*COORDLOCK, "dashboard", "--url", url, "--port", str(port), "--refresh", "2s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env({"COORDLOCK_DASHBOARD_TOKEN": None}),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = get(base + "/api/locks")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the dashboard did not come up"
                time.sleep(0.1)
        assert status == 200 and json.loads(body) == {"locks": []}
        coordinator = coordlock.connect(url)
        lease = coordinator.acquire("cli-visible", 30)
        assert lease is not None
        locks = json.loads(get(base + "/api/locks")[1])["locks"]
        assert [lock["name"] for lock in locks] == ["cli-visible"]
        status, page = get(base + "/")
        assert status == 200 and b"cli-visible" in page and b'data-refresh="2"' in page
        assert b"read-only" in page
        lease.release()
        coordinator.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert f"coordlock dashboard on {base}/ (read-only" in err
    assert "interrupted" in err


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_a_bad_port_is_a_usage_error(port: str) -> None:
    out = run_cli("dashboard", "--url", "memory://x", "--port", port)
    assert out.returncode == 64
    assert "--port" in out.stderr


def test_json_is_refused() -> None:
    out = run_cli("dashboard", "--url", "memory://x", "--json")
    assert out.returncode == 64 and "no --json output" in out.stderr


def test_a_busy_port_exits_69() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("dashboard", "--url", "memory://x", "--port", str(port), timeout=60)
    assert out.returncode == 69
    assert f"could not listen on 127.0.0.1:{port}" in out.stderr


def test_a_short_token_is_a_configuration_error() -> None:
    out = run_cli(
        "dashboard", "--url", "memory://x", "--port", str(free_port()),
        env={"COORDLOCK_DASHBOARD_TOKEN": "sekrit9"},
    )  # fmt: skip
    assert out.returncode == 78
    assert "shorter than 16" in out.stderr and "sekrit9" not in out.stderr  # never echoed


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"):
        assert _loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.org"):
        assert not _loopback(host), host


def test_listed_in_the_help() -> None:
    out = run_cli("--help")
    assert out.returncode == 0 and "dashboard" in out.stdout
    help_text = run_cli("dashboard", "--help").stdout
    for option in ("--host", "--port", "--refresh", "--window", "COORDLOCK_DASHBOARD_TOKEN"):
        assert option in help_text
