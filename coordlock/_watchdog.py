"""Two process-wide daemon threads that no I/O can block.

* :data:`watchdog` marks a lease *at risk* when a third of its ttl is left without a confirmed
  renewal, and *lost* at its local deadline — whatever the renewal I/O is doing (a frozen
  socket, a paused server). It only flips flags, logs, and queues callbacks.
* :data:`dispatcher` reports each change (the log line, metrics, the ``on_lost``/``on_state``
  callbacks) on its own thread, in order per lease. Whatever a callback raises (even
  ``SystemExit``) is logged and the thread goes on; a blocking one holds up only its own lease.

Both start lazily and start afresh in a forked child.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._lease import BaseLease

log = logging.getLogger("coordlock")

#: Dead heap entries tolerated before the heap is compacted (when they are most of it). Small:
#: released leases kept in a heap keep their objects alive, and the garbage collector's passes
#: over them cost more than compacting often (measured: 6 % of an in-memory lock/unlock pair).
COMPACT_AFTER = 128


#: A callback running longer than this (seconds) no longer holds up other leases' callbacks.
STALL_AFTER = 0.5


class Dispatcher:
    """Runs the reports of lease state changes (log lines, metrics, callbacks) on a daemon
    thread, in order per lease; survives anything they raise.

    Work is queued per key (a lease): one thread serves a key at a time, so the changes of one
    lease are reported in the order they happened. A report that blocks (a callback against the
    advice, a stuck log handler) holds up only its own lease: once it has run for
    :data:`STALL_AFTER` seconds, the next submission starts a fresh thread that serves the
    other leases, and the stuck one ends after finishing the lease it was serving.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[object, collections.deque[Callable[[], None]]] = {}
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._nudge: threading.Timer | None = None

    def submit(self, key: object, fn: Callable[[], None]) -> None:
        """Queue ``fn`` after the earlier work of ``key`` (never blocks)."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = collections.deque((fn,))
                self._queue.put(key)
            else:
                pending.append(fn)  # served, in order, by whoever serves ``key``
            self._check_stall()

    def _check_stall(self) -> None:
        """With ``_lock`` held: start a fresh thread when the current one is gone or stuck in
        one report while other work waits; if it is busy but not stuck yet, look again when it
        would be (so work queued just after a report blocked is not held up by it)."""
        thread, busy = self._thread, self._busy_since
        now = time.monotonic()
        if thread is None or not thread.is_alive() or (
            busy is not None and now - busy > STALL_AFTER and not self._queue.empty()
        ):
            self._busy_since = None
            self._thread = threading.Thread(
                target=self._run, name="coordlock-callbacks", daemon=True
            )
            self._thread.start()
        elif busy is not None and self._nudge is None and not self._queue.empty():
            self._nudge = threading.Timer(busy + STALL_AFTER + 0.01 - now, self._look_again)
            self._nudge.daemon = True
            self._nudge.start()

    def _look_again(self) -> None:
        with self._lock:
            self._nudge = None
            self._check_stall()

    def _run(self) -> None:
        me = threading.current_thread()
        while self._thread is me:
            key = self._queue.get()
            if self._thread is not me:  # replaced while waiting: hand the key on
                self._queue.put(key)
                return
            self._serve(key, me)

    def _serve(self, key: object, me: threading.Thread) -> None:
        while True:
            with self._lock:
                pending = self._pending[key]
                if not pending:
                    del self._pending[key]
                    return
                fn = pending.popleft()
                if self._thread is me:
                    self._busy_since = time.monotonic()
            try:
                fn()
            except BaseException:  # a callback's sys.exit() must not end the thread
                log.exception("a coordlock lease callback raised; ignored",
                              extra={"event": "callback", "outcome": "error"})
            finally:
                with self._lock:
                    if self._thread is me:
                        self._busy_since = None

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._pending = {}
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._busy_since = None
        self._nudge = None


AT_RISK_CHECK = 0
LOST_CHECK = 1
#: A new renewed lease's renewal falls due: the watchdog hands it to its renewer (no I/O) and
#: watches for at-risk from then on. A lease released before then never touched the renewer.
RENEW_CHECK = 2
#: A lease is renewed when a third of its ttl has passed.
RENEW_FRACTION = 1 / 3


class Watchdog:
    """Deadline checks for every live lease of the process, on one thread, without I/O."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, BaseLease]] = []
        self._seq = itertools.count()
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._thread: threading.Thread | None = None
        self._dead = 0

    def watch(self, lease: BaseLease, gen: int, at: float, check: int) -> None:
        """Check ``lease`` at monotonic time ``at`` (if its generation is still ``gen``)."""
        entry = (at, next(self._seq), check, gen, lease)
        with self._mutex:  # the condition's lock (``with self._cond`` adds a Python call)
            heapq.heappush(self._heap, entry)
            if self._thread is None:  # the thread clears it when it ends, whatever ends it
                self._thread = threading.Thread(
                    target=self._run, name="coordlock-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()

    def forget(self) -> None:
        """One watched lease ended (released): compact the heap when mostly dead."""
        self._dead += 1  # a heuristic; a lost increment under a race only delays compaction
        if self._dead < COMPACT_AFTER:
            return
        with self._cond:
            if self._dead >= COMPACT_AFTER and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[4]._alive()]
                heapq.heapify(self._heap)
                self._dead = 0

    def _run(self) -> None:
        try:
            while True:
                try:
                    self._step()
                except Exception:  # pragma: no cover - never expected; keep watching
                    log.exception("coordlock watchdog: unexpected error; going on",
                                  extra={"event": "watchdog", "outcome": "error"})
        finally:  # ended anyway (interpreter shutdown, a BaseException): the next watch restarts
            with self._cond:
                self._thread = None

    def _step(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    break
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            _, _, check, gen, lease = heapq.heappop(self._heap)
        lease._check_deadline(gen, check)

    def _reset_after_fork(self) -> None:
        # The parent's leases are not the child's to watch (the parent renews them).
        self._heap = []
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._thread = None
        self._dead = 0


watchdog = Watchdog()
dispatcher = Dispatcher()


def _after_fork_in_child() -> None:
    watchdog._reset_after_fork()
    dispatcher._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
