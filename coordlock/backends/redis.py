"""``redis://``, ``rediss://``, ``unix://`` and ``redis+sentinel://`` – locks in Redis.

* **acquire**: one ``EVALSHA`` running ``SET lock owner NX PX ttl`` and, when it wins, bumping
  the fence to ``max(stored + 1, server TIME in µs, client floor + 1)``, so fences keep
  increasing even after Redis restarts without persistence (see docs/backends/redis.md for
  what that does and does not promise). A retried call that finds ``owner`` already holding
  the lock returns the same fence.
* **waiting**: a waiter queues itself (first come, first served) and blocks in ``BLPOP`` on a
  list of its own; the release **hands the lock over** to the longest-waiting live waiter in
  the same script and pushes it the fence, so the waiter holds the lock when ``BLPOP`` returns
  (no second round trip). ``BLPOP`` is bounded by the holder's remaining PTTL (a dead holder's
  expiry is noticed) and by ``MAX_BLOCK`` (the queue registration is renewed that often; a
  waiter that died or froze is handed the lock only within that window).
* **release**: compare-and-delete (or compare-and-hand-over) that leaves a short-lived
  "released by <owner>" tombstone, so a release retried after a lost reply is still a clean
  release. **extend**: compare-and-``PEXPIRE``.
* **keys**: every key starts with the prefix (ACL users confined to ``~<prefix>*`` work);
  the keys of a name share the hash tag ``{<name>}`` (see ``_redis_keys``).
* **async**: native ``redis.asyncio`` clients, one pair per event loop; the sync and async
  hooks share argument building and reply parsing (the wait is one coroutine for both).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from .._attempt import Attempt
from .._base import BaseCoordinator
from .._errors import ConfigurationError
from .._io import drive
from .._protocol import ServerInfo
from .._registry import missing_driver
from . import _redis_scripts as lua
from ._redis_keys import KeyLayout, ms

try:
    import redis
    import redis.asyncio
    from redis.commands.core import Script
    from redis.exceptions import NoScriptError, RedisError

    from . import _redis_url as urls
    from ._redis_listing import ListingMixin, text
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise missing_driver("redis", "redis", "redis") from exc

log = logging.getLogger("coordlock")

DEFAULT_PREFIX = urls.DEFAULT_PREFIX
DEFAULT_SOCKET_TIMEOUT = urls.DEFAULT_SOCKET_TIMEOUT
DEFAULT_CONNECT_TIMEOUT = urls.DEFAULT_CONNECT_TIMEOUT
DEFAULT_HISTORY_LIMIT = 1000

#: Longest single BLPOP (seconds); a waiter renews its place in the queue this often (not
#: polling: a release hands the lock over at once). It also bounds how long after a waiter
#: died or froze a release may still hand it the lock (which then waits out its ttl).
MAX_BLOCK = 2.0
#: A waiter's queue registration outlives its BLPOP by this much (seconds), to cover the
#: round trip back to renew it.
REGISTER_SLACK = 1.0
#: Extra time a waiter blocks past the holder's PTTL before looking again (ms rounding).
EXPIRY_SLACK = 0.002
#: Highest fences this process saw, by name, passed as a floor (bounded).
SEEN_FENCES_MAX = 4096
#: Seconds a release tombstone outlives the retry deadline (socket timeouts of the retries).
TOMBSTONE_SLACK = 5.0
_DIGITS = frozenset(b"0123456789")


@dataclass(frozen=True, slots=True)
class AcquireReply:
    """What one acquire script call said."""

    fence: int | None  # the fence when the caller now holds the lock
    pttl: int = -2  # when busy: the holder's remaining ttl in ms (-1: no expiry)
    held_before: bool = False  # the caller already held it (a hand-over, or a retried call)
    legacy_refused: bool = False  # the server refused to read the old layout's fence key


def parse_acquire(result: Any) -> AcquireReply:
    """Parse the reply of ``_redis_scripts.ACQUIRE``."""
    if isinstance(result, int):
        return AcquireReply(None, result)
    if type(result) is bytes and result[-1] in _DIGITS:  # the common case, kept cheap
        return AcquireReply(int(result))
    reply = text(result)
    return AcquireReply(int(reply.rstrip("!=")), 0, reply.endswith("="), reply.endswith("!"))


def parse_hand_over(item: bytes | str) -> tuple[int, float]:
    """Parse a hand-over ``"<fence>|<µs from registration to hand-over>"``: (fence, seconds)."""
    fence, _, delay = text(item).partition("|")
    return int(fence), max(0, int(delay)) / 1e6


@dataclass(frozen=True, slots=True)
class Ticket:
    """Per-acquire-call state: who asks, for how long, and the queueing so far."""

    owner: str
    ttl: float
    queued: bool = False  # registered in the name's queue (abandon must leave it)
    previous: float | None = None  # monotonic send time of the last queueing attempt


class _Redis:
    """The two I/O calls of a wait, over one pair of clients (sync or ``redis.asyncio``).
    Used by :meth:`RedisCoordinator._wait_flow`; the sync one never suspends."""

    def __init__(self, client: Any, wait_client: Any) -> None:
        self.client = client
        self.wait_client = wait_client

    async def evalsha(self, script: Script, numkeys: int, *args: Any) -> Any:
        """``EVALSHA``, loading the script on ``NOSCRIPT`` (a restarted or new server)."""
        command = ("EVALSHA", script.sha, numkeys, *args)
        try:
            return await self._run(self.client.execute_command(*command))
        except NoScriptError:
            await self._run(self.client.script_load(script.script))
            return await self._run(self.client.execute_command(*command))

    async def blpop(self, key: str, timeout: float) -> Any:
        return await self._run(self.wait_client.blpop([key], timeout=timeout))

    async def _run(self, result: Any) -> Any:
        return result  # a sync client's reply

    async def close(self) -> None:
        """Close the clients (``redis.asyncio`` only)."""


class _AsyncRedis(_Redis):
    """The ``redis.asyncio`` flavour: awaits what the clients return."""

    async def _run(self, result: Any) -> Any:
        return await result

    async def close(self) -> None:
        await self.client.aclose()
        await self.wait_client.aclose()


class RedisCoordinator(ListingMixin, BaseCoordinator):
    """Locks, claims and run history in one Redis (standalone or behind Sentinel).

    Build it from a URL with :func:`coordlock.connect` (see :meth:`from_url`), or pass a ready
    ``redis.Redis`` client (e.g. ``fakeredis.FakeRedis``) as ``client``. ``wait_client`` serves
    the blocking ``BLPOP`` of waiters and must talk to the same server (default: ``client``
    itself). A single ``BLPOP`` blocks at most ``MAX_BLOCK`` seconds, or less when
    ``wait_client`` has a shorter socket timeout. ``async_clients(extra_timeout)`` builds
    ``redis.asyncio`` clients for the async API (from a URL: automatic; else the async API
    runs the sync hooks on worker threads).
    """

    backend_name: ClassVar[str] = "redis"
    wakes_waiters: ClassVar[bool] = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        wait_client: redis.Redis | None = None,
        prefix: str = DEFAULT_PREFIX,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        retry_deadline: float = 10.0,
        description: str = "",
        on_close: Callable[[], None] | None = None,
        legacy_fences: bool = True,
        async_clients: Callable[[float], redis.asyncio.Redis] | None = None,
    ) -> None:
        super().__init__(retry_deadline=retry_deadline)
        self.prefix = _check_prefix(prefix)
        if isinstance(history_limit, bool) or not isinstance(history_limit, int):
            raise ConfigurationError("history_limit must be an int")
        if history_limit < 1:
            raise ConfigurationError("history_limit must be >= 1")
        self.history_limit = history_limit
        self.client = client
        self.wait_client = wait_client if wait_client is not None else client
        self._max_block = MAX_BLOCK
        wait_timeout = self.wait_client.connection_pool.connection_kwargs.get("socket_timeout")
        if isinstance(wait_timeout, (int, float)) and wait_timeout < MAX_BLOCK + 1:
            self._max_block = max(0.01, min(MAX_BLOCK, wait_timeout * 0.8))
        self.description = description or repr(client)
        self._on_close = on_close
        self._async_clients = async_clients
        self._sync_redis = _Redis(self.client, self.wait_client)
        self._acquire_legacy: Script = client.register_script(lua.ACQUIRE)
        self._acquire_plain: Script = client.register_script(lua.ACQUIRE_NO_LEGACY)
        self._acquire_script = self._acquire_legacy if legacy_fences else self._acquire_plain
        self._release_script: Script = client.register_script(lua.RELEASE)
        self._abandon_script: Script = client.register_script(lua.ABANDON)
        self._force_script: Script = client.register_script(lua.FORCE_RELEASE)
        self._extend_script: Script = client.register_script(lua.EXTEND)
        self._claim_script: Script = client.register_script(lua.CLAIM_MANY)
        self._record_script: Script = client.register_script(lua.RECORD_RUN)
        self._history_script: Script = client.register_script(lua.HISTORY)
        self._seen: dict[str, int] = {}
        self.keys = KeyLayout(self.prefix)
        #: How long a "released by <owner>" tombstone lives (ms): a retried release (its first
        #: reply lost) arrives within the retry deadline, plus socket timeouts.
        self._tombstone_ms = ms(self.retry_deadline + TOMBSTONE_SLACK)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisCoordinator:
        """Connect to ``url``:

        * ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS),
          ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``;
        * ``redis+sentinel://[[user]:password@]host[:port][,host2[:port2]…]/master_name[/db]``
          (sentinel port defaults to 26379; the password is the master's, a sentinel password
          goes in ``?sentinel_password=``).

        Query options (or keyword arguments): ``prefix`` (key prefix, default
        ``"coordlock:"``), ``retry_deadline`` (seconds), ``history_limit`` (runs kept per job),
        ``legacy_fences`` (read the pre-0.2 fence keys as a floor, default true), and redis-py
        connection options (``socket_timeout`` – default 2 s, ``socket_connect_timeout`` –
        default 2 s, ``db``, ``client_name``, ``ssl_*``, …). Unknown options and a path that
        is not a database index raise :class:`ConfigurationError`.
        """
        spec = urls.parse(url, options)
        client = spec.sync(0.0)
        wait_client = spec.sync(MAX_BLOCK)

        def close() -> None:
            for c in (client, wait_client):
                _disconnect(c)

        return cls(
            client,
            wait_client=wait_client,
            description=spec.description,
            on_close=close,
            async_clients=spec.async_,
            **spec.options,
        )

    def __repr__(self) -> str:
        return f"<RedisCoordinator {self.description} prefix={self.prefix!r}>"

    # -- keys ----------------------------------------------------------------------------------

    def lock_key(self, name: str) -> str:
        """The key holding ``name``'s owner token (with a PX expiry while held)."""
        return self.keys.lock(name)

    def fence_key(self, name: str) -> str:
        """The key holding ``name``'s latest fence (kept forever, a few bytes)."""
        return self.keys.fence(name)

    def queue_key(self, name: str) -> str:
        """The queue of waiting owners (a sorted set, short-lived)."""
        return self.keys.queue(name)

    def wake_key(self, name: str, owner: str) -> str:
        """The list a release hands the lock over on, to the waiter ``owner`` (short-lived)."""
        return self.keys.wake(name, owner)

    def claim_key(self, key: str) -> str:
        """The key of a once-only claim (all claims share the hash tag ``{claims}``)."""
        return self.keys.claim(key)

    # -- pure pieces shared by the sync and the async hooks ------------------------------------

    def _acquire_call(
        self, name: str, owner: str, ttl: float, register: float = 0.0
    ) -> tuple[Script, int, str, str, int, int, int]:
        """(script, numkeys, KEYS + ARGV) of one acquire attempt; ``register`` > 0 queues
        ``owner`` for a hand-over for that many seconds if the lock is busy."""
        floor = self._seen.get(name, 0)
        script = self._acquire_script if floor == 0 else self._acquire_plain
        reg = ms(register) if register > 0 else 0
        return script, 1, self.keys.lock(name), owner, ms(ttl), floor, reg

    def _acquired(
        self, name: str, ticket: Any, result: Any, owner: str = "", ttl: float = 0.0
    ) -> Attempt:
        """The :class:`Attempt` for an acquire script reply; ``ticket`` is this call's state
        (a first attempt has none: one is made for ``owner``/``ttl`` only if the lock is busy,
        so the uncontended path builds nothing)."""
        if type(result) is bytes and result[-1] in _DIGITS:  # granted: the common case, cheap
            fence = int(result)
            seen = self._seen
            if fence > seen.get(name, 0):
                if name in seen or len(seen) < SEEN_FENCES_MAX:
                    seen[name] = fence
                else:
                    self._saw(name, fence)
            return Attempt(fence)
        if not isinstance(ticket, Ticket):
            ticket = Ticket(owner, ttl)
        reply = parse_acquire(result)
        if reply.legacy_refused:  # the old layout's fence key is out of bounds (ACL)
            self._acquire_script = self._acquire_plain
        if reply.fence is None:
            retry_in = reply.pttl / 1000 if reply.pttl >= 0 else None
            return Attempt.busy(retry_in=retry_in, ticket=ticket)
        self._saw(name, reply.fence)
        # Held already: handed over after an earlier registration, so after that one was sent
        # (None: the base's send time of this call, right for a retried request).
        started = ticket.previous if reply.held_before else None
        return Attempt.granted(reply.fence, started=started, ticket=ticket)

    def _saw(self, name: str, fence: int) -> None:
        """Remember ``fence`` as this client's floor for ``name`` (bounded)."""
        seen = self._seen
        if fence > seen.get(name, 0):
            if len(seen) >= SEEN_FENCES_MAX and name not in seen:
                # Evict the oldest entry (another thread may be doing the same).
                with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                    seen.pop(next(iter(seen)), None)
            seen[name] = fence

    def _release_call(self, name: str, owner: str) -> tuple[Script, int, str, str, int]:
        return self._release_script, 1, self.keys.lock(name), owner, self._tombstone_ms

    def _claim_call(self, keys: Sequence[str], hold: float, token: str) -> list[Any]:
        return [self._claim_script, len(keys), *map(self.keys.claim, keys), ms(hold), token]

    async def _wait_flow(self, io: _Redis, name: str, ticket: Ticket, timeout: float) -> Attempt:
        """Queue for ``name`` (or take it if free), then block until a release hands it over,
        the holder's key expires, or ``timeout``/``MAX_BLOCK`` passes."""
        block = min(max(timeout, 0.001), self._max_block)
        sent = time.monotonic()
        call = self._acquire_call(name, ticket.owner, ticket.ttl, block + REGISTER_SLACK)
        result = await io.evalsha(*call)
        attempt = self._acquired(name, ticket, result)
        queued = replace(ticket, queued=True, previous=sent)
        if attempt.fence is not None:
            return attempt._replace(ticket=queued)
        if attempt.retry_in is not None:  # wake up when the holder's key expires, at the latest
            block = min(block, attempt.retry_in + EXPIRY_SLACK)
        item = await io.blpop(self.keys.wake(name, ticket.owner), round(max(block, 0.001), 3))
        if item is None:
            return Attempt.busy(ticket=queued)
        fence, delay = parse_hand_over(item[1])
        self._saw(name, fence)
        # The hand-over happened `delay` s (server clock) after the registration, which the
        # server ran after `sent`: a lower bound of the lease's start.
        return Attempt.granted(fence, started=sent + delay, ticket=queued)

    # -- sync hooks ------------------------------------------------------------------------------

    def _evalsha(self, script: Script, numkeys: int, *args: Any) -> Any:
        """``EVALSHA``, loading the script on ``NOSCRIPT`` – without ``Script.__call__``'s
        per-call overhead, which costs several per cent of the uncontended pair rate."""
        execute: Callable[..., Any] = self.client.execute_command
        try:
            return execute("EVALSHA", script.sha, numkeys, *args)
        except NoScriptError:
            self.client.script_load(script.script)
            return execute("EVALSHA", script.sha, numkeys, *args)

    def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        result = self._evalsha(*self._acquire_call(name, owner, ttl))
        return self._acquired(name, ticket, result, owner, ttl)

    def _wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        return drive(self._wait_flow(self._sync_redis, name, ticket, timeout))

    def _release(self, name: str, owner: str) -> bool:
        return bool(self._evalsha(*self._release_call(name, owner)))

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        return bool(self._evalsha(self._extend_script, 1, self.keys.lock(name), owner, ms(ttl)))

    def _abandon(self, name: str, owner: str, ticket: Any) -> None:
        if isinstance(ticket, Ticket) and ticket.queued:
            self._evalsha(self._abandon_script, 1, self.keys.lock(name), owner)

    def _force_release(self, name: str) -> bool:
        return bool(self._evalsha(self._force_script, 1, self.keys.lock(name)))

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        # One token for the call and its retries (the base would retry with a new one).
        call = self._claim_call(keys, hold, _token())
        won = self._policy.call(lambda: self._evalsha(*call), "redis claim")
        return {keys[int(i) - 1] for i in won}

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them (the
        parent keeps using them); new ones are made on first use."""
        for client in {id(c): c for c in (self.client, self.wait_client)}.values():
            with contextlib.suppress(Exception):
                client.connection_pool.reset()

    def _close(self) -> None:
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:  # pragma: no cover - best effort
                log.debug("error while closing Redis connections", exc_info=True)

    # -- async hooks (redis.asyncio; the same pieces, only the I/O line differs) ---------------

    def _aio(self) -> _Redis | None:
        """This event loop's async clients (None: no factory, use worker threads)."""
        make = self._async_clients
        if make is None:
            return None
        return self._loop_local("redis", lambda: _AsyncRedis(make(0.0), make(self._max_block)))

    async def _async_try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
        io = self._aio()
        if io is None:
            return await super()._async_try_acquire(name, owner, ttl, ticket)
        result = await io.evalsha(*self._acquire_call(name, owner, ttl))
        return self._acquired(name, ticket, result, owner, ttl)

    async def _async_wait(self, name: str, ticket: Any, timeout: float) -> Attempt | None:
        io = self._aio()
        if io is None:
            return await self._in_thread(self._wait, name, ticket, timeout)
        return await self._wait_flow(io, name, ticket, timeout)

    async def _async_release(self, name: str, owner: str) -> bool:
        io = self._aio()
        if io is None:
            return await super()._async_release(name, owner)
        return bool(await io.evalsha(*self._release_call(name, owner)))

    async def _async_extend(self, name: str, owner: str, ttl: float) -> bool:
        io = self._aio()
        if io is None:
            return await super()._async_extend(name, owner, ttl)
        return bool(await io.evalsha(self._extend_script, 1, self.keys.lock(name), owner, ms(ttl)))

    async def _async_abandon(self, name: str, owner: str, ticket: Any) -> None:
        io = self._aio()
        if io is None:
            return await super()._async_abandon(name, owner, ticket)
        if isinstance(ticket, Ticket) and ticket.queued:
            await io.evalsha(self._abandon_script, 1, self.keys.lock(name), owner)
        return None

    async def _async_force_release(self, name: str) -> bool:
        io = self._aio()
        if io is None:
            return await super()._async_force_release(name)
        return bool(await io.evalsha(self._force_script, 1, self.keys.lock(name)))

    async def _async_claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        io = self._aio()
        if io is None:
            return await super()._async_claim_many(keys, hold)
        call = self._claim_call(keys, hold, _token())
        won = await self._policy.acall(lambda: io.evalsha(*call), "redis claim")
        return {keys[int(i) - 1] for i in won}

    async def _async_close(self, state: dict[str, Any]) -> None:
        io = state.get("redis")
        if isinstance(io, _Redis):
            await io.close()

    # -- operator's view -------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """Backend name, Redis version (``HELLO``, else ``INFO server``) and server clock."""
        self._check_open()
        version = self._ask(self._version, "server info")
        before = time.time()
        seconds, micros = self._ask(self.client.time, "time")
        after = time.time()
        return ServerInfo("redis", version, seconds + micros / 1e6, (before + after) / 2)

    def _version(self) -> str | None:
        for command in (("HELLO",), ("INFO", "server")):
            try:
                reply = self.client.execute_command(*command)  # type: ignore[no-untyped-call]
            except RedisError:  # not allowed to this ACL user, or too old a server
                continue
            version = _find_version(reply)
            if version:
                return version
        return None


# -- helpers ---------------------------------------------------------------------------------


def _token() -> str:
    import os

    return os.urandom(16).hex()


def _find_version(reply: Any) -> str | None:
    """The server version in a ``HELLO`` reply (dict or flat list) or ``INFO server``."""
    if isinstance(reply, dict):
        for key, value in reply.items():
            if text(key) in ("version", "redis_version") and value:
                return text(value)
        return None
    if isinstance(reply, list):
        for key, value in zip(reply[::2], reply[1::2], strict=False):
            if isinstance(key, (bytes, str)) and text(key) == "version":
                return text(value)
        return None
    if isinstance(reply, (bytes, str)):
        for line in text(reply).splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
    return None


def _disconnect(client: redis.Redis) -> None:
    pool: Any = client.connection_pool
    pool.disconnect()
    manager = getattr(pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.connection_pool.disconnect()


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise ConfigurationError(f"prefix must be a str, not {type(prefix).__name__}")
    if not prefix:
        raise ConfigurationError(f"prefix must not be empty (the default is {DEFAULT_PREFIX!r})")
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(f"prefix must not contain '{{' or '}}': {prefix!r}")
    return prefix
