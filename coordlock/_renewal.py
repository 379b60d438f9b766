"""Background renewal of held leases: every ``ttl/3``, as the design promises.

One :class:`Renewer` per coordinator and I/O mode: sync leases are renewed on a daemon thread,
async leases on a task of their event loop. Both run the same loop (:meth:`Renewer._run`)
through their I/O object. The renewer only renews; noticing that a lease ran out is the
watchdog's job (:mod:`coordlock._watchdog`), so a renewal stuck on a frozen socket never delays
the loss being reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import _observe
from ._errors import CoordlockError
from ._io import AsyncIO, SyncIO, drive
from ._watchdog import COMPACT_AFTER, RENEW_FRACTION

if TYPE_CHECKING:
    from ._base import BaseCoordinator
    from ._lease import BaseLease

log = logging.getLogger("coordlock")

_sync_renewers: weakref.WeakSet[Renewer] = weakref.WeakSet()


class Renewer:
    """Renews the leases of one coordinator in one I/O mode (see the module docstring).

    A renewal the backend answers with "not yours" marks the lease lost at once. An error
    (server down, timeout) marks it at risk and is retried every ttl/10 while the ttl lasts;
    each attempt's retry budget is the lease's remaining time.
    """

    def __init__(self, coordinator: BaseCoordinator, io: SyncIO | AsyncIO) -> None:
        self._coordinator = coordinator
        self._io = io
        self._heap: list[tuple[float, int, int, BaseLease]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._event: Any = io.new_event()
        self._stopped = False
        self._dead = 0
        self._worker: threading.Thread | asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if not io.asynchronous:
            _sync_renewers.add(self)

    # -- called by leases and the coordinator -----------------------------------------------

    def schedule(self, lease: BaseLease) -> None:
        """Renew ``lease`` when a third of its current ttl has passed."""
        due = lease._deadline - lease.ttl * (1 - RENEW_FRACTION)
        self._push(lease, due)

    def hand_over(self, lease: BaseLease) -> None:
        """The watchdog's hand-over of a lease whose first renewal fell due (from its thread:
        no I/O here). An async renewer takes it on its own event loop."""
        loop = self._loop if self._io.asynchronous else None
        if loop is None:
            if self._io.asynchronous:  # no renewal task has run yet: use the lease's loop
                loop = getattr(lease, "loop", None)
            if loop is None:
                self.schedule(lease)
                return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the watchdog reports
            loop.call_soon_threadsafe(self.schedule, lease)

    def forget(self) -> None:
        """A lease ended: compact the heap now and then."""
        self._dead += 1  # a heuristic: a lost increment under a race only delays compaction
        if self._dead < COMPACT_AFTER:
            return
        with self._lock:
            if self._dead * 2 > len(self._heap):  # mostly dead (else: many live leases)
                self._heap = [e for e in self._heap if e[3]._alive()]
                heapq.heapify(self._heap)
            self._dead = 0

    def stop(self) -> None:
        """Stop renewing; leases then run out at their deadline (and are reported lost)."""
        self._stopped = True
        with self._lock:
            self._heap.clear()
        self._wake()
        worker = self._worker
        if isinstance(worker, threading.Thread):
            if worker is not threading.current_thread():
                worker.join(timeout=5)
        elif worker is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(worker.cancel)

    # -- internals --------------------------------------------------------------------------

    def _push(self, lease: BaseLease, due: float) -> None:
        if self._stopped:
            return
        with self._lock:
            heapq.heappush(self._heap, (due, next(self._seq), lease._gen, lease))
            first = self._heap[0][3] is lease
        if self._worker is None or self._io.asynchronous:
            self._ensure_worker()
        if first:
            self._wake()

    def _ensure_worker(self) -> None:
        worker = self._worker
        if self._io.asynchronous:
            running = asyncio.get_running_loop()
            if self._loop is not None and running is not self._loop:
                return  # a renewer serves the one loop it was made for (see AsyncLease.loop)
            if worker is None or worker.done():  # type: ignore[union-attr]
                self._loop = running
                self._worker = running.create_task(self._run(), name="coordlock-renewer")
        elif worker is None:  # the thread clears it when it ends, whatever ends it
            with self._lock:
                if self._worker is None:
                    self._worker = threading.Thread(
                        target=self._run_thread,
                        name=f"coordlock-renewer-{id(self):x}",
                        daemon=True,
                    )
                    self._worker.start()

    def _run_thread(self) -> None:
        try:
            drive(self._run())
        finally:
            with self._lock:
                if self._worker is threading.current_thread():
                    self._worker = None

    def _wake(self) -> None:
        loop = self._loop
        if self._io.asynchronous and loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self._event.set)
                return
        self._event.set()

    def _due(self) -> tuple[list[tuple[int, BaseLease]], float | None]:
        now = time.monotonic()
        due: list[tuple[int, BaseLease]] = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                _, _, gen, lease = heapq.heappop(heap)
                if gen == lease._gen and lease._alive():
                    due.append((gen, lease))
            return due, (heap[0][0] - now if heap else None)

    async def _run(self) -> None:
        while not self._stopped:
            try:
                self._event.clear()
                due, wait = self._due()
                for gen, lease in due:
                    await self._renew(lease, gen)
                if not due:
                    await self._io.wait(self._event, wait)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - never expected; keep renewing
                await self._io.sleep(0.05)  # never spin
                log.exception(
                    "coordlock renewer: unexpected error; going on",
                    extra={"backend": self._coordinator.backend_name, "event": "renewer",
                           "outcome": "error"},
                )

    async def _renew(self, lease: BaseLease, gen: int) -> None:
        remaining = lease._deadline - time.monotonic()
        if remaining <= 0 or not lease.renew:
            return  # the watchdog reports it lost at its deadline
        begun = time.monotonic()
        outcome = "error"
        try:
            ok = await self._coordinator._extend_flow(
                self._io, lease, None, deadline=remaining, renewal_of=gen
            )
            outcome = "renewed" if ok else "lost"
        except CoordlockError as exc:
            lease._mark_at_risk(f"renewal failed: {exc}")
            retry_at = min(time.monotonic() + max(lease.ttl / 10, 0.01), lease._deadline)
            self._push(lease, retry_at)
        except Exception:
            log.exception(
                "lease %r: unexpected error while renewing", lease.name,
                extra=lease._facts("renewal", outcome="error"),
            )
            lease._mark_lost("unexpected error while renewing", kind="error")
        if _observe.observers:
            backend = self._coordinator.backend_name
            _observe.renewal(backend, lease.name, outcome, time.monotonic() - begun)

    def _reset_after_fork(self) -> None:
        # The parent renews its own leases; the child renews only what it acquires itself.
        self._heap = []
        self._lock = threading.Lock()
        self._event = self._io.new_event()
        self._worker = None
        self._dead = 0


def _after_fork_in_child() -> None:
    for renewer in list(_sync_renewers):
        renewer._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
