"""``ZooKeeperCoordinator``: the backend's hooks, wiring the session, lock nodes, claims and
history together (see the package docstring for the layout and ``docs/backends/zookeeper.md``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..._base import BaseCoordinator
from ..._errors import BackendUnavailable, ConfigurationError
from ..._lease import Lease
from ..._protocol import LockInfo, RunRecord
from ..._retry import call_with_retry
from ..._validate import check_seconds, check_wait
from ._claims import Claims
from ._history import History, list_locks
from ._layout import ROOT
from ._locks import Locks
from ._options import make_tls, node_acl, parse_url
from ._session import Session
from ._states import StateWorker

try:
    from kazoo.exceptions import (
        AuthFailedError,
        ConnectionClosedError,
        ConnectionLoss,
        KazooException,
        NoAuthError,
        OperationTimeoutError,
        SessionExpiredError,
        SessionMovedError,
    )
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.security import ACL
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")
T = TypeVar("T")

# A forked child may inherit this lock held by a thread that does not exist there: renew it.
_fork_guard = threading.Lock()


def _renew_fork_guard() -> None:
    global _fork_guard
    _fork_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_fork_guard)


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
        self._locks = Locks(self._session, f"{self.root}/locks", self._call)
        self._claims = Claims(
            self._session, f"{self.root}/claims", f"{self.root}/locks", f"{self.root}/clock"
        )
        self._history = History(self._session, f"{self.root}/runs", history_limit)
        self._states = StateWorker(
            self._session,
            self._locks,
            sweep=self.sweep,
            sweep_interval=self.sweep_interval,
            transient=self.transient_errors,
        )
        self._tls = threading.local()
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
        if self._session.pid != os.getpid():
            with _fork_guard:
                if self._session.pid != os.getpid():
                    self._after_fork()

    def _after_fork(self) -> None:
        """A forked child must not speak on its parent's session (kazoo's threads did not
        survive the fork, and a close would end the parent's session): drop the inherited
        client without a word to the server and start the child's own session. The parent's
        nodes and leases are not the child's: it can neither renew nor release them."""
        self._locks.reset()
        self._claims.empty_dirs = {}
        self._tls = threading.local()
        if not self._closed:
            self._session.after_fork()
            self._states.reset_after_fork()

    def _wait_connected(self, what: str) -> None:
        """Wait (up to ``retry_deadline``) for a connection; kazoo reconnects by itself.

        Raises ConfigurationError at once for a permanent cause (host name unknown, TLS
        refused) and BackendUnavailable when the deadline passes.
        """
        session = self._session
        if session.connected.is_set():
            return
        deadline = time.monotonic() + self.retry_deadline
        while not session.connected.is_set():
            if self._closed or session.closing:
                raise ConfigurationError(f"{what}: the coordinator is closed")
            if not session.ever_connected:
                problem = session.diagnose()
                if problem is not None:
                    raise ConfigurationError(f"{what}: {problem}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendUnavailable(
                    f"{what}: no ZooKeeper server of {self.hosts} answered within "
                    f"{self.retry_deadline:g}s"
                )
            session.connected.wait(min(remaining, 1.0))

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` once connected, with bounded retries of transient errors; kazoo's other
        errors become coordlock errors (access refused: ConfigurationError)."""
        try:
            if not self._session.connected.is_set():
                self._wait_connected(what)
            try:
                return fn()
            except self.transient_errors:
                pass
            self._wait_connected(what)
            return call_with_retry(
                fn, transient=self.transient_errors, deadline=self.retry_deadline, what=what
            )
        except ConnectionClosedError as exc:
            raise ConfigurationError(f"{what}: the coordinator is closed") from exc
        except (NoAuthError, AuthFailedError) as exc:
            raise ConfigurationError(
                f"{what}: ZooKeeper refused access ({type(exc).__name__}): the nodes under "
                f"{self.root} belong to another identity; check the user:password in the URL"
            ) from exc
        except KazooException as exc:
            raise BackendUnavailable(f"{what}: {exc!r}") from exc

    # -- lock hooks --------------------------------------------------------------------------

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        """See :meth:`BaseCoordinator.acquire`. Waiters keep their place in the queue."""
        self._check_fork()
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
                self._locks.abandon(tls.owner)
            raise
        finally:
            tls.waiting = False
        owner, tls.owner = tls.owner, None
        if lease is None:
            if owner is not None:
                self._locks.abandon(owner)
            return None
        self._adopt_lease(lease)
        return lease

    def _adopt_lease(self, lease: Lease) -> None:
        node = self._locks.get(lease.owner)
        if node is None:
            return
        node.lease = lease
        node.deadline = lease._deadline
        if node.gone or not node.holder:
            lease._mark_lost(node.gone or "lock node gone before the lease was handed out")
            return
        self._states.adopt(node, lease)

    def _try_acquire(self, name: str, owner: str, ttl: float) -> int | None:
        waiting = bool(getattr(self._tls, "waiting", False))
        self._tls.owner = owner
        node = self._locks.node_for(name, owner, ttl)
        try:
            fence = self._call(lambda: self._locks.attempt(node, waiting), f"acquire {name!r}")
        except BaseException:
            self._locks.abandon(owner)
            raise
        if fence is None and not waiting:
            self._locks.abandon(owner)
        return fence

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        locks = self._locks
        node = locks.node_for(name, owner, ttl)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if locks.wait_step(node, deadline - now):
                return node.fence, node.stamped
            self._check_open()
            fence = self._call(lambda: locks.attempt(node, True), f"acquire {name!r}")
            if fence is not None:
                return fence, node.stamped

    def _release(self, name: str, owner: str) -> bool:
        self._check_fork()
        return self._locks.release(name, owner)

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        self._check_fork()
        node = self._locks.get(owner)
        if node is None or node.name != name or not node.holder or node.path is None:
            return False
        if self._closed:
            return False
        if not self._session.connected.is_set():
            raise BackendUnavailable(f"extend {name!r}: ZooKeeper connection suspended")
        deadline = node.deadline
        left = deadline - time.monotonic()
        if left <= 0:
            return False

        def restamp() -> bool:
            # Every wait ends by the lease's deadline: a frozen connection (no reply, no
            # error) must not keep the renewal thread past it.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KazooTimeoutError("the lease ended before the renewal was answered")
            return self._locks.restamp(node, ttl, timeout=remaining)

        try:
            ok = call_with_retry(
                restamp,
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

    # -- claims, cleanup, listing, history ---------------------------------------------------

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        self._check_fork()
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

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first (by start time), optionally of one ``job``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive int")
        self._check_fork()
        return self._call(lambda: self._history.runs(job, limit), "history")

    # -- shutdown ----------------------------------------------------------------------------

    def _close(self) -> None:
        if self._session.forked():
            self._locks.reset()  # the parent's nodes: not ours to touch, not ours to mark
        session = self._session
        session.closing = True
        self._states.stop()
        nodes = self._locks.all()
        for node in nodes:
            node.poke()
        session.close()
        for node in nodes:
            if node.holder and node.lease is not None:
                node.holder = False
                node.lease._mark_lost("coordinator closed: its ZooKeeper session ended")
