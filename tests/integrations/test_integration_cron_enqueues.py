"""Cron enqueues, workers execute: 3 Scheduler processes, one message per tick in the queue."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _procs import BIN, EXAMPLES, Proc, Tally, env_with, next_tick, sleep_until
from redis import Redis
from rq import Queue
from rq.job import Job

from coordlock.integrations.rq import job_id_for

PERIOD = 1.0
TICKS = 10
JOB = "enqueue-report"


def _run_three(script: str, env: dict[str, str], cwd: Path) -> tuple[list[Proc], float]:
    procs = [Proc([sys.executable, str(EXAMPLES / script)], env=env, cwd=cwd)
             for _ in range(3)]
    try:
        for proc in procs:
            proc.wait_for(r"^ready ", 60)
        first = next_tick(time.time() + 1.5, PERIOD)
        sleep_until(first + (TICKS - 1) * PERIOD + 0.8)
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0, 0, 0], [proc.text[-2000:] for proc in procs]
    return procs, first


@pytest.mark.parametrize("backend_name", ["redis"], indirect=True)
def test_rq_three_schedulers_enqueue_one_job_per_tick(
    backend_url: str, fresh_redis_server: Any, tmp_path: Path
) -> None:
    queue_url = f"{fresh_redis_server.url.rsplit('/', 1)[0]}/2"
    env = env_with(COORDLOCK_URL=backend_url, QUEUE_URL=queue_url, TICK_SECONDS=str(PERIOD))
    procs, first = _run_three("cron_enqueues_rq.py", env, tmp_path)
    lines = [line for proc in procs for line in proc.lines]
    enqueued = [m.group(1) for line in lines if (m := re.match(r"enqueued (\S+) as ", line))]
    tally = Tally.of(JOB, first, PERIOD, TICKS, enqueued)
    connection = Redis.from_url(queue_url)
    in_queue = Counter(Queue("reports", connection=connection).job_ids)
    print(tally.summary("cron enqueues (rq)", 3), f"queued={sum(in_queue.values())}")
    assert tally.duplicates == 0 and tally.misses == [], tally.ran
    assert not any(line.endswith(" as duplicate") for line in lines)
    assert [in_queue[job_id_for(key)] for key in tally.expected] == [1] * TICKS
    assert max(in_queue.values()) == 1
    # The workers execute: an RQ worker (burst) runs every queued job once.
    worker = subprocess.run(
        [str(BIN / "rq"), "worker", "--burst", "--url", queue_url,
         "-w", "rq.worker.SimpleWorker", "reports"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert worker.returncode == 0, worker.stderr
    for key in tally.expected:
        job = Job.fetch(job_id_for(key), connection=connection)
        assert job.return_value() == f"report for {key}"
    connection.close()


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
def test_celery_three_schedulers_send_one_message_per_tick(
    backend_url: str, fresh_redis_server: Any, tmp_path: Path
) -> None:
    broker = f"{fresh_redis_server.url.rsplit('/', 1)[0]}/4"
    env = env_with(COORDLOCK_URL=backend_url, CELERY_BROKER_URL=broker,
                   TICK_SECONDS=str(PERIOD))
    procs, first = _run_three("cron_enqueues_celery.py", env, tmp_path)
    sent = [m.group(1) for proc in procs for line in proc.lines
            if (m := re.match(r"sent (\S+)", line))]
    tally = Tally.of(JOB, first, PERIOD, TICKS, sent)
    connection = Redis.from_url(broker)
    messages = [json.loads(raw) for raw in connection.lrange("celery", 0, -1)]
    connection.close()
    ids = Counter(message["headers"]["id"] for message in messages)
    print(tally.summary("cron enqueues (celery)", 3), f"messages={sum(ids.values())}")
    assert tally.duplicates == 0 and tally.misses == [], tally.ran
    assert [ids[key] for key in tally.expected] == [1] * TICKS  # message id = tick key
    assert max(ids.values()) == 1
    assert {m["headers"]["task"] for m in messages} == {"cron_enqueues_celery.build_report"}


def test_job_ids_for_rq_are_valid_and_one_to_one() -> None:
    from rq.job import validate_job_id

    keys = ["sync@2024-03-31T01:00:00Z", "a.b@x", "a_b@x", "a_2eb@x", "ü@x"]
    ids = [job_id_for(key) for key in keys]
    for job_id in ids:
        validate_job_id(job_id)
    assert len(set(ids)) == len(keys)
    assert ids[0] == "sync_402024-03-31T01_3a00_3a00Z"
    with pytest.raises(ValueError):
        job_id_for("")
