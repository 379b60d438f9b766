"""The process-wide coordinator and the ``lock()``/``locked()`` front doors."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import os
import threading
from collections.abc import Callable
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from ._errors import ConfigurationError, LockNotAcquired, NotConfigured
from ._locking import CLAIMED_ELSEWHERE, OFF_TICK, LockContext, TickNotRun
from ._protocol import RunCoordinator
from ._registry import connect, redact
from ._validate import check_hold_at_least, check_name, check_ttl, check_wait

if TYPE_CHECKING:
    from ._ticks import TickSpec

log = logging.getLogger("coordlock")

F = TypeVar("F", bound=Callable[..., Any])
OnBusy = Literal["skip", "wait", "raise"]
OffTick = Literal["skip", "run"]
Seconds = float | timedelta
ENV_URL = "COORDLOCK_URL"

_global: RunCoordinator | None = None
_global_owned = False  # True when configure() built _global itself (so it may close it)
_global_from_env: tuple[str, RunCoordinator] | None = None
_global_lock = threading.Lock()
_env_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _global_lock, _env_lock
    _global_lock = threading.Lock()  # a fork while another thread held them must not hang
    _env_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def configure(target: str | RunCoordinator, **options: Any) -> RunCoordinator:
    """Set the process-wide default coordinator (call once at startup) and return it.

    ``target`` is a URL (passed to :func:`connect` with ``options``) or a coordinator object.
    A coordinator that ``configure`` itself built from a URL earlier is closed when replaced.
    """
    global _global, _global_owned
    if isinstance(target, str):
        coordinator = connect(target, **options)
        owned = True
    elif isinstance(target, RunCoordinator):
        if options:
            raise TypeError("options are only accepted together with a URL")
        coordinator = target
        owned = False
    else:
        raise TypeError(
            f"configure() takes a URL or a RunCoordinator, not {type(target).__name__}"
        )
    with _global_lock:
        previous, _global = _global, coordinator
        previous_owned, _global_owned = _global_owned, owned
    if previous is not None and previous is not coordinator and previous_owned:
        previous.close()
    return coordinator


def get_coordinator() -> RunCoordinator:
    """The configured coordinator, else one built from ``$COORDLOCK_URL``.

    Raises :class:`NotConfigured` (with a hint on how to configure) when there is neither.
    """
    global _global_from_env
    with _global_lock:
        if _global is not None:
            return _global
        url = os.environ.get(ENV_URL, "").strip()
        if not url:
            raise NotConfigured(
                "no coordinator configured: call coordlock.configure('redis://host:6379') at "
                f"startup, pass coordinator=..., or set ${ENV_URL} "
                "(e.g. COORDLOCK_URL=sqlite:///locks.db)"
            )
        if _global_from_env is not None and _global_from_env[0] == url:
            return _global_from_env[1]
    with _env_lock:  # one connect at a time, without holding up configure() and readers
        with _global_lock:
            if _global_from_env is not None and _global_from_env[0] == url:
                return _global_from_env[1]
        try:
            coordinator = connect(url)
        except ConfigurationError as exc:
            raise ConfigurationError(f"${ENV_URL}={redact(url)!r}: {exc}") from exc
        with _global_lock:
            _global_from_env = (url, coordinator)
        return coordinator


async def aconnect(url: str, **options: Any) -> RunCoordinator:
    """:func:`connect` for asyncio: the driver import and any first connection run off the
    event loop. The coordinator serves both APIs (``aacquire`` and ``acquire``)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(connect, url, **options))


def lock(
    name: str,
    ttl: float = 30,
    wait: bool | float = False,
    *,
    coordinator: RunCoordinator | None = None,
    renew: bool = True,
    hold_at_least: float | None = None,
    cron: str | None = None,
    timezone: str | tzinfo | None = None,
    every: Seconds | None = None,
    offset: Seconds | None = None,
    skew: Seconds | None = None,
    off_tick: OffTick = "skip",
) -> LockContext:
    """Hold the lock ``name`` for a ``with`` or ``async with`` block; the block gets the lease.

    ``ttl``: seconds the lock survives without renewal (renewed every ttl/3 while held unless
    ``renew=False``). ``wait``: ``False`` → raise :class:`LockNotAcquired` at once when busy,
    ``True`` → wait forever, a number → wait that many seconds then raise. ``hold_at_least``:
    the name stays taken until that many seconds after the acquisition, even if the block ends
    sooner (a second server whose cron fires a moment later finds it taken). Leaving the block
    releases the lock and raises :class:`LockLost` if the lease was lost meanwhile. Under
    ``async with`` the event loop is never blocked and the lease is an ``AsyncLease``.

    Once per scheduled tick (crontab lines, callbacks fired on several servers): with
    ``cron=`` (a cron expression in ``timezone``, default UTC) or ``every=`` seconds (aligned to
    the Unix epoch plus ``offset``), entering the block first names the scheduled tick nearest
    to now — if it lies within ``skew`` seconds (default ``min(period / 2, 60)``) — and claims
    ``name@<tick in UTC>`` (the Scheduler's claim key) for the tick's period plus ``skew``,
    then takes the lock. A tick claimed elsewhere, or a call outside every tick's tolerance
    (unless ``off_tick="run"``), raises :class:`LockNotAcquired` with ``reason``
    ``"claimed-elsewhere"``/``"off-tick"``/``"running"`` and the ``tick``.
    """
    spec = _tick_spec(name, cron, timezone, every, offset, skew, off_tick)
    return LockContext(
        name, ttl, wait, coordinator=coordinator, resolve=get_coordinator, renew=renew,
        hold_at_least=hold_at_least, tick=spec,
    )  # fmt: skip


def _tick_spec(
    name: str,
    cron: str | None,
    timezone: str | tzinfo | None,
    every: Seconds | None,
    offset: Seconds | None,
    skew: Seconds | None,
    off_tick: object,
) -> TickSpec | None:
    """The tick spec of the options, or ``None`` for a plain lock (scheduler code not loaded)."""
    if cron is None and every is None and timezone is None and offset is None and skew is None:
        if off_tick != "skip":
            raise ValueError("off_tick= only applies with cron= or every=")
        return None
    from ._ticks import tick_spec

    return tick_spec(
        name, cron=cron, timezone=timezone, every=every, offset=offset, skew=skew,
        off_tick=off_tick,
    )  # fmt: skip


@overload
def locked(name: F) -> F: ...


@overload
def locked(
    name: str | None = None,
    ttl: float = 60,
    on_busy: OnBusy = "skip",
    *,
    wait: float | None = None,
    coordinator: RunCoordinator | None = None,
    renew: bool = True,
    hold_at_least: float | None = None,
    cron: str | None = None,
    timezone: str | tzinfo | None = None,
    every: Seconds | None = None,
    offset: Seconds | None = None,
    skew: Seconds | None = None,
    off_tick: OffTick = "skip",
) -> Callable[[F], F]: ...


def locked(
    name: str | Callable[..., Any] | None = None,
    ttl: float = 60,
    on_busy: OnBusy = "skip",
    *,
    wait: float | None = None,
    coordinator: RunCoordinator | None = None,
    renew: bool = True,
    hold_at_least: float | None = None,
    cron: str | None = None,
    timezone: str | tzinfo | None = None,
    every: Seconds | None = None,
    offset: Seconds | None = None,
    skew: Seconds | None = None,
    off_tick: OffTick = "skip",
) -> Any:
    """Decorate a function (or an ``async def``) so that each call runs under the lock ``name``.

    ``name`` defaults to ``module.qualname`` of the function. When the lock is held elsewhere:
    ``on_busy="skip"`` returns ``None`` without calling (logged at INFO), ``"wait"`` waits
    (``wait`` seconds, default forever, then raises :class:`LockNotAcquired`), ``"raise"``
    raises :class:`LockNotAcquired`. Exceptions of the function pass through untouched. If the
    lease is lost while the function runs, :class:`LockLost` is raised after it returns. The
    coordinator is looked up at each call, so decorating before ``configure()`` is fine. A
    coroutine function is locked with the async API (the event loop is never blocked).

    Once per scheduled tick across servers: ``cron=``/``timezone=`` or ``every=``/``offset=``,
    ``skew=`` and ``off_tick=`` as for :func:`lock`. Each call claims the tick nearest to it
    before taking the lock; when the tick was claimed elsewhere or the call is off tick,
    ``on_busy="raise"`` raises :class:`LockNotAcquired` (with ``reason`` and ``tick``), and
    ``"skip"`` and ``"wait"`` return ``None`` (waiting cannot change whose tick it is; ``"wait"``
    waits only for a run still holding the lock). Off-tick calls are logged at WARNING.
    """
    if callable(name):
        return locked()(name)
    if name is not None:
        check_name(name)
    check_ttl(ttl)
    if on_busy not in ("skip", "wait", "raise"):
        raise ValueError(f"on_busy must be 'skip', 'wait' or 'raise', not {on_busy!r}")
    if wait is not None and on_busy != "wait":
        raise ValueError("wait= only applies with on_busy='wait'")
    wait_seconds = (check_wait(wait) if wait is not None else math.inf) if on_busy == "wait" else 0
    if coordinator is not None and not isinstance(coordinator, RunCoordinator):
        raise TypeError(f"coordinator must be a RunCoordinator, not {type(coordinator).__name__}")
    hold = check_hold_at_least(hold_at_least)
    ticks = (cron, timezone, every, offset, skew, off_tick)
    _tick_spec(name if isinstance(name, str) else "probe", *ticks)  # bad options fail here

    def decorate(func: F) -> F:
        if not callable(func):
            raise TypeError("@locked decorates a function")
        if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
            raise TypeError(
                "@locked does not support generator functions: the lock would cover creating "
                "the generator, not running it"
            )
        label = _label(func)
        lock_name = name if isinstance(name, str) else label
        spec = _tick_spec(lock_name, *ticks)

        def context() -> LockContext:
            return LockContext(
                lock_name, ttl, wait_seconds, coordinator=coordinator, resolve=get_coordinator,
                renew=renew, hold_at_least=hold, tick=spec,
            )  # fmt: skip

        def busy(exc: LockNotAcquired) -> None:
            if isinstance(exc, TickNotRun):
                return _tick_not_run(exc, func, on_busy)
            if on_busy != "skip":
                raise exc
            log.info("skipped %s: lock %r is held elsewhere", label, lock_name,
                     extra={"lock": lock_name, "event": "skipped", "outcome": "busy"})
            return None

        if _is_async(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                held = context()
                try:
                    await held.aacquire()
                except LockNotAcquired as exc:
                    return busy(exc)
                try:
                    result = await func(*args, **kwargs)
                except BaseException:
                    await held.arelease(raising=False)
                    raise
                await held.arelease()
                return result

            wrapper: Any = async_wrapper
        else:

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                held = context()
                try:
                    held.acquire()
                except LockNotAcquired as exc:
                    return busy(exc)
                try:
                    result = func(*args, **kwargs)
                    _refuse_deferred(result, func)
                except BaseException:
                    held.release(raising=False)
                    raise
                held.release()
                return result

            wrapper = sync_wrapper
        wrapper.lock_name = lock_name
        return wrapper  # type: ignore[no-any-return]

    return decorate


def _label(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    target = func if hasattr(func, "__qualname__") else type(func)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def _is_async(func: Callable[..., Any]) -> bool:
    """``async def`` functions, partials of them and objects with an ``async __call__``."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004
    )


def _refuse_deferred(result: object, func: Callable[..., Any]) -> None:
    """A sync-looking callable that returned a coroutine or a generator would run its body
    after the lock is gone: refuse it (closing what it returned, so nothing runs unlocked)."""
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        result.close()
        raise TypeError(
            f"@locked {func!r} returned a {type(result).__name__}: its body would run after "
            "the lock is released; decorate the async (or generator) function itself"
        )


def _tick_not_run(exc: TickNotRun, func: Callable[..., Any], on_busy: str) -> None:
    """A tick-aware ``@locked`` call that did not run: raise or log, as ``on_busy`` says."""
    if on_busy == "raise" or (on_busy == "wait" and exc.reason not in (CLAIMED_ELSEWHERE,
                                                                       OFF_TICK)):
        raise exc
    level = logging.WARNING if exc.reason == OFF_TICK else logging.INFO
    log.log(level, "skipped %s: %s", _label(func), exc,
            extra={"lock": exc.name, "event": "skipped", "outcome": exc.reason,
                   "tick": exc.key})
