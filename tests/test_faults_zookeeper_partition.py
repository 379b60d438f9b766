"""Partitions and soaks of the ZooKeeper backend (issue 10 T3; shared/fault-tests.md).

T3: the holder talks to ZooKeeper through a :class:`~coordlock.testing.faultproxy.FaultProxy`,
the waiter directly. ``freeze()`` is a silent partition (no byte moves, no socket closes): the
holder's client only notices through its own timeouts. Published per trial set: the ``on_lost``
delay after the freeze (p50/p99; goal p99 <= ttl), stale fenced writes accepted (must be 0),
and the holder's write after healing (must be rejected). Two regimes: ttl shorter than the
session (the waiter deletes the expired node; the holder's renewal, bounded by its lease
deadline, fails) and session shorter than the ttl (SUSPENDED → at-risk → lost after a third of
the session timeout; the server expires the session).

Soaks (``--coordlock-soak``; CI runs short bounded versions): fenced worker processes contend
for one lock while one fault class is injected again and again — SIGSTOP of a worker, SIGKILL
of a worker (replaced by a fresh one), a partition of one worker's connection — until at least
``SOAK_ACQUISITIONS`` acquisitions; C2 (stale writes accepted) and C3 (lost updates) must be 0.
Leader kill and server restart soaks are in ``test_faults_zookeeper.py``.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Worker processes and the verdict, shared with the other ZooKeeper fault tests.
from test_faults_zookeeper import WORKER, Workers, _judge, _state

import coordlock
from coordlock.testing.contract import eventually
from coordlock.testing.faultproxy import FaultProxy
from coordlock.testing.fenced import FencedRegister
from coordlock.testing.servers import ZooKeeperServer

pytestmark = pytest.mark.fault

SOAK_ACQUISITIONS = 10_000


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# --------------------------------------------------------------------------------------------
# T3: the holder partitioned (freeze), the waiter not
# --------------------------------------------------------------------------------------------


def _partition_trial(
    server: ZooKeeperServer,
    fault_proxy: Callable[..., FaultProxy],
    register: FencedRegister,
    *,
    ttl: float,
    session: float,
) -> dict[str, Any]:
    proxy = fault_proxy(server.port)
    chroot = f"t-{uuid.uuid4().hex}"
    holder = coordlock.connect(f"{proxy.via(server.url)}/{chroot}?session_timeout={session}")
    waiter = coordlock.connect(f"{server.url}/{chroot}")
    try:
        lease = holder.acquire("part", ttl)
        assert lease is not None
        lost_at: list[float] = []
        states: list[str] = []
        lease.on_state(lambda _l, state: states.append(state))
        lease.on_lost(lambda _l: lost_at.append(time.monotonic()))
        value = register.read(lease.fence)
        time.sleep(random.uniform(0, ttl / 3))  # freeze anywhere in the renewal cycle
        proxy.freeze()
        frozen_at = time.monotonic()
        assert proxy.mode == "freeze", "the partition did not happen"
        taken = waiter.acquire("part", ttl, wait=ttl + session + 15)
        took_over = time.monotonic() - frozen_at
        assert taken is not None, "nobody took over from the partitioned holder"
        assert taken.fence > lease.fence
        new_value = register.read(taken.fence)
        assert register.write(new_value + 1, taken.fence)[0]
        assert eventually(lambda: bool(lost_at), within=ttl + session + 10), "on_lost never ran"
        lost_after = lost_at[0] - frozen_at
        proxy.heal()
        stale_accepted, _ = register.write(value + 1, lease.fence)  # the healed holder writes
        assert lease.lost
        released = lease.release()
        assert taken.release()
        return {
            "lost_after": lost_after,
            "took_over": took_over,
            "stale_accepted": stale_accepted,
            "released": released,
            "states": states,
        }
    finally:
        holder.close()
        waiter.close()


@pytest.mark.parametrize(
    ("ttl", "session"),
    [(2.0, 6.0), (6.0, 2.0)],
    ids=["ttl-shorter-than-session", "session-shorter-than-ttl"],
)
def test_partitioned_holder_is_told_and_fenced_off(
    zookeeper_server: ZooKeeperServer,
    fault_proxy: Callable[..., FaultProxy],
    tmp_path: Path,
    ttl: float,
    session: float,
) -> None:
    register = FencedRegister(tmp_path / "register.json")
    trials = [
        _partition_trial(zookeeper_server, fault_proxy, register, ttl=ttl, session=session)
        for _ in range(5)
    ]
    delays = [t["lost_after"] for t in trials]
    state = register.state()
    print(
        f"\n[zookeeper T3 freeze ttl={ttl:g}s session={session:g}s] trials={len(trials)} "
        f"on_lost after p50 {statistics.median(delays):.2f}s p99 {_p99(delays):.2f}s "
        f"(max {max(delays):.2f}s); takeover after p50 "
        f"{statistics.median(t['took_over'] for t in trials):.2f}s; "
        f"stale writes accepted {sum(t['stale_accepted'] for t in trials)}; register={state}; "
        f"states={[t['states'] for t in trials]}"
    )
    assert not any(t["stale_accepted"] for t in trials)  # C2 = 0: every healed write rejected
    assert not any(t["released"] for t in trials)  # it deleted nothing of the new holder
    assert all("lost" in t["states"] for t in trials)
    assert state["accepted"] == len(trials) and state["rejected"] == len(trials)
    # Loss is reported by the lease's own deadline (or a third of the session after
    # SUSPENDED), which never ends later than ttl after the last renewal: generous bound.
    assert max(delays) <= min(ttl, session) + 2.0


# --------------------------------------------------------------------------------------------
# soaks: SIGSTOP, SIGKILL, partition, each while workers contend
# --------------------------------------------------------------------------------------------


def _spawn(crew: Workers, url: str, name: str, options: dict[str, Any]) -> None:
    """Start one more fenced worker process of ``crew`` on ``url``."""
    args = [str(options[k]) for k in ("iterations", "ttl", "wait", "hold", "deadline")]
    crew.procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                str(crew.register.path),
                str(crew.history.path),
                name,
                *args,
                str(crew.stop_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )


def _soak(
    crew: Workers,
    target: int,
    inject: Callable[[], bool],
    *,
    label: str,
    min_faults: int,
    pause: tuple[float, float] = (0.2, 0.6),
) -> None:
    """Inject faults (``inject()`` returns True when it really injected one), ``pause`` s
    apart, until the crew made ``target`` acquisitions and at least ``min_faults`` faults
    happened; then stop the workers after their current round (each also stops at its own
    count or deadline) and judge the history."""
    faults = 0
    try:
        while crew.running() and (crew.acquisitions() < target or faults < min_faults):
            time.sleep(random.uniform(*pause))
            if crew.running() and inject():
                faults += 1
        crew.stop()
        failures = crew.finish(timeout=120)
    finally:
        crew.kill()
    report = crew.report()
    _judge(label, report, faults, crew, target)
    assert faults >= min_faults, f"only {faults} faults were injected"
    crashed = [f for f in failures if "Traceback" in f]
    assert not crashed, "workers crashed:\n" + "\n".join(crashed)


def _options(target: int, ttl: float) -> dict[str, Any]:
    """Worker options: each could make all ``target`` rounds alone (the soak stops them once
    it has injected its faults: a fast crew must not end before that), bounded by a deadline."""
    return {
        "iterations": target,
        "ttl": ttl,
        "wait": 60,
        "hold": 0.002,
        "deadline": 120 + target / 5,
    }


def _sigstop_soak(server: ZooKeeperServer, tmp_path: Path, target: int, min_faults: int) -> None:
    url = f"{server.url}/t-{uuid.uuid4().hex}?session_timeout=6"
    options = _options(target, ttl=1.0)
    crew = Workers(url, tmp_path, 4, **options)

    def inject() -> bool:
        alive = [p for p in crew.procs if p.poll() is None]
        if len(alive) < 2:
            return False
        victim = random.choice(alive)
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            if not eventually(lambda: _state(victim.pid) in ("T", None), within=5):
                return False
            time.sleep(random.uniform(1.5, 3.0) * options["ttl"])
            return _state(victim.pid) == "T"
        finally:
            os.kill(victim.pid, signal.SIGCONT)

    _soak(crew, target, inject, label="SIGSTOP soak", min_faults=min_faults)


def _kill_soak(server: ZooKeeperServer, tmp_path: Path, target: int, min_faults: int) -> None:
    url = f"{server.url}/t-{uuid.uuid4().hex}?session_timeout=2"
    options = _options(target, ttl=5.0)
    crew = Workers(url, tmp_path, 4, **options)
    spawned = [0]

    def inject() -> bool:
        alive = [p for p in crew.procs if p.poll() is None]
        if len(alive) < 2:
            return False
        victim = random.choice(alive)
        victim.kill()
        victim.communicate()
        crew.procs.remove(victim)
        spawned[0] += 1
        _spawn(crew, url, f"r{spawned[0]}", options)  # a fresh process takes its place
        return victim.returncode == -signal.SIGKILL

    _soak(crew, target, inject, label="SIGKILL soak", min_faults=min_faults, pause=(2.0, 4.0))


def _partition_soak(
    server: ZooKeeperServer,
    fault_proxy: Callable[..., FaultProxy],
    tmp_path: Path,
    target: int,
    min_faults: int,
) -> None:
    chroot = f"t-{uuid.uuid4().hex}"
    options = _options(target, ttl=1.0)
    proxies = [fault_proxy(server.port) for _ in range(4)]
    crew = Workers(f"{server.url}/{chroot}", tmp_path, 0, **options)
    for i, proxy in enumerate(proxies):
        _spawn(crew, f"{proxy.via(server.url)}/{chroot}?session_timeout=6", f"w{i}", options)

    def inject() -> bool:
        proxy = random.choice(proxies)
        proxy.freeze()
        try:
            if proxy.mode != "freeze":
                return False
            time.sleep(random.uniform(1.5, 3.0) * options["ttl"])
            return True
        finally:
            proxy.heal()

    _soak(crew, target, inject, label="partition soak", min_faults=min_faults)


def test_sigstop_short(zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    _sigstop_soak(zookeeper_server, tmp_path, target=1200, min_faults=2)


def test_kill_short(zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    _kill_soak(zookeeper_server, tmp_path, target=1200, min_faults=2)


def test_partition_short(
    zookeeper_server: ZooKeeperServer, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    _partition_soak(zookeeper_server, fault_proxy, tmp_path, target=1200, min_faults=2)


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_sigstop_soak(zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    _sigstop_soak(zookeeper_server, tmp_path, target=SOAK_ACQUISITIONS, min_faults=30)


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_kill_soak(zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    _kill_soak(zookeeper_server, tmp_path, target=SOAK_ACQUISITIONS, min_faults=30)


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_partition_soak(
    zookeeper_server: ZooKeeperServer, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    _partition_soak(
        zookeeper_server, fault_proxy, tmp_path, target=SOAK_ACQUISITIONS, min_faults=30
    )
