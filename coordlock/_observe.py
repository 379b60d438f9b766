"""The one hook point of coordlock's metrics: a tiny registry of observers.

The core (and the scheduler) report what happens by calling the module functions below; each
one hands the fact to every registered :class:`Observer`. The exporters
(:mod:`coordlock.metrics.prometheus`, :mod:`coordlock.metrics.otel`) are observers; backends
never call an exporter. When no observer is registered the core skips the calls entirely
(``if _observe.observers:`` is its only cost), so metrics cost nothing until enabled.

Units are seconds. Labels are kept low-cardinality: backends, outcomes, reasons and job names,
never lock names (a caller may lock one name per order or user), never tick keys. The lock name
is passed to observers anyway, for observers that want it (a tracer, a test).

An observer must be fast and must not block: it runs on the caller's thread, inside
``acquire()``. Whatever it raises is logged once per observer and method, and ignored.

Core events
    ``acquire(backend, lock, outcome, seconds, waited)`` – one acquire call ended: ``outcome``
    is ``acquired``, ``busy`` (not granted within its wait), ``error`` (the call raised) or
    ``cancelled`` (task cancelled, Ctrl-C); ``seconds`` the whole call, waiting included;
    ``waited`` (``acquired`` only, else ``None``) the seconds from the first busy answer to the
    grant — the handoff wait — or ``None`` when it was granted at once.
    ``lease_ended(backend, lock, how, held)`` – a lease counted by ``acquire(..., "acquired")``
    ended, exactly once, reported to the observers that counted it: ``how`` is ``released``
    or ``lost``; ``held`` seconds since the grant.
    ``lease_lost(backend, lock, reason)`` – a lease was lost; ``reason`` is one of
    :data:`LOST_REASONS`.
    ``renewal(backend, lock, outcome, seconds)`` – one background renewal: ``renewed``,
    ``lost`` (the server said the lock is no longer ours) or ``error`` (could not ask).

Scheduler events (for the scheduler to call; :func:`scheduler_event` derives them from its
:class:`~coordlock.scheduler.Event` objects)
    ``tick_claimed(job)``, ``tick_skipped(job, reason)``, ``tick_missed(job, count)``,
    ``run_started(job, lag)`` (``lag``: seconds from the tick's nominal time to the start),
    ``run_finished(job, outcome, seconds)`` (``finished`` or ``failed``),
    ``run_stuck(job, reason)`` (``timeout`` or ``instance-vanished``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("coordlock")

#: Outcomes of ``acquire``.
ACQUIRE_OUTCOMES = ("acquired", "busy", "error", "cancelled")
#: Why a lease was lost (``lease_lost``): its ttl ran out before a renewal was confirmed; the
#: server said it was no longer ours (taken over, expired there); a renewal was confirmed only
#: after the local deadline; the backend reported it (session or connection lost); an
#: unexpected error while renewing.
LOST_REASONS = ("expired", "not-ours", "late-renewal", "backend", "error")
#: Outcomes of ``renewal``.
RENEWAL_OUTCOMES = ("renewed", "lost", "error")


class Observer:
    """Base class of observers: every method does nothing; override what you need.

    Register an instance with :func:`register`. Methods are called on the thread where the
    event happens (a caller's thread, the renewal thread, the watchdog thread).
    """

    def acquire(
        self, backend: str, lock: str, outcome: str, seconds: float, waited: float | None
    ) -> None:
        """An acquire call ended (see the module docstring)."""

    def lease_ended(self, backend: str, lock: str, how: str, held: float) -> None:
        """A lease counted as acquired ended (``released`` or ``lost``), once."""

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


#: The registered observers. The core tests this tuple's truth before calling anything here.
observers: tuple[Observer, ...] = ()
_registry_lock = threading.Lock()
_complained: set[tuple[int, str]] = set()


def register(observer: Observer) -> Observer:
    """Add ``observer`` (no-op if it is registered already); returns it."""
    global observers
    if not isinstance(observer, Observer):
        raise TypeError(f"expected a coordlock._observe.Observer, not {type(observer).__name__}")
    with _registry_lock:
        if observer not in observers:
            observers = (*observers, observer)
    return observer


def unregister(observer: Observer) -> bool:
    """Remove ``observer``; ``True`` if it was registered."""
    global observers
    with _registry_lock:
        if observer not in observers:
            return False
        observers = tuple(o for o in observers if o is not observer)
        return True


def _failed(observer: Observer, method: str) -> None:
    key = (id(observer), method)
    if key not in _complained:
        _complained.add(key)
        log.exception(
            "metrics observer %r failed in %s; ignored (reported once)", observer, method,
            extra={"event": "observer-error", "outcome": method},
        )


# -- the core's events ---------------------------------------------------------------------------


def acquire(backend: str, lock: str, outcome: str, seconds: float, waited: float | None) -> None:
    """Report the end of an acquire call to every observer."""
    for observer in observers:
        try:
            observer.acquire(backend, lock, outcome, seconds, waited)
        except Exception:
            _failed(observer, "acquire")


def lease_ended(
    counted_by: tuple[Observer, ...], backend: str, lock: str, how: str, held: float
) -> None:
    """Report the end of a lease to the observers that counted its acquisition
    (``counted_by``: :data:`observers` as it was then), so that held-lease gauges stay exact
    when observers come and go."""
    for observer in counted_by:
        try:
            observer.lease_ended(backend, lock, how, held)
        except Exception:
            _failed(observer, "lease_ended")


def lease_lost(backend: str, lock: str, reason: str) -> None:
    """Report a lost lease."""
    for observer in observers:
        try:
            observer.lease_lost(backend, lock, reason)
        except Exception:
            _failed(observer, "lease_lost")


def renewal(backend: str, lock: str, outcome: str, seconds: float) -> None:
    """Report one background renewal."""
    for observer in observers:
        try:
            observer.renewal(backend, lock, outcome, seconds)
        except Exception:
            _failed(observer, "renewal")


# -- the scheduler's events ----------------------------------------------------------------------


def tick_claimed(job: str) -> None:
    """Report a won tick claim of ``job``."""
    for observer in observers:
        try:
            observer.tick_claimed(job)
        except Exception:
            _failed(observer, "tick_claimed")


def tick_skipped(job: str, reason: str) -> None:
    """Report a skipped tick of ``job``."""
    for observer in observers:
        try:
            observer.tick_skipped(job, reason)
        except Exception:
            _failed(observer, "tick_skipped")


def tick_missed(job: str, count: int = 1) -> None:
    """Report ``count`` missed ticks of ``job``."""
    for observer in observers:
        try:
            observer.tick_missed(job, count)
        except Exception:
            _failed(observer, "tick_missed")


def run_started(job: str, lag: float) -> None:
    """Report a run of ``job`` starting ``lag`` seconds after its tick."""
    for observer in observers:
        try:
            observer.run_started(job, lag)
        except Exception:
            _failed(observer, "run_started")


def run_finished(job: str, outcome: str, seconds: float) -> None:
    """Report the end of a run of ``job``."""
    for observer in observers:
        try:
            observer.run_finished(job, outcome, seconds)
        except Exception:
            _failed(observer, "run_finished")


def run_stuck(job: str, reason: str) -> None:
    """Report a stuck run of ``job``."""
    for observer in observers:
        try:
            observer.run_stuck(job, reason)
        except Exception:
            _failed(observer, "run_stuck")


def scheduler_event(event: Any) -> None:
    """Turn one scheduler :class:`~coordlock.scheduler.Event` into the hooks above.

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
