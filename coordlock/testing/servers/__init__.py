"""Throwaway REAL Redis, Redis Sentinel, PostgreSQL and ZooKeeper servers on loopback ports.

Every server here is a child process of the caller, listens on ``127.0.0.1`` only, keeps its
data in a fresh temporary directory and is torn down again:

* explicitly (``stop()`` / ``kill()`` / ``close()``, or by leaving a ``with`` block),
* at interpreter exit (an :mod:`atexit` hook closes every server still alive),
* when the creating process dies without running atexit (SIGKILL, a crashed pytest-xdist
  worker): every server is started with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel
  kills it together with its parent. Directories left behind that way are swept at the next
  start (their owner pid is part of the name).

The system services (Redis on 6379, PostgreSQL on 5432) are never used or touched.

All durations are in **seconds**. Every wait is bounded; a server that does not answer within
its deadline raises :class:`ServerUnavailable` with the tail of its log.

Quick use::

    with RedisServer() as redis:
        client = redis_py.Redis(port=redis.port)
        redis.kill(); redis.start()          # crash + restart on the same port
    with PostgresServer(fast=True) as pg:
        print(pg.psql("SELECT 1"))
    with ZooKeeperEnsemble(3) as zk:
        zk.leader().kill(); zk.wait_quorum()

Command line: ``python -m coordlock.testing.servers {redis|postgres|zookeeper|
zookeeper-ensemble|sentinel}`` runs one in the foreground, prints ``URL=<url>`` on a line by
itself and stops it cleanly on SIGINT/SIGTERM.

Layout (import the names from this package; the modules are an implementation detail):
``_common`` (loopback address, free ports, process helpers), ``_install`` (finding and
installing the binaries), ``_managed`` (:class:`ManagedServer`, the lifecycle every server
shares), ``redis``, ``sentinel``, ``postgres``, ``zookeeper`` (single server, ensemble member
and ensemble), ``_cli`` (the command line).
"""

from ._cli import main
from ._common import HOST, INSTALL_HINT, KINDS, ServerUnavailable, free_port, port_is_open
from ._install import ZOOKEEPER_JAR, ensure_installed, postgres_bindir, zookeeper_classpath
from ._managed import ManagedServer
from .postgres import PostgresServer
from .redis import RedisReplyError, RedisServer, RespValue, redis_command
from .sentinel import SentinelServer
from .zookeeper import (
    ZOOKEEPER_JVM_FLAGS,
    ZooKeeperEnsemble,
    ZooKeeperNode,
    ZooKeeperServer,
    zookeeper_four_letter,
)

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "KINDS",
    "ManagedServer",
    "RedisReplyError",
    "RespValue",
    "PostgresServer",
    "RedisServer",
    "SentinelServer",
    "ServerUnavailable",
    "ZooKeeperEnsemble",
    "ZooKeeperNode",
    "ZooKeeperServer",
    "ensure_installed",
    "free_port",
    "main",
    "port_is_open",
    "postgres_bindir",
    "redis_command",
    "zookeeper_classpath",
    "zookeeper_four_letter",
    "ZOOKEEPER_JAR",
    "ZOOKEEPER_JVM_FLAGS",
]
