"""Fault tests of the ZooKeeper backend (shared/fault-tests.md), against real ZooKeeper.

* T2 leader kill in a 3-node ensemble while 6 worker processes contend for one lock (fenced
  register oracle, >= 1,000 acquisitions); at each kill the test itself holds the lock as one
  more fenced worker, so every kill hits a holder; every lease a kill put at risk must end
  restored, lost, or released normally.
* T2 kill -9 + restart of a single server under 4 contending workers; and under a held lease
  with the client reconnecting straight into the restarting server (ZooKeeper 3.8.0 may leave
  that handshake hanging): the lease ends restored or lost, never silently at risk.
* The client's connection dropped (through a loopback proxy, with the server killed and
  restarted behind it) and back within the grace: the lease survives; callbacks saw at-risk
  (SUSPENDED) then restored (CONNECTED).
* T1 holder SIGSTOPped past its session timeout (ttl longer than the session), and past its
  ttl (ttl shorter than the session): others take over, the resumed holder's write is rejected
  and its on_lost callbacks run.
* T7 loss-detection delay when the session is expired under a held lease (p50/p99 printed).

Every loop has a count and a deadline; each test checks that its fault really happened before
judging the outcome, and prints its counts (acquisitions, faults, C1-C4). Longer versions are
marked ``coordlock_soak`` (run with ``--coordlock-soak``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient

# The loopback TCP proxy that can cut a client's connection (pytest imports test modules by
# their basename, so the sibling module is importable as is).
from test_zookeeper_backend import CuttableProxy

import coordlock
from coordlock import CoordlockError, Lease, RunCoordinator
from coordlock.backends.zookeeper import ZooKeeperCoordinator
from coordlock.testing.contract import eventually
from coordlock.testing.fenced import FencedRegister, HistoryLog, Report, check
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


# The fenced worker of coordlock.testing.fenced, plus "at-risk"/"restored" lease states logged
# to the same history, so a test can tell which holders a fault hit and what became of them.
WORKER = textwrap.dedent(
    """
    import os
    import sys
    import coordlock
    from coordlock.testing.fenced import FencedRegister, HistoryLog, run_worker
    url, register, log, worker = sys.argv[1:5]
    iterations, ttl, wait, hold, deadline = int(sys.argv[5]), *map(float, sys.argv[6:10])
    stop_file = sys.argv[10]
    history = HistoryLog(log)
    coordinator = coordlock.connect(url)
    plain_acquire = coordinator.acquire

    def acquire(name, ttl, **kw):
        lease = plain_acquire(name, ttl, **kw)
        if lease is not None:
            lease.on_state(
                lambda l, state: state != "lost" and history.log(worker, state, fence=l.fence)
            )
        return lease

    coordinator.acquire = acquire
    try:
        done = run_worker(coordinator, FencedRegister(register), history, worker,
                          iterations=iterations, ttl=ttl, wait=wait, hold=hold,
                          deadline=deadline, stop_file=stop_file)
    finally:
        coordinator.close()
    sys.exit(0 if done == iterations or os.path.exists(stop_file) else 1)
    """
)


class Workers:
    """Fenced-register worker processes (coordlock.testing.fenced) on one lock."""

    def __init__(
        self,
        url: str,
        directory: Path,
        count: int,
        *,
        iterations: int,
        ttl: float,
        wait: float,
        hold: float,
        deadline: float,
    ) -> None:
        self.register = FencedRegister(directory / "register.json")
        self.history = HistoryLog(directory / "history.jsonl")
        #: once it exists, every worker stops after its current round (see stop())
        self.stop_file = directory / "stop"
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    url,
                    str(self.register.path),
                    str(self.history.path),
                    f"w{i}",
                    str(iterations),
                    str(ttl),
                    str(wait),
                    str(hold),
                    str(deadline),
                    str(self.stop_file),
                ],
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

    def stop(self) -> None:
        """Let every worker stop after its current round (then :meth:`finish` them)."""
        self.stop_file.touch()

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

    def at_risk_outcomes(self) -> dict[str, int]:
        """What became of each lease a fault put at risk: restored, lost, or released (it held
        on and let go normally). ``unresolved`` must stay 0."""
        events = self.history.events()
        outcomes = {"at_risk": 0, "restored": 0, "lost": 0, "released": 0, "unresolved": 0}
        for risky in (e for e in events if e["op"] == "at-risk"):
            outcomes["at_risk"] += 1
            later = [
                e["op"] if e["op"] != "release-result" else ("released" if e["ok"] else "lost")
                for e in events
                if e["op"] in ("restored", "lost", "release-result")  # "error" has no fence
                and e["w"] == risky["w"]
                and e.get("fence") == risky["fence"]
                and e["t"] >= risky["t"]
            ]
            outcomes[later[0] if later else "unresolved"] += 1
        return outcomes


def _chroot_url(base: str, **query: object) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{base}/t-{uuid.uuid4().hex}" + (f"?{q}" if q else "")


def _judge(label: str, report: Report, faults: int, workers: Workers, expected: int) -> None:
    outcomes = workers.at_risk_outcomes()
    print(
        f"\n[zookeeper {label}] faults={faults} errors_retried={workers.errors()} "
        f"{report.summary()} leases_at_risk={outcomes}"
    )
    assert outcomes["unresolved"] == 0, "an at-risk lease was neither restored nor lost"
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
        deadline=90 + 20 * kills + total / 20,  # >= 20 acquisitions/s between faults
    )
    probe = coordlock.connect(url)
    faults = 0
    try:
        for k in range(kills):
            # Kill while the lock is held and contended: after a share of the work is done,
            # the test itself takes the lock (as one more fenced worker, "probe") and kills the
            # leader while it holds it and the workers queue behind it.
            share = total * (k + 1) // (kills + 2)
            if not crew.wait_for(share, timeout=60 + total / 20) or not crew.running():
                break
            leader = ensemble.leader()
            pid = leader.pid
            with _probe_holding(probe, crew):
                leader.kill()
                assert not _pid_alive(pid), "the leader did not die"
                new_leader = ensemble.wait_quorum(60)  # the two survivors elect a new leader
                assert new_leader is not leader
                faults += 1
            leader.start(wait=False)
            ensemble.wait_quorum(90)
        failures = crew.finish(timeout=120 + 20 * kills + total / 20)
    finally:
        crew.kill()
        probe.close()
    assert not failures, "workers failed:\n" + "\n".join(failures)
    assert faults == kills, f"only {faults} of {kills} leader kills happened"
    _judge("leader kill", crew.report(), faults, crew, total)
    probe_hits = [e for e in crew.history.events() if e["w"] == "probe" and e["op"] == "at-risk"]
    assert len(probe_hits) == kills, "a leader kill did not reach the holder"


@contextlib.contextmanager
def _probe_holding(probe: RunCoordinator, crew: Workers) -> Iterator[None]:
    """Hold the workers' lock (logged as fenced worker "probe") around the block, then write
    the register with the probe's fence and release, as any worker would."""
    log = crew.history.log
    lease = probe.acquire("fenced", 5, wait=60)
    assert lease is not None, "the probe never got the lock"
    log("probe", "acquired", fence=lease.fence)
    lease.on_state(
        lambda held, state: log("probe", state, fence=held.fence) if state != "lost" else None
    )
    lease.on_lost(lambda held: log("probe", "lost", fence=held.fence))
    value = crew.register.read()
    log("probe", "read", fence=lease.fence, value=value)
    try:
        yield
    finally:
        # A careful holder holds its writes while at risk: until restored, or lost.
        eventually(lambda: lease.lost or not lease.at_risk, within=30)
        accepted, seq = crew.register.write(value + 1, lease.fence)
        log("probe", "write", fence=lease.fence, value=value + 1, accepted=accepted, seq=seq)
        log("probe", "released", fence=lease.fence)
        try:
            ok = lease.release()
        except CoordlockError as exc:
            log("probe", "error", error=str(exc))
            ok = False
        log("probe", "release-result", fence=lease.fence, ok=ok)


def test_leader_kill_keeps_fencing_safe(
    zookeeper_ensemble: ZooKeeperEnsemble, tmp_path: Path
) -> None:
    _leader_kills(zookeeper_ensemble, tmp_path, workers=6, iterations=170, kills=2)


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_leader_kill_soak(zookeeper_ensemble: ZooKeeperEnsemble, tmp_path: Path) -> None:
    _leader_kills(zookeeper_ensemble, tmp_path, workers=6, iterations=1700, kills=8)


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
        deadline=60 + 15 * kills + total / 20,
    )
    faults = 0
    try:
        for k in range(kills):
            share = total * (k + 1) // (kills + 2)
            if not crew.wait_for(share, timeout=60 + total / 20) or not crew.running():
                break
            pid = server.pid
            server.restart(kill=True)
            assert server.pid != pid and not _pid_alive(pid), "the server did not restart"
            faults += 1
        failures = crew.finish(timeout=120 + 15 * kills + total / 20)
    finally:
        crew.kill()
    assert not failures, "workers failed:\n" + "\n".join(failures)
    assert faults == kills, f"only {faults} of {kills} restarts happened"
    _judge("server kill -9 + restart", crew.report(), faults, crew, total)


def test_server_restart_keeps_fencing_safe(
    fresh_zookeeper_server: ZooKeeperServer, tmp_path: Path
) -> None:
    _server_restarts(fresh_zookeeper_server, tmp_path, iterations=150, kills=2)


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_server_restart_soak(fresh_zookeeper_server: ZooKeeperServer, tmp_path: Path) -> None:
    _server_restarts(fresh_zookeeper_server, tmp_path, iterations=2550, kills=8)


def test_connection_drop_within_grace_keeps_the_lease(
    fresh_zookeeper_server: ZooKeeperServer,
) -> None:
    # The holder talks through a proxy: its connection is cut, the server is killed and
    # restarted behind it, and the connection comes back once the server serves again.
    proxy = CuttableProxy(fresh_zookeeper_server.port)
    chroot = f"t-{uuid.uuid4().hex}"
    holder = coordlock.connect(f"zookeeper://127.0.0.1:{proxy.port}/{chroot}?session_timeout=30")
    other = coordlock.connect(f"{fresh_zookeeper_server.url}/{chroot}")
    try:
        lease = holder.acquire("survivor", 30)
        assert lease is not None
        seen: list[str] = []
        lease.on_state(lambda _lease, state: seen.append(state))
        proxy.cut()
        assert eventually(lambda: seen == ["at-risk"]), seen
        pid = fresh_zookeeper_server.pid
        fresh_zookeeper_server.restart(kill=True)
        assert fresh_zookeeper_server.pid != pid, "the server did not restart"
        proxy.restore()
        assert eventually(lambda: seen == ["at-risk", "restored"], within=30), seen
        assert not lease.lost
        assert other.acquire("survivor", 10) is None  # still ours: the session survived
        assert lease.extend() is True
        assert lease.release() is True
        after = other.acquire("survivor", 10)
        assert after is not None and after.fence > lease.fence  # zxids did not regress
        after.release()
        print(
            f"\n[zookeeper connection drop + server restart] faults=2 states={seen} "
            f"fence {lease.fence} -> {after.fence}"
        )
    finally:
        holder.close()
        other.close()
        proxy.close()


def test_server_restart_under_a_held_lease_is_never_silent(
    fresh_zookeeper_server: ZooKeeperServer,
) -> None:
    # Reconnecting straight into a restarting ZooKeeper 3.8.0 may hang for ~10 s (the server
    # refuses the handshake before its database is loaded and, hitting an NPE while closing,
    # leaves the socket open until its sessionless-connection timeout). Either way the lease
    # must end restored or lost within bounded time, never stay at risk, and a lost lease's
    # lock must come free with a higher fence.
    url = _chroot_url(fresh_zookeeper_server.url, session_timeout=15)
    holder = coordlock.connect(url)
    other = coordlock.connect(url)
    try:
        outcomes = [
            _restart_under_lease(fresh_zookeeper_server, holder, other, f"restart-{i}")
            for i in range(3)
        ]
        print(f"\n[zookeeper server kill -9 + restart, direct] faults=3 outcomes={outcomes}")
    finally:
        holder.close()
        other.close()


def _restart_under_lease(
    server: ZooKeeperServer, holder: RunCoordinator, other: RunCoordinator, name: str
) -> list[str]:
    lease = holder.acquire(name, 30)
    assert lease is not None
    seen: list[str] = []
    lease.on_state(lambda _lease, state: seen.append(state))
    pid = server.pid
    server.restart(kill=True)
    assert server.pid != pid, "the server did not restart"
    assert eventually(lambda: len(seen) >= 2, within=40), seen
    assert seen in (["at-risk", "restored"], ["at-risk", "lost"]), seen
    if seen[-1] == "restored":
        assert lease.release() is True
        return seen
    taken: list[Lease] = []

    def take() -> bool:
        got = other.acquire(name, 10)
        if got is not None:
            taken.append(got)
        return bool(taken)

    assert eventually(take, within=40)
    assert taken[0].fence > lease.fence
    taken[0].release()
    assert lease.release() is False
    return seen


# --------------------------------------------------------------------------------------------
# T1: a holder paused (SIGSTOP) past its session timeout or its ttl
# --------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import json, sys, threading
    import coordlock
    from coordlock.testing.fenced import FencedRegister
    url, register_path, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
    register = FencedRegister(register_path)
    c = coordlock.connect(url)
    lease = c.acquire("paused", ttl)
    states = []
    told = threading.Event()
    lease.on_state(lambda _l, s: states.append(s))
    lease.on_lost(lambda _l: told.set())
    print("ACQUIRED", lease.fence, flush=True)
    sys.stdin.readline()  # SIGSTOPped here; after SIGCONT the test says go
    value = register.read()
    accepted, _ = register.write(value + 1, lease.fence)  # what a resumed holder would do
    told.wait(20)  # never silent: the on_lost callbacks must run
    released = lease.release()
    print(json.dumps({"accepted": accepted, "lost": lease.lost, "told": told.is_set(),
                      "reason": lease.lost_reason, "states": states, "released": released}),
          flush=True)
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
        assert result["lost"] is True and result["told"] is True and "lost" in result["states"]
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
