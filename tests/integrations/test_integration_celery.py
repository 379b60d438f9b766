"""Celery integration: real beat and worker processes, the throwaway Redis as broker."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _procs import Proc, Tally, env_with, next_tick, sleep_until
from celery import Celery
from celery.exceptions import Ignore
from celery.schedules import BaseSchedule, crontab

import coordlock
from coordlock import BackendUnavailable
from coordlock.integrations.celery import (
    CoordinatedScheduler,
    OncePerTickTask,
    entry_trigger,
    once_per_tick,
    run_key,
    send_tick,
)
from coordlock.scheduler import CronTrigger, IntervalTrigger, ManualClock

PERIOD = 2.0
TICKS = 10
ENTRY = "report-every-2s"


def test_two_beats_and_a_worker_run_each_tick_once(
    fresh_redis_server: Any, tmp_path: Path
) -> None:
    """2 beat processes + 1 worker, broker and coordinator on a throwaway Redis, 10 ticks."""
    broker = f"{fresh_redis_server.url.rsplit('/', 1)[0]}/3"
    env = env_with(CELERY_BROKER_URL=broker, COORDLOCK_URL=fresh_redis_server.url)
    celery = [sys.executable, "-m", "celery", "-A", "celery_beat"]
    worker = Proc(
        [*celery, "worker", "--pool=solo", "-l", "info", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        env=env, cwd=tmp_path, name="worker",
    )
    beats = [Proc([*celery, "beat", "-l", "info"], env=env, cwd=tmp_path, name=f"beat{i}")
             for i in range(2)]
    try:
        worker.wait_for(r"ready\.", 90)
        for beat in beats:
            beat.wait_for(r"beat: Starting", 90)
        first = next_tick(time.time() + 1.0, PERIOD)
        last = first + (TICKS - 1) * PERIOD
        sleep_until(last + 0.5)
        worker.wait_for(re.escape(f"report for {ENTRY}@") +
                        re.escape(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))), 30)
        for beat in beats:
            beat.stop()
        # A message delivered twice (what acks_late redelivery does) runs once.
        client = Celery(broker=broker)
        manual = f"manual@{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        for _ in range(2):
            client.send_task("celery_beat.report", task_id=manual)
        worker.wait_for(re.escape(f"celery_beat.report[{manual}] already started once"), 30)
    finally:
        for beat in beats:
            beat.stop()
        worker.stop()
    ran = re.findall(r"report for (\S+)", worker.text)
    tally = Tally.of(ENTRY, first, PERIOD, TICKS, [k for k in ran if k.startswith(ENTRY)])
    sent = [beat.text.count("Sending due task") for beat in beats]
    print(tally.summary("celery beat", 3), f"sent_per_beat={sent}")
    assert tally.duplicates == 0, tally.ran
    assert tally.misses == [], (tally.ran, worker.text[-3000:])
    # Beats sent each tick once: no beat-level duplicate reached the worker's guard.
    redelivered = [x for x in worker.lines if "already started once" in x and manual not in x]
    assert redelivered == [], redelivered
    assert ran.count(manual) == 1


# --- beat scheduler in-process -----------------------------------------------------------------


class Sunrise(BaseSchedule):  # type: ignore[misc]
    """A schedule type the beat scheduler cannot turn into ticks (like celery's solar)."""

    def is_due(self, last_run_at: Any) -> tuple[bool, float]:
        return False, 60.0


def _app(url: str, schedule: Any = 1.0, **conf: Any) -> Celery:
    app = Celery("t", broker="memory://", set_as_current=False)
    app.conf.update(
        coordlock_url=url,
        beat_schedule={"tick": {"task": "t.tick", "schedule": schedule}},
        **conf,
    )
    return app


class Recording(CoordinatedScheduler):
    """Records what would be sent instead of publishing it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        super().__init__(*args, **kwargs)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        self.sent.append((entry.name, dict(entry.options)))

    @property
    def producer(self) -> None:  # type: ignore[override]
        return None


def test_two_beats_in_one_process_send_each_tick_once(backend_url: str) -> None:
    beats = [Recording(app=_app(backend_url)) for _ in range(2)]
    try:
        for _ in range(3):
            for beat in beats:
                beat.tick()
            time.sleep(1.05)
            for beat in beats:
                beat.tick()
    finally:
        for beat in beats:
            beat.close()
    sent = [options["task_id"] for beat in beats for _, options in beat.sent]
    assert len(sent) >= 3 and len(sent) == len(set(sent)), sent
    for name, options in (item for beat in beats for item in beat.sent):
        assert name == "tick"
        assert re.fullmatch(r"tick@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", options["task_id"])
        assert options["headers"]["coordlock_tick"] == options["task_id"]


def test_beat_fails_closed_when_the_coordinator_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coordlock.testing.servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?retry_deadline=0.5"
    beat = Recording(app=_app(url))
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        delay = beat.tick()
    beat.close()
    assert beat.sent == []
    assert "fail closed" in caplog.text and "BackendUnavailable" in caplog.text
    assert 0 <= delay <= 1.0


def test_schedules_map_to_the_schedulers_triggers() -> None:
    app = Celery("t", set_as_current=False)
    app.conf.timezone = "Europe/Berlin"
    cron = crontab(minute="*/15", hour="9-17", day_of_week="mon-fri", app=app)
    trigger = entry_trigger(cron)
    assert isinstance(trigger, CronTrigger)
    assert trigger.expr == "*/15 9-17 * * mon-fri" and trigger.timezone == "Europe/Berlin"
    assert entry_trigger(crontab(minute=0, hour=[3, 15], app=app)).expr == "0 3,15 * * *"
    from celery.schedules import schedule

    assert entry_trigger(schedule(30.0)) == IntervalTrigger(30)
    with pytest.raises(TypeError, match="cannot coordinate a Sunrise schedule"):
        entry_trigger(Sunrise(app=app))


def test_an_uncoordinated_schedule_fails_at_beat_start() -> None:
    app = _app("memory://celery-custom", schedule=Sunrise())
    with pytest.raises(TypeError, match="cannot coordinate a Sunrise schedule"):
        Recording(app=app)


def test_a_late_tick_past_the_grace_is_not_sent(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import coordlock.integrations.celery as module

    now = [1_700_000_000.0 + 600]  # 1400 s after an hourly tick
    monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: now[0]))
    beat = Recording(app=_app("memory://celery-late", schedule=3600.0, coordlock_grace=1))
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        delay = beat.tick()
    assert beat.sent == [] and "past its grace" in caplog.text
    assert delay == pytest.approx(300.0)  # beat's max_interval caps the sleep
    now[0] = 1_700_000_000.0 + 2800.5  # the next hourly tick, half a second late
    beat.tick()
    assert [options["task_id"] for _, options in beat.sent] == ["tick@2023-11-14T23:00:00Z"]


# --- worker guard in-process -------------------------------------------------------------------


def _worker_app(url: str) -> Celery:
    app = Celery("w", broker="memory://", set_as_current=False)
    app.conf.coordlock_url = url
    return app


def test_once_per_tick_task_runs_a_message_id_once(backend_url: str) -> None:
    app = _worker_app(backend_url)
    calls: list[str] = []
    from celery._state import _task_stack

    @app.task(base=OncePerTickTask, bind=True)
    def job(self: Any) -> str:
        calls.append(self.request.id)
        return "done"

    @app.task
    @once_per_tick
    def plain(tag: str) -> None:
        calls.append(tag)

    for task in (job, plain):
        for retries, expected in ((0, True), (0, False), (1, True)):
            task.push_request(id=f"{task.name}@2024-01-01T00:00:00Z", retries=retries)
            _task_stack.push(task)
            try:
                if expected:
                    task() if task is job else task.run("p")
                else:
                    with pytest.raises(Ignore):
                        task() if task is job else task.run("p")
            finally:
                _task_stack.pop()
                task.pop_request()
    assert calls.count(f"{job.name}@2024-01-01T00:00:00Z") == 2  # the first delivery, the retry
    assert calls.count("p") == 2
    job.push_request()  # no id: a direct call is not guarded
    try:
        assert job() == "done" and job() == "done"
    finally:
        job.pop_request()
    assert run_key("a@t") == "run:a@t" and run_key("a@t", 2) == "run:a@t#retry2"


def test_worker_guard_fails_closed() -> None:
    from coordlock.testing.servers import free_port

    app = _worker_app(f"redis://127.0.0.1:{free_port()}/0?retry_deadline=0.5")
    calls: list[int] = []

    @app.task(base=OncePerTickTask)
    def job() -> None:
        calls.append(1)

    job.push_request(id="j@2024-01-01T00:00:00Z", retries=0)
    try:
        with pytest.raises(BackendUnavailable):
            job()
    finally:
        job.pop_request()
    assert calls == []


def test_send_tick_uses_the_running_ticks_key() -> None:
    sent: list[dict[str, Any]] = []

    class Task:
        def apply_async(self, **kwargs: Any) -> str:
            sent.append(kwargs)
            return "ok"

    clock = ManualClock(1_700_000_000.0)
    sched = coordlock.Scheduler("memory://celery-send", instance_id="a", clock=clock)
    sched.add(lambda: send_tick(Task(), args=(1,)), 1.0, name="enqueue")
    with pytest.raises(RuntimeError, match="outside a Scheduler job"):
        send_tick(Task())
    sched.run_pending()
    clock.advance(1.0)
    sched.run_pending()
    assert sent and sent[-1]["task_id"] == "enqueue@2023-11-14T22:13:21Z"
    assert sent[-1]["args"] == (1,)
