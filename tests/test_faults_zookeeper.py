"""Fault tests of the ZooKeeper backend (shared/fault-tests.md), against real ZooKeeper.

* T2 leader kill in a 3-node ensemble while 6 worker processes contend for one lock (fenced
  register oracle, >= 1,000 acquisitions); T2 kill -9 + restart of a single server.
* T1 holder SIGSTOPped past its session timeout (ttl longer than the session), and past its
  ttl (ttl shorter than the session): others take over, the resumed holder's write is rejected
  and its lease turns lost.
* The connection dropped (server killed and restarted) and back within the grace: the lease
  survives; callbacks saw at-risk (SUSPENDED) then restored (CONNECTED).
* T7 loss-detection delay when the session is expired under a held lease (p50/p99 printed).

Every loop has a count and a deadline; each test checks that its fault really happened before
judging the outcome, and prints its counts (acquisitions, faults, C1-C4). Longer versions are
marked ``soak`` (run with ``--soak``).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient

import coordlock
from coordlock.backends.zookeeper import ZooKeeperCoordinator
from coordlock.testing.contract import eventually
from coordlock.testing.fenced import FencedRegister, HistoryLog, Report, check, worker_command
from coordlock.testing.servers import ZooKeeperEnsemble, ZooKeeperServer

pytestmark = pytest.mark.fault


def _state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (``T`` = stopped), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _pid_alive(pid: int | None) -> bool:
    return pid is not None and _state(pid) not in (None, "Z", "X")


class Workers:
    """Fenced-register worker processes (coordlock.testing.fenced) on one lock."""

    def __init__(self, url: str, directory: Path, count: int, **options: Any) -> None:
        self.register = FencedRegister(directory / "register.json")
        self.history = HistoryLog(directory / "history.jsonl")
        self.procs = [
            subprocess.Popen(
                worker_command(url, self.register.path, self.history.path, f"w{i}", **options),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(count)
        ]

    def acquisitions(self) -> int:
        if not self.history.path.exists():
            return 0
        with open(self.history.path, "rb") as handle:
            return sum(1 for line in handle if b'"op": "acquired"' in line)

    def wait_for(self, acquisitions: int, timeout: float) -> bool:
        return eventually(
            lambda: self.acquisitions() >= acquisitions or not self.running(), within=timeout
        )

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def finish(self, timeout: float) -> list[str]:
        """Wait for every worker; return the failures (exit code and output tail)."""
        failures = []
        stop = time.monotonic() + timeout
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=max(stop - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"exit {proc.returncode}: {out[-1500:]}")
        return failures

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def report(self) -> Report:
        return check(self.history, self.register)

    def errors(self) -> int:
        return sum(1 for e in self.history.events() if e["op"] == "error")


def _chroot_url(base: str, **query: object) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{base}/t-{uuid.uuid4().hex}" + (f"?{q}" if q else "")


def _judge(label: str, report: Report, faults: int, workers: Workers, expected: int) -> None:
    print(
        f"\n[zookeeper {label}] faults={faults} errors_retried={workers.errors()} "
        f"{report.summary()}"
    )
    assert report.acquisitions >= expected
    assert report.c2_stale_accepted == 0
    assert report.c3_lost_updates == 0
    assert report.c4_fence_inversions == 0
    assert report.final_value == report.writes_accepted


# --------------------------------------------------------------------------------------------
# T2: leader kill in a 3-node ensemble
# --------------------------------------------------------------------------------------------


def _leader_kills(
    ensemble: ZooKeeperEnsemble, tmp_path: Path, *, workers: int, iterations: int, kills: int
) -> None:
    ensemble.wait_quorum(60)
    url = _chroot_url(ensemble.url, session_timeout=6)  # grace 2 s while SUSPENDED
    total = workers * iterations
    crew = Workers(
        url,
        tmp_path,
        workers,
        iterations=iterations,
        ttl=5,
        wait=60,
        hold=0.002,
        deadline=60 + 20 * kills,
    )
    faults = 0
    try:
        for k in range(kills):
            # Kill while the lock is held and contended: after a share of the work is done.
            if not crew.wait_for(total * (k + 1) // (kills + 2), timeout=60) or not crew.running():
                break
            leader = ensemble.leader()
            pid = leader.pid
            leader.kill()
            assert not _pid_alive(pid), "the leader did not die"
            new_leader = ensemble.wait_quorum(60)  # the two survivors elect a new leader
            assert new_leader is not leader
            faults += 1
            leader.start(wait=False)
            ensemble.wait_quorum(90)
        failures = crew.finish(timeout=120 + 20 * kills)
    finally:
        crew.kill()
    assert faults == kills, f"only {faults} of {kills} leader kills happened"
    assert not failures, "workers failed:\n" + "\n".join(failures)
    _judge("leader kill", crew.report(), faults, crew, total)


def test_leader_kill_keeps_fencing_safe(
    zookeeper_ensemble: ZooKeeperEnsemble, tmp_path: Path
) -> None:
    _leader_kills(zookeeper_ensemble, tmp_path, workers=6, iterations=170, kills=2)


@pytest.mark.soak
def test_leader_kill_soak(zookeeper_ensemble: ZooKeeperEnsemble, tmp_path: Path) -> None:
    _leader_kills(zookeeper_ensemble, tmp_path, workers=6, iterations=1000, kills=8)


# --------------------------------------------------------------------------------------------
# T2: single server kill -9 and restart under contention; the connection drop a lease survives
# --------------------------------------------------------------------------------------------


def _server_restarts(
    server: ZooKeeperServer, tmp_path: Path, *, iterations: int, kills: int
) -> None:
    url = _chroot_url(server.url, session_timeout=15)  # restarts take < 5 s (the grace)
    total = 4 * iterations
    crew = Workers(
        url,
        tmp_path,
        4,
        iterations=iterations,
        ttl=10,
        wait=60,
        hold=0.002,
        deadline=60 + 15 * kills,
    )
    faults = 0
    try:
        for k in range(kills):
            if not crew.wait_for(total * (k + 1) // (kills + 2), timeout=60) or not crew.running():
                break
            pid = server.pid
            server.restart(kill=True)
            assert server.pid != pid and not _pid_alive(pid), "the server did not restart"
            faults += 1
        failures = crew.finish(timeout=120 + 15 * kills)
    finally:
        crew.kill()
    assert faults == kills
    assert not failures, "workers failed:\n" + "\n".join(failures)
    _judge("server kill -9 + restart", crew.report(), faults, crew, total)


def test_server_restart_keeps_fencing_safe(
    fresh_zookeeper_server: ZooKeeperServer, tmp_path: Path
) -> None:
    _server_restarts(fresh_zookeeper_server, tmp_path, iterations=150, kills=2)


@pytest.mark.soak
def test_server_restart_soak(fresh_zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    _server_restarts(fresh_zookeeper_server, tmp_path, iterations=1000, kills=8)


def test_connection_drop_within_grace_keeps_the_lease(
    fresh_zookeeper_server: ZooKeeperServer,
) -> None:
    url = _chroot_url(fresh_zookeeper_server.url, session_timeout=30)  # grace 10 s
    holder = coordlock.connect(url)
    other = coordlock.connect(url)
    try:
        lease = holder.acquire("survivor", 30)
        assert lease is not None
        seen: list[str] = []
        lease.on_state(lambda _lease, state: seen.append(state))
        pid = fresh_zookeeper_server.pid
        fresh_zookeeper_server.restart(kill=True)  # every connection drops
        assert fresh_zookeeper_server.pid != pid, "the server did not restart"
        assert eventually(lambda: seen == ["at-risk", "restored"], within=30), seen
        assert not lease.lost
        assert other.acquire("survivor", 10) is None  # still ours: the session survived
        assert lease.extend() is True
        assert lease.release() is True
        after = other.acquire("survivor", 10)
        assert after is not None and after.fence > lease.fence  # zxids did not regress
        after.release()
        print(
            f"\n[zookeeper connection drop] faults=1 states={seen} fence {lease.fence} -> "
            f"{after.fence}"
        )
    finally:
        holder.close()
        other.close()


# --------------------------------------------------------------------------------------------
# T1: a holder paused (SIGSTOP) past its session timeout or its ttl
# --------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import json, sys, time
    import coordlock
    from coordlock.testing.fenced import FencedRegister
    url, register_path, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
    register = FencedRegister(register_path)
    c = coordlock.connect(url)
    lease = c.acquire("paused", ttl)
    states = []
    lease.on_state(lambda _l, s: states.append(s))
    print("ACQUIRED", lease.fence, flush=True)
    sys.stdin.readline()  # SIGSTOPped here; after SIGCONT the test says go
    value = register.read()
    accepted, _ = register.write(value + 1, lease.fence)  # what a resumed holder would do
    stop = time.monotonic() + 20
    while not lease.lost and time.monotonic() < stop:
        time.sleep(0.01)
    released = lease.release()
    print(json.dumps({"accepted": accepted, "lost": lease.lost, "reason": lease.lost_reason,
                      "states": states, "released": released}), flush=True)
    c.close()
    """
)


def _paused_holder(server: ZooKeeperServer, tmp_path: Path, *, ttl: float, session: float) -> None:
    url = _chroot_url(server.url, session_timeout=session)
    register = FencedRegister(tmp_path / "register.json")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(register.path), str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    other = coordlock.connect(url)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.startswith("ACQUIRED"), line + (proc.stderr.read() if proc.stderr else "")
        stale_fence = int(line.split()[1])
        os.kill(proc.pid, signal.SIGSTOP)
        assert eventually(lambda: _state(proc.pid) == "T"), "the holder was not stopped"
        paused_at = time.monotonic()
        lease = other.acquire("paused", 10, wait=max(ttl, session) * 3 + 10)
        took_over = time.monotonic() - paused_at
        assert lease is not None, "nobody took over from the paused holder"
        assert _state(proc.pid) == "T", "the holder woke up before the takeover"
        assert lease.fence > stale_fence
        value = register.read()
        assert register.write(value + 1, lease.fence)[0]
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        state = register.state()
        print(
            f"\n[zookeeper SIGSTOP ttl={ttl} session={session}] faults=1 "
            f"takeover_after={took_over:.2f}s holder={result} register={state}"
        )
        assert result["accepted"] is False  # C2: the stale write was rejected
        assert result["lost"] is True and "lost" in result["states"]
        assert result["released"] is False  # it deleted nothing of the new holder
        assert state["value"] == 1 and state["accepted"] == 1 and state["rejected"] == 1
        assert other.acquire("paused", 10) is None  # the new holder still holds
        assert lease.release()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()
        other.close()


def test_holder_paused_past_session_timeout(
    zookeeper_server: ZooKeeperServer, tmp_path: Path
) -> None:
    # ttl (30 s) longer than the session (2 s): the session expires, its node goes with it.
    _paused_holder(zookeeper_server, tmp_path, ttl=30, session=2)


def test_holder_paused_past_its_ttl(zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    # ttl (1 s) shorter than the session (20 s): the successor deletes the expired node.
    _paused_holder(zookeeper_server, tmp_path, ttl=1, session=20)


# --------------------------------------------------------------------------------------------
# T7: loss-detection delay
# --------------------------------------------------------------------------------------------


def _loss_delays(server: ZooKeeperServer, trials: int) -> list[float]:
    url = _chroot_url(server.url)
    delays = []
    for _ in range(trials):
        delays.append(_one_loss_delay(url, server.hosts))
    return delays


def _one_loss_delay(url: str, hosts: str) -> float:
    c = coordlock.connect(url)
    try:
        assert isinstance(c, ZooKeeperCoordinator)
        lease = c.acquire("t7", 30)
        assert lease is not None
        lost_at: list[float] = []
        lease.on_lost(lambda _lease: lost_at.append(time.monotonic()))
        twin = KazooClient(hosts=hosts, client_id=c._client.client_id)
        twin.start(timeout=15)
        killed_at = time.monotonic()
        twin.stop()  # closes the session under the held lease
        twin.close()
        assert eventually(lambda: bool(lost_at), within=30), "lost never fired"
        return lost_at[0] - killed_at
    finally:
        c.close()


def test_loss_detection_delay(zookeeper_server: ZooKeeperServer) -> None:
    delays = sorted(_loss_delays(zookeeper_server, 10))
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    print(
        f"\n[zookeeper T7] session killed under a held lease, n={len(delays)}: lost after "
        f"p50 {statistics.median(delays) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    assert len(delays) == 10
