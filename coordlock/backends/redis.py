"""``redis://``, ``rediss://``, ``unix://`` and ``redis+sentinel://`` – locks in Redis.

* **acquire**: one ``EVALSHA`` running ``SET lock owner NX PX ttl`` and, when it wins, bumping
  the fence to ``max(stored + 1, server TIME in µs, client floor + 1)``, so fences keep
  increasing even after Redis restarts without persistence (see docs/backends/redis.md for
  what that does and does not promise). A retried call that finds ``owner`` already holding
  the lock returns the same fence.
* **release**: one ``EVALSHA``: compare-and-delete that also pushes a token onto the name's wait
  list, which wakes one waiter blocked in ``BLPOP`` at once.
* **extend**: compare-and-``PEXPIRE``.
* **waiting**: ``BLPOP`` on the wait list, bounded by the holder's remaining PTTL (so a dead
  holder's expiry is noticed) and by the caller's deadline; no polling. Each waiting thread
  blocks on a connection of its own (a second pool), never on the command pool.
* **keys**: every key starts with the prefix (ACL users confined to ``~<prefix>*`` work);
  the keys of a name share the hash tag ``{<name>}``; claims and run history use keys that
  share one fixed hash tag each, so every script touches a single Cluster slot (see
  ``_redis_keys``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .._base import BaseCoordinator
from .._errors import ConfigurationError
from .._protocol import LockInfo, RunRecord
from .._registry import missing_driver, redact
from .._retry import call_with_retry
from . import _redis_scripts as lua
from ._redis_keys import KeyLayout, ms

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.commands.core import Script
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
    from redis.exceptions import (
        AuthenticationError,
        AuthorizationError,
        BusyLoadingError,
        NoPermissionError,
        NoScriptError,
        ReadOnlyError,
        ResponseError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
    from redis.sentinel import Sentinel
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise missing_driver("redis", "redis", "redis") from exc

log = logging.getLogger("coordlock")
T = TypeVar("T")

DEFAULT_PREFIX = "coordlock:"
DEFAULT_SOCKET_TIMEOUT = 2.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_HISTORY_LIMIT = 1000
DEFAULT_SENTINEL_PORT = 26379

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
SCAN_COUNT = 500
#: Seconds a release tombstone outlives the retry deadline (socket timeouts of the retries).
TOMBSTONE_SLACK = 5.0

#: Options coordlock itself reads from the URL query (or from_url keyword arguments).
OWN_OPTIONS = frozenset({"prefix", "retry_deadline", "history_limit", "legacy_fences"})
#: redis-py connection options accepted in the URL query of redis://, rediss://, unix://.
REDIS_URL_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {
    "client_name",
    "username",
    "password",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_ciphers",
}
#: Options of redis+sentinel:// URLs.
SENTINEL_URL_OPTIONS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "client_name",
        "sentinel_username",
        "sentinel_password",
        "max_connections",
    }
)


def _no_retry() -> Retry:
    """redis-py must not retry on its own: coordlock's bounded tenacity retry does that."""
    return Retry(NoBackoff(), 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisCoordinator(BaseCoordinator):
    """Locks, claims and run history in one Redis (standalone or behind Sentinel).

    Build it from a URL with :func:`coordlock.connect` (see :meth:`from_url`), or pass a ready
    ``redis.Redis`` client (e.g. ``fakeredis.FakeRedis``) as ``client``. ``wait_client`` serves
    the blocking ``BLPOP`` of waiters and must talk to the same server (default: ``client``
    itself). A single ``BLPOP`` blocks at most ``MAX_BLOCK`` seconds, or less when
    ``wait_client`` has a shorter socket timeout.
    """

    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (
        RedisConnectionError,
        RedisTimeoutError,
        BusyLoadingError,
        ReadOnlyError,
        TryAgainError,
    )

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
        self._acquire_script: Script = client.register_script(
            lua.ACQUIRE if legacy_fences else lua.ACQUIRE_NO_LEGACY
        )
        self._acquire_plain: Script = client.register_script(lua.ACQUIRE_NO_LEGACY)
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
        self._run_prefix = self.keys.run_prefix
        self._job_index_prefix = self.keys.job_index_prefix
        self._all_index = self.keys.all_index

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
        and redis-py connection options (``socket_timeout`` – default 2 s,
        ``socket_connect_timeout`` – default 2 s, ``db``, ``client_name``, ``ssl_*``, …).
        Unknown options raise :class:`ConfigurationError`.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix", "redis+sentinel"):
            raise ConfigurationError(f"not a Redis URL: {redact(url)!r}")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        allowed = SENTINEL_URL_OPTIONS if scheme == "redis+sentinel" else REDIS_URL_OPTIONS
        unknown = sorted((set(query) | set(options)) - allowed - OWN_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for {scheme}:// URL {redact(url)!r}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(allowed | OWN_OPTIONS))}"
            )
        merged: dict[str, Any] = {**query, **options}
        own = {k: merged.pop(k) for k in list(merged) if k in OWN_OPTIONS}
        prefix = own.get("prefix", DEFAULT_PREFIX)
        kwargs: dict[str, Any] = {"prefix": prefix}
        if "retry_deadline" in own:
            kwargs["retry_deadline"] = _number(own["retry_deadline"], "retry_deadline", float)
        if "history_limit" in own:
            kwargs["history_limit"] = _number(own["history_limit"], "history_limit", int)
        if "legacy_fences" in own:
            kwargs["legacy_fences"] = _flag(own["legacy_fences"], "legacy_fences")
        socket_timeout = _number(
            merged.pop("socket_timeout", DEFAULT_SOCKET_TIMEOUT), "socket_timeout", float
        )
        connect_timeout = _number(
            merged.pop("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            "socket_connect_timeout",
            float,
        )
        if scheme == "redis+sentinel":
            return cls._from_sentinel_url(url, merged, socket_timeout, connect_timeout, kwargs)
        # Let redis-py parse the URL (without coordlock's own options and the timeouts).
        rest = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in merged]
        # (urlunsplit would turn unix:///path into unix:/path, which redis-py refuses.)
        bare = url.split("#", 1)[0].split("?", 1)[0]
        try:
            conn_kwargs: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
                f"{bare}?{urlencode(rest)}" if rest else bare
            )
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {redact(url)!r}: {exc}") from exc
        if scheme in ("redis", "rediss"):
            _check_db_path(parts.path, url)
        for key, value in merged.items():
            if key not in query:  # keyword arguments win over the query
                conn_kwargs[key] = value
        if "db" in conn_kwargs:
            conn_kwargs["db"] = _number(conn_kwargs["db"], "db", int)
            if conn_kwargs["db"] < 0:
                raise ConfigurationError(f"bad database index {conn_kwargs['db']} (must be >= 0)")
        conn_kwargs["retry"] = _no_retry()
        if conn_kwargs.get("connection_class") is not redis.UnixDomainSocketConnection:
            conn_kwargs.setdefault("socket_keepalive", True)
        pool = redis.ConnectionPool(
            socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout, **conn_kwargs
        )
        wait_pool = redis.ConnectionPool(
            socket_timeout=socket_timeout + MAX_BLOCK,
            socket_connect_timeout=connect_timeout,
            **conn_kwargs,
        )
        client = redis.Redis(connection_pool=pool)
        wait_client = redis.Redis(connection_pool=wait_pool)

        def close() -> None:
            pool.disconnect()
            wait_pool.disconnect()

        return cls(
            client, wait_client=wait_client, description=redact(url), on_close=close, **kwargs
        )

    @classmethod
    def _from_sentinel_url(
        cls,
        url: str,
        options: dict[str, Any],
        socket_timeout: float,
        connect_timeout: float,
        kwargs: dict[str, Any],
    ) -> RedisCoordinator:
        parts = urlsplit(url)
        hostlist = parts.netloc.rpartition("@")[2]
        sentinels: list[tuple[str, int]] = []
        for item in hostlist.split(","):
            if not item.strip():
                continue
            try:
                host = urlsplit("//" + item.strip())
                port = host.port or DEFAULT_SENTINEL_PORT
            except ValueError as exc:
                raise ConfigurationError(
                    f"bad sentinel address {item!r} in {redact(url)!r}"
                ) from exc
            if not host.hostname:
                raise ConfigurationError(f"bad sentinel address {item!r} in {redact(url)!r}")
            sentinels.append((host.hostname, port))
        segments = [s for s in parts.path.split("/") if s]
        if not sentinels or not segments or len(segments) > 2:
            raise ConfigurationError(
                f"bad sentinel URL {redact(url)!r}: expected "
                "redis+sentinel://host:port[,host2:port2]/master_name[/db]"
            )
        service = segments[0]
        db = _number(options.pop("db", segments[1] if len(segments) > 1 else 0), "db", int)
        common: dict[str, Any] = {"retry": _no_retry(), "socket_connect_timeout": connect_timeout}
        sentinel_kwargs: dict[str, Any] = {**common, "socket_timeout": socket_timeout}
        if "sentinel_password" in options:
            sentinel_kwargs["password"] = options.pop("sentinel_password")
        if "sentinel_username" in options:
            sentinel_kwargs["username"] = options.pop("sentinel_username")
        master_kwargs: dict[str, Any] = {**common, "db": db, **options}
        if parts.username:
            master_kwargs["username"] = parts.username
        if parts.password:
            master_kwargs["password"] = parts.password
        if "max_connections" in master_kwargs:
            master_kwargs["max_connections"] = _number(
                master_kwargs["max_connections"], "max_connections", int
            )
        sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            service, socket_timeout=socket_timeout, **master_kwargs
        )
        wait_client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            service, socket_timeout=socket_timeout + MAX_BLOCK, **master_kwargs
        )

        def close() -> None:
            client.connection_pool.disconnect()
            wait_client.connection_pool.disconnect()
            for s in sentinel.sentinels:
                s.connection_pool.disconnect()

        return cls(
            client, wait_client=wait_client, description=redact(url), on_close=close, **kwargs
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

    # -- calls -----------------------------------------------------------------------------------

    def _evalsha(self, script: Script, numkeys: int, *keys_and_args: str | int) -> Any:
        """``EVALSHA`` of a registered script, loading it on ``NOSCRIPT`` (a restarted or new
        server), as ``Script.__call__`` does – minus its per-call overhead, which costs several
        per cent of the uncontended acquire/release rate."""
        execute: Callable[..., Any] = self.client.execute_command
        try:
            return execute("EVALSHA", script.sha, numkeys, *keys_and_args)
        except NoScriptError:
            script.sha = self.client.script_load(script.script)
            return execute("EVALSHA", script.sha, numkeys, *keys_and_args)

    def _call(self, fn: Callable[[], T], what: str, *, deadline: float | None = None) -> T:
        """Run ``fn`` once; only when it fails transiently enter the bounded retry loop
        (``deadline`` seconds, default ``retry_deadline``). Permanent errors (authentication,
        ACL, database index, unknown command) raise :class:`ConfigurationError` at once."""

        try:
            return fn()  # the common case: no wrapper built, nothing to catch
        except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
            self._raise_if_permanent(exc, what)
            if not isinstance(exc, self.transient_errors):
                raise
            self._check_open()  # closed under our feet (e.g. a waiter in BLPOP): stop here
            log.warning("%s: %s; retrying", what, exc)

        def guarded() -> T:
            try:
                return fn()
            except (RedisConnectionError, ResponseError) as exc:
                self._raise_if_permanent(exc, what)
                raise

        return call_with_retry(
            guarded,
            transient=self.transient_errors,
            deadline=self.retry_deadline if deadline is None else deadline,
            what=what,
        )

    def _raise_if_permanent(self, exc: BaseException, what: str) -> None:
        problem = permanent_problem(exc)
        if problem is not None:
            message = f"{what} on {self.description}: {problem} ({exc})"
            raise ConfigurationError(message) from exc

    # -- hooks ---------------------------------------------------------------------------------

    def _attempt(self, name: str, owner: str, ttl: float, register: float = 0.0) -> AcquireReply:
        """One acquire script call; ``register`` > 0 queues ``owner`` for a hand-over for that
        many seconds if the lock is busy."""
        key = self.keys.lock(name)
        floor = self._seen.get(name, 0)
        script = self._acquire_script if floor == 0 else self._acquire_plain
        args = (key, owner, ms(ttl), floor, ms(register) if register > 0 else 0)
        reply = parse_acquire(self._call(lambda: self._evalsha(script, 1, *args), "redis acquire"))
        if reply.legacy_refused:  # the old layout's fence key is out of bounds (ACL)
            self._acquire_script = self._acquire_plain
        if reply.fence is not None:
            self._saw(name, reply.fence)
        return reply

    def _saw(self, name: str, fence: int) -> None:
        """Remember ``fence`` as this client's floor for ``name`` (bounded)."""
        seen = self._seen
        if fence > seen.get(name, 0):
            if len(seen) >= SEEN_FENCES_MAX and name not in seen:
                # Evict the oldest entry (another thread may be doing the same).
                with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                    seen.pop(next(iter(seen)), None)
            seen[name] = fence

    def _try_acquire(self, name: str, owner: str, ttl: float) -> int | None:
        return self._attempt(name, owner, ttl).fence

    def _release(self, name: str, owner: str) -> bool:
        args = (self.keys.lock(name), owner, self._tombstone_ms)
        script = self._release_script
        return bool(self._call(lambda: self._evalsha(script, 1, *args), "redis release"))

    def _abandon(self, name: str, owner: str) -> None:
        """Leave the queue of ``name``; if a hand-over made ``owner`` the holder meanwhile,
        pass the lock on. Best effort: a failure only delays others (registration expiry)."""
        args = (self.keys.lock(name), owner)
        script = self._abandon_script
        try:
            self._call(lambda: self._evalsha(script, 1, *args), "redis abandon", deadline=1.0)
        except Exception:
            log.debug("could not leave the queue of %r", name, exc_info=True)

    def _force_release(self, name: str) -> bool:
        """Free ``name`` whoever holds it (hand it to the next waiter); fences keep growing."""
        script = self._force_script
        key = self.keys.lock(name)
        return bool(self._call(lambda: self._evalsha(script, 1, key), "redis force release"))

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        args = (self.keys.lock(name), owner, ms(ttl))
        script = self._extend_script
        # Retry only briefly: the renewal thread serves every lease of this coordinator and
        # retries on its own (marking the lease at risk); a renewal later than a third of the
        # ttl is of no use anyway.
        deadline = min(self.retry_deadline, ttl / 3)
        return bool(
            self._call(lambda: self._evalsha(script, 1, *args), "redis extend", deadline=deadline)
        )

    def _claim_many(self, keys: Sequence[str], hold: float) -> set[str]:
        script = self._claim_script
        args = [self.claim_key(k) for k in keys] + [str(ms(hold)), uuid.uuid4().hex]
        won = self._call(lambda: self._evalsha(script, len(keys), *args), "redis claim")
        return {keys[int(i) - 1] for i in cast("list[int]", won)}

    def _block(self, name: str, owner: str, timeout: float) -> tuple[int, float] | None:
        """BLPOP ``owner``'s hand-over list for up to ``timeout`` s (at least 1 ms): (fence,
        seconds from the registration to the hand-over, server-measured), or None."""
        # BLPOP takes a decimal timeout since Redis 6.0; 0 would mean "forever", so >= 1 ms.
        timeout = round(min(max(timeout, 0.001), self._max_block), 3)
        client = self.wait_client
        key = self.keys.wake(name, owner)
        reply = self._call(lambda: client.blpop([key], timeout=timeout), "redis wait")
        return None if reply is None else parse_hand_over(reply[1])

    def _acquire_waiting(
        self, name: str, owner: str, ttl: float, deadline: float
    ) -> tuple[int, float] | None:
        """Queue for ``name`` and block until a release hands it over (one BLPOP reply, no
        second round trip), the holder's key expires, or ``deadline`` passes."""
        previous: float | None = None  # when the previous queueing attempt was sent
        queued = False
        try:
            while True:
                self._check_open()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if queued:
                        self._abandon(name, owner)
                    return None
                sent = time.monotonic()
                queued = True
                block = min(remaining, self._max_block)
                reply = self._attempt(name, owner, ttl, register=block + REGISTER_SLACK)
                if reply.fence is not None:
                    # Already ours: handed over after an earlier registration (so after that
                    # one was sent), or taken by this very call (a retried request).
                    return reply.fence, (previous if reply.held_before and previous else sent)
                if reply.pttl >= 0:  # wake up when the holder's key expires, at the latest
                    block = min(block, reply.pttl / 1000 + EXPIRY_SLACK)
                handed = self._block(name, owner, block)
                if handed is not None:
                    fence, delay = handed
                    self._saw(name, fence)
                    # The hand-over happened `delay` s (server clock) after the registration,
                    # which the server ran after `sent`: a lower bound of the lease's start.
                    return fence, sent + delay
                previous = sent
        except BaseException:
            if queued:  # a hand-over may have made us the holder: pass it on
                self._abandon(name, owner)
            raise

    def _close(self) -> None:
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:  # pragma: no cover - best effort
                log.debug("error while closing Redis connections", exc_info=True)

    # -- optional protocols ----------------------------------------------------------------------

    def _scan_lock_keys(self) -> Iterator[list[bytes | str]]:
        pattern = self.keys.lock_pattern()
        cursor = 0

        def page() -> tuple[int, list[bytes | str]]:
            reply = self.client.scan(cursor, match=pattern, count=SCAN_COUNT)
            return int(reply[0]), list(reply[1])

        while True:
            cursor, keys = self._call(page, "redis scan")
            if keys:
                yield keys
            if cursor == 0:
                return

    def locks(self) -> list[LockInfo]:
        """Every lock currently held under this prefix (``SCAN``; not a snapshot)."""
        self._check_open()
        found: list[LockInfo] = []
        for batch in self._scan_lock_keys():
            names = []
            for key in batch:
                name = self.keys.name_of_lock(_text(key))
                if name is not None:
                    names.append(name)

            def query(names: list[str] = names) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.get(self.lock_key(name))
                    pipe.pttl(self.lock_key(name))
                    pipe.get(self.fence_key(name))
                replies: list[Any] = pipe.execute()
                return replies

            replies = self._call(query, "redis locks")
            now = time.time()
            for i, name in enumerate(names):
                owner, pttl, fence = replies[3 * i : 3 * i + 3]
                if owner is None:
                    continue
                expires = now + pttl / 1000 if isinstance(pttl, int) and pttl >= 0 else None
                found.append(LockInfo(name, _text(owner), int(fence or 0), expires))
        found.sort(key=lambda info: info.name)
        return found

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run``; keeps the newest ``history_limit`` runs of each job."""
        if not isinstance(run, RunRecord):
            raise TypeError(f"expected a RunRecord, not {type(run).__name__}")
        self._check_open()
        fields: list[str] = [
            "run_id", run.run_id, "job", run.job, "tick", run.tick, "instance", run.instance,
            "started", repr(float(run.started)), "status", run.status,
        ]  # fmt: skip
        if run.finished is not None:
            fields += ["finished", repr(float(run.finished))]
        if run.error is not None:
            fields += ["error", run.error]
        keys = [self._run_prefix + run.run_id, self._job_index_prefix + run.job, self._all_index]
        args: list[str | int] = [
            run.run_id,
            repr(float(run.started)),
            self.history_limit,
            self._run_prefix,
            *fields,
        ]
        script = self._record_script
        self._call(lambda: script(keys=keys, args=args), "redis record_run")

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first (of ``job``, or of every job), at most ``limit``."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError("limit must be an int")
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._check_open()
        index = self._all_index if job is None else self._job_index_prefix + job
        script = self._history_script
        args: list[str | int] = [limit, self._run_prefix]
        rows = self._call(lambda: script(keys=[index], args=args), "redis history")
        return [_run_from_hash(row) for row in cast("list[list[bytes]]", rows)]


# -- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AcquireReply:
    """What one acquire script call said."""

    fence: int | None  # the fence when the caller now holds the lock
    pttl: int = -2  # when busy: the holder's remaining ttl in ms (-1: no expiry, -2: gone)
    held_before: bool = False  # the caller already held it (a hand-over, or a retried call)
    legacy_refused: bool = False  # the server refused to read the old layout's fence key


def parse_acquire(result: Any) -> AcquireReply:
    """Parse the reply of ``_redis_scripts.ACQUIRE``."""
    if isinstance(result, int):
        return AcquireReply(None, result)
    if type(result) is bytes and result[-1] in _DIGITS:  # the common case, kept cheap
        return AcquireReply(int(result))
    text = _text(result)
    refused = text.endswith("!")
    held = text.endswith("=")
    return AcquireReply(int(text.rstrip("!=")), 0, held, refused)


_DIGITS = frozenset(b"0123456789")


def parse_hand_over(item: bytes | str) -> tuple[int, float]:
    """Parse a hand-over ``"<fence>|<µs from registration to hand-over>"``: (fence, seconds)."""
    fence, _, delay = _text(item).partition("|")
    return int(fence), max(0, int(delay)) / 1e6


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise ConfigurationError(f"prefix must be a str, not {type(prefix).__name__}")
    if not prefix:
        raise ConfigurationError(f"prefix must not be empty (the default is {DEFAULT_PREFIX!r})")
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(f"prefix must not contain '{{' or '}}': {prefix!r}")
    return prefix


def _check_db_path(path: str, url: str) -> None:
    """The path of a redis:// URL is empty or ``/<database index>``; redis-py would silently
    use database 0 for anything else (``/abc``, ``/1/2``)."""
    text = unquote(path).strip("/")
    if text and not (text.isascii() and text.isdigit()):
        raise ConfigurationError(
            f"bad Redis URL {redact(url)!r}: the path must be a database index "
            f"(redis://host:port/0), not {path!r}"
        )


def _number(value: object, what: str, kind: type[float] | type[int]) -> Any:
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        return kind(str(value))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"option {what} must be a number, got {value!r}") from exc


#: Server replies that no retry can fix (matched in the error text), with what they mean.
PERMANENT_REPLIES = (
    ("NOPERM", "the Redis user lacks a permission (ACL); see the ACL line in the docs"),
    ("can't run this command", "the Redis user lacks a permission (ACL); see the docs"),
    ("DB index is out of range", "database index out of range (server setting `databases`)"),
    ("invalid DB index", "invalid database index"),
    ("unknown command", "a command coordlock needs is disabled or renamed on the server"),
    ("NOAUTH", "the server requires a password"),
    ("WRONGPASS", "authentication failed: wrong user name or password"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the server's certificate is not trusted (ssl_ca_certs?)"),
    ("certificate required", "TLS: the server wants a client certificate (ssl_certfile/keyfile)"),
    ("WRONG_VERSION_NUMBER", "TLS: the server does not speak TLS on this port (rediss://?)"),
    ("alert unknown ca", "TLS: the server does not trust the client certificate"),
    ("alert bad certificate", "TLS: the server refused the client certificate"),
)


def permanent_problem(exc: BaseException) -> str | None:
    """What is wrong if ``exc`` is a permanent (configuration) error of redis-py, else None."""
    text = str(exc)
    for needle, meaning in PERMANENT_REPLIES:
        if needle.lower() in text.lower():
            return meaning
    if isinstance(exc, NoPermissionError):
        return PERMANENT_REPLIES[0][1]
    if isinstance(exc, AuthenticationError):
        return "authentication failed: wrong user name or password"
    if isinstance(exc, AuthorizationError):
        return "not authorized"
    return None


def _flag(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"option {what} must be true or false, got {value!r}")


def _run_from_hash(flat: Sequence[bytes | str]) -> RunRecord:
    data: Mapping[str, str] = {
        _text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)
    }
    finished = data.get("finished")
    return RunRecord(
        run_id=data.get("run_id", ""),
        job=data.get("job", ""),
        tick=data.get("tick", ""),
        instance=data.get("instance", ""),
        started=float(data.get("started", "0")),
        finished=float(finished) if finished is not None else None,
        status=data.get("status", "running"),
        error=data.get("error"),
    )
