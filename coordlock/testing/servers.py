"""Throwaway REAL Redis, Redis Sentinel, PostgreSQL and ZooKeeper servers on loopback ports.

Every server here is a child process of the caller, listens on ``127.0.0.1`` only, keeps its
data in a fresh temporary directory and is torn down again:

* explicitly (``stop()`` / ``kill()`` / ``close()``, or by leaving a ``with`` block),
* at interpreter exit (an :mod:`atexit` hook closes every server still alive),
* when the creating process dies without running atexit (SIGKILL, a crashed pytest-xdist
  worker): every server is started with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel
  kills it together with its parent. Directories left behind that way are swept at the next
  start (their owner pid is part of the name).

The system services (Redis on 6379, PostgreSQL on 5432) are never used or touched.

All durations are in **seconds**. Every wait is bounded; a server that does not answer within
its deadline raises :class:`ServerUnavailable` with the tail of its log.

Quick use::

    with RedisServer() as redis:
        client = redis_py.Redis(port=redis.port)
        redis.kill(); redis.start()          # crash + restart on the same port
    with PostgresServer(fast=True) as pg:
        print(pg.psql("SELECT 1"))
    with ZooKeeperEnsemble(3) as zk:
        zk.leader().kill(); zk.wait_quorum()

Command line: ``python -m coordlock.testing.servers {redis|postgres|zookeeper|
zookeeper-ensemble|sentinel}`` runs one in the foreground, prints ``URL=<url>`` on a line by
itself and stops it cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeAlias, TypeVar

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "KINDS",
    "ManagedServer",
    "RedisReplyError",
    "RespValue",
    "PostgresServer",
    "RedisServer",
    "SentinelServer",
    "ServerUnavailable",
    "ZooKeeperEnsemble",
    "ZooKeeperNode",
    "ZooKeeperServer",
    "ensure_installed",
    "free_port",
    "main",
    "port_is_open",
    "postgres_bindir",
    "redis_command",
    "zookeeper_classpath",
    "zookeeper_four_letter",
    "ZOOKEEPER_JVM_FLAGS",
]

HOST = "127.0.0.1"
"""The only address any server here listens on."""

INSTALL_HINT = (
    "install the servers with: apt-get install -y redis-server postgresql zookeeper "
    "default-jre-headless   (or run backends/install.sh as root)"
)

KINDS: tuple[str, ...] = ("redis", "sentinel", "postgres", "zookeeper", "zookeeper-ensemble")
"""Server kinds understood by :func:`ensure_installed` and the command line."""

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
# The Debian zookeeper.jar carries a manifest Class-Path with all of its dependencies except an
# SLF4J binding. Add exactly one binding (log4j 1.2). NEVER use /usr/share/java/*: it contains
# six SLF4J bindings, SLF4J then picks the NOP one and ZooKeeperServerMain exits 1 silently.
_ZOOKEEPER_LOGGING_JARS = (
    Path("/usr/share/java/slf4j-log4j12.jar"),
    Path("/usr/share/java/log4j-1.2.jar"),
)

ZOOKEEPER_JVM_FLAGS: tuple[str, ...] = (
    "-Xms16m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.net.preferIPv4Stack=true",
    "-Djava.awt.headless=true",
    "-Dzookeeper.extendedTypesEnabled=true",
    "-Dzookeeper.emulate353TTLNodes=false",
    "-Dzookeeper.jmx.log4j.disable=true",
    "-Dzookeeper.admin.enableServer=false",
)
"""JVM flags of every ZooKeeper process (small heap, serial GC, TTL nodes enabled)."""

_S = TypeVar("_S", bound="ManagedServer")
_E = TypeVar("_E", bound="ZooKeeperEnsemble")


class ServerUnavailable(RuntimeError):
    """A server binary is missing, or a server failed to start or answer within its deadline.

    The message says what is missing or failed (with the tail of the server log) and how to
    install the servers.
    """


# --------------------------------------------------------------------------------------------
# free ports
# --------------------------------------------------------------------------------------------

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()
_rng = random.SystemRandom()  # immune to tests that seed the global `random`


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _xdist_worker_index() -> int | None:
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    return int(match.group(1)) if match else None


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now.

    The port is taken from *below* the kernel's ephemeral range when that range leaves room
    (normally 15000..32767): outgoing connections and ``bind(port=0)`` never take such a port,
    so a server that is killed and restarted can bind its port again even while thousands of
    client connections come and go. Each pytest-xdist worker draws from its own slice, and one
    process never hands out the same port twice. Falls back to ``bind(127.0.0.1:0)``.
    There is still a window between this call and the server binding the port; servers started
    here retry with another port when the first start fails with "address in use".
    """
    eph_lo, _ = _ephemeral_range()
    lo, hi = 15000, eph_lo - 1
    with _port_lock:
        if hi - lo >= 1000:
            worker = _xdist_worker_index()
            if worker is not None:
                slices = 32
                size = (hi - lo + 1) // slices
                lo = lo + (worker % slices) * size
                hi = lo + size - 1
            for _ in range(300):
                port = _rng.randint(lo, hi)
                if port not in _ports_handed_out and _port_is_free(port):
                    _ports_handed_out.add(port)
                    return port
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((HOST, 0))
                port = int(probe.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise ServerUnavailable("no free TCP port found on 127.0.0.1")


def port_is_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port`` (bounded by ``timeout``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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


# --------------------------------------------------------------------------------------------
# process plumbing
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:  # resolved at import, never in a freshly forked child
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when its parent thread exits."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (R, S, T, Z, ...) or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_WORKDIR_RE = re.compile(r"coordlock-srv-[a-z-]+-(\d+)-\w+")
_swept = False


def _sweep_stale_workdirs() -> None:
    """Remove work directories whose owning process is gone (left by SIGKILLed runs)."""
    global _swept
    if _swept:
        return
    _swept = True
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            match = _WORKDIR_RE.fullmatch(entry.name)
            if not match or not entry.is_dir() or entry.is_symlink():
                continue
            owner = int(match.group(1))
            if owner == os.getpid() or _process_state(owner) not in (None, "Z", "X"):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def _make_workdir(kind: str) -> Path:
    _sweep_stale_workdirs()
    return Path(tempfile.mkdtemp(prefix=f"coordlock-srv-{kind}-{os.getpid()}-"))


_registry_lock = threading.Lock()
_live: dict[int, ManagedServer] = {}


def _cleanup_all() -> None:
    """atexit hook: close every server this process started and did not close."""
    with _registry_lock:
        servers = list(_live.values())
    for server in reversed(servers):
        with contextlib.suppress(Exception):
            server.close(timeout=5.0)
    _drop_postgres_templates()


atexit.register(_cleanup_all)


# --------------------------------------------------------------------------------------------
# the base class
# --------------------------------------------------------------------------------------------


class ManagedServer:
    """One server process on ``127.0.0.1:<port>`` with its data in a temporary directory.

    Lifecycle: ``start()`` spawns it and waits until it answers a real request; ``stop()`` asks
    it to shut down and waits; ``kill()`` SIGKILLs its whole process group and waits until every
    process of it is gone; ``restart()`` brings it back on the SAME port with the SAME data
    directory (a server configured without persistence loses its data, as it would in real
    life); ``pause()`` / ``resume()`` SIGSTOP / SIGCONT the whole process group (clients then
    see connects succeed and requests hang); ``close()`` stops it for good and deletes its
    directory. A ``with`` block starts it and closes it. Servers still alive at interpreter exit
    are closed by an atexit hook, and the kernel kills them if the creating process dies.

    Servers must be started from the main thread or a thread that outlives them: the kernel's
    parent-death signal fires when the *thread* that spawned the server exits.

    Attributes: ``host`` (always ``"127.0.0.1"``), ``port``, ``url`` (a coordlock URL),
    ``workdir`` (temporary directory), ``log_path``, ``pid`` (None while not running).
    """

    kind: ClassVar[str] = ""
    stop_signal: ClassVar[int] = signal.SIGTERM
    _READY_ERRORS: ClassVar[tuple[type[BaseException], ...]] = (
        OSError,
        ValueError,
        subprocess.SubprocessError,
    )

    host: str = HOST

    def __init__(self, *, port: int | None = None, start_timeout: float = 60.0) -> None:
        """``port``: fixed port (default: :func:`free_port`); ``start_timeout``: seconds a
        start may take before :class:`ServerUnavailable` is raised."""
        self._port_fixed = port is not None
        self.port: int = port if port is not None else free_port()
        self.start_timeout = float(start_timeout)
        self.workdir: Path = _make_workdir(self.kind)
        self.log_path: Path = self.workdir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._prepared = False
        self._paused = False
        self._closed = False
        self._ever_ready = False
        self.last_start_seconds: float | None = None
        """Seconds the last ``start()`` took until the server answered (spawn + readiness)."""
        with _registry_lock:  # so that atexit removes the directory even if never started
            _live[id(self)] = self

    # -- hooks for subclasses ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The coordlock URL of this server."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create data directories once, before the first start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, timeout: float) -> bool:
        """One readiness check that talks to the server; True when it is serving."""
        raise NotImplementedError

    def _run_as(self) -> tuple[int, int] | None:
        """(uid, gid) to run the server as, or None for the current user."""
        return None

    def _child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def _log_files(self) -> list[Path]:
        return [self.log_path]

    # -- public API -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the server (leader of its process group), None when not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def paused(self) -> bool:
        """True between ``pause()`` and ``resume()``."""
        return self._paused and self.is_running()

    def is_running(self) -> bool:
        """True while the server process exists (a paused server is running)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log file(s)."""
        chunks = []
        for path in self._log_files():
            text = _tail(path, lines)
            if text.strip():
                chunks.append(f"--- {path} ---\n{text}")
        return "\n".join(chunks) or "(log is empty)"

    def start(self: _S, *, wait: bool = True, timeout: float | None = None) -> _S:
        """Start the server (no-op if running) and, with ``wait``, block until it answers.

        ``timeout`` (seconds, default ``start_timeout``) bounds the wait. Raises
        :class:`ServerUnavailable` (binaries missing, process exited, no answer in time).
        Returns ``self``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} was closed; create a new server")
            if self.is_running():
                return self
            ensure_installed(self.kind)
            if not self._prepared:
                self._prepare()
                self._prepared = True
            attempts = 1 if (self._port_fixed or self._ever_ready) else 3
            for attempt in range(attempts):
                began = time.monotonic()
                self._spawn()
                if not wait:
                    return self
                try:
                    self.wait_ready(timeout)
                except ServerUnavailable as exc:
                    if attempt + 1 < attempts and self._address_in_use():
                        self._discard_process()
                        self.port = free_port()  # lost a race for the port: take another
                        continue
                    self._discard_process()
                    raise ServerUnavailable(str(exc)) from None
                self.last_start_seconds = time.monotonic() - began
                return self
            raise AssertionError("unreachable")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server answers a real request (bounded by ``timeout`` seconds,
        default ``start_timeout``); raise :class:`ServerUnavailable` with the log tail if the
        process exits or does not answer in time."""
        limit = self.start_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        delay = 0.02
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerUnavailable(
                    f"{self.kind} server on {self.host}:{self.port} is not running "
                    f"(exit code {code}).\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            try:
                if self._probe(max(0.05, min(1.0, remaining))):
                    self._ever_ready = True
                    return
            except self._READY_ERRORS:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"{self.kind} server on {self.host}:{self.port} (pid {proc.pid}) did not "
                    f"answer within {limit:g}s.\n{self.log_tail()}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down gracefully and wait until all its processes are gone.

        After ``timeout`` seconds the process group is SIGKILLed. Data stays for ``restart()``.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, self.stop_signal)
                if self._paused:
                    self._signal_group(signal.SIGCONT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait(10.0)
            self._reap_group(proc.pid)
            self._proc = None
            self._paused = False

    def kill(self) -> None:
        """SIGKILL the server's whole process group (a crash) and wait until it is gone."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                self._signal_group(signal.SIGKILL)
                proc.wait(10.0)
            self._reap_group(proc.pid)
            self._proc = None
            self._paused = False

    def restart(self: _S, *, kill: bool = False, timeout: float | None = None) -> _S:
        """Stop (or with ``kill=True`` crash) the server and start it again on the same port
        with the same data directory; waits until it answers (``timeout`` seconds)."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP the whole process group and wait (max 5s) until the kernel reports it
        stopped. Connections are still accepted by the kernel, but nothing is answered."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{self!r} is not running")
            self._signal_group(signal.SIGSTOP)
            self._paused = True
            deadline = time.monotonic() + 5.0
            while _process_state(proc.pid) not in ("T", "t", None):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self!r} did not stop after SIGSTOP")
                time.sleep(0.01)

    def resume(self) -> None:
        """SIGCONT the process group after ``pause()``."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{self!r} is not running")
            self._signal_group(signal.SIGCONT)
            self._paused = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop the server for good (SIGKILL if a graceful stop fails) and delete its
        directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.stop(timeout)
            except Exception:
                self.kill()
            finally:
                self._closed = True
                with _registry_lock:
                    _live.pop(id(self), None)
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self: _S) -> _S:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.is_running() else "stopped")
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid} {state}>"

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        command = self._command()
        run_as = self._run_as()
        parent = os.getpid()
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=self._child_env(),
                    start_new_session=True,  # own process group: pause/kill reach children
                    preexec_fn=(lambda: _die_with_parent(parent)) if in_main_thread else None,
                    user=run_as[0] if run_as else None,
                    group=run_as[1] if run_as else None,
                    extra_groups=[] if run_as else None,
                )
            except OSError as exc:
                raise ServerUnavailable(f"cannot run {command[0]}: {exc}; {INSTALL_HINT}") from exc
        self._paused = False

    def _discard_process(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10.0)
            self._reap_group(proc.pid)
        self._proc = None
        self._paused = False

    def _address_in_use(self) -> bool:
        needles = ("address already in use", "bindexception", "could not create listen socket")
        text = self.log_tail(80).lower()
        return any(needle in text for needle in needles)

    def _signal_group(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _reap_group(self, pgid: int, timeout: float = 10.0) -> None:
        """Wait (bounded) until no process of the group is left; SIGKILL stragglers."""
        deadline = time.monotonic() + timeout
        killed = False
        while _group_members(pgid):
            if time.monotonic() > deadline:
                if killed:
                    return
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + 5.0
            time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------

RespValue: TypeAlias = str | int | list["RespValue"] | None
"""A decoded RESP2 reply: simple/bulk strings as str, integers, nil, arrays."""


class RedisReplyError(Exception):
    """The server answered a raw RESP command with an error reply (``-ERR ...``)."""


def _read_resp(reader: _LineReader) -> RespValue:
    line = reader.line()
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode(errors="replace")
    if kind == b"-":
        raise RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        return None if length < 0 else reader.exact(length + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_resp(reader) for _ in range(count)]
    raise ValueError(f"unexpected RESP reply {line!r}")


class _LineReader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by server")
        self._buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def exact(self, size: int) -> bytes:
        while len(self._buf) < size:
            self._fill()
        data, self._buf = self._buf[:size], self._buf[size:]
        return data


def redis_command(port: int, *args: str, host: str = HOST, timeout: float = 1.0) -> RespValue:
    """Send one command over a raw socket (no driver needed) and return the decoded reply.

    ``timeout`` (seconds) bounds connect and reply; raises OSError (``TimeoutError``) on a
    silent server and :class:`RedisReplyError` on an error reply.
    """
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(payload)
        return _read_resp(_LineReader(sock))


class RedisServer(ManagedServer):
    """A throwaway ``redis-server`` on ``127.0.0.1:<port>``; url ``redis://127.0.0.1:P/0``.

    ``persistence=False`` (default): ``--save "" --appendonly no``, so a restart starts EMPTY
    (what a crash of a cache-style Redis does; fences must survive that). ``persistence=True``:
    append-only file with ``appendfsync everysec`` in the work directory, kept across restarts.
    ``extra_args`` are appended to the command line (e.g. ``("--maxmemory", "10mb")``).
    """

    kind: ClassVar[str] = "redis"

    def __init__(
        self,
        *,
        persistence: bool = False,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(port=port, start_timeout=start_timeout)
        self.persistence = persistence
        self.extra_args = tuple(extra_args)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        binary = _redis_binary()
        if binary is None:
            raise ServerUnavailable(f"redis-server not found; {INSTALL_HINT}")
        aof = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistence
            else ["--appendonly", "no"]
        )
        return [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", "",
            "--save", "",
            *aof,
            *self.extra_args,
        ]  # fmt: skip

    def _probe(self, timeout: float) -> bool:
        try:
            return redis_command(self.port, "PING", timeout=timeout) == "PONG"
        except RedisReplyError:  # -LOADING while reading the AOF
            return False

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers PING within ``timeout`` seconds."""
        try:
            return self._probe(timeout)
        except (OSError, ValueError):
            return False

    def command(self, *args: str, timeout: float = 1.0) -> RespValue:
        """Run one raw command (see :func:`redis_command`)."""
        return redis_command(self.port, *args, host=self.host, timeout=timeout)


class SentinelServer(ManagedServer):
    """A real ``redis-server <conf> --sentinel`` monitoring ``master`` (quorum 1).

    url ``redis+sentinel://127.0.0.1:<sentinel port>/<master_name>``. ``down_after`` and
    ``failover_timeout`` are seconds (small by default, so failure detection is quick). The
    sentinel rewrites its config file in the work directory; a restart keeps that state.
    ``start()`` waits until the sentinel answers and — when the master is running and not
    paused — reports it up (flags ``master``). The master is NOT owned: close it yourself.
    """

    kind: ClassVar[str] = "sentinel"

    def __init__(
        self,
        master: RedisServer,
        master_name: str = "mymaster",
        *,
        down_after: float = 1.0,
        failover_timeout: float = 3.0,
        port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", master_name):
            raise ValueError(f"invalid sentinel master name {master_name!r}")
        super().__init__(port=port, start_timeout=start_timeout)
        self.master = master
        self.master_name = master_name
        self.down_after = float(down_after)
        self.failover_timeout = float(failover_timeout)
        self.config_path = self.workdir / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"redis+sentinel://{self.host}:{self.port}/{self.master_name}"

    def _prepare(self) -> None:
        name = self.master_name
        self.config_path.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    "daemonize no",
                    'logfile ""',
                    f"dir {self.workdir}",
                    f"sentinel monitor {name} {self.master.host} {self.master.port} 1",
                    f"sentinel down-after-milliseconds {name} {int(self.down_after * 1000)}",
                    f"sentinel failover-timeout {name} {int(self.failover_timeout * 1000)}",
                    f"sentinel parallel-syncs {name} 1",
                    "",
                ]
            )
        )

    def _command(self) -> list[str]:
        binary = _redis_binary()
        if binary is None:
            raise ServerUnavailable(f"redis-server not found; {INSTALL_HINT}")
        return [binary, str(self.config_path), "--sentinel", "--port", str(self.port)]

    def _probe(self, timeout: float) -> bool:
        try:
            if redis_command(self.port, "PING", timeout=timeout) != "PONG":
                return False
        except RedisReplyError:
            return False
        return self.master_address(timeout) is not None

    def wait_ready(self, timeout: float | None = None) -> None:
        """As :meth:`ManagedServer.wait_ready`; additionally waits until the sentinel sees the
        master up when the master is running and not paused."""
        limit = self.start_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        super().wait_ready(limit)
        while self.master.is_running() and not self.master.paused:
            if self.master_flags() == "master":
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"sentinel {self.host}:{self.port} does not see master "
                    f"{self.master.port} up after {limit:g}s (flags {self.master_flags()!r}).\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def master_address(self, timeout: float = 1.0) -> tuple[str, int] | None:
        """(host, port) the sentinel currently reports for the master, None if unknown."""
        reply = redis_command(
            self.port, "SENTINEL", "get-master-addr-by-name", self.master_name, timeout=timeout
        )
        if isinstance(reply, list) and len(reply) == 2:
            return str(reply[0]), int(str(reply[1]))
        return None

    def master_flags(self, timeout: float = 1.0) -> str | None:
        """The sentinel's flags for the master (``"master"`` when up, e.g.
        ``"s_down,master"`` when down), None if the sentinel does not answer."""
        try:
            reply = redis_command(
                self.port, "SENTINEL", "master", self.master_name, timeout=timeout
            )
        except (OSError, ValueError, RedisReplyError):
            return None
        if isinstance(reply, list):
            fields = dict(zip(reply[::2], reply[1::2], strict=False))
            flags = fields.get("flags")
            return flags if isinstance(flags, str) else None
        return None

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the sentinel answers PING within ``timeout`` seconds."""
        try:
            return redis_command(self.port, "PING", timeout=timeout) == "PONG"
        except (OSError, ValueError, RedisReplyError):
            return False


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

_pg_template_lock = threading.Lock()
_pg_templates: dict[str, Path] = {}


def _drop_postgres_templates() -> None:
    with _pg_template_lock:
        for base in _pg_templates.values():
            shutil.rmtree(base.parent, ignore_errors=True)
        _pg_templates.clear()


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


# --------------------------------------------------------------------------------------------
# ZooKeeper
# --------------------------------------------------------------------------------------------


def zookeeper_four_letter(port: int, word: str, *, host: str = HOST, timeout: float = 1.0) -> str:
    """Send a ZooKeeper four-letter word (``ruok``, ``srvr``, ``mntr``...) and return the reply.

    ``timeout`` (seconds) bounds connect and the whole reply; raises OSError on failure.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply to {word!r} within {timeout}s")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


_LOG4J_TEMPLATE = """\
log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.Append=true
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} %-5p [%t] %c{{1}} - %m%n
"""

_LOGBACK_TEMPLATE = """\
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <encoder><pattern>%d{{ISO8601}} %-5level [%thread] %logger{{1}} - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
"""


class ZooKeeperServer(ManagedServer):
    """A throwaway single-node ZooKeeper (``ZooKeeperServerMain``); url
    ``zookeeper://127.0.0.1:P``.

    ``tick_ms`` is the ZooKeeper tick in MILLISECONDS (default 200: sessions may be as short
    as 2 ticks = 0.4s, at most 60s). TTL nodes are enabled (``extendedTypesEnabled``), the
    admin HTTP server is off, every four-letter word is allowed, connections per client IP are
    unlimited (ZooKeeper's default of 60 per IP breaks busy tests: every client is 127.0.0.1).
    ``fast=True`` (for tests, not benchmarks) sets ``forceSync=no`` (the transaction log is
    written but not fsynced, so a process crash loses nothing) and ``-XX:TieredStopAtLevel=1``
    (C1 JIT only: starts ~1/3 faster, uses less CPU). JVM: :data:`ZOOKEEPER_JVM_FLAGS`
    (``-Xmx`` = ``heap_mb``).
    The data directory survives ``restart()``. ``extra_config`` lines are added to zoo.cfg.
    """

    kind: ClassVar[str] = "zookeeper"
    main_class: ClassVar[str] = "org.apache.zookeeper.server.ZooKeeperServerMain"

    def __init__(
        self,
        *,
        tick_ms: int = 200,
        fast: bool = False,
        heap_mb: int = 256,
        extra_config: Mapping[str, str | int] | None = None,
        port: int | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(port=port, start_timeout=start_timeout)
        if tick_ms <= 0:
            raise ValueError("tick_ms must be > 0")
        self.tick_ms = int(tick_ms)
        self.fast = fast
        self.heap_mb = int(heap_mb)
        self.extra_config = {key: str(value) for key, value in (extra_config or {}).items()}
        self.conf_dir = self.workdir / "conf"
        self.data_dir = self.workdir / "data"
        self.zk_log_path = self.workdir / "zookeeper.log"

    @property
    def url(self) -> str:
        return f"zookeeper://{self.host}:{self.port}"

    @property
    def hosts(self) -> str:
        """kazoo ``hosts`` string: ``127.0.0.1:P``."""
        return f"{self.host}:{self.port}"

    def _config(self) -> dict[str, str]:
        config = {
            "tickTime": str(self.tick_ms),
            "dataDir": str(self.data_dir),
            "clientPort": str(self.port),
            "clientPortAddress": self.host,
            "minSessionTimeout": str(2 * self.tick_ms),
            "maxSessionTimeout": "60000",
            "maxClientCnxns": "0",
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "*",
            "preAllocSize": "4096",
            "forceSync": "no" if self.fast else "yes",
        }
        config.update(self.extra_config)
        return config

    def _write_config(self) -> Path:
        self.conf_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        cfg = self.conf_dir / "zoo.cfg"
        cfg.write_text("".join(f"{key}={value}\n" for key, value in self._config().items()))
        (self.conf_dir / "log4j.properties").write_text(
            _LOG4J_TEMPLATE.format(log=self.zk_log_path)
        )
        (self.conf_dir / "logback.xml").write_text(_LOGBACK_TEMPLATE.format(log=self.zk_log_path))
        return cfg

    def _command(self) -> list[str]:
        java = _java_binary()
        classpath = zookeeper_classpath(self.conf_dir)
        if java is None or classpath is None:
            raise ServerUnavailable(f"ZooKeeper or java not found; {INSTALL_HINT}")
        cfg = self._write_config()
        flags = [flag for flag in ZOOKEEPER_JVM_FLAGS if not flag.startswith("-Xmx")]
        return [
            java,
            f"-Xmx{self.heap_mb}m",
            *flags,
            *(["-XX:TieredStopAtLevel=1"] if self.fast else []),
            f"-Dlog4j.configuration=file:{self.conf_dir / 'log4j.properties'}",
            f"-Dlogback.configurationFile={self.conf_dir / 'logback.xml'}",
            f"-Dzookeeper.log.dir={self.workdir}",
            "-cp",
            classpath,
            self.main_class,
            str(cfg),
        ]

    def _log_files(self) -> list[Path]:
        return [self.log_path, self.zk_log_path]

    def _serving_modes(self) -> tuple[str, ...]:
        return ("standalone",)

    def four_letter(self, word: str, timeout: float = 1.0) -> str:
        """Send a four-letter word to this server (see :func:`zookeeper_four_letter`)."""
        return zookeeper_four_letter(self.port, word, host=self.host, timeout=timeout)

    def mode(self, timeout: float = 1.0) -> str | None:
        """``standalone`` / ``leader`` / ``follower`` / ``observer`` from ``srvr``; None if the
        server does not answer or is not serving (e.g. no quorum)."""
        try:
            reply = self.four_letter("srvr", timeout)
        except OSError:
            return None
        match = re.search(r"^Mode: (\w+)", reply, re.MULTILINE)
        return match.group(1) if match else None

    def _probe(self, timeout: float) -> bool:
        return self.mode(timeout) in self._serving_modes()

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers ``ruok`` with ``imok`` within ``timeout`` seconds."""
        try:
            return self.four_letter("ruok", timeout) == "imok"
        except OSError:
            return False


class ZooKeeperNode(ZooKeeperServer):
    """One member of a :class:`ZooKeeperEnsemble` (``QuorumPeerMain``); made by the ensemble.

    Ready means serving as leader, follower or observer, which needs a quorum: when a majority
    is down, restart members with ``start(wait=False)`` and then ``ensemble.wait_quorum()``.
    """

    main_class: ClassVar[str] = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

    def __init__(
        self,
        myid: int,
        *,
        port: int,
        peer_port: int,
        election_port: int,
        tick_ms: int = 200,
        fast: bool = False,
        heap_mb: int = 256,
        start_timeout: float = 90.0,
    ) -> None:
        super().__init__(
            tick_ms=tick_ms, fast=fast, heap_mb=heap_mb, port=port, start_timeout=start_timeout
        )
        self.myid = myid
        self.peer_port = peer_port
        self.election_port = election_port
        self.peers: list[ZooKeeperNode] = [self]

    def _config(self) -> dict[str, str]:
        config = super()._config()
        config.update(initLimit="50", syncLimit="15", cnxTimeout="2000")
        if len(self.peers) == 1:
            config["standaloneEnabled"] = "false"
        for peer in self.peers:
            config[f"server.{peer.myid}"] = f"{peer.host}:{peer.peer_port}:{peer.election_port}"
        return config

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        (self.data_dir / "myid").write_text(f"{self.myid}\n")

    def _serving_modes(self) -> tuple[str, ...]:
        return ("leader", "follower", "observer")

    def __repr__(self) -> str:
        return f"<ZooKeeperNode id={self.myid} {self.host}:{self.port} pid={self.pid}>"


class ZooKeeperEnsemble:
    """``size`` ZooKeeper nodes (``QuorumPeerMain``) forming one ensemble on loopback.

    ``url`` is ``zookeeper://127.0.0.1:p1,127.0.0.1:p2,...``; ``members`` are
    :class:`ZooKeeperNode` objects that support ``kill()``, ``restart()``, ``pause()``,
    ``resume()`` individually (same ports and data on restart). ``leader()`` asks every member
    (``srvr``) who leads now; ``wait_quorum()`` waits until a leader serves and every running,
    unpaused member has joined. ``tick_ms`` in milliseconds; timeouts in seconds.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        tick_ms: int = 200,
        fast: bool = False,
        heap_mb: int = 256,
        start_timeout: float = 90.0,
    ) -> None:
        if size < 1:
            raise ValueError("an ensemble needs at least one member")
        self.start_timeout = float(start_timeout)
        self.members: list[ZooKeeperNode] = []
        try:
            for myid in range(1, size + 1):
                self.members.append(
                    ZooKeeperNode(
                        myid,
                        port=free_port(),
                        peer_port=free_port(),
                        election_port=free_port(),
                        tick_ms=tick_ms,
                        fast=fast,
                        heap_mb=heap_mb,
                        start_timeout=start_timeout,
                    )
                )
        except BaseException:
            self.close()
            raise
        for member in self.members:
            member.peers = self.members
        self.last_start_seconds: float | None = None
        """Seconds the last ``start()`` took until the quorum served."""

    host: str = HOST

    @property
    def hosts(self) -> str:
        """kazoo ``hosts`` string: ``127.0.0.1:p1,127.0.0.1:p2,...``."""
        return ",".join(member.hosts for member in self.members)

    @property
    def url(self) -> str:
        return f"zookeeper://{self.hosts}"

    @property
    def ports(self) -> list[int]:
        """Client ports of the members, in member order."""
        return [member.port for member in self.members]

    def start(self: _E, timeout: float | None = None) -> _E:
        """Start every member and wait (``timeout`` seconds) for the quorum."""
        began = time.monotonic()
        try:
            for member in self.members:
                member.start(wait=False)
            self.wait_quorum(timeout)
        except BaseException:
            self.stop()
            raise
        self.last_start_seconds = time.monotonic() - began
        return self

    def is_running(self) -> bool:
        """True while every member process exists."""
        return all(member.is_running() for member in self.members)

    def leader(self) -> ZooKeeperNode:
        """The member that reports ``Mode: leader`` now; RuntimeError if there is none."""
        for member in self.members:
            if member.is_running() and not member.paused and member.mode(0.5) == "leader":
                return member
        raise RuntimeError("the ensemble has no leader right now")

    def followers(self) -> list[ZooKeeperNode]:
        """Members that report ``Mode: follower`` now."""
        return [
            member
            for member in self.members
            if member.is_running() and not member.paused and member.mode(0.5) == "follower"
        ]

    def wait_quorum(self, timeout: float | None = None) -> ZooKeeperNode:
        """Wait until one member leads and every running, unpaused member serves; return the
        leader. Raises :class:`ServerUnavailable` (with logs) after ``timeout`` seconds."""
        limit = self.start_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        while True:
            live = [m for m in self.members if m.is_running() and not m.paused]
            modes = {member.myid: member.mode(0.5) for member in live}
            leaders = [m for m in live if modes[m.myid] == "leader"]
            if len(leaders) == 1 and all(
                mode in ("leader", "follower", "observer") for mode in modes.values()
            ):
                return leaders[0]
            if time.monotonic() > deadline:
                logs = "\n".join(m.log_tail(15) for m in self.members)
                raise ServerUnavailable(
                    f"ZooKeeper ensemble {self.hosts}: no quorum after {limit:g}s "
                    f"(modes {modes}).\n{logs}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every member (data stays)."""
        for member in self.members:
            member.stop(timeout)

    def kill(self) -> None:
        """SIGKILL every member."""
        for member in self.members:
            member.kill()

    def close(self, timeout: float = 30.0) -> None:
        """Stop every member for good and delete their directories."""
        for member in self.members:
            member.close(timeout)

    def __enter__(self: _E) -> _E:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ZooKeeperEnsemble {self.hosts}>"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coordlock.testing.servers KIND``: run one server in the foreground.

    Prints ``URL=<url>`` on a line by itself (stdout, flushed) once the server answers, then
    waits; SIGINT/SIGTERM stop it cleanly. Exits 1 if it cannot start, 2 if it dies.
    """
    parser = argparse.ArgumentParser(
        prog="python -m coordlock.testing.servers",
        description="Run a throwaway server on a free loopback port until interrupted.",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="postgres: fsync/synchronous_commit off; zookeeper: forceSync=no",
    )
    parser.add_argument("--persistence", action="store_true", help="redis: append-only file")
    parser.add_argument("--size", type=int, default=3, help="zookeeper-ensemble: members")
    parser.add_argument("--timeout", type=float, default=90.0, help="startup timeout, seconds")
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    servers: list[ManagedServer] = []
    ensemble: ZooKeeperEnsemble | None = None
    try:
        if args.kind == "redis":
            servers.append(
                RedisServer(
                    persistence=args.persistence, port=args.port, start_timeout=args.timeout
                )
            )
        elif args.kind == "sentinel":
            master = RedisServer(persistence=args.persistence, start_timeout=args.timeout)
            servers += [master, SentinelServer(master, port=args.port, start_timeout=args.timeout)]
        elif args.kind == "postgres":
            servers.append(
                PostgresServer(fast=args.fast, port=args.port, start_timeout=args.timeout)
            )
        elif args.kind == "zookeeper":
            servers.append(
                ZooKeeperServer(fast=args.fast, port=args.port, start_timeout=args.timeout)
            )
        else:
            ensemble = ZooKeeperEnsemble(args.size, fast=args.fast, start_timeout=args.timeout)
            servers.extend(ensemble.members)
        began = time.monotonic()
        if ensemble is not None:
            ensemble.start()
            url = ensemble.url
        else:
            for server in servers:
                server.start()
            url = servers[-1].url
        print(f"URL={url}", flush=True)
        for server in servers:
            print(f"# {server!r} log={server.log_path}", file=sys.stderr)
        print(
            f"# ready after {time.monotonic() - began:.2f}s; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        while not stop_requested.wait(0.5):
            dead = [server for server in servers if not server.is_running()]
            if dead:
                print(f"# server died: {dead[0]!r}\n{dead[0].log_tail()}", file=sys.stderr)
                return 2
        return 0
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.close()


if __name__ == "__main__":
    sys.exit(main())
