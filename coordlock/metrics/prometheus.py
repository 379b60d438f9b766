"""Prometheus exporter (``pip install 'coordlock[prometheus]'``).

::

    import prometheus_client
    import coordlock.metrics.prometheus

    coordlock.metrics.prometheus.enable()          # or enable(registry=my_registry)
    prometheus_client.start_http_server(9464, addr="127.0.0.1")   # or your app's /metrics

The metrics are listed in :data:`coordlock.metrics.METRICS` and in docs/monitoring.md.

Cost: the core only queues each event (see :mod:`coordlock._observe`); this observer adds the
queue up into plain Python counters at the next scrape (or every few thousand events), and the
Prometheus text is built only when scraped (a custom collector). See
``benchmarks/metrics_overhead.py``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .. import _observe
from .._errors import ConfigurationError
from ._spec import (
    ACQUIRE,
    CLAIMED,
    HANDOFF,
    HELD,
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
_SIZE = len(LOCK_BUCKETS) + 1


class _Hist:
    """One histogram series: counts per bucket (not cumulative; the last is +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0


class PrometheusObserver(_observe.Observer, Collector):
    """Observes coordlock's events and exposes them as a Prometheus collector.

    Its state changes only inside :func:`coordlock._observe.flush` (one batch at a time) and
    is read under the same lock at scrape time. Series appear at their first event (a
    counter that never moved is not shown, as with labelled ``prometheus_client`` metrics).
    """

    def __init__(self) -> None:
        self._acquire: dict[_Key, _Hist] = {}
        self._handoff: dict[_Key, _Hist] = {}
        self._renewal: dict[_Key, _Hist] = {}
        self._run: dict[_Key, _Hist] = {}
        self._lag: dict[_Key, _Hist] = {}
        self._lost: dict[_Key, float] = {}
        self._claimed: dict[_Key, float] = {}
        self._skipped: dict[_Key, float] = {}
        self._missed: dict[_Key, float] = {}
        self._stuck: dict[_Key, float] = {}
        self._started: dict[_Key, float] = {}  # runs started, per job (for the running gauge)

    # -- recording (called by coordlock._observe.flush, one batch at a time) -------------------

    @staticmethod
    def _add_to(
        table: dict[_Key, _Hist], bounds: tuple[float, ...], key: _Key, value: float
    ) -> None:
        hist = table.get(key)
        if hist is None:
            hist = table[key] = _Hist(len(bounds) + 1)
        hist.counts[bisect_left(bounds, value)] += 1
        hist.total += value

    @staticmethod
    def _count(table: dict[_Key, float], key: _Key, amount: float = 1) -> None:
        table[key] = table.get(key, 0) + amount

    def batch(self, events: Sequence[_observe.Event]) -> None:
        """The event of every lock(), acquire, added up inline; the rest as usual."""
        acquired, kind, bounds, size = self._acquire, _observe.ACQUIRE, LOCK_BUCKETS, _SIZE
        others = []
        for event in events:
            if event[0] == kind:
                _, backend, _name, outcome, seconds, waited = event
                hist = acquired.get((backend, outcome))
                if hist is None:
                    hist = acquired[(backend, outcome)] = _Hist(size)
                hist.counts[bisect_left(bounds, seconds)] += 1
                hist.total += seconds
                if waited is not None:
                    self._add_to(self._handoff, bounds, (backend,), waited)
            else:
                others.append(event)
        if others:
            super().batch(others)

    def lease_lost(self, backend: str, lock: str, reason: str) -> None:
        self._count(self._lost, (backend, reason))

    def renewal(self, backend: str, lock: str, outcome: str, seconds: float) -> None:
        self._add_to(self._renewal, LOCK_BUCKETS, (backend, outcome), seconds)

    def tick_claimed(self, job: str) -> None:
        self._count(self._claimed, (job,))

    def tick_skipped(self, job: str, reason: str) -> None:
        self._count(self._skipped, (job, reason))

    def tick_missed(self, job: str, count: int) -> None:
        self._count(self._missed, (job,), count)

    def run_started(self, job: str, lag: float) -> None:
        self._add_to(self._lag, RUN_BUCKETS, (job,), lag)
        self._count(self._started, (job,))

    def run_finished(self, job: str, outcome: str, seconds: float) -> None:
        self._add_to(self._run, RUN_BUCKETS, (job, outcome), seconds)

    def run_stuck(self, job: str, reason: str) -> None:
        self._count(self._stuck, (job, reason))

    # -- exposition ----------------------------------------------------------------------------

    def describe(self) -> Iterable[_Family]:
        """The metric families, without samples (lets the registry refuse duplicates)."""
        return list(self._families(empty=True))

    def collect(self) -> Iterable[_Family]:
        """The current values, for a scrape."""
        return list(self._families(empty=False))

    def _families(self, *, empty: bool) -> Iterator[_Family]:
        hist_tables = {
            ACQUIRE: self._acquire, HANDOFF: self._handoff, RENEWAL: self._renewal,
            RUN_SECONDS: self._run, LAG: self._lag,
        }  # fmt: skip
        count_tables = {
            LOST: self._lost, CLAIMED: self._claimed, SKIPPED: self._skipped,
            MISSED: self._missed, STUCK: self._stuck,
        }  # fmt: skip
        with _observe.flushed():  # a consistent copy; the text is built outside the lock
            hists = {
                m: {} if empty else {k: (list(h.counts), h.total) for k, h in t.items()}
                for m, t in hist_tables.items()
            }
            counts = {m: {} if empty else dict(t) for m, t in count_tables.items()}
            started = {} if empty else dict(self._started)
        for metric in hist_tables:
            yield _histogram(metric, hists[metric])
        held: dict[_Key, float] = {}
        if not empty:
            held = {(b,): float(n) for b, n in _observe.held_leases().items()}
        yield _gauge(HELD, held)
        for metric in count_tables:
            yield _counter(metric, counts[metric])
        runs = {k: float(sum(c)) for k, (c, _) in hists[RUN_SECONDS].items()}
        yield _counter(RUNS, runs)
        ended: dict[_Key, float] = {}
        for (job, _outcome), (buckets, _) in hists[RUN_SECONDS].items():
            ended[(job,)] = ended.get((job,), 0) + sum(buckets)
        yield _gauge(RUNNING, {k: n - ended.get(k, 0) for k, n in started.items()})


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
