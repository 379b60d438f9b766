"""APScheduler 3.x: each fire time of a job runs once across every process that schedules it.

Wrap the executors (``pip install 'coordlock[apscheduler]'``)::

    from apscheduler.schedulers.background import BackgroundScheduler
    from coordlock.integrations.apscheduler import coordinate

    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(report, "cron", minute="*/5", id="report")   # explicit, stable ids
    coordinate(scheduler)            # wraps every executor in a CoordinatedExecutor
    scheduler.start()

Before a job's run times are submitted, :class:`CoordinatedExecutor` claims
``f"{job.id}@{run time in UTC, ISO 8601}"`` for each of them in one ``claim_many`` round trip
(the :class:`coordlock.Scheduler`'s key format) and hands only the run times it won to the
wrapped executor. APScheduler's own rules still apply: ``coalesce`` (the scheduler passes only
the newest run time), ``misfire_grace_time`` (a run time reached later than that is not claimed
and reported ``EVENT_JOB_MISSED``) and ``max_instances`` (a job at its limit here raises
``MaxInstancesReachedError`` *before* claiming, so another process may run that time).

Events: the winner emits APScheduler's usual ``EVENT_JOB_EXECUTED``/``EVENT_JOB_ERROR``. A run
time won by another process emits :data:`EVENT_JOB_CLAIMED_ELSEWHERE` (outside
``EVENT_ALL``: listen with ``EVENT_ALL | EVENT_JOB_CLAIMED_ELSEWHERE``). When the coordinator
cannot be asked the run time does not run (fail closed): ``EVENT_JOB_ERROR`` carries the
coordlock exception, with ``event.coordlock_reason == "coordinator-error"``, and a warning is
logged on the ``coordlock`` logger. The scheduler itself still emits ``EVENT_JOB_SUBMITTED``
for every run time handed to the executor, won or not.

Under ``AsyncIOScheduler`` (or any scheduler whose ``_process_jobs`` runs in an asyncio event
loop) the claim round trip runs in the loop's default thread pool, never on the loop; see
:meth:`CoordinatedExecutor._claim_async`, the one place that will switch to coordlock's async
API (``await coordinator.aclaim_many(keys, hold)``) once it exists.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.base import BaseExecutor, MaxInstancesReachedError
from apscheduler.triggers.interval import IntervalTrigger

from .._protocol import RunCoordinator
from ._claims import (
    CoordinatorRef,
    check_hold,
    check_skew,
    claim_keys,
    describe_error,
    tick_claim_key,
)

__all__ = [
    "EVENT_JOB_CLAIMED_ELSEWHERE",
    "CoordinatedExecutor",
    "coordinate",
    "run_time_key",
]

log = logging.getLogger("coordlock")

EVENT_JOB_CLAIMED_ELSEWHERE = 2**24
"""Event code: another process won this run time (a ``JobExecutionEvent``). Not part of
``EVENT_ALL``; register listeners with ``EVENT_ALL | EVENT_JOB_CLAIMED_ELSEWHERE``."""

COORDINATOR_ERROR = "coordinator-error"
CLAIMED_ELSEWHERE = "claimed-elsewhere"

_AUTO_ID = re.compile(r"[0-9a-f]{32}")


def run_time_key(job_id: str, run_time: datetime) -> str:
    """The claim key of one run time of a job: ``report@2024-03-31T01:00:00Z``."""
    return tick_claim_key(job_id, run_time)


class CoordinatedExecutor(BaseExecutor):  # type: ignore[misc]
    """Wraps any APScheduler 3.x executor; submits only the run times this process claimed.

    * ``inner`` – the executor that runs the won run times (``ThreadPoolExecutor``,
      ``ProcessPoolExecutor``, ``AsyncIOExecutor``…).
    * ``coordinator`` – a :class:`~coordlock.RunCoordinator`, a URL (connected on first use,
      closed at shutdown) or ``None`` for :func:`coordlock.get_coordinator`, looked up at each
      claim (so ``coordlock.configure()`` may come later).
    * ``skew`` – how far apart (seconds) process clocks may be; added to every claim's hold
      (default 60, the Scheduler's).
    * ``hold`` – seconds each claim is held; default: the job's period (time to its next fire
      time) or its ``misfire_grace_time`` if longer, plus ``skew``.

    Job ids are the claim names: give every job an explicit ``id=`` that is the same in every
    process (APScheduler's default ids are random; a warning is logged for ids that look so).
    """

    def __init__(
        self,
        inner: BaseExecutor,
        coordinator: RunCoordinator | str | None = None,
        *,
        skew: float | timedelta | None = None,
        hold: float | timedelta | None = None,
    ) -> None:
        super().__init__()
        if isinstance(inner, CoordinatedExecutor):
            raise TypeError("the executor is already a CoordinatedExecutor")
        if not isinstance(inner, BaseExecutor):
            raise TypeError(
                f"inner must be an APScheduler executor instance, not {type(inner).__name__}"
            )
        self.inner = inner
        self.skew = check_skew(skew)
        self.hold = check_hold(hold)
        self._ref = CoordinatorRef(coordinator)
        self._pending: dict[str, int] = defaultdict(int)  # claims in flight (async path)
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[str] = set()
        self._guard = threading.Lock()

    # -- executor interface --------------------------------------------------------------

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self.inner.start(scheduler, alias)

    def shutdown(self, wait: bool = True) -> None:
        for task in list(self._tasks):
            task.cancel()
        try:
            self.inner.shutdown(wait)
        finally:
            self._ref.close()

    def submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        """Claim the run times that are still on time and submit the won ones to ``inner``.

        Raises ``MaxInstancesReachedError`` without claiming when the job is at
        ``max_instances`` here.
        """
        self._warn_once(job)
        now = datetime.now(timezone.utc)
        limit = self._lateness_limit(job, run_times[-1])
        live = [rt for rt in run_times if now - rt <= limit]
        for rt in run_times:
            if now - rt > limit:
                self._missed(job, rt, now - rt)
        if not live:
            return
        with self._guard:
            running = self.inner._instances.get(job.id, 0) + self._pending.get(job.id, 0)
            if running >= job.max_instances:
                raise MaxInstancesReachedError(job)
        keys = {run_time_key(job.id, rt): rt for rt in live}
        hold = self._hold_for(job, live[-1], limit)
        loop = _running_loop()
        if loop is None:
            won, errors = self._claim(list(keys), hold)
            self._settle(job, keys, won, errors)
            return
        with self._guard:
            self._pending[job.id] += 1
        task = loop.create_task(self._claim_then_settle(job, keys, hold))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _do_submit_job(self, job: Any, run_times: Sequence[datetime]) -> None:
        raise NotImplementedError("CoordinatedExecutor submits through its inner executor")

    # -- claiming ------------------------------------------------------------------------

    def _claim(
        self, keys: list[str], hold: float
    ) -> tuple[set[str], dict[str, BaseException]]:
        """Claim ``keys`` in this thread (one ``claim_many`` round trip)."""
        try:
            coordinator = self._ref.get()
        except Exception as exc:  # not configured, bad URL, missing driver
            return set(), dict.fromkeys(keys, exc)
        return claim_keys(coordinator, keys, hold)

    async def _claim_async(
        self, keys: list[str], hold: float
    ) -> tuple[set[str], dict[str, BaseException]]:
        """Claim ``keys`` without blocking the event loop.

        The single place to switch to coordlock's async API once it exists:
        ``won = await coordinator.aclaim_many(keys, hold)``. Until then the blocking round trip
        runs in the loop's default executor (a thread pool).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._claim, keys, hold)

    async def _claim_then_settle(
        self, job: Any, keys: dict[str, datetime], hold: float
    ) -> None:
        try:
            won, errors = await self._claim_async(list(keys), hold)
        finally:
            with self._guard:
                self._pending[job.id] -= 1
                if self._pending[job.id] <= 0:
                    del self._pending[job.id]
        self._settle(job, keys, won, errors)

    def _settle(
        self,
        job: Any,
        keys: dict[str, datetime],
        won: set[str],
        errors: dict[str, BaseException],
    ) -> None:
        """Submit the won run times to ``inner``; report the others."""
        if errors:
            exc = next(iter(errors.values()))
            log.warning(
                "apscheduler job %r: coordinator error, not running %d run time(s) "
                "(fail closed): %s",
                job.id,
                len(errors),
                describe_error(exc),
            )
        for key, rt in keys.items():
            if key in errors:
                self._dispatch(
                    JobExecutionEvent(
                        EVENT_JOB_ERROR,
                        job.id,
                        job._jobstore_alias,
                        rt,
                        exception=errors[key],
                        traceback=None,
                    ),
                    COORDINATOR_ERROR,
                )
            elif key not in won:
                log.debug("apscheduler job %r: %s claimed elsewhere", job.id, key)
                self._dispatch(
                    JobExecutionEvent(
                        EVENT_JOB_CLAIMED_ELSEWHERE, job.id, job._jobstore_alias, rt
                    ),
                    CLAIMED_ELSEWHERE,
                )
        mine = [rt for key, rt in keys.items() if key in won]
        if not mine:
            return
        try:
            self.inner.submit_job(job, mine)
        except MaxInstancesReachedError:
            # Only on the async path, where instances may have started meanwhile.
            log.warning(
                "apscheduler job %r: won %d run time(s) but max_instances (%d) was reached "
                "meanwhile; not running them",
                job.id,
                len(mine),
                job.max_instances,
            )

    # -- policy --------------------------------------------------------------------------

    def _period(self, job: Any, run_time: datetime) -> timedelta:
        try:
            following = job.trigger.get_next_fire_time(run_time, run_time)
        except Exception:  # a custom trigger that cannot answer: no period
            following = None
        if following is None or following <= run_time:
            return timedelta(0)
        return following - run_time  # type: ignore[no-any-return]

    def _lateness_limit(self, job: Any, run_time: datetime) -> timedelta:
        """How late a run time may still be claimed: ``misfire_grace_time``, or without one
        the job's period (a later claim could find the winner's claim expired)."""
        grace = job.misfire_grace_time
        if grace is not None:
            return timedelta(seconds=grace)
        period = self._period(job, run_time)
        return period if period > timedelta(0) else timedelta(seconds=self.skew)

    def _hold_for(self, job: Any, run_time: datetime, limit: timedelta) -> float:
        if self.hold is not None:
            return self.hold
        period = self._period(job, run_time)
        return max(period, limit).total_seconds() + self.skew

    # -- reporting -----------------------------------------------------------------------

    def _missed(self, job: Any, run_time: datetime, late: timedelta) -> None:
        self._logger.warning('Run time of job "%s" was missed by %s', job, late)
        self._dispatch(
            JobExecutionEvent(EVENT_JOB_MISSED, job.id, job._jobstore_alias, run_time), None
        )

    def _dispatch(self, event: Any, reason: str | None) -> None:
        event.coordlock_reason = reason
        if self._scheduler is not None:
            self._scheduler._dispatch_event(event)

    def _warn_once(self, job: Any) -> None:
        """Warn (once per job) about what keeps processes from computing the same claims."""
        if job.id in self._warned:
            return
        self._warned.add(job.id)
        if _AUTO_ID.fullmatch(job.id):
            log.warning(
                "apscheduler job %r (%s) looks like an auto-generated id: every process needs "
                "the same id to share its run times; pass id=... to add_job()",
                job.id,
                job.name,
            )
        trigger = job.trigger
        if getattr(trigger, "jitter", None):
            log.warning(
                "apscheduler job %r has jitter: each process shifts its run times at random, "
                "so their claims differ and each may run; drop jitter= for coordinated jobs",
                job.id,
            )
        start = getattr(trigger, "start_date", None)
        if isinstance(trigger, IntervalTrigger) and start is not None and start.microsecond:
            log.warning(
                "apscheduler interval job %r has no fixed start_date (it starts when the "
                "process added it), so processes compute different run times and their claims "
                "differ; pass start_date='2024-01-01 00:00:00' to add_job()",
                job.id,
            )

    def __repr__(self) -> str:
        return f"<CoordinatedExecutor {self.inner!r}>"


def coordinate(
    scheduler: Any,
    coordinator: RunCoordinator | str | None = None,
    *,
    skew: float | timedelta | None = None,
    hold: float | timedelta | None = None,
) -> Any:
    """Wrap every executor of ``scheduler`` (default executor included) in a
    :class:`CoordinatedExecutor`; returns the scheduler. Call it before ``scheduler.start()``;
    executors added later are not wrapped (wrap them yourself). Idempotent.
    """
    if getattr(scheduler, "running", False):
        raise RuntimeError("coordinate() must be called before the scheduler is started")
    executors = getattr(scheduler, "_executors", None)
    if not isinstance(executors, dict):
        raise TypeError(f"not an APScheduler 3.x scheduler: {type(scheduler).__name__}")
    ref = CoordinatorRef(coordinator)  # validate before changing anything
    del ref
    check_skew(skew)
    check_hold(hold)
    with scheduler._executors_lock:
        if "default" not in executors:
            executors["default"] = scheduler._create_default_executor()
        for alias, executor in list(executors.items()):
            if not isinstance(executor, CoordinatedExecutor):
                executors[alias] = CoordinatedExecutor(
                    executor, coordinator, skew=skew, hold=hold
                )
    return scheduler


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
