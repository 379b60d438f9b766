"""Metrics: the core's hook point (coordlock._observe) and the Prometheus exporter, scraped from a
real /metrics endpoint (prometheus_client's HTTP server on a loopback port) and parsed with
prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import coordlock
import coordlock.metrics.prometheus as prom
from coordlock import _observe
from coordlock._protocol import RunRecord
from coordlock.backends import Attempt
from coordlock.backends.memory import MemoryCoordinator
from coordlock.metrics import METRICS
from coordlock.scheduler import ManualClock, Scheduler

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scraper:
    """A registry served on 127.0.0.1 by prometheus_client's own HTTP server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.observer = prom.enable(self.registry)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return str(reply.read().decode())

    def families(self) -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(self.text())}

    def samples(self) -> Samples:
        found: Samples = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                found[(s.name, frozenset(s.labels.items()))] = s.value
        return found

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels`` (0 when absent, like an unset series)."""
        return self.samples().get((name, frozenset(labels.items())), 0.0)

    def wait_for(self, name: str, at_least: float, **labels: str) -> float:
        deadline = time.monotonic() + 15
        while True:
            value = self.value(name, **labels)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def close(self) -> None:
        prom.disable(self.registry)
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scraper() -> Iterator[Scraper]:
    s = Scraper()
    try:
        yield s
    finally:
        s.close()
    assert not _observe.observers, "an observer was left registered"


@pytest.fixture
def memory() -> Iterator[coordlock.RunCoordinator]:
    c = coordlock.connect(f"memory://metrics-{uuid.uuid4().hex}")
    yield c
    c.close()


# -- the hook point ----------------------------------------------------------------------------


class Recorder(_observe.Observer):
    """Records what it is handed; ``events`` flushes the queue first."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    @property
    def events(self) -> list[tuple[Any, ...]]:
        _observe.flush()
        return self.seen

    def acquire(self, *args: Any) -> None:
        self.seen.append(("acquire", *args))

    def lease_lost(self, *args: Any) -> None:
        self.seen.append(("lost", *args))

    def renewal(self, *args: Any) -> None:
        self.seen.append(("renewal", *args))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    _observe.register(r)
    yield r
    _observe.unregister(r)


def test_register_rejects_non_observers_and_is_idempotent() -> None:
    with pytest.raises(TypeError, match="Observer"):
        _observe.register(object())  # type: ignore[arg-type]
    r = Recorder()
    assert _observe.register(r) is r
    _observe.register(r)
    assert _observe.observers.count(r) == 1
    assert _observe.unregister(r) is True
    assert _observe.unregister(r) is False
    assert r not in _observe.observers


def test_without_observers_the_core_calls_no_hook(
    memory: coordlock.RunCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any) -> None:
        raise AssertionError("hook called without observers")

    for hook in ("post", "acquire", "lease_lost", "renewal"):
        monkeypatch.setattr(_observe, hook, boom)
    assert not _observe.observers
    lease = memory.acquire("quiet", 5)
    assert lease is not None and memory.acquire("quiet", 5) is None
    assert lease.release()


def test_events_of_a_pair_carry_backend_lock_outcome_and_times(
    memory: coordlock.RunCoordinator, recorder: Recorder
) -> None:
    with memory.lock("pair", ttl=5) as lease:
        assert memory.acquire("pair", 5) is None
    assert lease.released
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["acquire", "acquire"]  # a release posts nothing
    _, backend, lock, outcome, seconds, waited = recorder.events[0]
    assert (backend, lock, outcome, waited) == ("memory", "pair", "acquired", None)
    assert seconds >= 0
    assert recorder.events[1][3] == "busy"


def test_held_leases_are_read_from_the_live_leases() -> None:
    class Counted(MemoryCoordinator):
        backend_name = "held-test"  # a label no other test's leases use

    coordinator = Counted(f"held-{uuid.uuid4().hex}")
    first = coordinator.acquire("held-1", 30)
    second = coordinator.acquire("held-2", 0.2, renew=False)
    assert first is not None and second is not None
    assert _observe.held_leases()["held-test"] == 2
    deadline = time.monotonic() + 10
    while not second.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _observe.held_leases()["held-test"] == 1  # a lost lease is not held
    first.release()
    assert "held-test" not in _observe.held_leases()
    coordinator.close()


def test_a_failing_observer_never_breaks_locking(
    memory: coordlock.RunCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(_observe.Observer):
        def acquire(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

    broken = _observe.register(Broken())
    try:
        with caplog.at_level(logging.ERROR, logger="coordlock"):
            for _ in range(3):
                with memory.lock("robust", ttl=5) as lease:
                    assert lease.fence > 0
    finally:
        _observe.unregister(broken)
    failures = [r for r in caplog.records if "observer" in r.getMessage()]
    assert len(failures) == 1  # reported once, not per event
    assert getattr(failures[0], "event", None) == "observer-error"


def test_import_coordlock_loads_no_metrics_client() -> None:
    code = (
        "import sys, coordlock, coordlock.metrics\n"
        "bad = [m for m in ('prometheus_client', 'opentelemetry', 'starlette', 'uvicorn')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import coordlock.metrics.prometheus\n"
        "assert 'prometheus_client' in sys.modules and 'opentelemetry' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- Prometheus, scraped -----------------------------------------------------------------------


def test_lock_metrics_scraped_from_a_real_endpoint(backend_url: str, scraper: Scraper) -> None:
    coordinator = coordlock.connect(backend_url)
    try:
        backend = coordinator.backend_name  # type: ignore[attr-defined]
        held = scraper.value("coordlock_leases_held", backend=backend)  # other tests' leases
        lease = coordinator.acquire("scraped-lock", 30)
        assert lease is not None
        assert scraper.value("coordlock_leases_held", backend=backend) == held + 1
        assert coordinator.acquire("scraped-lock", 30) is None
        assert lease.release()
        assert scraper.value("coordlock_leases_held", backend=backend) == held
        count = "coordlock_acquire_seconds_count"
        assert scraper.value(count, backend=backend, outcome="acquired") == 1
        assert scraper.value(count, backend=backend, outcome="busy") == 1
        assert "scraped-lock" not in scraper.text()  # lock names are never labels
    finally:
        coordinator.close()


def test_every_metric_has_its_type_and_help(scraper: Scraper, memory: Any) -> None:
    with memory.lock("typed", ttl=5):
        families = scraper.families()  # the held gauge shows while a lease is held
    assert families["coordlock_leases_held"].samples
    _observe.tick_claimed("job-a")
    _observe.tick_skipped("job-a", "claimed-elsewhere")
    _observe.tick_missed("job-a", 2)
    _observe.run_started("job-a", 0.5)
    _observe.run_finished("job-a", "finished", 1.5)
    _observe.run_stuck("job-a", "timeout")
    _observe.lease_lost("memory", "typed", "expired")
    _observe.renewal("memory", "typed", "renewed", 0.001)
    _observe.acquire("memory", "typed", "acquired", 0.01, 0.005)  # a handoff
    families.update(
        (k, v) for k, v in scraper.families().items() if k != "coordlock_leases_held"
    )
    for metric in METRICS:
        base = metric.name.removesuffix("_total") if metric.kind == "counter" else metric.name
        assert base in families, metric.name
        assert families[base].type == metric.kind
        assert families[base].documentation == metric.help
        assert {s.name for s in families[base].samples}, metric.name
        for sample in families[base].samples:
            assert set(sample.labels) - {"le"} == set(metric.labels)
    assert scraper.value("coordlock_runs_running", job="job-a") == 0
    assert scraper.value("coordlock_ticks_missed_total", job="job-a") == 2
    assert scraper.value("coordlock_runs_total", job="job-a", outcome="finished") == 1


def test_histogram_buckets_are_cumulative_and_sum_up(scraper: Scraper) -> None:
    for seconds in (0.0004, 0.003, 0.003, 0.2, 100.0):
        _observe.acquire("memory", "h", "acquired", seconds, None)
    bucket = "coordlock_acquire_seconds_bucket"
    labels = {"backend": "memory", "outcome": "acquired"}
    assert scraper.value(bucket, le="0.0005", **labels) == 1
    assert scraper.value(bucket, le="0.005", **labels) == 3
    assert scraper.value(bucket, le="0.25", **labels) == 4
    assert scraper.value(bucket, le="60.0", **labels) == 4
    assert scraper.value(bucket, le="+Inf", **labels) == 5
    assert scraper.value("coordlock_acquire_seconds_sum", **labels) == pytest.approx(100.2064)


def test_handoff_wait_is_measured_for_a_waiter(scraper: Scraper) -> None:
    waiting = threading.Event()

    class Signalling(MemoryCoordinator):
        def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
            waiting.set()
            return super()._wait(name, ticket, timeout)

    coordinator = Signalling(f"handoff-{uuid.uuid4().hex}")
    holder = coordinator.acquire("handoff", 30)
    assert holder is not None
    got: list[Any] = []
    waiter = threading.Thread(
        target=lambda: got.append(coordinator.acquire("handoff", 30, wait=30))
    )
    waiter.start()
    assert waiting.wait(30)
    holder.release()
    waiter.join(30)
    assert got and got[0] is not None
    got[0].release()
    coordinator.close()
    count = scraper.value("coordlock_handoff_wait_seconds_count", backend="memory")
    waited = scraper.value("coordlock_handoff_wait_seconds_sum", backend="memory")
    total = scraper.value("coordlock_acquire_seconds_sum", backend="memory", outcome="acquired")
    assert count == 1
    assert 0 < waited <= total


def test_errors_and_cancellation_are_outcomes(scraper: Scraper) -> None:
    class Failing(MemoryCoordinator):
        backend_name = "failing"

        def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
            if name == "broken":
                raise RuntimeError("disk on fire")
            return super()._try_acquire(name, owner, ttl, ticket)

    coordinator = Failing(f"f-{uuid.uuid4().hex}")
    holder = coordinator.acquire("waited", 30)
    assert holder is not None
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            coordinator.acquire("broken", 5)

        async def cancelled() -> None:
            task = asyncio.ensure_future(coordinator.aacquire("waited", 5, wait=30))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancelled())
    finally:
        holder.release()
        coordinator.close()
    count = "coordlock_acquire_seconds_count"
    assert scraper.value(count, backend="failing", outcome="error") == 1
    assert scraper.value(count, backend="failing", outcome="cancelled") == 1
    assert _observe.held_leases().get("failing", 0) == 0


def test_lost_leases_by_reason(scraper: Scraper, memory: Any) -> None:
    short = memory.acquire("expiring", 0.2, renew=False)
    taken = memory.acquire("taken", 30)
    forced = memory.acquire("forced", 30)
    assert short is not None and taken is not None and forced is not None
    other = coordlock.connect(f"memory://{memory.name}")  # the same lock table
    assert other.force_release("taken")  # another coordinator: this one cannot know
    assert taken.extend() is False  # the server says: not ours
    assert memory.force_release("forced")  # this process's own holder hears at once, too
    other.close()
    deadline = time.monotonic() + 10
    while not short.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert short.lost
    lost = "coordlock_leases_lost_total"
    # losses are reported on coordlock's callback thread, in order, soon after
    assert scraper.wait_for(lost, 1, backend="memory", reason="expired") == 1
    assert scraper.wait_for(lost, 2, backend="memory", reason="not-ours") == 2
    for lease in (short, taken, forced):
        lease.release()
    assert scraper.value(lost, backend="memory", reason="expired") == 1  # counted once


def test_renewals_are_timed(scraper: Scraper, memory: Any) -> None:
    with memory.lock("renewed", ttl=0.3):
        value = scraper.wait_for(
            "coordlock_renewal_seconds_count", 1, backend="memory", outcome="renewed"
        )
    assert value >= 1


def test_async_leases_are_counted(scraper: Scraper, memory: Any) -> None:
    held = scraper.value("coordlock_leases_held", backend="memory")

    async def main() -> None:
        async with memory.lock("async-counted", ttl=5):
            assert scraper.value("coordlock_leases_held", backend="memory") == held + 1

    asyncio.run(main())
    assert scraper.value(
        "coordlock_acquire_seconds_count", backend="memory", outcome="acquired"
    ) == 1
    assert scraper.value("coordlock_leases_held", backend="memory") == held


def test_enable_is_idempotent_and_disable_removes_everything(memory: Any) -> None:
    registry = CollectorRegistry()
    first = prom.enable(registry)
    assert prom.enable(registry) is first
    assert _observe.observers.count(first) == 1
    with pytest.raises(TypeError, match="CollectorRegistry"):
        prom.enable(registry="nope")  # type: ignore[arg-type]
    assert prom.disable(registry) is True
    assert prom.disable(registry) is False
    assert first not in _observe.observers
    with memory.lock("after-disable", ttl=5):
        pass
    assert registry.get_sample_value(
        "coordlock_acquire_seconds_count", {"backend": "memory", "outcome": "acquired"}
    ) is None


# -- scheduler metrics, from a real Scheduler's events ----------------------------------------


def scheduler_pair(url: str, clock: ManualClock) -> tuple[Scheduler, Scheduler]:
    pair = []
    for instance in ("node-a", "node-b"):
        sched = Scheduler(url, instance_id=instance, clock=clock)
        pair.append(sched)
    return pair[0], pair[1]


def test_scheduler_metrics_from_real_runs(scraper: Scraper) -> None:
    clock = ManualClock(1_800_000_000.0)
    url = f"memory://sched-{uuid.uuid4().hex}"
    a, b = scheduler_pair(url, clock)
    jobs: Callable[[Scheduler], None]

    def jobs(sched: Scheduler) -> None:
        sched.every(60, name="report")(lambda: None)

        def flaky() -> None:
            raise ValueError("upstream down")

        sched.every(60, name="flaky")(flaky)

    jobs(a)
    jobs(b)
    assert a.run_pending() == 2  # node-a wins both ticks and runs them
    assert b.run_pending() == 0  # node-b: claimed elsewhere
    clock.advance(60 * 5 + 30)  # node-b sleeps through several ticks
    b.run_pending()
    value = scraper.value
    assert value("coordlock_ticks_claimed_total", job="report") == 1
    assert value("coordlock_runs_total", job="report", outcome="finished") == 1
    assert value("coordlock_runs_total", job="flaky", outcome="failed") == 1
    assert value("coordlock_run_seconds_count", job="flaky", outcome="failed") == 1
    assert value("coordlock_dispatch_lag_seconds_count", job="report") == 1
    assert value("coordlock_ticks_skipped_total", job="report", reason="claimed-elsewhere") == 1
    assert value("coordlock_ticks_missed_total", job="report") == 5
    assert value("coordlock_runs_running", job="report") == 0


def test_stuck_runs_are_counted(scraper: Scraper) -> None:
    url = f"memory://stuck-{uuid.uuid4().hex}"
    coordinator = coordlock.connect(url)
    sched = Scheduler(coordinator, instance_id="watcher", clock=ManualClock())
    sched.every(60, name="nightly")(lambda: None)
    sched.run_pending()
    ghost = RunRecord(
        run_id="r-ghost",
        job="nightly",
        tick="2026-01-01T00:00:00Z",
        instance="ghost-host:1:vanished",
        started=time.time() - 60,
    )
    coordinator.record_run(ghost)  # type: ignore[attr-defined]
    assert sched.scan_history() == 1
    assert scraper.value(
        "coordlock_runs_stuck_total", job="nightly", reason="instance-vanished"
    ) == 1
    coordinator.close()


def test_the_docs_list_every_metric_with_its_labels() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "monitoring.md").read_text()
    rows = {
        cells[0].strip("` "): cells
        for line in page.splitlines()
        if line.startswith("| `coordlock_")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {m.name for m in METRICS}
    for metric in METRICS:
        _, otel_name, kind, labels, _ = rows[metric.name]
        assert otel_name == f"`{metric.otel}`"
        assert kind == metric.kind
        assert [x.strip() for x in labels.split(",")] == list(metric.labels)


def test_the_queue_is_bounded_and_flushes_itself(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_observe, "LIMIT", 10)
    for i in range(25):
        _observe.lease_lost("memory", f"lock-{i}", "expired")
        assert len(_observe.events) <= 10
    assert len(recorder.seen) >= 15  # handed out without anyone flushing
    assert [e[2] for e in recorder.events] == [f"lock-{i}" for i in range(25)]  # in order


def test_events_queued_before_a_registration_go_to_the_observers_of_then(
    memory: Any, recorder: Recorder
) -> None:
    lease = memory.acquire("before", 5)
    late = _observe.register(Recorder())
    try:
        lease.release()
        assert late.events == []  # the acquire was queued before it registered
        assert [e[0] for e in recorder.events] == ["acquire"]
    finally:
        _observe.unregister(late)


def test_a_forked_child_drops_the_parents_queue(recorder: Recorder) -> None:
    import os

    _observe.lease_lost("memory", "parent", "expired")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, str(len(_observe.events)).encode())
        os._exit(0)
    os.close(write)
    child_queue = int(os.read(read, 32))
    os.waitpid(pid, 0)
    os.close(read)
    assert child_queue == 0
    assert [e[2] for e in recorder.events] == ["parent"]
