"""Cluster-wide job control (issue 15 item 4): pause / resume / run now / one-shot jobs and
the job's return value in history, across instances sharing one coordinator."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from coordlock import ConfigurationError, connect
from coordlock._protocol import RunRecord
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import Event, ManualClock, Scheduler, current_run
from coordlock.scheduler.control import (
    CONTROL_JOB,
    REGISTRY_JOB,
    RUN_NOW_JOB,
    read_registry,
    trigger_from_spec,
)
from coordlock.scheduler.job import RESULT_MAX, encode_result
from coordlock.testing.contract import eventually

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z, a multiple of 10


def noop() -> None:
    pass


def mem() -> MemoryCoordinator:
    return MemoryCoordinator(f"ctl-{uuid.uuid4().hex}")


# -- pause / resume (injected clock, in this thread) ---------------------------------------------


def test_a_paused_job_is_skipped_on_every_instance_until_resumed() -> None:
    coord = mem()
    clock = ManualClock(T0 - 5)
    ran: list[tuple[str, str]] = []
    events: list[Event] = []
    scheds = [
        Scheduler(MemoryCoordinator(coord.name), clock=clock, instance_id=f"i{n}") for n in range(3)
    ]
    for sched in scheds:
        name = sched.instance_id
        sched.every(10, name="job")(lambda name=name: ran.append((name, tick_now())))
        sched.on("skipped", events.append)
    scheds[1].pause("job", note="maintenance")
    for tick in (T0, T0 + 10):
        clock.set(tick)
        assert [s.run_pending() for s in scheds] == [0, 0, 0]
    assert ran == []
    rows = [r for r in coord.history("job") if r.status == "skipped"]
    assert sorted(r.tick for r in rows) == ["2023-11-14T22:13:20Z", "2023-11-14T22:13:30Z"]
    assert all(r.error == "paused" for r in rows)  # one row per tick, by its winner
    paused = [e for e in events if e.reason == "paused"]
    assert len(paused) == 2  # the winner's event; the others lost the claim
    status = scheds[2].status("job")
    assert status.paused and status.changed_by == "i1" and status.note == "maintenance"
    scheds[0].resume("job")
    clock.set(T0 + 20)
    assert sum(s.run_pending() for s in scheds) == 1
    assert len(ran) == 1 and not scheds[2].status("job").paused


def tick_now() -> str:
    ctx = current_run()
    assert ctx is not None
    return ctx.key


def test_pausing_an_unknown_or_reserved_name() -> None:
    sched = Scheduler(mem(), clock=ManualClock(T0))
    sched.pause("not-registered-here")  # another instance may have it
    assert sched.status("not-registered-here").paused
    for reserved in (CONTROL_JOB, RUN_NOW_JOB, REGISTRY_JOB):
        with pytest.raises(ValueError, match="reserves"):
            sched.pause(reserved)
        with pytest.raises(ValueError, match="reserves"):
            sched.add(noop, 10, name=reserved)
    with pytest.raises(ValueError):
        sched.pause("")
    with pytest.raises(TypeError):
        sched.pause("job", note=3)  # type: ignore[arg-type]


class NoHistory:
    """A coordinator without run history (claims only)."""

    def __init__(self) -> None:
        self.inner = mem()

    def acquire(self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True):  # type: ignore[no-untyped-def]
        return self.inner.acquire(name, ttl, wait=wait, renew=renew)

    def release(self, lease: Any) -> bool:
        return self.inner.release(lease)

    def extend(self, lease: Any, ttl: float) -> bool:
        return self.inner.extend(lease, ttl)

    def claim(self, key: str, hold: float) -> bool:
        return self.inner.claim(key, hold)

    def close(self) -> None:
        self.inner.close()


def test_control_needs_a_coordinator_that_keeps_history() -> None:
    sched = Scheduler(NoHistory(), clock=ManualClock(T0))
    for call in (sched.pause, sched.resume, sched.run_now, sched.status):
        with pytest.raises(ConfigurationError, match="keeps no run history"):
            call("job")


# -- one-shot jobs --------------------------------------------------------------------------------


def test_a_one_shot_job_runs_once_across_instances() -> None:
    coord = mem()
    clock = ManualClock(T0 - 5)
    ran: list[str] = []
    scheds = [
        Scheduler(MemoryCoordinator(coord.name), clock=clock, instance_id=f"i{n}") for n in range(3)
    ]
    when = datetime.fromtimestamp(T0, timezone.utc)
    for sched in scheds:
        sched.at(when, name="migrate")(lambda: ran.append(tick_now()))
    assert scheds[0].jobs()[0].next_run == when
    assert [s.run_pending() for s in scheds] == [0, 0, 0]
    clock.set(T0 + 30)  # late: within the default grace (a day) it still runs, once
    assert sum(s.run_pending() for s in scheds) == 1
    clock.set(T0 + 60)
    assert sum(s.run_pending() for s in scheds) == 0
    assert ran == ["migrate@2023-11-14T22:13:20Z"]
    assert scheds[0].jobs()[0].next_run is None
    # an instance started later (within the day) loses the tick's claim
    late = Scheduler(MemoryCoordinator(coord.name), clock=ManualClock(T0 + 3600))
    late.at(T0, name="migrate")(lambda: ran.append("late"))
    assert late.run_pending() == 0 and ran == ["migrate@2023-11-14T22:13:20Z"]


def test_one_shot_bad_input() -> None:
    sched = Scheduler(mem(), clock=ManualClock(T0))
    with pytest.raises(ValueError, match="timezone-aware"):
        sched.at(datetime(2030, 1, 1), name="x")
    with pytest.raises(TypeError, match="aware datetime or epoch seconds"):
        sched.at("2030-01-01", name="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        sched.at(float("inf"), name="x")
    with pytest.raises(ValueError, match="misfire"):
        sched.at(T0, name="x", misfire="sometimes")


# -- results --------------------------------------------------------------------------------------


def test_results_are_json_and_size_capped() -> None:
    assert encode_result(None) is None
    assert json.loads(encode_result({"rows": 3, "ok": True}) or "") == {"rows": 3, "ok": True}
    assert json.loads(encode_result({1, 2}) or "") == "{1, 2}"  # not JSON: its repr
    assert json.loads(encode_result(float("nan")) or "") == "nan"
    big = json.loads(encode_result("x" * (RESULT_MAX + 10)) or "")
    assert big["truncated"] is True and big["length"] == RESULT_MAX + 12
    assert len(encode_result("x" * (RESULT_MAX + 10)) or "") < 400


def test_run_history_keeps_the_return_value_in_memory() -> None:
    coord = mem()
    clock = ManualClock(T0)
    sched = Scheduler(coord, clock=clock)
    sched.every(10, name="report")(lambda: {"rows": 42})
    sched.every(10, name="boom")(lambda: 1 / 0)
    assert sched.run_pending() == 2
    (row,) = coord.history("report")
    assert row.status == "finished" and json.loads(row.result or "") == {"rows": 42}
    (failed,) = coord.history("boom")
    assert failed.status == "failed" and failed.result is None


# -- run now (real threads, injected clock far from any tick) -------------------------------------


def test_run_now_runs_once_on_one_instance_even_while_paused() -> None:
    coord = mem()
    clock = ManualClock(T0 + 1)  # the next tick of every(3600) is an hour away
    ran: list[str] = []
    lock = threading.Lock()
    scheds = [
        Scheduler(
            MemoryCoordinator(coord.name),
            clock=clock,
            instance_id=f"i{n}",
            control_interval=0.05,
        )
        for n in range(3)
    ]

    def job() -> str:
        ctx = current_run()
        assert ctx is not None
        with lock:
            ran.append(ctx.instance)
        return ctx.key

    for sched in scheds:
        sched.every(3600, name="job")(job)
    scheds[0].pause("job")
    try:
        for sched in scheds:
            sched.start()
        request = scheds[2].run_now("job")
        assert eventually(lambda: len(ran) == 1, 10)
        time.sleep(0.5)  # every instance polled again meanwhile
        assert len(ran) == 1
        rows = [r for r in coord.history("job") if r.status == "finished"]
        assert len(rows) == 1 and rows[0].instance == ran[0]
        assert json.loads(rows[0].result or "") == f"job@run-now-{request}"
        taken = [r for r in coord.history(RUN_NOW_JOB) if r.run_id.endswith(request)]
        assert [r.status for r in taken] == ["taken"] and taken[0].instance == ran[0]
        assert scheds[1].status("job").run_now_pending == 0
    finally:
        for sched in scheds:
            sched.stop()


def test_jobs_are_published_for_any_process_to_read() -> None:
    coord = mem()
    sched = Scheduler(
        MemoryCoordinator(coord.name), clock=ManualClock(T0 + 1), control_interval=0.05
    )
    sched.cron("*/5 * * * *", name="sync", timezone="Europe/Berlin")(noop)
    sched.every(30, name="beat", offset=5)(noop)
    sched.at(T0 + 3600, name="once")(noop)
    try:
        sched.start()
        assert eventually(lambda: len(read_registry(coord)) == 3, 10)
        sched.every(60, name="later")(noop)
        assert eventually(lambda: "later" in read_registry(coord), 10)
    finally:
        sched.stop()
    rows = read_registry(coord)
    for name, text in (("sync", "cron '*/5 * * * *' Europe/Berlin"), ("beat", "every 30s")):
        assert rows[name].error is not None and rows[name].error.startswith(text[:8])
    trig = trigger_from_spec(rows["sync"].tick)
    assert trig is not None and trig.next_after(T0) == T0 + 100  # 22:15:00Z
    other = Scheduler(MemoryCoordinator(coord.name), clock=ManualClock(T0))
    status = other.status("beat")  # not registered there: the published trigger
    assert status.next_run == datetime.fromtimestamp(T0 + 15, timezone.utc)  # 22:13:35Z
    assert other.status("nothing").next_run is None
    # control rows never crowd the newest rows a watchdog scans
    coord.record_run(RunRecord("r1", "beat", "2023-11-14T22:13:05Z", "i0", T0 - 15))
    assert [r.run_id for r in coord.history(None, 1)] == ["r1"]


# -- across processes' worth of instances on every backend ----------------------------------------


class Cluster:
    """Three schedulers, each with its own connection, running an every(1) job and a
    one-shot job on the real clock."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runs: list[tuple[str, float, str, bool]] = []  # job, tick, instance, manual
        self.lock = threading.Lock()
        self.coords = [connect(url) for _ in range(3)]
        self.scheds = [
            Scheduler(c, instance_id=f"i{n}", control_interval=0.2, shutdown_grace=5)
            for n, c in enumerate(self.coords)
        ]
        self.once_at = float(round(time.time()) + 3)
        for sched in self.scheds:
            sched.every(1, name="tick", grace=0.9)(self.record)
            sched.at(self.once_at, name="once")(self.record)

    def record(self) -> None:
        ctx = current_run()
        assert ctx is not None
        with self.lock:
            self.runs.append((ctx.job, ctx.tick.timestamp(), ctx.instance, "@run-now-" in ctx.key))

    def of(self, job: str, manual: bool = False) -> list[tuple[str, float, str, bool]]:
        with self.lock:
            return [r for r in self.runs if r[0] == job and r[3] == manual]

    def close(self) -> None:
        for sched in self.scheds:
            sched.stop()
        for coord in self.coords:
            coord.close()


def test_pause_resume_run_now_and_at_across_three_instances(
    backend_name: str, backend_url: str
) -> None:
    if backend_name == "memory":
        pytest.skip("covered by the in-process tests above")
    c = Cluster(backend_url)
    try:
        for sched in c.scheds:
            sched.start()
        assert eventually(lambda: len(c.of("tick")) >= 2, 20)
        c.scheds[0].pause("tick")
        paused_at = time.time()
        time.sleep(2.5)
        request = c.scheds[1].run_now("tick")
        assert eventually(lambda: len(c.of("tick", manual=True)) == 1, 15)
        time.sleep(1.0)
        c.scheds[2].resume("tick")
        resumed_at = time.time()
        assert eventually(lambda: any(t > resumed_at for _, t, _, _ in c.of("tick")), 15)
        assert eventually(lambda: len(c.of("once")) == 1, 15)
        time.sleep(1.0)
    finally:
        c.close()
    ticks = Counter(t for _, t, _, _ in c.of("tick"))
    assert all(n == 1 for n in ticks.values()), ticks  # every tick ran once
    assert [t for t in ticks if paused_at < t < resumed_at] == []  # none while paused
    assert len(c.of("tick", manual=True)) == 1  # run now: exactly one run
    assert [t for _, t, _, _ in c.of("once")] == [c.once_at]  # at: exactly one
    coordinator = connect(backend_url)
    try:
        rows = coordinator.history("tick", 1000)  # type: ignore[attr-defined]
        skipped = [r for r in rows if r.status == "skipped" and r.error == "paused"]
        assert skipped, "a paused tick is recorded as skipped(paused)"
        assert len({r.tick for r in skipped}) == len(skipped)  # once per tick
        taken = [r for r in coordinator.history(RUN_NOW_JOB, 50) if r.run_id.endswith(request)]  # type: ignore[attr-defined]
        assert [r.status for r in taken] == ["taken"]
    finally:
        coordinator.close()


# Backends that store RunRecord.result: memory (keeps the object) and ZooKeeper (stores the
# record as JSON). The others store a fixed list of fields; see docs/scheduler.md.
def test_history_keeps_the_return_value(
    backend_name: str, backend_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    coordinator = connect(backend_url)
    try:
        record = RunRecord(
            run_id=uuid.uuid4().hex,
            job="report",
            tick="2023-11-14T22:13:20Z",
            instance="i0",
            started=T0,
            finished=T0 + 1,
            status="finished",
            result='{"rows": 42}',
        )
        coordinator.record_run(record)  # type: ignore[attr-defined]
        (row,) = coordinator.history("report", 10)  # type: ignore[attr-defined]
        assert row.result == '{"rows": 42}'
    finally:
        coordinator.close()


# -- the command line ----------------------------------------------------------------------------


def test_coordlock_jobs_pause_resume_run(tmp_path: Path) -> None:
    from cli_helpers import run_cli

    url = f"sqlite:///{tmp_path}/ctl.db"
    clock = ManualClock(T0 - 5)
    publisher = Scheduler(url, clock=ManualClock(T0 - 5), control_interval=0.05)
    publisher.every(10, name="sync")(noop)
    publisher.start()  # publishes its jobs
    assert publisher.coordinator is not None
    assert eventually(lambda: "sync" in read_registry(publisher.coordinator), 10)
    publisher.stop()
    sched = Scheduler(url, clock=clock, instance_id="web-1")
    sched.every(10, name="sync")(lambda: {"synced": 3})

    out = run_cli("jobs", "pause", "sync", "--note", "deploy", "--url", url)
    assert out.returncode == 0, out.stderr
    assert "paused sync" in out.stdout
    assert sched.status("sync").paused and sched.status("sync").note == "deploy"
    assert (sched.status("sync").changed_by or "").startswith("cli:")
    clock.set(T0)
    assert sched.run_pending() == 0  # skipped(paused)

    listing = json.loads(run_cli("jobs", "--json", "--url", url).stdout)["jobs"]
    (sync,) = listing
    assert sync["job"] == "sync" and sync["paused"] is True
    assert sync["last_run"]["status"] == "skipped" and sync["last_run"]["error"] == "paused"
    assert sync["trigger"] == "every 10s" and sync["next_run"] is not None
    text = run_cli("jobs", "--url", url).stdout
    assert "paused" in text and "NEXT RUN" in text

    out = run_cli("jobs", "resume", "sync", "--json", "--url", url)
    assert out.returncode == 0 and json.loads(out.stdout) == {"job": "sync", "paused": False}
    clock.set(T0 + 10)
    assert sched.run_pending() == 1
    last = json.loads(run_cli("jobs", "--json", "--url", url).stdout)["jobs"][0]["last_run"]
    assert last["status"] == "finished"
    assert last["result"] in (None, '{"synced": 3}')  # None: SQLite does not store it yet

    out = run_cli("jobs", "run", "sync", "--json", "--url", url)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["job"] == "sync" and answer["registered"] is True and answer["request"]
    assert sched.status("sync").run_now_pending == 1
    out = run_cli("jobs", "run", "nobody-has-it", "--url", url)
    assert out.returncode == 0 and "no scheduler has published" in out.stdout

    # control rows stay out of `coordlock history`
    runs = json.loads(run_cli("history", "--json", "--url", url).stdout)["runs"]
    assert runs and all(not r["job"].startswith("coordlock:") for r in runs)
    assert run_cli("jobs", "pause", "coordlock:control", "--url", url).returncode == 64
    sched.stop()
