"""FastAPI and Starlette: a dependency, and an endpoint decorator (``coordlock[fastapi]``).

FastAPI, with the dependency (the handler runs the job only when ``tick.won``)::

    from fastapi import Depends, FastAPI
    from coordlock.web import CronTick
    from coordlock.web.fastapi import cron_tick

    app = FastAPI()
    report_tick = cron_tick("report", cron="0 * * * *")

    @app.get("/api/cron/report")
    async def report(tick: Annotated[CronTick, Depends(report_tick)]) -> dict:
        if tick.won:
            await build_report(tick.tick)
        return tick.body()          # {"job", "tick", "ran", "reason"}

Starlette (or FastAPI), with the endpoint decorator (the function is called only for a won
tick, with the :class:`~coordlock.web.CronTick`; the response is the JSON body)::

    @cron_endpoint("report", cron="0 * * * *")
    async def report(tick): ...

    app = Starlette(routes=[Route("/api/cron/report", report)])

A missing or wrong secret answers 401 and nothing runs; a coordinator that cannot be asked
answers 503 (nothing ran; the platform retries). Both use the coordinator's async API.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .._locking import COORDINATOR_ERROR
from ._adapt import copy_identity, guard_of
from ._core import CronGuard, CronResponse, CronTick, Unauthorized

__all__ = ["cron_endpoint", "cron_tick"]


def cron_tick(
    job: str | CronGuard, **options: Any
) -> Callable[[Request], AsyncIterator[CronTick]]:
    """A FastAPI dependency (``Depends(...)``) that checks the secret, claims the request's
    tick and holds the lock while the handler runs; it gives the handler the
    :class:`~coordlock.web.CronTick`. ``job``: a :class:`CronGuard`, or a job name and the
    guard's options (``cron=``/``every=``, ``secret=``, ...). Raises ``HTTPException`` 401 for
    a missing or wrong secret, 503 when the coordinator cannot be asked."""
    from fastapi import HTTPException  # only the dependency needs FastAPI itself

    guard = guard_of(job, options)

    async def dependency(request: Request) -> AsyncIterator[CronTick]:
        try:
            tick = await guard.abegin(request.headers.get("authorization"))
        except Unauthorized:
            refused = guard.unauthorized()
            raise HTTPException(401, detail=refused.body, headers=refused.headers) from None
        if tick.reason == COORDINATOR_ERROR:
            raise HTTPException(503, detail=tick.body())
        try:
            yield tick
        finally:
            await guard.aend(tick)

    dependency.guard = guard  # type: ignore[attr-defined]
    return dependency


def cron_endpoint(
    job: str | CronGuard, **options: Any
) -> Callable[[Callable[..., Any]], Callable[[Request], Awaitable[JSONResponse]]]:
    """Decorate ``func(tick)`` (sync or ``async def``) into a Starlette endpoint
    ``endpoint(request) -> JSONResponse``: ``func`` runs only for a won tick, under the lock
    (a plain function in a worker thread). Also a FastAPI route endpoint."""
    guard = guard_of(job, options)

    def decorate(func: Callable[..., Any]) -> Callable[[Request], Awaitable[JSONResponse]]:
        if not callable(func):
            raise TypeError("cron_endpoint decorates a function")
        if inspect.isasyncgenfunction(func):
            raise TypeError("cron_endpoint does not support async generator functions")

        async def endpoint(request: Request) -> JSONResponse:
            return _json(await guard.arun(func, request.headers.get("authorization")))

        copy_identity(endpoint, func)
        endpoint.guard = guard  # type: ignore[attr-defined]
        return endpoint

    return decorate


def _json(response: CronResponse) -> JSONResponse:
    return JSONResponse(response.body, status_code=response.status, headers=response.headers)
