"""``ZooKeeperCoordinator``: the backend's hooks, wiring the session, lock nodes, claims and
history together (see the package docstring for the layout and ``docs/backends/zookeeper.md``).

The ticket of an acquire call is its :class:`~._locks.LockNode` (the waiter node); waiting
blocks on a watch of the predecessor: a :class:`threading.Event` for the sync API, an asyncio
future completed from kazoo's thread (``loop.call_soon_threadsafe``) for the async API, so a
waiting task never holds a worker thread. Every other async hook runs the sync one on the
coordinator's worker threads (kazoo has no asyncio client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..._attempt import Attempt
from ..._base import BaseCoordinator
from ..._errors import ConfigurationError
from ..._protocol import LockInfo, RunRecord, ServerInfo
from ..._validate import check_records, check_seconds
from ._claims import Claims
from ._history import History, list_locks
from ._layout import ROOT
from ._locks import LockNode, Locks
from ._options import make_tls, node_acl, parse_url
from ._session import Session
from ._states import StateWorker

try:
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.security import ACL
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")
T = TypeVar("T")

# A forked child may inherit this lock held by a thread that does not exist there: renew it.
# The pid is kept here so the hot path needs no system call to notice a fork.
_fork_guard = threading.Lock()
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _fork_guard, _pid
    _fork_guard = threading.Lock()
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ZooKeeperCoordinator(BaseCoordinator):
    """Locks, claims and run history on ZooKeeper.

    Options (keyword arguments or URL query parameters):

    * ``session_timeout`` – seconds (default 10): the ZooKeeper session timeout asked for.
      A crashed holder's locks disappear this long after its last contact, whatever its ttl.
    * ``sweep_interval`` – seconds between cleanup passes (expired claims, empty lock
      directories, orphan nodes); default 60, ``0`` turns sweeping off.
    * ``history_limit`` – runs kept per job (default 1000; older ones are deleted in batches).
    * ``retry_deadline`` – seconds to wait for a connection / retry a failing request before
      :class:`~coordlock.BackendUnavailable` (see :class:`~coordlock._base.BaseCoordinator`).
    * ``read_acl`` – with credentials: ``scheme:id`` entries (comma-separated) granted READ on
      every node, e.g. a monitoring identity ``digest:monitor:<base64 sha1>``.
    * ``use_ssl``, ``ca``, ``certfile``, ``keyfile``, ``keyfile_password``, ``verify_certs``,
      ``check_hostname`` – kazoo's TLS options (PEM files).

    A ``user:password@`` in the URL is sent as ``digest`` authentication, and then every node
    coordlock creates carries an ACL granting all permissions to that identity only (plus READ
    for ``read_acl``). Without credentials nodes get ZooKeeper's world ACL (anyone may delete).
    """

    backend_name = "zookeeper"
    #: ``_wait`` returns as soon as the predecessor changed (a watch), or the holder may have
    #: expired, or our own stamp needs refreshing.
    wakes_waiters = True

    def __init__(
        self,
        hosts: str,
        chroot: str = "",
        *,
        session_timeout: float = 10.0,
        sweep_interval: float = 60.0,
        history_limit: int = 1000,
        auth: tuple[str, str] | None = None,
        read_acl: tuple[ACL, ...] = (),
        use_ssl: bool = False,
        ca: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        keyfile_password: str | None = None,
        verify_certs: bool = True,
        check_hostname: bool = False,
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
        self.acl = node_acl(auth, tuple(read_acl))
        tls = make_tls(
            use_ssl, ca, certfile, keyfile, keyfile_password, verify_certs, check_hostname
        )
        self._session = Session(
            hosts,
            timeout=self.session_timeout,
            auth=auth,
            acl=self.acl,
            tls=tls,
            on_state=self._on_state,
        )
        self._locks = Locks(self._session, f"{self.root}/locks")
        self._claims = Claims(
            self._session, f"{self.root}/claims", f"{self.root}/locks", f"{self.root}/clock"
        )
        self._history = History(self._session, f"{self.root}/runs", history_limit)
        self._states = StateWorker(
            self._session,
            self._locks,
            self,
            sweep=self.sweep,
            sweep_interval=self.sweep_interval,
            transient=(Exception,),
            stale_after=self.retry_deadline + self.session_timeout,
        )
        self._states.start()
        self._session.start()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ZooKeeperCoordinator:
        """``zookeeper://[user:password@]h1:2181,h2:2181[/chroot][?session_timeout=10]``."""
        hosts, chroot, kwargs = parse_url(url, options)
        try:
            return cls(hosts, chroot, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad zookeeper:// option: {exc}") from exc

    def __repr__(self) -> str:
        return f"<ZooKeeperCoordinator {self.hosts}{self.chroot}>"

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        """The current kazoo client (a forked child gets its own)."""
        return self._session.client

    def _on_state(self, state: str, at: float) -> None:
        self._states.on_state(state, at)

    def _check_fork(self) -> None:
        """In a forked child, before anything else: forget the parent's session."""
        if self._session.pid != _pid:
            self._after_fork()

    def _after_fork(self) -> None:
        """A forked child must not speak on its parent's session (kazoo's threads did not
        survive the fork, and a close would end the parent's session): drop the inherited
        client without a word to the server and start the child's own session. The parent's
        nodes are not the child's: it can neither renew nor release them."""
        with _fork_guard:
            if self._session.pid == os.getpid():
                return  # done already (the base and a hook may both notice the fork)
            self._locks.reset()
            self._claims.empty_dirs = {}
            if self._closed or self._session.closing:
                self._session.pid = os.getpid()
                return
            self._session.after_fork()
            self._states.reset_after_fork()

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` (safe to repeat) with the coordinator's retries and error table."""
        return self._policy.call(fn, what)

    # -- lock hooks --------------------------------------------------------------------------

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        self._check_fork()
        # The node is found by owner, not only by ticket: a retried first attempt (its reply
        # lost) has no ticket yet, and must find the node its first try created.
        node = self._locks.node_for(name, owner, ttl)
        # The first attempt does not know whether the caller will wait: it neither watches nor
        # reads a predecessor that is not the holder. A waiter's later attempts do.
        try:
            fence = self._locks.attempt(node, waiting=ticket is not None)
        except BaseException:
            # The core retries with the same owner; if it gives up before any attempt returned
            # (no ticket to abandon), the worker drops the node once the retries are surely over.
            node.failed_at = time.monotonic()
            raise
        node.failed_at = None
        if fence is not None:
            node.deadline = node.stamped + node.ttl
            return Attempt.granted(fence, started=node.stamped, ticket=node)
        return Attempt.busy(retry_in=node.retry_in(), ticket=node)

    def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        node: LockNode = ticket
        if not node.watching or node.path is None:
            return None  # no watch yet (first attempt) or requeue: try again at once
        node.wake.wait(self._locks.wait_bound(node, timeout))
        return self._woken(node)

    async def _async_wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        node: LockNode = ticket
        if not node.watching or node.path is None:
            return None
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def done() -> None:
            if not woken.done():
                woken.set_result(None)

        def wake() -> None:  # any thread (kazoo's watch callback, the state worker)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done)

        node.wakers.append(wake)
        try:
            if not node.wake.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken, self._locks.wait_bound(node, timeout))
        finally:
            node.wakers.remove(wake)
        return await self._in_thread(self._woken, node)

    def _woken(self, node: LockNode) -> Attempt | None:
        """After a wake-up: hold (the holder before us is gone), or None (try again)."""
        self._check_open()
        if self._locks.after_wake(node):
            node.deadline = node.stamped + node.ttl
            return Attempt.granted(node.fence, started=node.stamped, ticket=node)
        return None

    def _abandon(self, name: str, owner: str, ticket: Any) -> None:
        self._locks.abandon(owner)

    def _release(self, name: str, owner: str) -> bool:
        self._check_fork()
        return self._locks.release(name, owner)

    def _release_later(self, name: str, owner: str, linger: float) -> bool:
        self._check_fork()
        kept = self._locks.release_later(name, owner, linger)
        if kept:
            self._states.wake()  # it deletes the node when the hold is over
        return kept

    def _force_release(self, name: str) -> bool:
        self._check_fork()
        return self._locks.force_release(name)

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        self._check_fork()
        node = self._locks.get(owner)
        if node is None or node.name != name or not node.holder or node.path is None:
            return False
        if self._closed or node.presumed_lost:
            return False
        # The wait ends by the lease's deadline: a frozen connection (no reply, no error) must
        # not hold the renewal past it.
        remaining = node.deadline - time.monotonic()
        if remaining <= 0:
            raise KazooTimeoutError("the lease ended before it could be renewed")
        ok = self._locks.restamp(node, ttl, timeout=remaining)
        if ok:
            node.ttl = ttl
            node.deadline = node.stamped + ttl
        return ok

    # -- claims, cleanup, listing, history ---------------------------------------------------

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        self._check_fork()
        # One token for every retry of this call, so a retry recognises the claims its
        # earlier attempt won (a reply lost on a dropped connection).
        token = uuid.uuid4().hex
        return self._call(lambda: self._claims.claim_round(keys, hold, token), "claim")

    def sweep(self) -> dict[str, int]:
        """One cleanup pass: expired claims, lock directories empty since the last pass, orphan
        nodes. Runs every ``sweep_interval`` on the worker thread; safe to run from many
        instances at once (every delete carries a version). Returns counts of what it deleted.
        """
        self._check_fork()
        counts = {
            "claims": self._claims.sweep_claims(),
            "lock_dirs": self._claims.sweep_lock_dirs(),
        }
        self._locks.cleanup_orphans()
        return counts

    def locks(self) -> list[LockInfo]:
        """Every held lock under this chroot: name, owner token, fence (czxid), expiry."""
        self._check_fork()
        return self._call(lambda: list_locks(self._session, self._locks.dir), "locks")

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run`` (keyed by ``run_id``); keeps ``history_limit`` runs per job."""
        self._check_fork()
        self._call(lambda: self._history.record(run), "record_run")

    def record_runs(self, runs: Sequence[RunRecord]) -> None:
        """Store or update each of ``runs``: the writes are pipelined on the session (sent
        together, answered together), one synced write's time for the batch."""
        checked = check_records(runs)
        self._check_fork()
        if checked:
            self._call(lambda: self._history.record_many(checked), "record_runs")

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first (by start time), optionally of one ``job``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive int")
        self._check_fork()
        return self._call(lambda: self._history.runs(job, limit), "history")

    def server_info(self) -> ServerInfo:
        """Backend, server version (``srvr``, when the four-letter word is allowed) and server
        time: the ``mtime`` of a write to the clock node, read halfway through the request."""
        self._check_open()
        self._check_fork()

        def read() -> tuple[float, float]:
            self._session.ready()
            before = time.time()
            mtime_ms = self._session.refresh_clock(f"{self.root}/clock")
            return mtime_ms / 1000.0, (before + time.time()) / 2

        server_time, measured_at = self._call(read, "server_info")
        return ServerInfo("zookeeper", self._session.version(), server_time, measured_at)

    # -- shutdown ----------------------------------------------------------------------------

    def _close(self) -> None:
        if self._session.forked():
            self._locks.reset()  # the parent's nodes: not ours to touch, not ours to report
        session = self._session
        session.closing = True
        self._states.stop()
        nodes = self._locks.all()
        for node in nodes:
            node.poke()
        session.close()
        for node in nodes:
            if node.holder:
                node.holder = False
                self._report_lost(node.owner, "coordinator closed: its ZooKeeper session ended")
