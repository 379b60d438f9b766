"""The dashboard's JSON API on every backend, served by uvicorn on a loopback port, over real
data: runs of a real Scheduler (finished, failed, missed ticks, a stuck job past its timeout),
runs written with record_run, a held lock and the scheduler's own liveness and job leases."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dashboard_helpers import Served
from starlette.applications import Starlette
from starlette.routing import Mount

import coordlock
import coordlock.dashboard
from coordlock import BackendUnavailable
from coordlock._protocol import RunRecord
from coordlock.backends.memory import MemoryCoordinator
from coordlock.dashboard import _data
from coordlock.scheduler import ManualClock, Scheduler
from coordlock.scheduler import claims as scheduler_claims

T0 = 1_800_000_000.0  # a whole minute: every(60) ticks fall on it
TOKEN = "t0ken-" + "x" * 20


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Cluster:
    coordinator: Any
    planner: Scheduler  # run_pending-driven: finished, failed and missed ticks
    worker: Scheduler  # started: liveness lease, and a job stuck past its timeout
    lease: Any  # a user lock held by the test
    release_stuck: threading.Event
    app: Any  # the dashboard, built before the ticks were missed (it records misses)


@pytest.fixture
def cluster(backend_url: str) -> Iterator[Cluster]:
    coordinator = coordlock.connect(backend_url)
    clock = ManualClock(T0)
    planner = Scheduler(coordinator, instance_id="node-a", clock=clock)
    app = coordlock.dashboard.app(coordinator, scheduler=planner)

    def flaky() -> None:
        raise ValueError("upstream said 503")

    planner.every(60, name="report")(lambda: None)
    planner.every(60, name="flaky")(flaky)
    assert planner.run_pending() == 2
    clock.advance(60 * 4 + 5)  # node-a sleeps through ticks: they are missed
    planner.run_pending()

    release = threading.Event()
    worker = Scheduler(coordinator, instance_id="node-b", clock=ManualClock(T0))
    worker.every(60, name="slow", timeout=0.3)(lambda: release.wait(60))
    worker.start()
    lease = coordinator.acquire("orders-export", 60)
    assert lease is not None
    try:
        yield Cluster(coordinator, planner, worker, lease, release, app)
    finally:
        release.set()
        worker.stop(wait=True, timeout=30)
        lease.release()
        coordinator.close()


def stuck_seen(served: Served) -> Any:
    runs = served.json("/api/runs?status=stuck")["runs"]
    return runs if any(r["job"] == "slow" for r in runs) else None


def test_api_shows_runs_jobs_instances_and_locks(cluster: Cluster) -> None:
    with Served(cluster.app) as served:
        wait_until(lambda: stuck_seen(served), "the slow job to be reported stuck")
        data = served.json("/api/overview")

        assert data["capabilities"] == {
            "locks": True, "history": True, "force_unlock": data["capabilities"]["force_unlock"],
            "scheduler": True,
        }  # fmt: skip
        statuses = {(r["job"], r["status"]) for r in data["runs"]}
        assert {("report", "finished"), ("flaky", "failed"), ("slow", "stuck")} <= statuses
        assert ("report", "missed") in statuses and ("flaky", "missed") in statuses
        failed = next(r for r in data["runs"] if r["job"] == "flaky" and r["status"] == "failed")
        assert "upstream said 503" in failed["error"] and failed["problem"] is True
        assert failed["instance"] == "node-a" and failed["duration"] >= 0
        missed = next(r for r in data["runs"] if r["status"] == "missed")
        assert missed["count"] >= 3 and missed["problem"] is True

        summary = data["summary"]
        assert summary["failed"] >= 1 and summary["stuck"] >= 1 and summary["missed"] >= 3
        assert summary["locks"] == 1 and summary["instances_alive"] == 1

        jobs = {j["job"]: j for j in data["jobs"]}
        assert jobs["report"]["last_status"] in ("finished", "missed")
        assert jobs["report"]["schedule"] == "every 60s" and jobs["report"]["registered"]
        assert jobs["report"]["next_run"] > T0 and jobs["report"]["finished"] == 1
        assert jobs["flaky"]["failed"] == 1 and jobs["flaky"]["problem"]
        assert jobs["slow"]["running"] is True and jobs["slow"]["last_status"] == "stuck"
        assert jobs["slow"]["last_run"]["instance"] == "node-b"

        instances = {i["instance"]: i for i in data["instances"]}
        assert instances["node-b"]["alive"] is True
        assert instances["node-b"]["holder"] and instances["node-b"]["expires_in"] > 0
        assert instances["node-a"]["alive"] is False  # run_pending keeps no liveness lease
        assert instances["node-a"]["runs"] >= 2

        locks = {lock["name"]: lock for lock in data["locks"]}
        user = locks["orders-export"]
        assert user["kind"] == "lock" and user["fence"] == cluster.lease.fence
        assert user["holder"] and user["pid"] is not None and 0 < user["expires_in"] <= 60
        assert locks["coordlock:instance:node-b"]["kind"] == "instance"
        assert locks["coordlock:job:slow"]["kind"] == "job"
        assert locks["coordlock:job:slow"]["job"] == "slow"

        page = served.text("/")
        for shown in ("orders-export", "flaky", "upstream said 503", "node-b", "stuck"):
            assert shown in page


def test_runs_filters_and_bad_input(cluster: Cluster) -> None:
    with Served(cluster.app) as served:
        failed = served.json("/api/runs?status=failed")
        assert failed["filters"]["status"] == "failed"
        assert failed["runs"] and {r["status"] for r in failed["runs"]} == {"failed"}
        report = served.json("/api/runs?job=report")["runs"]
        assert report and {r["job"] for r in report} == {"report"}
        assert {r["status"] for r in report} >= {"finished", "missed"}
        assert len(served.json("/api/runs?limit=1")["runs"]) == 1
        assert served.json("/api/runs?job=no-such-job")["runs"] == []
        bad = served.json("/api/runs?status=exploded", expect=400)
        assert "status must be one of" in bad["error"]
        assert "limit" in served.json("/api/runs?limit=0", expect=400)["error"]
        assert "limit" in served.json("/api/overview?limit=abc", expect=400)["error"]
        status, _, body = served.request("/?status=exploded")
        assert status == 400 and b"status must be one of" in body


def test_history_written_by_hand_and_a_vanished_instance(backend_url: str) -> None:
    coordinator = coordlock.connect(backend_url)
    now = time.time()
    try:
        for record in (
            RunRecord("h1", "import", "2026-01-01T00:00:00Z", "ghost", now - 50, None, "running"),
            RunRecord("h2", "import", "2026-01-01T00:00:00Z", "old", now - 90, now - 80,
                      "finished"),
        ):  # fmt: skip
            coordinator.record_run(record)
        with Served(coordlock.dashboard.app(coordinator)) as served:
            runs = {r["run_id"]: r for r in served.json("/api/runs")["runs"]}
            assert runs["h1"]["warning"] and runs["h1"]["problem"] is True
            assert runs["h2"]["duration"] == pytest.approx(10, abs=0.01)
            assert runs["h2"]["warning"] is None and runs["h2"]["problem"] is False
            jobs = served.json("/api/jobs")["jobs"]
            assert [j["job"] for j in jobs] == ["import"] and jobs[0]["running"] is True
            assert jobs[0]["schedule"] is None  # no scheduler given: history only
            gone = {i["instance"]: i["alive"] for i in served.json("/api/instances")["instances"]}
            assert gone == {"ghost": False, "old": False}
    finally:
        coordinator.close()


# -- force-unlock --------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[Any]:
    c = coordlock.connect(f"memory://dash-{uuid.uuid4().hex}")
    yield c
    c.close()


def test_read_only_by_default(memory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(coordlock.dashboard.TOKEN_ENV, raising=False)
    lease = memory.acquire("precious", 30)
    with Served(coordlock.dashboard.app(memory)) as served:
        reply = served.json(
            "/api/unlock", 403, method="POST", body={"name": "precious", "confirm": "precious"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        assert "force-unlock is off" in reply["error"]
        assert "Force unlock" not in served.text("/") and "read-only" in served.text("/")
        status, _, _ = served.request("/api/unlock")
        assert status == 405
    assert lease.extend() is True  # still ours
    lease.release()


def test_a_short_token_is_refused(memory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(coordlock.dashboard.TOKEN_ENV, "hunter2")
    with pytest.raises(coordlock.ConfigurationError, match="shorter than 16"):
        coordlock.dashboard.app(memory)


def test_force_unlock_needs_the_token_and_a_confirmation(
    memory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(coordlock.dashboard.TOKEN_ENV, TOKEN)
    lease = memory.acquire("stuck-export", 30)
    assert lease is not None
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "stuck-export", "confirm": "stuck-export"}
    with Served(coordlock.dashboard.app(memory)) as served:
        assert "Force unlock" in served.text("/")
        assert served.json("/api/unlock", 401, method="POST", body=body)["error"]
        served.json(
            "/api/unlock", 401, method="POST", body=body,
            headers={"Authorization": "Bearer " + "y" * 26},
        )  # fmt: skip
        missing = served.json(
            "/api/unlock", 400, method="POST", body={"name": "stuck-export"}, headers=auth
        )
        assert "confirm" in missing["error"]
        served.json(
            "/api/unlock", 400, method="POST", raw=b"{not json", headers=auth
        )
        served.json("/api/unlock", 400, method="POST", body={"name": ""}, headers=auth)
        assert served.json("/api/locks")["locks"][0]["name"] == "stuck-export"

        done = served.json("/api/unlock", method="POST", body=body, headers=auth)
        assert done == {"name": "stuck-export", "released": True}
        assert served.json("/api/locks")["locks"] == []
        again = served.json("/api/unlock", method="POST", body=body, headers=auth)
        assert again["released"] is False
    assert lease.extend() is False and lease.lost  # the holder finds out


# -- mounting, errors, consistency ---------------------------------------------------------------


def test_mounted_inside_another_asgi_app(memory: Any) -> None:
    memory.acquire("mounted-lock", 30)
    parent = Starlette(routes=[Mount("/ops/coordlock", app=coordlock.dashboard.app(memory))])
    with Served(parent) as served:
        page = served.text("/ops/coordlock/")
        assert 'href="/ops/coordlock/static/page.css"' in page
        assert 'data-api="/ops/coordlock/api"' in page and "mounted-lock" in page
        status, headers, css = served.request("/ops/coordlock/static/page.css")
        assert status == 200 and headers["content-type"].startswith("text/css") and css
        status, headers, js = served.request("/ops/coordlock/static/page.js")
        assert status == 200 and b"fetch(" in js
        locks = served.json("/ops/coordlock/api/locks")["locks"]
        assert [lock["name"] for lock in locks] == ["mounted-lock"]
        partial = served.text("/ops/coordlock/?partial=1")
        assert "<html" not in partial and "mounted-lock" in partial


def test_security_headers(memory: Any) -> None:
    with Served(coordlock.dashboard.app(memory)) as served:
        for path in ("/", "/api/overview"):
            status, headers, _ = served.request(path)
            assert status == 200
            assert "script-src 'self'" in headers["content-security-policy"]
            assert headers["x-frame-options"] == "DENY"
            assert headers["cache-control"] == "no-store"


def test_an_unreachable_backend_is_a_503_with_its_reason() -> None:
    class Down(MemoryCoordinator):
        def locks(self) -> list[Any]:
            raise BackendUnavailable("locks: Connection refused")

    coordinator = Down(f"down-{uuid.uuid4().hex}")
    with Served(coordlock.dashboard.app(coordinator)) as served:
        reply = served.json("/api/overview", 503)
        assert "Connection refused" in reply["error"]
        status, _, body = served.request("/")
        assert status == 503 and b"could not be read" in body and b"Connection refused" in body
    coordinator.close()


def test_a_url_is_connected_and_closed_with_the_app(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    app = coordlock.dashboard.app(url)
    coordinator = app.state.dashboard.coordinator
    with Served(app) as served:
        assert served.json("/api/locks") == {"locks": []}
        assert "sqlite" in served.text("/")
    assert coordinator.closed


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="refresh"):
        coordlock.dashboard.app("memory://x", refresh=-1)
    with pytest.raises(ValueError, match="window"):
        coordlock.dashboard.app("memory://x", window=0)
    with pytest.raises(coordlock.ConfigurationError):
        coordlock.dashboard.app("nosuch://x")


def test_lease_prefixes_match_the_scheduler() -> None:
    assert scheduler_claims.INSTANCE_LEASE_PREFIX == _data.INSTANCE_PREFIX
    assert scheduler_claims.JOB_LEASE_PREFIX == _data.JOB_PREFIX
