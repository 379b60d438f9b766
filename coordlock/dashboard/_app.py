"""The ASGI application (Starlette): the page, its JSON API and the one write action."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._errors import ConfigurationError, CoordlockError
from .._redact import redact_url, scrub
from .._validate import check_name
from . import _page
from ._data import MissedTicks, snapshot

log = logging.getLogger("coordlock")

#: The environment variable whose value enables force-unlock (and is the token it needs).
TOKEN_ENV = "COORDLOCK_DASHBOARD_TOKEN"
#: Shortest token accepted.
MIN_TOKEN = 16

#: Security headers on every response: nothing inline, no framing, no caching of live data.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _token(env: str) -> str | None:
    value = os.environ.get(env, "")
    if not value.strip():
        return None
    if len(value.strip()) < MIN_TOKEN:
        raise ConfigurationError(
            f"${env} is set but shorter than {MIN_TOKEN} characters: use a long random token "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), or unset it "
            "to keep the dashboard read-only"
        )
    return value.strip()


class Dashboard:
    """State shared by the routes; see :func:`coordlock.dashboard.app`."""

    def __init__(
        self,
        coordinator: Any,
        *,
        scheduler: Any,
        refresh: float,
        window: int,
        token_env: str,
        title: str,
        label: str | None,
        url: str | None,
    ) -> None:
        self._coordinator = coordinator
        self.scheduler = scheduler
        self.refresh = refresh
        self.window = window
        self.token = _token(token_env)
        self.title = title
        self.url = url
        self.missed: MissedTicks | None = None
        if scheduler is not None:
            self.missed = MissedTicks(window)
            scheduler.on("missed", self.missed)
        self.label = label

    @property
    def coordinator(self) -> Any:
        if self._coordinator is not None:
            return self._coordinator
        if self.scheduler is not None and self.scheduler.coordinator is not None:
            return self.scheduler.coordinator
        from .._api import get_coordinator

        return get_coordinator()

    @property
    def unlock(self) -> bool:
        return self.token is not None and bool(
            getattr(self.coordinator, "can_force_release", False)
        )

    def describe(self) -> str:
        if self.label is not None:
            return self.label
        backend = getattr(self.coordinator, "backend_name", "") or "coordinator"
        return f"{backend} · {redact_url(self.url)}" if self.url else backend

    def scrubbed(self, exc: BaseException) -> str:
        return scrub(f"{type(exc).__name__}: {exc}", self.url)

    async def read(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        return await run_in_threadpool(
            partial(
                snapshot,
                self.coordinator,
                scheduler=self.scheduler,
                missed=self.missed,
                job=q.get("job"),
                status=q.get("status"),
                limit=q.get("limit", "100"),
                window=self.window,
            )
        )


def _json(data: object, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=HEADERS)


def _api(
    dash: Dashboard, pick: Callable[[dict[str, Any]], object]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            data = await dash.read(request)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        except (CoordlockError, OSError) as exc:
            return _json({"error": dash.scrubbed(exc)}, 503)
        return _json(pick(data))

    return endpoint


async def _page_endpoint(dash: Dashboard, request: Request) -> Response:
    q = request.query_params
    data: dict[str, Any] | None = None
    error: str | None = None
    status = 200
    try:
        data = await dash.read(request)
    except ValueError as exc:
        error, status = str(exc), 400
    except (CoordlockError, OSError) as exc:
        error, status = dash.scrubbed(exc), 503
    unlock = dash.unlock if error is None else False
    if q.get("partial") == "1":
        return HTMLResponse(
            _page.live(data or {}, unlock=unlock, error=error), status, headers=HEADERS
        )
    base = request.scope.get("root_path", "").rstrip("/")
    html = _page.page(
        data,
        title=dash.title,
        label=dash.describe(),
        static=f"{base}/static",
        api=f"{base}/api",
        refresh=dash.refresh,
        unlock=unlock,
        job=q.get("job"),
        status=q.get("status"),
        error=error,
    )
    return HTMLResponse(html, status, headers=HEADERS)


async def _unlock_endpoint(dash: Dashboard, request: Request) -> Response:
    """``POST api/unlock`` with ``Authorization: Bearer <token>`` and the JSON body
    ``{"name": NAME, "confirm": NAME}``: force-release NAME."""
    if dash.token is None:
        return _json(
            {"error": f"force-unlock is off: start the dashboard with ${TOKEN_ENV} set"}, 403
        )
    given = request.headers.get("authorization", "")
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        credentials.strip().encode(), dash.token.encode()
    ):
        return _json({"error": "wrong or missing token (Authorization: Bearer <token>)"}, 401)
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        return _json({"error": "the body must be JSON: {\"name\": ..., \"confirm\": ...}"}, 400)
    if not isinstance(body, dict):
        return _json({"error": "the body must be a JSON object"}, 400)
    try:
        name = check_name(body.get("name"), "name")
    except (TypeError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    if body.get("confirm") != name:
        return _json({"error": "confirm must repeat the lock's name exactly"}, 400)
    coordinator = dash.coordinator
    if not getattr(coordinator, "can_force_release", False):
        return _json({"error": "this backend cannot force-unlock"}, 409)
    try:
        released = bool(await run_in_threadpool(coordinator.force_release, name))
    except (CoordlockError, OSError) as exc:
        return _json({"error": dash.scrubbed(exc)}, 503)
    client = request.client.host if request.client else "?"
    log.warning(
        "dashboard: force-unlock of %r by %s: %s", name, client,
        "released" if released else "was not held",
        extra={"event": "force-unlock", "lock": name, "outcome": "released" if released
               else "not-held", "client": client},
    )  # fmt: skip
    return _json({"name": name, "released": released})


def build(
    coordinator: Any,
    *,
    scheduler: Any = None,
    refresh: float = 5.0,
    window: int = 500,
    token_env: str = TOKEN_ENV,
    title: str = "coordlock",
    label: str | None = None,
    url: str | None = None,
    owns: bool = False,
) -> Starlette:
    dash = Dashboard(
        coordinator, scheduler=scheduler, refresh=refresh, window=window,
        token_env=token_env, title=title, label=label, url=url,
    )  # fmt: skip
    static = resources.files("coordlock.dashboard") / "static"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if owns and coordinator is not None:
            await run_in_threadpool(coordinator.close)

    routes = [
        Route("/", partial(_page_endpoint, dash), name="page"),
        Route("/api/overview", _api(dash, lambda d: d), name="overview"),
        Route("/api/runs", _api(dash, lambda d: {"filters": d["filters"], "runs": d["runs"]})),
        Route("/api/jobs", _api(dash, lambda d: {"jobs": d["jobs"]})),
        Route("/api/locks", _api(dash, lambda d: {"locks": d["locks"]})),
        Route("/api/instances", _api(dash, lambda d: {"instances": d["instances"]})),
        Route("/api/unlock", partial(_unlock_endpoint, dash), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dashboard = dash
    return app
