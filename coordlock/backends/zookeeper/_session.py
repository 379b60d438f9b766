"""One ZooKeeper session: the kazoo client, its connection state, the server clock, fork safety.

A :class:`Session` owns one ``KazooClient`` (so one ZooKeeper session). Every node it creates
carries the ACL given (``default_acl``). It knows how to wait (bounded) for a connection, how to
read a fresh server timestamp, and how to tell a *permanent* connection failure (DNS name
unknown, TLS handshake refused) from a transient one, so callers can fail fast with
:class:`~coordlock.ConfigurationError` instead of retrying for the whole retry deadline.

Fork safety: kazoo's threads do not exist in a forked child, and the child must never speak on
the parent's connection (its requests would interleave with the parent's on one socket, and a
close would end the parent's session). :meth:`Session.forked` tells a child from its parent;
:meth:`Session.after_fork` drops the inherited client WITHOUT talking to the server (the child's
copies of the socket descriptors are closed; the parent's stay open) and starts a fresh
session for the child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._errors import ConfigurationError
from ._clock import ServerClock
from ._handler import PollingHandler
from ._options import TLS

try:
    from kazoo.client import KazooClient
    from kazoo.exceptions import ConnectionLoss, NodeExistsError, NoNodeError
    from kazoo.hosts import collect_hosts
    from kazoo.protocol.states import KazooState
    from kazoo.retry import KazooRetry
    from kazoo.security import ACL
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")

if TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:
    _LoggerAdapter = logging.LoggerAdapter

#: kazoo messages about a failed (re)connection attempt. While disconnected kazoo retries
#: about once a second and logs each failure; only the first of a run is kept at WARNING.
_RETRY_NOISE = (
    "Connection dropped",
    "Connection time-out",
    "Transition to CONNECTING",
    "Cannot resolve",
    "Failed connecting to Zookeeper",
)


class KazooLog(_LoggerAdapter):
    """kazoo's logger for one client: forwards to ``coordlock.kazoo``, keeps the negotiated
    session timeout from kazoo's "Session created" message (kazoo stores it nowhere else; the
    server may clamp the timeout asked for to its ``[min, max]SessionTimeout``), and logs only
    the first of a run of reconnection failures at WARNING (the rest at DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("coordlock.kazoo"), {})
        self.negotiated_ms: float | None = None
        self.quiet = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.INFO and not (type(msg) is str and msg.startswith("Session created")):
            # kazoo's chatter: several lines per request (BLATHER); only "Session created"
            # (also BLATHER) is read below
            if self.logger.isEnabledFor(level):
                super().log(level, msg, *args, **kwargs)
            return
        if isinstance(msg, str):
            if msg.startswith("Session created") and len(args) >= 3:
                with contextlib.suppress(TypeError, ValueError):
                    self.negotiated_ms = float(args[2])
            elif msg.startswith(_RETRY_NOISE) and level >= logging.WARNING:
                if self.quiet:
                    level = logging.DEBUG
                self.quiet = True
        super().log(level, msg, *args, **kwargs)


class Session:
    """A kazoo client and what coordlock knows about its session.

    ``timeout`` is the session timeout asked for (seconds); ``acl`` the ACL of every node this
    session creates (None: ZooKeeper's world ACL); ``on_state(state, at)`` is called on kazoo's
    thread for each connection state change (must not block).
    """

    def __init__(
        self,
        hosts: str,
        *,
        timeout: float,
        auth: tuple[str, str] | None,
        acl: list[ACL] | None,
        tls: TLS | None,
        on_state: Callable[[str, float], None],
    ) -> None:
        self.hosts = hosts
        self.timeout = timeout
        self.auth = auth
        self.acl = acl
        self.tls = tls
        self.op_timeout = max(timeout, 2.0)
        self._on_state = on_state
        self.closing = False
        self._new_client()

    def _new_client(self) -> None:
        self.pid = os.getpid()
        self.clock = ServerClock()
        self.connected = threading.Event()
        self.ever_connected = False
        self.kazoo_log = KazooLog()
        self.client = KazooClient(
            hosts=self.hosts,
            timeout=self.timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=1.0),
            auth_data=[("digest", f"{self.auth[0]}:{self.auth[1]}")] if self.auth else None,
            default_acl=self.acl,
            logger=self.kazoo_log,
            handler=PollingHandler(),
            **(self.tls.kazoo_options() if self.tls else {}),
        )
        self.client.add_listener(self._listener)

    def start(self) -> None:
        """Start connecting in the background (kazoo retries forever, backing off to 1 s)."""
        self.client.start_async()

    def _listener(self, state: str) -> None:
        """kazoo listener (kazoo's connection thread): never blocks."""
        if self.closing:
            return
        if state == KazooState.CONNECTED:
            self.ever_connected = True
            self.kazoo_log.quiet = False
            self.connected.set()
        else:
            self.connected.clear()
        self._on_state(state, time.monotonic())

    # -- fork ------------------------------------------------------------------------------

    def forked(self) -> bool:
        """True in a forked child that still has its parent's client."""
        return os.getpid() != self.pid

    def after_fork(self) -> None:
        """In a forked child: drop the parent's client without a word to the server, then
        start a new session. The parent's session and its nodes are untouched."""
        old = self.client
        connection = getattr(old, "_connection", None)
        for attr in ("_socket", "_read_sock", "_write_sock"):
            sock = getattr(connection, attr, None)
            if isinstance(sock, socket.socket):
                # close() only drops this process's descriptor (no shutdown(), and an
                # SSLSocket sends no close_notify without unwrap()): the parent's connection
                # stays up.
                with contextlib.suppress(OSError):
                    sock.close()
        self._new_client()
        self.start()
        log.info("zookeeper: forked child %d started its own session", self.pid)

    # -- requests --------------------------------------------------------------------------

    @property
    def negotiated_timeout(self) -> float:
        """The session timeout the server granted (seconds; the asked one until known)."""
        negotiated = self.kazoo_log.negotiated_ms
        return negotiated / 1000.0 if negotiated else self.timeout

    def session_id(self) -> int:
        client_id = self.client.client_id
        return int(client_id[0]) if client_id else 0

    def ready(self, wait: float = 1.0) -> None:
        """Return when connected; else, after up to ``wait`` s, raise ConfigurationError when
        the session never connected for a permanent cause (:meth:`diagnose`), or ConnectionLoss
        (transient: the caller's retry policy decides how long to keep trying)."""
        if self.connected.is_set():
            return
        if self.closing:
            raise ConfigurationError("the ZooKeeper coordinator is closed")
        if wait > 0 and self.connected.wait(wait):
            return
        if not self.ever_connected:
            problem = self.diagnose()
            if problem is not None:
                raise problem
        raise ConnectionLoss(f"no connection to ZooKeeper {self.hosts}")

    def get(self, result: Any, timeout: float | None = None) -> Any:
        """Wait for a kazoo async result (bounded by the operation timeout, seconds)."""
        return result.get(timeout=self.op_timeout if timeout is None else timeout)

    def children(self, parent: str) -> list[str]:
        """The children of ``parent`` ([] when it does not exist)."""
        try:
            return list(self.get(self.client.get_children_async(parent)))
        except NoNodeError:
            return []

    def refresh_clock(self, path: str) -> float:
        """Write the clock node ``path`` and note its server stamp (epoch ms, returned),
        anchored at the reply."""
        self.ready()
        try:
            stat = self.get(self.client.set_async(path, b""))
        except NoNodeError:
            with contextlib.suppress(NodeExistsError):
                self.get(self.client.create_async(path, b"", makepath=True))
            stat = self.get(self.client.set_async(path, b""))
        self.clock.note_reply(stat.mtime, time.monotonic())
        return float(stat.mtime)

    def version(self) -> str | None:
        """The server's version from the ``srvr`` four-letter word; None when the server does
        not allow it (``4lw.commands.whitelist``) or does not answer within a second."""
        try:
            client = self.client
            peer = client._connection._socket.getpeername()[:2]
            with socket.create_connection(peer, timeout=1.0) as raw:
                sock = self.tls.context().wrap_socket(raw) if self.tls else raw
                sock.settimeout(1.0)
                sock.sendall(b"srvr")
                reply = sock.recv(8192).decode("utf-8", "replace")
        except (OSError, AttributeError):
            return None
        for line in reply.splitlines():
            if line.startswith("Zookeeper version:"):
                version = line.split(":", 1)[1].split(",")[0].strip()
                return version.split("-${", 1)[0]  # Debian builds leave a template behind
        return None

    def server_now_ms(self, clock_path: str, *, refresh: bool = False) -> float:
        """A lower bound of server time now (epoch ms); with ``refresh``, a reading older than
        ``CLOCK_MAX_AGE`` is renewed first by a write (``-inf`` if there is no reading)."""
        if refresh and self.clock.stale():
            self.refresh_clock(clock_path)
        return self.clock.at_least_ms()

    # -- permanent failures ----------------------------------------------------------------

    def diagnose(self) -> ConfigurationError | None:
        """Why we cannot connect, when no retry can help: every host name unknown to DNS, or
        the TLS handshake refused (certificate not trusted, not a TLS port). None otherwise
        (refused, timed out: transient). Bounded: one lookup and one handshake per host,
        1 s each."""
        unknown = []
        reachable = []
        for host, port in collect_hosts(self.hosts)[0]:
            try:
                socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                reachable.append((host, port))
            except socket.gaierror as exc:
                if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                    unknown.append(f"{host} ({exc.strerror})")
                else:
                    return None  # DNS itself failing: may come back
        if unknown and not reachable:
            return ConfigurationError(f"no ZooKeeper host name resolves: {', '.join(unknown)}")
        if self.tls is None:
            return None
        context = self.tls.context()
        for host, port in reachable:
            try:
                with socket.create_connection((host, port), timeout=1.0) as raw:
                    with context.wrap_socket(raw, server_hostname=host) as tls:
                        # TLS 1.3 servers refuse a client certificate after the handshake:
                        # their alert arrives on the first read (ZooKeeper sends nothing else).
                        tls.settimeout(0.5)
                        tls.recv(1)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                continue  # the server hung up: may be restarting
            except ssl.SSLError as exc:
                return ConfigurationError(f"TLS handshake with ZooKeeper {host}:{port}: {exc}")
            except OSError:
                continue  # refused, timed out (also: nothing to read, the handshake worked)
        return None

    def close(self) -> None:
        """End the session (its ephemeral nodes go with it) and stop kazoo's threads."""
        self.closing = True
        if self.forked():
            return  # never close the parent's session from a child
        try:
            self.client.stop()
            self.client.close()
        except Exception:  # pragma: no cover - best effort
            log.exception("zookeeper: error while closing the client")
