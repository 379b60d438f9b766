"""``zookeeper://h1:2181,h2:2181/chroot`` – locks on a ZooKeeper ensemble, through kazoo.

Layout (under the optional chroot; ``<x>`` is a percent-escaped name, so ``/`` in names is safe):

* ``/coordlock/locks/<name>/<owner>-lock-<seq>`` – one EPHEMERAL_SEQUENTIAL node per contender.
  ``<owner>`` is the acquisition's GUID (the lease's owner token). The lowest sequence holds the
  lock; a waiter watches only its predecessor (no herd effect). The node's data is the lease
  ttl in milliseconds (ASCII): the lock expires ``ttl`` after the node's ``mtime`` (server
  clock) unless the holder renews it (``set_data``), and the successor of an expired holder
  deletes it with a version check. Lock directories are plain persistent nodes; a background
  sweep deletes ones that stayed empty for a whole sweep interval.
* fence = the ``czxid`` of our node: the 64-bit zxid of the transaction that created it. zxids
  are totally ordered across the ensemble (``epoch << 32 | counter``; the epoch grows with every
  leader election), so successive holders – whose nodes were created in sequence order – get
  strictly increasing fences, across client restarts, server restarts and leader changes.
  Sequence numbers are not enough: they are per directory (a swept and recreated directory
  starts again at 0) and 32-bit (they wrap after 2**31 creations).
* ``/coordlock/claims/<key>`` – once-only claims: persistent nodes whose data holds the hold
  time and the claimer's token, with one child named by that token (the identity of the
  claim); an expired claim is replaced atomically by one multi (delete the old token child,
  create ours, set the data); a sweep deletes expired claims.
* ``/coordlock/runs/<job>/<run_id>`` – run history (JSON), at most ``history_limit`` per job.
* ``/coordlock/clock`` – written when a claim needs a fresh reading of the server clock.

Sessions: one KazooClient (one session) per coordinator. Connection state is wired to leases:
SUSPENDED marks every held lease at risk at once, and lost if the connection is not back within
a third of the negotiated session timeout (or the lease's own ttl, whichever ends first); LOST
(session expired) marks them lost at once; CONNECTED after SUSPENDED verifies each node and
restores the lease (``"restored"`` callbacks). See ``docs/backends/zookeeper.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .._base import BaseCoordinator
from .._errors import BackendUnavailable, ConfigurationError
from .._lease import Lease
from .._protocol import LockInfo, RunRecord
from .._registry import missing_driver, redact
from .._retry import call_with_retry
from .._validate import check_seconds, check_wait, parse_duration

try:
    from kazoo.client import KazooClient
    from kazoo.exceptions import (
        BadVersionError,
        ConnectionClosedError,
        ConnectionLoss,
        KazooException,
        NodeExistsError,
        NoNodeError,
        NotEmptyError,
        OperationTimeoutError,
        SessionExpiredError,
        SessionMovedError,
    )
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.hosts import collect_hosts
    from kazoo.protocol.states import EventType, KazooState
    from kazoo.retry import KazooRetry
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")
T = TypeVar("T")

ROOT = "coordlock"
#: Claims created per multi on the fast path of ``claim_many`` (keeps a request far below
#: ZooKeeper's 1 MB jute.maxbuffer even with 512-character keys).
CLAIM_BATCH = 200
LOCK_MARK = "-lock-"
#: A SUSPENDED connection is presumed to have lost its session after this share of the
#: negotiated session timeout: kazoo notices a dead connection up to 2/3 of the timeout after
#: the server last heard from it, so the server may expire the session 1/3 later.
SUSPEND_GRACE_FRACTION = 1 / 3
#: A waiter that becomes the holder re-stamps its node when its stamp is older than this share
#: of the ttl (so a new lease starts with at least 90 % of its ttl).
RESTAMP_FRACTION = 0.1
#: Margin (ms) added to expiry judgements of other owners' nodes (mtime is in whole ms).
EXPIRY_MARGIN_MS = 2
#: A server-clock reading older than this (seconds) is refreshed before judging claims.
CLOCK_MAX_AGE = 30.0
#: The uncontended fast path: after releasing a node that was alone in its directory, the next
#: create there must get exactly the next sequence number for the directory to be known empty
#: (ZooKeeper's sequence counter counts creates only). Trusted for this many seconds (seconds)...
QUIET_TTL = 60.0
#: ...which is far below the time a lock directory must stay empty and untouched before any
#: sweep deletes it (a recreated directory restarts its counter, so it must not happen while an
#: expectation is live).
LOCK_DIR_MIN_IDLE = 600.0
#: Bounds of one sweep pass.
SWEEP_BATCH = 500
SWEEP_MAX_DELETES = 10_000

if TYPE_CHECKING:
    _LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:
    _LoggerAdapter = logging.LoggerAdapter


class _KazooLog(_LoggerAdapter):
    """kazoo's logger for one client: forwards to ``coordlock.kazoo`` and keeps the negotiated
    session timeout from kazoo's "Session created" message (kazoo stores it nowhere else; the
    server may clamp the timeout asked for to its ``[min, max]SessionTimeout``)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("coordlock.kazoo"), {})
        self.negotiated_ms: float | None = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith("Session created") and len(args) >= 3:
            with contextlib.suppress(TypeError, ValueError):
                self.negotiated_ms = float(args[2])
        super().log(level, msg, *args, **kwargs)


_OPTIONS = {"session_timeout", "sweep_interval", "history_limit", "retry_deadline"}
_DURATION_OPTIONS = {"session_timeout", "sweep_interval", "retry_deadline"}
_STOP = object()


def escape(name: str) -> str:
    """The node name for a lock name, claim key or job: percent-escaped, never ``.``/``..``."""
    escaped = quote(name, safe="")
    if escaped in (".", ".."):
        escaped = escaped.replace(".", "%2E")
    return escaped


def _seq(child: str) -> int | None:
    """The sequence number of a lock child ``<owner>-lock-<seq>``; None for foreign nodes."""
    owner, mark, seq = child.rpartition(LOCK_MARK)
    if not mark or not owner:
        return None
    try:
        return int(seq)
    except ValueError:
        return None


def _distance(seq: int, ref: int) -> int:
    """Signed distance from ``ref`` to ``seq`` in the 32-bit circular sequence space.

    ZooKeeper sequence numbers are a signed 32-bit counter per directory that wraps; comparing
    circularly keeps the order right across a wrap while fewer than 2**31 contenders are live.
    """
    return ((seq - ref + 2**31) % 2**32) - 2**31


def _ordered(children: Iterable[str], ref: int) -> list[tuple[int, str]]:
    """Lock children with their circular distance from ``ref``, lowest first."""
    found = []
    for child in children:
        seq = _seq(child)
        if seq is not None:
            found.append((_distance(seq, ref), child))
    found.sort()
    return found


def _ttl_ms(data: bytes | None) -> int | None:
    """The ttl (ms) stamped in a lock node, or None when the data is not ours."""
    if not data or not data.isdigit():
        return None
    return int(data)


def _stamp(ttl: float) -> bytes:
    return str(max(1, math.ceil(ttl * 1000))).encode()


class _Node:
    """One acquisition (one owner token): its node in the lock's queue, once created."""

    def __init__(self, name: str, owner: str, parent: str, ttl: float) -> None:
        self.name = name
        self.owner = owner
        self.parent = parent
        self.prefix = owner + LOCK_MARK
        self.ttl = ttl
        self.path: str | None = None
        self.child = ""
        self.seq = 0
        self.fence = 0
        self.session = 0
        self.create_sent = False
        self.stamped = 0.0  # time.monotonic() when the last stamp (create/set_data) was sent
        self.holder = False
        self.deadline = 0.0  # time.monotonic(): local end of the lease unless renewed
        self.lease: Lease | None = None
        self.gone = ""  # why the node is known gone (session expired), if it is
        self.presumed_lost = False  # marked lost while suspended: delete the node on reconnect
        self.abandoned = False
        self.next_seq: int | None = None  # if alone: the next create's seq when still quiet
        self.pred: str | None = None
        self.pred_lowest = False
        self.pred_gone = False
        self.pred_expiry: float | None = None  # time.monotonic() when pred may have expired
        self.wake = threading.Event()

    def on_pred_event(self, event: Any) -> None:
        """kazoo watch callback (kazoo's thread): note a deleted predecessor and wake up."""
        if event.path == self.pred and event.type == EventType.DELETED:
            self.pred_gone = True
        self.wake.set()


class ZooKeeperCoordinator(BaseCoordinator):
    """Locks, claims and run history on ZooKeeper (see the module docstring).

    Options (keyword arguments or URL query parameters):

    * ``session_timeout`` – seconds (default 10): the ZooKeeper session timeout asked for.
      A crashed holder's locks disappear this long after its last contact, whatever its ttl.
    * ``sweep_interval`` – seconds between cleanup passes (expired claims, empty lock
      directories, orphan nodes); default 60, ``0`` turns sweeping off.
    * ``history_limit`` – runs kept per job (default 1000; older ones are deleted in batches).
    * ``retry_deadline`` – see :class:`~coordlock._base.BaseCoordinator`.

    A ``user:password@`` in the URL is sent as ``digest`` authentication.
    """

    transient_errors = (
        ConnectionLoss,
        SessionExpiredError,
        SessionMovedError,
        OperationTimeoutError,
        KazooTimeoutError,
    )

    def __init__(
        self,
        hosts: str,
        chroot: str = "",
        *,
        session_timeout: float = 10.0,
        sweep_interval: float = 60.0,
        history_limit: int = 1000,
        auth: tuple[str, str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.session_timeout = check_seconds(session_timeout, "session_timeout")
        self.sweep_interval = check_seconds(sweep_interval, "sweep_interval", allow_zero=True)
        if isinstance(history_limit, bool) or not isinstance(history_limit, int):
            raise TypeError("history_limit must be an int")
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        self.history_limit = history_limit
        self.hosts = hosts
        self.chroot = chroot.rstrip("/")
        self.root = f"{self.chroot}/{ROOT}"
        self._locks_dir = f"{self.root}/locks"
        self._claims_dir = f"{self.root}/claims"
        self._runs_dir = f"{self.root}/runs"
        self._clock_path = f"{self.root}/clock"
        self._op_timeout = max(self.session_timeout, 2.0)
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._orphans: dict[str, str] = {}  # owner -> lock directory
        self._tls = threading.local()
        self._clock: tuple[float, float] | None = None  # (server ms, time.monotonic())
        self._connected = threading.Event()
        self._closing = False
        self._session = 0
        self._suspended_since: float | None = None
        self._grace_spent = False  # the current suspension already marked leases lost
        self._empty_dirs: dict[str, tuple[int, float]] = {}  # dir -> (pzxid, first seen empty)
        self._quiet: dict[str, tuple[int, float]] = {}  # dir -> (next seq, trusted until)
        self._events: queue.Queue[Any] = queue.Queue()
        self._kazoo_log = _KazooLog()
        self._client = KazooClient(
            hosts=hosts,
            timeout=self.session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=1.0),
            auth_data=[("digest", f"{auth[0]}:{auth[1]}")] if auth else None,
            logger=self._kazoo_log,
        )
        self._client.add_listener(self._on_state)
        self._worker = threading.Thread(
            target=self._run_events, name=f"coordlock-zookeeper-{id(self):x}", daemon=True
        )
        self._worker.start()
        self._client.start_async()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ZooKeeperCoordinator:
        """``zookeeper://[user:password@]h1:2181,h2:2181[/chroot][?session_timeout=10]``."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"malformed URL {redact(url)!r}: {exc}") from exc
        if parts.scheme.lower() != "zookeeper":
            raise ConfigurationError(f"not a zookeeper:// URL: {redact(url)!r}")
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if not hosts:
            raise ConfigurationError(f"no ZooKeeper host in {redact(url)!r}")
        try:
            collect_hosts(hosts)
        except ValueError as exc:
            raise ConfigurationError(f"bad ZooKeeper hosts {hosts!r}: {exc}") from exc
        chroot = parts.path.rstrip("/")
        if chroot and any(c in ("", ".", "..") for c in chroot.split("/")[1:]):
            raise ConfigurationError(f"bad ZooKeeper chroot {parts.path!r}")
        auth = None
        if at:
            user, _, password = userinfo.partition(":")
            auth = (unquote(user), unquote(password))
        merged: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _DURATION_OPTIONS:
                merged[key] = 0.0 if value.strip() in ("0", "0s") else _duration(key, value)
            elif key == "history_limit":
                try:
                    merged[key] = int(value)
                except ValueError as exc:
                    raise ConfigurationError(f"history_limit must be an int: {value!r}") from exc
            else:
                merged[key] = value
        merged.update(options)
        unknown = sorted(set(merged) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown zookeeper:// option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_OPTIONS))}"
            )
        try:
            return cls(hosts, chroot, auth=auth, **merged)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad zookeeper:// option: {exc}") from exc

    def __repr__(self) -> str:
        return f"<ZooKeeperCoordinator {self.hosts}{self.chroot}>"

    # -- plumbing ----------------------------------------------------------------------------

    def _ready(self, wait: float = 1.0) -> None:
        """Raise ConnectionLoss (transient) unless connected, after waiting up to ``wait`` s."""
        if self._connected.is_set():
            return
        if self._closed or self._closing:
            raise ConfigurationError(f"{type(self).__name__} is closed")
        if wait <= 0 or not self._connected.wait(wait):
            raise ConnectionLoss("not connected to ZooKeeper")

    def _get(self, result: Any, timeout: float | None = None) -> Any:
        """Wait for a kazoo async result (bounded)."""
        return result.get(timeout=self._op_timeout if timeout is None else timeout)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``self._retry`` plus translation of kazoo's other errors to coordlock errors."""
        try:
            return self._retry(fn, what)
        except ConnectionClosedError as exc:
            raise ConfigurationError(f"{what}: the coordinator is closed") from exc
        except KazooException as exc:
            raise BackendUnavailable(f"{what}: {exc!r}") from exc

    def _note_clock(self, server_ms: float, at: float) -> None:
        current = self._clock
        if current is None or at >= current[1]:
            self._clock = (float(server_ms), at)

    def _server_now_ms(self, *, refresh: bool = False) -> float:
        """A lower bound of the server clock now (ms): a stamp we got back plus time since."""
        current = self._clock
        if refresh and (current is None or time.monotonic() - current[1] > CLOCK_MAX_AGE):
            self._refresh_clock()
            current = self._clock
        if current is None:
            return -math.inf
        return current[0] + (time.monotonic() - current[1]) * 1000.0

    def _refresh_clock(self) -> None:
        """Read the server clock: write the clock node and keep its mtime."""
        self._ready()
        sent = time.monotonic()
        try:
            stat = self._get(self._client.set_async(self._clock_path, b""))
        except NoNodeError:
            with contextlib.suppress(NodeExistsError):
                self._get(self._client.create_async(self._clock_path, b"", makepath=True))
            stat = self._get(self._client.set_async(self._clock_path, b""))
        self._note_clock(stat.mtime, sent)

    def _session_id(self) -> int:
        client_id = self._client.client_id
        return int(client_id[0]) if client_id else 0

    def _lock_dir(self, name: str) -> str:
        return f"{self._locks_dir}/{escape(name)}"

    # -- connection state --------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        """kazoo listener (kazoo's connection thread): never blocks, hands over to the worker."""
        if self._closing:
            return
        if state == KazooState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        self._events.put((state, time.monotonic()))

    def _suspend_grace(self) -> float:
        """How long a SUSPENDED lease stays at risk before it is presumed lost (seconds)."""
        negotiated = self._kazoo_log.negotiated_ms
        timeout = negotiated / 1000.0 if negotiated else self.session_timeout
        return timeout * SUSPEND_GRACE_FRACTION

    def _run_events(self) -> None:
        """The worker: connection-state changes, loss deadlines while suspended, sweeps."""
        next_sweep = (
            time.monotonic() + self.sweep_interval * random.uniform(0.5, 1.0)
            if self.sweep_interval
            else math.inf
        )
        pending_verify = False
        while True:
            now = time.monotonic()
            due = next_sweep
            since = self._suspended_since
            if since is not None and not self._grace_spent:
                due = min(due, since + self._suspend_grace())
            if pending_verify:
                due = min(due, now + 0.5)
            timeout = None if math.isinf(due) else max(due - now, 0.0)
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP or self._closing:
                return
            try:
                if item is not None:
                    state, at = item
                    if state == KazooState.SUSPENDED:
                        self._on_suspended(at)
                    elif state == KazooState.LOST:
                        self._on_lost()
                    elif state == KazooState.CONNECTED:
                        self._on_connected()
                        pending_verify = True
                self._check_suspension()
                if pending_verify and self._connected.is_set():
                    self._verify_after_reconnect()
                    pending_verify = False
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_interval * random.uniform(0.9, 1.1)
                    if self._connected.is_set():
                        self.sweep()
            except (KazooException, *self.transient_errors, BackendUnavailable) as exc:
                log.debug("zookeeper worker: %r (will retry)", exc)
            except Exception:
                log.exception("zookeeper worker: unexpected error")

    def _holders(self) -> list[_Node]:
        with self._lock:
            return [n for n in self._nodes.values() if n.holder]

    def _on_suspended(self, at: float) -> None:
        if self._suspended_since is None:
            self._suspended_since = at
            self._grace_spent = False
        for node in self._holders():
            if node.lease is not None:
                node.lease._mark_at_risk(
                    "ZooKeeper connection SUSPENDED: the session may expire; the lease is lost "
                    f"unless the connection is back within {self._suspend_grace():.1f}s"
                )

    def _check_suspension(self) -> None:
        since = self._suspended_since
        if since is None or self._grace_spent or time.monotonic() < since + self._suspend_grace():
            return
        self._grace_spent = True
        for node in self._holders():
            lease = node.lease
            if lease is not None and not lease._lost and not lease.released:
                node.presumed_lost = True
                lease._mark_lost(
                    f"ZooKeeper connection suspended for more than {self._suspend_grace():.1f}s:"
                    " the session may have expired"
                )

    def _on_lost(self) -> None:
        """The session expired: every ephemeral node of ours is gone."""
        self._suspended_since = None
        old = self._session
        with self._lock:
            nodes = list(self._nodes.values())
            self._orphans.clear()
        for node in nodes:
            # Nodes already created in a newer session (the worker may lag) are kept.
            if node.path is None or not old or node.session == old:
                self._forget_session_node(node, "ZooKeeper session expired (LOST)")

    def _forget_session_node(self, node: _Node, reason: str) -> None:
        was_holder = node.holder
        node.holder = False
        node.path = None
        node.gone = reason
        if was_holder and node.lease is not None:
            node.lease._mark_lost(f"{reason}: its lock node is gone")
        node.wake.set()

    def _on_connected(self) -> None:
        self._suspended_since = None
        session = self._session_id()
        previous, self._session = self._session, session
        if previous and session != previous:
            # A new session without a LOST event seen: the old session's nodes are gone.
            with self._lock:
                stale = [n for n in self._nodes.values() if n.session == previous]
            for node in stale:
                self._forget_session_node(node, "ZooKeeper session replaced")
        with self._lock:
            nodes = list(self._nodes.values())
        for node in nodes:
            node.wake.set()

    def _verify_after_reconnect(self) -> None:
        """After CONNECTED: restore at-risk leases, delete nodes of lost ones, clear orphans."""
        for node in self._holders():
            lease, path = node.lease, node.path
            if lease is None or path is None:
                continue
            if lease._lost or lease.released or node.presumed_lost:
                if not lease.released:
                    self._drop_node(node)
                continue
            if not lease.at_risk:
                continue
            stat = self._get(self._client.exists_async(path))
            if stat is None:
                node.holder = False
                lease._mark_lost("lock node gone after reconnecting")
            elif time.monotonic() < node.deadline and lease._restored():
                log.info(
                    "lease %r (fence %d) restored: ZooKeeper reconnected", lease.name, lease.fence
                )
        self._cleanup_orphans()

    def _drop_node(self, node: _Node) -> None:
        """Delete the node of a lease presumed lost (so others need not wait for its ttl)."""
        path = node.path
        node.holder = False
        node.path = None
        if path is not None:
            with contextlib.suppress(NoNodeError):
                self._get(self._client.delete_async(path))

    # -- lock hooks --------------------------------------------------------------------------

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        """See :meth:`BaseCoordinator.acquire`. Waiters keep their place in the queue."""
        try:
            waiting = check_wait(wait) > 0
        except (TypeError, ValueError):
            waiting = False  # the base class raises the proper error
        tls = self._tls
        tls.waiting, tls.owner = waiting, None
        try:
            lease = super().acquire(name, ttl, wait=wait, renew=renew)
        except BaseException:
            if tls.owner is not None:
                self._abandon(tls.owner)
            raise
        finally:
            tls.waiting = False
        owner, tls.owner = tls.owner, None
        if lease is None:
            if owner is not None:
                self._abandon(owner)
            return None
        self._adopt_lease(lease)
        return lease

    def _adopt_lease(self, lease: Lease) -> None:
        with self._lock:
            node = self._nodes.get(lease.owner)
        if node is None:
            return
        node.lease = lease
        node.deadline = lease._deadline
        if node.gone or not node.holder:
            lease._mark_lost(node.gone or "lock node gone before the lease was handed out")
            return
        since = self._suspended_since
        if since is not None:
            lease._mark_at_risk("ZooKeeper connection SUSPENDED")
            if time.monotonic() >= since + self._suspend_grace():
                node.presumed_lost = True
                lease._mark_lost("ZooKeeper connection suspended: the session may have expired")

    def _node_for(self, name: str, owner: str, ttl: float) -> _Node:
        with self._lock:
            node = self._nodes.get(owner)
            if node is None:
                node = _Node(name, owner, self._lock_dir(name), ttl)
                self._nodes[owner] = node
            return node

    def _try_acquire(self, name: str, owner: str, ttl: float) -> int | None:
        waiting = bool(getattr(self._tls, "waiting", False))
        self._tls.owner = owner
        node = self._node_for(name, owner, ttl)
        try:
            fence = self._call(lambda: self._attempt(node, waiting), f"acquire {name!r}")
        except BaseException:
            self._abandon(owner)
            raise
        if fence is None and not waiting:
            self._abandon(owner)
        return fence

    def _create(self, node: _Node) -> list[str]:
        """Create our node and read the directory in one pipelined round trip.

        When this coordinator's last node in the directory was alone and released less than
        :data:`QUIET_TTL` ago, the read is skipped if the create gets exactly the expected
        sequence number: nobody else created a node since, so the directory was empty.
        """
        self._ready()
        client = self._client
        sent = time.monotonic()
        with self._lock:
            quiet = self._quiet.pop(node.parent, None)
        expected = quiet[0] if quiet is not None and quiet[1] > sent else None
        node.create_sent = True
        created = client.create_async(
            f"{node.parent}/{node.prefix}",
            _stamp(node.ttl),
            ephemeral=True,
            sequence=True,
            makepath=True,
            include_data=True,
        )
        listed = client.get_children_async(node.parent) if expected is None else None
        try:
            path, stat = self._get(created)
        except KazooTimeoutError:
            created.rawlink(lambda result: self._late_create(node, result))
            raise
        got = time.monotonic()
        node.path = path
        node.child = path.rsplit("/", 1)[1]
        node.seq = _seq(node.child) or 0
        node.fence = int(stat.czxid)
        node.session = int(stat.ephemeralOwner)
        node.stamped = sent
        node.gone = ""
        self._note_clock(stat.ctime, got)
        if expected is not None and node.seq == expected:
            return [node.child]
        children: list[str] | None = None
        if listed is not None:
            with contextlib.suppress(NoNodeError):  # our create made the directory (makepath)
                children = self._get(listed)
        if children is None or node.child not in children:
            children = self._get(client.get_children_async(node.parent))
        return list(children)

    def _late_create(self, node: _Node, result: Any) -> None:
        """A create whose wait timed out finished later: delete it if nobody wants it."""
        if not node.abandoned or not result.successful():
            return
        path, _ = result.get()
        self._client.delete_async(path)

    def _children(self, parent: str) -> list[str]:
        try:
            return list(self._get(self._client.get_children_async(parent)))
        except NoNodeError:
            return []

    def _adopt_child(self, node: _Node, child: str) -> None:
        """Take over our own node found by GUID after a create whose reply was lost."""
        path = f"{node.parent}/{child}"
        stat = self._get(self._client.exists_async(path))
        if stat is None:
            return
        log.info("lock %r: recovered our node %s after a lost create reply", node.name, child)
        node.path = path
        node.child = child
        node.seq = _seq(child) or 0
        node.fence = int(stat.czxid)
        node.session = int(stat.ephemeralOwner)
        node.stamped = -math.inf  # unknown age: re-stamp before holding
        node.gone = ""

    def _attempt(self, node: _Node, waiting: bool) -> int | None:
        """One attempt (idempotent per owner): the fence if we hold the lock, else None.

        When ``waiting``, our node stays queued with a watch on its predecessor.
        """
        for _ in range(16):
            if node.holder:
                return node.fence
            self._ready()
            if node.path is None:
                children: list[str] = []
                if node.create_sent:  # an earlier create may have landed: look for our GUID
                    children = self._children(node.parent)
                    mine = [c for c in children if c.startswith(node.prefix)]
                    if mine:
                        self._adopt_child(node, mine[0])
                if node.path is None:
                    children = self._create(node)
            else:
                children = self._children(node.parent)
                if node.child not in children:
                    node.path = None
                    node.create_sent = False
                    continue
            lower = [child for d, child in _ordered(children, node.seq) if d < 0]
            if not lower:
                if self._become_holder(node):
                    alone = len(children) == 1 and node.create_sent
                    node.next_seq = node.seq + 1 if alone else None
                    return node.fence
                continue
            pred = f"{node.parent}/{lower[-1]}"
            pred_lowest = len(lower) == 1
            if not waiting and not pred_lowest:
                return None
            node.pred, node.pred_lowest, node.pred_gone = pred, pred_lowest, False
            node.pred_expiry = None
            try:
                data, stat = self._get(
                    self._client.get_async(pred, watch=node.on_pred_event if waiting else None)
                )
            except NoNodeError:
                continue
            left_ms: float | None = None
            if pred_lowest:
                ttl_ms = _ttl_ms(data)
                if ttl_ms is not None:
                    left_ms = stat.mtime + ttl_ms + EXPIRY_MARGIN_MS - self._server_now_ms()
                if left_ms is not None and left_ms <= 0:
                    try:
                        self._get(self._client.delete_async(pred, version=stat.version))
                    except (NoNodeError, BadVersionError):
                        continue
                    log.info("lock %r: deleted the expired holder node %s", node.name, pred)
                    continue
            if not waiting:
                return None
            if left_ms is not None:
                node.pred_expiry = time.monotonic() + left_ms / 1000.0
            return None
        node.wake.set()  # too many races in a row: let the waiting loop come straight back
        return None

    def _restamp(self, node: _Node, ttl: float) -> bool:
        """``set_data`` our node with ``ttl``; False when the node is gone."""
        path = node.path
        if path is None:
            return False
        self._ready()
        sent = time.monotonic()
        try:
            stat = self._get(self._client.set_async(path, _stamp(ttl)))
        except NoNodeError:
            node.path = None
            node.create_sent = False
            node.holder = False
            return False
        node.stamped = sent
        self._note_clock(stat.mtime, sent)
        return True

    def _become_holder(self, node: _Node) -> bool:
        """We are lowest: re-stamp a stale node, then hold. False when our node vanished."""
        if time.monotonic() - node.stamped > node.ttl * RESTAMP_FRACTION and not self._restamp(
            node, node.ttl
        ):
            return False
        node.holder = True
        node.deadline = node.stamped + node.ttl
        node.pred = None
        node.next_seq = None
        return True

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        node = self._node_for(name, owner, ttl)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            timeout = deadline - now
            if node.pred_expiry is not None:
                timeout = min(timeout, max(node.pred_expiry - now, 0.0))
            if node.path is not None:
                timeout = min(timeout, max(node.stamped + ttl / 3 - now, 0.0))
            node.wake.wait(min(timeout, 60.0))
            node.wake.clear()
            self._check_open()
            # Our predecessor was the holder and is gone: we hold now, no read needed.
            if (
                node.pred_gone
                and node.pred_lowest
                and node.path is not None
                and self._call(lambda: self._become_holder(node), f"acquire {name!r}")
            ):
                return node.fence, node.stamped
            if node.path is not None and time.monotonic() - node.stamped >= ttl / 3:
                # Keep a long wait's stamp fresh, so we are never judged expired at handoff.
                self._call(lambda: self._restamp(node, ttl), f"acquire {name!r}")
            fence = self._call(lambda: self._attempt(node, True), f"acquire {name!r}")
            if fence is not None:
                return fence, node.stamped

    def _abandon(self, owner: str) -> None:
        """Forget an acquisition that did not end with a lease; delete its node (async)."""
        with self._lock:
            node = self._nodes.get(owner)
            if node is None or node.lease is not None:
                return
            del self._nodes[owner]
        node.abandoned = True
        path = node.path
        if path is not None:
            node.path = None

            def done(result: Any) -> None:
                if not result.successful() and not isinstance(result.exception, NoNodeError):
                    self._orphan(node)

            try:
                self._client.delete_async(path).rawlink(done)
            except KazooException:
                self._orphan(node)
        elif node.create_sent:
            self._orphan(node)

    def _orphan(self, node: _Node) -> None:
        if self._closing:
            return
        with self._lock:
            self._orphans[node.owner] = node.parent

    def _cleanup_orphans(self) -> None:
        """Delete nodes of abandoned acquisitions, found by their GUID (as Curator does)."""
        with self._lock:
            orphans = dict(self._orphans)
        for owner, parent in orphans.items():
            for child in self._children(parent):
                if child.startswith(owner + LOCK_MARK):
                    with contextlib.suppress(NoNodeError):
                        self._get(self._client.delete_async(f"{parent}/{child}"))
                    log.info("deleted orphan lock node %s/%s", parent, child)
            with self._lock:
                self._orphans.pop(owner, None)

    def _release(self, name: str, owner: str) -> bool:
        with self._lock:
            node = self._nodes.get(owner)
            if node is None or node.name != name:
                return False
            del self._nodes[owner]
        if not node.holder or node.path is None or self._closed:
            return False
        path = node.path
        expired = time.monotonic() >= node.deadline

        sent = 0
        began = time.monotonic()

        def delete() -> bool:
            nonlocal sent
            self._ready()
            sent += 1
            try:
                self._get(self._client.delete_async(path))
            except NoNodeError:
                return sent > 1  # an earlier attempt's delete landed; its reply was lost
            if sent == 1 and node.next_seq is not None:
                with self._lock:
                    self._quiet[node.parent] = (node.next_seq, began + QUIET_TTL)
            return True

        try:
            deleted = self._call(delete, f"release {name!r}")
        except BackendUnavailable:
            self._orphan(node)
            raise
        finally:
            node.holder = False
            node.path = None
        return deleted and not expired

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        with self._lock:
            node = self._nodes.get(owner)
        if node is None or node.name != name or not node.holder or node.path is None:
            return False
        if self._closed:
            return False
        if not self._connected.is_set():
            raise BackendUnavailable(f"extend {name!r}: ZooKeeper connection suspended")
        left = node.deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            ok = call_with_retry(
                lambda: self._restamp(node, ttl),
                transient=self.transient_errors,
                deadline=min(left, self.retry_deadline, 2.0),
                what=f"extend {name!r}",
            )
        except KazooException as exc:
            raise BackendUnavailable(f"extend {name!r}: {exc!r}") from exc
        if ok:
            node.ttl = ttl
            node.deadline = node.stamped + ttl
        return ok

    # -- claims ------------------------------------------------------------------------------

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        token = uuid.uuid4().hex
        return self._call(lambda: self._claim_round(keys, hold, token), "claim")

    def _claim_round(self, keys: Sequence[str], hold: float, token: str) -> set[str]:
        """One pipelined batch of multis: create every claim; replace the expired ones.

        A claim is ``claims/<key>`` (data: hold and claimer token) with one child named by the
        claimer's token: the identity of that incarnation. Replacing an expired claim is one
        multi – delete the old token child, create ours, set the data – so exactly one replacer
        wins, and a claim recreated meanwhile (same path, version back at 0: the ABA case a
        delete-with-version would miss) is never touched. The ``set_data`` in each multi also
        returns the server clock (mtime), which judges expiry.
        """
        self._ready()
        client = self._client
        data = json.dumps({"hold_ms": math.ceil(hold * 1000), "by": token}).encode()
        paths = {key: f"{self._claims_dir}/{escape(key)}" for key in keys}

        def create(path: str) -> Any:
            tx = client.transaction()
            tx.create(path, data)
            tx.create(f"{path}/{token}", b"")
            tx.set_data(path, data)
            return tx.commit_async()

        won: set[str] = set()
        if len(paths) > 1:  # fast path: fresh keys in a few multis, one log write each
            won, rest = self._claim_batches(paths, data, token)
            if not rest:
                return won
            paths = {key: paths[key] for key in rest}
        sent = time.monotonic()
        results = {key: create(path) for key, path in paths.items()}
        existing: list[str] = []
        for key, result in results.items():
            outcome = self._get(result)
            if isinstance(outcome[0], NoNodeError):  # no claims directory yet
                self._get(client.ensure_path_async(self._claims_dir))
                outcome = self._get(create(paths[key]))
            if isinstance(outcome[0], NodeExistsError):
                existing.append(key)
            elif any(isinstance(item, Exception) for item in outcome):
                raise BackendUnavailable(f"claim {key!r}: {outcome!r}")
            else:
                self._note_clock(outcome[-1].mtime, sent)
                won.add(key)
        if not existing:
            return won
        reads = {key: client.get_async(paths[key]) for key in existing}
        now_ms = self._server_now_ms(refresh=True)
        sent = time.monotonic()
        replacing = {}
        for key, result in reads.items():
            try:
                raw, stat = self._get(result)
            except NoNodeError:  # swept meanwhile: claim it afresh
                replacing[key] = create(paths[key])
                continue
            info = _claim_info(raw)
            if info.get("by") == token:
                won.add(key)  # an earlier attempt of this call won (its reply was lost)
            elif now_ms >= stat.mtime + int(info.get("hold_ms", 0)):
                tx = client.transaction()
                tx.delete(f"{paths[key]}/{info.get('by')}")
                tx.create(f"{paths[key]}/{token}", b"")
                tx.set_data(paths[key], data)
                replacing[key] = tx.commit_async()
        for key, result in replacing.items():
            outcome = self._get(result)
            if not any(isinstance(item, Exception) for item in outcome):
                self._note_clock(outcome[-1].mtime, sent)
                won.add(key)
        return won

    def _claim_batches(
        self, paths: dict[str, str], data: bytes, token: str
    ) -> tuple[set[str], list[str]]:
        """Create the claims of up to ``CLAIM_BATCH`` keys per multi, all multis pipelined.

        A multi is all-or-nothing: one key that exists (claimed elsewhere, or a missing claims
        directory) rolls its whole batch back. Returns the keys won and those left for the
        per-key round, which sorts out existing, expired and own (lost-reply) claims.
        """
        client = self._client
        keys = list(paths)
        sent = time.monotonic()
        pending = []
        for start in range(0, len(keys), CLAIM_BATCH):
            chunk = keys[start : start + CLAIM_BATCH]
            tx = client.transaction()
            for key in chunk:
                tx.create(paths[key], data)
                tx.create(f"{paths[key]}/{token}", b"")
            tx.set_data(paths[chunk[0]], data)  # its stat carries the server clock
            pending.append((chunk, tx.commit_async()))
        won: set[str] = set()
        rest: list[str] = []
        for chunk, result in pending:
            outcome = self._get(result)
            if any(isinstance(item, Exception) for item in outcome):
                rest.extend(chunk)
            else:
                self._note_clock(outcome[-1].mtime, sent)
                won.update(chunk)
        return won, rest

    # -- cleanup -----------------------------------------------------------------------------

    def sweep(self) -> dict[str, int]:
        """One cleanup pass: expired claims, lock directories empty since the last pass, orphan
        nodes. Runs every ``sweep_interval`` on the worker thread; safe to run from many
        instances at once (every delete carries a version). Returns counts of what it deleted.
        """
        counts = {"claims": self._sweep_claims(), "lock_dirs": self._sweep_lock_dirs()}
        self._cleanup_orphans()
        return counts

    def _sweep_claims(self) -> int:
        """Delete expired claims (token child and claim in one multi, version-checked)."""
        client = self._client
        children = self._children(self._claims_dir)
        if not children:
            return 0
        now_ms = self._server_now_ms(refresh=True)
        deleted = 0
        for start in range(0, len(children), SWEEP_BATCH):
            batch = [f"{self._claims_dir}/{c}" for c in children[start : start + SWEEP_BATCH]]
            reads = [(path, client.get_async(path)) for path in batch]
            deletes = []
            for path, result in reads:
                try:
                    raw, stat = self._get(result)
                except NoNodeError:
                    continue
                info = _claim_info(raw)
                if now_ms >= stat.mtime + int(info.get("hold_ms", 0)):
                    tx = client.transaction()
                    if stat.numChildren:
                        tx.delete(f"{path}/{info.get('by')}")
                    tx.delete(path, version=stat.version)
                    deletes.append(tx.commit_async())
            for result in deletes:
                if not any(isinstance(item, Exception) for item in self._get(result)):
                    deleted += 1
            if deleted >= SWEEP_MAX_DELETES:
                break
        return deleted

    def _sweep_lock_dirs(self) -> int:
        client = self._client
        names = self._children(self._locks_dir)
        stats = [(n, client.exists_async(f"{self._locks_dir}/{n}")) for n in names]
        empty: dict[str, tuple[int, float]] = {}
        deletes = []
        now = time.monotonic()
        for name, result in stats:
            stat = self._get(result)
            if stat is None or stat.numChildren:
                continue
            seen = self._empty_dirs.get(name)
            if seen is None or seen[0] != stat.pzxid:
                empty[name] = (stat.pzxid, now)
            elif now - seen[1] >= LOCK_DIR_MIN_IDLE:  # empty and untouched long enough
                path = f"{self._locks_dir}/{name}"
                deletes.append(client.delete_async(path, version=stat.version))
            else:
                empty[name] = seen
        deleted = 0
        for result in deletes[:SWEEP_MAX_DELETES]:
            with contextlib.suppress(NoNodeError, NotEmptyError, BadVersionError):
                self._get(result)
                deleted += 1
        self._empty_dirs = empty
        return deleted

    # -- listing and history -----------------------------------------------------------------

    def locks(self) -> list[LockInfo]:
        """Every held lock under this chroot: name, owner token, fence (czxid), expiry."""
        return self._call(self._list_locks, "locks")

    def _list_locks(self) -> list[LockInfo]:
        self._ready()
        client = self._client
        dirs = self._children(self._locks_dir)
        listings = [(d, client.get_children_async(f"{self._locks_dir}/{d}")) for d in dirs]
        heads = []
        for d, result in listings:
            try:
                children = self._get(result)
            except NoNodeError:
                continue
            seqs = [c for c in children if _seq(c) is not None]
            if not seqs:
                continue
            order = _ordered(seqs, _seq(seqs[0]) or 0)
            head = order[0][1]
            heads.append((d, head, client.get_async(f"{self._locks_dir}/{d}/{head}")))
        now_ms = self._server_now_ms()
        infos = []
        for d, head, result in heads:
            try:
                data, stat = self._get(result)
            except NoNodeError:
                continue
            ttl_ms = _ttl_ms(data)
            expires = None if ttl_ms is None else (stat.mtime + ttl_ms) / 1000.0
            if expires is not None and now_ms >= expires * 1000.0:
                continue  # expired: the next contender will delete it
            owner = head.rpartition(LOCK_MARK)[0]
            infos.append(LockInfo(unquote(d), owner, int(stat.czxid), expires))
        infos.sort(key=lambda info: info.name)
        return infos

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run`` (keyed by ``run_id``); keeps ``history_limit`` runs per job."""
        self._call(lambda: self._record_run(run), "record_run")

    def _record_run(self, run: RunRecord) -> None:
        self._ready()
        job_dir = f"{self._runs_dir}/{escape(run.job)}"
        path = f"{job_dir}/{escape(run.run_id)}"
        data = json.dumps(asdict(run)).encode()
        try:
            self._get(self._client.set_async(path, data))
            return
        except NoNodeError:
            pass
        try:
            self._get(self._client.create_async(path, data, makepath=True))
        except NodeExistsError:
            self._get(self._client.set_async(path, data))
            return
        stat = self._get(self._client.exists_async(job_dir))
        if stat is not None and stat.numChildren > self.history_limit + self.history_limit // 10:
            self._trim_history(job_dir)  # amortized: reads the job's runs once per limit/10 runs

    def _trim_history(self, job_dir: str) -> None:
        runs = self._read_runs(job_dir)
        runs.sort(key=lambda pair: pair[1].started, reverse=True)
        deletes = [
            self._client.delete_async(f"{job_dir}/{child}")
            for child, _ in runs[self.history_limit :]
        ]
        for result in deletes:
            with contextlib.suppress(NoNodeError):
                self._get(result)

    def _read_runs(self, job_dir: str) -> list[tuple[str, RunRecord]]:
        children = self._children(job_dir)
        reads = [(c, self._client.get_async(f"{job_dir}/{c}")) for c in children]
        runs = []
        for child, result in reads:
            try:
                raw, _ = self._get(result)
                runs.append((child, RunRecord(**json.loads(raw))))
            except NoNodeError:
                continue
            except (ValueError, TypeError):
                log.warning("ignoring unreadable run record %s/%s", job_dir, child)
        return runs

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first (by start time), optionally of one ``job``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive int")

        def read() -> list[RunRecord]:
            self._ready()
            jobs = [escape(job)] if job is not None else self._children(self._runs_dir)
            runs: list[RunRecord] = []
            for j in jobs:  # at most history_limit per job (trimming lags by up to 10 %)
                kept = [r for _, r in self._read_runs(f"{self._runs_dir}/{j}")]
                kept.sort(key=lambda r: r.started, reverse=True)
                runs.extend(kept[: self.history_limit])
            runs.sort(key=lambda r: r.started, reverse=True)
            return runs[:limit]

        return self._call(read, "history")

    # -- shutdown ----------------------------------------------------------------------------

    def _close(self) -> None:
        self._closing = True
        self._events.put(_STOP)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=5)
        with self._lock:
            nodes = list(self._nodes.values())
        for node in nodes:
            node.wake.set()
        try:
            self._client.stop()
            self._client.close()
        except Exception:  # pragma: no cover - best effort
            log.exception("zookeeper: error while closing the client")
        for node in nodes:
            if node.holder and node.lease is not None:
                node.holder = False
                node.lease._mark_lost("coordinator closed: its ZooKeeper session ended")


def _duration(key: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigurationError(f"bad {key} {value!r}: {exc}") from exc


def _claim_info(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
