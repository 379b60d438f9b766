"""Throwaway Redis Sentinel monitoring a :class:`~coordlock.testing.servers.RedisServer`."""

from __future__ import annotations

import re
import time
from typing import ClassVar

from ._common import INSTALL_HINT, ServerUnavailable
from ._install import _redis_binary
from ._managed import ManagedServer
from .redis import RedisReplyError, RedisServer, redis_command


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
