"""Several scheduler instances on one backend: every tick runs exactly once (fault test T5).

Three instances with clocks skewed -2 s / 0 / +2 s (injected clocks; the machine's clock is
never touched) run a 1 s interval job and a per-second cron job (cronsim's 6-field form, seconds
first). Each run appends a line to a shared file with ``O_APPEND``; the oracle counts runs per
(job, tick): duplicates must be 0 and every tick of the observation window must have run.

Real backends run each instance as its own process (``coordlock.scheduler._worker``); memory://
cannot cross processes, so its variant runs the three instances as threads of this process,
on a 4x accelerated clock. The SIGKILL/SIGSTOP variant is marked ``fault``; it needs processes,
so it does not apply to memory:// (its thread variant has no process to kill).

Bounded: about 40 s per process test (30 ticks plus margins); ``COORDLOCK_SCHED_TICKS`` raises
the tick count for a longer soak.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordlock import BackendUnavailable, connect
from coordlock._lease import Lease
from coordlock.backends.memory import MemoryCoordinator
from coordlock.scheduler import Event, OffsetClock, Scheduler
from coordlock.scheduler._worker import append_line, event_logger, record_run

TICKS = int(os.environ.get("COORDLOCK_SCHED_TICKS", "30"))
CRON = "* * * * * *"  # every second (cronsim: 6 fields, seconds first)
SKEWS = {"minus": -2.0, "zero": 0.0, "plus": 2.0}
MARGIN = 3  # ticks left out at each end of the window (> skew + 1)
THREAD_SPEED = 4.0  # memory:// variant: clock seconds per real second


# -- clocks and instances -----------------------------------------------------------------------


class SharedFastClock:
    """Clocks of the thread variant: one shared origin, a skew each, ``speed`` times real time."""

    def __init__(self, origin: tuple[float, float], offset: float, speed: float) -> None:
        self.wall0, self.mono0 = origin
        self.offset = offset
        self.speed = speed

    def time(self) -> float:
        return self.wall0 + (time.monotonic() - self.mono0) * self.speed + self.offset

    def wait(self, seconds: float, event: threading.Event) -> bool:
        return event.wait(max(seconds, 0.0) / self.speed)


@dataclass
class Cluster:
    """Three (or more) scheduler instances writing to one run log and one event log."""

    url: str
    workdir: Path
    threads: bool
    job_seconds: float = 0.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    scheds: dict[str, Scheduler] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs = self.workdir / "runs.jsonl"
        self.events = self.workdir / "events.jsonl"
        self.speed = THREAD_SPEED if self.threads else 1.0
        self.origin = (time.time(), time.monotonic())

    # time on the zero-offset instance's clock
    def now(self) -> float:
        if not self.threads:
            return time.time()
        wall0, mono0 = self.origin
        return wall0 + (time.monotonic() - mono0) * self.speed

    def sleep_until(self, clock_time: float) -> None:
        left = (clock_time - self.now()) / self.speed
        if left > 0:
            time.sleep(left)

    def start(self, name: str, offset: float) -> None:
        if self.threads:
            self._start_thread(name, offset)
        else:
            self._start_process(name, offset)

    def _start_process(self, name: str, offset: float) -> None:
        err = (self.workdir / f"{name}.err").open("wb")
        self.procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordlock.scheduler._worker",
                "--url",
                self.url,
                "--instance",
                name,
                f"--offset={offset}",
                "--runs",
                str(self.runs),
                "--events",
                str(self.events),
                "--log",
                str(self.workdir / f"{name}.log"),
                "--interval",
                "1",
                "--cron",
                CRON,
                "--job-seconds",
                str(self.job_seconds),
                "--duration",
                "180",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()

    def _start_thread(self, name: str, offset: float) -> None:
        coordinator = MemoryCoordinator(self.url.split("://", 1)[1])
        sched = Scheduler(
            coordinator,
            instance_id=name,
            clock=SharedFastClock(self.origin, offset, self.speed),
            shutdown_grace=5,
        )
        job_seconds = self.job_seconds / self.speed
        sched.add(record_run, 1, name="interval", args=(str(self.runs), job_seconds))
        sched.add(record_run, CRON, name="cron", args=(str(self.runs), job_seconds))
        events = str(self.events)

        sched.on("*", event_logger(events))
        sched.start()
        append_line(events, {"kind": "ready", "instance": name, "t": time.time()})
        self.scheds[name] = sched

    def wait_ready(self, names: list[str], within: float = 60) -> float:
        """Wait until every instance wrote its ready line; returns the clock time then."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            ready = {e["instance"] for e in read_jsonl(self.events) if e["kind"] == "ready"}
            if ready >= set(names):
                return self.now()
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                pytest.fail(f"worker(s) exited before ready: {dead}\n{self.stderr()}")
            time.sleep(0.05)
        pytest.fail(f"instances not ready within {within}s\n{self.stderr()}")

    def stderr(self) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.err")):
            text = path.read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {path.name}\n{text[-3000:]}")
        return "\n".join(parts)

    # faults (processes only)
    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL, "SIGKILL did not kill the worker"
        self.faults.append(f"SIGKILL {name} at {self.now():.3f}")

    def pause(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGSTOP)
        assert wait_state(proc.pid, "T"), "SIGSTOP did not stop the worker"
        self.faults.append(f"SIGSTOP {name} at {self.now():.3f}")

    def resume(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGCONT)
        assert wait_state(proc.pid, "not T"), "SIGCONT did not resume the worker"
        self.faults.append(f"SIGCONT {name} at {self.now():.3f}")

    def stop_all(self) -> None:
        for sched in self.scheds.values():
            sched.stop(wait=True, timeout=10)
            coordinator = sched.coordinator
            if coordinator is not None:
                coordinator.close()
        self.scheds.clear()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                pytest.fail(f"worker {name} did not stop on SIGTERM")
        self.procs.clear()


def wait_state(pid: int, want: str, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if (state == "T") == (want == "T"):
            return True
        time.sleep(0.01)
    return False


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by SIGKILL (never happens with one write; be safe)
    return out


def tick_of(key: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(key.split("@", 1)[1].replace("Z", "+00:00")).timestamp()


def key_of(job: str, tick: float) -> str:
    from coordlock.scheduler import tick_key

    return f"{job}@{tick_key(tick)}"


@pytest.fixture
def cluster(backend_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(backend_url, tmp_path, threads=backend_url.startswith("memory://"))
    try:
        yield c
    finally:
        c.stop_all()


# -- the oracle ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    window: tuple[float, float]
    ticks: int
    runs: dict[str, int]
    duplicates: list[str]
    misses: list[str]
    explained: dict[str, str]
    by_instance: dict[str, int]

    @property
    def unexplained(self) -> list[str]:
        return [k for k in self.misses if k not in self.explained]

    def report(self) -> str:
        lines = [
            f"window {self.ticks} ticks per job; runs {self.runs}; by instance {self.by_instance}",
            f"duplicates {len(self.duplicates)} {self.duplicates[:5]}",
            f"misses {len(self.misses)} (explained {len(self.explained)}) {self.misses[:8]}",
        ]
        lines += [f"  {k}: {why}" for k, why in sorted(self.explained.items())]
        return "\n".join(lines)


def judge(cluster: Cluster, start: float, end: float, victims: tuple[str, ...] = ()) -> Verdict:
    """Count runs per (job, tick): duplicates anywhere, misses inside [start, end]."""
    runs = read_jsonl(cluster.runs)
    events = read_jsonl(cluster.events)
    begins: dict[str, list[str]] = defaultdict(list)
    ends: set[tuple[str, str]] = set()
    by_instance: dict[str, int] = defaultdict(int)
    for r in runs:
        if r["phase"] == "begin":
            begins[r["key"]].append(r["instance"])
            by_instance[r["instance"]] += 1
        else:
            ends.add((r["key"], r["instance"]))
    duplicates = sorted(k for k, who in begins.items() if len(who) > 1)
    first, last = math.ceil(start), math.floor(end)
    window = [float(t) for t in range(first, last + 1)]
    ticks_of = {key_of(job, t): t for job in ("interval", "cron") for t in window}
    misses = [k for k in ticks_of if not begins.get(k)]
    explained: dict[str, str] = {}
    if misses and victims:
        # 1. a victim won the claim and died/froze before running it (at-most-once per tick)
        for name in victims:
            log = cluster.workdir / f"{name}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            for k in misses:
                if f"won claim {k}" in text:
                    explained[k] = f"claimed by {name}, which was killed/stopped before running it"
        # 2. a victim's run was in flight (begin, no end): its no-overlap lease blocked ticks
        in_flight = {
            (k.split("@")[0], who)
            for k, whos in begins.items()
            for who in whos
            if who in victims and (k, who) not in ends
        }
        for k in misses:
            job = k.split("@")[0]
            running_skips = [
                e for e in events if e.get("key") == k and e.get("reason") == "running"
            ]
            if running_skips and any((job, v) in in_flight for v in victims):
                explained.setdefault(k, "blocked by the no-overlap lease of a victim's run")
        # 2b. a victim won the claim and was killed before its "won claim" line reached its
        #     log: a survivor saw the tick claimed elsewhere, no one ran it, and the fault came
        #     within a second after the victim's clock reached the tick
        for k in misses:
            claimed_elsewhere = any(
                e.get("key") == k
                and e.get("reason") == "claimed-elsewhere"
                and e.get("instance") not in victims
                for e in events
            )
            if not claimed_elsewhere:
                continue
            tick = ticks_of[k]
            for fault in cluster.faults:
                signal_name, name, _, when = fault.split()
                after = float(when) - (tick - SKEWS.get(name, 0.0))  # its clock hit the tick
                if signal_name in ("SIGKILL", "SIGSTOP") and name in victims and 0 <= after <= 1:
                    explained.setdefault(
                        k,
                        f"claimed by {name} ({signal_name} {after:.3f}s after its clock reached "
                        "the tick, before it logged the win)",
                    )
        # 3. a frozen process inside an SQLite write transaction blocks every writer
        if cluster.url.startswith("sqlite:"):
            blocked = [
                e for e in events if e.get("reason") == "coordinator-error" or e["kind"] == "missed"
            ]
            if blocked:
                for k in misses:
                    explained.setdefault(
                        k, "SQLite file lock held by the frozen process (fail closed)"
                    )
    counts = {
        job: sum(1 for k in begins if k.startswith(job + "@")) for job in ("interval", "cron")
    }
    return Verdict(
        (start, end), len(window), counts, duplicates, misses, explained, dict(by_instance)
    )


# -- the tests ----------------------------------------------------------------------------------


def test_every_tick_runs_once_across_skewed_instances(cluster: Cluster, backend_name: str) -> None:
    """3 instances, clocks -2/0/+2 s, 1 s interval + per-second cron, 30+ ticks: exactly once."""
    names = list(SKEWS)
    for name, offset in SKEWS.items():
        cluster.start(name, offset)
    ready = cluster.wait_ready(names)
    start = ready + MARGIN
    end = start + TICKS
    cluster.sleep_until(end + MARGIN)
    cluster.stop_all()
    verdict = judge(cluster, start, end)
    print(f"[{backend_name}] {verdict.report()}")
    assert verdict.ticks >= TICKS
    assert verdict.duplicates == []
    assert verdict.misses == []
    # the instance whose clock is ahead reaches ticks first: it ran (almost) all of them
    assert max(verdict.by_instance, key=lambda n: verdict.by_instance[n]) == "plus"


@pytest.mark.fault
def test_every_tick_runs_once_with_kill_and_stop(cluster: Cluster, backend_name: str) -> None:
    """SIGKILL the +2 s instance, later SIGSTOP the 0 s one (and SIGCONT it): duplicates 0, and
    no tick missed while one instance lives (misses only where a victim held the tick)."""
    if cluster.threads:
        pytest.skip("memory:// instances are threads of one process: nothing to SIGKILL/SIGSTOP")
    names = list(SKEWS)
    for name, offset in SKEWS.items():
        cluster.start(name, offset)
    ready = cluster.wait_ready(names)
    start = ready + MARGIN
    cluster.sleep_until(start + 5.37)
    cluster.kill("plus")  # the leader: it wins every tick while it lives
    cluster.sleep_until(start + 11.61)
    cluster.pause("zero")  # now only "minus" (2 s behind) runs ticks
    cluster.sleep_until(start + 20.44)
    cluster.resume("zero")  # it must not run the ticks it slept through a second time
    end = start + TICKS
    cluster.sleep_until(end + MARGIN)
    cluster.stop_all()
    verdict = judge(cluster, start, end, victims=("plus", "zero"))
    print(f"[{backend_name}] faults {cluster.faults}\n{verdict.report()}")
    assert len(cluster.faults) == 3
    assert verdict.ticks >= TICKS
    assert verdict.duplicates == []
    assert verdict.unexplained == []
    assert len(verdict.explained) <= 4 or backend_name == "sqlite"
    # after the kill, the survivors ran the ticks
    assert verdict.by_instance.get("minus", 0) > 0


def test_overlap_false_never_runs_twice_at_once(backend_url: str, tmp_path: Path) -> None:
    """A 2.5 s job every second on 3 instances: its runs never overlap, on any instance."""
    c = Cluster(backend_url, tmp_path, threads=backend_url.startswith("memory://"), job_seconds=2.5)
    try:
        for name, offset in SKEWS.items():
            c.start(name, offset)
        ready = c.wait_ready(list(SKEWS))
        c.sleep_until(ready + 10)
    finally:
        c.stop_all()
    intervals: dict[tuple[str, str, str], list[float]] = {}
    for r in read_jsonl(c.runs):
        intervals.setdefault((r["job"], r["key"], r["instance"]), []).append(r["t"])
    by_job: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (job, _key, _inst), stamps in intervals.items():
        if len(stamps) == 2:
            by_job[job].append((stamps[0], stamps[1]))
    skipped = [e for e in read_jsonl(c.events) if e.get("reason") == "running"]
    for job in ("interval", "cron"):
        spans = sorted(by_job[job])
        assert len(spans) >= 2, f"{job}: too few complete runs {spans}"
        for (_b1, e1), (b2, _e2) in itertools.pairwise(spans):
            assert b2 >= e1, f"{job}: a run began before the previous one ended"
    assert skipped, "a job longer than its period must skip ticks (reason=running)"


# -- fail closed with the coordinator's server down ---------------------------------------------


class Switchable(MemoryCoordinator):
    """memory:// has no server: this one can be switched off (every call raises)."""

    down = False

    def claim_many(self, keys: Any, hold: float) -> set[str]:
        if self.down:
            raise BackendUnavailable("memory server down (simulated)")
        return super().claim_many(keys, hold)

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        if self.down:
            raise BackendUnavailable("memory server down (simulated)")
        return super().acquire(name, ttl, wait=wait, renew=renew)


def _outage(
    backend_name: str, backend_url: str, request: pytest.FixtureRequest
) -> tuple[Any, Callable[[], None], Callable[[], None]]:
    """(coordinator, take the backend down, bring it back) for this backend."""
    if backend_name == "memory":
        coord = Switchable(backend_url.split("://", 1)[1])

        def down() -> None:
            coord.down = True

        def up() -> None:
            coord.down = False

        return coord, down, up
    if backend_name == "sqlite":
        path = backend_url[len("sqlite:///") :]
        coord = connect(backend_url + "?timeout=0.3", retry_deadline=0.5)
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

        def down() -> None:
            blocker.execute("BEGIN EXCLUSIVE")

        def up() -> None:
            blocker.execute("COMMIT")

        request.addfinalizer(blocker.close)
        return coord, down, up
    fixture = {
        "redis": "fresh_redis_server",
        "postgres": "fresh_postgres_server",
        "zookeeper": "fresh_zookeeper_server",
    }[backend_name]
    server = request.getfixturevalue(fixture)
    coord = connect(server.url, retry_deadline=0.5)
    return coord, server.stop, server.start


def test_fail_closed_while_the_backend_is_down(
    backend_name: str, backend_url: str, request: pytest.FixtureRequest
) -> None:
    """Server down → no run and skipped(coordinator-error); runs resume after the restart."""
    coord, down, up = _outage(backend_name, backend_url, request)
    sched = Scheduler(coord, instance_id=f"fc-{uuid.uuid4().hex[:6]}", shutdown_grace=5)
    events: list[Event] = []
    lock = threading.Lock()

    def on_event(event: Event) -> None:
        with lock:
            events.append(event)

    def count(kind: str, reason: str | None = None) -> int:
        with lock:
            return sum(
                1 for e in events if e.kind == kind and (reason is None or e.reason == reason)
            )

    sched.on("*", on_event)
    sched.every(1, name="beat")(lambda: None)
    sched.start()
    try:
        assert _eventually(lambda: count("finished") >= 2, 30), "no run before the outage"
        down()
        assert _eventually(lambda: count("skipped", "coordinator-error") >= 1, 60)
        started_during = count("started")
        assert _eventually(lambda: count("skipped", "coordinator-error") >= 3, 60)
        assert count("started") == started_during, "a job ran while the coordinator was down"
        up()
        assert _eventually(lambda: count("finished") >= started_during + 1, 90), (
            "runs did not resume after the backend came back"
        )
    finally:
        sched.stop(wait=True, timeout=10)
        coord.close()
    print(
        f"[{backend_name}] runs {count('finished')}, "
        f"coordinator-error skips {count('skipped', 'coordinator-error')}"
    )


def _eventually(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- a tick claimed by an instance killed before running it is reported missed ------------------


class FreezeOnJobLease(MemoryCoordinator):
    """memory:// variant of ``_worker --die-on-lease`` (a thread cannot be SIGKILLed): at a
    job's lease the instance goes silent – renewals stop, so its liveness lease runs out – and
    the worker thread hangs until the test ends."""

    def __init__(self, name: str, release: threading.Event) -> None:
        super().__init__(name)
        self._release = release

    def acquire(
        self, name: str, ttl: float, *, wait: float | None = None, renew: bool = True
    ) -> Lease | None:
        if name.startswith("coordlock:job:"):
            self.close()
            self._release.wait(120)
        return super().acquire(name, ttl, wait=wait, renew=renew)


def test_a_tick_claimed_by_an_instance_killed_before_running_it_is_missed(
    backend_name: str, backend_url: str, tmp_path: Path
) -> None:
    """The victim (clock 1 s ahead: it wins the next tick) records its claim and dies before
    the run; the survivor's watchdog reports that tick ``missed`` once, and runs the next ones."""
    runs, log = tmp_path / "runs.jsonl", tmp_path / "victim.log"
    coordinator = connect(backend_url)
    survivor = Scheduler(
        coordinator, instance_id="survivor", watchdog_interval=0.5, shutdown_grace=5
    )
    events: list[Event] = []
    lock = threading.Lock()

    def on_event(event: Event) -> None:
        with lock:
            events.append(event)

    def of(kind: str, reason: str | None = None) -> list[Event]:
        with lock:
            return [e for e in events if e.kind == kind and (reason in (None, e.reason))]

    survivor.on("*", on_event)
    survivor.add(record_run, 1, name="interval", args=(str(runs), 0.0))
    release = threading.Event()
    victim: subprocess.Popen[bytes] | Scheduler
    survivor.start()
    try:
        if backend_name == "memory":
            victim = Scheduler(
                FreezeOnJobLease(backend_url.split("://", 1)[1], release),
                instance_id="victim",
                clock=OffsetClock(1.0),
                heartbeat_ttl=1.5,
            )
            victim.add(record_run, 1, name="interval", args=(str(runs), 0.0))
            victim.start()
        else:
            victim = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coordlock.scheduler._worker",
                    *("--url", backend_url, "--instance", "victim", "--offset=1"),
                    *("--runs", str(runs), "--log", str(log), "--interval", "1"),
                    *("--heartbeat-ttl", "1.5", "--die-on-lease", "--duration", "60"),
                ],
                stdin=subprocess.DEVNULL,
            )
        assert _eventually(lambda: bool(of("missed", "instance-vanished")), 45), (
            "no missed event for the tick the victim claimed"
        )
        finished_before = len(of("finished"))
        assert _eventually(lambda: len(of("finished")) > finished_before, 15)
        if isinstance(victim, subprocess.Popen):
            assert victim.wait(10) == -signal.SIGKILL
        rows = {r.run_id: r for r in coordinator.history("interval", 200)}  # before release
    finally:
        release.set()
        survivor.stop(wait=True, timeout=10)
        if isinstance(victim, Scheduler):
            victim.stop(wait=False)
        elif victim.poll() is None:
            victim.kill()
            victim.wait(10)
    (missed,) = of("missed", "instance-vanished")
    coordinator.close()
    victims = [r for r in rows.values() if r.instance == "victim"]
    print(
        f"[{backend_name}] instances 2, victim rows {[(r.tick, r.status) for r in victims]}, "
        f"survivor runs {len(of('finished'))}, missed {missed.key}"
    )
    assert [r.status for r in victims] == ["missed"]  # its one claim, reported
    assert missed.key == f"interval@{victims[0].tick}" and missed.run_id == victims[0].run_id
    assert "vanished before starting it" in (missed.error or "")
    assert missed.key not in {
        f"interval@{r.tick}" for r in rows.values() if r.status == "finished"
    }  # at most once: nobody ran that tick
    if log.exists():
        assert f"won claim {missed.key}" in log.read_text()
