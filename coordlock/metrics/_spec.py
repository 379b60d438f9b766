"""The metrics both exporters publish: one table, so names, labels and help texts agree."""

from __future__ import annotations

from dataclasses import dataclass

#: Histogram buckets (seconds) for lock operations: sub-millisecond to a minute.
LOCK_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
#: Histogram buckets (seconds) for runs and dispatch lag: 10 ms to an hour.
RUN_BUCKETS = (
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
)  # fmt: skip


@dataclass(frozen=True)
class Metric:
    """One metric. ``name`` is the Prometheus name as scraped (``_total`` included for
    counters; histograms add ``_bucket``/``_sum``/``_count``); ``otel`` the OpenTelemetry
    instrument name, with ``unit`` (``s``, or a count such as ``{lease}``), which
    OpenTelemetry's Prometheus exporter turns back into ``name``."""

    name: str
    kind: str  # "histogram", "counter" or "gauge" (an up-down counter in OpenTelemetry)
    labels: tuple[str, ...]
    help: str
    otel: str
    unit: str = ""
    buckets: tuple[float, ...] = ()


ACQUIRE = Metric(
    "coordlock_acquire_seconds", "histogram", ("backend", "outcome"),
    "Time of one acquire call, waiting included; outcome: acquired, busy, error, cancelled.",
    "coordlock.acquire", "s", LOCK_BUCKETS,
)  # fmt: skip
HANDOFF = Metric(
    "coordlock_handoff_wait_seconds", "histogram", ("backend",),
    "For acquisitions that found the lock busy and then got it: seconds from the first busy "
    "answer to the grant.",
    "coordlock.handoff_wait", "s", LOCK_BUCKETS,
)  # fmt: skip
HELD = Metric(
    "coordlock_leases_held", "gauge", ("backend",),
    "Leases this process holds now.",
    "coordlock.leases_held", "{lease}",
)  # fmt: skip
LOST = Metric(
    "coordlock_leases_lost_total", "counter", ("backend", "reason"),
    "Leases lost; reason: expired, not-ours, late-renewal, backend, error, closed.",
    "coordlock.leases_lost", "{lease}",
)  # fmt: skip
RENEWAL = Metric(
    "coordlock_renewal_seconds", "histogram", ("backend", "outcome"),
    "Time of one background renewal; outcome: renewed, lost, error.",
    "coordlock.renewal", "s", LOCK_BUCKETS,
)  # fmt: skip
CLAIMED = Metric(
    "coordlock_ticks_claimed_total", "counter", ("job",),
    "Ticks this instance won (and so runs or ran).",
    "coordlock.ticks_claimed", "{tick}",
)  # fmt: skip
SKIPPED = Metric(
    "coordlock_ticks_skipped_total", "counter", ("job", "reason"),
    "Ticks skipped; reason: claimed-elsewhere, running, coordinator-error, stopping.",
    "coordlock.ticks_skipped", "{tick}",
)  # fmt: skip
MISSED = Metric(
    "coordlock_ticks_missed_total", "counter", ("job",),
    "Ticks this instance reached too late to run (instance down, paused, overloaded).",
    "coordlock.ticks_missed", "{tick}",
)  # fmt: skip
RUNS = Metric(
    "coordlock_runs_total", "counter", ("job", "outcome"),
    "Runs that ended; outcome: finished, failed.",
    "coordlock.runs", "{run}",
)  # fmt: skip
RUN_SECONDS = Metric(
    "coordlock_run_seconds", "histogram", ("job", "outcome"),
    "Duration of runs, by outcome: finished, failed.",
    "coordlock.run", "s", RUN_BUCKETS,
)  # fmt: skip
RUNNING = Metric(
    "coordlock_runs_running", "gauge", ("job",),
    "Runs going on in this instance now.",
    "coordlock.runs_running", "{run}",
)  # fmt: skip
LAG = Metric(
    "coordlock_dispatch_lag_seconds", "histogram", ("job",),
    "Seconds from a tick's nominal time to the start of its run.",
    "coordlock.dispatch_lag", "s", RUN_BUCKETS,
)  # fmt: skip
STUCK = Metric(
    "coordlock_runs_stuck_total", "counter", ("job", "reason"),
    "Runs reported stuck; reason: timeout, instance-vanished.",
    "coordlock.runs_stuck", "{run}",
)  # fmt: skip

#: Every metric, core first, then the scheduler's.
METRICS: tuple[Metric, ...] = (
    ACQUIRE, HANDOFF, HELD, LOST, RENEWAL,
    CLAIMED, SKIPPED, MISSED, RUNS, RUN_SECONDS, RUNNING, LAG, STUCK,
)  # fmt: skip
