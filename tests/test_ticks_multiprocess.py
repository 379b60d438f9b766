"""Once per tick outside the Scheduler, on every backend: three servers whose crons fire 0, 0.8
and 1.6 s after each tick of an ``--every 4s`` schedule (as crontabs on skewed servers fire)
start the job as a process of its own each time; over seven ticks, each tick ran exactly once
and no tick ran twice. (On a machine so loaded that a run still holds the lock when the next
tick is won, that tick is refused as ``running`` — the no-overlap rule — and reported; at least
five ticks must run once. Starts that come seconds late belong to a later tick: the test
follows the tick each start named, recorded by ``tick_server.py``.)

Three jobs run side by side (``tests/tick_server.py``): the crontab line ``coordlock run
--every 4s``, a ``@coordlock.locked(every=4)`` function and the same on an ``async def``. On the
last tick the winning process of the crontab line and of the decorated function is SIGKILLed
mid-run: the later servers must not run that tick again (they find its claim taken).

The jobs finish in milliseconds, long before the later servers start: a plain lock would let
each of them run the tick again. memory:// cannot cross processes: its three servers are
threads of this process, and its "kill" is a winner that stalls through the later starts.

All selected backends run at once, in one experiment of about 30 s (the module fixture); each
test then checks one backend's part. Bounded: every process has a deadline.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tick_server

from coordlock import connect
from coordlock.testing.plugin import selected_backends

TICKS = 7
EVERY = tick_server.EVERY
OFFSETS = (0.0, 0.8, 1.6)
STARTUP = 5.0  # seconds before the first tick: the server processes import and wait
HERE = Path(__file__).resolve().parent
NOT_RUN = {"claimed-elsewhere", "off-tick", "not-run"}


@dataclass
class Part:
    """One backend's share of the experiment."""

    backend: str
    url: str = ""
    unavailable: str | None = None
    legacy: bool = False
    ticks: list[float] = field(default_factory=list)
    runs: list[list[str]] = field(default_factory=list)
    outcomes: list[list[str]] = field(default_factory=list)
    stderr: str = ""
    workdir: Path = Path()

    def starts(self, job: str) -> Counter[str]:
        return Counter(r[1] for r in self.runs if r[0] == job and r[2] == "start")

    def ends(self, job: str) -> Counter[str]:
        return Counter(r[1] for r in self.runs if r[0] == job and r[2] == "end")

    def outcomes_of(self, job: str) -> dict[str, list[str]]:
        by_tick: dict[str, list[str]] = defaultdict(list)
        for o in self.outcomes:
            if o[0] == job:
                by_tick[o[1]].append(o[3])
        return by_tick

    def summary(self, job: str) -> str:
        counts = Counter(o[3] for o in self.outcomes if o[0] == job)
        return f"[{self.backend} {job}] " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _url(backend: str, request: pytest.FixtureRequest, workdir: Path) -> str:
    token = uuid.uuid4().hex
    if backend == "memory":
        return f"memory://ticks-{token}"
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'locks.db'}"
    server: Any = request.getfixturevalue(f"{backend}_server")
    if backend == "redis":
        return f"{server.url}?prefix=ticks-{token}:"
    if backend == "postgres":
        return f"{server.url}?schema=ticks_{token}"
    return f"{server.url}/ticks-{token}"


def _iso(tick: float) -> str:
    return tick_server.iso(tick)


@pytest.fixture(scope="module")
def experiment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Part]]:
    parts: dict[str, Part] = {}
    for backend in selected_backends(request.config):
        part = parts[backend] = Part(backend)
        part.workdir = tmp_path_factory.mktemp(f"ticks-{backend}")
        try:
            part.url = _url(backend, request, part.workdir)
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:
            part.unavailable = f"{type(exc).__name__}: {exc}"
            continue
        prepared = connect(part.url)  # creates schema, tables, chroot before the crowd comes
        part.legacy = bool(getattr(prepared, "_legacy", False))
        assert prepared.claim(f"warm-up-{uuid.uuid4().hex}", 1)
        prepared.close()
    live = {b: p for b, p in parts.items() if p.unavailable is None}
    first = math.ceil((time.time() + STARTUP) / EVERY) * EVERY
    ticks = [first + EVERY * k for k in range(TICKS)]
    kill = ticks[-1]  # last: a ZooKeeper session of a killed process outlives the next tick
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    threads = []
    logger = logging.getLogger("coordlock")
    saved = (logger.level, logger.propagate, list(logger.handlers), dict(os.environ))
    holder = None
    try:
        for backend, part in live.items():
            part.ticks = ticks
            workdir = part.workdir
            files = {"runs": str(workdir / "runs.txt"), "outcomes": str(workdir / "outcomes.txt")}
            for i, offset in enumerate(OFFSETS):
                common = [
                    "--url", part.url, "--name", f"s{i}", f"--offset={offset}",
                    "--ticks", ",".join(f"{t:.0f}" for t in ticks), "--kill-tick", f"{kill:.0f}",
                    "--runs", files["runs"], "--outcomes", files["outcomes"],
                ]  # fmt: skip
                if backend == "memory":
                    args = tick_server.parser().parse_args([*common, "--threads"])
                    threads += tick_server.Server(args).run_threads(ticks)
                    continue
                err = (workdir / f"s{i}.err").open("wb")
                procs.append((backend, subprocess.Popen(
                    [sys.executable, str(HERE / "tick_server.py"), *common],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                )))  # fmt: skip
                err.close()
            if backend == "memory":
                holder = connect(part.url)  # keep the table alive between the threads' uses
        deadline = ticks[-1] + 40
        for _, proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for t in threads:
            t.join(max(1.0, deadline - time.time()))
        assert not any(t.is_alive() for t in threads), "memory:// servers did not finish"
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
        if holder is not None:
            holder.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
        os.environ.clear()
        os.environ.update(saved[3])
    for part in live.values():
        for key in ("runs", "outcomes"):
            path = part.workdir / f"{key}.txt"
            lines = path.read_text().splitlines() if path.exists() else []
            setattr(part, key, [line.split() for line in lines])
        errs = sorted(part.workdir.glob("*.err"))
        part.stderr = "".join(e.read_text(errors="replace") for e in errs)
    yield parts


def _part(experiment: dict[str, Part], backend: str) -> Part:
    part = experiment[backend]
    if part.unavailable is not None:
        if "Failed" in part.unavailable:
            pytest.fail(part.unavailable)
        pytest.skip(part.unavailable)
    return part


def _check_once(part: Part, job: str) -> None:
    """Every start was recorded and none failed; no tick ran twice; every tick that some
    server started for (by its own clock, within the skew) ran exactly once; at least 5
    scheduled ticks were among them, and some start found its tick already claimed."""
    print(f"\n{part.summary(job)}")
    attempts = [o for o in part.outcomes if o[0] == job]
    assert len(attempts) == len(part.ticks) * len(OFFSETS), (attempts, part.stderr[-3000:])
    errors = [o for o in attempts if o[3].startswith("error")]
    assert not errors, (errors, part.stderr[-3000:])
    starts = part.starts(job)
    assert set(starts.values()) <= {1}, f"a tick ran twice: {starts}"
    by_tick: dict[str, list[str]] = defaultdict(list)
    for o in attempts:
        by_tick[o[6]].append(o[3])
    last = _iso(part.ticks[-1])
    ends = [(r[1], float(r[4])) for r in part.runs if r[0] == job and r[2] == "end"]
    excused = []
    for tick, outcomes in sorted(by_tick.items()):
        won = [o for o in outcomes if o in ("ran", "killed")]
        if tick > last:  # a start seconds late under load, named the tick after the schedule
            assert len(won) <= 1, (tick, outcomes)
            continue
        if not won and _held_by_an_earlier_run(attempts, ends, tick):
            excused.append(tick)  # no overlap: the previous tick's run still held the lock
            continue
        assert len(won) == 1 and starts[tick] == 1, (tick, outcomes, starts)
        assert all(o in NOT_RUN for o in outcomes if o not in won), (tick, outcomes)
    assert sum(starts.values()) == sum(o[3] in ("ran", "killed") for o in attempts)
    covered = [t for t in part.ticks if _iso(t) in by_tick and _iso(t) not in excused]
    if excused:
        print(f"[{part.backend} {job}] not run, a previous run still held the lock: {excused}")
    assert len(covered) >= 5, f"only {len(covered)} scheduled ticks had a start near them"
    if part.backend != "memory" or job != "cli":  # memory's cli cannot tell why (shared stderr)
        refused = sum(o[3] == "claimed-elsewhere" for o in attempts)
        assert refused >= 1, "no start ever found its tick claimed: the test tested nothing"


def _held_by_an_earlier_run(
    attempts: list[list[str]], ends: list[tuple[str, float]], tick: str
) -> bool:
    """Whether ``tick`` was won but refused as ``running`` while a run of an earlier tick was
    ending (it ended no earlier than the skew before the refused start named its tick): the
    lock's no-overlap rule at work on a machine too loaded to finish a run within a tick."""
    refused = [float(o[5]) for o in attempts if o[6] == tick and o[3] == "running"]
    if len(refused) != 1:
        return False
    return any(t < tick and end >= refused[0] - EVERY / 2 for t, end in ends)


def test_crontab_line_runs_each_tick_once(experiment: dict[str, Part], backend_name: str) -> None:
    part = _part(experiment, backend_name)
    _check_once(part, "cli")


def test_locked_runs_each_tick_once(experiment: dict[str, Part], backend_name: str) -> None:
    part = _part(experiment, backend_name)
    _check_once(part, "deco")


def test_async_locked_runs_each_tick_once(
    experiment: dict[str, Part], backend_name: str
) -> None:
    part = _part(experiment, backend_name)
    if part.legacy:
        pytest.xfail(f"the {backend_name} backend is not ported to the async core yet")
    _check_once(part, "adeco")


def test_killed_mid_run_is_not_run_again(experiment: dict[str, Part], backend_name: str) -> None:
    part = _part(experiment, backend_name)
    kill = _iso(part.ticks[-1])
    for job in ("cli", "deco"):
        outcomes = [o[3] for o in part.outcomes if o[0] == job and o[6] == kill]
        assert outcomes, f"no server started {job} near the tick {kill}"
        assert part.starts(job)[kill] == 1, (job, part.runs)
        if backend_name == "memory":  # threads: the winner stalled through the later starts
            assert outcomes.count("ran") == 1 and part.ends(job)[kill] == 1
        else:
            assert outcomes.count("killed") == 1, (job, outcomes)
            # coordlock run was killed, its CMD (own process group) finished; the decorated
            # function died with its process
            assert part.ends(job)[kill] == (1 if job == "cli" else 0), (job, part.runs)
        assert all(o in NOT_RUN for o in outcomes if o not in ("ran", "killed")), outcomes
