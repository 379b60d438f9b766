"""Celery: beat on every server, each entry sent once per due time; workers skip redeliveries.

``pip install 'coordlock[celery]'``, then in the Celery app::

    app.conf.beat_scheduler = "coordlock.integrations.celery:CoordinatedScheduler"
    app.conf.coordlock_url = "redis://redis.internal:6379/1"   # else coordlock's global one

    @app.task(base=OncePerTickTask, acks_late=True)
    def report(): ...

and run ``celery -A proj beat`` (or ``-S coordlock.integrations.celery:CoordinatedScheduler``)
on as many servers as you like: there is no single point of failure any more.

* :class:`CoordinatedScheduler` – a beat scheduler. Every due time of every entry is a tick
  (crontab entries: cron times in the app's timezone; interval entries: multiples of the
  interval since the Unix epoch, so every beat agrees); before sending, each beat claims
  ``f"{entry.name}@{tick in UTC, ISO 8601}"`` (one ``claim_many`` round trip for all entries
  due together) and only the winner sends, with that key as the **task id**.
* :class:`OncePerTickTask` / :func:`once_per_tick` – worker side: a message whose task id
  already started is acknowledged without running (``celery.exceptions.Ignore``), so an
  ``acks_late`` redelivery, or a second copy of a message, does not run the tick twice.
* :func:`send_tick` – for "cron enqueues, workers execute" with :class:`coordlock.Scheduler`:
  sends a task with the running tick's key as task id.

Fail closed: a beat that cannot ask the coordinator sends nothing for that tick (warning on
the ``coordlock`` logger); a worker that cannot ask raises the coordlock error, so the task is
reported failed (``task_failure``) and does not run.

Settings read from ``app.conf``: ``coordlock_url`` (coordinator URL; default: the process-wide
``coordlock.get_coordinator()``), ``coordlock_skew`` (seconds of clock skew between beats,
default 60), ``coordlock_grace`` (how late, in seconds, a beat may still send a tick; default
half the entry's period, at least 1 s and at most 60 s), ``coordlock_task_hold`` (how long a
worker remembers a started task id, default 86400 s).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from celery import Task, current_task
from celery.beat import Scheduler
from celery.exceptions import Ignore
from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule

from .._protocol import RunCoordinator
from .._registry import redact
from ..scheduler.job import current_run
from ..scheduler.triggers import CronTrigger, IntervalTrigger, Trigger
from ._claims import (
    CoordinatorRef,
    check_hold,
    check_skew,
    claim_keys,
    describe_error,
    tick_claim_key,
)

__all__ = [
    "DEFAULT_TASK_HOLD",
    "CoordinatedScheduler",
    "OncePerTickTask",
    "entry_trigger",
    "once_per_tick",
    "run_key",
    "send_tick",
]

log = logging.getLogger("coordlock")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TASK_HOLD = 86400.0
"""How long (seconds) a worker remembers that a task id started: longer than any redelivery
(the Redis transport's ``visibility_timeout`` is 3600 s by default)."""

GRACE_MIN, GRACE_MAX = 1.0, 60.0


# --------------------------------------------------------------------------------------------
# beat
# --------------------------------------------------------------------------------------------


def _cron_field(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return "".join(value.split())
    if isinstance(value, Iterable):
        return ",".join(str(int(v)) for v in sorted(value))
    raise TypeError(f"unsupported crontab field {value!r}")


def entry_trigger(entry_schedule: object) -> Trigger:
    """The coordlock trigger of a beat schedule: ``crontab`` → :class:`CronTrigger` in the
    schedule's timezone (Debian cron rules: when both day fields are restricted, either one
    matches); ``schedule``/timedelta/number → :class:`IntervalTrigger` aligned to the epoch.
    Other schedule types (``solar``, custom ones) raise ``TypeError``.
    """
    if isinstance(entry_schedule, crontab):
        expr = " ".join(
            _cron_field(getattr(entry_schedule, f"_orig_{name}"))
            for name in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        )
        return CronTrigger(expr, entry_schedule.tz)
    if isinstance(entry_schedule, interval_schedule):
        return IntervalTrigger(entry_schedule.run_every.total_seconds())
    raise TypeError(
        f"CoordinatedScheduler cannot coordinate a {type(entry_schedule).__name__} schedule: "
        "use celery.schedules.crontab or an interval (seconds, timedelta or schedule)"
    )


class CoordinatedScheduler(Scheduler):  # type: ignore[misc]
    """A Celery beat scheduler that sends each entry once per due time across every beat.

    Use it with ``celery -A proj beat -S coordlock.integrations.celery:CoordinatedScheduler``
    or ``app.conf.beat_scheduler``. The schedule lives in memory (``app.conf.beat_schedule``);
    nothing is written to a ``celerybeat-schedule`` file: ticks come from the schedules
    themselves and the claims live in the coordinator.

    A tick is sent when a beat reaches it within the grace; one reached later (all beats were
    down or stalled) is logged as missed. The winner's claim is held for the entry's period
    plus ``coordlock_skew``, so a beat whose clock is late loses. A beat that wins the claim and
    then cannot reach the broker loses that tick (at most once, like the Scheduler).
    """

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        conf = app.conf
        self.skew = check_skew(conf.get("coordlock_skew"), "coordlock_skew")
        grace = conf.get("coordlock_grace")
        self.grace = None if grace is None else check_hold(grace, "coordlock_grace")
        self._ref = CoordinatorRef(conf.get("coordlock_url"))
        self._triggers: dict[str, tuple[object, Trigger]] = {}
        self._handled: dict[str, float] = {}
        self._broken: set[str] = set()
        super().__init__(app, *args, **kwargs)

    @property
    def coordinator(self) -> RunCoordinator:
        """The coordinator that decides which beat sends a tick."""
        return self._ref.get()

    def setup_schedule(self) -> None:
        super().setup_schedule()
        for entry in list(self.schedule.values()):
            self._trigger(entry)  # bad schedules fail at start, not at the first tick

    def _trigger(self, entry: Any) -> Trigger:
        cached = self._triggers.get(entry.name)
        if cached is not None and cached[0] is entry.schedule:
            return cached[1]
        trigger = entry_trigger(entry.schedule)
        self._triggers[entry.name] = (entry.schedule, trigger)
        return trigger

    def _grace(self, tick: float, following: float | None) -> float:
        if self.grace is not None:
            return self.grace
        period = (following - tick) if following is not None else GRACE_MAX * 2
        return min(max(GRACE_MIN, period / 2), GRACE_MAX)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Send every entry due now (claimed first); returns seconds until the next tick."""
        now = time.time()
        wake = now + float(self.max_interval)
        due: list[tuple[Any, float, float | None]] = []
        for name, entry in list(self.schedule.items()):
            try:
                trigger = self._trigger(entry)
            except (TypeError, ValueError) as exc:
                if name not in self._broken:
                    self._broken.add(name)
                    log.error("beat entry %r is not coordinated, never sent: %s", name, exc)
                continue
            latest = trigger.previous(now)
            following = trigger.next_after(now)
            if following is not None:
                wake = min(wake, following)
            if latest is None or latest <= self._handled.get(name, -math.inf):
                continue
            self._handled[name] = latest
            late = now - latest
            if late > self._grace(latest, following):
                log.warning(
                    "beat entry %r: tick %s reached %.1f s late, past its grace: not sent",
                    name,
                    tick_claim_key(name, latest),
                    late,
                )
                continue
            due.append((entry, latest, following))
        if due:
            self._claim_and_send(due)
        return max(0.0, wake - time.time())

    def _claim_and_send(self, due: list[tuple[Any, float, float | None]]) -> None:
        by_hold: dict[float, list[str]] = {}
        entries: dict[str, Any] = {}
        for entry, tick, following in due:
            key = tick_claim_key(entry.name, tick)
            trigger = self._trigger(entry)
            period = (following - tick) if following is not None else trigger.nominal_period()
            by_hold.setdefault(period + self.skew, []).append(key)
            entries[key] = entry
        won: set[str] = set()
        errors: dict[str, BaseException] = {}
        for hold, keys in by_hold.items():
            try:
                coordinator = self._ref.get()
            except Exception as exc:
                errors.update(dict.fromkeys(keys, exc))
                continue
            got, failed = claim_keys(coordinator, keys, hold)
            won |= got
            errors.update(failed)
        for key, entry in entries.items():
            if key in errors:
                log.warning(
                    "beat entry %r: coordinator error, not sending %s (fail closed): %s",
                    entry.name,
                    key,
                    describe_error(errors[key]),
                )
            elif key in won:
                self._send(entry, key)
            else:
                log.debug("beat entry %r: %s claimed by another beat", entry.name, key)

    def _send(self, entry: Any, key: str) -> None:
        reserved = self.reserve(entry)  # last_run_at / total_run_count, as beat keeps them
        sent = copy.copy(reserved)
        headers = dict(entry.options.get("headers") or {})
        headers["coordlock_tick"] = key
        sent.options = {**entry.options, "task_id": key, "headers": headers}
        self.apply_entry(sent, producer=self.producer)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._ref.close()

    @property
    def info(self) -> str:
        url = self.app.conf.get("coordlock_url")
        return f"    . coordlock -> {redact(url) if url else 'coordlock.get_coordinator()'}"


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------

_refs: dict[str | None, CoordinatorRef] = {}
_refs_lock = threading.Lock()


def _app_coordinator(app: Any) -> RunCoordinator:
    url = app.conf.get("coordlock_url")
    with _refs_lock:
        ref = _refs.get(url)
        if ref is None:
            ref = _refs[url] = CoordinatorRef(url)
    return ref.get()


def run_key(task_id: str, retries: int = 0) -> str:
    """The worker-side claim of one delivery of a task: ``run:<task id>`` (``#retry<N>`` for
    the N-th retry, which Celery sends with the same id)."""
    return f"run:{task_id}" if not retries else f"run:{task_id}#retry{retries}"


def _first_start(task: Any, request: Any, hold: float | None) -> bool:
    """True when this message may run: it has no id, runs eagerly, or is the first start."""
    task_id = getattr(request, "id", None)
    if not task_id or getattr(request, "is_eager", False):
        return True
    key = run_key(task_id, int(getattr(request, "retries", 0) or 0))
    seconds = hold or check_hold(task.app.conf.get("coordlock_task_hold")) or DEFAULT_TASK_HOLD
    try:
        coordinator = _app_coordinator(task.app)
        won = coordinator.claim(key, seconds)
    except Exception as exc:
        log.warning(
            "celery task %s[%s]: coordinator error, not running (fail closed): %s",
            task.name,
            task_id,
            describe_error(exc),
        )
        raise
    if not won:
        log.info("celery task %s[%s] already started once: not running it again", task.name,
                 task_id)
    return bool(won)


class OncePerTickTask(Task):  # type: ignore[misc]
    """Task base class: each message id runs at most once (``app.task(base=OncePerTickTask)``).

    A redelivered message (``acks_late`` after a worker crash, a visibility timeout that
    expired, a duplicate publish) whose id already started is acknowledged without running and
    without touching the first run's result (``Ignore``). Retries (``self.retry()``) run: each
    retry is its own delivery. ``coordlock_hold`` (seconds) overrides ``coordlock_task_hold``.
    Calling the task directly or eagerly is not guarded.

    This is at most once per message: a worker that dies after the run started loses it.
    """

    coordlock_hold: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _first_start(self, self.request, self.coordlock_hold):
            raise Ignore()
        return super().__call__(*args, **kwargs)


def once_per_tick(func: F | None = None, *, hold: float | timedelta | None = None) -> Any:
    """Decorator form of :class:`OncePerTickTask`, applied under ``@app.task``::

        @app.task(acks_late=True)
        @once_per_tick
        def report(): ...

    It reads the running request from ``celery.current_task``; with a custom task base class
    that overrides ``__call__``, use :class:`OncePerTickTask` instead.
    """
    seconds = check_hold(hold)

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError("@once_per_tick decorates a function")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            task = current_task
            if task is not None and task and not _first_start(task, task.request, seconds):
                raise Ignore()
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


# --------------------------------------------------------------------------------------------
# cron enqueues, workers execute
# --------------------------------------------------------------------------------------------


def send_tick(
    task: Any,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    **options: Any,
) -> Any:
    """Send ``task`` with the running tick's claim key as its task id (``apply_async``).

    Call it from a :class:`coordlock.Scheduler` job: the Scheduler's claim makes one instance
    send per tick, and the task id (``job@tick``) lets an :class:`OncePerTickTask` worker drop
    any second copy. ``key`` overrides the id (outside a Scheduler run it is required).
    """
    if key is None:
        run = current_run()
        if run is None:
            raise RuntimeError("send_tick() outside a Scheduler job: pass key=")
        key = run.key
    return task.apply_async(args=tuple(args), kwargs=kwargs or {}, task_id=key, **options)
