"""The OpenTelemetry exporter, read back with the SDK's in-memory metric reader."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import coordlock
import coordlock.metrics.otel as otel
from coordlock import _observe
from coordlock.metrics import METRICS
from coordlock.scheduler import ManualClock, Scheduler


class Reader:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.observer = otel.enable(meter_provider=self.provider)

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                if scope.scope.name == "coordlock":
                    for metric in scope.metrics:
                        found[metric.name] = metric
        return found

    def point(self, name: str, **attrs: str) -> Any:
        metric = self.metrics().get(name)
        if metric is None:
            return None
        for point in metric.data.data_points:
            if dict(point.attributes) == attrs:
                return point
        return None

    def value(self, name: str, **attrs: str) -> float:
        point = self.point(name, **attrs)
        return 0 if point is None else point.value

    def count(self, name: str, **attrs: str) -> int:
        point = self.point(name, **attrs)
        return 0 if point is None else int(point.count)

    def close(self) -> None:
        otel.disable(self.observer)
        self.provider.shutdown()


@pytest.fixture
def reader() -> Iterator[Reader]:
    r = Reader()
    yield r
    r.close()
    assert not _observe.observers


@pytest.fixture
def memory() -> Iterator[Any]:
    c = coordlock.connect(f"memory://otel-{uuid.uuid4().hex}")
    yield c
    c.close()


def test_instruments_follow_the_metric_table(reader: Reader, memory: Any) -> None:
    with memory.lock("otel-typed", ttl=5):
        pass
    _observe.lease_lost("memory", "otel-typed", "expired")
    _observe.renewal("memory", "otel-typed", "renewed", 0.001)
    _observe.acquire("memory", "otel-typed", "acquired", 0.01, 0.004)
    held = memory.acquire("otel-held", 30)  # for the held gauge
    for fn, args in (
        (_observe.tick_claimed, ("j",)), (_observe.tick_skipped, ("j", "running")),
        (_observe.tick_missed, ("j", 1)), (_observe.run_started, ("j", 0.1)),
        (_observe.run_finished, ("j", "finished", 0.2)), (_observe.run_stuck, ("j", "timeout")),
    ):  # fmt: skip
        fn(*args)  # type: ignore[operator]
    found = reader.metrics()
    held.release()
    for metric in METRICS:
        assert metric.otel in found, metric.otel
        assert found[metric.otel].unit == metric.unit
        assert found[metric.otel].description == metric.help
        for point in found[metric.otel].data.data_points:
            assert set(point.attributes) == set(metric.labels)
    acquire = reader.point("coordlock.acquire", backend="memory", outcome="acquired")
    assert list(acquire.explicit_bounds) == list(
        next(m for m in METRICS if m.otel == "coordlock.acquire").buckets
    )


def test_lock_events_are_recorded(reader: Reader, memory: Any) -> None:
    held = reader.value("coordlock.leases_held", backend="memory")  # other tests' leases
    lease = memory.acquire("otel-lock", 30)
    assert lease is not None
    assert reader.value("coordlock.leases_held", backend="memory") == held + 1
    assert memory.acquire("otel-lock", 30) is None
    assert lease.release()
    assert reader.value("coordlock.leases_held", backend="memory") == held
    assert reader.count("coordlock.acquire", backend="memory", outcome="acquired") == 1
    assert reader.count("coordlock.acquire", backend="memory", outcome="busy") == 1

    short = memory.acquire("otel-expiring", 0.2, renew=False)
    assert short is not None
    deadline = time.monotonic() + 10
    while not short.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert short.lost
    deadline = time.monotonic() + 10
    while (
        reader.value("coordlock.leases_lost", backend="memory", reason="expired") < 1
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert reader.value("coordlock.leases_lost", backend="memory", reason="expired") == 1
    assert reader.value("coordlock.leases_held", backend="memory") == held


def test_scheduler_events_are_recorded(reader: Reader) -> None:
    clock = ManualClock(1_800_000_000.0)
    sched = Scheduler(f"memory://otel-s-{uuid.uuid4().hex}", instance_id="o1", clock=clock)

    def broken() -> None:
        raise RuntimeError("no")

    sched.every(30, name="otel-job")(lambda: None)
    sched.every(30, name="otel-broken")(broken)
    assert sched.run_pending() == 2
    clock.advance(95)
    sched.run_pending()
    assert reader.value("coordlock.ticks_claimed", job="otel-job") == 1
    assert reader.value("coordlock.runs", job="otel-job", outcome="finished") == 1
    assert reader.value("coordlock.runs", job="otel-broken", outcome="failed") == 1
    assert reader.count("coordlock.run", job="otel-broken", outcome="failed") == 1
    assert reader.count("coordlock.dispatch_lag", job="otel-job") == 1
    assert reader.value("coordlock.ticks_missed", job="otel-job") >= 2
    assert reader.value("coordlock.runs_running", job="otel-job") == 0


def test_enable_is_idempotent_per_provider_and_disable_stops(memory: Any) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first = otel.enable(meter_provider=provider)
    assert otel.enable(meter_provider=provider) is first
    assert otel.disable() is True
    assert otel.disable() is False
    assert first not in _observe.observers
    with memory.lock("otel-after", ttl=5):
        pass
    data = reader.get_metrics_data()
    points = [
        p
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "coordlock.acquire"
        for p in m.data.data_points
    ]
    assert points == []
    provider.shutdown()
