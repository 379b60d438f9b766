"""Flask: a view decorator (``coordlock[flask]``).

::

    from flask import Flask
    from coordlock.web.flask import cron_route

    app = Flask(__name__)

    @app.get("/api/cron/report")
    @cron_route("report", cron="0 * * * *")
    def report(tick):
        build_report(tick.tick)

The view function is called only for a won tick, with the :class:`~coordlock.web.CronTick`
first (then the route's variables as keyword arguments); its return value is ignored and the
response is ``{"job", "tick", "ran", "reason"}``: 200 (also for a duplicate delivery), 401
for a missing or wrong secret (nothing runs), 503 when the coordinator cannot be asked.
An ``async def`` view needs Flask's async extra (``flask[async]``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import flask

from ._adapt import guard_of
from ._core import CronGuard, CronResponse

__all__ = ["cron_route"]


def cron_route(
    job: str | CronGuard, **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Guard a Flask view; ``job``: a :class:`CronGuard`, or a job name and its options."""
    guard = guard_of(job, options)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(func):
            raise TypeError("cron_route decorates a function")
        view: Any
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_view(**kwargs: Any) -> flask.Response:
                auth = flask.request.headers.get("Authorization")
                return _response(await guard.arun(func, auth, **kwargs))

            view = async_view
        else:

            @functools.wraps(func)
            def sync_view(**kwargs: Any) -> flask.Response:
                auth = flask.request.headers.get("Authorization")
                return _response(guard.run(func, auth, **kwargs))

            view = sync_view
        view.guard = guard
        return view  # type: ignore[no-any-return]

    return decorate


def _response(response: CronResponse) -> flask.Response:
    reply = flask.jsonify(response.body)
    reply.status_code = response.status
    reply.headers.update(response.headers)
    return reply
