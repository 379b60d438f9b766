"""Django integration: Django's own test runner on a minimal project, and two
``manage.py coordlock_scheduler`` processes whose runs show in ``coordlock history``."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from _procs import EXAMPLES, Proc, Tally, env_with, next_tick, sleep_until

PROJECT = Path(__file__).resolve().parent / "django_project"
PERIOD = 1.0
TICKS = 10
JOB = "demo-tick"


def _env(backend_url: str, tmp_path: Path) -> dict[str, str]:
    return env_with(
        COORDLOCK_URL=backend_url,
        DJANGO_DB=str(tmp_path / "django.sqlite3"),
        DJANGO_SETTINGS_MODULE="proj.settings",
    )


@pytest.mark.parametrize("backend_name", ["redis", "sqlite"], indirect=True)
def test_django_test_runner_passes(backend_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "demo", "-v", "2", "--noinput"],
        cwd=PROJECT, env=_env(backend_url, tmp_path), capture_output=True, text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ran = re.search(r"Ran (\d+) tests?", result.stderr)
    assert ran and int(ran.group(1)) >= 10, result.stderr
    assert "\nOK" in result.stderr


@pytest.mark.parametrize("backend_name", ["redis", "sqlite"], indirect=True)
def test_two_scheduler_commands_run_each_tick_once(backend_url: str, tmp_path: Path) -> None:
    env = _env(backend_url, tmp_path)
    procs = [
        Proc([sys.executable, "manage.py", "coordlock_scheduler", "--instance-id", f"site-{i}"],
             env=env, cwd=PROJECT, name=f"site-{i}")
        for i in range(2)
    ]
    try:
        for proc in procs:
            proc.wait_for(r"coordlock scheduler site-\d: 1 job\(s\): demo-tick", 60)
        first = next_tick(time.time() + 1.5, PERIOD)
        sleep_until(first + (TICKS - 1) * PERIOD + 0.8)
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0, 0], [proc.text[-2000:] for proc in procs]
    history = subprocess.run(
        [sys.executable, "-m", "coordlock.cli", "history", "--url", backend_url,
         "--job", JOB, "--limit", "500"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert history.returncode == 0, history.stderr
    rows = [line.split() for line in history.stdout.splitlines()[1:] if line.startswith(JOB)]
    tally = Tally.of(JOB, first, PERIOD, TICKS, [f"{JOB}@{row[1]}" for row in rows])
    by_instance = Counter(row[-1] for row in rows)
    print(tally.summary("django coordlock_scheduler", 2), f"runs_per_instance={dict(by_instance)}")
    assert tally.duplicates == 0, history.stdout
    assert tally.misses == [], history.stdout
    in_window = [row for row in rows if f"{JOB}@{row[1]}" in tally.expected]
    assert {row[2] for row in in_window} == {"finished"}, history.stdout
    assert {row[-1] for row in in_window} <= {"site-0", "site-1"}, history.stdout
    started = [m.group(1) for proc in procs for line in proc.lines
               if (m := re.match(r"started (\S+) on ", line))]
    assert sorted(k for k in started if k in tally.expected) == sorted(tally.expected)


def test_example_site_checks_and_lists_its_jobs(tmp_path: Path) -> None:
    site = EXAMPLES / "django_site"
    env = env_with(COORDLOCK_URL=f"sqlite:///{tmp_path}/locks.db",
                   DJANGO_SETTINGS_MODULE="site_settings")
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    check = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=site,
                           env=env, capture_output=True, text=True, timeout=120)
    assert "coordlock.W002" in check.stdout + check.stderr  # sqlite: one host only
    listed = subprocess.run([sys.executable, "manage.py", "coordlock_scheduler", "--list"],
                            cwd=site, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "purge-expired-sessions" in listed.stdout
