"""Lock nodes: the queue of one lock name, its holder, its waiters and their cleanup.

``<locks>/<name>/<owner>-lock-<seq>`` – one EPHEMERAL_SEQUENTIAL node per acquisition.
``<owner>`` is the acquisition's GUID (the lease's owner token). The lowest sequence holds the
lock; a waiter watches only its predecessor (no herd effect). The node's data is the lease ttl
in milliseconds: the lock expires ``ttl`` after the node's ``mtime`` (server clock) unless the
holder renews it (``set_data``), and the successor of an expired holder deletes it with a
version check.

fence = the ``czxid`` of our node: the 64-bit zxid of the transaction that created it. zxids
are totally ordered across the ensemble (``epoch << 32 | counter``), so successive holders –
whose nodes were created in sequence order – get strictly increasing fences, across client
restarts, server restarts and leader changes. Sequence numbers are not enough: they are per
directory (a swept and recreated directory starts again at 0) and 32-bit (they wrap).

Clock bounds (see ``_clock.py``): another owner's node is judged expired against a LOWER bound
of server time (``ServerClock.at_least_ms``, anchored at replies); our own lease deadline counts
from the SEND time of our last stamp (``LockNode.stamped``), so it never outlives the node.

One :class:`LockNode` is the per-acquisition state: the ticket of an acquire call, also found by
its owner token (a retried request of the same call must find the node it created). Nothing is
kept in thread-locals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..._errors import ConfigurationError
from ._layout import LOCK_MARK, escape, ordered, seq_of, stamp, ttl_ms
from ._session import Session

try:
    from kazoo.exceptions import BadVersionError, KazooException, NoNodeError
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.protocol.states import EventType
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")

#: A waiter that becomes the holder re-stamps its node when its stamp is older than this share
#: of the ttl (so a new lease starts with at least 90 % of its ttl).
RESTAMP_FRACTION = 0.1
#: Margin (ms) added to expiry judgements of other owners' nodes (mtime is in whole ms).
EXPIRY_MARGIN_MS = 2
#: The uncontended fast path: after releasing a node that was alone in its directory, the next
#: create there must get exactly the next sequence number for the directory to be known empty
#: (ZooKeeper's sequence counter counts creates only). Trusted for this many seconds.
QUIET_TTL = 60.0
#: Races in a row one attempt tolerates before handing back to the waiting loop.
MAX_ROUNDS = 16
#: Lock directories remembered by name (the cache is emptied when full).
DIR_CACHE = 4096


class LockNode:
    """One acquisition (one owner token): its node in the lock's queue, once created."""

    __slots__ = (
        "_wake",
        "abandoned",
        "at_risk",
        "child",
        "create_sent",
        "deadline",
        "deletes_sent",
        "failed_at",
        "fence",
        "gone",
        "holder",
        "name",
        "next_seq",
        "owner",
        "parent",
        "path",
        "pred",
        "pred_expiry",
        "pred_gone",
        "pred_lowest",
        "prefix",
        "presumed_lost",
        "seq",
        "session",
        "stamped",
        "ttl",
        "wakers",
        "watching",
    )

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
        # time.monotonic() when the last stamp (create/set_data) was SENT: the server stamped
        # the node later, so stamped + ttl is never after the node's expiry.
        self.stamped = 0.0
        self.holder = False
        self.deadline = 0.0  # time.monotonic(): local end of the lease unless renewed
        self.gone = ""  # why the node is known gone (session expired), if it is
        self.at_risk = False  # reported at risk (connection SUSPENDED), not yet restored
        self.presumed_lost = False  # reported lost while suspended: delete the node on reconnect
        self.abandoned = False
        self.deletes_sent = 0  # release: deletes sent (a retry after a lost reply finds NoNode)
        self.watching = False  # a watch is set on the predecessor (a waiter)
        self.failed_at: float | None = None  # monotonic: the last attempt raised (see stale)
        self.next_seq: int | None = None  # if alone: the next create's seq when still quiet
        self.pred: str | None = None
        self.pred_lowest = False
        self.pred_gone = False
        self.pred_expiry: float | None = None  # time.monotonic() when pred may have expired
        self._wake: threading.Event | None = None
        self.wakers: list[Callable[[], None]] = []  # async waiters (loop.call_soon_threadsafe)

    @property
    def wake(self) -> threading.Event:
        """Set when the waiter should look again (created on first use: the uncontended path
        never needs one). Stays set until the waiter consumed it, so no wake-up is lost."""
        wake = self._wake
        if wake is None:
            wake = self._wake = threading.Event()
        return wake

    def poke(self) -> None:
        """Wake the waiter (sync or async), if there is one. Any thread."""
        self.wake.set()
        for waker in list(self.wakers):
            waker()

    def on_pred_event(self, event: Any) -> None:
        """kazoo watch callback (kazoo's thread): note a deleted predecessor and wake up."""
        if event.path == self.pred and event.type == EventType.DELETED:
            self.pred_gone = True
        self.poke()

    def retry_in(self) -> float | None:
        """Seconds until the lowest predecessor (the holder) may have expired, if known."""
        if not self.pred_lowest or self.pred_expiry is None:
            return None
        return max(self.pred_expiry - time.monotonic(), 0.0)


class Locks:
    """The lock nodes of one session: acquisitions in progress, holders, orphans."""

    def __init__(self, session: Session, locks_dir: str) -> None:
        self.session = session
        self.dir = locks_dir
        self.reset()

    def reset(self) -> None:
        """Forget every acquisition (a forked child: the parent's nodes are not ours)."""
        self.lock = threading.Lock()
        self.nodes: dict[str, LockNode] = {}
        self.orphans: dict[str, str] = {}  # owner -> lock directory
        self.quiet: dict[str, tuple[int, float]] = {}  # dir -> (next seq, trusted until)
        # Nodes kept after release for hold_at_least: (delete at, monotonic; path).
        self.lingering: list[tuple[float, str]] = []
        self._dirs: dict[str, str] = {}  # lock name -> its directory

    def lock_dir(self, name: str) -> str:
        """The directory of lock ``name`` (escaping cached: the hot path asks every time)."""
        path = self._dirs.get(name)
        if path is None:
            if len(self._dirs) >= DIR_CACHE:
                self._dirs.clear()
            path = self._dirs[name] = f"{self.dir}/{escape(name)}"
        return path

    def node_for(self, name: str, owner: str, ttl: float) -> LockNode:
        """The node of acquisition ``owner`` (made on first use). Single dict operations are
        atomic, so the hot path takes no lock."""
        node = self.nodes.get(owner)
        if node is None:
            node = self.nodes.setdefault(owner, LockNode(name, owner, self.lock_dir(name), ttl))
        return node

    def get(self, owner: str) -> LockNode | None:
        return self.nodes.get(owner)

    def holders(self) -> list[LockNode]:
        with self.lock:
            return [n for n in self.nodes.values() if n.holder]

    def all(self) -> list[LockNode]:
        with self.lock:
            return list(self.nodes.values())

    # -- taking the lock -------------------------------------------------------------------

    def create(self, node: LockNode) -> list[str] | None:
        """Create our node and read the directory in one pipelined round trip.

        Returns the directory's children, or None when the directory is known to hold only our
        node: this session's last node there was alone and released less than
        :data:`QUIET_TTL` ago, and the create got exactly the expected sequence number (nobody
        else created a node since), so the read is skipped.
        """
        session = self.session
        session.ready()
        client = session.client
        sent = time.monotonic()
        quiet = self.quiet.pop(node.parent, None)
        expected = quiet[0] if quiet is not None and quiet[1] > sent else None
        node.create_sent = True
        created = client.create_async(
            f"{node.parent}/{node.prefix}",
            stamp(node.ttl),
            ephemeral=True,
            sequence=True,
            makepath=True,
            include_data=True,
        )
        listed = client.get_children_async(node.parent) if expected is None else None
        try:
            path, stat = session.get(created)
        except KazooTimeoutError:
            created.rawlink(lambda result: self._late_create(node, result))
            raise
        session.clock.note_reply(stat.ctime, time.monotonic())
        child = path[len(node.parent) + 1 :]
        node.path = path
        node.child = child
        node.seq = seq = int(child[len(node.prefix) :])
        node.fence = stat.czxid
        node.session = stat.ephemeralOwner
        node.stamped = sent
        node.gone = ""
        if seq == expected:
            return None
        children: list[str] | None = None
        if listed is not None:
            with contextlib.suppress(NoNodeError):  # our create made the directory (makepath)
                children = session.get(listed)
        if children is None or child not in children:
            children = session.get(client.get_children_async(node.parent))
        return list(children)

    def _late_create(self, node: LockNode, result: Any) -> None:
        """A create whose wait timed out finished later: delete it if nobody wants it."""
        if not node.abandoned or not result.successful():
            return
        path, _ = result.get()
        self.session.client.delete_async(path)

    def _adopt_child(self, node: LockNode, child: str) -> None:
        """Take over our own node found by GUID after a create whose reply was lost."""
        path = f"{node.parent}/{child}"
        stat = self.session.get(self.session.client.exists_async(path))
        if stat is None:
            return
        log.info("lock %r: recovered our node %s after a lost create reply", node.name, child)
        node.path = path
        node.child = child
        node.seq = seq_of(child) or 0
        node.fence = int(stat.czxid)
        node.session = int(stat.ephemeralOwner)
        node.stamped = -math.inf  # unknown age: re-stamp before holding
        node.gone = ""

    def attempt(self, node: LockNode, waiting: bool) -> int | None:
        """One attempt (idempotent per owner): the fence if we hold the lock, else None.

        When ``waiting``, our node stays queued with a watch on its predecessor; otherwise
        only a lowest predecessor is read (to delete it if it expired).
        """
        session = self.session
        for _ in range(MAX_ROUNDS):
            if node.holder:
                return node.fence
            if node.path is None:
                session.ready()
                children: list[str] | None = None
                if node.create_sent:  # an earlier create may have landed: look for our GUID
                    children = session.children(node.parent)
                    mine = [c for c in children if c.startswith(node.prefix)]
                    if mine:
                        self._adopt_child(node, mine[0])
                if node.path is None:
                    children = self.create(node)
                    if children is None:  # the quiet fast path: alone in the directory
                        self.become_holder(node)
                        node.next_seq = node.seq + 1
                        return node.fence
            else:
                children = session.children(node.parent)
                if node.child not in children:
                    node.path = None
                    node.create_sent = False
                    continue
            assert children is not None
            lower = [child for d, child in ordered(children, node.seq) if d < 0]
            if not lower:
                if self.become_holder(node):
                    alone = len(children) == 1 and node.create_sent
                    node.next_seq = node.seq + 1 if alone else None
                    return node.fence
                continue
            verdict = self._judge_predecessor(node, lower, waiting)
            if verdict != "again":
                return None
        node.poke()  # too many races in a row: let the waiting loop come straight back
        return None

    def _judge_predecessor(self, node: LockNode, lower: list[str], waiting: bool) -> str:
        """Read (and, when waiting, watch) our predecessor. ``"again"`` when the queue changed
        (it vanished, or it was an expired holder we deleted); ``"busy"`` otherwise."""
        pred = f"{node.parent}/{lower[-1]}"
        pred_lowest = len(lower) == 1
        if not waiting and not pred_lowest:
            return "busy"
        node.pred, node.pred_lowest, node.pred_gone = pred, pred_lowest, False
        node.pred_expiry = None
        node.watching = waiting
        session = self.session
        try:
            data, stat = session.get(
                session.client.get_async(pred, watch=node.on_pred_event if waiting else None)
            )
        except NoNodeError:
            return "again"
        left_ms: float | None = None
        if pred_lowest:
            ttl = ttl_ms(data)
            if ttl is not None:
                # A LOWER bound of server time: never judge a live holder expired.
                left_ms = stat.mtime + ttl + EXPIRY_MARGIN_MS - session.clock.at_least_ms()
            if left_ms is not None and left_ms <= 0:
                try:
                    session.get(session.client.delete_async(pred, version=stat.version))
                except (NoNodeError, BadVersionError):
                    return "again"
                log.info("lock %r: deleted the expired holder node %s", node.name, pred)
                return "again"
        if left_ms is not None:
            node.pred_expiry = time.monotonic() + left_ms / 1000.0
        return "busy"

    def restamp(self, node: LockNode, ttl: float, timeout: float | None = None) -> bool:
        """``set_data`` our node with ``ttl``; False when the node is gone. ``timeout``
        (seconds, default the operation timeout) bounds the wait for the reply: a renewal
        passes what is left of the lease, so a frozen connection cannot hold it longer."""
        path = node.path
        if path is None:
            return False
        session = self.session
        session.ready(0.0 if timeout is not None else 1.0)
        sent = time.monotonic()
        try:
            stat = session.get(session.client.set_async(path, stamp(ttl)), timeout)
        except NoNodeError:
            node.path = None
            node.create_sent = False
            node.holder = False
            return False
        # Our lease counts from the send; the server-clock reading from the reply.
        session.clock.note_reply(stat.mtime, time.monotonic())
        node.stamped = sent
        return True

    def become_holder(self, node: LockNode) -> bool:
        """We are lowest: re-stamp a stale node, then hold. False when our node vanished."""
        if time.monotonic() - node.stamped > node.ttl * RESTAMP_FRACTION and not self.restamp(
            node, node.ttl
        ):
            return False
        node.holder = True
        node.deadline = node.stamped + node.ttl
        node.pred = None
        node.next_seq = None
        return True

    def wait_bound(self, node: LockNode, timeout: float) -> float:
        """How long (seconds) a waiter may block before it must act anyway: ``timeout``, cut
        to when the holder may have expired and to when our own stamp needs refreshing."""
        now = time.monotonic()
        if node.pred_expiry is not None:
            timeout = min(timeout, max(node.pred_expiry - now, 0.0))
        if node.path is not None:
            timeout = min(timeout, max(node.stamped + node.ttl / 3 - now, 0.0))
        return max(min(timeout, 60.0), 0.0)

    def after_wake(self, node: LockNode) -> bool:
        """Act on a wake-up (or a bound reached). True when we hold the lock now (our
        predecessor was the holder and is gone: no read needed); False: look again."""
        node.wake.clear()
        if self.session.closing:
            raise ConfigurationError("the ZooKeeper coordinator is closed")
        if node.pred_gone and node.pred_lowest and node.path is not None:
            return self.become_holder(node)
        if node.path is not None and time.monotonic() - node.stamped >= node.ttl / 3:
            # Keep a long wait's stamp fresh, so we are never judged expired at handoff.
            self.restamp(node, node.ttl)
        return False

    # -- giving it back --------------------------------------------------------------------

    def abandon(self, owner: str) -> None:
        """An acquire call gave up (busy, timed out, failed, cancelled): forget its node and
        delete it (asynchronously; a failed delete is retried as an orphan)."""
        with self.lock:
            node = self.nodes.pop(owner, None)
        if node is None:
            return
        node.abandoned = True
        node.holder = False
        node.poke()
        path = node.path
        if path is not None:
            node.path = None

            def done(result: Any) -> None:
                if not result.successful() and not isinstance(result.exception, NoNodeError):
                    self.orphan(node)

            try:
                self.session.client.delete_async(path).rawlink(done)
            except KazooException:
                self.orphan(node)
        elif node.create_sent:
            self.orphan(node)

    def drop_stale(self, older_than: float) -> int:
        """Abandon acquisitions whose last attempt failed more than ``older_than`` s ago and
        that nobody retried since: the acquire call gave up (its retries are bounded), but
        without a ticket the core could not tell us. Their node, if the create landed, would
        otherwise sit in the queue until its ttl runs out."""
        limit = time.monotonic() - older_than
        stale = [
            n.owner
            for n in self.all()
            if n.failed_at is not None and n.failed_at < limit and not n.holder
        ]
        for owner in stale:
            self.abandon(owner)
        return len(stale)

    def orphan(self, node: LockNode) -> None:
        if self.session.closing:
            return
        with self.lock:
            self.orphans[node.owner] = node.parent

    def cleanup_orphans(self) -> None:
        """Delete nodes of abandoned acquisitions, found by their GUID (as Curator does)."""
        with self.lock:
            orphans = dict(self.orphans)
        session = self.session
        for owner, parent in orphans.items():
            for child in session.children(parent):
                if child.startswith(owner + LOCK_MARK):
                    with contextlib.suppress(NoNodeError):
                        session.get(session.client.delete_async(f"{parent}/{child}"))
                    log.info("deleted orphan lock node %s/%s", parent, child)
            with self.lock:
                self.orphans.pop(owner, None)
                node = self.nodes.get(owner)
                if node is not None and (node.abandoned or node.deletes_sent):
                    del self.nodes[owner]  # an abandoned or released acquisition: done

    def release(self, name: str, owner: str) -> bool:
        """Delete our node; returns only when it is gone. True when we still held the lock.

        Idempotent across retries of one release: the node stays known until a delete is
        answered, and a retry that finds it gone after an unanswered delete counts as done
        (that delete landed; its reply was lost). A node whose delete failed is also handed to
        the orphan cleanup (after a reconnect, or at the next sweep), in case no retry succeeds.
        """
        node = self.nodes.get(owner)
        if node is None or node.name != name:
            return False
        path = node.path
        if not node.holder or path is None or self.session.closing:
            # Not ours to delete. A node whose first create may have landed unanswered stays
            # known, for drop_stale to remove once its retries are surely over.
            if node.failed_at is None or self.session.closing:
                self._forget(node)
            return False
        session = self.session
        expired = time.monotonic() >= node.deadline
        began = time.monotonic()
        try:
            session.ready()
            node.deletes_sent += 1
            session.get(session.client.delete_async(path))
            deleted = True
        except NoNodeError:
            deleted = node.deletes_sent > 1  # an earlier delete landed; its reply was lost
        except BaseException:
            self.orphan(node)
            raise
        self._forget(node)
        node.holder = False
        node.path = None
        if deleted and node.deletes_sent == 1 and node.next_seq is not None:
            self.quiet[node.parent] = (node.next_seq, began + QUIET_TTL)
        return deleted and not expired

    def _forget(self, node: LockNode) -> None:
        self.nodes.pop(node.owner, None)
        if self.orphans:
            with self.lock:
                self.orphans.pop(node.owner, None)

    def release_later(self, name: str, owner: str, linger: float) -> bool:
        """Release for ``hold_at_least``: keep our node, stamped with ``linger`` as its ttl, so
        every contender judges it held until ``mtime + linger`` by the SERVER's clock (and
        deletes it then); it is deleted here too once ``linger`` has passed. True when we
        still held the lock. If this process dies meanwhile, the node goes with the session
        (``session_timeout`` after the last contact), which may end the hold early."""
        node = self.get(owner)
        if node is None or node.name != name or not node.holder or node.path is None:
            return False
        path = node.path
        if not self.restamp(node, linger):
            self._forget(node)
            return False
        with self.lock:
            self.lingering.append((node.stamped + linger, path))
        self._forget(node)
        node.holder = False
        node.path = None
        return True

    def next_linger(self) -> float | None:
        """When (monotonic) the next lingering node is due for deletion, if any."""
        with self.lock:
            return min((due for due, _ in self.lingering), default=None)

    def delete_lingering(self) -> int:
        """Delete the lingering nodes whose hold is over (a waiter may have done it already)."""
        now = time.monotonic()
        with self.lock:
            due = [path for at, path in self.lingering if at <= now]
            self.lingering = [(at, path) for at, path in self.lingering if at > now]
        results = [self.session.client.delete_async(path) for path in due]
        for result in results:
            with contextlib.suppress(NoNodeError):
                self.session.get(result)
        return len(due)

    def force_release(self, name: str) -> bool:
        """Delete the node holding ``name`` (the lowest), whoever owns it. True when one was
        deleted; the next holder's node is newer, so its fence (czxid) is greater."""
        session = self.session
        session.ready()
        parent = self.lock_dir(name)
        children = [c for c in session.children(parent) if seq_of(c) is not None]
        if not children:
            return False
        head = ordered(children, seq_of(children[0]) or 0)[0][1]
        try:
            session.get(session.client.delete_async(f"{parent}/{head}"))
        except NoNodeError:
            return False
        log.warning("lock %r: force-released (deleted %s/%s)", name, parent, head)
        return True

    # -- session events --------------------------------------------------------------------

    def forget_session_node(self, node: LockNode, reason: str) -> bool:
        """Our node went with its session: returns True when it was a holder's (that lease is
        lost); a waiter requeues with a new node at its next attempt."""
        was_holder = node.holder
        node.holder = False
        node.path = None
        node.gone = reason
        node.poke()
        return was_holder

    def drop_node(self, node: LockNode) -> None:
        """Delete the node of a lease presumed lost (so others need not wait for its ttl)."""
        path = node.path
        node.holder = False
        node.path = None
        if path is not None:
            with contextlib.suppress(NoNodeError):
                self.session.get(self.session.client.delete_async(path))
