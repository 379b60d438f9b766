"""One background thread per coordinator that renews held leases and notices lost ones."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ._errors import CoordlockError

if TYPE_CHECKING:
    from ._base import BaseCoordinator
    from ._lease import Lease

log = logging.getLogger("coordlock")

#: A lease is renewed when a third of its ttl has passed, as the design promises.
RENEW_FRACTION = 1 / 3


_renewers: weakref.WeakSet[Renewer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has no renewal thread: start afresh there (the parent keeps renewing its
    own leases; the child renews what it acquires itself)."""
    for renewer in list(_renewers):
        renewer._reset_after_fork()


class Renewer:
    """Renews every lease of one coordinator on a single daemon thread.

    A lease with ``renew=True`` is extended every ``ttl/3`` seconds. A failed renewal that the
    backend answers with "not yours" marks the lease lost at once; an error (server down) marks it
    at risk and is retried until the ttl runs out, then the lease is lost. A lease with
    ``renew=False`` is only watched: it is marked lost when its ttl elapses, so that is never
    silent either. The thread starts with the first lease and stops with :meth:`stop`.
    """

    def __init__(self, coordinator: BaseCoordinator) -> None:
        self._coordinator = coordinator
        self._heap: list[tuple[float, int, Lease]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._forgotten = 0  # releases since the heap was last compacted
        _renewers.add(self)

    def _reset_after_fork(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap = []
        self._thread = None

    def watch(self, lease: Lease) -> None:
        """Start renewing (or watching) ``lease``."""
        with self._cond:
            if self._stopped:
                return
            self._push(lease, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"coordlock-renewer-{id(self):x}", daemon=True
                )
                self._thread.start()
            if self._heap[0][2] is lease:  # only an earlier deadline needs the thread's attention
                self._cond.notify()

    def forget(self, lease: Lease) -> None:
        """``lease`` was released: drop it (lazily; the heap is compacted when mostly dead)."""
        self._forgotten += 1  # a heuristic: a lost increment under a race only delays compaction
        if self._forgotten < 1024:
            return
        with self._cond:
            if self._forgotten >= 1024:
                self._forgotten = 0
                self._heap = [e for e in self._heap if not (e[2].released or e[2]._lost)]
                heapq.heapify(self._heap)

    def stop(self) -> None:
        """Stop the thread; leases are no longer renewed."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _push(self, lease: Lease, now: float) -> None:
        if lease.renew:
            due = min(now + lease.ttl * RENEW_FRACTION, lease._deadline)
        else:
            due = lease._deadline
        heapq.heappush(self._heap, (due, next(self._seq), lease))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    timeout = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, lease = heapq.heappop(self._heap)
            if lease.released or lease._lost:
                continue
            self._service(lease)

    def _service(self, lease: Lease) -> None:
        now = time.monotonic()
        if now >= lease._deadline:
            lease._mark_lost(
                "ttl elapsed before it could be renewed (process paused or server unreachable)"
                if lease.renew
                else "ttl elapsed (renewal is off for this lease)"
            )
            return
        if not lease.renew:
            self._requeue(lease, now)
            return
        try:
            ok = self._coordinator.extend(lease, lease.ttl)
        except CoordlockError as exc:
            lease._mark_at_risk(f"renewal failed: {exc}")
            retry_at = min(time.monotonic() + max(lease.ttl / 10, 0.01), lease._deadline)
            with self._cond:
                if not self._stopped:
                    heapq.heappush(self._heap, (retry_at, next(self._seq), lease))
            return
        except Exception:
            log.exception("lease %r: unexpected error while renewing", lease.name)
            lease._mark_lost("unexpected error while renewing")
            return
        if ok:
            self._requeue(lease, time.monotonic())

    def _requeue(self, lease: Lease, now: float) -> None:
        with self._cond:
            if not self._stopped:
                self._push(lease, now)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
