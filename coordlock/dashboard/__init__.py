"""The status page: a read-only web page and JSON API over a coordinator's own data
(``pip install 'coordlock[dashboard]'``).

Run it with ``coordlock dashboard --url URL`` (loopback, port 8787), or mount it inside your
own ASGI application, like Bull Board's adapters::

    from starlette.applications import Starlette
    from starlette.routing import Mount
    import coordlock.dashboard

    ops = Starlette(routes=[Mount("/coordlock", app=coordlock.dashboard.app(coordinator))])

It shows scheduler instances (alive while their liveness lease is held), jobs (last run,
status, duration, instance, error; schedule and next run when given the process's
``scheduler``), the recent runs (filter by job and status; failed, stuck and missed
highlighted) and the held locks (holder host:pid, fence, expiry). The page refreshes itself.

Force-unlock is off unless the environment variable ``COORDLOCK_DASHBOARD_TOKEN`` holds a
token (16+ characters) when the app is built; each unlock then needs that token and a
confirmation. Put the page behind your own authentication when it leaves loopback: it shows
lock names, job names, host names and error texts.
"""

from __future__ import annotations

from typing import Any

from .._errors import ConfigurationError

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigurationError(
        "coordlock.dashboard needs Starlette: pip install 'coordlock[dashboard]'"
    ) from exc

from ._app import TOKEN_ENV, build
from ._data import STATUSES, MissedTicks, snapshot

__all__ = ["STATUSES", "TOKEN_ENV", "MissedTicks", "app", "snapshot"]


def app(
    coordinator: Any = None,
    *,
    scheduler: Any = None,
    refresh: float = 5.0,
    window: int = 500,
    token_env: str = TOKEN_ENV,
    title: str = "coordlock",
    label: str | None = None,
) -> Any:
    """The dashboard as a Starlette (ASGI) application.

    * ``coordinator`` – a coordinator, a URL (connected now, closed when the app shuts
      down), or ``None``: the ``scheduler``'s coordinator, else :func:`coordlock.get_coordinator`
      at each request.
    * ``scheduler`` – a :class:`~coordlock.Scheduler` of this process (optional): adds each
      job's schedule and next run, and the ticks it missed.
    * ``refresh`` – seconds between the page's automatic refreshes (0: never).
    * ``window`` – how many of the newest runs feed the jobs, instances and counts.
    * ``token_env`` – the environment variable read (once, now) for the force-unlock token.
    * ``title``, ``label`` – the page's heading and the line under it (default: the backend
      and its URL with secrets masked).

    Raises ``ConfigurationError`` for a bad URL or a token shorter than 16 characters,
    ``TypeError``/``ValueError`` for bad arguments.
    """
    from .._registry import connect
    from .._validate import check_seconds

    refresh = check_seconds(refresh, "refresh", allow_zero=True)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError("window must be an int >= 1")
    url: str | None = None
    owns = False
    if isinstance(coordinator, str):
        url = coordinator
        coordinator = connect(coordinator)
        owns = True
    return build(
        coordinator, scheduler=scheduler, refresh=refresh, window=window,
        token_env=token_env, title=title, label=label, url=url, owns=owns,
    )  # fmt: skip
