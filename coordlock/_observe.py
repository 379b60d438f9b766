"""The one hook point of coordlock's metrics: a tiny registry of observers, fed through a queue.

The core (and the scheduler) report what happens by posting an event here; every registered
:class:`Observer` receives it. The exporters (:mod:`coordlock.metrics.prometheus`,
:mod:`coordlock.metrics.otel`) are observers; backends never call an exporter. When no observer
is registered the core posts nothing (``if _observe.observers:`` is its only cost), so metrics
cost nothing until enabled.

Posting only appends a tuple to a queue (no lock, no call into an observer), which keeps the
cost inside ``acquire()`` to a fraction of a microsecond; a release posts nothing at all: how
many leases are held is read from the coordinators' live leases when it is asked for
(:func:`held_leases`). Observers receive the queued events in
batches, in order, one batch at a time, when :func:`flush` runs: an exporter flushes before it
reports (a Prometheus scrape, an OpenTelemetry collection), and a post flushes by itself once
:data:`LIMIT` events wait, which bounds the queue.

Units are seconds. Labels are kept low-cardinality: backends, outcomes, reasons and job names,
never lock names (a caller may lock one name per order or user), never tick keys. The lock name
is passed to observers anyway, for observers that want it (a tracer, a test).

Core events (the name is the :class:`Observer` method that receives it)
    ``acquire(backend, lock, outcome, seconds, waited)`` – one acquire call ended: ``outcome``
    is ``acquired``, ``busy`` (not granted within its wait), ``error`` (the call raised) or
    ``cancelled`` (task cancelled, Ctrl-C); ``seconds`` the whole call, waiting included;
    ``waited`` (``acquired`` only, else ``None``) the seconds from the first busy answer to the
    grant — the handoff wait — or ``None`` when it was granted at once.
    ``lease_lost(backend, lock, reason)`` – a lease was lost; ``reason`` is one of
    :data:`LOST_REASONS`.
    ``renewal(backend, lock, outcome, seconds)`` – one background renewal: ``renewed``,
    ``lost`` (the server said the lock is no longer ours) or ``error`` (could not ask).

Scheduler events (for the scheduler to post; :func:`scheduler_event` derives them from its
:class:`~coordlock.scheduler.Event` objects)
    ``tick_claimed(job)``, ``tick_skipped(job, reason)``, ``tick_missed(job, count)``,
    ``run_started(job, lag)`` (``lag``: seconds from the tick's nominal time to the start),
    ``run_finished(job, outcome, seconds)`` (``finished`` or ``failed``),
    ``run_stuck(job, reason)`` (``timeout`` or ``instance-vanished``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger("coordlock")

#: Outcomes of ``acquire``.
ACQUIRE_OUTCOMES = ("acquired", "busy", "error", "cancelled")
#: Why a lease was lost (``lease_lost``): its ttl ran out before a renewal was confirmed; the
#: server said it was no longer ours (taken over, expired there); a renewal was confirmed only
#: after the local deadline; the backend reported it (session or connection lost); an
#: unexpected error while renewing; its coordinator was closed while it was held.
LOST_REASONS = ("expired", "not-ours", "late-renewal", "backend", "error", "closed")
#: Outcomes of ``renewal``.
RENEWAL_OUTCOMES = ("renewed", "lost", "error")

#: Event kinds: the first item of a queued event, and the Observer method that receives it.
ACQUIRE = "acquire"
LEASE_LOST = "lease_lost"
RENEWAL = "renewal"
TICK_CLAIMED = "tick_claimed"
TICK_SKIPPED = "tick_skipped"
TICK_MISSED = "tick_missed"
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
RUN_STUCK = "run_stuck"

#: Queued events that make the next post flush.
LIMIT = 4096

Event = tuple[Any, ...]


class Observer:
    """Base class of observers: every method does nothing; override what you need.

    Register an instance with :func:`register`. Its methods are called from :func:`flush`, one
    batch at a time (never concurrently), on whichever thread flushes. :meth:`batch` receives
    each batch and calls the methods; an observer may override it to go faster.
    """

    def batch(self, events: Sequence[Event]) -> None:
        """Handle a batch of queued events, in order (default: call the method of each)."""
        for event in events:
            kind = event[0]
            try:
                getattr(self, kind)(*event[1:])
            except Exception:
                _failed(self, kind)

    def acquire(
        self, backend: str, lock: str, outcome: str, seconds: float, waited: float | None
    ) -> None:
        """An acquire call ended (see the module docstring)."""

    def lease_lost(self, backend: str, lock: str, reason: str) -> None:
        """A lease was lost for ``reason`` (one of :data:`LOST_REASONS`)."""

    def renewal(self, backend: str, lock: str, outcome: str, seconds: float) -> None:
        """A background renewal ended (``renewed``, ``lost``, ``error``)."""

    def tick_claimed(self, job: str) -> None:
        """This instance won the claim of a tick of ``job``."""

    def tick_skipped(self, job: str, reason: str) -> None:
        """A tick of ``job`` was skipped (``claimed-elsewhere``, ``running``, …)."""

    def tick_missed(self, job: str, count: int) -> None:
        """``count`` ticks of ``job`` were missed (the instance reached them too late)."""

    def run_started(self, job: str, lag: float) -> None:
        """A run of ``job`` started ``lag`` seconds after its tick's nominal time."""

    def run_finished(self, job: str, outcome: str, seconds: float) -> None:
        """A run of ``job`` ended (``finished`` or ``failed``) after ``seconds``."""

    def run_stuck(self, job: str, reason: str) -> None:
        """A run of ``job`` was reported stuck (``timeout``, ``instance-vanished``)."""


#: The registered observers. The core tests this tuple's truth before posting anything.
observers: tuple[Observer, ...] = ()
#: Events waiting for the next flush (appending to a deque is atomic: no lock needed).
events: deque[Event] = deque()
_lock = threading.RLock()  # held while a batch is handed out, and by flushed()
#: Every coordinator of this process (weakly), for :func:`held_leases`.
coordinators: weakref.WeakSet[Any] = weakref.WeakSet()
_complained: set[tuple[int, str]] = set()


def post(event: Event) -> None:
    """Queue ``event`` (a tuple: kind, then the method's arguments) for the observers."""
    events.append(event)
    if len(events) > LIMIT:
        flush()


def _flush_held() -> None:
    n = len(events)
    if not n:
        return
    pop = events.popleft
    batch = [pop() for _ in range(n)]
    for observer in observers:
        try:
            observer.batch(batch)
        except Exception:
            _failed(observer, "batch")


def flush() -> None:
    """Hand every queued event to the observers now (thread-safe; batches never overlap)."""
    with _lock:
        _flush_held()


@contextlib.contextmanager
def flushed() -> Iterator[None]:
    """Flush, and keep further batches out while the block reads an observer's state."""
    with _lock:
        _flush_held()
        yield


def register(observer: Observer) -> Observer:
    """Add ``observer`` (no-op if it is registered already); returns it. Events posted before
    are handed to the observers registered then."""
    global observers
    if not isinstance(observer, Observer):
        raise TypeError(f"expected a coordlock._observe.Observer, not {type(observer).__name__}")
    with _lock:
        _flush_held()
        if observer not in observers:
            observers = (*observers, observer)
    return observer


def unregister(observer: Observer) -> bool:
    """Remove ``observer`` after handing it what was queued; ``True`` if it was registered."""
    global observers
    with _lock:
        _flush_held()
        if observer not in observers:
            return False
        observers = tuple(o for o in observers if o is not observer)
        return True


def held_leases() -> dict[str, int]:
    """Leases held by this process now, by backend (read from the coordinators' live leases;
    nothing is counted per lock() for it)."""
    held: dict[str, int] = {}
    for coordinator in list(coordinators):
        leases = getattr(coordinator, "_leases_by_owner", None)
        if not leases:
            continue
        alive = sum(1 for lease in list(leases.values()) if lease._alive())
        if alive:
            backend = coordinator.backend_name
            held[backend] = held.get(backend, 0) + alive
    return held


def _failed(observer: Observer, method: str) -> None:
    key = (id(observer), method)
    if key not in _complained:
        _complained.add(key)
        log.exception(
            "metrics observer %r failed in %s; ignored (reported once)", observer, method,
            extra={"event": "observer-error", "outcome": method},
        )  # fmt: skip


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()
    events.clear()  # the parent's events are the parent's to report


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- posting, by event (a granted acquire, every lock()'s event, is posted inline by the core) --


def acquire(backend: str, lock: str, outcome: str, seconds: float, waited: float | None) -> None:
    """Post the end of an acquire call."""
    post((ACQUIRE, backend, lock, outcome, seconds, waited))


def lease_lost(backend: str, lock: str, reason: str) -> None:
    """Post a lost lease."""
    post((LEASE_LOST, backend, lock, reason))


def renewal(backend: str, lock: str, outcome: str, seconds: float) -> None:
    """Post one background renewal."""
    post((RENEWAL, backend, lock, outcome, seconds))


def tick_claimed(job: str) -> None:
    """Post a won tick claim of ``job``."""
    if observers:
        post((TICK_CLAIMED, job))


def tick_skipped(job: str, reason: str) -> None:
    """Post a skipped tick of ``job``."""
    if observers:
        post((TICK_SKIPPED, job, reason))


def tick_missed(job: str, count: int = 1) -> None:
    """Post ``count`` missed ticks of ``job``."""
    if observers:
        post((TICK_MISSED, job, count))


def run_started(job: str, lag: float) -> None:
    """Post a run of ``job`` starting ``lag`` seconds after its tick."""
    if observers:
        post((RUN_STARTED, job, lag))


def run_finished(job: str, outcome: str, seconds: float) -> None:
    """Post the end of a run of ``job``."""
    if observers:
        post((RUN_FINISHED, job, outcome, seconds))


def run_stuck(job: str, reason: str) -> None:
    """Post a stuck run of ``job``."""
    if observers:
        post((RUN_STUCK, job, reason))


def scheduler_event(event: Any) -> None:
    """Turn one scheduler :class:`~coordlock.scheduler.Event` into the events above.

    Usable as a scheduler callback (``sched.on("*", scheduler_event)``). A won tick is counted
    when its run starts (or when a stop keeps it from starting); the dispatch lag is measured
    against this process's clock (``time.time()``), never negative.
    """
    if not observers:
        return
    kind, job = event.kind, event.job
    if kind == "started":
        tick_claimed(job)
        lag = 0.0 if event.tick is None else max(0.0, time.time() - event.tick.timestamp())
        run_started(job, lag)
    elif kind in ("finished", "failed"):
        run_finished(job, kind, event.duration or 0.0)
    elif kind == "skipped":
        if event.reason == "stopping":
            tick_claimed(job)
        tick_skipped(job, event.reason or "unknown")
    elif kind == "missed":
        tick_missed(job, event.count)
    elif kind == "stuck":
        run_stuck(job, event.reason or "unknown")
