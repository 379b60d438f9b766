"""Fault tests of the Redis backend against real, throwaway ``redis-server`` processes.

Designs from ``shared/fault-tests.md``; the oracle is the fenced register
(:mod:`coordlock.testing.fenced`). Each test checks that its fault really happened (the holder
was stopped while holding, the server restarted with a new run id, the process died) before it
judges the outcome, and prints its counts (acquisitions, faults injected, C1–C4).

* T1 holder paused past its ttl (SIGSTOP for 2 × ttl, SIGCONT) among 8 worker processes;
* T2 holder killed (SIGKILL): the lock frees after its ttl, the next fence is greater;
* T2 Redis killed and restarted without persistence mid-run: no fence regression, recovery;
* T6 non-owners: forged owner tokens (also another name's, another coordinator's) never win.

The ``fault`` versions are bounded to keep the file well under two minutes; the
``coordlock_soak`` versions (``pytest --coordlock-soak``) run the same scenarios longer.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import coordlock
from coordlock._lease import Lease
from coordlock.backends.redis import RedisCoordinator
from coordlock.testing.fenced import FencedRegister, HistoryLog, Report, check, worker_command
from coordlock.testing.servers import RedisServer

pytest.importorskip("redis")

HOLDING = ("acquired", "read")  # a worker whose last step is one of these holds the lock
#: Marks of a soak: opt-in, and a longer bound than the suite's per-test timeout.
SOAK = [pytest.mark.coordlock_soak, pytest.mark.timeout(3600)]


@dataclass
class Faults:
    """What a scenario injected, for the report and the checks."""

    injected: int = 0
    attempts: int = 0
    pauses: list[tuple[str, int, float, float]] = field(default_factory=list)  # w, fence, t0, t1
    restarts: int = 0


def rc(url: str, **options: Any) -> RedisCoordinator:
    """``coordlock.connect`` typed as the Redis backend (it must pick that backend)."""
    coordinator = coordlock.connect(url, **options)
    assert isinstance(coordinator, RedisCoordinator)
    return coordinator


def report_line(
    capsys: pytest.CaptureFixture[str], title: str, report: Report, faults: Faults, extra: str = ""
) -> None:
    with capsys.disabled():
        print(
            f"\n[redis fault] {title}: acquisitions={report.acquisitions} "
            f"faults_injected={faults.injected} (attempts {faults.attempts}) "
            f"C1_overlaps={report.c1_overlaps} C2_stale_accepted={report.c2_stale_accepted} "
            f"C3_lost_updates={report.c3_lost_updates} "
            f"C4_fence_inversions={report.c4_fence_inversions} "
            f"writes_accepted={report.writes_accepted} writes_rejected={report.writes_rejected} "
            f"lost_leases={report.lost_leases} {extra}".rstrip(),
            flush=True,
        )


def prefixed(server: RedisServer) -> str:
    return f"{server.url}?prefix=fault-{uuid.uuid4().hex[:8]}:"


def start_workers(
    url: str | dict[str, str], directory: Path, workers: int, **options: Any
) -> tuple[dict[str, subprocess.Popen[str]], FencedRegister, HistoryLog]:
    """``workers`` fenced worker processes ``w0``…; ``url`` may differ per worker (a dict)."""
    register = FencedRegister(directory / "register.json")
    history = HistoryLog(directory / "history.jsonl")
    procs = {
        f"w{i}": subprocess.Popen(
            worker_command(
                url if isinstance(url, str) else url[f"w{i}"],
                register.path, history.path, f"w{i}", **options,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(workers)
    }  # fmt: skip
    return procs, register, history


def holder_steps(
    procs: dict[str, subprocess.Popen[str]],
    register: FencedRegister,
    history: HistoryLog,
    faults: Faults,
    *,
    count: int,
    budget: float,
    total: int,
    seed: int,
) -> Iterator[dict[str, Any]]:
    """Now and then, the step of the worker holding the lock, until ``count`` faults were
    injected (the caller counts them). Only while most of the work is still ahead (so others
    are there to take over), and while every worker runs."""
    rng = random.Random(seed)
    stop_at = time.monotonic() + budget * 0.6
    while faults.injected < count and time.monotonic() < stop_at:
        if any(p.poll() is not None for p in procs.values()):
            return
        if register.state()["accepted"] > total * 0.7:
            return
        time.sleep(rng.uniform(0.05, 0.3))
        step = holder_now(history)
        if step is not None:
            yield step


def finish_workers(procs: dict[str, subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    failures = []
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{name}: exit {proc.returncode}: {out[-1500:]}")
    assert not failures, "worker processes failed:\n" + "\n".join(failures)


@pytest.fixture
def workers_cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; resumed and killed if the test ends early."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait(10)


def tail_events(history: HistoryLog, size: int = 8192) -> list[dict[str, Any]]:
    """The last events of the history (cheap: reads only the end of the file)."""
    try:
        with open(history.path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            lines = handle.read().decode(errors="replace").splitlines()[1:]
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def register_idle(register: FencedRegister) -> bool:
    """True if nobody holds the register's file lock right now (no read/write in progress)."""
    with open(f"{register.path}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def holder_now(history: HistoryLog, worker: str | None = None) -> dict[str, Any] | None:
    """The step of the worker holding the lock right now (of ``worker`` only, if given)."""
    for event in reversed(tail_events(history)):
        if worker is not None and event["w"] != worker:
            continue
        if event["op"] in ("acquired", "read", "write", "released", "release-result"):
            return event if event["op"] in HOLDING else None
    return None


def accepted_between(events: list[dict[str, Any]], worker: str, t0: float, t1: float) -> bool:
    """True if another worker had a write accepted between monotonic times t0 and t1."""
    return any(
        e["op"] == "write" and e["accepted"] and e["w"] != worker and t0 < e["t"] < t1
        for e in events
    )


# ---------------------------------------------------------------------------------------------
# T1: holder paused past its ttl
# ---------------------------------------------------------------------------------------------


def pause_scenario(
    server: RedisServer,
    tmp_path: Path,
    cleanup: list[subprocess.Popen[str]],
    *,
    workers: int,
    iterations: int,
    pauses: int,
    ttl: float,
    budget: float,
) -> tuple[Report, Faults, HistoryLog]:
    url = prefixed(server)
    procs, register, history = start_workers(
        url,
        tmp_path,
        workers,
        iterations=iterations,
        ttl=ttl,
        wait=budget,
        hold=0.005,
        deadline=budget,
    )
    cleanup.extend(procs.values())
    faults = Faults()
    total = workers * iterations
    for step in holder_steps(
        procs, register, history, faults, count=pauses, budget=budget, total=total, seed=4
    ):
        worker = step["w"]
        proc = procs[worker]
        faults.attempts += 1
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        step = holder_now(history, worker)
        # A valid pause lands between the worker's read and its write (in its `hold` sleep).
        # A pause inside the register's own read would freeze the resource itself (its file
        # lock), which fencing cannot help with; skip those and the already-released ones.
        if step is None or step["op"] != "read" or not register_idle(register):
            os.kill(proc.pid, signal.SIGCONT)
            continue
        time.sleep(2 * ttl)
        os.kill(proc.pid, signal.SIGCONT)
        faults.pauses.append((worker, int(step["fence"]), t0, time.monotonic()))
        faults.injected += 1
    finish_workers(procs, budget)
    return check(history, register), faults, history


def judge_pauses(report: Report, faults: Faults, history: HistoryLog) -> None:
    events = history.events()
    late_writes = 0
    for worker, fence, t0, t1 in faults.pauses:
        assert accepted_between(events, worker, t0, t1), (
            f"nobody took over while {worker} was stopped: the fault did not bite"
        )
        takeover = min(
            e["seq"] for e in events
            if e["op"] == "write" and e["accepted"] and e["w"] != worker and t0 < e["t"] < t1
        )  # fmt: skip
        writes = [
            e for e in events if e["op"] == "write" and e["w"] == worker and e["fence"] == fence
        ]
        assert writes, f"{worker} never tried its write with fence {fence}"
        # A stop can land after the register applied the write but before the worker logged
        # it: that write came before the takeover (lower sequence number) and was legitimate.
        late = [e for e in writes if not (e["accepted"] and e["seq"] < takeover)]
        late_writes += bool(late)
        assert not any(e["accepted"] for e in late), (
            f"{worker}'s write with fence {fence} after its pause was accepted"
        )
        lost = any(e["op"] == "lost" and e["w"] == worker and e["fence"] == fence for e in events)
        refused = any(
            e["op"] == "release-result" and e["w"] == worker and e["fence"] == fence and not e["ok"]
            for e in events
        )
        assert lost or refused, f"{worker}'s lease (fence {fence}) was never seen as lost"
    assert report.c2_stale_accepted == 0
    assert report.c3_lost_updates == 0
    assert report.c4_fence_inversions == 0
    assert report.writes_rejected >= late_writes


@pytest.mark.fault
def test_t1_paused_holder_is_fenced_off(
    fresh_redis_server: RedisServer,
    tmp_path: Path,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report, faults, history = pause_scenario(
        fresh_redis_server,
        tmp_path,
        workers_cleanup,
        workers=8,
        iterations=250,
        pauses=3,
        ttl=1.0,
        budget=100.0,
    )
    report_line(capsys, "T1 SIGSTOP holder 2x ttl", report, faults)
    assert faults.injected >= 1, "no pause ever caught a holder"
    assert report.acquisitions >= 2000
    judge_pauses(report, faults, history)


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_t1_soak(
    fresh_redis_server: RedisServer,
    tmp_path: Path,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report, faults, history = pause_scenario(
        fresh_redis_server,
        tmp_path,
        workers_cleanup,
        workers=8,
        iterations=2500,
        pauses=20,
        ttl=0.5,
        budget=900.0,
    )
    report_line(capsys, "T1 soak", report, faults)
    assert faults.injected >= 10
    assert report.acquisitions >= 20000
    judge_pauses(report, faults, history)


# ---------------------------------------------------------------------------------------------
# T2: holder killed with SIGKILL
# ---------------------------------------------------------------------------------------------

HOLDER = """
import sys, time, coordlock
c = coordlock.connect(sys.argv[1])
lease = c.acquire(sys.argv[2], float(sys.argv[3]), wait=30)
print(lease.fence, flush=True)
time.sleep(600)
"""


def kill_scenario(
    server: RedisServer,
    cleanup: list[subprocess.Popen[str]],
    kills: int,
    ttl: float,
) -> tuple[int, int, list[tuple[int, int]]]:
    url = prefixed(server)
    pairs: list[tuple[int, int]] = []
    still_held = 0
    with rc(url) as survivor:
        for _ in range(kills):
            proc = subprocess.Popen(
                [sys.executable, "-c", HOLDER, url, "victim", str(ttl)],
                stdout=subprocess.PIPE,
                text=True,
            )
            cleanup.append(proc)
            assert proc.stdout is not None
            fence = int(proc.stdout.readline())
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL  # the fault happened
            if survivor.acquire("victim", ttl, renew=False) is None:
                still_held += 1  # the dead holder's key outlives it until its ttl
            else:  # (only on a machine so slow that the ttl ran out meanwhile)
                pairs.append((fence, fence + 1))
                continue
            taken = survivor.acquire("victim", 30, wait=30)
            assert taken is not None, "the lock never freed after the holder died"
            pairs.append((fence, taken.fence))
            assert taken.release()
    return kills, still_held, pairs


@pytest.mark.fault
def test_t2_killed_holder_frees_after_ttl(
    fresh_redis_server: RedisServer,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    kills, still_held, pairs = kill_scenario(fresh_redis_server, workers_cleanup, 4, 1.0)
    with capsys.disabled():
        print(
            f"\n[redis fault] T2 SIGKILL holder: kills={kills} held_after_kill={still_held} "
            f"next_fence_greater={sum(b > a for a, b in pairs)}/{len(pairs)}",
            flush=True,
        )
    assert still_held >= 1
    assert all(after > before for before, after in pairs)


# ---------------------------------------------------------------------------------------------
# T2: Redis killed and restarted without persistence, mid-run
# ---------------------------------------------------------------------------------------------


def server_run_id(server: RedisServer) -> str:
    match = re.search(r"run_id:(\w+)", str(server.command("INFO", "server")))
    assert match, "INFO server has no run_id"
    return match.group(1)


def restart_scenario(
    server: RedisServer,
    tmp_path: Path,
    cleanup: list[subprocess.Popen[str]],
    *,
    workers: int,
    iterations: int,
    restarts: int,
    budget: float,
) -> tuple[Report, Faults, int]:
    """Kill -9 and restart Redis (empty) ``restarts`` times while workers run.

    Each kill is aimed at a moment when some worker holds the lock. Returns the report, the
    faults and how many holders were caught by a restart (their release then failed).
    """
    url = prefixed(server)
    procs, register, history = start_workers(
        url,
        tmp_path,
        workers,
        iterations=iterations,
        ttl=2.0,
        wait=budget,
        hold=0.005,
        deadline=budget,
    )
    cleanup.extend(procs.values())
    faults = Faults()
    held_at_kill: list[tuple[str, int]] = []
    stop_at = time.monotonic() + budget * 0.6
    step = workers * iterations // (restarts + 1)
    while faults.restarts < restarts and time.monotonic() < stop_at:
        if all(p.poll() is not None for p in procs.values()):
            break
        if register.state()["accepted"] < step * (faults.restarts + 1):
            time.sleep(0.05)
            continue
        holder = holder_now(history)
        if holder is None and faults.attempts < 20 * (faults.restarts + 1):
            faults.attempts += 1
            time.sleep(0.002)
            continue  # aim the crash at a held lock (but do not insist forever)
        run_id = server_run_id(server)
        old_pid = server.pid
        server.kill()
        time.sleep(0.3)
        server.start()
        assert server.pid != old_pid and server_run_id(server) != run_id  # really restarted
        if holder is not None:
            held_at_kill.append((holder["w"], int(holder["fence"])))
        faults.restarts += 1
        faults.injected += 1
    finish_workers(procs, budget)
    events = history.events()
    caught = sum(
        any(
            e["op"] == "release-result" and e["w"] == w and e["fence"] == f and not e["ok"]
            for e in events
        )
        for w, f in held_at_kill
    )
    return check(history, register), faults, caught


@pytest.mark.fault
def test_t2_redis_restart_mid_run(
    fresh_redis_server: RedisServer,
    tmp_path: Path,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report, faults, caught = restart_scenario(
        fresh_redis_server,
        tmp_path,
        workers_cleanup,
        workers=6,
        iterations=150,
        restarts=2,
        budget=90.0,
    )
    report_line(
        capsys,
        "T2 kill -9 + restart Redis (no persistence)",
        report,
        faults,
        f"restarts={faults.restarts} holders_caught={caught}",
    )
    assert faults.restarts == 2, "the server was not restarted mid-run"
    assert report.acquisitions == 6 * 150  # every client recovered and finished
    assert report.c2_stale_accepted == 0
    assert report.c3_lost_updates == 0
    assert report.c4_fence_inversions == 0  # no fence regression across the restarts
    assert report.final_value == report.writes_accepted


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_t2_restart_soak(
    fresh_redis_server: RedisServer,
    tmp_path: Path,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report, faults, caught = restart_scenario(
        fresh_redis_server,
        tmp_path,
        workers_cleanup,
        workers=8,
        iterations=1500,
        restarts=10,
        budget=900.0,
    )
    report_line(
        capsys, "T2 restart soak", report, faults, f"restarts={faults.restarts} caught={caught}"
    )
    assert faults.restarts == 10
    assert report.acquisitions == 8 * 1500
    assert report.c2_stale_accepted == report.c3_lost_updates == report.c4_fence_inversions == 0


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_t2_kill_soak(
    fresh_redis_server: RedisServer,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    kills, still_held, pairs = kill_scenario(fresh_redis_server, workers_cleanup, 40, 0.5)
    with capsys.disabled():
        print(f"\n[redis fault] T2 kill soak: kills={kills} held_after_kill={still_held}")
    assert all(after > before for before, after in pairs)


# ---------------------------------------------------------------------------------------------
# T6: non-owners
# ---------------------------------------------------------------------------------------------


def non_owner_scenario(server: RedisServer, attempts: int) -> tuple[int, int]:
    """Forged release/extend attempts; returns (attempts made, successes)."""
    url = prefixed(server)
    rng = random.Random(6)
    made = successes = 0
    other_prefix = f"{server.url}?prefix=elsewhere-{uuid.uuid4().hex[:6]}:"
    with (
        rc(url) as owner_side,
        rc(url) as other,
        rc(other_prefix) as foreign,
    ):
        x = owner_side.acquire("x", 60)
        y = owner_side.acquire("y", 60)
        assert x is not None and y is not None
        for i in range(attempts):
            kind = i % 4
            if kind == 0:  # a random token
                forged = Lease(other, "x", uuid.uuid4().hex, x.fence, 60, time.monotonic())
            elif kind == 1:  # the owner token of another name
                forged = Lease(other, "x", y.owner, x.fence, 60, time.monotonic())
            elif kind == 2:  # the right token, through a coordinator with another prefix
                forged = Lease(foreign, "x", x.owner, x.fence, 60, time.monotonic())
            else:  # a near miss: the right token with one character changed
                flip = rng.randrange(len(x.owner))
                wrong = "0" if x.owner[flip] != "0" else "1"
                token = x.owner[:flip] + wrong + x.owner[flip + 1 :]
                forged = Lease(other, "x", token, x.fence, 60, time.monotonic())
            made += 2
            successes += bool(forged.coordinator.extend(forged, 60))
            successes += bool(forged.coordinator.release(forged))
        # Still held by the real owner, untouched.
        assert other.acquire("x", 10) is None and other.acquire("y", 10) is None
        assert not x.lost and not y.lost
        # After a takeover, the old owner is a non-owner too.
        stale = owner_side.acquire("z", 0.3, renew=False)
        assert stale is not None
        fresh = other.acquire("z", 30, wait=30)
        assert fresh is not None and fresh.fence > stale.fence
        made += 2
        successes += bool(stale.extend(30)) + bool(stale.release())
        assert fresh.release() is True
        assert x.release() and y.release()
    return made, successes


@pytest.mark.fault
def test_t6_non_owners_never_succeed(
    fresh_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    made, successes = non_owner_scenario(fresh_redis_server, 400)
    with capsys.disabled():
        print(f"\n[redis fault] T6 non-owner: attempts={made} successes={successes}", flush=True)
    assert successes == 0


@pytest.mark.coordlock_soak
@pytest.mark.timeout(3600)
def test_t6_soak(fresh_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    made, successes = non_owner_scenario(fresh_redis_server, 20000)
    with capsys.disabled():
        print(f"\n[redis fault] T6 soak: attempts={made} successes={successes}", flush=True)
    assert successes == 0


# ---------------------------------------------------------------------------------------------
# T3 / T7: the holder partitioned from Redis (fault proxy), the waiter not
# ---------------------------------------------------------------------------------------------


@dataclass
class PartitionRounds:
    rounds: int = 0
    lost_delays: list[float] = field(default_factory=list)  # on_lost − freeze, seconds
    lost_before_takeover: int = 0
    stale_accepted: int = 0  # the healed holder's write with its old fence, accepted
    stale_rejected: int = 0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def partition_rounds(
    server: RedisServer, make_proxy: Any, register: FencedRegister, rounds: int, ttl: float
) -> PartitionRounds:
    """Each round: the holder (through a fault proxy) takes a lock and writes; the proxy
    freezes (a silent partition); a waiter (direct) takes over once the key expires and
    writes; the holder's ``on_lost`` time is recorded; the partition heals and the holder tries
    a write with its old fence, which the fenced register must reject."""
    proxy = make_proxy(server.port)
    prefix = f"part-{uuid.uuid4().hex[:8]}:"
    # Short socket timeout and retry deadline: a frozen call gives up soon, as in production
    # settings for a lease this short.
    via = proxy.via(server.url) + f"?prefix={prefix}&socket_timeout=0.2&retry_deadline=0.3"
    out = PartitionRounds()
    with rc(via) as holder, rc(f"{server.url}?prefix={prefix}") as waiter:
        for i in range(rounds):
            name = f"p{i}"
            lease = holder.acquire(name, ttl)
            assert lease is not None
            lost_at: list[float] = []
            lease.on_lost(lambda _, lost_at=lost_at: lost_at.append(time.monotonic()))
            value = register.read(lease.fence)
            assert register.write(value + 1, lease.fence)[0]
            frozen_at = time.monotonic()
            proxy.freeze()
            assert proxy.stats.mode == "freeze"  # the fault happened
            taken = waiter.acquire(name, 30, wait=ttl * 3 + PARTITION_PATIENCE)
            taken_at = time.monotonic()
            assert taken is not None and taken.fence > lease.fence, "nobody took over"
            value = register.read(taken.fence)
            assert register.write(value + 1, taken.fence)[0]
            stop = time.monotonic() + PARTITION_PATIENCE
            while not lost_at and time.monotonic() < stop:
                time.sleep(0.005)
            assert lost_at, "the partitioned holder was never told its lease was lost"
            out.lost_delays.append(lost_at[0] - frozen_at)
            out.lost_before_takeover += lost_at[0] <= taken_at
            proxy.heal()
            accepted, _ = register.write(register.read() + 1, lease.fence)
            out.stale_accepted += accepted
            out.stale_rejected += not accepted
            assert lease.release() is False  # not ours any more; deletes nothing
            assert taken.release() is True
            out.rounds += 1
    return out


PARTITION_PATIENCE = 15.0


def report_partitions(
    capsys: pytest.CaptureFixture[str], title: str, r: PartitionRounds, ttl: float
) -> None:
    with capsys.disabled():
        print(
            f"\n[redis fault] {title}: rounds={r.rounds} ttl={ttl}s "
            f"on_lost_delay_p50={percentile(r.lost_delays, 0.5) * 1000:.0f}ms "
            f"p99={percentile(r.lost_delays, 0.99) * 1000:.0f}ms "
            f"max={max(r.lost_delays) * 1000:.0f}ms "
            f"lost_before_takeover={r.lost_before_takeover}/{r.rounds} "
            f"stale_writes_accepted={r.stale_accepted} "
            f"healed_holder_writes_rejected={r.stale_rejected}/{r.rounds}",
            flush=True,
        )


@pytest.mark.parametrize(
    "rounds",
    [pytest.param(6, marks=pytest.mark.fault, id="fault"),
     pytest.param(100, marks=SOAK, id="soak")],
)  # fmt: skip
def test_t3_partitioned_holder_is_told_and_fenced_off(
    redis_server: RedisServer,
    fault_proxy: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rounds: int,
) -> None:
    ttl = 1.0
    register = FencedRegister(tmp_path / "register.json")
    r = partition_rounds(redis_server, fault_proxy, register, rounds=rounds, ttl=ttl)
    report_partitions(capsys, f"T3/T7 partition (freeze) of the holder, {rounds} rounds", r, ttl)
    assert r.rounds == rounds
    assert r.stale_accepted == 0 and r.stale_rejected == r.rounds


def partition_scenario(
    server: RedisServer,
    make_proxy: Any,
    tmp_path: Path,
    cleanup: list[subprocess.Popen[str]],
    *,
    workers: int,
    iterations: int,
    partitions: int,
    ttl: float,
    budget: float,
) -> tuple[Report, Faults, HistoryLog]:
    """Fenced workers, each talking to Redis through a fault proxy of its own; the current
    holder's proxy is frozen for 2 × ttl (a silent partition), then healed."""
    prefix = f"fault-{uuid.uuid4().hex[:8]}:"
    proxies = {f"w{i}": make_proxy(server.port) for i in range(workers)}
    query = f"?prefix={prefix}&socket_timeout=0.25&retry_deadline=0.5"
    urls = {w: proxy.via(server.url) + query for w, proxy in proxies.items()}
    procs, register, history = start_workers(
        urls, tmp_path, workers,
        iterations=iterations, ttl=ttl, wait=budget, hold=0.005, deadline=budget,
    )  # fmt: skip
    cleanup.extend(procs.values())
    faults = Faults()
    total = workers * iterations
    for step in holder_steps(
        procs, register, history, faults, count=partitions, budget=budget, total=total, seed=3
    ):
        if step["op"] != "read":
            continue
        worker = step["w"]
        faults.attempts += 1
        proxies[worker].freeze()
        t0 = time.monotonic()
        time.sleep(2 * ttl)
        proxies[worker].heal()
        faults.pauses.append((worker, int(step["fence"]), t0, time.monotonic()))
        faults.injected += 1
    finish_workers(procs, budget)
    return check(history, register), faults, history


def judge_partitions(report: Report, faults: Faults, history: HistoryLog) -> None:
    """The frozen holder keeps running (only its network is cut), so its own write right after
    the freeze is legitimate (its lease is still valid then); what must hold is that no stale
    write is ever accepted, and that a frozen holder someone took over from heard of it (lost,
    a refused release, or an error from its release call)."""
    events = history.events()
    for worker, fence, t0, t1 in faults.pauses:
        if accepted_between(events, worker, t0, t1):
            told = any(
                e["w"] == worker and e.get("fence") in (fence, None) and t0 <= e["t"]
                and (e["op"] in ("lost", "error")
                     or (e["op"] == "release-result" and not e["ok"]))
                for e in events
            )  # fmt: skip
            assert told, f"{worker} (fence {fence}) was taken over and never told"
    assert report.c2_stale_accepted == 0
    assert report.c3_lost_updates == 0
    assert report.c4_fence_inversions == 0


@pytest.mark.parametrize(
    ("workers", "iterations", "partitions"),
    [pytest.param(4, 150, 3, marks=pytest.mark.fault, id="fault"),
     pytest.param(8, 1300, 20, marks=SOAK, id="soak")],
)  # fmt: skip
def test_t3_partitioned_workers(
    redis_server: RedisServer,
    fault_proxy: Any,
    tmp_path: Path,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
    workers: int,
    iterations: int,
    partitions: int,
) -> None:
    report, faults, history = partition_scenario(
        redis_server, fault_proxy, tmp_path, workers_cleanup, workers=workers,
        iterations=iterations, partitions=partitions, ttl=1.0, budget=100.0 + iterations,
    )  # fmt: skip
    report_line(capsys, f"T3 partition (freeze) of the holder, {workers} workers", report, faults)
    assert faults.injected >= min(partitions, 10), "too few partitions caught a holder"
    assert report.acquisitions == workers * iterations
    judge_partitions(report, faults, history)


# ---------------------------------------------------------------------------------------------
# T2: fenced workers killed with SIGKILL mid-run (and replaced)
# ---------------------------------------------------------------------------------------------


def kill_workers_scenario(
    server: RedisServer,
    tmp_path: Path,
    cleanup: list[subprocess.Popen[str]],
    *,
    workers: int,
    iterations: int,
    kills: int,
    ttl: float,
    budget: float,
) -> tuple[Report, Faults]:
    """Fenced workers; the current holder is SIGKILLed now and then and a fresh worker takes
    its place (with the iterations it had left), so the run keeps its total."""
    url = prefixed(server)
    register = FencedRegister(tmp_path / "register.json")
    history = HistoryLog(tmp_path / "history.jsonl")
    opts = {"ttl": ttl, "wait": budget, "hold": 0.002, "deadline": budget}

    def spawn(worker: str, count: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            worker_command(url, register.path, history.path, worker, iterations=count, **opts),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        cleanup.append(proc)
        return proc

    procs = {f"w{i}": spawn(f"w{i}", iterations) for i in range(workers)}
    killed: dict[str, subprocess.Popen[str]] = {}
    faults = Faults()
    stop_at = time.monotonic() + budget * 0.7
    step = workers * iterations // (kills + 1)
    while faults.injected < kills and time.monotonic() < stop_at:
        if register.state()["accepted"] < step * (faults.injected + 1):
            time.sleep(0.05)
            continue
        holder = holder_now(history)
        if holder is None or holder["w"] not in procs:
            time.sleep(0.002)
            continue
        worker = holder["w"]
        proc = procs.pop(worker)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL  # the fault happened
        killed[worker] = proc
        done = sum(1 for e in history.events() if e["op"] == "acquired" and e["w"] == worker)
        replacement = f"{worker}r{faults.injected}"
        procs[replacement] = spawn(replacement, max(1, iterations - done))
        faults.injected += 1
    finish_workers(procs, budget)
    return check(history, register), faults


@pytest.mark.parametrize(
    ("workers", "iterations", "kills"),
    [pytest.param(4, 150, 2, marks=pytest.mark.fault, id="fault"),
     pytest.param(8, 1300, 20, marks=SOAK, id="soak")],
)  # fmt: skip
def test_t2_killed_fenced_workers(
    fresh_redis_server: RedisServer,
    tmp_path: Path,
    workers_cleanup: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
    workers: int,
    iterations: int,
    kills: int,
) -> None:
    report, faults = kill_workers_scenario(
        fresh_redis_server, tmp_path, workers_cleanup, workers=workers,
        iterations=iterations, kills=kills, ttl=0.5, budget=100.0 + iterations,
    )  # fmt: skip
    report_line(capsys, f"T2 SIGKILL holder, {workers} workers", report, faults)
    assert faults.injected == kills
    assert report.acquisitions >= workers * iterations - kills  # killed rounds were redone
    assert report.c2_stale_accepted == report.c3_lost_updates == report.c4_fence_inversions == 0
