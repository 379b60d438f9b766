"""Throwaway Redis: a raw RESP client (no driver needed) and :class:`RedisServer`."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import ClassVar, TypeAlias

from ._common import HOST, INSTALL_HINT, ServerUnavailable
from ._install import _redis_binary
from ._managed import ManagedServer

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
