"""Smoke tests of the throwaway-server harness (coordlock.testing.servers and the plugin).

Each server is started on a free loopback port, proven to answer a real command with the real
client library, crashed / restarted / paused where that matters, and finally proven gone: no
process left, port closed. Timeouts are short and bounded; nothing asserts wall-clock speed.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from kazoo.client import KazooClient
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from coordlock.testing.servers import (
    HOST,
    ManagedServer,
    PostgresServer,
    RedisServer,
    SentinelServer,
    ServerUnavailable,
    ZooKeeperEnsemble,
    ZooKeeperServer,
    free_port,
    port_is_open,
)
from coordlock.testing.servers._common import _process_state

pytest_plugins = ["pytester"]

PYTHON = sys.executable


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _listeners(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:
                continue
            if v6:
                found.add(f"v6:{address}")
            else:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def assert_free_loopback_port(port: int) -> None:
    assert 0 < port < 65536
    assert not _listeners(port), f"port {port} already has a listener"
    assert not port_is_open(port)


def assert_listens_on_loopback_only(server: ManagedServer) -> None:
    assert server.host == HOST == "127.0.0.1"
    assert _listeners(server.port) == {"127.0.0.1"}


def assert_gone(pid: int, port: int) -> None:
    assert _process_state(pid) in (None, "Z", "X"), f"pid {pid} still alive"
    assert not _listeners(port), f"port {port} still listening"
    assert not port_is_open(port)


def eventually(predicate: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def kazoo() -> Iterator[Callable[[str], KazooClient]]:
    clients: list[KazooClient] = []

    def connect(hosts: str) -> KazooClient:
        client = KazooClient(hosts=hosts, timeout=4.0, connection_retry={"max_tries": 3})
        client.start(timeout=10)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.stop()
        client.close()


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def test_free_port_is_a_free_loopback_port() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20  # never handed out twice
    for port in ports:
        assert_free_loopback_port(port)
        with socket.socket() as sock:
            sock.bind((HOST, port))


def test_redis_lifecycle() -> None:
    server = RedisServer()
    port = server.port
    assert_free_loopback_port(port)
    try:
        server.start()
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert_listens_on_loopback_only(server)
        client = redis.Redis(host=server.host, port=port, socket_timeout=2)
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        client.close()

        # crash: the process dies, the port closes; restart: same port, data lost (no persistence)
        pid = server.pid
        assert pid is not None
        server.kill()
        assert server.pid is None and not server.is_running()
        assert_gone(pid, port)
        server.start()
        assert server.port == port and server.pid != pid
        client = redis.Redis(host=server.host, port=port, socket_timeout=2)
        assert client.get("greeting") is None
        assert client.set("greeting", "again")

        # pause: the kernel still accepts, but nothing answers; resume: answers again
        server.pause()
        assert server.paused and _process_state(server.pid or 0) in ("T", "t")
        assert not server.ping(timeout=0.3)
        slow = redis.Redis(
            host=server.host, port=port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0)
        )
        with pytest.raises(redis.TimeoutError):
            slow.ping()
        slow.close()
        server.resume()
        assert server.ping(timeout=2.0)
        assert client.get("greeting") == b"again"
        client.close()

        # graceful restart keeps the port
        old_pid = server.pid
        server.restart()
        assert server.port == port and server.pid not in (None, old_pid)
        assert redis.Redis(host=server.host, port=port, socket_timeout=2).ping()

        pid = server.pid
        assert pid is not None
        server.stop()
        assert_gone(pid, port)
    finally:
        server.close()
    assert not server.workdir.exists()


def test_redis_persistence_survives_restart_and_crash() -> None:
    with RedisServer(persistence=True) as server:
        client = redis.Redis(host=server.host, port=server.port, socket_timeout=2)
        client.set("kept", "1")
        client.close()
        server.restart()
        client = redis.Redis(host=server.host, port=server.port, socket_timeout=2)
        assert client.get("kept") == b"1"
        client.set("kept", "2")
        client.close()
        server.restart(kill=True)
        client = redis.Redis(host=server.host, port=server.port, socket_timeout=2)
        assert client.get("kept") == b"2"
        client.close()


def test_sentinel_monitors_its_master() -> None:
    master = RedisServer()
    sentinel: SentinelServer | None = None
    try:
        master.start()
        sentinel = SentinelServer(master).start()
        assert sentinel.url == f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        assert_listens_on_loopback_only(sentinel)
        assert_listens_on_loopback_only(master)
        assert sentinel.master_address() == (HOST, master.port)
        assert sentinel.master_flags() == "master"

        client = Sentinel([(sentinel.host, sentinel.port)], socket_timeout=2).master_for(
            "mymaster", socket_timeout=2
        )
        assert client.set("via-sentinel", "yes")
        assert client.get("via-sentinel") == b"yes"
        client.close()

        # the sentinel really watches: a crashed master becomes subjectively down...
        master.kill()
        assert eventually(lambda: "s_down" in (sentinel.master_flags() or ""), within=15)
        # ...and is seen up again once restarted on the same port
        master.start()
        sentinel.wait_ready(15)
        assert sentinel.master_flags() == "master"

        pid, port = sentinel.pid, sentinel.port
        assert pid is not None
        sentinel.stop()
        assert_gone(pid, port)
    finally:
        if sentinel is not None:
            sentinel.close()
        master.close()


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _pg_connect(
    server: PostgresServer, application_name: str = "smoke"
) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        server.url, autocommit=True, connect_timeout=5, application_name=application_name
    )


def test_postgres_lifecycle() -> None:
    server = PostgresServer(fast=True, settings={"synchronous_commit": "on"})
    port = server.port
    assert_free_loopback_port(port)
    try:
        server.start()
        assert server.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert_listens_on_loopback_only(server)
        pid = server.pid
        assert pid is not None
        if os.geteuid() == 0:  # PostgreSQL refuses root: the harness runs it as postgres
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert int(uid_line.split()[1]) != 0

        with _pg_connect(server) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            settings = conn.execute(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'), "
                "current_setting('max_connections'), current_setting('listen_addresses')"
            ).fetchone()
            assert settings == ("off", "on", "300", "127.0.0.1")
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        assert server.psql("SELECT v FROM kept") == "42"

        # pg_terminate_backend of one named session
        victim = _pg_connect(server, application_name="smoke-victim")
        bystander = _pg_connect(server, application_name="smoke-bystander")
        assert server.terminate_backends(application_name="smoke-victim") == 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)

        # crash: postmaster AND backends die; restart: same port, committed data survives
        backend_pid = bystander.execute("SELECT pg_backend_pid()").fetchone()
        assert backend_pid is not None
        server.kill()
        assert_gone(pid, port)
        assert _process_state(int(str(backend_pid[0]))) in (None, "Z", "X")
        victim.close()
        bystander.close()
        server.start()
        assert server.port == port and server.pid != pid
        assert server.psql("SELECT v FROM kept") == "42"

        # pause stops the whole group: connections hang; resume: answers on the same connection
        conn = _pg_connect(server)
        server.pause()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url, connect_timeout=2).close()
        server.resume()
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.close()

        server.restart()
        assert server.port == port
        assert server.psql("SELECT count(*) FROM kept") == "1"

        pid = server.pid
        assert pid is not None
        server.stop()
        assert_gone(pid, port)
    finally:
        server.close()
    assert not server.workdir.exists()


def test_postgres_default_keeps_fsync_on() -> None:
    with PostgresServer() as server:
        assert server.psql("SHOW fsync") == "on"
        assert server.psql("SHOW synchronous_commit") == "on"


# --------------------------------------------------------------------------------------------
# ZooKeeper
# --------------------------------------------------------------------------------------------


def test_zookeeper_lifecycle(kazoo: Callable[[str], KazooClient]) -> None:
    server = ZooKeeperServer(tick_ms=200)
    port = server.port
    assert_free_loopback_port(port)
    try:
        server.start()
        assert server.url == f"zookeeper://127.0.0.1:{port}"
        assert_listens_on_loopback_only(server)
        assert server.mode() == "standalone"
        assert server.four_letter("ruok") == "imok"
        assert "-Dzookeeper.extendedTypesEnabled=true" in Path(
            f"/proc/{server.pid}/cmdline"
        ).read_text().split("\0")

        client = kazoo(server.hosts)
        client.create("/smoke", b"hello")
        assert client.get("/smoke")[0] == b"hello"
        client.stop()

        pid = server.pid
        assert pid is not None
        server.kill()
        assert_gone(pid, port)
        server.start()
        assert server.port == port and server.pid != pid
        client = kazoo(server.hosts)
        assert client.get("/smoke")[0] == b"hello"  # ZooKeeper keeps its data dir
        client.stop()

        server.pause()
        assert not server.ping(timeout=0.3)
        server.resume()
        assert server.ping(timeout=2.0)

        server.restart()
        assert server.port == port and server.mode() == "standalone"

        pid = server.pid
        assert pid is not None
        server.stop()
        assert_gone(pid, port)
    finally:
        server.close()
    assert not server.workdir.exists()


def test_zookeeper_ensemble(kazoo: Callable[[str], KazooClient]) -> None:
    ensemble = ZooKeeperEnsemble(3)
    ports = ensemble.ports
    assert len(set(ports)) == 3
    for port in ports:
        assert_free_loopback_port(port)
    try:
        ensemble.start()
        assert ensemble.url == "zookeeper://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        for member in ensemble.members:
            assert_listens_on_loopback_only(member)
        leader = ensemble.leader()
        assert len(ensemble.followers()) == 2

        client = kazoo(ensemble.hosts)
        client.create("/replicated", b"v1")
        client.stop()

        # kill the leader: the other two elect a new one and still serve the data
        old_pid = leader.pid
        assert old_pid is not None
        leader.kill()
        assert_gone(old_pid, leader.port)
        new_leader = ensemble.wait_quorum(30)
        assert new_leader is not leader
        client = kazoo(new_leader.hosts)
        assert client.get("/replicated")[0] == b"v1"
        client.set("/replicated", b"v2")
        client.stop()

        # the old leader comes back on its port and catches up as a follower
        leader.start()
        assert leader.port == ports[ensemble.members.index(leader)]
        ensemble.wait_quorum(30)
        assert leader.mode() == "follower"
        client = kazoo(leader.hosts)
        client.sync("/replicated")
        assert client.get("/replicated")[0] == b"v2"
        client.stop()

        # a paused member does not answer; resumed, it serves again
        follower = ensemble.followers()[0]
        follower.pause()
        assert not follower.ping(timeout=0.3)
        follower.resume()
        ensemble.wait_quorum(30)

        pids = [member.pid for member in ensemble.members]
        ensemble.stop()
        for pid, port in zip(pids, ports, strict=True):
            assert pid is not None
            assert_gone(pid, port)
    finally:
        ensemble.close()
    assert not any(member.workdir.exists() for member in ensemble.members)


# --------------------------------------------------------------------------------------------
# no server is left behind
# --------------------------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line within {timeout}s")


def test_server_dies_with_its_parent() -> None:
    """A SIGKILLed owner (e.g. a crashed xdist worker) takes its servers with it."""
    script = textwrap.dedent(
        """
        import time
        from coordlock.testing.servers import RedisServer
        server = RedisServer().start()
        print("SERVER", server.pid, server.port, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen(
        [PYTHON, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        _, pid, port = _read_line(owner, "SERVER", 30).split()
        assert port_is_open(int(port))
        owner.kill()
        owner.wait(10)
        assert eventually(lambda: _process_state(int(pid)) in (None, "Z", "X"), within=10)
        assert eventually(lambda: not port_is_open(int(port)), within=10)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


def test_command_line_prints_url_and_stops_on_sigint() -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "coordlock.testing.servers", "redis"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = _read_line(proc, "URL=", 30)
        url = line.removeprefix("URL=")
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        client = redis.Redis.from_url(url, socket_timeout=2)
        assert client.ping()
        client.close()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not _listeners(port) and not port_is_open(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_missing_binaries_raise_server_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDLOCK_PG_BINDIR", "/nonexistent")
    monkeypatch.setenv("COORDLOCK_NO_INSTALL", "1")
    from coordlock.testing.servers import _install

    monkeypatch.setattr(_install, "_install_failures", {})
    server = PostgresServer()
    try:
        with pytest.raises(ServerUnavailable, match="apt-get install -y redis-server postgresql"):
            server.start()
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# the pytest plugin
# --------------------------------------------------------------------------------------------


def _plugin_args() -> list[str]:
    # The plugin is opt-in: a pytest run outside this project loads it only when asked.
    return ["-p", "no:cacheprovider", "-p", "no:xdist", "-p", "coordlock.testing.plugin"]


PLUGIN_PROBE = """
import re
import pytest

def test_url(backend_name, backend_url):
    patterns = {
        "memory": r"memory://t-[0-9a-f]{32}",
        "sqlite": r"sqlite:////.+/locks\\.db",
        "redis": r"redis://127\\.0\\.0\\.1:\\d+/0\\?prefix=t-[0-9a-f]{32}:",
        "postgres": r"postgresql://postgres@127\\.0\\.0\\.1:\\d+/postgres\\?schema=t_[0-9a-f]{32}",
        "zookeeper": r"zookeeper://127\\.0\\.0\\.1:\\d+/t-[0-9a-f]{32}",
    }
    assert re.fullmatch(patterns[backend_name], backend_url), backend_url

@pytest.mark.coordlock_soak
def test_soak():
    pass
"""


def test_plugin_parametrizes_backend_urls(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COORDLOCK_TEST_BACKENDS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_probe=PLUGIN_PROBE)
    result = pytester.runpytest_subprocess(
        *_plugin_args(),
        "-rs",
        "--coordlock-backends=memory,sqlite,redis,postgres,zookeeper",
        timeout=240,
    )
    result.assert_outcomes(passed=5, skipped=1)
    result.stdout.fnmatch_lines(["*soak test: opt in with --coordlock-soak*"])
    verbose = pytester.runpytest_subprocess(
        *_plugin_args(), "-v", "--coordlock-soak", "--coordlock-backends=memory,sqlite", timeout=120
    )
    verbose.assert_outcomes(passed=3)
    verbose.stdout.fnmatch_lines(["*test_url?memory? PASSED*", "*test_url?sqlite? PASSED*"])


def test_plugin_env_overrides_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDLOCK_TEST_BACKENDS", "memory")
    pytester.makepyfile(test_probe=PLUGIN_PROBE)
    result = pytester.runpytest_subprocess(
        *_plugin_args(), "--coordlock-backends=sqlite", timeout=120
    )
    result.assert_outcomes(passed=1, skipped=1)


@pytest.mark.parametrize("ci", ["", "true"])
def test_plugin_missing_server_skips_or_fails_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.delenv("COORDLOCK_TEST_BACKENDS", raising=False)
    monkeypatch.setenv("COORDLOCK_PG_BINDIR", "/nonexistent")
    monkeypatch.setenv("COORDLOCK_NO_INSTALL", "1")
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_probe=PLUGIN_PROBE)
    result = pytester.runpytest_subprocess(
        *_plugin_args(), "--coordlock-backends=postgres", timeout=120
    )
    if ci:
        result.assert_outcomes(errors=1, skipped=1)
        result.stdout.fnmatch_lines(["*a missing server is a failure*"])
    else:
        result.assert_outcomes(skipped=2)
