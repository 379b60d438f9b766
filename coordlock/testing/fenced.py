"""The fenced register: the oracle of the fault tests (``shared/fault-tests.md``).

A :class:`FencedRegister` is a tiny resource kept in a file and shared by processes (``flock``):
it remembers the highest fence it accepted and rejects any write carrying a fence that is not
higher (Kleppmann's fencing token). Workers take a lock, read the register, write ``value + 1``
with their lease's fence and log every step to a JSONL :class:`HistoryLog`. :func:`check` judges
the history:

* **C1** believed-held overlaps (two workers both believed they held the lock),
* **C2** stale writes accepted (a write accepted with a fence lower than an earlier accepted one),
* **C3** lost updates (final value ≠ number of accepted writes),
* **C4** fence-order inversions (successive holders' fences not strictly increasing).

Run a worker process with ``python -m coordlock.testing.fenced URL REGISTER LOG --iterations N``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._errors import CoordlockError, LockLost
from .._protocol import RunCoordinator
from .modes import MODES, AsyncRunner, Mode, view


class FencedRegister:
    """A counter in a file that rejects operations from stale fences (Kleppmann's storage).

    It remembers the highest fence it has *seen* (in a read or a write). A write is accepted
    only if its fence is at least that high and higher than the fence of the last accepted
    write. Recording read fences matters: a holder paused between its read and its write
    cannot then overwrite the update of a newer holder that read after it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lockfile = Path(f"{self.path}.lock")
        self._guard = threading.Lock()  # flock is per open file; threads need their own guard
        if not self.path.exists():
            with self._locked():
                if not self.path.exists():
                    self._save(
                        {"value": 0, "max_fence": 0, "write_fence": 0, "accepted": 0,
                         "rejected": 0}
                    )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._guard, open(self._lockfile, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load(self) -> dict[str, int]:
        data: dict[str, int] = json.loads(self.path.read_text())
        return data

    def _save(self, state: dict[str, int]) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    def read(self, fence: int | None = None) -> int:
        """The current value; a ``fence`` given is recorded as seen (see the class docstring)."""
        with self._locked():
            state = self._load()
            if fence is not None and fence > state["max_fence"]:
                state["max_fence"] = fence
                self._save(state)
            return state["value"]

    def write(self, value: int, fence: int) -> tuple[bool, int]:
        """Store ``value`` if ``fence`` is the highest seen and higher than the last write's.

        Returns ``(accepted, sequence)`` where ``sequence`` numbers accepted writes 1, 2, …
        (0 for a rejected write).
        """
        with self._locked():
            state = self._load()
            if fence < state["max_fence"] or fence <= state["write_fence"]:
                state["rejected"] += 1
                self._save(state)
                return False, 0
            state.update(
                value=value, max_fence=fence, write_fence=fence, accepted=state["accepted"] + 1
            )
            self._save(state)
            return True, state["accepted"]

    def state(self) -> dict[str, int]:
        """``value``, ``max_fence``, ``accepted`` and ``rejected`` counts."""
        with self._locked():
            return self._load()


class HistoryLog:
    """Append-only JSONL log of worker steps; each line is written with one ``O_APPEND`` write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def log(self, worker: str, op: str, **fields: Any) -> None:
        """Append one event; ``t`` (``time.monotonic()``, comparable across local processes)."""
        record = {"w": worker, "op": op, "t": time.monotonic(), **fields}
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        """Every logged event, in file order."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@dataclass
class Report:
    """What :func:`check` found. ``ok`` is True when C2 = C3 = C4 = 0 (and C1 = 0 if strict)."""

    acquisitions: int
    writes_accepted: int
    writes_rejected: int
    final_value: int
    lost_leases: int
    c1_overlaps: int
    c2_stale_accepted: int
    c3_lost_updates: int
    c4_fence_inversions: int

    def ok(self, *, allow_overlap: bool = False) -> bool:
        """C2, C3 and C4 must be 0; C1 too unless ``allow_overlap`` (tests with injected faults)."""
        return (
            self.c2_stale_accepted == 0
            and self.c3_lost_updates == 0
            and self.c4_fence_inversions == 0
            and (allow_overlap or self.c1_overlaps == 0)
        )

    def summary(self) -> str:
        """One line with every count, for test output and closing notes."""
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def check(history: HistoryLog, register: FencedRegister) -> Report:
    """Judge a history against the register's final state (see module docstring)."""
    events = history.events()
    state = register.state()
    intervals: list[tuple[float, float, str]] = []
    open_since: dict[str, float] = {}
    acquired = [e for e in events if e["op"] == "acquired"]
    for event in events:
        worker = event["w"]
        if event["op"] == "acquired":
            open_since[worker] = event["t"]
        elif event["op"] in ("released", "abandoned") and worker in open_since:
            intervals.append((open_since.pop(worker), event["t"], worker))
    intervals.sort()
    overlaps = 0
    latest_end = float("-inf")
    for start, end, _ in intervals:
        if start < latest_end:
            overlaps += 1
        latest_end = max(latest_end, end)

    accepted = sorted(
        (e for e in events if e["op"] == "write" and e["accepted"]), key=lambda e: e["seq"]
    )
    stale = 0
    highest = 0
    for event in accepted:
        if event["fence"] <= highest:
            stale += 1
        highest = max(highest, event["fence"])

    inversions = 0
    previous = 0
    for event in sorted(acquired, key=lambda e: e["t"]):
        if event["fence"] <= previous:
            inversions += 1
        previous = max(previous, event["fence"])

    return Report(
        acquisitions=len(acquired),
        writes_accepted=state["accepted"],
        writes_rejected=state["rejected"],
        final_value=state["value"],
        lost_leases=sum(1 for e in events if e["op"] == "lost"),
        c1_overlaps=overlaps,
        c2_stale_accepted=stale,
        c3_lost_updates=abs(state["value"] - state["accepted"]),
        c4_fence_inversions=inversions,
    )


@contextmanager
def _coordinator(url: str, mode: Mode) -> Iterator[Any]:
    """A coordinator for ``url`` seen through ``mode`` (see :mod:`coordlock.testing.modes`)."""
    from .._registry import connect

    runner = AsyncRunner() if mode == "async" else None
    coordinator = view(connect(url), mode, runner)
    try:
        yield coordinator
    finally:
        coordinator.close()
        if runner is not None:
            runner.close()


def run_worker(
    coordinator: RunCoordinator,
    register: FencedRegister,
    history: HistoryLog,
    worker: str,
    *,
    iterations: int,
    name: str = "fenced",
    ttl: float = 5.0,
    wait: float = 30.0,
    hold: float = 0.0,
    deadline: float = 120.0,
    stop_file: str | Path | None = None,
) -> int:
    """Do ``iterations`` rounds of acquire → read → write(value + 1, fence) → release.

    ``hold`` seconds are slept between the read and the write (to widen the window a fault can
    hit). Stops early when ``deadline`` seconds have passed, or, between rounds, once
    ``stop_file`` exists (a fault test lets its workers run until it has injected enough
    faults). Returns the rounds completed.
    """
    done = 0
    stop_at = time.monotonic() + deadline
    stop = None if stop_file is None else Path(stop_file)
    while done < iterations and time.monotonic() < stop_at:
        if stop is not None and stop.exists():
            break
        try:
            lease = coordinator.acquire(name, ttl, wait=min(wait, stop_at - time.monotonic()))
        except CoordlockError as exc:
            history.log(worker, "error", error=str(exc))
            time.sleep(0.05)
            continue
        if lease is None:
            continue
        history.log(worker, "acquired", fence=lease.fence)
        lease.on_lost(lambda lost: history.log(worker, "lost", fence=lost.fence))
        value = register.read(lease.fence)
        history.log(worker, "read", fence=lease.fence, value=value)
        if hold:
            time.sleep(hold)
        accepted, seq = register.write(value + 1, lease.fence)
        history.log(worker, "write", fence=lease.fence, value=value + 1, accepted=accepted, seq=seq)
        history.log(worker, "released", fence=lease.fence)
        try:
            ok = lease.release()
        except (CoordlockError, LockLost) as exc:
            history.log(worker, "error", error=str(exc))
            ok = False
        history.log(worker, "release-result", fence=lease.fence, ok=ok)
        done += 1
    return done


def worker_command(url: str, register: Path, log: Path, worker: str, **options: Any) -> list[str]:
    """The argv of one worker process (``options``: iterations, name, ttl, wait, hold, deadline)."""
    argv = [sys.executable, "-m", "coordlock.testing.fenced", url, str(register), str(log)]
    argv += ["--worker", worker]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_fenced(
    url: str, directory: Path, *, workers: int, iterations: int, timeout: float = 300.0,
    mode: Mode = "sync", threads: bool | None = None, **options: Any,
) -> Report:
    """Run ``workers`` fenced workers against ``url`` and return the checked :class:`Report`.

    Workers are processes, except for ``memory://`` URLs (one process only) or with
    ``threads=True``, where they are threads with one coordinator per worker.
    ``mode="async"`` makes every worker use the async API on an event loop of its own.
    Raises ``AssertionError`` if a worker fails.
    """
    import subprocess

    register = FencedRegister(directory / "register.json")
    history = HistoryLog(directory / "history.jsonl")
    if threads or (threads is None and url.startswith("memory://")):
        results: dict[str, int] = {}

        def body(worker: str) -> None:
            with _coordinator(url, mode) as coordinator:
                results[worker] = run_worker(
                    coordinator, register, history, worker, iterations=iterations, **options
                )

        pool = [threading.Thread(target=body, args=(f"w{i}",)) for i in range(workers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout)
        short = {w: n for w, n in results.items() if n != iterations}
        assert len(results) == workers and not short, f"workers fell short: {results}"
    else:
        procs = [
            subprocess.Popen(
                worker_command(url, register.path, history.path, f"w{i}",
                               iterations=iterations, mode=mode, **options),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for i in range(workers)
        ]
        failures = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"exit {proc.returncode}: {out[-2000:]}")
        assert not failures, "worker processes failed:\n" + "\n".join(failures)
    return check(history, register)


def main(argv: list[str] | None = None) -> int:
    """Worker process entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description="fenced-register worker")
    parser.add_argument("url")
    parser.add_argument("register")
    parser.add_argument("log")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--worker", default=str(os.getpid()))
    parser.add_argument("--name", default="fenced")
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--wait", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--stop-file", default=None, help="stop between rounds once it exists")
    parser.add_argument("--mode", choices=MODES, default="sync")
    args = parser.parse_args(argv)
    with _coordinator(args.url, args.mode) as coordinator:
        done = run_worker(
            coordinator,
            FencedRegister(args.register),
            HistoryLog(args.log),
            args.worker,
            iterations=args.iterations,
            name=args.name,
            ttl=args.ttl,
            wait=args.wait,
            hold=args.hold,
            deadline=args.deadline,
            stop_file=args.stop_file,
        )
    print(f"worker {args.worker}: {done} rounds", flush=True)
    stopped = args.stop_file is not None and Path(args.stop_file).exists()
    return 0 if done == args.iterations or stopped else 1


if __name__ == "__main__":
    sys.exit(main())
