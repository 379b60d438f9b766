"""PostgreSQL: permanent errors fail fast (issue 14), least privilege and TLS (issue 17).

* A missing database or role, a bad ``sslmode``, a wrong password, a host name that does not
  exist: ``ConfigurationError`` at once (CLI exit 78), never a retry loop.
* ``init_schema`` (``coordlock init``) run once by an admin; then the whole contract passes
  under a role that has only USAGE on the schema and the documented table/sequence grants,
  with ``create_schema=false`` (no DDL ever); a missing schema names ``coordlock init``.
* ``sslmode=verify-full`` against a throwaway server with a throwaway CA (openssl in a temp
  dir, server ``ssl=on`` through ``-c`` options).

Real throwaway servers; bounded.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import coordlock
from coordlock import BackendUnavailable, ConfigurationError
from coordlock.backends.postgres import (
    SCHEMA_VERSION,
    PostgresCoordinator,
    grant_statements,
    init_schema,
)
from coordlock.testing.contract import CoordinatorContract
from coordlock.testing.servers import PostgresServer

APP_ROLE = "coordlock_app"


def _schema() -> str:
    return f"t_{uuid.uuid4().hex}"


def _url(server: PostgresServer, user: str, dbname: str, query: str) -> str:
    return f"postgresql://{user}@127.0.0.1:{server.port}/{dbname}?{query}"


# -- issue 14: permanent errors fail at once -----------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[PostgresServer]:
    """A server where role ``pw`` must log in with password ``right`` (scram-sha-256)."""
    server = PostgresServer(fast=True)
    server.start()
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE ROLE pw LOGIN PASSWORD 'right'")
            hba = server.data_dir / "pg_hba.conf"
            hba.write_text(
                "local all all trust\n"
                "host all pw 127.0.0.1/32 scram-sha-256\n"
                "host all all 127.0.0.1/32 trust\n"
            )
            conn.execute("SELECT pg_reload_conf()")
        yield server
    finally:
        server.close()


def _dns_verdict() -> type[Exception]:
    """What a lookup of a name under ``.invalid`` (RFC 6761: never exists) should raise: a
    resolver that answers says "no such name" (permanent); one that cannot be asked right now
    fails temporarily (transient, retried)."""
    try:
        socket.getaddrinfo("coordlock-no-such-host.invalid", 5432)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return ConfigurationError
        return BackendUnavailable
    pytest.fail("a name under .invalid resolved")


PERMANENT = {
    "missing database": ("postgres", "nosuchdb", "", r'database "nosuchdb" does not exist'),
    "missing role": ("nosuchuser", "postgres", "", r'role "nosuchuser" does not exist'),
    "bad sslmode": ("postgres", "postgres", "sslmode=bogus", r"invalid sslmode value"),
    "wrong password": ("pw", "postgres", "password=wrong", r"password authentication failed"),
    "no password": ("pw", "postgres", "", r"no password supplied"),
}


@pytest.mark.parametrize("case", sorted(PERMANENT))
def test_permanent_connection_errors_fail_at_once(
    password_server: PostgresServer, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    user, dbname, query, message = PERMANENT[case]
    url = _url(password_server, user, dbname, f"retry_deadline=60&{query}".rstrip("&"))
    caplog.set_level(logging.INFO, logger="coordlock")
    c = coordlock.connect(url)
    try:
        with pytest.raises(ConfigurationError, match=message) as info:
            c.acquire("x", 10)
        assert isinstance(info.value.__cause__, psycopg.Error)  # the driver error is chained
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert retries == [], "a permanent error was retried"
    finally:
        c.close()


def test_a_host_name_that_does_not_exist(caplog: pytest.LogCaptureFixture) -> None:
    expected = _dns_verdict()
    caplog.set_level(logging.INFO, logger="coordlock")
    c = coordlock.connect(
        "postgresql://postgres@coordlock-no-such-host.invalid:5432/x?retry_deadline=0.5"
    )
    try:
        with pytest.raises(expected, match=r"coordlock-no-such-host\.invalid"):
            c.acquire("x", 10)
    finally:
        c.close()
    if expected is ConfigurationError:
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_the_cli_exits_78_on_a_missing_database(password_server: PostgresServer) -> None:
    url = _url(password_server, "postgres", "nosuchdb", "retry_deadline=60")
    done = subprocess.run(
        [sys.executable, "-c", "import sys, coordlock.cli; sys.exit(coordlock.cli.main())",
         "locks", "--url", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert "nosuchdb" in done.stderr


# -- issue 17: init once as admin, run as a least-privileged role --------------------------------


@pytest.fixture(scope="module")
def app_role(postgres_server: PostgresServer) -> str:
    """A login role with no privileges of its own (it cannot create schemas)."""
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
        if row is None:
            conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
    return APP_ROLE


def _app_url(server: PostgresServer, schema: str, extra: str = "") -> str:
    query = f"schema={schema}&create_schema=false" + (f"&{extra}" if extra else "")
    return _url(server, APP_ROLE, server.dbname, query)


class TestContractLeastPrivilege(CoordinatorContract):
    """The whole contract as a role with only the documented grants, after ``init_schema``."""

    @pytest.fixture
    def backend_url(self, postgres_server: PostgresServer, app_role: str) -> str:
        schema = _schema()
        assert init_schema(f"{postgres_server.url}?schema={schema}", grant_to=app_role) == 2
        return _app_url(postgres_server, schema)


def test_init_schema_then_least_privilege(postgres_server: PostgresServer, app_role: str) -> None:
    schema = _schema()
    admin_url = f"{postgres_server.url}?schema={schema}"
    assert init_schema(admin_url, grant_to=[app_role]) == SCHEMA_VERSION
    assert init_schema(admin_url) == SCHEMA_VERSION  # again: nothing to do
    c = coordlock.connect(_app_url(postgres_server, schema))
    try:
        lease = c.acquire("least", 10)
        assert lease is not None and lease.extend() and lease.release()
        assert c.claim("least@tick", 30)
    finally:
        c.close()
    with psycopg.connect(
        f"postgresql://{app_role}@127.0.0.1:{postgres_server.port}/{postgres_server.dbname}",
        autocommit=True,
    ) as conn:
        for forbidden in (
            f"SELECT setval('{schema}.fence', 1)",  # fences cannot be set back
            f"DELETE FROM {schema}.holders",
            f"CREATE TABLE {schema}.mine (x int)",
            f"CREATE SCHEMA other_{schema}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)


@pytest.mark.parametrize("create", ["true", "false"])
def test_a_missing_schema_names_coordlock_init(
    postgres_server: PostgresServer, app_role: str, create: str
) -> None:
    url = _url(postgres_server, app_role, postgres_server.dbname,
               f"schema={_schema()}&create_schema={create}&retry_deadline=60")  # fmt: skip
    c = coordlock.connect(url)
    try:
        with pytest.raises(ConfigurationError, match="coordlock init"):
            c.acquire("x", 10)
    finally:
        c.close()


def test_a_role_without_grants_is_told_what_to_grant(
    postgres_server: PostgresServer, app_role: str
) -> None:
    schema = _schema()
    init_schema(f"{postgres_server.url}?schema={schema}")  # no grants
    c = coordlock.connect(_app_url(postgres_server, schema, "retry_deadline=60"))
    try:
        with pytest.raises(ConfigurationError, match=r"(?i)grant"):
            c.acquire("x", 10)
    finally:
        c.close()


def test_grant_statements_are_the_documented_ones() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "backends" / "postgres.md").read_text()
    for line in grant_statements("coordlock", "app"):
        assert line.replace('"', "") + ";" in docs.replace('"', ""), line
    with pytest.raises(ValueError):
        grant_statements("bad-name", "app")


def test_a_version_1_schema_is_upgraded_in_place(postgres_server: PostgresServer) -> None:
    """Lease rows of version 1 have no marker: they count as orphans until they expire."""
    schema = _schema()
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute(f"INSERT INTO {schema}.meta VALUES ('schema_version', '1')")
        conn.execute(f"CREATE SEQUENCE {schema}.fence AS bigint NO CYCLE")
        conn.execute(
            f"CREATE UNLOGGED TABLE {schema}.holders (key bigint PRIMARY KEY, name text NOT NULL,"
            " owner text NOT NULL, fence bigint NOT NULL, pid integer NOT NULL,"
            " backend_start timestamptz, acquired_at timestamptz NOT NULL,"
            " expires_at timestamptz NOT NULL, released boolean NOT NULL DEFAULT false)"
        )
    url = f"{postgres_server.url}?schema={schema}"
    c = coordlock.connect(url)
    assert isinstance(c, PostgresCoordinator)
    try:
        with psycopg.connect(postgres_server.url, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {schema}.holders (key, name, owner, fence, pid, acquired_at,"
                " expires_at) VALUES (%s, 'old', 'v1', 7, 1, now(), now() + interval '1 hour')",
                (c.key("old"),),
            )
        assert c.acquire("new", 10) is not None  # upgrades the schema
        assert c.acquire("old", 10) is None  # an unexpired version-1 lease: an orphan
        with psycopg.connect(postgres_server.url, autocommit=True) as conn:
            row = conn.execute(f"SELECT value FROM {schema}.meta").fetchone()
            assert row == (str(SCHEMA_VERSION),)
            conn.execute(f"UPDATE {schema}.holders SET expires_at = now() WHERE name = 'old'")
        again = c.acquire("old", 10)
        assert again is not None and again.fence > 7
    finally:
        c.close()


# -- issue 17: TLS with verify-full ---------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             cwd=directory)  # fmt: skip


def _make_server_cert(directory: Path, ca: str, san: str) -> None:
    (directory / "san.cnf").write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=coordlock-test-server",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
             cwd=directory)  # fmt: skip
    (directory / "server.key").chmod(0o600)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path]]:
    """A PostgreSQL with ``ssl=on``, its certificate (SAN 127.0.0.1) signed by a throwaway CA.
    Yields the server and the directory holding ``ca.crt`` and ``other-ca.crt``."""
    client_dir = tmp_path_factory.mktemp("tls")
    _make_ca(client_dir, "ca")
    _make_ca(client_dir, "other-ca")
    server = PostgresServer(fast=True)
    tls_dir = server.workdir / "tls"  # owned by the server's account at start
    tls_dir.mkdir()
    for name in ("ca.crt", "ca.key"):
        (tls_dir / name).write_bytes((client_dir / name).read_bytes())
    _make_server_cert(tls_dir, "ca", "IP:127.0.0.1")
    server.settings.update(
        ssl="on",
        ssl_cert_file=str(tls_dir / "server.crt"),
        ssl_key_file=str(tls_dir / "server.key"),
    )
    server.start()
    try:
        yield server, client_dir
    finally:
        server.close()


def test_verify_full_with_a_throwaway_ca(tls_server: tuple[PostgresServer, Path]) -> None:
    server, certs = tls_server
    query = f"schema={_schema()}&sslmode=verify-full&sslrootcert={certs / 'ca.crt'}"
    url = _url(server, "postgres", server.dbname, query)
    c = coordlock.connect(url)
    assert isinstance(c, PostgresCoordinator)
    try:
        lease = c.acquire("over-tls", 10)
        assert lease is not None
        session = c._registry.held["over-tls"].session
        with session.mutex:
            row = session.conn.execute(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        assert row is not None and row[0] is True, row
        assert lease.release()
    finally:
        c.close()


@pytest.mark.parametrize(
    ("host", "ca", "message"),
    [
        ("127.0.0.1", "other-ca.crt", "certificate verify failed"),
        ("localhost", "ca.crt", "does not match host name"),
    ],
)
def test_verify_full_refuses_a_wrong_certificate_at_once(
    tls_server: tuple[PostgresServer, Path], host: str, ca: str, message: str
) -> None:
    server, certs = tls_server
    url = (
        f"postgresql://postgres@{host}:{server.port}/{server.dbname}"
        f"?sslmode=verify-full&sslrootcert={certs / ca}&retry_deadline=60"
    )
    c = coordlock.connect(url)
    try:
        with pytest.raises(ConfigurationError, match=message):
            c.acquire("x", 10)
    finally:
        c.close()


def test_the_server_really_requires_what_the_client_checks(
    tls_server: tuple[PostgresServer, Path],
) -> None:
    server, _ = tls_server
    with psycopg.connect(f"{server.url}?sslmode=disable", autocommit=True) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (False,)  # plain connections still work: the TLS test is meaningful
    assert os.access(server.workdir, os.F_OK)
