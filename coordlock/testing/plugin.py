"""pytest plugin: throwaway real servers, fault proxies and per-test isolated backend URLs.

Opt-in: installing coordlock does not load it into anybody's test run. A project that wants it
names it, either on the command line (``pytest -p coordlock.testing.plugin``) or in its
top-level ``conftest.py``::

    pytest_plugins = ["coordlock.testing.plugin"]

(coordlock's own ``tests/conftest.py`` does exactly that). Everything it adds that could clash
with a project's own names carries a ``coordlock`` prefix; its fixtures are overridden by a
project's fixtures of the same name, as any plugin fixture is.

Options
    ``--coordlock-backends=memory,sqlite,redis,postgres,zookeeper`` (the default; ``all`` means
    every one): which backends tests that use ``backend_url`` run against. The environment
    variable ``COORDLOCK_TEST_BACKENDS`` overrides the option.
    ``--coordlock-soak``: run tests marked ``coordlock_soak``; without it they are skipped (the
    only planned skip).

Markers
    ``coordlock_soak``: a long fault soak, skipped unless ``--coordlock-soak`` is given.

Fixtures (servers are started lazily, on first use, per pytest-xdist worker)
    ``redis_server``, ``postgres_server`` (``fast=True``), ``zookeeper_server`` — session scope,
    shared: do not crash them (if a test stops or pauses one anyway, ``backend_url`` revives
    it); ``zookeeper_ensemble`` — module scope, 3 nodes; a test that kills or pauses members
    must bring them back (``member.start()``, ``member.resume()``, ``wait_quorum()``);
    ``redis_sentinel`` — function scope, a :class:`SentinelServer` whose ``.master`` is a fresh
    :class:`RedisServer`; ``fresh_redis_server``, ``fresh_postgres_server``,
    ``fresh_zookeeper_server`` — function scope, yours to kill, pause and restart.
    ``fault_proxy`` — function scope, a factory: ``fault_proxy(port, host="127.0.0.1",
    **options)`` starts a :class:`~coordlock.testing.faultproxy.FaultProxy` in front of that
    server port (``proxy.via(server.url)`` is the URL to give the client; ``freeze()``,
    ``drop()``, ``delay(ms)``, ``heal()``); every proxy it made is stopped at teardown.
    ``backend_name`` / ``backend_url`` — tests requesting either are parametrized over the
    selected backends (ids ``memory``, ``sqlite``, ``redis``, ``postgres``, ``zookeeper``) and
    get a fresh isolated URL: ``memory://t-<hex>``, ``sqlite:////<tmp_path>/locks.db``,
    ``redis://127.0.0.1:P/0?prefix=t-<hex>:``,
    ``postgresql://postgres@127.0.0.1:P/postgres?schema=t_<hex>``,
    ``zookeeper://127.0.0.1:P/t-<hex>`` (chroot).

A server that cannot start fails the test when ``CI`` is ``true``/``1`` (a missing server is a
failure in CI) and skips it otherwise; either way the reason says what is missing and how to
install it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from .faultproxy import FaultProxy
from .servers import (
    HOST,
    ManagedServer,
    PostgresServer,
    RedisServer,
    SentinelServer,
    ServerUnavailable,
    ZooKeeperEnsemble,
    ZooKeeperServer,
)

__all__ = [
    "ALL_BACKENDS",
    "ENV_BACKENDS",
    "OPTION_BACKENDS",
    "OPTION_SOAK",
    "SOAK_MARKER",
    "backend_name",
    "backend_url",
    "fault_proxy",
    "fresh_postgres_server",
    "fresh_redis_server",
    "fresh_zookeeper_server",
    "in_ci",
    "postgres_server",
    "redis_sentinel",
    "redis_server",
    "selected_backends",
    "zookeeper_ensemble",
    "zookeeper_server",
]

ALL_BACKENDS: tuple[str, ...] = ("memory", "sqlite", "redis", "postgres", "zookeeper")
"""Backend ids known to ``--coordlock-backends``, in the default order."""

OPTION_BACKENDS = "--coordlock-backends"
"""Command-line option choosing the backends of ``backend_url`` tests."""

OPTION_SOAK = "--coordlock-soak"
"""Command-line flag that runs the tests marked :data:`SOAK_MARKER`."""

SOAK_MARKER = "coordlock_soak"
"""Marker of the long fault soaks, skipped unless :data:`OPTION_SOAK` is given."""

ENV_BACKENDS = "COORDLOCK_TEST_BACKENDS"
"""Environment variable that overrides ``--coordlock-backends``."""

_SELECTED = pytest.StashKey[list[str]]()
_M = TypeVar("_M", bound=ManagedServer)


# --------------------------------------------------------------------------------------------
# options, markers, parametrization
# --------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("coordlock", "coordlock backends and throwaway servers")
    group.addoption(
        OPTION_BACKENDS,
        dest="coordlock_backends",
        default=None,
        metavar="LIST",
        help=(
            "comma-separated backends for tests using backend_url: "
            f"{','.join(ALL_BACKENDS)} (default: all of them; 'all' also works). "
            f"${ENV_BACKENDS} overrides this option."
        ),
    )
    group.addoption(
        OPTION_SOAK,
        dest="coordlock_soak",
        action="store_true",
        default=False,
        help=f"run the long fault soaks (tests marked '{SOAK_MARKER}'); skipped otherwise",
    )


def _parse_backends(raw: str) -> list[str]:
    names: list[str] = []
    for item in raw.split(","):
        name = item.strip().lower()
        if not name:
            continue
        expanded = list(ALL_BACKENDS) if name == "all" else [name]
        for backend in expanded:
            if backend not in ALL_BACKENDS:
                raise pytest.UsageError(
                    f"unknown backend {backend!r} in {OPTION_BACKENDS}/${ENV_BACKENDS}; "
                    f"known: {', '.join(ALL_BACKENDS)}"
                )
            if backend not in names:
                names.append(backend)
    return names


def selected_backends(config: pytest.Config) -> list[str]:
    """The backends chosen by ``$COORDLOCK_TEST_BACKENDS``, else ``--coordlock-backends``, else
    all of them."""
    if _SELECTED in config.stash:
        cached: list[str] = config.stash[_SELECTED]
        return list(cached)
    raw = os.environ.get(ENV_BACKENDS, "").strip() or config.getoption("coordlock_backends") or ""
    names = _parse_backends(raw) or list(ALL_BACKENDS)
    config.stash[_SELECTED] = names
    return list(names)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{SOAK_MARKER}: long fault soak; skipped unless {OPTION_SOAK} is given"
    )
    selected_backends(config)  # reject a bad --coordlock-backends before collection


def pytest_report_header(config: pytest.Config) -> str:
    return f"coordlock backends: {','.join(selected_backends(config))}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("coordlock_soak"):
        return
    skip_soak = pytest.mark.skip(reason=f"soak test: opt in with {OPTION_SOAK}")
    for item in items:
        if item.get_closest_marker(SOAK_MARKER) is not None:
            item.add_marker(skip_soak)


def _parametrized_explicitly(metafunc: pytest.Metafunc, argname: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [name.strip() for name in argnames.split(",")]
        if argname in argnames:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" not in metafunc.fixturenames:
        return  # (backend_url requests backend_name, so it is in the closure too)
    if _parametrized_explicitly(metafunc, "backend_name"):
        return
    names = selected_backends(metafunc.config)
    metafunc.parametrize("backend_name", names, ids=names, indirect=True)


# --------------------------------------------------------------------------------------------
# server fixtures
# --------------------------------------------------------------------------------------------


def in_ci() -> bool:
    """True when ``$CI`` is ``true`` or ``1``: then a server that cannot start is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason}\n(CI is set: a missing server is a failure)", pytrace=False)
    pytest.skip(reason)


def _start(factory: Callable[[], _M]) -> _M:
    """Build and start a server; skip (or fail in CI) with the reason if it cannot start."""
    try:
        server = factory()
    except ServerUnavailable as exc:
        _unavailable(str(exc))
    try:
        return server.start()
    except ServerUnavailable as exc:
        server.close()
        _unavailable(str(exc))
    except BaseException:
        server.close()
        raise


def _served(factory: Callable[[], _M]) -> Iterator[_M]:
    server = _start(factory)
    try:
        yield server
    finally:
        server.close()


def _revive(server: ManagedServer) -> ManagedServer:
    """Bring a shared server back if an earlier test paused or stopped it."""
    if server.paused:
        server.resume()
    if not server.is_running():
        try:
            server.start()
        except ServerUnavailable as exc:
            _unavailable(f"shared {server.kind} server could not be restarted: {exc}")
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Shared Redis (no persistence) for the session of this worker; isolate by key prefix."""
    yield from _served(RedisServer)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Shared PostgreSQL (``fast=True``: fsync and synchronous_commit off) for the session of
    this worker; isolate by schema. Never crash it: use ``fresh_postgres_server``."""
    yield from _served(lambda: PostgresServer(fast=True))


@pytest.fixture(scope="session")
def zookeeper_server() -> Iterator[ZooKeeperServer]:
    """Shared single-node ZooKeeper (tick 200 ms, no fsync) for the session of this worker;
    isolate by chroot."""
    yield from _served(lambda: ZooKeeperServer(fast=True))


@pytest.fixture(scope="module")
def zookeeper_ensemble() -> Iterator[ZooKeeperEnsemble]:
    """A 3-node ZooKeeper ensemble per test module. Restore what you break: start killed
    members, resume paused ones, then ``wait_quorum()``."""
    try:
        ensemble = ZooKeeperEnsemble(3, fast=True)
    except ServerUnavailable as exc:
        _unavailable(str(exc))
    try:
        ensemble.start()
    except ServerUnavailable as exc:
        ensemble.close()
        _unavailable(str(exc))
    except BaseException:
        ensemble.close()
        raise
    try:
        yield ensemble
    finally:
        ensemble.close()


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelServer]:
    """A fresh Redis master plus one real Sentinel monitoring it (quorum 1, down-after 1 s).
    The sentinel's ``.url`` is ``redis+sentinel://127.0.0.1:SP/mymaster``; ``.master`` is the
    :class:`RedisServer` (yours to kill); both are closed after the test."""
    master = _start(RedisServer)
    try:
        sentinel = _start(lambda: SentinelServer(master))
        try:
            yield sentinel
        finally:
            sentinel.close()
    finally:
        master.close()


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A Redis of this test alone (no persistence: a restart comes back empty)."""
    yield from _served(RedisServer)


@pytest.fixture
def fresh_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test alone: ``fast=True`` but ``synchronous_commit=on``, so a
    ``kill()`` loses no committed transaction (fsync off only matters for an OS crash)."""
    yield from _served(lambda: PostgresServer(fast=True, settings={"synchronous_commit": "on"}))


@pytest.fixture
def fresh_zookeeper_server() -> Iterator[ZooKeeperServer]:
    """A single-node ZooKeeper of this test alone (log written but not fsynced: a process kill
    loses nothing)."""
    yield from _served(lambda: ZooKeeperServer(fast=True))


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory ``fault_proxy(port, host="127.0.0.1", **options) -> FaultProxy``: a started
    fault proxy in front of ``host:port`` (options as :class:`FaultProxy`). Every proxy made
    by the factory is stopped (its connections reset) when the test ends."""
    made: list[FaultProxy] = []

    def make(port: int, host: str = HOST, **options: Any) -> FaultProxy:
        proxy = FaultProxy(host, port, **options)
        made.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in reversed(made):
            proxy.stop()


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------


@pytest.fixture
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend id of this test run (``memory``, ``sqlite``, ``redis``, ``postgres``,
    ``zookeeper``); tests using it are parametrized over ``--coordlock-backends``."""
    name = getattr(request, "param", None)
    if not isinstance(name, str) or name not in ALL_BACKENDS:
        raise pytest.UsageError(f"backend_name must be one of {ALL_BACKENDS}, got {name!r}")
    return name


@pytest.fixture
def backend_url(backend_name: str, request: pytest.FixtureRequest) -> str:
    """A fresh, isolated coordlock URL for this test on the backend ``backend_name``."""
    token = uuid.uuid4().hex
    if backend_name == "memory":
        return f"memory://t-{token}"
    if backend_name == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
        return f"sqlite:///{tmp_path.resolve() / 'locks.db'}"  # absolute: sqlite:////...
    if backend_name == "redis":
        redis = _revive(request.getfixturevalue("redis_server"))
        return f"{redis.url}?prefix=t-{token}:"
    if backend_name == "postgres":
        postgres = _revive(request.getfixturevalue("postgres_server"))
        return f"{postgres.url}?schema=t_{token}"
    if backend_name == "zookeeper":
        zookeeper = _revive(request.getfixturevalue("zookeeper_server"))
        return f"{zookeeper.url}/t-{token}"
    raise pytest.UsageError(f"unknown backend {backend_name!r}")
