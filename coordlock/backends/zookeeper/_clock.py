"""What this client may assume about the ZooKeeper server's clock, without trusting its own.

ZooKeeper stamps every write with the leader's wall clock (``mtime``/``ctime``, whole ms). A
lock node expires ``ttl`` after its ``mtime``, and two different questions need two different
bounds of that clock:

* **"Has another owner's node expired?"** (a waiter deleting an expired holder, a claim being
  replaced or swept, ``locks()`` hiding expired holders) needs a LOWER bound of server time now:
  judging with an estimate that runs ahead deletes a live holder's node. :class:`ServerClock`
  gives one: a server stamp plus the monotonic time elapsed since the REPLY that carried it was
  received. The server stamped the write before replying, so "stamp + time since the reply"
  never exceeds the server clock (barring a jump of the server clock). Anchoring at the time
  the request was *sent* would run ahead by the request's in-flight delay.
* **"How long does my own lease last?"** needs the opposite: our node expires ``ttl`` after the
  server stamped it, which happened after we sent the write, so the holder's local deadline
  counts from the SEND time of its create/``set_data`` (never later than the server's stamp).
  That bound is kept by the lock code (``LockNode.stamped``), not here.
"""

from __future__ import annotations

import math
import time

#: A server-clock reading older than this (seconds) is refreshed before judging claims.
CLOCK_MAX_AGE = 30.0


class ServerClock:
    """A lower bound of the ZooKeeper server's clock (epoch milliseconds).

    Thread-safe by construction: a reading is one tuple, replaced atomically.
    """

    __slots__ = ("_reading",)

    def __init__(self) -> None:
        self._reading: tuple[float, float] | None = None  # (server ms, monotonic at reply)

    def note_reply(self, server_ms: float, replied_at: float) -> None:
        """Record a server stamp carried by a reply received at ``replied_at``.

        ``replied_at`` is a ``time.monotonic()`` value taken AFTER the reply arrived (never the
        send time). The newest reading wins: every reading is a lower bound, and the newest one
        also follows a server clock that was stepped back.
        """
        current = self._reading
        if current is None or replied_at >= current[1]:
            self._reading = (float(server_ms), replied_at)

    def at_least_ms(self) -> float:
        """Server time now is at least this (epoch ms); ``-inf`` before the first reading."""
        current = self._reading
        if current is None:
            return -math.inf
        return current[0] + (time.monotonic() - current[1]) * 1000.0

    def age(self) -> float:
        """Seconds since the newest reading (``inf`` when there is none)."""
        current = self._reading
        return math.inf if current is None else time.monotonic() - current[1]

    def stale(self) -> bool:
        """True when the reading is missing or older than :data:`CLOCK_MAX_AGE`."""
        return self.age() > CLOCK_MAX_AGE
