"""A loopback TCP forwarder that injects network faults between a client and one server port.

Put a :class:`FaultProxy` in front of a server, point the client at the proxy instead of the
server, and partition them at will::

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        client = redis.Redis.from_url(proxy.via(redis_server.url), socket_timeout=1)
        client.ping()
        proxy.freeze()      # silent partition: sockets stay open, no byte moves either way
        ...                 # the client times out; the server is fine
        proxy.heal()

Modes (one at a time; :meth:`heal` returns to plain forwarding):

``freeze()``
    A silent partition. No byte is read or written in either direction and every socket stays
    open, so neither side sees an error: only its own timeouts fire. A connection accepted
    while frozen completes the TCP handshake with the proxy but is not connected upstream
    until :meth:`heal` (the server never hears of it).
``drop()``
    Every current connection is reset (``SO_LINGER`` 0, so both peers get an RST, not a FIN)
    and every new one is reset at once, until :meth:`heal`.
``delay(ms)``
    Forwarding continues, but each chunk read from either side is written on to the other
    only ``ms`` milliseconds after it arrived (a floor: never earlier). Chunks keep their
    order; a stream of chunks is pipelined, not serialised, so throughput is not divided.

What :meth:`heal` does with bytes held back by a freeze (or still waiting out a delay): they
are **delivered, in order**. That is what TCP does when a partition heals before the peers
give up: the sender's kernel retransmits what was not acknowledged, and a TCP stream never
loses bytes from its middle (dropping them would hand the client a corrupt protocol stream,
a fault no network produces). While frozen the proxy reads nothing, so the bytes wait in the
kernel's socket buffers and a busy sender blocks, as on a real partition. A peer that gave up
during the freeze (closed its socket) is seen as a close once healed, and the close is passed
on. To model a partition that outlasted TCP's patience, call :meth:`drop` and then
:meth:`heal`: both peers see their connection reset.

Bounds: at most ``max_connections`` concurrent connections (more are reset on accept), at
most ``max_buffer`` bytes held per direction of a connection (then the proxy stops reading
from that side: back-pressure), two daemon threads per connection plus one accept thread;
:meth:`stop` resets every connection and joins every thread (bounded wait). Loopback only.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyStats"]

log = logging.getLogger("coordlock.testing.faultproxy")

_POLL = 0.05
"""Seconds a pump or the acceptor waits before looking at the mode again (also the bound on
how long an idle thread takes to notice :meth:`FaultProxy.stop`)."""

_CHUNK = 65536
"""Bytes read from a socket at once."""

FORWARD = "forward"
FREEZE = "freeze"
DROP = "drop"
STOPPED = "stopped"


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of a :class:`FaultProxy`'s counters.

    ``mode``: ``"forward"``, ``"freeze"``, ``"drop"`` or ``"stopped"`` (``"new"`` before
    :meth:`FaultProxy.start`); ``delay_ms``: the current added latency per chunk, in
    milliseconds; ``active``: connections open now; ``accepted``: connections accepted in
    total; ``resets``: connections reset by the proxy (``drop``, refused while dropped, over
    ``max_connections``, upstream refused, or ``stop``); ``bytes_to_server`` /
    ``bytes_to_client``: bytes forwarded so far in each direction.
    """

    mode: str
    delay_ms: float
    active: int
    accepted: int
    resets: int
    bytes_to_server: int
    bytes_to_client: int


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (``SO_LINGER`` on with a 0 s timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One client connection and, once connected, its upstream socket. Every state change
    happens under the proxy's lock; socket calls under that lock are non-blocking."""

    def __init__(self, number: int, client: socket.socket) -> None:
        self.number = number
        self.client = client
        self.server: socket.socket | None = None
        self.closed = False
        self.finished = 0  # directions that reached EOF and passed it on

    def reset(self) -> None:
        self.closed = True
        _reset(self.client)
        if self.server is not None:
            _reset(self.server)

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


class FaultProxy:
    """A TCP forwarder on ``listen_host`` (an ephemeral port unless ``listen_port`` is given)
    in front of ``target_host:target_port``, able to freeze, drop and delay the traffic.

    ``connect_timeout`` (seconds) bounds the upstream connect of each accepted connection; a
    failed upstream connect resets the client. ``max_connections`` and ``max_buffer`` (bytes
    per direction) bound what the proxy holds. Use as a context manager, or :meth:`start` then
    :meth:`stop`. Mode changes take effect before the method returns: after :meth:`freeze`
    returns, no further byte is forwarded; after :meth:`drop` returns, every connection that
    was open is reset.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
        max_connections: int = 64,
        max_buffer: int = 4 * 1024 * 1024,
    ) -> None:
        if not isinstance(target_host, str) or not target_host:
            raise TypeError(f"target_host must be a non-empty str, got {target_host!r}")
        for label, value, low in (
            ("target_port", target_port, 1),
            ("listen_port", listen_port, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be an int, got {value!r}")
            if not low <= value <= 65535:
                raise ValueError(f"{label} must be in {low}..65535, got {value}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
        if not isinstance(max_buffer, int) or max_buffer < _CHUNK:
            raise ValueError(f"max_buffer must be an int >= {_CHUNK}, got {max_buffer!r}")
        if not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.connect_timeout = float(connect_timeout)
        self.max_connections = max_connections
        self.max_buffer = max_buffer

        self._lock = threading.Lock()
        self._mode = "new"
        self._delay = 0.0  # seconds
        self._connections: dict[int, _Connection] = {}
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accepted = 0
        self._resets = 0
        self._bytes = [0, 0]  # to server, to client

    # ----------------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and start forwarding. Returns ``self``. Raises ``RuntimeError`` if started
        twice, ``OSError`` if the listen address cannot be bound."""
        with self._lock:
            if self._mode != "new":
                raise RuntimeError(f"FaultProxy already {self._mode}; build a new one")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.listen_host, self._listen_port))
                listener.listen(128)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                raise
            self._listener = listener
            self._listen_port = listener.getsockname()[1]
            self._mode = FORWARD
            self._spawn(self._accept_loop, "accept")
        log.debug("fault proxy %s -> %s:%d started", self.address, *self.target)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, reset every connection and join the threads (waiting at most
        ``timeout`` seconds in all). Idempotent."""
        with self._lock:
            if self._mode == STOPPED:
                return
            self._mode = STOPPED
            if self._listener is not None:
                with contextlib.suppress(OSError):
                    self._listener.close()
            self._reset_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:  # pragma: no cover - only under extreme load
            log.warning("fault proxy %s: threads still running after stop: %s", self, alive)

    close = stop

    def __enter__(self) -> FaultProxy:
        if self._mode == "new":
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.address} -> {self.target_host}:{self.target_port}, "
            f"{self._mode}, delay={self._delay * 1000:g}ms)"
        )

    # ----------------------------------------------------------------------------------------
    # addresses
    # ----------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        return self.listen_host

    @property
    def port(self) -> int:
        """The port the proxy listens on (known after :meth:`start`)."""
        if self._listen_port == 0:
            raise RuntimeError("FaultProxy not started: call start() first")
        return self._listen_port

    @property
    def address(self) -> str:
        """``host:port`` of the proxy, to put in a URL or a host list."""
        return f"{self.host}:{self.port}"

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` of the server behind the proxy."""
        return (self.target_host, self.target_port)

    def via(self, url: str) -> str:
        """``url`` with its ``host:port`` replaced by the proxy's, keeping scheme, userinfo,
        path and query: ``redis://127.0.0.1:6390/0?x=1`` -> ``redis://127.0.0.1:P/0?x=1``.
        Raises ``ValueError`` for a URL without a host or with several hosts (a ZooKeeper
        ensemble needs one proxy per member)."""
        parts = urlsplit(url)
        netloc = parts.netloc
        userinfo, _, hostport = netloc.rpartition("@")
        if not hostport or "," in hostport:
            raise ValueError(f"via() needs a URL with exactly one host:port, got {url!r}")
        new_netloc = f"{userinfo}@{self.address}" if userinfo else self.address
        return urlunsplit(parts._replace(netloc=new_netloc))

    # ----------------------------------------------------------------------------------------
    # faults
    # ----------------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop forwarding in both directions, keeping every socket open (silent partition).
        Bytes sent meanwhile are held and delivered by :meth:`heal`."""
        self._set_mode(FREEZE)

    def drop(self) -> None:
        """Reset every current connection (RST to both peers) and reset new ones until
        :meth:`heal`."""
        with self._lock:
            self._check_running()
            self._mode = DROP
            self._reset_all()
        log.debug("fault proxy %s: drop", self.address)

    def delay(self, ms: float) -> None:
        """Forward each chunk ``ms`` milliseconds (>= 0) after it arrived, in each direction.
        Also ends a freeze or a drop. Raises ``TypeError``/``ValueError`` on a bad ``ms``."""
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            raise TypeError(f"delay(ms) needs a number of milliseconds, got {ms!r}")
        if not ms >= 0 or ms == float("inf"):
            raise ValueError(f"delay(ms) needs a finite ms >= 0, got {ms!r}")
        with self._lock:
            self._check_running()
            self._delay = float(ms) / 1000.0
            self._mode = FORWARD
        log.debug("fault proxy %s: delay %gms", self.address, ms)

    def heal(self) -> None:
        """Back to plain forwarding: ends a freeze (held bytes are delivered, in order), a
        drop (new connections are forwarded again; reset ones stay reset) and any delay."""
        with self._lock:
            self._check_running()
            self._delay = 0.0
            self._mode = FORWARD
        log.debug("fault proxy %s: heal", self.address)

    @property
    def mode(self) -> str:
        """``"forward"``, ``"freeze"``, ``"drop"``, ``"stopped"`` (``"new"`` before start)."""
        return self._mode

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        with self._lock:
            return len(self._connections)

    @property
    def stats(self) -> ProxyStats:
        """A consistent snapshot of the counters (see :class:`ProxyStats`)."""
        with self._lock:
            return ProxyStats(
                mode=self._mode,
                delay_ms=self._delay * 1000.0,
                active=len(self._connections),
                accepted=self._accepted,
                resets=self._resets,
                bytes_to_server=self._bytes[0],
                bytes_to_client=self._bytes[1],
            )

    # ----------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._mode not in (FORWARD, FREEZE, DROP):
            raise RuntimeError(f"FaultProxy is {self._mode}: start() it first")

    def _set_mode(self, mode: str) -> None:
        with self._lock:
            self._check_running()
            self._mode = mode
        log.debug("fault proxy %s: %s", self.address, mode)

    def _reset_all(self) -> None:
        """Reset every connection (caller holds the lock)."""
        for conn in self._connections.values():
            conn.reset()
            self._resets += 1
        self._connections.clear()

    def _spawn(self, target: Callable[..., None], label: str, *args: object) -> None:
        """Start a daemon thread that forgets itself when done (caller holds the lock)."""

        def run() -> None:
            try:
                target(*args)
            except Exception:  # pragma: no cover - a bug in the proxy, not a network fault
                log.exception("fault proxy %s: %s thread failed", self._listen_port, label)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(
            target=run, name=f"coordlock-faultproxy-{self._listen_port}-{label}", daemon=True
        )
        self._threads.add(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while self._mode != STOPPED:
            try:
                ready, _, _ = select.select([listener], [], [], _POLL)
            except (OSError, ValueError):
                return  # closed by stop()
            if not ready:
                continue
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError:
                return
            with self._lock:
                self._accepted += 1
                if self._mode in (DROP, STOPPED) or len(self._connections) >= self.max_connections:
                    if self._mode == FORWARD or self._mode == FREEZE:
                        log.warning(
                            "fault proxy %s: over %d connections, resetting a new one",
                            self.address,
                            self.max_connections,
                        )
                    _reset(client)
                    self._resets += 1
                    continue
                conn = _Connection(self._accepted, client)
                self._connections[conn.number] = conn
                self._spawn(self._serve, f"conn{conn.number}", conn)

    def _forget(self, conn: _Connection, *, reset: bool) -> None:
        """Close ``conn`` (an RST if ``reset``) unless already closed (caller holds lock)."""
        if conn.closed:
            return
        if reset:
            conn.reset()
            self._resets += 1
        else:
            conn.close()
        self._connections.pop(conn.number, None)

    def _serve(self, conn: _Connection) -> None:
        """Connect upstream (once not frozen), then pump server-to-client in a second thread
        and client-to-server in this one."""
        while True:
            with self._lock:
                if conn.closed:
                    return
                if self._mode == FORWARD:
                    break
            time.sleep(_POLL)
        try:
            server = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError as exc:
            log.debug("fault proxy %s: upstream connect failed: %s", self.address, exc)
            with self._lock:
                self._forget(conn, reset=True)
            return
        with self._lock:
            if conn.closed:  # dropped or stopped while connecting
                _reset(server)
                return
            server.setblocking(False)
            conn.client.setblocking(False)
            conn.server = server
            self._spawn(self._pump, f"conn{conn.number}-down", conn, server, conn.client, 1)
        self._pump(conn, conn.client, server, 0)

    def _pump(
        self, conn: _Connection, src: socket.socket, dst: socket.socket, direction: int
    ) -> None:
        """Move bytes from ``src`` to ``dst`` while the proxy forwards; ``direction`` 0 is
        client-to-server, 1 server-to-client."""
        pending: collections.deque[tuple[float, bytes]] = collections.deque()
        held = 0
        eof = False
        while True:
            with self._lock:
                if conn.closed:
                    return
                mode = self._mode
            if mode != FORWARD:
                time.sleep(_POLL)  # frozen: neither read nor write; held bytes stay held
                continue
            now = time.monotonic()
            due = bool(pending) and pending[0][0] <= now
            readers = [src] if not eof and held < self.max_buffer else []
            writers = [dst] if due else []
            wait = _POLL if not pending or due else min(_POLL, pending[0][0] - now)
            try:
                readable, writable, _ = select.select(readers, writers, [], max(0.0, wait))
            except (OSError, ValueError):
                readable, writable = [], []  # closed under us: the check below ends the loop
            with self._lock:
                if conn.closed:
                    return
                if self._mode != FORWARD:
                    continue
                try:
                    if readable:
                        data = src.recv(_CHUNK)
                        if data:
                            pending.append((time.monotonic() + self._delay, data))
                            held += len(data)
                        else:
                            eof = True
                    if writable:
                        now = time.monotonic()
                        while pending and pending[0][0] <= now:
                            due_at, data = pending[0]
                            sent = dst.send(data)
                            self._bytes[direction] += sent
                            held -= sent
                            if sent < len(data):
                                pending[0] = (due_at, data[sent:])
                                break
                            pending.popleft()
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:  # a peer reset or vanished: pass the reset on
                    log.debug("fault proxy %s: connection %d: %s", self.address, conn.number, exc)
                    self._forget(conn, reset=True)
                    return
                if eof and not pending:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the FIN on
                    conn.finished += 1
                    if conn.finished == 2:
                        self._forget(conn, reset=False)
                    return
