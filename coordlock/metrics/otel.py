"""OpenTelemetry exporter (``pip install 'coordlock[otel]'``), on the OpenTelemetry metrics API.

::

    import coordlock.metrics.otel
    coordlock.metrics.otel.enable()                     # the global MeterProvider
    coordlock.metrics.otel.enable(meter_provider=mp)    # or a provider of your own

coordlock only records into instruments of the meter ``coordlock``; where the numbers go (OTLP,
a Prometheus reader, the console) is the application's SDK setup. Instrument names are those of
:data:`coordlock.metrics.METRICS` (``coordlock.acquire``, unit ``s``, …), with the same
attributes as the Prometheus labels; OpenTelemetry's Prometheus exporter turns them into the
same names as :mod:`coordlock.metrics.prometheus` (``coordlock_acquire_seconds``).
"""

from __future__ import annotations

import threading
from typing import Any

from .. import __version__, _observe
from .._errors import ConfigurationError
from ._spec import (
    ACQUIRE,
    CLAIMED,
    HANDOFF,
    HELD,
    LAG,
    LOST,
    METRICS,
    MISSED,
    RENEWAL,
    RUN_SECONDS,
    RUNNING,
    RUNS,
    SKIPPED,
    STUCK,
    Metric,
)

try:
    from opentelemetry import metrics as otel_metrics
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigurationError(
        "coordlock.metrics.otel needs the OpenTelemetry API: pip install 'coordlock[otel]'"
    ) from exc

__all__ = ["OTelObserver", "disable", "enable"]


def _instrument(meter: Any, metric: Metric, gauge: Any = None) -> Any:
    if gauge is not None:  # read at collection: costs nothing per event
        return meter.create_observable_up_down_counter(
            metric.otel, callbacks=[gauge], unit=metric.unit, description=metric.help
        )
    if metric.kind == "histogram":
        try:
            return meter.create_histogram(
                metric.otel, unit=metric.unit, description=metric.help,
                explicit_bucket_boundaries_advisory=list(metric.buckets),
            )  # fmt: skip
        except TypeError:  # an API older than 1.23 has no advisory boundaries
            return meter.create_histogram(metric.otel, unit=metric.unit, description=metric.help)
    if metric.kind == "counter":
        return meter.create_counter(metric.otel, unit=metric.unit, description=metric.help)
    raise ValueError(f"{metric.name}: a gauge needs a callback")


class OTelObserver(_observe.Observer):
    """Records coordlock's events into OpenTelemetry instruments of the meter ``coordlock``.

    Attribute dictionaries are cached per label set. Events arrive in batches (see
    :mod:`coordlock._observe`), flushed at each collection; an acquire or a lease's end then
    costs one instrument call (the SDK's cost, several microseconds); a release costs nothing.
    The two gauges (leases held, runs running) are read by the SDK at collection time.
    """

    def __init__(self, meter_provider: Any = None) -> None:
        meter = otel_metrics.get_meter("coordlock", __version__, meter_provider=meter_provider)
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        gauges = {HELD: self._observe_held, RUNNING: self._observe_running}
        self._i = {metric: _instrument(meter, metric, gauges.get(metric)) for metric in METRICS}
        self._attrs: dict[tuple[Metric, tuple[str, ...]], dict[str, str]] = {}

    def _bump(self, table: dict[str, int], key: str, delta: int) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + delta

    def _observe_held(self, options: Any) -> list[Any]:
        # The first of coordlock's callbacks in a collection: hand out the queued events
        # first, so that this collection includes them (callbacks run before the SDK reads
        # its synchronous instruments).
        _observe.flush()
        held = _observe.held_leases()
        return [otel_metrics.Observation(n, self._a(HELD, b)) for b, n in sorted(held.items())]

    def _observe_running(self, options: Any) -> list[Any]:
        with self._lock:
            running = dict(self._running)
        return [
            otel_metrics.Observation(n, self._a(RUNNING, j)) for j, n in sorted(running.items())
        ]

    def _a(self, metric: Metric, *values: str) -> dict[str, str]:
        key = (metric, values)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = dict(zip(metric.labels, values, strict=True))
        return attrs

    def acquire(
        self, backend: str, lock: str, outcome: str, seconds: float, waited: float | None
    ) -> None:
        self._i[ACQUIRE].record(seconds, self._a(ACQUIRE, backend, outcome))
        if waited is not None:
            self._i[HANDOFF].record(waited, self._a(HANDOFF, backend))

    def lease_lost(self, backend: str, lock: str, reason: str) -> None:
        self._i[LOST].add(1, self._a(LOST, backend, reason))

    def renewal(self, backend: str, lock: str, outcome: str, seconds: float) -> None:
        self._i[RENEWAL].record(seconds, self._a(RENEWAL, backend, outcome))

    def tick_claimed(self, job: str) -> None:
        self._i[CLAIMED].add(1, self._a(CLAIMED, job))

    def tick_skipped(self, job: str, reason: str) -> None:
        self._i[SKIPPED].add(1, self._a(SKIPPED, job, reason))

    def tick_missed(self, job: str, count: int) -> None:
        self._i[MISSED].add(count, self._a(MISSED, job))

    def run_started(self, job: str, lag: float) -> None:
        self._i[LAG].record(lag, self._a(LAG, job))
        self._bump(self._running, job, 1)

    def run_finished(self, job: str, outcome: str, seconds: float) -> None:
        self._bump(self._running, job, -1)
        self._i[RUNS].add(1, self._a(RUNS, job, outcome))
        self._i[RUN_SECONDS].record(seconds, self._a(RUN_SECONDS, job, outcome))

    def run_stuck(self, job: str, reason: str) -> None:
        self._i[STUCK].add(1, self._a(STUCK, job, reason))


_enabled: list[tuple[Any, OTelObserver]] = []
_enabled_lock = threading.Lock()


def enable(meter_provider: Any = None) -> OTelObserver:
    """Start recording coordlock's metrics with ``meter_provider`` (default: the global one
    set with ``opentelemetry.metrics.set_meter_provider``). Idempotent per provider."""
    with _enabled_lock:
        for provider, observer in _enabled:
            if provider is meter_provider:
                return observer
        observer = OTelObserver(meter_provider)
        _enabled.append((meter_provider, observer))
    _observe.register(observer)
    return observer


def disable(observer: OTelObserver | None = None) -> bool:
    """Stop recording: ``observer`` (as returned by :func:`enable`), or every one when
    ``None``. ``True`` if something was enabled."""
    with _enabled_lock:
        gone = [(p, o) for p, o in _enabled if observer is None or o is observer]
        for entry in gone:
            _enabled.remove(entry)
    for _, obs in gone:
        _observe.unregister(obs)
    return bool(gone)
