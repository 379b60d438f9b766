"""ZooKeeper ACLs and TLS (issue 17), against real ZooKeeper servers.

* With ``zookeeper://alice:secret@host/root`` every node coordlock creates (chroot parents,
  lock directories and nodes, claims, history, the clock node) carries an ACL granting all
  permissions to alice's digest identity only (plus READ for ``read_acl``). An anonymous kazoo
  client, or one authenticated as someone else, can neither read, list, delete nor modify any
  of them, and the holder keeps its lock; an anonymous coordlock client is refused with
  ConfigurationError.
* TLS: a throwaway ZooKeeper with a ``secureClientPort`` (Netty connection factory, PEM key
  and trust stores from a throwaway CA made by ``trustme``); coordlock connects with
  ``?use_ssl=true&ca=…&certfile=…&keyfile=…`` (the server requires a client certificate); a
  server certificate from an unknown CA fails fast with ConfigurationError.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NotEmptyError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl_credential

# Fixtures shared with the backend's main test module (pytest finds them by name here).
from test_zookeeper_backend import holder_path, make, zk_url  # noqa: F401

import coordlock
from coordlock import ConfigurationError
from coordlock._protocol import RunRecord
from coordlock.backends.zookeeper import ZooKeeperCoordinator
from coordlock.testing.servers import ZooKeeperServer, free_port

# --------------------------------------------------------------------------------------------
# ACLs
# --------------------------------------------------------------------------------------------


def _client(hosts: str, auth: tuple[str, str] | None = None) -> KazooClient:
    client = KazooClient(
        hosts=hosts, auth_data=[("digest", f"{auth[0]}:{auth[1]}")] if auth else None
    )
    client.start(timeout=30)
    return client


def _walk(client: KazooClient, path: str) -> list[str]:
    """``path`` and every node below it."""
    found = [path]
    for child in client.get_children(path):
        found.extend(_walk(client, f"{path.rstrip('/')}/{child}"))
    return found


@pytest.fixture
def alice_url(zookeeper_server: ZooKeeperServer) -> str:
    if zookeeper_server.paused:
        zookeeper_server.resume()
    host = zookeeper_server.hosts
    return f"zookeeper://alice:s%40cret@{host}/acl-{uuid.uuid4().hex}/app"


def _populate(c: ZooKeeperCoordinator) -> Any:
    """A held lock, a queued waiter node, claims (one expired), history, the clock node."""
    lease = c.acquire("acl lock", 30)
    assert lease is not None
    assert c.claim("job@2026-01-01T00:00:00Z", 60) is True
    assert c.claim("short@t", 0.001) is True
    time.sleep(0.01)
    assert c.claim("short@t", 60) is True  # replaces the expired one: reads the server clock
    c.record_run(RunRecord("r1", "job", "t1", "inst", time.time()))
    c._session.refresh_clock(f"{c.root}/clock")  # as a claim with a stale clock reading does
    return lease


def test_credentials_protect_every_node(
    zookeeper_server: ZooKeeperServer,
    alice_url: str,
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    alice = make(alice_url)
    lease = _populate(alice)
    chroot_top = "/" + alice.chroot.split("/")[1]
    admin = _client(zookeeper_server.hosts, ("alice", "s@cret"))
    anonymous = _client(zookeeper_server.hosts)
    mallory = _client(zookeeper_server.hosts, ("mallory", "s@cret"))
    try:
        nodes = _walk(admin, chroot_top)
        assert any("/locks/" in n and "-lock-" in n for n in nodes)
        assert any("/claims/" in n for n in nodes) and any("/runs/" in n for n in nodes)
        assert f"{alice.root}/clock" in nodes
        expected = [make_digest_acl_credential("alice", "s@cret")]
        for node in nodes:
            acls, _ = admin.get_acls(node)
            assert [f"{a.id.scheme}:{a.id.id}" for a in acls] == [f"digest:{expected[0]}"], node
            assert acls[0].perms == 31, node
        refused = 0
        for intruder in (anonymous, mallory):
            for node in nodes:
                attempts: list[Callable[[], object]] = [
                    lambda n=node, z=intruder: z.set(n, b"mine"),
                    lambda n=node, z=intruder: z.get(n),
                    lambda n=node, z=intruder: z.get_children(n),
                    lambda n=node, z=intruder: z.create(f"{n}/intruder", b""),
                    lambda n=node, z=intruder: z.set_acls(n, OPEN_ACL_UNSAFE),
                ]
                for attempt in attempts:
                    with pytest.raises(NoAuthError):
                        attempt()
                    refused += 1
                # DELETE is checked on the parent: refused under every node coordlock made;
                # the chroot's top node sits in "/", which is not coordlock's, and cannot be
                # deleted while anything (that nobody else can delete) is inside it.
                with pytest.raises(NotEmptyError if node == chroot_top else NoAuthError):
                    intruder.delete(node)
                refused += 1
        assert refused == 2 * 6 * len(nodes)
        # The holder still holds: its node is there and renewals work.
        assert not lease.lost and lease.extend() is True
        assert len(holder_path(admin, alice, "acl lock")) == 1
        # A coordlock client without (or with other) credentials is refused, clearly.
        for url in (
            alice_url.replace("alice:s%40cret@", ""),
            alice_url.replace("alice:", "mallory:"),
        ):
            other = make(url)
            with pytest.raises(ConfigurationError, match=r"refused access.*user:password"):
                other.acquire("acl lock", 5)
            with pytest.raises(ConfigurationError, match=r"refused access.*user:password"):
                other.claim("job@2026-01-01T00:00:00Z", 60)
        assert not lease.lost and lease.extend() is True
        # Another coordinator with alice's credentials shares the locks as usual.
        twin = make(alice_url)
        assert twin.acquire("acl lock", 5) is None
        assert lease.release() is True
        taken = twin.acquire("acl lock", 5)
        assert taken is not None and taken.fence > lease.fence and taken.release()
    finally:
        for client in (admin, anonymous, mallory):
            client.stop()
            client.close()


def test_read_acl_gives_a_monitor_read_only(
    zookeeper_server: ZooKeeperServer,
    alice_url: str,
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    monitor_id = make_digest_acl_credential("monitor", "watch")
    alice = make(alice_url, read_acl=f"digest:{monitor_id}")
    lease = alice.acquire("watched", 30)
    assert lease is not None
    monitor = _client(zookeeper_server.hosts, ("monitor", "watch"))
    try:
        parent = f"{alice.root}/locks/watched"
        (child,) = monitor.get_children(parent)  # READ: list and read
        data, _ = monitor.get(f"{parent}/{child}")
        assert data == b"30000"
        with pytest.raises(NoAuthError):
            monitor.delete(f"{parent}/{child}")
        with pytest.raises(NoAuthError):
            monitor.set(f"{parent}/{child}", b"1")
        assert not lease.lost and lease.release()
    finally:
        monitor.stop()
        monitor.close()


def test_without_credentials_nodes_are_world_writable(
    zookeeper_server: ZooKeeperServer,
    zk_url: str,  # noqa: F811
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    # Documented: no credentials, no protection (ZooKeeper's world ACL).
    c = make(zk_url)
    lease = c.acquire("open", 30)
    assert lease is not None
    anonymous = _client(zookeeper_server.hosts)
    try:
        acls, _ = anonymous.get_acls(f"{c.root}/locks/open")
        assert [(a.id.scheme, a.id.id, a.perms) for a in acls] == [("world", "anyone", 31)]
    finally:
        anonymous.stop()
        anonymous.close()
    assert lease.release()


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("read_acl=digest:m:x", "read_acl needs credentials"),
        ("use_ssl=maybe", "use_ssl must be true or false"),
        ("ca=/tmp/ca.pem", "without use_ssl=true"),
        ("use_ssl=true&ca=/nonexistent/ca.pem", "TLS files"),
        ("use_ssl=true&certfile=/nonexistent/c.pem", "certfile and keyfile go together"),
        ("use_ssl=true&verify_certs=false&check_hostname=true", "needs verify_certs"),
    ],
)
def test_bad_security_options_fail_fast(
    zookeeper_server: ZooKeeperServer, query: str, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        coordlock.connect(f"{zookeeper_server.url}/x?{query}")


def test_bad_read_acl_entry(zookeeper_server: ZooKeeperServer) -> None:
    with pytest.raises(ConfigurationError, match="scheme:id"):
        coordlock.connect(f"zookeeper://a:b@{zookeeper_server.hosts}/x?read_acl=monitor")


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------

#: The Debian zookeeper.jar's manifest leaves out netty-codec, which the Netty connection
#: factory (the only one serving ``secureClientPort``) needs.
NETTY_JARS = (Path("/usr/share/java/netty-codec.jar"),)


class TLSZooKeeperServer(ZooKeeperServer):
    """A throwaway ZooKeeper with a TLS client port (``secure_port``) beside the plain one.

    Key and trust stores are PEM files (``ssl.keyStore.type=PEM``); ``client_auth`` is
    ZooKeeper's ``ssl.clientAuth`` (``need``: clients must present a certificate of the CA).
    """

    kind: ClassVar[str] = "zookeeper"

    def __init__(self, directory: Path, ca: trustme.CA, *, client_auth: str = "need") -> None:
        server_pem = directory / "server.pem"
        cert = ca.issue_cert("127.0.0.1", "localhost")
        # ZooKeeper's PEM reader takes PKCS#8 keys only ("BEGIN PRIVATE KEY").
        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
        pkcs8 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        server_pem.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        ca_pem = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        self.secure_port = free_port()
        super().__init__(
            fast=True,
            extra_config={
                "secureClientPort": self.secure_port,
                "serverCnxnFactory": "org.apache.zookeeper.server.NettyServerCnxnFactory",
                "ssl.keyStore.location": str(server_pem),
                "ssl.keyStore.type": "PEM",
                "ssl.trustStore.location": str(ca_pem),
                "ssl.trustStore.type": "PEM",
                "ssl.clientAuth": client_auth,
            },
        )

    def _command(self) -> list[str]:
        command = super()._command()
        at = command.index("-cp") + 1
        extra = [str(jar) for jar in NETTY_JARS if jar.is_file()]
        command[at] = ":".join([command[at], *extra])
        return command


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zk-tls")


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(tls_dir: Path, tls_ca: trustme.CA) -> Iterator[TLSZooKeeperServer]:
    with TLSZooKeeperServer(tls_dir, tls_ca) as server:
        yield server


@pytest.fixture(scope="module")
def client_files(tls_dir: Path, tls_ca: trustme.CA) -> dict[str, str]:
    cert = tls_ca.issue_cert("coordlock-client")
    files = {
        "ca": tls_dir / "client-ca.pem",
        "certfile": tls_dir / "client.crt",
        "keyfile": tls_dir / "client.key",
    }
    tls_ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["certfile"]))
    cert.private_key_pem.write_to_path(str(files["keyfile"]))
    return {k: str(v) for k, v in files.items()}


def _tls_url(server: TLSZooKeeperServer, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"zookeeper://127.0.0.1:{server.secure_port}/tls-{uuid.uuid4().hex}?{q}"


def test_locks_and_claims_over_tls(
    tls_server: TLSZooKeeperServer,
    client_files: dict[str, str],
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    url = _tls_url(tls_server, use_ssl="true", check_hostname="true", **client_files)
    a, b = make(url), make(url)
    lease = a.acquire("tls", 10)
    assert lease is not None
    assert b.acquire("tls", 10) is None
    assert a._client.use_ssl is True and a._client.check_hostname is True
    assert lease.release()
    taken = b.acquire("tls", 10, wait=5)
    assert taken is not None and taken.fence > lease.fence and taken.release()
    assert a.claim("tls@t", 30) is True and b.claim("tls@t", 30) is False


def test_tls_server_from_an_unknown_ca_fails_fast(
    tls_server: TLSZooKeeperServer,
    tls_dir: Path,
    client_files: dict[str, str],
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    stranger = tls_dir / "stranger-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    files = dict(client_files, ca=str(stranger))
    c = make(_tls_url(tls_server, use_ssl="true", retry_deadline="60", **files))
    began = time.monotonic()
    with pytest.raises(ConfigurationError, match="TLS handshake") as info:
        c.acquire("tls", 10)
    took = time.monotonic() - began
    print(f"\n[zookeeper TLS unknown CA] ConfigurationError after {took:.2f}s: {info.value}")
    assert took < 30  # not retried for the 60 s retry deadline


def test_tls_without_a_client_certificate_is_not_served(
    tls_server: TLSZooKeeperServer,
    client_files: dict[str, str],
    make: Callable[..., ZooKeeperCoordinator],  # noqa: F811
) -> None:
    # The server requires a client certificate: refused at the handshake (TLS 1.2) or by an
    # alert right after it (TLS 1.3). Either way a configuration error, at once.
    c = make(_tls_url(tls_server, use_ssl="true", ca=client_files["ca"], retry_deadline="60"))
    began = time.monotonic()
    with pytest.raises(ConfigurationError, match="TLS handshake") as info:
        c.acquire("tls", 10)
    took = time.monotonic() - began
    print(f"\n[zookeeper TLS no client cert] ConfigurationError after {took:.2f}s: {info.value}")
    assert took < 30  # not retried for the 60 s retry deadline
    assert not c._session.ever_connected
