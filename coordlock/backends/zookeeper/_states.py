"""Connection states wired to leases, on one worker thread per coordinator.

SUSPENDED marks every held lease at risk at once, and lost if the connection is not back
within a third of the negotiated session timeout (kazoo notices a dead connection up to 2/3 of
the timeout after the server last heard from it, so the server may expire the session 1/3
later); LOST (session expired) marks them lost at once; CONNECTED after SUSPENDED verifies each
node and restores the lease (``"restored"`` callbacks). The same thread runs the periodic
sweep. kazoo's listener only enqueues: nothing here runs on kazoo's thread.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..._errors import BackendUnavailable
from ._locks import LockNode, Locks
from ._session import Session

try:
    from kazoo.exceptions import KazooException
    from kazoo.protocol.states import KazooState
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")

#: A SUSPENDED connection is presumed to have lost its session after this share of the
#: negotiated session timeout.
SUSPEND_GRACE_FRACTION = 1 / 3
_STOP = object()


class Reporter(Protocol):
    """Where lease states go (the coordinator's protected ``_report_*`` API), by owner."""

    def _report_lost(self, owner: str, reason: str) -> None: ...

    def _report_at_risk(self, owner: str, reason: str) -> None: ...

    def _report_restored(self, owner: str) -> None: ...


class StateWorker:
    """Turns kazoo connection states into lease states; runs ``sweep`` every
    ``sweep_interval`` seconds (0: never) while connected."""

    def __init__(
        self,
        session: Session,
        locks: Locks,
        reporter: Reporter,
        *,
        sweep: Callable[[], object],
        sweep_interval: float,
        transient: tuple[type[BaseException], ...],
        stale_after: float = 60.0,
    ) -> None:
        self.session = session
        self.locks = locks
        self.reporter = reporter
        self.sweep = sweep
        self.sweep_interval = sweep_interval
        self.transient = transient
        self.stale_after = stale_after
        self.events: queue.Queue[Any] = queue.Queue()
        self.session_id = 0
        self.suspended_since: float | None = None
        self.grace_spent = False  # the current suspension already marked leases lost
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"coordlock-zookeeper-{id(self):x}", daemon=True
        )
        self.thread.start()

    def reset_after_fork(self) -> None:
        """A forked child: no worker thread, no pending events, a new session to come."""
        self.events = queue.Queue()
        self.session_id = 0
        self.suspended_since = None
        self.grace_spent = False
        self.start()

    def on_state(self, state: str, at: float) -> None:
        """kazoo listener (via the session): hand the change to the worker."""
        self.events.put((state, at))

    def wake(self) -> None:
        """Have the worker look at its deadlines again (a new lingering node)."""
        self.events.put(("wake", time.monotonic()))

    def stop(self) -> None:
        self.events.put(_STOP)
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def grace(self) -> float:
        """How long a SUSPENDED lease stays at risk before it is presumed lost (seconds)."""
        return self.session.negotiated_timeout * SUSPEND_GRACE_FRACTION

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.sweep_interval
        now = time.monotonic()
        next_sweep = now + interval * random.uniform(0.5, 1.0) if interval else math.inf
        pending_verify = False
        events = self.events
        while True:
            now = time.monotonic()
            due = next_sweep
            since = self.suspended_since
            if since is not None and not self.grace_spent:
                due = min(due, since + self.grace())
            if pending_verify:
                due = min(due, now + 0.5)
            linger = self.locks.next_linger()
            if linger is not None:
                due = min(due, linger)
            timeout = None if math.isinf(due) else max(due - now, 0.0)
            try:
                item = events.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP or self.session.closing:
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
                if pending_verify and self.session.connected.is_set():
                    self._verify_after_reconnect()
                    pending_verify = False
                linger = self.locks.next_linger()
                if (
                    linger is not None
                    and linger <= time.monotonic()
                    and self.session.connected.is_set()
                ):
                    self.locks.delete_lingering()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + interval * random.uniform(0.9, 1.1)
                    if self.session.connected.is_set():
                        self.locks.drop_stale(self.stale_after)
                        self.sweep()
            except (KazooException, *self.transient, BackendUnavailable) as exc:
                log.debug("zookeeper worker: %r (will retry)", exc)
            except Exception:
                log.exception("zookeeper worker: unexpected error")

    def _on_suspended(self, at: float) -> None:
        if self.suspended_since is None:
            self.suspended_since = at
            self.grace_spent = False
        reason = (
            "ZooKeeper connection SUSPENDED: the session may expire; the lease is lost "
            f"unless the connection is back within {self.grace():.1f}s"
        )
        for node in self.locks.holders():
            node.at_risk = True
            self.reporter._report_at_risk(node.owner, reason)

    def _check_suspension(self) -> None:
        since = self.suspended_since
        if since is None or self.grace_spent or time.monotonic() < since + self.grace():
            return
        self.grace_spent = True
        reason = (
            f"ZooKeeper connection suspended for more than {self.grace():.1f}s:"
            " the session may have expired"
        )
        for node in self.locks.holders():
            if not node.presumed_lost:
                node.presumed_lost = True
                self.reporter._report_lost(node.owner, reason)

    def _on_lost(self) -> None:
        """The session expired: every ephemeral node of ours is gone."""
        self.suspended_since = None
        old = self.session_id
        with self.locks.lock:
            self.locks.orphans.clear()
            self.locks.lingering.clear()
        for node in self.locks.all():
            # Nodes already created in a newer session (the worker may lag) are kept.
            if node.path is None or not old or node.session == old:
                self._forget(node, "ZooKeeper session expired (LOST)")

    def _forget(self, node: LockNode, reason: str) -> None:
        if self.locks.forget_session_node(node, reason):
            self.reporter._report_lost(node.owner, f"{reason}: its lock node is gone")

    def _on_connected(self) -> None:
        self.suspended_since = None
        current = self.session.session_id()
        previous, self.session_id = self.session_id, current
        if previous and current != previous:
            # A new session without a LOST event seen: the old session's nodes are gone.
            with self.locks.lock:
                self.locks.lingering.clear()
            for node in self.locks.all():
                if node.session == previous:
                    self._forget(node, "ZooKeeper session replaced")
        for node in self.locks.all():
            node.poke()

    def _verify_after_reconnect(self) -> None:
        """After CONNECTED: restore at-risk leases, delete nodes of lost ones, clear orphans."""
        session = self.session
        for node in self.locks.holders():
            path = node.path
            if path is None:
                continue
            if node.presumed_lost:
                self.locks.drop_node(node)  # others need not wait for its ttl
                continue
            if not node.at_risk:
                continue
            stat = session.get(session.client.exists_async(path))
            node.at_risk = False
            if stat is None:
                node.holder = False
                self.reporter._report_lost(node.owner, "lock node gone after reconnecting")
            elif time.monotonic() < node.deadline:
                log.info("lease %r restored: ZooKeeper reconnected", node.name)
                self.reporter._report_restored(node.owner)
        self.locks.drop_stale(self.stale_after)
        self.locks.cleanup_orphans()
