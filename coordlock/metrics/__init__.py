"""Metrics exporters for coordlock: Prometheus and OpenTelemetry, behind one hook in the core.

Nothing here is imported by ``import coordlock``, and each exporter imports its client library
only when enabled::

    import coordlock.metrics.prometheus
    coordlock.metrics.prometheus.enable()          # registers on prometheus_client's REGISTRY

    import coordlock.metrics.otel
    coordlock.metrics.otel.enable()                # uses the global OpenTelemetry MeterProvider

Both exporters observe the same events (see :mod:`coordlock._observe`); :data:`METRICS` lists
every metric with its labels. Scheduler metrics are fed by every scheduler's events, once
an exporter is enabled (:func:`scheduler_event` is what the scheduler calls).
"""

from __future__ import annotations

from .._observe import scheduler_event
from ._spec import METRICS, Metric

__all__ = ["METRICS", "Metric", "scheduler_event"]
