"""Prometheus exporter (``pip install 'coordlock[prometheus]'``).

::

    import prometheus_client
    import coordlock.metrics.prometheus

    coordlock.metrics.prometheus.enable()          # or enable(registry=my_registry)
    prometheus_client.start_http_server(9464, addr="127.0.0.1")   # or your app's /metrics

The metrics are listed in :data:`coordlock.metrics.METRICS` and in docs/monitoring.md.

Cost: an acquire or a lease's end only appends a tuple to a queue (no lock); the queue is added
up into plain Python counters at the next scrape (or every :data:`QUEUE_MAX` events), and the
Prometheus text is built only when scraped (a custom collector). See
``benchmarks/metrics_overhead.py``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from .. import _observe
from .._errors import ConfigurationError
from ._spec import (
    ACQUIRE,
    CLAIMED,
    HANDOFF,
    HELD,
    HOLD,
    LAG,
    LOCK_BUCKETS,
    LOST,
    MISSED,
    RENEWAL,
    RUN_BUCKETS,
    RUN_SECONDS,
    RUNNING,
    RUNS,
    SKIPPED,
    STUCK,
    Metric,
)

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.core import (
        Metric as _Family,
    )
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigurationError(
        "coordlock.metrics.prometheus needs prometheus_client: "
        "pip install 'coordlock[prometheus]'"
    ) from exc

__all__ = ["PrometheusObserver", "disable", "enable"]

_Key = tuple[str, ...]
#: Queued lock events added up at the latest when this many are waiting.
QUEUE_MAX = 4096
_ENDED = object()  # marks a queued lease_ended event


class _Hist:
    """One histogram series: counts per bucket (not cumulative; the last is +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0


class PrometheusObserver(_observe.Observer, Collector):
    """Observes coordlock's events and exposes them as a Prometheus collector.

    Thread-safe: every update holds one lock for a few additions. Series appear at their first
    event (a counter that never moved is not shown, as with labelled ``prometheus_client``
    metrics).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # One table per metric, label values -> series (attributes, not a dict keyed by
        # Metric: this is the hot path of every acquire).
        self._acquire: dict[_Key, _Hist] = {}
        self._handoff: dict[_Key, _Hist] = {}
        self._hold: dict[_Key, _Hist] = {}
        self._renewal: dict[_Key, _Hist] = {}
        self._run: dict[_Key, _Hist] = {}
        self._lag: dict[_Key, _Hist] = {}
        self._lost: dict[_Key, float] = {}
        self._claimed: dict[_Key, float] = {}
        self._skipped: dict[_Key, float] = {}
        self._missed: dict[_Key, float] = {}
        self._stuck: dict[_Key, float] = {}
        self._started: dict[_Key, float] = {}  # runs started, per job (for the running gauge)
        self._queue: deque[tuple[str, str, float, Any]] = deque()

    # -- recording -----------------------------------------------------------------------------

    @staticmethod
    def _add_to(
        table: dict[_Key, _Hist], bounds: tuple[float, ...], key: _Key, value: float
    ) -> None:
        """Add ``value`` to a histogram series (the caller holds the lock)."""
        hist = table.get(key)
        if hist is None:
            hist = table[key] = _Hist(len(bounds) + 1)
        hist.counts[bisect_left(bounds, value)] += 1
        hist.total += value

    def _observe(
        self, table: dict[_Key, _Hist], bounds: tuple[float, ...], key: _Key, value: float
    ) -> None:
        with self._lock:
            self._add_to(table, bounds, key, value)

    def _add(self, table: dict[_Key, float], key: _Key, amount: float = 1) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + amount

    # The two events of every lock() pair only append to a queue (atomic, no lock); they are
    # added up at the next scrape, or once QUEUE_MAX of them are waiting.

    def acquire(
        self, backend: str, lock: str, outcome: str, seconds: float, waited: float | None
    ) -> None:
        queue = self._queue
        queue.append((backend, outcome, seconds, waited))
        if len(queue) > QUEUE_MAX:
            self._drain()

    def lease_ended(self, backend: str, lock: str, how: str, held: float) -> None:
        queue = self._queue
        queue.append((backend, how, held, _ENDED))
        if len(queue) > QUEUE_MAX:
            self._drain()

    def _drain(self) -> None:
        queue, pop = self._queue, self._queue.popleft
        with self._lock:
            for _ in range(len(queue)):
                backend, what, seconds, extra = pop()
                if extra is _ENDED:
                    self._add_to(self._hold, RUN_BUCKETS, (backend, what), seconds)
                else:
                    self._add_to(self._acquire, LOCK_BUCKETS, (backend, what), seconds)
                    if extra is not None:
                        self._add_to(self._handoff, LOCK_BUCKETS, (backend,), extra)

    def lease_lost(self, backend: str, lock: str, reason: str) -> None:
        self._add(self._lost, (backend, reason))

    def renewal(self, backend: str, lock: str, outcome: str, seconds: float) -> None:
        self._observe(self._renewal, LOCK_BUCKETS, (backend, outcome), seconds)

    def tick_claimed(self, job: str) -> None:
        self._add(self._claimed, (job,))

    def tick_skipped(self, job: str, reason: str) -> None:
        self._add(self._skipped, (job, reason))

    def tick_missed(self, job: str, count: int) -> None:
        self._add(self._missed, (job,), count)

    def run_started(self, job: str, lag: float) -> None:
        self._observe(self._lag, RUN_BUCKETS, (job,), lag)
        self._add(self._started, (job,))

    def run_finished(self, job: str, outcome: str, seconds: float) -> None:
        self._observe(self._run, RUN_BUCKETS, (job, outcome), seconds)

    def run_stuck(self, job: str, reason: str) -> None:
        self._add(self._stuck, (job, reason))

    # -- exposition ----------------------------------------------------------------------------

    def describe(self) -> Iterable[_Family]:
        """The metric families, without samples (lets the registry refuse duplicates)."""
        return list(self._families(empty=True))

    def collect(self) -> Iterable[_Family]:
        """The current values, for a scrape."""
        return list(self._families(empty=False))

    def _families(self, *, empty: bool) -> Iterator[_Family]:
        hist_tables = {
            ACQUIRE: self._acquire, HANDOFF: self._handoff, HOLD: self._hold,
            RENEWAL: self._renewal, RUN_SECONDS: self._run, LAG: self._lag,
        }  # fmt: skip
        count_tables = {
            LOST: self._lost, CLAIMED: self._claimed, SKIPPED: self._skipped,
            MISSED: self._missed, STUCK: self._stuck,
        }  # fmt: skip
        self._drain()
        with self._lock:  # a consistent copy; the text is built outside the lock
            hists = {
                m: {} if empty else {k: (list(h.counts), h.total) for k, h in t.items()}
                for m, t in hist_tables.items()
            }
            counts = {m: {} if empty else dict(t) for m, t in count_tables.items()}
            started = {} if empty else dict(self._started)
        for metric in hist_tables:
            yield _histogram(metric, hists[metric])
        yield _gauge(HELD, _held(hists[ACQUIRE], hists[HOLD]))
        for metric in count_tables:
            yield _counter(metric, counts[metric])
        runs = {k: float(sum(c)) for k, (c, _) in hists[RUN_SECONDS].items()}
        yield _counter(RUNS, runs)
        ended: dict[_Key, float] = {}
        for (job, _outcome), (buckets, _) in hists[RUN_SECONDS].items():
            ended[(job,)] = ended.get((job,), 0) + sum(buckets)
        yield _gauge(RUNNING, {k: n - ended.get(k, 0) for k, n in started.items()})


def _held(
    acquired: dict[_Key, tuple[list[int], float]], ended: dict[_Key, tuple[list[int], float]]
) -> dict[_Key, float]:
    held: dict[_Key, float] = {}
    for (backend, outcome), (buckets, _) in acquired.items():
        if outcome == "acquired":
            held[(backend,)] = held.get((backend,), 0) + sum(buckets)
    for (backend, _how), (buckets, _) in ended.items():
        held[(backend,)] = held.get((backend,), 0) - sum(buckets)
    return held


def _histogram(metric: Metric, series: dict[_Key, tuple[list[int], float]]) -> _Family:
    family = HistogramMetricFamily(
        metric.name, metric.help, labels=list(metric.labels), unit=""
    )
    bounds = [repr(float(b)) for b in metric.buckets] + ["+Inf"]  # as prometheus_client writes them
    for key, (counts, total) in sorted(series.items()):
        cumulative, running = [], 0
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        family.add_metric(list(key), cumulative, total)
    return family


def _counter(metric: Metric, series: dict[_Key, float]) -> _Family:
    family = CounterMetricFamily(
        metric.name.removesuffix("_total"), metric.help, labels=list(metric.labels)
    )
    for key, value in sorted(series.items()):
        family.add_metric(list(key), value)
    return family


def _gauge(metric: Metric, series: dict[_Key, float]) -> _Family:
    family = GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    for key, value in sorted(series.items()):
        family.add_metric(list(key), max(0.0, value))
    return family


_enabled: dict[int, tuple[Any, PrometheusObserver]] = {}
_enabled_lock = threading.Lock()


def enable(registry: CollectorRegistry | None = None) -> PrometheusObserver:
    """Start collecting coordlock's metrics into ``registry`` (default: ``prometheus_client``'s
    global ``REGISTRY``, which ``start_http_server`` and ``make_asgi_app`` serve).

    Idempotent per registry: a second call returns the same observer. Counts start at zero
    now; leases already held are not counted in ``coordlock_leases_held``.
    """
    target = REGISTRY if registry is None else registry
    if not isinstance(target, CollectorRegistry):
        raise TypeError(
            f"registry must be a prometheus_client CollectorRegistry, not {type(target).__name__}"
        )
    with _enabled_lock:
        known = _enabled.get(id(target))
        if known is not None and known[0] is target:
            return known[1]
        observer = PrometheusObserver()
        target.register(observer)
        _enabled[id(target)] = (target, observer)
    _observe.register(observer)
    return observer


def disable(registry: CollectorRegistry | None = None) -> bool:
    """Stop collecting into ``registry`` and remove coordlock's metrics from it; ``True`` if
    they were enabled there."""
    target = REGISTRY if registry is None else registry
    with _enabled_lock:
        known = _enabled.get(id(target))
        if known is None or known[0] is not target:
            return False
        del _enabled[id(target)]
    observer = known[1]
    _observe.unregister(observer)
    target.unregister(observer)
    return True
