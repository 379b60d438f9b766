"""Finding the server binaries, and installing the OS packages when they are missing."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._common import INSTALL_HINT, KINDS, ServerUnavailable

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
# The Debian zookeeper.jar carries a manifest Class-Path with all of its dependencies except an
# SLF4J binding. Add exactly one binding (log4j 1.2). NEVER use /usr/share/java/*: it contains
# six SLF4J bindings, SLF4J then picks the NOP one and ZooKeeperServerMain exits 1 silently.
_ZOOKEEPER_LOGGING_JARS = (
    Path("/usr/share/java/slf4j-log4j12.jar"),
    Path("/usr/share/java/log4j-1.2.jar"),
)


# --------------------------------------------------------------------------------------------
# binaries and installation
# --------------------------------------------------------------------------------------------


def _redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def postgres_bindir() -> Path | None:
    """Directory holding ``initdb``, ``postgres``, ``psql`` and ``pg_isready``, or None.

    ``$COORDLOCK_PG_BINDIR`` wins; then the newest ``/usr/lib/postgresql/<v>/bin`` (Debian);
    then the directory of ``initdb`` on PATH.
    """
    needed = ("initdb", "postgres", "psql", "pg_isready")

    def complete(bindir: Path) -> bool:
        return all(os.access(bindir / name, os.X_OK) for name in needed)

    override = os.environ.get("COORDLOCK_PG_BINDIR")
    if override:
        return Path(override) if complete(Path(override)) else None
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for bindir in debian:
        if complete(bindir):
            return bindir
    initdb = shutil.which("initdb")
    if initdb and complete(Path(initdb).parent):
        return Path(initdb).parent
    return None


def zookeeper_classpath(conf_dir: Path | None = None) -> str | None:
    """The Java classpath for the ZooKeeper server, or None when ZooKeeper is not installed.

    ``$COORDLOCK_ZOOKEEPER_CLASSPATH`` wins (e.g. ``/opt/zookeeper/lib/*`` of an upstream
    tarball); otherwise the Debian ``/usr/share/java/zookeeper.jar`` plus one SLF4J binding
    (log4j 1.2). ``conf_dir`` (holding the generated logging config) is put first.
    """
    parts: list[str] = [str(conf_dir)] if conf_dir is not None else []
    override = os.environ.get("COORDLOCK_ZOOKEEPER_CLASSPATH")
    if override:
        return ":".join([*parts, override])
    if not ZOOKEEPER_JAR.is_file():
        return None
    parts.append(str(ZOOKEEPER_JAR))
    parts.extend(str(jar) for jar in _ZOOKEEPER_LOGGING_JARS if jar.is_file())
    return ":".join(parts)


def _java_binary() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def _missing(kind: str) -> list[tuple[str, str]]:
    """(what is missing, apt package providing it) for one server kind."""
    missing: list[tuple[str, str]] = []
    if kind in ("redis", "sentinel"):
        if _redis_binary() is None:
            missing.append(("redis-server", "redis-server"))
    elif kind == "postgres":
        if postgres_bindir() is None:
            missing.append(("PostgreSQL (initdb, postgres, psql, pg_isready)", "postgresql"))
    elif kind in ("zookeeper", "zookeeper-ensemble"):
        if zookeeper_classpath() is None:
            missing.append((str(ZOOKEEPER_JAR), "zookeeper"))
        if _java_binary() is None:
            missing.append(("java", "default-jre-headless"))
    else:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(KINDS)}")
    return missing


_install_lock = threading.Lock()
_install_failures: dict[str, str] = {}
_apt_updated = False


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock shared by all processes of the machine (bounded wait)."""
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise ServerUnavailable(
                        f"timed out after {timeout}s waiting for {path}"
                    ) from exc
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _apt_get(args: Sequence[str], timeout: float) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerUnavailable(f"apt-get {' '.join(args)} took longer than {timeout}s") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stdout.decode(errors="replace").splitlines()[-20:])
        raise ServerUnavailable(
            f"apt-get {' '.join(args)} failed (exit {done.returncode}):\n{tail}\n{INSTALL_HINT}"
        )


def ensure_installed(kind: str, *, timeout: float = 900.0) -> None:
    """Make sure the binaries for ``kind`` (one of :data:`KINDS`) exist.

    When something is missing and this process runs as root with ``apt-get`` available (and
    ``$COORDLOCK_NO_INSTALL`` is not set), installs the OS packages (``apt-get update`` once per
    process, then ``apt-get install -y ...``; serialised across processes by a file lock).
    Otherwise, or when installation fails, raises :class:`ServerUnavailable` saying what is
    missing and how to install it. A failure is remembered for the rest of the process.
    ``timeout`` bounds the whole installation (seconds).
    """
    global _apt_updated
    missing = _missing(kind)
    if not missing:
        return
    with _install_lock:
        if kind in _install_failures:
            raise ServerUnavailable(_install_failures[kind])
        what = ", ".join(item for item, _ in missing)
        packages = sorted({package for _, package in missing})
        allowed = os.environ.get("COORDLOCK_NO_INSTALL", "").lower() not in ("1", "true", "yes")
        if not (allowed and os.geteuid() == 0 and shutil.which("apt-get")):
            message = f"{kind}: {what} not found; {INSTALL_HINT}"
            _install_failures[kind] = message
            raise ServerUnavailable(message)
        try:
            with _file_lock(Path(tempfile.gettempdir()) / "coordlock-apt.lock", timeout):
                missing = _missing(kind)  # another process may have installed it meanwhile
                if missing:
                    if not _apt_updated:
                        _apt_get(["update"], timeout)
                        _apt_updated = True
                    _apt_get(["install", "-y", "--no-install-recommends", *packages], timeout)
        except ServerUnavailable as exc:
            _install_failures[kind] = f"{kind}: {what} not found and installing failed: {exc}"
            raise ServerUnavailable(_install_failures[kind]) from exc
        missing = _missing(kind)
        if missing:
            message = f"{kind}: still missing after apt-get install {' '.join(packages)}: {what}"
            _install_failures[kind] = message
            raise ServerUnavailable(f"{message}; {INSTALL_HINT}")
