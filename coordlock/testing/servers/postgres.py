"""Throwaway PostgreSQL clusters, copied from one ``initdb`` template per process."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from ._common import INSTALL_HINT, ServerUnavailable, _make_workdir
from ._install import postgres_bindir
from ._managed import ManagedServer, _exit_hooks

_pg_template_lock = threading.Lock()
_pg_templates: dict[str, Path] = {}


def _drop_postgres_templates() -> None:
    with _pg_template_lock:
        for base in _pg_templates.values():
            shutil.rmtree(base.parent, ignore_errors=True)
        _pg_templates.clear()


_exit_hooks.append(_drop_postgres_templates)


def _postgres_account() -> tuple[int, int] | None:
    """(uid, gid) of the ``postgres`` OS user when running as root (created if absent)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        commands = [
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/var/lib/postgresql", "--shell", "/usr/sbin/nologin", "postgres"],
            ["adduser", "--system", "--group", "--no-create-home", "postgres"],
        ]  # fmt: skip
        for command in commands:
            if shutil.which(command[0]):
                subprocess.run(command, capture_output=True, timeout=60, check=False)
                break
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise ServerUnavailable(
                "running as root, and the 'postgres' OS user (needed because PostgreSQL "
                "refuses to run as root) is missing and could not be created"
            ) from None
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    os.chown(path, *owner)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), *owner)


def _pg_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return env


class PostgresServer(ManagedServer):
    """A throwaway PostgreSQL cluster on ``127.0.0.1:<port>``; url
    ``postgresql://postgres@127.0.0.1:P/postgres`` (trust auth, superuser ``postgres``).

    The cluster is made by ``initdb -A trust -U postgres --no-sync`` once per process and copied
    for each server. When running as root, the data directory belongs to the ``postgres`` OS
    user (created if absent) and the server runs as that user (PostgreSQL refuses root).

    ``fast=False`` (default) keeps fsync ON, so benchmarks pay the real commit cost.
    ``fast=True`` sets ``fsync=off, synchronous_commit=off, full_page_writes=off`` for quick
    tests. Beware: with ``synchronous_commit=off`` a SIGKILL of the server can lose the last
    ~0.6s of COMMITTED transactions; pass ``settings={"synchronous_commit": "on"}`` when a test
    crashes the server and checks what survives. ``settings`` are extra ``-c name=value``.
    Always: ``listen_addresses=127.0.0.1``, ``max_connections=300``, unix socket in the work
    directory. ``stop()`` is a fast shutdown (SIGINT); ``kill()`` crashes postmaster and
    backends together; ``pause()`` stops them all.
    """

    kind: ClassVar[str] = "postgres"
    stop_signal: ClassVar[int] = signal.SIGINT
    user: str = "postgres"
    dbname: str = "postgres"

    def __init__(
        self,
        *,
        fast: bool = False,
        settings: Mapping[str, str | int] | None = None,
        port: int | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(port=port, start_timeout=start_timeout)
        self.fast = fast
        self.settings: dict[str, str] = {"max_connections": "300"}
        if fast:
            self.settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        self.settings.update({key: str(value) for key, value in (settings or {}).items()})
        self.data_dir = self.workdir / "data"
        self.socket_dir = self.workdir / "sock"
        self._account: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def dsn(self) -> str:
        """libpq keyword DSN (``host=127.0.0.1 port=P user=postgres dbname=postgres``)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}"

    def _bindir(self) -> Path:
        bindir = postgres_bindir()
        if bindir is None:
            raise ServerUnavailable(f"PostgreSQL binaries not found; {INSTALL_HINT}")
        return bindir

    def _template(self, bindir: Path) -> Path:
        """An initdb'ed data directory, made once per process and bindir."""
        with _pg_template_lock:
            cached = _pg_templates.get(str(bindir))
            if cached is not None and cached.is_dir():
                return cached
            base = _make_workdir("pgtemplate")
            data = base / "data"
            if self._account is not None:
                os.chown(base, *self._account)
            done = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                 "--no-sync", "-E", "UTF8", "--locale=C"],
                stdin=subprocess.DEVNULL, capture_output=True, cwd=base, env=_pg_env(),
                timeout=120, check=False,
                user=self._account[0] if self._account else None,
                group=self._account[1] if self._account else None,
                extra_groups=[] if self._account else None,
            )  # fmt: skip
            if done.returncode != 0:
                shutil.rmtree(base, ignore_errors=True)
                output = (done.stdout + done.stderr).decode(errors="replace")
                raise ServerUnavailable(f"initdb failed (exit {done.returncode}):\n{output}")
            _pg_templates[str(bindir)] = data
            return data

    def _prepare(self) -> None:
        bindir = self._bindir()
        self._account = _postgres_account()
        template = self._template(bindir)
        shutil.copytree(template, self.data_dir, symlinks=True)
        self.socket_dir.mkdir()
        if self._account is not None:
            _chown_tree(self.workdir, self._account)
        self.data_dir.chmod(0o700)

    def _run_as(self) -> tuple[int, int] | None:
        return self._account

    def _child_env(self) -> dict[str, str]:
        return _pg_env()

    def _command(self) -> list[str]:
        settings = {
            **self.settings,
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
        }
        command = [str(self._bindir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _probe(self, timeout: float) -> bool:
        done = subprocess.run(
            [str(self._bindir() / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port),
             "-U", self.user, "-d", self.dbname, "-t", str(max(1, round(timeout)))],
            stdin=subprocess.DEVNULL, capture_output=True, env=_pg_env(),
            timeout=timeout + 5, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def psql(self, sql: str, *, timeout: float = 30.0) -> str:
        """Run ``sql`` with ``psql`` as superuser ``postgres``; return the unaligned,
        tuples-only output (rows separated by newlines, columns by ``|``), stripped.

        Raises RuntimeError with psql's message if a statement fails; ``timeout`` in seconds.
        """
        if not self.is_running():
            raise ServerUnavailable(f"{self!r} is not running")
        done = subprocess.run(
            [str(self._bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", self.dbname,
             "-c", sql],
            stdin=subprocess.DEVNULL, capture_output=True, env=_pg_env(),
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode(errors="replace").strip()

    def terminate_backends(self, application_name: str | None = None) -> int:
        """``pg_terminate_backend`` every client session (only those with that
        ``application_name`` if given); returns how many were terminated."""
        condition = ""
        if application_name is not None:
            condition = " AND application_name = '" + application_name.replace("'", "''") + "'"
        output = self.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" + condition
        )
        return int(output or 0)
