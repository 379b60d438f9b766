"""Throwaway ZooKeeper: a single server, ensemble members and a whole ensemble."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

from ._common import HOST, INSTALL_HINT, ServerUnavailable, free_port
from ._install import _java_binary, zookeeper_classpath
from ._managed import ManagedServer

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

_E = TypeVar("_E", bound="ZooKeeperEnsemble")


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
