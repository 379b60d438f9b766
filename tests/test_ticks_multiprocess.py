"""Once per tick outside the Scheduler, on every backend: three servers whose crons fire 0, 0.8
and 1.6 s after each tick of an ``--every 4s`` schedule (as crontabs on skewed servers fire)
start the job as a process of its own each time; over seven ticks, each tick ran exactly once
and no tick ran twice. (On a machine so loaded that a run still holds the lock when the next
tick is won, that tick is refused as ``running`` — the no-overlap rule — and reported; at least
five ticks must run once. Starts that come seconds late belong to a later tick: the test
follows the tick each start named, recorded by ``tick_server.py``; a start stalled past the
next tick before it could claim its own does not claim it, and is reported.)

Three jobs run side by side (``tests/tick_server.py``): the crontab line ``coordlock run
--every 4s``, a ``@coordlock.locked(every=4)`` function and the same on an ``async def``. On the
last tick the winning process of the crontab line and of the decorated function is SIGKILLed
mid-run: the later servers must not run that tick again (they find its claim taken).

The jobs finish in milliseconds, long before the later servers start: a plain lock would let
each of them run the tick again. memory:// cannot cross processes: its three servers are
threads of this process, and its "kill" is a winner that stalls through the later starts.

All selected backends run at once, in one experiment of about 35 s (the module fixture, run
once per test run even under pytest-xdist); each test then checks one backend's part. If the
machine was so loaded that a backend's job had fewer than five ticks with a start near them,
that backend runs one more round (coverage only: every round is checked for duplicates).
Bounded: every process has a deadline.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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
) -> Iterator[dict[str, list[Part]]]:
    """The experiment's results (one or two rounds per backend). Under pytest-xdist it runs
    once per test run, in the first worker that needs it; the others wait for it and read its
    results (running it in every worker at once would multiply the load it is sensitive to)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run_id:
        yield _rounds(request, tmp_path_factory)
        return
    shared = tmp_path_factory.getbasetemp().parent / f"ticks-experiment-{run_id}"
    shared.mkdir(exist_ok=True)
    results = shared / "parts.json"
    with (shared / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held by the worker running it (bounded run)
        if results.exists():
            saved = json.loads(results.read_text())
            yield {
                b: [Part(**{**d, "workdir": Path(d["workdir"])}) for d in rounds]
                for b, rounds in saved.items()
            }
            return
        parts = _rounds(request, tmp_path_factory)
        results.write_text(json.dumps(
            {b: [{**asdict(p), "workdir": str(p.workdir)} for p in rounds]
             for b, rounds in parts.items()}
        ))  # fmt: skip
    yield parts


def _rounds(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Part]]:
    """The experiment, and once more if the machine was so loaded that some job had fewer than
    5 scheduled ticks with a start near them (coverage, never correctness: every round's
    results are checked for duplicates)."""
    rounds = {b: [p] for b, p in _run_experiment(request, tmp_path_factory).items()}
    short = [
        b for b, (p,) in rounds.items() if p.unavailable is None
        and any(_analyse(p, job)[1] < 5 for job in tick_server.Server.JOBS)
    ]  # fmt: skip
    if short:
        print(f"\nthe machine was too slow for {short}: one more round")
        for b, p in _run_experiment(request, tmp_path_factory, short).items():
            rounds[b].append(p)
    return rounds


def _run_experiment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    backends: list[str] | None = None,
) -> dict[str, Part]:
    parts: dict[str, Part] = {}
    for backend in backends or selected_backends(request.config):
        part = parts[backend] = Part(backend)
        part.workdir = tmp_path_factory.mktemp(f"ticks-{backend}")
        try:
            part.url = _url(backend, request, part.workdir)
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:
            part.unavailable = f"{type(exc).__name__}: {exc}"
            continue
        prepared = connect(part.url)  # creates schema, tables, chroot before the crowd comes
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
    return parts


def _parts(experiment: dict[str, list[Part]], backend: str) -> list[Part]:
    parts = experiment[backend]
    unavailable = parts[0].unavailable
    if unavailable is not None:
        if "Failed" in unavailable:
            pytest.fail(unavailable)
        pytest.skip(unavailable)
    return parts


def _analyse(part: Part, job: str) -> tuple[list[str], int, int]:
    """(violations, scheduled ticks covered, starts refused as claimed elsewhere) of one job.

    Violations: a start not recorded or failed; a tick that ran twice; a tick that some start
    named (within the skew, by its own clock) that did not run exactly once. Not violations,
    but not covered either: a tick whose every start stalled past the next tick (unclaimed,
    see ``_check_fresh``), or that was won while a run still held the lock (``running``: the
    no-overlap rule on a machine too loaded to finish a run within a tick).
    """
    problems: list[str] = []
    attempts = [o for o in part.outcomes if o[0] == job]
    if len(attempts) != len(part.ticks) * len(OFFSETS):
        problems.append(f"{len(attempts)} starts recorded: {attempts} {part.stderr[-3000:]}")
    errors = [o for o in attempts if o[3].startswith("error")]
    if errors:
        problems.append(f"failed starts: {errors} {part.stderr[-3000:]}")
    starts = part.starts(job)
    if set(starts.values()) - {1}:
        problems.append(f"a tick ran twice: {starts}")
    by_tick: dict[str, list[str]] = defaultdict(list)
    for o in attempts:
        by_tick[o[6]].append(o[3])
    last = _iso(part.ticks[-1])
    uncovered: list[str] = []
    for tick, outcomes in sorted(by_tick.items()):
        won = [o for o in outcomes if o in ("ran", "killed")]
        if tick > last:  # a start seconds late under load, named the tick after the schedule
            if len(won) > 1:
                problems.append(f"{tick}: {outcomes}")
            continue
        if not won and ("running" in outcomes or set(outcomes) == {"off-tick"}):
            uncovered.append(tick)  # the claim's one winner found the lock held, or none
            if outcomes.count("running") > 1 or set(outcomes) - NOT_RUN - {"running"}:
                problems.append(f"{tick}: {outcomes}")  # two claim winners?
            continue
        if len(won) != 1 or starts[tick] != 1:
            problems.append(f"{tick} did not run exactly once: {outcomes}, runs {starts}")
        if any(o not in NOT_RUN for o in outcomes if o not in won):
            problems.append(f"{tick}: {outcomes}")
    if sum(starts.values()) != sum(o[3] in ("ran", "killed") for o in attempts):
        problems.append(f"runs {starts} do not match the outcomes {attempts}")
    if uncovered:
        print(f"[{part.backend} {job}] not run (stalled starts, or the lock still held): "
              f"{uncovered}")  # fmt: skip
    covered = [t for t in part.ticks if _iso(t) in by_tick and _iso(t) not in uncovered]
    refused = sum(o[3] == "claimed-elsewhere" for o in attempts)
    return problems, len(covered), refused


def _check_once(parts: list[Part], job: str) -> None:
    """No violation in any round of the experiment; in one round at least 5 scheduled ticks
    had a start near them and ran once; some start found its tick already claimed."""
    best = refused = 0
    for part in parts:
        print(f"\n{part.summary(job)}")
        problems, covered, refusals = _analyse(part, job)
        assert not problems, problems
        best, refused = max(best, covered), refused + refusals
    assert best >= 5, f"at most {best} scheduled ticks had a start near them ({len(parts)} rounds)"
    if parts[0].backend != "memory" or job != "cli":  # memory's cli cannot tell why
        assert refused >= 1, "no start ever found its tick claimed: the test tested nothing"


def test_crontab_line_runs_each_tick_once(
    experiment: dict[str, list[Part]], backend_name: str
) -> None:
    _check_once(_parts(experiment, backend_name), "cli")


def test_locked_runs_each_tick_once(
    experiment: dict[str, list[Part]], backend_name: str
) -> None:
    _check_once(_parts(experiment, backend_name), "deco")


def test_async_locked_runs_each_tick_once(
    experiment: dict[str, list[Part]], backend_name: str
) -> None:
    parts = _parts(experiment, backend_name)
    _check_once(parts, "adeco")


def test_killed_mid_run_is_not_run_again(
    experiment: dict[str, list[Part]], backend_name: str
) -> None:
    checked = 0
    for part in _parts(experiment, backend_name):
        kill = _iso(part.ticks[-1])
        for job in ("cli", "deco"):
            outcomes = [o[3] for o in part.outcomes if o[0] == job and o[6] == kill]
            if not outcomes or "running" in outcomes or set(outcomes) == {"off-tick"}:
                continue  # no start near the tick, or none could run it (see _analyse)
            assert part.starts(job)[kill] == 1, (job, part.runs)
            if backend_name == "memory":  # threads: the winner stalled through later starts
                assert outcomes.count("ran") == 1 and part.ends(job)[kill] == 1
            else:
                assert outcomes.count("killed") == 1, (job, outcomes)
                # coordlock run was killed, its CMD (own process group) finished; the
                # decorated function died with its process
                assert part.ends(job)[kill] == (1 if job == "cli" else 0), (job, part.runs)
            assert all(o in NOT_RUN for o in outcomes if o not in ("ran", "killed")), outcomes
            checked += 1
    assert checked >= 2, "the kill tick was never reached by a start that could run it"
