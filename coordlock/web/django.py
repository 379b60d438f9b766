"""Django: a view decorator (``coordlock[django]``).

::

    from coordlock.web.django import cron_view

    @cron_view("report", cron="0 * * * *")
    def report(request, tick):
        build_report(tick.tick)

    urlpatterns = [path("api/cron/report", report)]

The view is called only for a won tick, as ``view(request, tick, *args, **kwargs)``; its return
value is ignored and the response is a ``JsonResponse`` ``{"job", "tick", "ran", "reason"}``:
200 (also for a duplicate delivery), 401 for a missing or wrong secret (nothing runs), 503 when
the coordinator cannot be asked. The view is CSRF-exempt (cron services POST without a CSRF
token; the bearer secret authenticates them). ``async def`` views use the async API.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from ._adapt import guard_of
from ._core import CronGuard, CronResponse, CronTick

__all__ = ["cron_view"]


def cron_view(
    job: str | CronGuard, **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Guard a Django view; ``job``: a :class:`CronGuard`, or a job name and its options."""
    guard = guard_of(job, options)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(func):
            raise TypeError("cron_view decorates a function")
        view: Any
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
                async def job(tick: CronTick) -> None:
                    await func(request, tick, *args, **kwargs)

                auth = request.headers.get("Authorization")
                return _response(await guard.arun(job, auth))

            view = async_view
        else:

            @functools.wraps(func)
            def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
                auth = request.headers.get("Authorization")
                return _response(
                    guard.run(lambda tick: func(request, tick, *args, **kwargs), auth)
                )

            view = sync_view
        view.guard = guard
        return csrf_exempt(view)  # type: ignore[no-any-return]

    return decorate


def _response(response: CronResponse) -> JsonResponse:
    reply = JsonResponse(response.body, status=response.status)
    for name, value in response.headers.items():
        reply[name] = value
    return reply
