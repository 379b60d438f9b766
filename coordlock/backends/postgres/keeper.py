"""The keeper thread of a PostgreSQL coordinator: it does no work per lock/unlock pair.

It wakes every ``TICK`` s while locks are being taken (1 s when idle), and early when asked
(:meth:`Keeper.schedule`), and per session:

* **cuts a statement that got no answer in time** (a frozen connection: a proxy or a network
  that keeps the socket open but delivers nothing): every statement carries a deadline
  (``io_timeout``; a renewal the lease's own deadline) and past it the keeper shuts the socket
  down, so the blocked call fails at once and the session's leases are reported lost;
* **notices a session the server ended** (``pg_terminate_backend``, a restart, an idle
  timeout): the sockets of idle lock-holding sessions are watched, and one that turns readable
  is checked, so its leases are lost within milliseconds;
* **unlocks expired locks** (a holder that runs but stopped renewing), rows first;
* **keeps idle_session_timeout right** (the smallest ttl held; 0 when none) and pings idle
  sessions that have one, so they are not ended while this process runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import psycopg

from .options import PGBOUNCER_ADVICE
from .session import Held, Session, SessionPool
from .statements import Statements

log = logging.getLogger("coordlock")

#: How often (s) the keeper wakes while locks are being taken, and while idle.
TICK = 0.025
IDLE_WAKE = 1.0
#: After activity, the keeper ticks every TICK for this long.
LINGER = 5.0
#: A lock-holding session idle this long has its socket watched for a server-side end.
WATCH_AFTER = 0.01

LostReporter = Callable[[list[Held], str], None]


def cut(session: Session) -> None:
    """Shut the session's socket down (both ways) so a call blocked on it fails at once."""
    try:
        sock = socket.socket(fileno=os.dup(session.fd))
    except OSError:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def wait_readable(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` readable within ``timeout`` seconds (poll where it exists)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return [fd for fd, _ in poller.poll(timeout * 1000)]
    readable, _, _ = select.select(fds, [], [], timeout)  # pragma: no cover - Windows
    return list(readable)


class Keeper:
    """One daemon thread per coordinator (started with its first session)."""

    def __init__(
        self,
        pool: SessionPool,
        q: Statements,
        report_lost: LostReporter,
        retire: Callable[[Session], None],
    ) -> None:
        self.pool = pool
        self.q = q
        self.report_lost = report_lost
        self.retire = retire  # closes a spare that holds nothing (its rows released first)
        self._reset()

    def _reset(self) -> None:
        self.thread: threading.Thread | None = None
        self.stopping = False
        # The keeper sleeps until ``sleep_until`` (-inf while it is awake: it will look at
        # every session anyway); ``pending`` is the earliest time asked for by schedule()
        # since its round started. schedule() writes ``pending`` before it reads
        # ``sleep_until``, the keeper writes ``sleep_until`` before it reads ``pending``: one
        # of them sees the other, so no request is lost and an awake keeper is never woken.
        self.sleep_until = -math.inf
        self.pending = math.inf
        self.active_until = 0.0
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def start(self) -> None:
        with self.lock:
            if self.thread is not None or self.stopping:
                return
            self.thread = threading.Thread(
                target=self._main, name=f"coordlock-pg-keeper-{id(self):x}", daemon=True
            )
            self.thread.start()

    def schedule(self, due: float) -> None:
        """Make sure the keeper wakes by ``due`` (monotonic). No system call unless the keeper
        sleeps past ``due``; a few comparisons on the lock/unlock path."""
        self.active_until = time.monotonic() + LINGER
        if due < self.pending:
            self.pending = due
        if due < self.sleep_until - 0.002:
            self.sleep_until = due
            # OSError: the buffer is full (the keeper will wake anyway) or closed (shutting down)
            with contextlib.suppress(OSError):
                self.wake_w.send(b"x")

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            thread = self.thread
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self.wake_r.close()
        self.wake_w.close()

    def after_fork(self) -> None:
        """In a forked child: no thread; a wake-up channel of its own (closing the inherited
        copies does not affect the parent's)."""
        with contextlib.suppress(OSError):
            self.wake_r.close()
            self.wake_w.close()
        self._reset()

    # -- the thread --------------------------------------------------------------------------

    def _main(self) -> None:
        while not self.stopping:
            try:
                self._round()
            except Exception:  # pragma: no cover - never let the keeper die silently
                log.exception("coordlock: PostgreSQL keeper failed; continuing")
                time.sleep(0.1)

    def _round(self) -> None:
        self.sleep_until = -math.inf  # awake: schedule() need not wake it
        self.pending = math.inf
        now = time.monotonic()
        sessions = self.pool.live_sessions()
        wake = now + (TICK if now < self.active_until else IDLE_WAKE)
        watched: dict[int, Session] = {}
        for session in sessions:
            deadline = session.deadline
            if deadline <= now:
                self._cut(session, now)
                continue
            if deadline != math.inf or session.dead:
                wake = min(wake, deadline)  # in flight: its answer (or its deadline) comes first
                continue
            wake = min(wake, self._service(session, now))
            if session.dead:
                continue
            # Idle for a moment (no reply can still be arriving): the server may end it; its
            # socket turning readable tells at once. (A session in use is looked at again by
            # the next round, at most TICK later: no wake-up per lock/unlock pair.)
            if (session.held or session.timeout_ms) and now - session.last_used > WATCH_AFTER:
                watched[session.fd] = session
        self.sleep_until = wake
        wake = min(wake, self.pending)  # asked for while this round looked at the sessions
        self.sleep_until = wake
        timeout = max(0.0, wake - time.monotonic())
        try:
            readable = wait_readable([self.wake_r.fileno(), *watched], timeout)
        except (OSError, ValueError):  # a watched socket was closed meanwhile
            return
        for fd in readable:
            if fd == self.wake_r.fileno():
                try:
                    while self.wake_r.recv(4096):
                        pass
                except OSError:
                    pass
            elif fd in watched:
                watched[fd].poked = True

    def _cut(self, session: Session, now: float) -> None:
        if session.dead:
            return
        log.warning(
            "coordlock: no answer from PostgreSQL session %d in time (frozen connection?); "
            "closing it",
            session.pid,
        )
        cut(session)
        session.deadline = math.inf  # cut once; the blocked call fails and drops the session

    def _service(self, session: Session, now: float) -> float:
        """Keep one session: unlock expired locks, ping; return when it is next due."""
        with self.pool.state:
            entries = list(session.held.values())
        expired = any(h.deadline <= now for h in entries)
        ping_due = session.timeout_ms > 0 and now - session.last_used >= session.timeout_ms / 3000
        if expired or ping_due or session.poked:
            if not session.mutex.acquire(timeout=0.02):
                return now + 0.005  # busy with a statement: try again soon
            lost_expired: list[Held] = []
            lost_dead: list[Held] = []
            try:
                if not session.dead:
                    lost_expired, lost_dead = self._service_locked(session)
            finally:
                session.mutex.release()
            self.report_lost(lost_expired, "ttl elapsed without renewal; the lock was released")
            self.report_lost(lost_dead, "its PostgreSQL session ended")
        with self.pool.state:
            entries = list(session.held.values())
        due = min((h.deadline for h in entries), default=math.inf)
        if session.timeout_ms > 0:
            due = min(due, session.last_used + session.timeout_ms / 3000)
        return due

    def _service_locked(self, session: Session) -> tuple[list[Held], list[Held]]:
        """The keeper's statements on one session (its mutex held); returns lost locks."""
        now = time.monotonic()
        if session.poked:
            session.poked = False
            readable = wait_readable([session.fd], 0.0)
            if not readable and session.timeout_ms == 0 and not session.held:
                return [], []
        with self.pool.state:
            entries = list(session.held.values())
        expired = [h for h in entries if h.deadline <= now]
        lost_expired: list[Held] = []
        bound = now + self.pool.options.io_timeout
        try:
            if expired:
                keys = [h.key for h in expired]
                session.run(self.q.release_expired, {"keys": keys, "m": session.marker}, bound)
                for h in expired:
                    self.pool.forget(h)
                lost_expired = expired
                log.warning(
                    "coordlock: released %d lock(s) whose ttl elapsed without renewal: %s",
                    len(expired),
                    ", ".join(repr(h.name) for h in expired[:10]),
                )
            with self.pool.state:
                desired = session.desired_timeout()
            row = session.run(self.q.ping, (str(desired),), bound)
        except psycopg.Error as exc:
            lost = self.pool.drop(session, f"keeper: {type(exc).__name__}: {exc}")
            return lost_expired, lost
        session.last_used = time.monotonic()
        session.timeout_ms = desired
        session.prune_recent(session.last_used)
        if row is None or row[0] != session.pid:
            lost = self.pool.drop(session, "a pooling proxy moved it to another server session")
            log.error("coordlock: %s", PGBOUNCER_ADVICE)
            return lost_expired, lost
        if not session.held and not session.main and not self.pool.recycle(session):
            self.retire(session)
        return lost_expired, []
