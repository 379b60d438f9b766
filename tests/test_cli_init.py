"""``coordlock init``: the schema once, as an administrator (PostgreSQL); a connection check
elsewhere."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from coordlock.cli import main
from coordlock.testing.servers import PostgresServer


def test_init_creates_the_schema_and_grants_a_runtime_role(
    postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = f"init_{uuid.uuid4().hex[:8]}"
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    url = f"{postgres_server.url}?schema={schema}"
    assert main(["init", url, "--grant-to", role, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "postgresql" and report["granted_to"] == [role]
    assert isinstance(report["schema_version"], int) and report["schema_version"] >= 1
    assert main(["init", url]) == 0  # again: nothing changes
    assert "schema ready" in capsys.readouterr().out
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        (usage,) = admin.execute(
            "SELECT has_schema_privilege(%s, %s, 'USAGE')", (role, schema)
        ).fetchone()  # type: ignore[misc]
        (create,) = admin.execute(
            "SELECT has_schema_privilege(%s, %s, 'CREATE')", (role, schema)
        ).fetchone()  # type: ignore[misc]
    assert usage is True and create is False


def test_init_elsewhere_checks_the_connection(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "memory://init-check"]) == 0
    assert "nothing to create" in capsys.readouterr().out
    assert main(["init", "memory://init-check", "--grant-to", "app"]) == 64
