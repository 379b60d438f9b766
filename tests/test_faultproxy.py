"""The fault proxy (coordlock.testing.faultproxy) in front of a real throwaway Redis.

Every check is causal or a lower bound the proxy guarantees by construction (a delayed chunk is
never forwarded early), never an upper bound on wall-clock time: "no reply yet" is only
asserted while the proxy is frozen or dropped, where a correct proxy can never answer.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from coordlock.testing.contract import PATIENCE, eventually
from coordlock.testing.faultproxy import FaultProxy
from coordlock.testing.servers import HOST, RedisServer

MakeProxy = Callable[..., FaultProxy]


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    if redis_server.paused:
        redis_server.resume()
    return redis_server


@pytest.fixture
def proxy(fault_proxy: MakeProxy, server: RedisServer) -> FaultProxy:
    return fault_proxy(server.port)


@pytest.fixture
def clients() -> Iterator[Callable[..., redis.Redis]]:
    made: list[redis.Redis] = []

    def make(url: str, timeout: float = 1.0) -> redis.Redis:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def raw(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=PATIENCE)
    return sock


def reply_within(sock: socket.socket, seconds: float) -> bytes | None:
    """The first bytes ``sock`` receives within ``seconds``, or None if none came."""
    ready, _, _ = select.select([sock], [], [], seconds)
    return sock.recv(65536) if ready else None


def read_reply(sock: socket.socket, expected: bytes) -> bytes:
    """Read until ``expected`` bytes arrived (bounded by PATIENCE)."""
    data = b""
    deadline = time.monotonic() + PATIENCE
    while len(data) < len(expected) and time.monotonic() < deadline:
        chunk = reply_within(sock, deadline - time.monotonic())
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------------------------
# forwarding
# --------------------------------------------------------------------------------------------


def test_forwards_commands_and_large_values_intact(
    proxy: FaultProxy, server: RedisServer, clients: Callable[..., redis.Redis]
) -> None:
    client = clients(proxy.via(server.url))
    value = bytes(range(256)) * 8192  # 2 MiB: many chunks, both directions
    key = f"fp-{proxy.port}"
    assert client.set(key, value)
    assert client.get(key) == value
    direct = clients(server.url)
    assert direct.get(key) == value  # it really went to the server behind the proxy
    stats = proxy.stats
    assert stats.mode == "forward"
    assert stats.active == 1 and stats.accepted == 1 and stats.resets == 0
    assert stats.bytes_to_server > len(value) and stats.bytes_to_client > len(value)
    direct.delete(key)


def test_via_rewrites_only_host_and_port(proxy: FaultProxy) -> None:
    assert proxy.via("redis://127.0.0.1:1/3?prefix=a:") == f"redis://{proxy.address}/3?prefix=a:"
    assert (
        proxy.via("postgresql://u:pw@localhost:5/db?x=1")
        == f"postgresql://u:pw@{proxy.address}/db?x=1"
    )
    with pytest.raises(ValueError, match="one host"):
        proxy.via("zookeeper://127.0.0.1:1,127.0.0.1:2/x")


def test_client_close_is_passed_on(
    proxy: FaultProxy, server: RedisServer, clients: Callable[..., redis.Redis]
) -> None:
    sock = raw(proxy)
    sock.sendall(b"PING\r\n")
    assert read_reply(sock, b"+PONG\r\n") == b"+PONG\r\n"
    sock.close()
    assert eventually(lambda: proxy.connections == 0)
    assert proxy.stats.resets == 0


# --------------------------------------------------------------------------------------------
# freeze
# --------------------------------------------------------------------------------------------


def test_freeze_times_out_the_client_while_the_server_stays_fine(
    proxy: FaultProxy, server: RedisServer, clients: Callable[..., redis.Redis]
) -> None:
    client = clients(proxy.via(server.url), timeout=0.5)
    assert client.ping()
    name = f"frozen-{proxy.port}"
    client.client_setname(name)
    proxy.freeze()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    direct = clients(server.url)
    assert direct.ping()
    # The frozen connection is still open on the server and in the proxy: a silent partition.
    assert any(c["name"] == name for c in direct.client_list())
    assert proxy.stats.mode == "freeze" and proxy.connections >= 1
    # A connection opened while frozen reaches nobody.
    late = clients(proxy.via(server.url), timeout=0.5)
    with pytest.raises(redis.TimeoutError):
        late.ping()
    proxy.heal()
    fresh = clients(proxy.via(server.url))
    assert fresh.ping()


def test_bytes_held_by_a_freeze_are_delivered_in_order_on_heal(
    proxy: FaultProxy, server: RedisServer
) -> None:
    sock = raw(proxy)
    sock.sendall(b"PING\r\n")
    assert read_reply(sock, b"+PONG\r\n") == b"+PONG\r\n"
    proxy.freeze()
    sock.sendall(b"ECHO one\r\nECHO two\r\n")
    assert reply_within(sock, 0.3) is None  # frozen: a correct proxy can never answer
    proxy.heal()
    expected = b"$3\r\none\r\n$3\r\ntwo\r\n"
    assert read_reply(sock, expected) == expected
    sock.close()


# --------------------------------------------------------------------------------------------
# drop
# --------------------------------------------------------------------------------------------


def test_drop_resets_current_and_new_connections_until_heal(
    proxy: FaultProxy, server: RedisServer, clients: Callable[..., redis.Redis]
) -> None:
    client = clients(proxy.via(server.url))
    assert client.ping()
    sock = raw(proxy)
    sock.sendall(b"PING\r\n")
    assert read_reply(sock, b"+PONG\r\n") == b"+PONG\r\n"
    proxy.drop()
    assert proxy.connections == 0
    with pytest.raises(ConnectionResetError):  # an RST, not a polite FIN (b"")
        sock.settimeout(PATIENCE)
        sock.recv(16)
    sock.close()
    with pytest.raises(redis.ConnectionError):
        client.ping()  # the old connection was reset
    with pytest.raises(redis.ConnectionError):
        clients(proxy.via(server.url)).ping()  # a new one is reset too
    assert proxy.stats.resets >= 3
    assert clients(server.url).ping()  # the server never noticed
    proxy.heal()
    assert clients(proxy.via(server.url)).ping()


# --------------------------------------------------------------------------------------------
# delay
# --------------------------------------------------------------------------------------------


def test_delay_is_a_floor_each_way_and_keeps_order(
    proxy: FaultProxy, server: RedisServer, clients: Callable[..., redis.Redis]
) -> None:
    client = clients(proxy.via(server.url), timeout=PATIENCE)
    assert client.ping()  # connected before timing
    proxy.delay(200)
    assert proxy.stats.delay_ms == 200
    started = time.monotonic()
    assert client.ping()
    delayed = time.monotonic() - started
    # 200 ms each way is a floor the proxy enforces: the round trip cannot be shorter (a lower
    # bound by construction, so it cannot flake on a slow machine; no upper bound is checked).
    assert delayed >= 0.4

    # Pipelined commands come back complete and in order under delay.
    key = f"fp-order-{proxy.port}"
    pipe = client.pipeline(transaction=False)
    for _ in range(50):
        pipe.incr(key)
    assert pipe.execute() == list(range(1, 51))
    client.delete(key)

    proxy.heal()
    assert proxy.stats.delay_ms == 0
    assert client.ping()


def test_delayed_chunks_arrive_complete_in_order_and_never_early(
    proxy: FaultProxy, server: RedisServer
) -> None:
    # Ten chunks sent 20 ms apart under a 300 ms delay each way: every reply comes, in order,
    # and none before 600 ms after the first send.
    proxy.delay(300)
    sock = raw(proxy)
    started = time.monotonic()
    for i in range(10):
        sock.sendall(f"ECHO {i}\r\n".encode())
        time.sleep(0.02)
    expected = b"".join(f"$1\r\n{i}\r\n".encode() for i in range(10))
    assert read_reply(sock, expected) == expected
    assert time.monotonic() - started >= 0.6
    sock.close()


# --------------------------------------------------------------------------------------------
# lifecycle, bounds and bad input
# --------------------------------------------------------------------------------------------


def proxy_threads(port: int) -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith(f"coordlock-faultproxy-{port}-")
    ]


def test_stop_resets_connections_closes_the_port_and_ends_threads(server: RedisServer) -> None:
    with FaultProxy(HOST, server.port) as proxy:
        port = proxy.port
        sock = raw(proxy)
        sock.sendall(b"PING\r\n")
        assert read_reply(sock, b"+PONG\r\n") == b"+PONG\r\n"
        assert proxy_threads(port)
    assert proxy.mode == "stopped"
    sock.settimeout(PATIENCE)
    with pytest.raises(ConnectionResetError):
        sock.recv(16)
    sock.close()
    assert proxy_threads(port) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=PATIENCE).close()
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError):
        proxy.freeze()


def test_connections_over_the_bound_are_reset(fault_proxy: MakeProxy, server: RedisServer) -> None:
    proxy = fault_proxy(server.port, max_connections=2)
    kept = [raw(proxy) for _ in range(2)]
    for sock in kept:
        sock.sendall(b"PING\r\n")
        assert read_reply(sock, b"+PONG\r\n") == b"+PONG\r\n"
    # The reset may already hit the connect: on loopback the kernel completes the handshake
    # and the proxy can accept and reset before connect() reads the socket's status.
    with pytest.raises(ConnectionResetError), raw(proxy) as extra:
        extra.sendall(b"PING\r\n")
        extra.recv(16)
    assert proxy.connections == 2
    for sock in kept:
        sock.close()


def test_unreachable_target_resets_the_client(fault_proxy: MakeProxy) -> None:
    from coordlock.testing.servers import free_port

    proxy = fault_proxy(free_port())  # nobody listens there
    with pytest.raises(ConnectionResetError), raw(proxy) as sock:  # at connect, or at recv
        sock.recv(16)


def test_bad_input_is_refused_at_the_call(server: RedisServer) -> None:
    with pytest.raises(ValueError, match="target_port"):
        FaultProxy(HOST, 0)
    with pytest.raises(TypeError, match="target_port"):
        FaultProxy(HOST, "6379")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        FaultProxy(HOST, server.port, max_connections=0)
    proxy = FaultProxy(HOST, server.port)
    with pytest.raises(RuntimeError, match="start"):
        _ = proxy.port
    with pytest.raises(RuntimeError, match="start"):
        proxy.freeze()
    with proxy:
        with pytest.raises(ValueError, match="ms >= 0"):
            proxy.delay(-1)
        with pytest.raises(ValueError):
            proxy.delay(float("nan"))
        with pytest.raises(TypeError, match="milliseconds"):
            proxy.delay("200")  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="already"):
            proxy.start()
