"""Two process-wide daemon threads that no I/O can block.

* :data:`watchdog` marks a lease *at risk* when a third of its ttl is left without a confirmed
  renewal, and *lost* at its local deadline — whatever the renewal I/O is doing (a frozen
  socket, a paused server). It only flips flags, logs, and queues callbacks.
* :data:`dispatcher` runs lease callbacks (``on_lost``/``on_state``) one after the other on its
  own thread. Whatever a callback raises (even ``SystemExit``) is logged and the thread goes on;
  if the thread ever dies it is started again by the next callback.

Both start lazily and start afresh in a forked child.
"""

from __future__ import annotations

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

#: Dead heap entries tolerated before the heap is compacted.
COMPACT_AFTER = 1024


#: A callback running longer than this (seconds) no longer holds up the ones queued after it.
STALL_AFTER = 0.5


class Dispatcher:
    """Runs callbacks in order on a daemon thread; survives anything they raise.

    A callback that blocks (against the advice) does not hold up the others for long: once it
    has run for :data:`STALL_AFTER` seconds, the next submission starts a fresh thread that
    takes over the queue, and the stuck one ends after its callback returns.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._busy_since: float | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` to run on the dispatcher thread."""
        self._queue.put(fn)
        thread, busy = self._thread, self._busy_since
        stalled = busy is not None and time.monotonic() - busy > STALL_AFTER
        if thread is None or stalled or not thread.is_alive():
            with self._start_lock:
                if self._thread is thread:
                    self._busy_since = None
                    self._thread = threading.Thread(
                        target=self._run, name="coordlock-callbacks", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        while self._thread is me:
            fn = self._queue.get()
            if self._thread is not me:  # replaced while we waited: hand the work back
                self._queue.put(fn)
                return
            self._busy_since = time.monotonic()
            try:
                fn()
            except BaseException:  # a callback's sys.exit() must not end the thread
                log.exception(
                    "a coordlock lease callback raised; ignored",
                    extra={"event": "callback", "outcome": "error"},
                )
            finally:
                if self._thread is me:
                    self._busy_since = None

    def _reset_after_fork(self) -> None:
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._start_lock = threading.Lock()
        self._busy_since = None


AT_RISK_CHECK = 0
LOST_CHECK = 1


class Watchdog:
    """Deadline checks for every live lease of the process, on one thread, without I/O."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, BaseLease]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._dead = 0

    def watch(self, lease: BaseLease, gen: int, at: float, check: int) -> None:
        """Check ``lease`` at monotonic time ``at`` (if its generation is still ``gen``)."""
        entry = (at, next(self._seq), check, gen, lease)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
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
        while True:
            try:
                self._step()
            except BaseException:  # pragma: no cover - never expected; keep watching
                log.exception(
                    "coordlock watchdog: unexpected error; going on",
                    extra={"event": "watchdog", "outcome": "error"},
                )

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
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        self._dead = 0


watchdog = Watchdog()
dispatcher = Dispatcher()


def _after_fork_in_child() -> None:
    watchdog._reset_after_fork()
    dispatcher._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
