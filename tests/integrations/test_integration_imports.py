"""``import coordlock`` loads no framework; each integration loads only its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _procs import EXAMPLES, env_with

FRAMEWORKS = ("apscheduler", "celery", "kombu", "django", "rq", "redis", "psycopg", "kazoo")


def _loaded(code: str) -> list[str]:
    probe = (
        f"{code}\nimport sys, json\n"
        f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, env=env_with())
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_import_coordlock_loads_no_framework() -> None:
    assert _loaded("import coordlock, coordlock.integrations") == []


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("coordlock.integrations.apscheduler", {"apscheduler"}),
        # celery itself imports parts of Django when Django is installed (its fixups)
        ("coordlock.integrations.celery", {"celery", "kombu", "django"}),
        ("coordlock.integrations.rq", set()),
        ("coordlock.integrations.django", set()),
    ],
)
def test_each_integration_loads_only_its_framework(module: str, allowed: set[str]) -> None:
    assert set(_loaded(f"import {module}")) <= allowed


def test_examples_compile() -> None:
    files = sorted(EXAMPLES.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        compile(path.read_text(), str(path), "exec")  # syntax; the other tests run them
