"""coordlock.web: the HTTP cron guard's core and its FastAPI/Starlette, Flask and Django
adapters, in process (memory://, an injected request time). Two real uvicorn replicas are
in ``test_web_uvicorn.py``.

No ``from __future__ import annotations`` here: FastAPI evaluates the handlers' annotations,
and these name local variables of the tests (``Depends(dep)``)."""


import asyncio
import hmac
import json
import logging
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import pytest

from coordlock import BackendUnavailable, ConfigurationError, _locking
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import tick_key
from coordlock.web import CronGuard, CronTick

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z, a multiple of 10 s
SECRET = "s3cret-for-tests"
AUTH = f"Bearer {SECRET}"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx versions
    from fastapi.testclient import TestClient


@pytest.fixture
def coordinator() -> Iterator[MemoryCoordinator]:
    c = MemoryCoordinator(f"web-{uuid.uuid4().hex}")
    yield c
    c.close()


@pytest.fixture
def at(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``at(t)``: requests arrive at ``t`` (epoch seconds) from now on."""

    def set_time(when: float) -> None:
        monkeypatch.setattr(_locking, "wall_clock", lambda: when)

    set_time(T0)
    return set_time


def guard(coordinator: Any, **options: Any) -> CronGuard:
    options.setdefault("every", 10)
    options.setdefault("secret", SECRET)
    return CronGuard("report", coordinator=coordinator, **options)


class Failing(MemoryCoordinator):
    """A coordinator whose server is down."""

    def claim_many(self, keys: Any, hold: float) -> set[str]:
        raise BackendUnavailable("the server is down (test)")

    async def aclaim_many(self, keys: Any, hold: float) -> set[str]:
        raise BackendUnavailable("the server is down (test)")


# -- the secret -------------------------------------------------------------------------------


def test_no_secret_refuses_to_start(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.delenv("CRON_SECRET", raising=False)
    with pytest.raises(ConfigurationError, match=r"set \$CRON_SECRET"):
        CronGuard("report", every=10)
    monkeypatch.setenv("CRON_SECRET", "   ")
    with pytest.raises(ConfigurationError, match="no cron secret"):
        CronGuard("report", every=10)
    with pytest.raises(ConfigurationError):
        CronGuard("report", every=10, secret="")
    with caplog.at_level(logging.WARNING, logger="coordlock"):
        open_guard = CronGuard("report", every=10, require_secret=False)
    assert "accepts requests without a secret" in caplog.text
    assert open_guard.authorized(None) and open_guard.authorized("Bearer anything")


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRON_SECRET", "from-env\n")
    assert CronGuard("report", every=10).authorized("Bearer from-env")
    monkeypatch.setenv("MY_CRON_KEY", "other")
    custom = CronGuard("report", every=10, secret_env="MY_CRON_KEY")
    assert custom.authorized("Bearer other") and not custom.authorized("Bearer from-env")
    explicit = CronGuard("report", every=10, secret="given")  # wins over the environment
    assert explicit.authorized("Bearer given") and not explicit.authorized("Bearer from-env")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (AUTH, True), (f"bearer {SECRET}", True), (f"  Bearer   {SECRET}  ", True),
        (None, False), ("", False), ("Bearer", False), ("Bearer ", False),
        (f"Basic {SECRET}", False), (SECRET, False), (f"Bearer {SECRET}x", False),
        (f"Bearer {SECRET[:-1]}", False), ("Bearer ünïcødé", False),
    ],
)  # fmt: skip
def test_authorization_header(coordinator: Any, header: str | None, ok: bool) -> None:
    assert guard(coordinator).authorized(header) is ok


def test_the_compare_is_hmac_compare_digest(
    coordinator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision goes through ``hmac.compare_digest`` (constant time) on bytes, never
    through ``==``: a compare_digest that says "different" refuses even the right secret."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    g = guard(coordinator)
    assert g.authorized(AUTH) and not g.authorized("Bearer wrong")
    assert calls == [(SECRET.encode(), SECRET.encode()), (b"wrong", SECRET.encode())]
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert not g.authorized(AUTH)


def test_bad_options(coordinator: Any) -> None:
    with pytest.raises(ValueError, match="schedule"):
        CronGuard("report", secret=SECRET)
    with pytest.raises(ValueError, match="not both"):
        CronGuard("report", secret=SECRET, every=10, cron="* * * * *")
    with pytest.raises(ValueError):
        CronGuard("", secret=SECRET, every=10)
    with pytest.raises(TypeError):
        CronGuard("report", secret=42, every=10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CronGuard("report", secret=SECRET, every=10, coordinator=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CronGuard("report", secret=SECRET, every=10, ttl=0)
    with pytest.raises(ValueError):
        CronGuard("report", secret=SECRET, every=10, hold_at_least=-1)


# -- the core ---------------------------------------------------------------------------------


def test_one_run_per_tick_duplicates_are_200(coordinator: Any, at: Any) -> None:
    g = guard(coordinator)
    ran: list[CronTick] = []
    first = g.run(ran.append, AUTH)
    at(T0 + 1.5)  # the same delivery, retried a moment later
    again = g.run(ran.append, AUTH)
    assert first.status == again.status == 200
    tick = tick_key(T0)
    assert first.body == {"job": "report", "tick": tick, "ran": True, "reason": "won"}
    assert again.body == {"job": "report", "tick": tick, "ran": False,
                          "reason": "claimed-elsewhere"}  # fmt: skip
    assert len(ran) == 1 and ran[0].tick_iso == tick and ran[0].won
    at(T0 + 9.0)  # next tick, delivered early
    assert g.run(ran.append, AUTH).body["ran"] is True
    assert [t.key for t in ran] == [f"report@{tick}", f"report@{tick_key(T0 + 10)}"]


def test_unauthorized_runs_nothing(coordinator: Any, at: Any) -> None:
    g = guard(coordinator)
    ran: list[CronTick] = []
    for header in (None, "Bearer wrong"):
        refused = g.run(ran.append, header)
        assert refused.status == 401 and refused.body["reason"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert ran == []
    assert g.run(ran.append, AUTH).body["ran"] is True  # the tick was not burned by them


def test_off_tick_and_running(coordinator: Any, at: Any) -> None:
    g = guard(coordinator, skew=2)
    at(T0 + 5)
    off = g.run(lambda tick: None, AUTH)
    assert off.status == 200 and off.body == {"job": "report", "tick": None, "ran": False,
                                               "reason": "off-tick"}  # fmt: skip
    holder = coordinator.acquire("report", 30)
    at(T0 + 10)
    busy = g.run(lambda tick: None, AUTH)
    assert busy.body["reason"] == "running" and busy.body["tick"] == tick_key(T0 + 10)
    holder.release()


def test_coordinator_down_is_503_and_nothing_runs(at: Any) -> None:
    down = Failing(f"web-{uuid.uuid4().hex}", retry_deadline=0.01)
    ran: list[CronTick] = []
    g = guard(down)
    failed = g.run(ran.append, AUTH)
    assert failed.status == 503 and failed.body["reason"] == "coordinator-error"
    assert asyncio.run(g.arun(ran.append, AUTH)).status == 503
    assert ran == []
    down.close()


def test_job_errors_propagate_and_the_lock_is_released(coordinator: Any, at: Any) -> None:
    g = guard(coordinator)

    def boom(tick: CronTick) -> None:
        raise KeyError("job failed")

    with pytest.raises(KeyError):
        g.run(boom, AUTH)
    lease = coordinator.acquire("report", 10)
    assert lease is not None  # released
    lease.release()
    assert g.run(lambda t: None, AUTH).body["reason"] == "claimed-elsewhere"  # at most once


def test_arun_sync_and_async_jobs(coordinator: Any, at: Any) -> None:
    g = guard(coordinator)
    ran: list[str] = []

    async def job(tick: CronTick) -> None:
        await asyncio.sleep(0)
        ran.append(f"async {tick.tick_iso} fence {tick.fence}")

    async def deliveries() -> list[Any]:
        return list(await asyncio.gather(g.arun(job, AUTH), g.arun(job, AUTH)))

    results = asyncio.run(deliveries())
    assert sorted(r.body["ran"] for r in results) == [False, True]
    at(T0 + 10)
    assert asyncio.run(g.arun(lambda tick: ran.append("sync"), AUTH)).body["ran"] is True
    assert len(ran) == 2 and ran[0].startswith(f"async {tick_key(T0)} fence ")


# -- FastAPI / Starlette ----------------------------------------------------------------------


def test_fastapi_dependency(coordinator: Any, at: Any) -> None:
    from fastapi import Depends, FastAPI

    from coordlock.web.fastapi import cron_tick

    app = FastAPI()
    dep = cron_tick("report", every=10, secret=SECRET, coordinator=coordinator)
    ran: list[str] = []

    @app.get("/api/cron/report")
    async def report(tick: Annotated[CronTick, Depends(dep)]) -> dict[str, Any]:
        if tick.won:
            assert coordinator.acquire("report", 10) is None  # held while the handler runs
            ran.append(str(tick.tick_iso))
        return tick.body()

    client = TestClient(app)
    replies = [client.get("/api/cron/report", headers={"Authorization": AUTH}) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert [r.json()["ran"] for r in replies] == [True, False, False]
    assert replies[1].json()["reason"] == "claimed-elsewhere"
    assert ran == [tick_key(T0)]
    for headers in ({}, {"Authorization": "Bearer nope"}):
        refused = client.get("/api/cron/report", headers=headers)
        assert refused.status_code == 401 and refused.json()["detail"]["reason"] == "unauthorized"
    assert ran == [tick_key(T0)]
    lease = coordinator.acquire("report", 10)
    assert lease is not None  # released after the handler
    lease.release()
    down = Failing(f"web-{uuid.uuid4().hex}", retry_deadline=0.01)
    app2 = FastAPI()
    dep2 = cron_tick("report", every=10, secret=SECRET, coordinator=down)

    @app2.get("/c")
    def c(tick: Annotated[CronTick, Depends(dep2)]) -> dict[str, Any]:
        raise AssertionError("a handler must not run when the coordinator is down")

    assert TestClient(app2).get("/c", headers={"Authorization": AUTH}).status_code == 503
    down.close()


def test_starlette_endpoint(coordinator: Any, at: Any) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from coordlock.web.fastapi import cron_endpoint

    ran: list[str] = []

    @cron_endpoint("report", every=10, secret=SECRET, coordinator=coordinator)
    async def report(tick: CronTick) -> None:
        """Build the report."""
        ran.append(f"async {tick.tick_iso}")

    @cron_endpoint("other", every=10, secret=SECRET, coordinator=coordinator)
    def other(tick: CronTick) -> None:
        ran.append(f"sync {tick.tick_iso}")

    assert report.__name__ == "report" and report.__doc__ == "Build the report."
    app = Starlette(routes=[Route("/report", report), Route("/other", other)])
    client = TestClient(app)
    for path in ("/report", "/other"):
        first = client.get(path, headers={"Authorization": AUTH})
        second = client.get(path, headers={"Authorization": AUTH})
        assert (first.status_code, first.json()["ran"]) == (200, True)
        assert (second.status_code, second.json()["ran"]) == (200, False)
        refused = client.get(path)
        assert refused.status_code == 401 and refused.json()["reason"] == "unauthorized"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert ran == [f"async {tick_key(T0)}", f"sync {tick_key(T0)}"]
    with pytest.raises(TypeError):
        cron_endpoint(CronGuard("x", every=10, secret=SECRET), every=10)


# -- Flask ------------------------------------------------------------------------------------


def test_flask_decorator(coordinator: Any, at: Any) -> None:
    import flask

    from coordlock.web.flask import cron_route

    app = flask.Flask(__name__)
    ran: list[str] = []

    @app.route("/api/cron/<kind>", methods=["GET", "POST"])
    @cron_route("report", every=10, secret=SECRET, coordinator=coordinator)
    def report(tick: CronTick, kind: str) -> None:
        ran.append(f"{kind} {tick.tick_iso}")

    @app.get("/api/acron")
    @cron_route("areport", every=10, secret=SECRET, coordinator=coordinator)
    async def areport(tick: CronTick) -> None:
        ran.append(f"async {tick.tick_iso}")

    client = app.test_client()
    first = client.post("/api/cron/daily", headers={"Authorization": AUTH})
    second = client.get("/api/cron/daily", headers={"Authorization": AUTH})
    assert (first.status_code, first.get_json()["ran"]) == (200, True)
    assert (second.status_code, second.get_json()["reason"]) == (200, "claimed-elsewhere")
    refused = client.get("/api/cron/daily", headers={"Authorization": "Bearer x"})
    assert refused.status_code == 401 and refused.get_json()["ran"] is False
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/api/acron", headers={"Authorization": AUTH}).get_json()["ran"] is True
    assert ran == [f"daily {tick_key(T0)}", f"async {tick_key(T0)}"]


# -- Django (own process: Django's settings are process-wide) ---------------------------------

DJANGO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import django
    from django.conf import settings

    settings.configure(
        ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], SECRET_KEY="x" * 50,
        MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
    )
    django.setup()
    from django.test import Client
    from django.urls import path

    import coordlock
    from coordlock.web.django import cron_view

    coordinator = coordlock.connect(sys.argv[1])
    ran = []

    @cron_view("report", every=3600, skew=1800, secret="s3cret", coordinator=coordinator)
    def report(request, tick, kind):
        ran.append(f"sync {kind} {tick.tick_iso} {request.method}")

    @cron_view("areport", every=3600, skew=1800, secret="s3cret", coordinator=coordinator)
    async def areport(request, tick):
        ran.append(f"async {tick.tick_iso}")

    urlpatterns = [path("cron/<kind>", report), path("acron", areport)]
    client = Client(enforce_csrf_checks=True)
    auth = {"HTTP_AUTHORIZATION": "Bearer s3cret"}
    out = []
    for method, url, headers in [
        ("post", "/cron/daily", auth), ("get", "/cron/daily", auth), ("get", "/cron/daily", {}),
        ("get", "/cron/daily", {"HTTP_AUTHORIZATION": "Bearer wrong"}), ("get", "/acron", auth),
    ]:
        reply = getattr(client, method)(url, **headers)
        out.append([reply.status_code, json.loads(reply.content), reply.get("WWW-Authenticate")])
    print(json.dumps({"replies": out, "ran": ran}))
    """
)


def test_django_decorator(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    out = subprocess.run(
        [sys.executable, "-c", DJANGO_SCRIPT, url], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    replies = result["replies"]
    assert [r[0] for r in replies] == [200, 200, 401, 401, 200]
    assert [r[1]["ran"] for r in replies] == [True, False, False, False, True]
    assert replies[1][1]["reason"] == "claimed-elsewhere"
    assert replies[2][2].startswith("Bearer") and replies[2][1]["reason"] == "unauthorized"
    tick = replies[0][1]["tick"]
    assert result["ran"] == [f"sync daily {tick} POST", f"async {tick}"]  # POST: CSRF-exempt


# -- import hygiene ---------------------------------------------------------------------------


def test_import_coordlock_and_the_core_load_no_framework() -> None:
    code = (
        "import sys, coordlock, coordlock.web\n"
        "g = coordlock.web.CronGuard('x', every=10, secret='s')\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'flask', 'werkzeug', 'django', "
        "'uvicorn', 'httpx') if m in sys.modules))\n"
        "import coordlock.web.flask\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'django') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]
    plain = subprocess.run(
        [sys.executable, "-c", "import sys, coordlock; print('coordlock.web' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert plain.stdout.strip() == "False"
