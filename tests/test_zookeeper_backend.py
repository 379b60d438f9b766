"""ZooKeeper backend specifics, against a real ZooKeeper (the shared ``zookeeper_server``).

The shared contract suite (tests/test_contract.py) covers the common behaviours; this file
covers what only ZooKeeper has: the node layout and czxid fences, the uncontended fast path,
orphan-node recovery by GUID, connection states wired to leases (through a loopback TCP proxy
that can cut the connection), session loss, waiters watching only their predecessor, claims
and their cleanup, lock-directory sweeping, bounded history. Every wait is bounded; nothing
asserts wall-clock speed.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss

import coordlock
from coordlock import ConfigurationError, Lease
from coordlock._protocol import RunRecord
from coordlock.backends.zookeeper import ZooKeeperCoordinator, _claims, _layout, escape
from coordlock.testing.contract import PATIENCE, eventually
from coordlock.testing.servers import ZooKeeperServer

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class CuttableProxy:
    """A loopback TCP proxy in front of ZooKeeper that can drop every connection and refuse new
    ones (``cut``) until ``restore``: a network outage between one client and the server."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.up = True
        self.closed = False
        self.cuts = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while self.up:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if sock is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Drop every proxied connection now and refuse new ones."""
        self.up = False
        self.cuts += 1
        with self._lock:
            for pair in self._pairs:
                for sock in pair:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            self._pairs.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


class _LostReply:
    """A kazoo async result whose request reached the server but whose reply was lost."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.real.get(timeout=timeout)  # the server did apply it...
        raise ConnectionLoss("simulated: reply lost on a connection drop")  # ...we never heard

    def rawlink(self, callback: Callable[[Any], None]) -> None:
        self.real.rawlink(callback)


def lose_reply_of_first(client: KazooClient, method: str, contains: str) -> list[str]:
    """Patch ``client.<method>`` so that its first call on a path containing ``contains`` is
    applied by the server but reports ConnectionLoss. Returns the list of affected paths."""
    original = getattr(client, method)
    hit: list[str] = []

    def patched(path: str, *args: Any, **kwargs: Any) -> Any:
        result = original(path, *args, **kwargs)
        if contains in path and not hit:
            hit.append(path)
            return _LostReply(result)
        return result

    setattr(client, method, patched)
    return hit


def expire_session(coordinator: ZooKeeperCoordinator, hosts: str) -> None:
    """Expire the coordinator's session the way ZooKeeper's own tests do: another client
    attaches to the same session and closes it."""
    twin = KazooClient(hosts=hosts, client_id=coordinator._client.client_id)
    twin.start(timeout=15)
    twin.stop()
    twin.close()


def holder_path(kz: KazooClient, coordinator: ZooKeeperCoordinator, name: str) -> list[str]:
    parent = f"{coordinator.root}/locks/{escape(name)}"
    return sorted(kz.get_children(parent)) if kz.exists(parent) else []


def states_of(lease: Lease) -> list[str]:
    seen: list[str] = []
    lease.on_state(lambda _lease, state: seen.append(state))
    return seen


@pytest.fixture
def zk_url(zookeeper_server: ZooKeeperServer) -> str:
    if zookeeper_server.paused:
        zookeeper_server.resume()
    return f"{zookeeper_server.url}/t-{uuid.uuid4().hex}"


@pytest.fixture
def make(zk_url: str) -> Iterator[Callable[..., ZooKeeperCoordinator]]:
    """Build coordinators on this test's chroot (``url=`` overrides); all closed afterwards."""
    made: list[ZooKeeperCoordinator] = []

    def build(url: str | None = None, **options: Any) -> ZooKeeperCoordinator:
        coordinator = coordlock.connect(url or zk_url, **options)
        assert isinstance(coordinator, ZooKeeperCoordinator)
        made.append(coordinator)
        return coordinator

    yield build
    for coordinator in made:
        coordinator.close()


@pytest.fixture
def kz(zookeeper_server: ZooKeeperServer) -> Iterator[KazooClient]:
    client = KazooClient(hosts=zookeeper_server.hosts)
    client.start(timeout=30)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def proxy(zookeeper_server: ZooKeeperServer) -> Iterator[CuttableProxy]:
    p = CuttableProxy(zookeeper_server.port)
    yield p
    p.close()


def via(proxy: CuttableProxy, zk_url: str, **query: object) -> str:
    chroot = zk_url.rsplit("/", 1)[1]
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"zookeeper://127.0.0.1:{proxy.port}/{chroot}" + (f"?{q}" if q else "")


# --------------------------------------------------------------------------------------------
# URL, names, ordering (no server round trips needed)
# --------------------------------------------------------------------------------------------


def test_url_options_and_errors(zookeeper_server: ZooKeeperServer) -> None:
    base = zookeeper_server.url
    c = coordlock.connect(f"{base}/app/x?session_timeout=7s&sweep_interval=0&history_limit=9")
    try:
        assert isinstance(c, ZooKeeperCoordinator)
        assert c.chroot == "/app/x" and c.root == "/app/x/coordlock"
        assert c.session_timeout == 7 and c.sweep_interval == 0 and c.history_limit == 9
    finally:
        c.close()
    c = coordlock.connect(f"{base}/a?session_timeout=7", session_timeout=3)
    try:
        assert isinstance(c, ZooKeeperCoordinator)
        assert c.session_timeout == 3  # keyword options win over the query
    finally:
        c.close()
    with pytest.raises(ConfigurationError, match="bogus"):
        coordlock.connect(f"{base}/a?bogus=1")
    with pytest.raises(ConfigurationError, match="frobnicate"):
        coordlock.connect(base, frobnicate=True)
    with pytest.raises(ConfigurationError, match="chroot"):
        coordlock.connect(f"{base}/a//b")
    with pytest.raises(ConfigurationError):
        coordlock.connect("zookeeper://h1:notaport/x")
    with pytest.raises(ConfigurationError):
        coordlock.connect("zookeeper:///only-a-path")
    with pytest.raises(ConfigurationError):
        coordlock.connect(f"{base}?session_timeout=soon")
    with pytest.raises(ConfigurationError):
        ZooKeeperCoordinator.from_url("redis://127.0.0.1:1")


def test_grace_follows_the_negotiated_session_timeout(
    make: Callable[..., ZooKeeperCoordinator],
) -> None:
    # The harness server clamps sessions to [0.4 s, 60 s]: asking for 100 s gets 60 s.
    c = make(session_timeout=100)
    assert c.acquire("grace", 10) is not None  # connected, so the session was negotiated
    assert c._states.grace() == pytest.approx(60 / 3)


def test_escape_keeps_names_apart_and_safe() -> None:
    names = ["a/b", "a%2Fb", ".", "..", "ünïcødé ☃", " lead", "x" * 512, "a\\b"]
    escaped = [escape(n) for n in names]
    assert len(set(escaped)) == len(names)
    for name, node in zip(names, escaped, strict=True):
        assert "/" not in node and node not in (".", "..")
        assert unquote(node) == name


def test_sequence_order_survives_the_32_bit_wrap() -> None:
    # ZooKeeper's per-directory counter is a signed 32-bit int that wraps to negative.
    created = [2**31 - 2, 2**31 - 1, -(2**31), -(2**31) + 1]
    children = [f"{uuid.uuid4().hex}-lock-{seq:010d}" for seq in created]
    for ref in created:
        order = [child for _, child in _layout.ordered(reversed(children), ref)]
        assert order == children
    assert _layout.ordered(["not-a-lock-node", "zookeeper"], 0) == []


# --------------------------------------------------------------------------------------------
# layout, fences, fast path
# --------------------------------------------------------------------------------------------


def test_node_layout_and_czxid_fence(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient
) -> None:
    c = make()
    name = "reports/nightly run"
    lease = c.acquire(name, 10)
    assert lease is not None
    children = holder_path(kz, c, name)
    assert len(children) == 1 and children[0].startswith(lease.owner + "-lock-")
    stat = kz.exists(f"{c.root}/locks/{escape(name)}/{children[0]}")
    assert stat.ephemeralOwner == c._client.client_id[0]  # ephemeral, of our session
    assert stat.czxid == lease.fence  # the fence is the creation zxid of our node
    data, _ = kz.get(f"{c.root}/locks/{escape(name)}/{children[0]}")
    assert data == b"10000"  # the lease ttl, in ms
    assert lease.release()
    assert holder_path(kz, c, name) == []


def test_fences_increase_across_names_clients_and_waiters(
    make: Callable[..., ZooKeeperCoordinator],
) -> None:
    a, b = make(), make()
    fences: list[int] = []
    for i in range(10):
        c = (a, b)[i % 2]
        lease = c.acquire("fenced", 10, wait=PATIENCE)
        assert lease is not None
        fences.append(lease.fence)
        other = c.acquire("other-name", 10)
        assert other is not None and other.fence > lease.fence  # one zxid order for all names
        other.release()
        lease.release()
    assert fences == sorted(fences) and len(set(fences)) == len(fences)


def test_try_acquire_is_idempotent_per_owner(make: Callable[..., ZooKeeperCoordinator]) -> None:
    c = make()
    owner = uuid.uuid4().hex
    first = c._try_acquire("idem", owner, 10, None)
    assert first.fence is not None
    # A retry of the same first attempt (no ticket yet: its reply was lost) finds the node.
    assert c._try_acquire("idem", owner, 10, None).fence == first.fence
    assert c._try_acquire("idem", owner, 10, first.ticket).fence == first.fence
    assert c._extend("idem", owner, 10) is True
    assert c._release("idem", owner) is True
    assert c._release("idem", owner) is False


def test_uncontended_fast_path_skips_the_children_read(
    make: Callable[..., ZooKeeperCoordinator],
) -> None:
    c = make()
    calls: dict[str, int] = {}
    client = c._client
    for method in ("create_async", "get_children_async", "delete_async"):
        original = getattr(client, method)

        def counted(*args: Any, _m: str = method, _o: Any = original, **kwargs: Any) -> Any:
            calls[_m] = calls.get(_m, 0) + 1
            return _o(*args, **kwargs)

        setattr(client, method, counted)
    for _ in range(20):
        lease = c.acquire("fast", 30)
        assert lease is not None
        assert lease.release()
    assert calls["delete_async"] == 20
    assert calls.get("get_children_async", 0) <= 3  # the first pairs, before the dir is quiet


def test_fast_path_sees_other_clients(make: Callable[..., ZooKeeperCoordinator]) -> None:
    a, b = make(), make()
    lease = a.acquire("quiet", 10)
    assert lease is not None and lease.release()  # a now expects the directory to be quiet
    theirs = b.acquire("quiet", 10)
    assert theirs is not None
    assert a.acquire("quiet", 10) is None  # the sequence number told a it was not quiet
    assert theirs.release()
    ours = a.acquire("quiet", 10)
    assert ours is not None and ours.fence > theirs.fence
    assert ours.release()
    between = b.acquire("quiet", 10)  # someone came and went while a was away
    assert between is not None and between.release()
    again = a.acquire("quiet", 10)
    assert again is not None and again.fence > between.fence
    assert again.release()


def test_threads_share_one_coordinator(make: Callable[..., ZooKeeperCoordinator]) -> None:
    c = make()
    inside = threading.Lock()
    overlaps: list[int] = []
    fences: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(15):
                lease = c.acquire("shared", 10, wait=PATIENCE)
                assert lease is not None
                if not inside.acquire(blocking=False):
                    overlaps.append(lease.fence)
                    continue
                fences.append(lease.fence)
                inside.release()
                assert lease.release()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE * 4)
    assert not errors and not overlaps
    assert len(fences) == 60 and fences == sorted(fences)


# --------------------------------------------------------------------------------------------
# waiters
# --------------------------------------------------------------------------------------------


def _watched_paths(server: ZooKeeperServer) -> dict[str, int]:
    """path -> number of sessions watching it, from the ``wchp`` four-letter word."""
    watched: dict[str, int] = {}
    current = None
    for line in server.four_letter("wchp", timeout=5).splitlines():
        if line.startswith("/"):
            current = line.strip()
            watched[current] = 0
        elif line.strip().startswith("0x") and current is not None:
            watched[current] += 1
    return watched


def test_waiters_queue_in_order_and_watch_only_their_predecessor(
    make: Callable[..., ZooKeeperCoordinator],
    kz: KazooClient,
    zookeeper_server: ZooKeeperServer,
) -> None:
    holder = make()
    lease = holder.acquire("queue", 30)
    assert lease is not None
    order: list[int] = []
    got: list[Lease] = []
    threads = []
    waiters = [make() for _ in range(4)]
    parent = f"{holder.root}/locks/{escape('queue')}"
    for i, w in enumerate(waiters):

        def wait(w: ZooKeeperCoordinator = w, i: int = i) -> None:
            taken = w.acquire("queue", 30, wait=PATIENCE * 2)
            assert taken is not None
            order.append(i)
            got.append(taken)
            time.sleep(0.02)
            taken.release()

        t = threading.Thread(target=wait)
        t.start()
        threads.append(t)
        queued = i + 2
        assert eventually(lambda: len(kz.get_children(parent)) == queued)  # noqa: B023
    assert eventually(
        lambda: (
            sum(n for p, n in _watched_paths(zookeeper_server).items() if p.startswith(parent)) == 4
        )
    ), _watched_paths(zookeeper_server)
    watched = {p: n for p, n in _watched_paths(zookeeper_server).items() if p.startswith(parent)}
    assert all(n == 1 for n in watched.values())  # no herd: one watcher per node
    children = sorted(kz.get_children(parent), key=lambda c: int(c.rsplit("-", 1)[1]))
    assert set(watched) == {f"{parent}/{c}" for c in children[:-1]}  # each its predecessor
    assert lease.release()
    for t in threads:
        t.join(PATIENCE * 2)
    assert order == [0, 1, 2, 3]  # first come, first served
    assert [g.fence for g in got] == sorted(g.fence for g in got)


def test_waiter_gives_up_and_leaves_no_node(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient
) -> None:
    a, b = make(), make()
    lease = a.acquire("give-up", 30)
    assert lease is not None
    assert b.acquire("give-up", 10, wait=0.3) is None
    assert eventually(lambda: len(holder_path(kz, a, "give-up")) == 1)
    assert lease.release()
    assert a.acquire("give-up", 10) is not None


# --------------------------------------------------------------------------------------------
# orphans (kazoo #732): a create whose reply was lost
# --------------------------------------------------------------------------------------------


def test_lost_create_reply_is_recovered_by_guid(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient
) -> None:
    c = make()
    hit = lose_reply_of_first(c._client, "create_async", "-lock-")
    lease = c.acquire("orphan", 10)
    assert hit, "the fault was not injected"
    assert lease is not None
    children = holder_path(kz, c, "orphan")
    assert len(children) == 1 and children[0].startswith(lease.owner)  # adopted, not doubled
    stat = kz.exists(f"{c.root}/locks/{escape('orphan')}/{children[0]}")
    assert stat.czxid == lease.fence
    assert lease.release()
    assert holder_path(kz, c, "orphan") == []


def test_lost_create_reply_of_a_loser_leaves_no_orphan(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient
) -> None:
    a, b, c = make(), make(), make()
    lease = a.acquire("orphan2", 30)
    assert lease is not None
    hit = lose_reply_of_first(b._client, "create_async", "-lock-")
    assert b.acquire("orphan2", 10) is None
    assert hit, "the fault was not injected"
    assert eventually(lambda: len(holder_path(kz, a, "orphan2")) == 1)  # b's node is gone
    assert lease.release()
    taken = c.acquire("orphan2", 10)  # no orphan in front of it
    assert taken is not None and taken.release()


def test_first_attempt_that_never_got_a_reply_leaves_no_node(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient
) -> None:
    # The create lands but its reply is lost, and every retry fails until the retry deadline:
    # the core gives up without a ticket to abandon. The node must not stay in the queue.
    a = make(retry_deadline=0.5, sweep_interval=0)
    b = make()
    hit = lose_reply_of_first(a._client, "create_async", "-lock-")
    original = a._client.get_children_async

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionLoss("simulated: still no connection")

    a._client.get_children_async = refused  # the retry's search for its node by GUID fails
    with pytest.raises(coordlock.BackendUnavailable):
        a.acquire("stale-first", 10)
    assert hit, "the fault was not injected"
    a._client.get_children_async = original
    # The core's cleanup after a BackendUnavailable releases by owner (a lost reply may have
    # granted the lock); if the landed node survived that too, the worker drops it.
    left = len(holder_path(kz, a, "stale-first"))
    assert left <= 1
    assert a._locks.drop_stale(0.0) == left  # what the worker does after a reconnect / sweep
    a._locks.cleanup_orphans()
    assert holder_path(kz, a, "stale-first") == []
    taken = b.acquire("stale-first", 10)
    assert taken is not None and taken.release()


def test_orphan_whose_delete_failed_is_removed_after_reconnect(
    make: Callable[..., ZooKeeperCoordinator],
    kz: KazooClient,
    proxy: CuttableProxy,
    zk_url: str,
) -> None:
    a, c = make(), make()
    b = make(via(proxy, zk_url, session_timeout=15))
    lease = a.acquire("orphan3", 30)
    assert lease is not None
    original = b._client.delete_async

    class _FailedDelete:
        successful = staticmethod(lambda: False)
        exception = ConnectionLoss("simulated")

        def rawlink(self, callback: Callable[[Any], None]) -> None:
            callback(self)

    b._client.delete_async = lambda path, *a, **k: _FailedDelete()
    assert b.acquire("orphan3", 10, wait=0.2) is None  # queued, gave up, delete "failed"
    b._client.delete_async = original
    assert b._locks.orphans, "the orphan was not recorded"
    assert len(holder_path(kz, a, "orphan3")) == 2  # the orphan sits behind a's node
    proxy.cut()
    assert eventually(lambda: not b._session.connected.is_set())
    proxy.restore()
    assert eventually(lambda: not b._locks.orphans)  # found by GUID and deleted after reconnect
    assert len(holder_path(kz, a, "orphan3")) == 1
    assert lease.release()
    taken = c.acquire("orphan3", 10)
    assert taken is not None and taken.release()


# --------------------------------------------------------------------------------------------
# connection states
# --------------------------------------------------------------------------------------------


def test_suspended_then_connected_keeps_the_lease(
    make: Callable[..., ZooKeeperCoordinator], proxy: CuttableProxy, zk_url: str
) -> None:
    c = make(via(proxy, zk_url, session_timeout=15))  # grace: 5 s
    other = make()
    lease = c.acquire("suspend", 30)
    assert lease is not None
    seen = states_of(lease)
    proxy.cut()
    assert eventually(lambda: seen == ["at-risk"]), seen
    assert lease.at_risk and not lease.lost
    assert other.acquire("suspend", 10) is None  # the session still holds the node
    proxy.restore()
    assert eventually(lambda: seen == ["at-risk", "restored"]), seen
    assert not lease.at_risk and not lease.lost
    assert other.acquire("suspend", 10) is None
    assert lease.extend() is True
    assert lease.release() is True


def test_suspended_past_the_grace_is_lost_and_the_node_dropped(
    make: Callable[..., ZooKeeperCoordinator], proxy: CuttableProxy, zk_url: str
) -> None:
    c = make(via(proxy, zk_url, session_timeout=6))  # grace: 2 s, session 6 s
    other = make()
    lease = c.acquire("suspend-long", 60)
    assert lease is not None
    seen = states_of(lease)
    proxy.cut()
    assert eventually(lambda: seen == ["at-risk", "lost"]), seen
    assert "suspended" in lease.lost_reason
    proxy.restore()  # back before the session expired: the node is deleted, not left to ttl
    taken = None

    def take() -> bool:
        nonlocal taken
        taken = other.acquire("suspend-long", 10)
        return taken is not None

    assert eventually(take)
    assert taken is not None and taken.fence > lease.fence
    assert lease.release() is False
    assert taken.release()


def test_session_loss_marks_lost_at_once(
    make: Callable[..., ZooKeeperCoordinator], zookeeper_server: ZooKeeperServer
) -> None:
    c, other = make(), make()
    lease = c.acquire("expire", 60, renew=False)
    assert lease is not None
    seen = states_of(lease)
    expire_session(c, zookeeper_server.hosts)
    assert eventually(lambda: lease.lost), "LOST did not mark the lease lost"
    assert "LOST" in lease.lost_reason or "expired" in lease.lost_reason
    assert seen[-1] == "lost" and seen.count("lost") == 1
    taken = other.acquire("expire", 10)  # the ephemeral node went with the session
    assert taken is not None and taken.fence > lease.fence
    assert lease.release() is False
    taken.release()
    again = c.acquire("expire", 10)  # the coordinator carries on with a new session
    assert again is None or again.release()


def test_waiter_survives_session_loss(
    make: Callable[..., ZooKeeperCoordinator], zookeeper_server: ZooKeeperServer
) -> None:
    holder, waiter = make(), make()
    lease = holder.acquire("requeue", 30)
    assert lease is not None
    result: list[Lease | None] = []
    t = threading.Thread(target=lambda: result.append(waiter.acquire("requeue", 10, wait=30)))
    t.start()
    time.sleep(0.3)
    expire_session(waiter, zookeeper_server.hosts)
    assert eventually(lambda: waiter._states.session_id != 0 and waiter._session.connected.is_set())
    time.sleep(0.3)
    assert lease.release()
    t.join(PATIENCE * 2)
    assert result and result[0] is not None and result[0].fence > lease.fence
    result[0].release()


def test_close_ends_the_session_and_marks_leases_lost(
    make: Callable[..., ZooKeeperCoordinator],
) -> None:
    c, other = make(), make()
    lease = c.acquire("closing", 60)
    assert lease is not None
    c.close()
    assert lease.lost and "closed" in lease.lost_reason
    taken = other.acquire("closing", 10)  # no need to wait for the ttl
    assert taken is not None and taken.release()


# --------------------------------------------------------------------------------------------
# claims, sweeping, listing, history
# --------------------------------------------------------------------------------------------


def test_expired_claims_are_replaced_by_exactly_one(
    make: Callable[..., ZooKeeperCoordinator],
) -> None:
    a, b = make(), make()
    keys = [f"job{i}@2026-01-01T00:00:00Z" for i in range(20)]
    assert a.claim_many(keys, 0.3) == set(keys)
    assert (
        eventually(lambda: a.claim("probe-expiry", 0.3)) and a.claim("probe-expiry", 0.3) is False
    )
    time.sleep(0.4)
    won: dict[str, set[str]] = {}
    barrier = threading.Barrier(2)

    def race(name: str, c: ZooKeeperCoordinator) -> None:
        barrier.wait()
        won[name] = c.claim_many(keys, 30)

    threads = [threading.Thread(target=race, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE)
    assert won["a"] | won["b"] == set(keys) and not (won["a"] & won["b"])


def test_claim_with_a_lost_reply_is_still_won(make: Callable[..., ZooKeeperCoordinator]) -> None:
    a, b = make(), make()
    hit = lose_reply_of_first(a._client, "create_async", "claims")
    assert a.claim("lost-reply@t", 30) is True
    assert hit, "the fault was not injected"
    assert b.claim("lost-reply@t", 30) is False


def test_sweep_removes_expired_claims_only(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient
) -> None:
    c = make(sweep_interval=0)
    assert c.claim("short@t", 0.2) and c.claim("long@t", 60)
    assert eventually(
        lambda: c.sweep()["claims"] == 1 or not kz.exists(f"{c.root}/claims/{escape('short@t')}")
    )
    assert kz.get_children(f"{c.root}/claims") == [escape("long@t")]
    assert c.claim("long@t", 60) is False
    assert c.claim("short@t", 60) is True


def test_sweep_deletes_only_idle_lock_directories(
    make: Callable[..., ZooKeeperCoordinator], kz: KazooClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_claims, "LOCK_DIR_MIN_IDLE", 0.0)
    c = make(sweep_interval=0)
    idle = c.acquire("idle", 10)
    busy = c.acquire("busy", 10)
    assert idle is not None and busy is not None and idle.release()
    assert c.sweep()["lock_dirs"] == 0  # first sight of an empty directory: remembered only
    assert c.sweep()["lock_dirs"] == 1  # still empty and untouched: deleted
    assert not kz.exists(f"{c.root}/locks/{escape('idle')}")
    assert kz.exists(f"{c.root}/locks/{escape('busy')}")
    again = c.acquire("idle", 10)  # recreated on demand; the quiet fast path is not fooled
    assert again is not None and again.fence > idle.fence
    assert c.acquire("idle", 10) is None
    assert again.release() and busy.release()


def test_locks_listing(make: Callable[..., ZooKeeperCoordinator]) -> None:
    c, other = make(), make()
    lease = c.acquire("dir/with slash", 20)
    assert lease is not None
    waiter = threading.Thread(target=lambda: other.acquire("dir/with slash", 10, wait=0.5))
    waiter.start()
    short = c.acquire("short", 0.3, renew=False)
    assert short is not None
    infos = {i.name: i for i in other.locks()}
    held = infos["dir/with slash"]
    assert held.owner == lease.owner and held.fence == lease.fence
    assert held.expires_at is not None and abs(held.expires_at - lease.expires_at) < 5
    waiter.join(PATIENCE)
    assert eventually(lambda: "short" not in {i.name for i in other.locks()})  # expired
    assert lease.release()


def test_history_is_bounded_per_job(make: Callable[..., ZooKeeperCoordinator]) -> None:
    c = make(history_limit=5)
    base = time.time()
    for i in range(12):
        c.record_run(RunRecord(f"r{i}", "job/a", f"t{i}", "inst", base + i))
    c.record_run(RunRecord("r11", "job/a", "t11", "inst", base + 11, base + 12, "finished"))
    runs = c.history("job/a")
    assert [r.run_id for r in runs] == ["r11", "r10", "r9", "r8", "r7"]
    assert runs[0].status == "finished" and runs[0].finished == pytest.approx(base + 12)
    kz = c._client
    assert len(kz.get_children(f"{c.root}/runs/{escape('job/a')}")) <= 5 + 5 // 10 + 1
    assert c.history("nobody") == []
    with pytest.raises(ValueError):
        c.history(limit=0)


def test_history_reads_finished_rows_once(
    make: Callable[..., ZooKeeperCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZooKeeper has no index by time, so a listing reads rows to learn their start times; a
    row read as final before is read again only when it is among the newest asked for. The
    answer stays the same as reading everything: the newest first, new and changed rows seen."""
    c = make(history_limit=50)
    base = time.time()
    rows = [
        RunRecord(f"r{j}-{i}", f"job{j}", f"t{i}", "inst", base + 3 * i + j, base + 3 * i + j + 1,
                  "finished")
        for j in range(3) for i in range(10)
    ]  # fmt: skip
    c.record_runs(rows)
    c.record_runs([RunRecord("open", "job0", "t", "inst", base + 1)])  # running, oldest but one
    reads: list[str] = []
    real_get = c._client.get_async

    def counted_get(path: str, *args: Any) -> Any:
        reads.append(path)
        return real_get(path, *args)

    monkeypatch.setattr(c._client, "get_async", counted_get)

    newest = sorted([*rows, c.history("job0", 100)[-2]], key=lambda r: r.started, reverse=True)
    first = c.history(None, 5)
    assert [r.run_id for r in first] == [r.run_id for r in newest[:5]]
    assert len(reads) >= 31  # every row once
    reads.clear()
    again = c.history(None, 5)
    assert again == first
    assert len(reads) == 5 + 1  # the 5 newest final rows again, and the running one
    c.record_runs([RunRecord("open", "job0", "t", "inst", base + 100, base + 101, "failed")])
    c.record_run(RunRecord("new", "job2", "t", "inst", base + 50, base + 51, "finished"))
    assert [r.run_id for r in c.history(None, 3)] == ["open", "new", "r2-9"]
    kz = c._client
    kz.delete(f"{c.root}/runs/{escape('job2')}/{escape('new')}")
    assert [r.run_id for r in c.history(None, 2)] == ["open", "r2-9"]
    assert f"{c.root}/runs/{escape('job2')}/{escape('new')}" not in c._history._final


def test_history_batches_fix_wrong_guesses_and_stay_bounded(
    make: Callable[..., ZooKeeperCoordinator],
) -> None:
    """``record_runs`` pipelines one write per row; rows another client created (a create
    that finds the node) and rows trimmed since this client wrote them (a set that finds none)
    are written the other way; the job stays bounded."""
    mine, other = make(history_limit=5), make(history_limit=5)
    base = time.time()
    other.record_run(RunRecord("r0", "job/b", "t0", "other", base))  # exists: mine will create
    mine.record_runs([RunRecord("r1", "job/b", "t1", "inst", base + 1)])
    kz = mine._client
    kz.delete(f"{mine.root}/runs/{escape('job/b')}/r1")  # trimmed: mine will set
    rows = [RunRecord(f"r{i}", "job/b", f"t{i}", "inst", base + i, base + i + 0.5, "finished")
            for i in range(12)]  # fmt: skip
    mine.record_runs(rows)
    runs = mine.history("job/b", 100)
    assert len(kz.get_children(f"{mine.root}/runs/{escape('job/b')}")) <= 5 + 5 // 10 + 1
    assert [r.run_id for r in runs][:5] == ["r11", "r10", "r9", "r8", "r7"]
    assert all(r == rows[int(r.run_id[1:])] for r in runs)  # every row as given, r0 included
    mine.record_runs([RunRecord("r0", "job/b", "t0", "again", base + 20)])
    assert mine.history("job/b", 1)[0].instance == "again"


def test_claim_many_batches_fresh_keys_and_falls_back_per_key(
    make: Callable[..., ZooKeeperCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh keys go in multis of CLAIM_BATCH keys; a batch with one taken key falls back to
    the per-key round, which still wins every free key of it (and only those)."""
    monkeypatch.setattr(_claims, "CLAIM_BATCH", 40)
    first, second = make(), make()
    keys = [f"job{i}@2026-01-01T00:00:00Z" for i in range(130)]  # 4 batches, the last short
    taken = {keys[45], keys[90]}  # in batches 2 and 3
    assert second.claim_many(sorted(taken), 30) == taken
    batches: list[int] = []
    original = first._claims.claim_batches

    def counting(paths: dict[str, str], data: bytes, token: str) -> tuple[set[str], list[str]]:
        won, rest = original(paths, data, token)
        batches.append(len(rest))
        return won, rest

    monkeypatch.setattr(first._claims, "claim_batches", counting)
    assert first.claim_many(keys, 30) == set(keys) - taken
    assert batches == [80]  # the two batches holding a taken key were retried per key
    assert second.claim_many(keys, 30) == set()
    assert first.claim_many([f"fresh{i}" for i in range(100)], 30) == {
        f"fresh{i}" for i in range(100)
    }


def test_a_batch_lost_to_one_multi_costs_one_read(
    make: Callable[..., ZooKeeperCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances cut a tick's keys the same way: a batch another instance created in one
    multi is lost after reading one claim (its batch identity matches), not one per key; a
    batch claimed by other key sets, or expired, still goes key by key."""
    first, second = make(), make()
    assert second.claim("warm-up", 30)  # (the first claim of a chroot makes its directory)
    keys = [f"job{i}@2026-01-01T00:00:00Z" for i in range(50)]
    assert second.claim_many(keys, 30) == set(keys)
    left: list[list[str]] = []
    reads: list[str] = []
    original = first._claims.claim_batches
    real_get = first._client.get_async

    def counting(paths: dict[str, str], data: bytes, token: str) -> tuple[set[str], list[str]]:
        won, rest = original(paths, data, token)
        left.append(rest)
        return won, rest

    def get_async(path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        return real_get(path, *args, **kwargs)

    monkeypatch.setattr(first._claims, "claim_batches", counting)
    monkeypatch.setattr(first._client, "get_async", get_async)
    assert first.claim_many(keys, 30) == set()
    assert left == [[]] and len(reads) == 1  # one read decided the whole batch
    # a different key set (a superset) is not the batch that was created: key by key
    more = [*keys, "job50@2026-01-01T00:00:00Z"]
    assert first.claim_many(more, 30) == {"job50@2026-01-01T00:00:00Z"}
    assert sorted(left[-1]) == sorted(more)
    # an expired batch is replaced key by key
    short = [f"short{i}@2026-01-01T00:00:00Z" for i in range(10)]
    assert second.claim_many(short, 0.2) == set(short)
    time.sleep(0.5)
    assert first.claim_many(short, 30) == set(short)
    assert sorted(left[-1]) == sorted(short)
    # a retry of the claimer's own call (its first reply was lost) wins the batch again
    own = [f"own{i}@2026-01-01T00:00:00Z" for i in range(20)]
    paths = {k: f"{second._claims.dir}/{escape(k)}" for k in own}
    token = uuid.uuid4().hex
    data = _layout.claim_data(30, token)
    assert second._claims.claim_batches(paths, data, token) == (set(own), [])
    assert second._claims.claim_batches(paths, data, token) == (set(own), [])
    assert first.claim_many(own, 30) == set()


def test_contended_claims_read_first_and_write_only_absent_keys(
    make: Callable[..., ZooKeeperCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys another instance claimed first cost a read, not a failing multi (a synced write):
    after a failed batch only the absent keys are created; the winners are exact."""
    first, second = make(), make()
    keys = [f"job{i}@2026-01-01T00:00:05Z" for i in range(20)]
    assert first.claim_many(keys[:12], 30) == set(keys[:12])
    commits: list[int] = []
    client = second._claims.session.client
    real = client.transaction

    def counted() -> Any:
        tx = real()
        commit = tx.commit_async

        def commit_async() -> Any:
            commits.append(len(tx.operations))
            return commit()

        tx.commit_async = commit_async
        return tx

    monkeypatch.setattr(client, "transaction", counted)
    assert second.claim_many(keys, 30) == set(keys[12:])
    # one batch multi (failed: a key existed), then one multi per ABSENT key only
    assert len(commits) == 1 + 8, commits
    assert second.claim_many(keys, 30) == set()  # all taken now: no expired claim to replace
    assert first.claim_many(keys, 30) == set()  # once per hold, whoever asks
