"""The keeper thread of a PostgreSQL coordinator: it does no work per lock/unlock pair.

It wakes every ``TICK`` s while locks are being taken (1 s when idle), and early when asked
(:meth:`Keeper.schedule`), and per session (sync, or async on any event loop):

* **cuts a statement that got no answer in time** (a frozen connection: a proxy or a network
  that keeps the socket open but delivers nothing): every statement carries a deadline
  (``io_timeout``; a renewal the lease's own deadline) and past it the keeper shuts the socket
  down, so the blocked call fails at once and the session's leases are reported lost;
* **notices a session the server ended** (``pg_terminate_backend``, a restart, an idle
  timeout) or a force-unlock request: the sockets of idle lock-holding sessions are watched,
  and one that turns readable is visited;
* **visits** a session (``flows.service_flow``, on the session's own thread or event loop) to
  unlock expired or lingering locks, handle force-unlock requests and keep idle_session_timeout
  right (the smallest ttl held; 0 when none).
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

from .session import BaseSession, Registry

log = logging.getLogger("coordlock")

#: How often (s) the keeper wakes while locks are being taken, and while idle.
TICK = 0.025
IDLE_WAKE = 1.0
#: After activity, the keeper ticks every TICK for this long.
LINGER = 5.0
#: A lock-holding session idle this long has its socket watched for a server-side end.
WATCH_AFTER = 0.01

#: ``visit(session)``: run the service flow on it; False when it is busy (try again soon).
Visitor = Callable[[BaseSession], bool]


def cut(session: BaseSession) -> None:
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

    def __init__(self, registry: Registry, visit: Visitor) -> None:
        self.registry = registry
        self.visit = visit
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

    def wake(self) -> None:
        """Visit sessions now (a force-unlock request arrived)."""
        self.schedule(time.monotonic())

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
        wake = now + (TICK if now < self.active_until else IDLE_WAKE)
        watched: dict[int, BaseSession] = {}
        for session in self.registry.live():
            if session.stranded:  # an event loop ended without aclose(): free its sessions
                self.visit(session)
                continue
            deadline = session.deadline
            if deadline <= now:
                self._cut(session)
                continue
            if deadline != math.inf:
                wake = min(wake, deadline)  # in flight: its answer (or its deadline) comes first
                continue
            wake = min(wake, self._service(session, now))
            # Idle for a moment (no reply can still be arriving): the server may end it, or ask
            # it to let a key go; its socket turning readable tells at once. (A session in use
            # is looked at again by the next round, at most TICK later.)
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
                self.pending = time.monotonic()

    def _cut(self, session: BaseSession) -> None:
        if session.dead:
            return
        log.warning(
            "coordlock: no answer from PostgreSQL session %d in time (frozen connection?); "
            "closing it",
            session.pid,
        )
        cut(session)
        session.deadline = math.inf  # cut once; the blocked call fails and drops the session

    def _service(self, session: BaseSession, now: float) -> float:
        """Visit one session if it needs it; return when it is next due."""
        with self.registry.state:
            entries = list(session.held.values())
        expired = any(h.deadline <= now for h in entries)
        ping_due = session.timeout_ms > 0 and now - session.last_used >= session.timeout_ms / 3000
        if expired or ping_due or session.poked or session.revoked:
            if not self.visit(session):
                return now + 0.005  # busy with a statement: try again soon
            with self.registry.state:
                entries = list(session.held.values())
        due = min((h.deadline for h in entries), default=math.inf)
        if session.timeout_ms > 0:
            due = min(due, session.last_used + session.timeout_ms / 3000)
        return max(due, now + TICK) if session.servicing else due  # (a visit is on its way)
