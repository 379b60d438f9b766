"""What every operation of the PostgreSQL backend sends and what the answers mean, written once.

Each operation is a *flow*: a generator that yields the :class:`~.session.Step` (statement) it
needs next and receives its result (or has the driver's error thrown in). :func:`drive` runs a
flow on a sync session, :func:`adrive` on an async one; those two loops are the only code that
differs between the sync and the async hooks. Flows never take a session's lock themselves:
the caller holds it (the mutex of a sync session, the ``asyncio.Lock`` of an async one).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from ..._attempt import Attempt
from ..._errors import ConfigurationError
from .keeper import TICK, wait_readable
from .markers import choose_marker, hashtext_probe
from .options import PGBOUNCER_ADVICE
from .schema import schema_flow
from .session import (
    MAX_MS,
    MIN_SERVER_VERSION,
    AsyncSession,
    BaseSession,
    Held,
    Session,
    Step,
    ms,
)
from .statements import channel

if TYPE_CHECKING:
    from .coordinator import PostgresCoordinator

log = logging.getLogger("coordlock")
T = TypeVar("T")
Flow = Generator[Step, Any, T]

#: The server's and this host's clocks may run at rates this far apart (ratio): the lease
#: clock of a granted wait starts that much earlier than the measured wait says.
CLOCK_RATE_SLACK = 1e-3
#: How long a force-unlock waits for the holder to let go before ending its session (s).
FORCE_PATIENCE = 2.0

LOST_SESSION = "its PostgreSQL session ended"


@dataclass(frozen=True, slots=True)
class Ticket:
    """The state of one acquire call between its attempts (see ``Attempt.ticket``)."""

    owner: str
    ttl: float
    key: int
    orphan_until: float = 0.0  # a dead holder's lease ends then (monotonic): wait, don't lock


# -- drivers ------------------------------------------------------------------------------------


def drive(session: Session, flow: Flow[T]) -> T:
    """Run ``flow`` on a sync session (the caller holds its mutex)."""
    try:
        step = next(flow)
        while True:
            try:
                result = session.run(step)
            except BaseException as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def adrive(session: AsyncSession, flow: Flow[T]) -> T:
    """Run ``flow`` on an async session (the caller holds its lock)."""
    try:
        step = next(flow)
        while True:
            try:
                result = await session.run(step)
            except BaseException as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


# -- connecting --------------------------------------------------------------------------------


def setup_flow(c: PostgresCoordinator, s: BaseSession, *, marker: bool) -> Flow[None]:
    """A new session: check the server and the schema, take the session marker, LISTEN."""
    row = yield Step(c._q.session_init, prepare=False)
    pid, version, sync_commit, database_oid, probe = row
    if int(version) < MIN_SERVER_VERSION:
        raise ConfigurationError(
            f"PostgreSQL {version} is too old: coordlock needs PostgreSQL 14 or newer "
            "(idle_session_timeout bounds how long a stopped holder keeps its locks)"
        )
    if marker and probe != hashtext_probe():
        raise ConfigurationError(
            "this PostgreSQL server hashes lock tags differently from what coordlock's "
            "takeover=lease relies on (a big-endian server?); use ?takeover=session"
        )
    if not c._schema_ready:
        yield from schema_flow(c._opts.schema, create=c._opts.create_schema)
        c._schema_ready = True
    for _ in range(5):  # a taken marker (never in practice) is simply replaced
        key = choose_marker(int(database_oid)) if marker else None
        # Fences come from a sequence whose WAL must reach disk before a fence is used.
        got = yield Step(c._q.session_setup, {"m": key, "sc": sync_commit == "off"}, prepare=False)
        if got is not None and got[0]:
            break
    else:
        raise psycopg.OperationalError("could not take a session marker")
    yield Step(c._q.listen, fetch="none", prepare=False)
    s.pid = int(pid)
    s.marker = key


# -- acquire -----------------------------------------------------------------------------------


def try_flow(
    c: PostgresCoordinator, s: BaseSession, name: str, owner: str, ttl: float, key: int
) -> Flow[Attempt]:
    """One attempt on the main session: one statement (two on a key's first use)."""
    held = c._registry.held.get(name)
    if held is not None:  # held in this process: same owner = a retried call
        if held.owner == owner:
            return Attempt.granted(held.fence)
        return Attempt.busy(ticket=Ticket(owner, ttl, key))
    q = c._q
    want = ms(ttl)
    lower = s.timeout_ms == 0 or want < s.timeout_ms
    params: dict[str, Any] = {"k": key, "owner": owner, "ttl": ttl * 1000.0}
    if lower:
        params["it"] = str(want)
    sent = time.monotonic()
    bound = sent + c._io
    orphan_left: float | None = None
    try:
        if c._leases:
            params["m"] = s.marker
            label = "try_lease_idle" if lower else "try_lease"
            row = yield Step(label, params, bound, lean=q.lean[label])
            fence, got, pid = row[0], row[1], row[2]
            if fence is None and got:  # locked, nothing written: first use of the key, or orphan
                params["name"] = name
                row = yield Step(q.take_row_idle if lower else q.take_row, params, bound)
                fence, pid = row[0], row[1]
                if fence is None:
                    orphan_left = float(row[3] or 0.0)
        else:
            label = "try_session_idle" if lower else "try_session"
            row = yield Step(label, params, bound, lean=q.lean[label])
            fence, pid = row[0], row[2]
    except GeneratorExit:
        raise
    except BaseException as exc:
        yield from fail_flow(c, s, exc, key)
        raise
    now = time.monotonic()
    s.last_used = now
    if pid != s.pid:
        raise pooled(c, s, pid)
    if s.revoked:
        yield from revoke_flow(c, s)
    if fence is None:
        if orphan_left is None:
            return Attempt.busy(ticket=Ticket(owner, ttl, key))
        log_orphan(name, orphan_left)
        return Attempt.busy(retry_in=orphan_left, ticket=Ticket(owner, ttl, key, now + orphan_left))
    if lower:
        s.timeout_ms = want
    if now >= sent + ttl:  # answered after the lease would have ended: useless, let it go
        yield from stale_grant_flow(c, s, name, key)
        return Attempt.busy(ticket=Ticket(owner, ttl, key))
    held = Held(name, owner, key, fence, ttl, sent, s)
    c._registry.add(held)
    c._keeper.schedule(min(held.deadline, now + TICK))
    return Attempt.granted(int(fence))


def wait_flow(
    c: PostgresCoordinator, s: BaseSession, name: str, ticket: Ticket, timeout: float
) -> Flow[Attempt | None]:
    """Block in ``pg_advisory_lock`` on a spare session for up to ``timeout`` s.

    Granted: the spare now holds the lock; the lease clock starts at send time + the wait the
    server measured (never later than the server's lease start). Timed out: None (the base
    tries again). A dead holder's unexpired lease: busy with its remaining time."""
    key = ticket.key
    want_ms = ms(timeout) if not math.isinf(timeout) else MAX_MS
    lock_timeout = "0" if want_ms >= MAX_MS else str(want_ms)
    params = {"k": key, "name": name, "owner": ticket.owner, "ttl": ticket.ttl * 1000.0,
              "m": s.marker, "lt": lock_timeout, "it": str(ms(ticket.ttl))}  # fmt: skip
    sent = time.monotonic()
    bound = math.inf if lock_timeout == "0" else sent + timeout + c._io
    try:
        label = "wait_lease" if c._leases else "wait_session"
        row = yield Step(label, params, bound, lean=c._q.lean[label])
    except pg_errors.LockNotAvailable:  # lock_timeout: nothing was taken
        yield from recycle_flow(c, s)
        return None
    except GeneratorExit:
        raise
    except BaseException as exc:
        yield from fail_flow(c, s, exc, key)
        if c._closing.is_set() and isinstance(exc, psycopg.Error):  # close() cancelled it
            raise ConfigurationError(f"{type(c).__name__} is closed") from exc
        raise
    received = time.monotonic()
    s.last_used = received
    fence, pid, orphan_left, waited = row[0], row[1], row[3], row[4]
    if pid != s.pid:
        raise pooled(c, s, pid)
    if fence is None:
        yield from recycle_flow(c, s)
        left = float(orphan_left or 0.0)
        log_orphan(name, left)
        again = Ticket(ticket.owner, ticket.ttl, key, received + left)
        return Attempt.busy(retry_in=left, ticket=again)
    started = lease_start(sent, received, waited)
    s.timeout_ms = ms(ticket.ttl)
    if received >= started + ticket.ttl:  # answered after the lease ended (a held-up reply)
        yield from stale_grant_flow(c, s, name, key)
        yield from recycle_flow(c, s)
        return Attempt.busy(ticket=ticket)
    held = Held(name, ticket.owner, key, fence, ticket.ttl, started, s)
    c._registry.add(held)
    c._keeper.schedule(min(held.deadline, received + TICK))
    return Attempt.granted(int(fence), started=started)


def stale_grant_flow(c: PostgresCoordinator, s: BaseSession, name: str, key: int) -> Flow[None]:
    """The grant came back only after the lease it started would have ended (the reply was
    held up: a partition, a stalled network): never hand out a lease that is already over.
    The key is let go (its row says released on purpose, or its session is gone anyway)."""
    log.warning("coordlock: the grant of %r arrived after its ttl had run out; letting it go", name)
    try:
        yield unlock_step(c, key, time.monotonic() + c._io)
    except psycopg.Error as exc:
        drop(c, s, f"{type(exc).__name__}: {exc}")
    if c._leases:
        s.recent[key] = time.monotonic() + 3600.0  # (its row: marked released if we close)


def lease_start(sent: float, received: float, waited: float | None) -> float:
    """A monotonic time no later than the server's start of a lease granted after a wait.

    ``waited`` is the server's own measure (s) from the statement's arrival to the grant. The
    statement arrived after ``sent``, so ``sent + waited`` is no later than the grant (in this
    host's clock, give or take the clocks' rate difference: :data:`CLOCK_RATE_SLACK`), and never
    later than the reply."""
    wait = max(0.0, min(float(waited or 0.0), received - sent))
    return sent + wait * (1.0 - CLOCK_RATE_SLACK)


# -- release, extend, hold ----------------------------------------------------------------------


def release_flow(c: PostgresCoordinator, s: BaseSession, held: Held) -> Flow[bool]:
    """``pg_advisory_unlock``: one statement, no write."""
    if s.dead or c._registry.held.get(held.name) is not held:
        return False  # reaped at its ttl, or its session ended: not ours any more
    try:
        row = yield unlock_step(c, held.key, time.monotonic() + c._io)
    except psycopg.Error as exc:
        # Unknown whether the unlock happened: end the session, which surely does.
        drop(c, s, f"release failed: {type(exc).__name__}: {exc}", spare=held)
        return False
    s.last_used = time.monotonic()
    if c._leases:
        s.recent[held.key] = held.deadline + 1.0
    c._registry.forget(held)
    if s.revoked:
        yield from revoke_flow(c, s)
    if not s.main:
        yield from recycle_flow(c, s)
    unlocked = bool(row and row[0])
    if not unlocked:  # pragma: no cover - the session held it; only a bug gets here
        log.error("coordlock: %r was not locked by its session at release", held.name)
    return unlocked


def extend_flow(c: PostgresCoordinator, s: BaseSession, held: Held, ttl: float) -> Flow[bool]:
    """Push the lease row's expiry and keep the session busy (its idle timeout = smallest ttl)."""
    if s.dead or c._registry.held.get(held.name) is not held:
        return False
    ttls = [ms(h.ttl) for h in s.held.values() if h is not held]
    desired = min([ms(ttl), *ttls])
    sent = time.monotonic()
    # beyond the lease's own deadline an answer is useless: the lease is lost by then
    bound = min(sent + c._io, max(held.deadline, sent + 0.001))
    c._keeper.schedule(bound)
    params = {"ttl": ttl * 1000.0, "k": held.key, "m": s.marker, "it": str(desired)}
    try:
        label = "extend_lease" if c._leases else "extend_session"
        row = yield Step(label, params, bound, lean=c._q.lean[label])
    except psycopg.Error as exc:
        drop(c, s, f"renewal failed: {type(exc).__name__}: {exc}", spare=held)
        return False
    s.last_used = time.monotonic()
    if row is None or row[0] != s.pid:
        raise pooled(c, s, row[0] if row else -1)
    s.timeout_ms = desired
    held.ttl = ttl
    held.deadline = sent + ttl
    c._keeper.schedule(held.deadline)
    return True


def linger_flow(c: PostgresCoordinator, s: BaseSession, held: Held, linger: float) -> Flow[bool]:
    """``hold_at_least``: keep the lock ``linger`` more seconds, then the keeper unlocks it. The
    lease row expires at the end of the hold, so a session that dies meanwhile still holds
    others off until then (``takeover=lease``; with ``takeover=session`` the lock ends with
    the session, as every lock does in that mode)."""
    if s.dead or c._registry.held.get(held.name) is not held:
        return False
    now = time.monotonic()
    others = [ms(h.ttl) for h in s.held.values() if h is not held]
    desired = min([ms(linger), *others])
    if c._leases:
        params = {"linger": linger * 1000.0, "k": held.key, "m": s.marker, "it": str(desired)}
        try:
            row = yield Step(c._q.linger, params, now + c._io)
        except psycopg.Error as exc:
            drop(c, s, f"release failed: {type(exc).__name__}: {exc}", spare=held)
            return False
        if row is None or row[0] != s.pid:
            raise pooled(c, s, row[0] if row else -1)
        s.timeout_ms = desired
    s.last_used = time.monotonic()
    held.linger = True
    held.ttl = linger
    held.deadline = now + linger
    c._keeper.schedule(held.deadline)
    return True


# -- the keeper's visit ------------------------------------------------------------------------


def service_flow(c: PostgresCoordinator, s: BaseSession) -> Flow[None]:
    """Unlock expired (and lingering) locks, handle force-unlock requests, set the idle timeout
    and check the session is still ours. Errors end the session (its leases are lost)."""
    now = time.monotonic()
    if s.poked:
        s.poked = False
        if not wait_readable([s.fd], 0.0) and s.timeout_ms == 0 and not s.held and not s.revoked:
            return
    with c._registry.state:
        entries = list(s.held.values())
    expired = [h for h in entries if h.deadline <= now]
    bound = now + c._io
    try:
        if expired:
            keys = [h.key for h in expired]
            yield Step(c._q.release_expired, {"keys": keys, "m": s.marker}, bound)
            for h in expired:
                c._registry.forget(h)
            lost = [h for h in expired if not h.linger]
            if lost:
                log.warning(
                    "coordlock: released %d lock(s) whose ttl elapsed without renewal: %s",
                    len(lost),
                    ", ".join(repr(h.name) for h in lost[:10]),
                )
                c._report_held(lost, "ttl elapsed without renewal; the lock was released")
        with c._registry.state:
            desired = s.desired_timeout()
        row = yield Step(c._q.ping, (str(desired),), bound)  # (reads pending notifications)
        if s.revoked:
            yield from revoke_flow(c, s)
    except psycopg.Error as exc:
        drop(c, s, f"keeper: {type(exc).__name__}: {exc}")
        return
    s.last_used = time.monotonic()
    s.timeout_ms = desired
    s.prune_recent(s.last_used)
    if row is None or row[0] != s.pid:
        drop(c, s, "a pooling proxy moved it to another server session")
        log.error("coordlock: %s", PGBOUNCER_ADVICE)
        return
    if entries and not s.held and not s.main:  # a spare whose locks this visit ended
        yield from recycle_flow(c, s)


def revoke_flow(c: PostgresCoordinator, s: BaseSession) -> Flow[None]:
    """An operator force-released keys this session holds: let them go (their rows were
    already marked released by the forcer), and tell their owners."""
    keys, s.revoked = s.revoked, set()
    with c._registry.state:
        targets = [h for h in s.held.values() if h.key in keys]
    for held in targets:
        yield unlock_step(c, held.key, time.monotonic() + c._io)
        c._registry.forget(held)
        if not held.linger:
            c._report_held([held], "force-released by an operator (coordlock unlock --force)")
        log.warning("coordlock: %r was force-released by an operator", held.name)


# -- force-unlock ------------------------------------------------------------------------------


def force_flow(c: PostgresCoordinator, s: BaseSession, key: int) -> Flow[bool]:
    """Free ``key`` whoever holds it: its lease row stops counting, its holders are asked to let
    go (NOTIFY; a coordlock holder does within milliseconds and learns that its lease is
    lost), and a holder that has not within :data:`FORCE_PATIENCE` s has its session ended."""
    row = yield Step(c._q.force_revoke, {"k": key, "ch": channel(c._opts.schema)}, _bound(c))
    revoked, holders = int(row[0] or 0), list(row[1] or [])
    if not holders:
        return revoked > 0
    params = {"k": key, "lt": str(ms(FORCE_PATIENCE))}
    try:
        yield Step(c._q.force_wait, params, time.monotonic() + FORCE_PATIENCE + c._io)
        return True
    except pg_errors.LockNotAvailable:
        pass
    ended = yield Step(c._q.force_terminate, {"k": key}, _bound(c))
    log.warning(
        "coordlock: the holder of key %d did not let go within %gs; ended %d session(s) (pid %s)",
        key, FORCE_PATIENCE, int(ended[0] or 0), ", ".join(map(str, holders)),
    )  # fmt: skip
    yield Step(c._q.force_wait, params, time.monotonic() + FORCE_PATIENCE + c._io)
    return True


# -- housekeeping -------------------------------------------------------------------------------


def recycle_flow(c: PostgresCoordinator, s: BaseSession) -> Flow[None]:
    """A non-main session that holds nothing goes back to its pool's spares, or is retired."""
    pool = s.pool
    if pool is not None and pool.keep_spare(c._registry, s):
        return
    yield from retire_flow(c, s)


def retire_flow(
    c: PostgresCoordinator, s: BaseSession, reason: str = "closing", report: str | None = None
) -> Flow[None]:
    """Close a session: its unexpired lease rows are marked released first, or they would look
    orphaned once its marker is gone."""
    yield from mark_rows_flow(c, s)
    drop(c, s, reason, report=report)


def mark_rows_flow(c: PostgresCoordinator, s: BaseSession) -> Flow[None]:
    """Mark this session's unexpired lease rows released (best effort): it is about to end."""
    if c._leases and not s.dead and not s.broken:
        keys = s.row_keys(time.monotonic())
        if keys:
            step = Step(
                c._q.release_rows,
                {"keys": keys, "m": s.marker},
                time.monotonic() + min(c._io, 2.0),
                fetch="none",
            )
            try:
                yield step
            except psycopg.Error as exc:
                log.debug("coordlock: marking lease rows released failed: %s", exc)


def fail_flow(c: PostgresCoordinator, s: BaseSession, exc: BaseException, key: int) -> Flow[None]:
    """After a failed acquire statement: a session-level advisory lock taken by a statement
    that then failed (or was interrupted) survives, so on a live session the key is unlocked
    again (it was not held before); a broken session is dropped."""
    if s.broken:
        drop(c, s, f"{type(exc).__name__}: {exc}")
        return
    try:
        yield unlock_step(c, key, time.monotonic() + min(c._io, 2.0))
    except BaseException as again:
        drop(c, s, f"{type(again).__name__}: {again}")
        return
    if not s.main and not s.held:
        yield from recycle_flow(c, s)


def drop(
    c: PostgresCoordinator,
    s: BaseSession,
    reason: str,
    *,
    spare: Held | None = None,
    report: str | None = None,
) -> None:
    """Forget and close ``s``; report its leases lost (except ``spare``, whose hook reports)."""
    entries = c._registry.discard(s)
    if s.pool is not None:
        s.pool.forget(s)
    s.close()
    if entries:
        log.warning(
            "coordlock: PostgreSQL session %d ended (%s); %d lock(s) lost: %s",
            s.pid, reason, len(entries), ", ".join(repr(h.name) for h in entries[:10]),
        )  # fmt: skip
    lost = [h for h in entries if h is not spare and not h.linger]
    c._report_held(lost, report or LOST_SESSION)


def pooled(c: PostgresCoordinator, s: BaseSession, pid: int) -> ConfigurationError:
    """The session answered with another backend pid: a transaction-pooling proxy."""
    drop(c, s, "a pooling proxy moved it to another server session")
    return ConfigurationError(
        f"the server session changed under coordlock (pid {s.pid} became {pid}): "
        f"a transaction-pooling proxy such as PgBouncer is in the way. {PGBOUNCER_ADVICE}"
    )


def unlock_step(c: PostgresCoordinator, key: int, deadline: float) -> Step:
    """``pg_advisory_unlock(key)`` (lean: it runs on every release)."""
    return Step("unlock", {"k": key}, deadline, lean=c._q.lean["unlock"])


def one(c: PostgresCoordinator, s: BaseSession, step: Step) -> Flow[Any]:
    """A flow of a single statement (a broken session is dropped)."""
    try:
        return (yield step)
    except psycopg.Error as exc:
        if s.broken:
            drop(c, s, f"{type(exc).__name__}: {exc}")
        raise


def _bound(c: PostgresCoordinator) -> float:
    return time.monotonic() + c._io


def log_orphan(name: str, remaining: float | None) -> None:
    log.info(
        "coordlock: %r was freed by a session that ended while holding it; its lease has "
        "%.3fs left, so the lock stays unavailable until then",
        name,
        remaining or 0.0,
    )
