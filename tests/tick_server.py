"""One "server" of test_ticks_multiprocess.py: its cron fires ``--offset`` seconds after each
scheduled tick and starts, each as a process of its own (forked, like cron forks), the jobs:

* ``cli``   – ``coordlock run --every 4s --ttl 1s -- sh -c '…'`` (the crontab line);
* ``deco``  – a ``@coordlock.locked(every=4, ttl=1)`` function;
* ``adeco`` – the same on an ``async def`` (``asyncio.run``).

Each run appends ``<job> <tick> start|end <pid> <wall time>`` to ``--runs`` (O_APPEND); each
start of a job appends ``<job> <scheduled tick> <offset> <outcome> <server> <decided at>
<decided tick>`` to ``--outcomes``: outcome ``ran``, ``claimed-elsewhere``, ``off-tick``,
``running``, ``killed`` or ``error:N``; ``decided at`` the time of day coordlock read to name
the tick (recorded by wrapping ``coordlock._locking.wall_clock``), ``decided tick`` the tick
that time belongs to. Under load a server may fire seconds late: its start then belongs to a
later tick, which the test takes into account. On the tick ``--kill-tick`` the winning
process of ``cli`` and ``deco`` is SIGKILLed while it runs (``cli``: ``CMD`` kills its
``coordlock run``; ``deco``: the function kills its process).

With ``--threads`` (memory://, which cannot cross processes) the jobs run as threads of one
process instead, and the kill is a stall: the winner sleeps through the later starts.

Every wait is bounded; a job process kills itself (SIGALRM) after 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone

import coordlock
import coordlock.cli
from coordlock import LockLost, _locking
from coordlock._locking import TickNotRun
from coordlock._ticks import TickSpec
from coordlock.scheduler.triggers import IntervalTrigger

EVERY = 4
TTL = 3  # lease ttl (s): renewed while a job runs; a killed holder's expires before next tick
SPEC = TickSpec("probe", IntervalTrigger(EVERY))
_decided = threading.local()
_real_clock = _locking.wall_clock
_report_fd: int | None = None  # in a job process: where to report the decision time at once


def _recording_clock() -> float:
    """``wall_clock`` that remembers, per thread, the time it told (the decision time), and
    in a job process writes it to the parent at once (before a kill can come)."""
    global _report_fd
    now = _real_clock()
    if getattr(_decided, "at", None) is None:  # the first reading of a job names its tick
        _decided.at = now
    if _report_fd is not None:
        os.write(_report_fd, f"{now:.6f}".encode())
        _report_fd = None
    return now


_locking.wall_clock = _recording_clock


def decided_at() -> float:
    return float(getattr(_decided, "at", None) or 0.0)


def decided_tick() -> float:
    tick = SPEC.resolve(decided_at()).tick
    assert tick is not None  # skew = period / 2: every moment belongs to a tick
    return tick

CLI_SCRIPT = (
    'echo "cli $COORDLOCK_TICK start $$ $(date +%s.%N)" >> "$TICK_RUNS"; '
    'if [ "$COORDLOCK_TICK" = "$TICK_KILL" ]; then '
    '  if [ "$TICK_THREADS" = 1 ]; then sleep 2.5; else kill -9 $PPID; sleep 0.3; fi; '
    "fi; "
    'echo "cli $COORDLOCK_TICK end $$ $(date +%s.%N)" >> "$TICK_RUNS"'
)
OUTCOME_OF_STATUS = {
    0: "ran", 75: "claimed-elsewhere", 76: "off-tick", 77: "running", 78: "not-run"
}
STATUS_OF_REASON = {"claimed-elsewhere": 75, "off-tick": 76, "running": 77}


def iso(tick: float) -> str:
    return datetime.fromtimestamp(tick, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.name: str = args.name
        self.offset: float = args.offset
        self.runs: str = args.runs
        self.outcomes: str = args.outcomes
        self.kill_tick: float = args.kill_tick
        self.threads: bool = args.threads
        os.environ["TICK_RUNS"] = self.runs
        os.environ["TICK_KILL"] = iso(self.kill_tick)
        os.environ["TICK_THREADS"] = "1" if self.threads else "0"

    # -- the jobs: each returns an exit status (0 ran, 75/76/77 did not, see above) -----------

    def cli(self, tick: float) -> int:
        argv = ["run", "--url", self.url, "--name", "cli", "--every", f"{EVERY}s",
                "--ttl", f"{TTL}s", "--", "sh", "-c", CLI_SCRIPT]  # fmt: skip
        if self.threads:  # stderr is shared by the threads: no telling why it did not run
            status = coordlock.cli.main(argv)
            return 78 if status == 75 else status
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            status = coordlock.cli.main(argv)
        sys.stderr.write(said.getvalue())
        if status == 75:  # coordlock said why on stderr
            for text, code in (("ran elsewhere", 75), ("skew tolerance", 76), ("too late", 76),
                               ("still held", 77)):
                if text in said.getvalue():
                    return code
        return status

    def _decorated(self, tick: float, coordinator: object) -> Callable[[], object]:
        me = self

        @coordlock.locked("deco", ttl=TTL, every=EVERY, on_busy="raise",
                          coordinator=coordinator)  # type: ignore[arg-type]  # fmt: skip
        def deco() -> None:
            mine = decided_tick()
            append(me.runs, f"deco {iso(mine)} start {os.getpid()} {time.time():.6f}")
            if mine == me.kill_tick:
                if me.threads:
                    time.sleep(2.5)
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            append(me.runs, f"deco {iso(mine)} end {os.getpid()} {time.time():.6f}")

        return deco

    def deco(self, tick: float) -> int:
        coordinator = coordlock.connect(self.url)
        try:
            self._decorated(tick, coordinator)()
            return 0
        except LockLost:
            return 0  # it ran; the lease ran out meanwhile (a starved renewal): logged
        except TickNotRun as exc:
            return STATUS_OF_REASON[exc.reason]
        finally:
            coordinator.close()

    def adeco(self, tick: float) -> int:
        async def main() -> int:
            coordinator = await coordlock.aconnect(self.url)

            @coordlock.locked("adeco", ttl=TTL, every=EVERY, on_busy="raise",
                              coordinator=coordinator)  # fmt: skip
            async def adeco() -> None:
                mine = iso(decided_tick())
                append(self.runs, f"adeco {mine} start {os.getpid()} {time.time():.6f}")
                await asyncio.sleep(0.01)
                append(self.runs, f"adeco {mine} end {os.getpid()} {time.time():.6f}")

            try:
                await adeco()
                return 0
            except LockLost:
                return 0
            except TickNotRun as exc:
                return STATUS_OF_REASON[exc.reason]
            finally:
                await coordinator.aclose()

        return asyncio.run(main())

    JOBS = ("cli", "deco", "adeco")

    # -- running them ------------------------------------------------------------------------

    def record(self, job: str, tick: float, outcome: str, at: float) -> None:
        mine = SPEC.resolve(at).tick if at else None
        append(
            self.outcomes,
            f"{job} {iso(tick)} {self.offset:g} {outcome} {self.name} {at:.6f} "
            f"{iso(mine) if mine is not None else '-'}",
        )

    def fork(self, job: str, tick: float) -> tuple[int, int]:
        """Start ``job`` in a process of its own; returns (pid, fd to read its decision time)."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the job's own process
            global _report_fd
            os.close(read)
            _report_fd = write
            status = 70
            try:
                signal.alarm(30)
                status = getattr(self, job)(tick)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        os.close(write)
        return pid, read

    def run_processes(self, ticks: list[float]) -> None:
        """Fork the jobs at each tick; reap them whenever they end (a slow job never delays
        the next tick's start, as with cron)."""
        running: dict[int, tuple[str, float, int]] = {}
        for tick in ticks:
            while time.time() < tick + self.offset:
                self.reap(running, block=False)
                time.sleep(min(0.02, max(0.0, tick + self.offset - time.time())))
            for job in self.JOBS:
                pid, read = self.fork(job, tick)
                running[pid] = (job, tick, read)
        while running:
            self.reap(running, block=True)

    def reap(self, running: dict[int, tuple[str, float, int]], *, block: bool) -> None:
        while running:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            job, tick, read = running.pop(pid)
            at = os.read(read, 64).decode() or "0"
            os.close(read)
            code = os.waitstatus_to_exitcode(status)
            outcome = "killed" if code == -signal.SIGKILL else OUTCOME_OF_STATUS.get(
                code, f"error:{code}"
            )
            self.record(job, tick, outcome, float(at))
            if block:
                return

    def run_threads(self, ticks: list[float]) -> list[threading.Thread]:
        """Start one thread per tick that starts the jobs at tick + offset (memory://)."""

        def one(job: str, tick: float) -> None:
            _decided.at = None
            try:
                code = getattr(self, job)(tick)
            except BaseException:
                traceback.print_exc()
                code = 70
            self.record(job, tick, OUTCOME_OF_STATUS.get(code, f"error:{code}"), decided_at())

        def at_tick(tick: float) -> None:
            sleep_until(tick + self.offset)
            jobs = [threading.Thread(target=one, args=(job, tick)) for job in self.JOBS]
            for t in jobs:
                t.start()
            for t in jobs:
                t.join(30)

        threads = [threading.Thread(target=at_tick, args=(tick,)) for tick in ticks]
        for t in threads:
            t.start()
        return threads


def sleep_until(when: float) -> None:
    left = when - time.time()
    if left > 0:
        time.sleep(left)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--offset", type=float, required=True)
    p.add_argument("--ticks", required=True, help="comma-separated epoch seconds")
    p.add_argument("--kill-tick", type=float, required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--outcomes", required=True)
    p.add_argument("--threads", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    scheme = args.url.split("://", 1)[0]
    driver = {"redis": "redis", "postgresql": "psycopg", "zookeeper": "kazoo.client"}.get(scheme)
    if driver:
        __import__(driver)  # imported once here; each forked job starts with it loaded
    import coordlock._ticks  # noqa: F401  (and cronsim, the scheduler's triggers)

    Server(args).run_processes([float(t) for t in args.ticks.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
