"""The framework-neutral HTTP cron guard: secret check, tick, claim, run or skip, response.

Pure coordlock code: no web framework is imported here (the adapters in this package import
their own framework, each only when that adapter module is imported).
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

from .. import _locking
from .._api import _tick_spec
from .._errors import ConfigurationError, CoordlockError, LockNotAcquired
from .._lease import BaseLease
from .._locking import COORDINATOR_ERROR, OFF_TICK, WON, LockContext, TickNotRun
from .._protocol import RunCoordinator
from .._validate import check_hold_at_least, check_name, check_ttl
from ..integrations._claims import CoordinatorRef

log = logging.getLogger("coordlock")

#: The environment variable holding the shared secret by default (Vercel's convention).
DEFAULT_SECRET_ENV = "CRON_SECRET"

#: ``reason`` of a request refused for a missing or wrong secret (status 401).
UNAUTHORIZED = "unauthorized"


class Unauthorized(CoordlockError):
    """The request carried no ``Authorization: Bearer <secret>`` header, or a wrong secret."""


@dataclass
class CronTick:
    """What the guard decided for one delivery.

    * ``job`` – the job (and lock) name; ``tick`` – the scheduled tick the request belongs to
      (an aware UTC datetime; ``None`` off tick); ``key`` – its claim key ``job@<tick UTC>``.
    * ``won`` – ``True`` when this delivery won the tick and holds the lock: run the job now.
    * ``reason`` – ``won``, ``claimed-elsewhere`` (a duplicate or retried delivery, or another
      replica got it), ``off-tick``, ``running`` (a run of an earlier tick still holds the
      lock), ``coordinator-error`` (the coordinator could not be asked: nothing ran).
    * ``fence`` – the lease's fencing token while ``won`` (else ``None``).
    """

    job: str
    tick: datetime | None
    key: str | None
    won: bool
    reason: str
    detail: str = ""
    lease: BaseLease | None = field(default=None, repr=False)

    @property
    def tick_iso(self) -> str | None:
        """The tick in UTC, ISO 8601 (``2026-01-01T00:05:00Z``), as in claim keys."""
        return None if self.key is None else self.key.rpartition("@")[2]

    @property
    def fence(self) -> int | None:
        return None if self.lease is None else self.lease.fence

    def body(self) -> dict[str, Any]:
        """The JSON response body: ``{"job", "tick", "ran", "reason"}``."""
        return {"job": self.job, "tick": self.tick_iso, "ran": self.won, "reason": self.reason}


@dataclass(frozen=True)
class CronResponse:
    """A response for the framework adapter to send: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class CronGuard:
    """Guard an HTTP endpoint that a cron service calls (Vercel cron, Cloud Scheduler, a
    Kubernetes CronJob running curl) so that each scheduled tick runs once across replicas,
    however often the request is delivered or retried.

    ``job``: the job's name, the same on every replica (the claim keys and the lock use it).
    ``cron``/``timezone`` or ``every``/``offset``: the job's schedule, the one the cron
    service uses; ``skew``: how early or late a delivery may be for its tick (default
    ``min(period / 2, 60)`` seconds; delivery delays of the platform count here). Each
    delivery belongs to the scheduled tick nearest to the request's arrival; the first one
    claims ``job@<tick UTC>`` and runs the job under the lock ``job`` (``ttl`` seconds,
    renewed while the job runs; ``hold_at_least`` as for :func:`coordlock.lock`); the others
    answer ``200 {"ran": false, "reason": "claimed-elsewhere"}`` so the platform stops
    retrying.

    The secret: ``Authorization: Bearer <secret>`` is compared with ``hmac.compare_digest``
    against ``secret``, else the environment variable ``secret_env`` (``CRON_SECRET``). No
    secret configured raises :class:`~coordlock.ConfigurationError` here, at startup, unless
    ``require_secret=False`` (every request is then accepted: only behind a private network).
    ``coordinator``: a coordinator or URL; default the process-wide one
    (``coordlock.configure()`` or ``$COORDLOCK_URL``), looked up at each request.
    """

    def __init__(
        self,
        job: str,
        *,
        cron: str | None = None,
        timezone: str | tzinfo | None = None,
        every: float | timedelta | None = None,
        offset: float | timedelta | None = None,
        skew: float | timedelta | None = None,
        secret: str | None = None,
        secret_env: str = DEFAULT_SECRET_ENV,
        require_secret: bool = True,
        ttl: float = 60,
        hold_at_least: float | None = None,
        coordinator: RunCoordinator | str | None = None,
    ) -> None:
        self.job = check_name(job, "job")
        if cron is None and every is None:
            raise ValueError("give the job's schedule: cron='*/5 * * * *' or every=<seconds>")
        spec = _tick_spec(job, cron, timezone, every, offset, skew, "skip")
        assert spec is not None
        self.spec = spec
        self.ttl = check_ttl(ttl)
        self.hold_at_least = check_hold_at_least(hold_at_least)
        self._coordinator = CoordinatorRef(coordinator)
        self._secret = self._load_secret(secret, secret_env, require_secret)

    # -- the secret --------------------------------------------------------------------------

    def _load_secret(self, secret: str | None, secret_env: str, require: bool) -> bytes | None:
        if not isinstance(require, bool):
            raise TypeError("require_secret must be a bool")
        if secret is not None and not isinstance(secret, str):
            raise TypeError(f"secret must be a str, not {type(secret).__name__}")
        value = secret if secret is not None else os.environ.get(secret_env, "")
        value = value.strip()
        if value:
            return value.encode("utf-8")
        if require:
            raise ConfigurationError(
                f"no cron secret: set ${secret_env} (the cron service sends it as "
                "'Authorization: Bearer <secret>'), pass secret=..., or pass "
                "require_secret=False to accept unauthenticated requests"
            )
        log.warning("cron %r accepts requests without a secret (require_secret=False)", self.job)
        return None

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the secret (timing-safe compare).

        Always ``True`` when the guard was built with ``require_secret=False`` and no secret.
        """
        if self._secret is None:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8"), self._secret)

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless :meth:`authorized`."""
        if not self.authorized(authorization):
            log.warning("cron %r: refused a request with a missing or wrong secret", self.job,
                        extra={"lock": self.job, "event": "unauthorized"})  # fmt: skip
            raise Unauthorized(f"cron {self.job!r}: missing or wrong 'Authorization: Bearer'")

    # -- tick, claim, lock -------------------------------------------------------------------

    def coordinator(self) -> RunCoordinator:
        """The coordinator requests use (connected on first use when given as a URL)."""
        return self._coordinator.get()

    def close(self) -> None:
        """Close the coordinator if the guard connected it from a URL."""
        self._coordinator.close()

    def _context(self) -> LockContext:
        return LockContext(
            self.job, self.ttl, coordinator=self.coordinator(), hold_at_least=self.hold_at_least,
            tick=self.spec,
        )  # fmt: skip

    def _decided(self, held: LockContext, lease: BaseLease) -> CronTick:
        decision = held.decision
        assert decision is not None
        log.info("cron %r: tick %s runs here", self.job, decision.tick_iso,
                 extra={"lock": self.job, "event": "started", "tick": decision.key})
        return CronTick(self.job, decision.tick_datetime, decision.key, True, WON, lease=lease)

    def _skipped(self, exc: TickNotRun) -> CronTick:
        level = logging.WARNING if exc.reason == OFF_TICK else logging.INFO
        log.log(level, "cron %r: not running: %s", self.job, exc.detail,
                extra={"lock": self.job, "event": "skipped", "outcome": exc.reason,
                       "tick": exc.key})  # fmt: skip
        return CronTick(self.job, exc.tick, exc.key, False, exc.reason, exc.detail)

    def _failed(self, exc: Exception) -> CronTick:
        log.warning("cron %r: the coordinator could not be asked, not running: %s: %s",
                    self.job, type(exc).__name__, exc,
                    extra={"lock": self.job, "event": "skipped", "outcome": COORDINATOR_ERROR})
        return CronTick(self.job, None, None, False, COORDINATOR_ERROR, f"{type(exc).__name__}")

    def begin(self, authorization: str | None, *, now: float | None = None) -> CronTick:
        """Check the secret (raising :class:`Unauthorized`), then claim the tick of a request
        arriving at ``now`` (epoch seconds, default: now) and take the lock. When the result
        is ``won``, call :meth:`end` after the job (a ``finally``)."""
        now = _locking.wall_clock() if now is None else now  # the request's arrival
        self.check(authorization)
        try:
            held = self._context()
            lease = held.acquire(now=now)
        except TickNotRun as exc:
            return self._skipped(exc)
        except (CoordlockError, OSError) as exc:
            if isinstance(exc, LockNotAcquired):  # pragma: no cover - tick locks raise TickNotRun
                raise
            return self._failed(exc)
        return self._decided(held, lease)

    async def abegin(self, authorization: str | None, *, now: float | None = None) -> CronTick:
        """:meth:`begin` for asyncio (the coordinator's async API; the loop never blocks)."""
        now = _locking.wall_clock() if now is None else now
        self.check(authorization)
        try:
            held = self._context()
            lease = await held.aacquire(now=now)
        except TickNotRun as exc:
            return self._skipped(exc)
        except (CoordlockError, OSError) as exc:
            if isinstance(exc, LockNotAcquired):  # pragma: no cover
                raise
            return self._failed(exc)
        return self._decided(held, lease)

    def end(self, tick: CronTick) -> None:
        """Release the lock of a ``won`` tick (nothing otherwise). The tick's claim stays: a
        later delivery of the same tick is a duplicate. A lease lost while the job ran is
        logged (as every loss is), not raised."""
        lease, tick.lease = tick.lease, None
        if lease is not None:
            try:
                lease.release()  # type: ignore[attr-defined]
            except CoordlockError as exc:
                log.warning("cron %r: could not release the lock (it expires after its ttl): "
                            "%s", self.job, exc)  # fmt: skip

    async def aend(self, tick: CronTick) -> None:
        """:meth:`end` for asyncio."""
        lease, tick.lease = tick.lease, None
        if lease is not None:
            try:
                await lease.release()  # type: ignore[attr-defined]
            except CoordlockError as exc:
                log.warning("cron %r: could not release the lock (it expires after its ttl): "
                            "%s", self.job, exc)  # fmt: skip

    # -- the whole request -------------------------------------------------------------------

    def respond(self, tick: CronTick) -> CronResponse:
        """The response for a decided tick: 200 (ran or not), 503 on a coordinator error (so
        the platform retries; nothing ran)."""
        return CronResponse(503 if tick.reason == COORDINATOR_ERROR else 200, tick.body())

    def unauthorized(self) -> CronResponse:
        """The 401 response (nothing ran)."""
        return CronResponse(
            401,
            {"job": self.job, "tick": None, "ran": False, "reason": UNAUTHORIZED},
            {"WWW-Authenticate": 'Bearer realm="cron"'},
        )

    def run(
        self, func: Callable[..., Any], authorization: str | None, *args: Any,
        now: float | None = None, **kwargs: Any,
    ) -> CronResponse:  # fmt: skip
        """Handle one delivery: 401 on a bad secret; else claim the tick and, when won, call
        ``func(tick, *args, **kwargs)`` under the lock. Exceptions of ``func`` propagate (the
        framework answers 500; a retried delivery of that tick finds it claimed)."""
        try:
            tick = self.begin(authorization, now=now)
        except Unauthorized:
            return self.unauthorized()
        if tick.won:
            try:
                func(tick, *args, **kwargs)
            finally:
                self.end(tick)
        return self.respond(tick)

    async def arun(
        self, func: Callable[..., Awaitable[Any]] | Callable[..., Any], authorization: str | None,
        *args: Any, now: float | None = None, **kwargs: Any,
    ) -> CronResponse:  # fmt: skip
        """:meth:`run` for asyncio: ``func`` may be a coroutine function (awaited) or a plain
        function (called in a worker thread, so the event loop never blocks)."""
        try:
            tick = await self.abegin(authorization, now=now)
        except Unauthorized:
            return self.unauthorized()
        if tick.won:
            try:
                if inspect.iscoroutinefunction(func):
                    await func(tick, *args, **kwargs)
                else:
                    import asyncio
                    import functools

                    await asyncio.to_thread(functools.partial(func, tick, *args, **kwargs))
            finally:
                await self.aend(tick)
        return self.respond(tick)

    def __repr__(self) -> str:
        return f"<CronGuard {self.job!r} {self.spec.describe()}>"
