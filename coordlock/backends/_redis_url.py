"""Redis URLs → how to build redis-py clients (sync and ``redis.asyncio``) for them.

Pure parsing plus client factories; no connection is opened here (redis-py connects lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from .._errors import ConfigurationError
from .._registry import redact

DEFAULT_PREFIX = "coordlock:"
DEFAULT_SOCKET_TIMEOUT = 2.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_SENTINEL_PORT = 26379

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

#: socket timeout (s) → a client with that timeout.
SyncFactory = Callable[[float], "redis.Redis"]
AsyncFactory = Callable[[float], "redis.asyncio.Redis"]


@dataclass
class Clients:
    """How to build clients for one URL. ``sync(extra)``/``async_(extra)`` return a client whose
    socket timeout is ``socket_timeout + extra`` (waiters block ``extra`` more seconds)."""

    description: str
    socket_timeout: float
    sync: SyncFactory
    async_: AsyncFactory
    options: dict[str, Any] = field(default_factory=dict)  # for the coordinator itself


def _driver_info() -> dict[str, Any]:
    """``CLIENT SETINFO`` names redis-py and coordlock. Built once: redis-py >= 7 would
    otherwise read its package metadata from disk for every new connection — blocking file
    I/O on the event loop each time a waiter opens its ``BLPOP`` connection."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py < 7: its default is computed once at import
        return {}
    from .. import __version__

    info = DriverInfo(lib_version=redis.__version__).add_upstream_driver("coordlock", __version__)
    return {"driver_info": info}


DRIVER_INFO = _driver_info()


def no_retry() -> Retry:
    """redis-py must not retry on its own: coordlock's bounded retry does that."""
    return Retry(NoBackoff(), 0)


def parse(url: str, options: dict[str, Any]) -> Clients:
    """Check ``url`` and ``options``; unknown options and bad values raise ConfigurationError."""
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
    mine: dict[str, Any] = {"prefix": own.get("prefix", DEFAULT_PREFIX)}
    if "retry_deadline" in own:
        mine["retry_deadline"] = number(own["retry_deadline"], "retry_deadline", float)
    if "history_limit" in own:
        mine["history_limit"] = number(own["history_limit"], "history_limit", int)
    if "legacy_fences" in own:
        mine["legacy_fences"] = flag(own["legacy_fences"], "legacy_fences")
    timeout = number(merged.pop("socket_timeout", DEFAULT_SOCKET_TIMEOUT), "socket_timeout", float)
    connect = number(
        merged.pop("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        "socket_connect_timeout",
        float,
    )
    if scheme == "redis+sentinel":
        clients = _sentinel(url, merged, timeout, connect)
    else:
        clients = _direct(url, query, merged, timeout, connect)
    clients.options = mine
    return clients


def _direct(
    url: str, query: dict[str, str], merged: dict[str, Any], timeout: float, connect: float
) -> Clients:
    parts = urlsplit(url)
    # Let redis-py parse the URL (without coordlock's own options and the timeouts).
    rest = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in merged]
    # (urlunsplit would turn unix:///path into unix:/path, which redis-py refuses.)
    bare = url.split("#", 1)[0].split("?", 1)[0]
    driver_url = f"{bare}?{urlencode(rest)}" if rest else bare
    try:
        sync_kwargs: dict[str, Any] = dict(parse_url(driver_url))  # type: ignore[no-untyped-call]
        async_kwargs: dict[str, Any] = dict(redis.asyncio.connection.parse_url(driver_url))
    except ValueError as exc:
        raise ConfigurationError(f"bad Redis URL {redact(url)!r}: {exc}") from exc
    if parts.scheme.lower() in ("redis", "rediss"):
        check_db_path(parts.path, url)
    overrides = {k: v for k, v in merged.items() if k not in query}  # keywords win
    if "db" in overrides or "db" in sync_kwargs:
        db = number(overrides.get("db", sync_kwargs.get("db", 0)), "db", int)
        if db < 0:
            raise ConfigurationError(f"bad database index {db} (must be >= 0)")
        overrides["db"] = db
    unix = sync_kwargs.get("connection_class") is redis.UnixDomainSocketConnection
    common = {
        "socket_connect_timeout": connect,
        **DRIVER_INFO,
        **({} if unix else {"socket_keepalive": True}),
    }

    def make(extra: float) -> redis.Redis:
        pool = redis.ConnectionPool(
            **{**sync_kwargs, **common, **overrides},
            socket_timeout=timeout + extra,
            retry=no_retry(),
        )
        return redis.Redis(connection_pool=pool)

    def make_async(extra: float) -> redis.asyncio.Redis:
        pool = redis.asyncio.ConnectionPool(
            **{**async_kwargs, **common, **overrides},
            socket_timeout=timeout + extra,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        )
        return redis.asyncio.Redis(connection_pool=pool)

    return Clients(redact(url), timeout, make, make_async)


def _sentinel(url: str, options: dict[str, Any], timeout: float, connect: float) -> Clients:
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
            raise ConfigurationError(f"bad sentinel address {item!r} in {redact(url)!r}") from exc
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
    db = number(options.pop("db", segments[1] if len(segments) > 1 else 0), "db", int)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": connect, "socket_timeout": timeout}
    if "sentinel_password" in options:
        sentinel_kwargs["password"] = options.pop("sentinel_password")
    if "sentinel_username" in options:
        sentinel_kwargs["username"] = options.pop("sentinel_username")
    master_kwargs: dict[str, Any] = {
        "socket_connect_timeout": connect, "db": db, **DRIVER_INFO, **options,
    }  # fmt: skip
    if parts.username:
        master_kwargs["username"] = unquote(parts.username)
    if parts.password:
        master_kwargs["password"] = unquote(parts.password)
    if "max_connections" in master_kwargs:
        master_kwargs["max_connections"] = number(
            master_kwargs["max_connections"], "max_connections", int
        )

    def make(extra: float) -> redis.Redis:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs={**sentinel_kwargs, "retry": no_retry()}
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            service, socket_timeout=timeout + extra, retry=no_retry(), **master_kwargs
        )
        return client

    def make_async(extra: float) -> redis.asyncio.Redis:
        retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs={**sentinel_kwargs, "retry": retry}
        )
        client: redis.asyncio.Redis = sentinel.master_for(
            service, socket_timeout=timeout + extra, retry=retry, **master_kwargs
        )
        return client

    return Clients(redact(url), timeout, make, make_async)


def check_db_path(path: str, url: str) -> None:
    """The path of a redis:// URL is empty or ``/<database index>``; redis-py would silently
    use database 0 for anything else (``/abc``, ``/1/2``)."""
    text = unquote(path).strip("/")
    if text and not (text.isascii() and text.isdigit()):
        raise ConfigurationError(
            f"bad Redis URL {redact(url)!r}: the path must be a database index "
            f"(redis://host:port/0), not {path!r}"
        )


def number(value: object, what: str, kind: type[float] | type[int]) -> Any:
    """``value`` as ``kind``, or ConfigurationError naming the option."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        return kind(str(value))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"option {what} must be a number, got {value!r}") from exc


def flag(value: object, what: str) -> bool:
    """``value`` as a bool (true/false, yes/no, on/off, 1/0), or ConfigurationError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"option {what} must be true or false, got {value!r}")
