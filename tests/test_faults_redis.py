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
    url: str, directory: Path, workers: int, **options: Any
) -> tuple[dict[str, subprocess.Popen[str]], FencedRegister, HistoryLog]:
    register = FencedRegister(directory / "register.json")
    history = HistoryLog(directory / "history.jsonl")
    procs = {
        f"w{i}": subprocess.Popen(
            worker_command(url, register.path, history.path, f"w{i}", **options),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(workers)
    }
    return procs, register, history


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


def accepted_between(history: HistoryLog, worker: str, t0: float, t1: float) -> bool:
    """True if another worker had a write accepted between monotonic times t0 and t1."""
    return any(
        e["op"] == "write" and e["accepted"] and e["w"] != worker and t0 < e["t"] < t1
        for e in history.events()
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
    rng = random.Random(4)
    stop_at = time.monotonic() + budget * 0.6
    # Inject only while most of the work is still ahead, so others are there to take over.
    latest = workers * iterations * 0.7
    while faults.injected < pauses and time.monotonic() < stop_at:
        if any(p.poll() is not None for p in procs.values()):
            break
        if register.state()["accepted"] > latest:
            break
        time.sleep(rng.uniform(0.05, 0.3))
        step = holder_now(history)
        if step is None:
            continue
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
    for worker, fence, t0, t1 in faults.pauses:
        assert accepted_between(history, worker, t0, t1), (
            f"nobody took over while {worker} was stopped: the fault did not bite"
        )
        writes = [
            e for e in events if e["op"] == "write" and e["w"] == worker and e["fence"] == fence
        ]
        assert writes and not any(e["accepted"] for e in writes), (
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
    assert report.writes_rejected >= len(faults.pauses)


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
def test_t6_soak(fresh_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    made, successes = non_owner_scenario(fresh_redis_server, 20000)
    with capsys.disabled():
        print(f"\n[redis fault] T6 soak: attempts={made} successes={successes}", flush=True)
    assert successes == 0
