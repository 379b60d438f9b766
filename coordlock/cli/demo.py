"""``coordlock demo``: a fenced lock, then scheduler processes running a job once per tick.

Part 1 (a second or two): two coordinators play two servers. ``a`` takes a lock and writes to a
fenced register (:class:`coordlock.testing.fenced.FencedRegister`, a file that remembers the
highest fence it saw), then "freezes" past its TTL; ``b`` takes the lock with a greater fence
and writes; ``a`` wakes up and tries to finish its write with its old fence: the register
rejects it, and ``a``'s lease reports itself lost.

Part 2: ``instances`` scheduler processes (default 3) on one coordinator (an SQLite file in a
temporary folder unless a URL is given) with the same job every second. Instance ``b`` runs
with its clock 2 s ahead, so it asks for each tick first; after a few seconds it is killed with
SIGKILL and the others take over. A row is printed for each tick as soon as it is settled: who
ran it and how many runs it got (always 1). The closing lines are computed from the run log.

Ctrl-C stops the worker processes and removes the temporary folder: nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from .._base import BaseCoordinator
from .._redact import redact_url
from .._registry import connect
from ._common import Context, UsageError

SKEW = 2.0
JOB = "interval"
#: A tick's row is printed this long (seconds) after the tick: the skewed instance asks 2 s
#: early, the others on time, and a late one may still start within the 1 s misfire grace.
SETTLE = 1.6
LOCK = "coordlock-demo:report"


def _and(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 2 else names)


def _names(count: int) -> list[str]:
    return [chr(ord("a") + i) if i < 26 else f"i{i}" for i in range(count)]


class _Tail:
    """Reads the JSON lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buffer = b""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by SIGKILL
        return records


@contextmanager
def _shielded() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while cleaning up (a second Ctrl-C must not leave files)."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: nothing to shield
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _group_kwargs() -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"start_new_session": True}  # pragma: no cover - Python 3.10


def run_demo(
    url: str | None, seconds: float, instances: int = 3, *, out: TextIO | None = None
) -> int:
    """Run the demo, printing as it goes; returns 0 when every tick ran exactly once.

    ``seconds`` (at least 4) is how long the scheduler part runs. Raises ``ValueError`` for
    bad arguments and :class:`~coordlock.cli._common.UsageError` for a ``memory://`` URL
    (the demo runs several processes, which memory:// cannot share).
    """
    stream = out or sys.stdout
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError("instances must be an int >= 1")
    if not seconds >= 4 or math.isinf(seconds):
        raise ValueError("--seconds must be at least 4 (and finite)")
    if url is not None and url.split("://", 1)[0].lower() == "memory":
        raise UsageError(
            "memory:// is private to one process and the demo runs several: "
            "use sqlite:///demo.db, redis://, postgresql:// or zookeeper://"
        )
    workdir = Path(tempfile.mkdtemp(prefix="coordlock-demo-"))
    completed = False
    try:
        target = url or f"sqlite:///{workdir / 'demo.db'}"
        print(f"coordlock demo on {redact_url(target)}", file=stream, flush=True)
        _fence_part(target, workdir, stream)
        status = _scheduler_part(target, workdir, seconds, instances, stream)
        completed = True
        return status
    finally:
        with _shielded():
            if url is None or not completed:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"(run log kept in {workdir})", file=stream)


# -- part 1: fences -------------------------------------------------------------------------


def _fence_part(target: str, workdir: Path, stream: TextIO) -> None:
    from ..testing.fenced import FencedRegister

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    say("\n1. A lock with a fencing token: a stale holder's write is rejected")
    register = FencedRegister(workdir / "register.json")
    server_a, server_b = connect(target), connect(target)
    try:
        if not isinstance(server_a, BaseCoordinator):
            say("   (skipped: this backend's leases cannot be left unrenewed)")
            return
        ttl = 1.0
        first = server_a.acquire(LOCK, ttl, renew=False)
        if first is None:
            say(f"   (skipped: the lock {LOCK!r} is held by someone else)")
            return
        register.read(first.fence)
        accepted, _ = register.write(1, first.fence)
        say(f"   a takes {LOCK!r}: fence {first.fence}; writes with it: "
            f"{'accepted' if accepted else 'rejected'}")
        say(f"   a freezes (a GC pause, a stopped VM) for longer than its {ttl:g} s ttl ...")
        time.sleep(ttl * 1.3)
        second = server_b.acquire(LOCK, 10.0, wait=5.0)
        if second is None:
            say("   (b could not take the lock: is another demo running on this URL?)")
            return
        register.read(second.fence)
        accepted, _ = register.write(2, second.fence)
        say(f"   b takes it: fence {second.fence}; writes with it: "
            f"{'accepted' if accepted else 'rejected'}")
        late, _ = register.write(3, first.fence)
        say(f"   a wakes up and finishes its write with fence {first.fence}: "
            f"{'ACCEPTED (unexpected!)' if late else 'rejected by the register'} "
            f"(it has seen fence {register.state()['max_fence']})")
        say(f"   a's lease: lost={first.lost} ({first.lost_reason or 'still held'}); "
            f"the register holds b's value {register.state()['value']}")
        second.release()
        first.release()
    finally:
        server_a.close()
        server_b.close()


# -- part 2: the scheduler ------------------------------------------------------------------


def _scheduler_part(
    target: str, workdir: Path, seconds: float, instances: int, stream: TextIO
) -> int:
    runs_path, events_path = workdir / "runs.jsonl", workdir / "events.jsonl"
    names = _names(instances)
    offsets = {name: (SKEW if i == 1 else 0.0) for i, name in enumerate(names)}
    victim = names[1] if instances >= 3 else None

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    say(f"\n2. Once per tick: {instances} scheduler process(es), job {JOB!r} every second,")
    say(f"   claim key '{JOB}@<tick in UTC>'")
    for name in names:
        note = f"clock {offsets[name]:+.1f} s"
        if name == victim:
            note += ", killed with SIGKILL after a few seconds"
        say(f"     instance {name}: {note}")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    killed_at: float | None = None
    table = _Table(offsets, victim, stream)
    try:
        for name in names:
            logs[name] = workdir / f"{name}.log"
            with open(logs[name], "wb") as log_file:
                procs[name] = subprocess.Popen(
                    [
                        sys.executable, "-m", "coordlock.scheduler._worker",
                        "--url", target, "--instance", name, f"--offset={offsets[name]}",
                        "--runs", str(runs_path), "--events", str(events_path),
                        "--interval", "1", "--duration", str(seconds + 60),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    **_group_kwargs(),  # Ctrl-C reaches the demo only; it stops them
                )
        events = _Tail(events_path)
        ready: set[str] = set()
        deadline = time.monotonic() + 30
        while ready != set(names):
            ready |= {str(e["instance"]) for e in events.read() if e.get("kind") == "ready"}
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                say(f"   instances did not start (exited: {', '.join(dead) or 'none'})")
                for name in dead or names:
                    say(f"   --- {name}'s output ---\n{_tail(logs[name])}")
                return 2
            time.sleep(0.05)
        start = time.time()
        table.first = math.ceil(start)
        table.last = math.floor(start + seconds)
        table.header()
        runs = _Tail(runs_path)
        kill_at = start + min(max(3.0, seconds / 3), seconds - 2)
        while time.time() < table.last + SETTLE:
            table.add(runs.read())
            due = victim is not None and killed_at is None and time.time() >= kill_at
            if due and victim is not None and (
                _just_finished(table.records, victim) or time.time() >= kill_at + 3
            ):
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(10)
                killed_at = time.time()
                table.killed_at = killed_at
            table.flush(time.time() - SETTLE)
            time.sleep(0.05)
    finally:
        with _shielded():
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    table.add(runs.read())
    table.flush(float(table.last))
    return table.summary()


def _just_finished(records: list[dict[str, Any]], victim: str) -> bool:
    # Kill the victim right after one of its runs ended, so it holds no claim it has not run
    # yet (a kill between claim and run loses that tick: the scheduler is at-most-once).
    mine = [r for r in records if r.get("instance") == victim]
    return bool(mine) and mine[-1].get("phase") == "end"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


class _Table:
    """The tick rows, printed as ticks settle, and the closing summary."""

    def __init__(self, offsets: dict[str, float], victim: str | None, stream: TextIO) -> None:
        self.offsets = offsets
        self.victim = victim
        self.stream = stream
        self.first = 0
        self.last = 0
        self.next = 0  # the next tick (epoch seconds) to print
        self.killed_at: float | None = None
        self.kill_shown = False
        self.records: list[dict[str, Any]] = []
        self.by_tick: dict[int, list[str]] = defaultdict(list)

    def header(self) -> None:
        self.next = self.first
        print(f"\n   {'tick (UTC)':<12} {'ran on':<28} {'runs':>4}", file=self.stream, flush=True)

    def add(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.records.append(record)
            if record.get("phase") == "begin" and record.get("job") == JOB:
                tick = round(_parse(str(record["key"]).split("@", 1)[1]))
                self.by_tick[tick].append(str(record["instance"]))

    def _asked_after_kill(self, tick: int) -> bool:
        # The victim asks for a tick when its own (skewed) clock reaches it.
        offset = self.offsets.get(self.victim or "", 0.0)
        return self.killed_at is not None and tick - offset > self.killed_at

    def flush(self, upto: float) -> None:
        while self.next <= min(upto, self.last):
            tick = self.next
            if not self.kill_shown and self._asked_after_kill(tick):
                print(f"   {'':<12} -- instance {self.victim} killed (SIGKILL) --",
                      file=self.stream)
                self.kill_shown = True
            ran = self.by_tick.get(tick, [])
            who = ", ".join(f"{n} (clock {self.offsets.get(n, 0):+.0f} s)" for n in ran) or "-"
            mark = "" if len(ran) == 1 else "  <-- !"
            print(f"   {_format(tick)[11:19]:<12} {who:<28} {len(ran):>4}{mark}",
                  file=self.stream, flush=True)
            self.next += 1

    def summary(self) -> int:
        ticks = list(range(self.first, self.last + 1))
        ran = {t: self.by_tick.get(t, []) for t in ticks}
        duplicates = sum(max(0, len(r) - 1) for r in ran.values())
        missed = sum(1 for r in ran.values() if not r)
        per_instance: dict[str, int] = defaultdict(int)
        for names in ran.values():
            for name in names:
                per_instance[name] += 1
        shares = ", ".join(f"{n} {c}" for n, c in sorted(per_instance.items())) or "none"
        ok = not duplicates and not missed and bool(ticks)
        verdict = "each ran exactly once" if ok else "NOT exactly once"
        out = self.stream
        print(file=out)
        print(f"   {len(ticks)} ticks, {verdict}: duplicates {duplicates}, missed {missed} "
              f"(runs per instance: {shares})", file=out)
        for line in self._story(ticks, ran):
            print(f"   {line}", file=out)
        out.flush()
        return 0 if ok else 1

    def _story(self, ticks: list[int], ran: dict[int, list[str]]) -> list[str]:
        """What happened, in words, computed from the rows (never assumed)."""
        victim = self.victim
        if victim is None:
            return []
        alive = [t for t in ticks if not self._asked_after_kill(t)]
        after = [t for t in ticks if self._asked_after_kill(t)]
        won = [t for t in alive if victim in ran[t]]
        lines = []
        offset = self.offsets[victim]
        if alive:
            others = sorted({n for t in alive for n in ran[t] if n != victim})
            text = (f"while instance {victim} (clock {offset:+.0f} s, so it asks early) was "
                    f"alive it won {len(won)} of {len(alive)} ticks")
            if others:
                text += f"; {_and(others)} won the others"
            lines.append(text)
        if self.killed_at is not None and not after:
            lines.append(
                f"instance {victim} was killed with SIGKILL after it had asked for the last "
                "tick shown; run longer (--seconds 12) to see the others take over"
            )
        if self.killed_at is not None and after:
            takers = sorted({n for t in after for n in ran[t]})
            clean = all(len(ran[t]) == 1 for t in after)
            lines.append(
                f"after SIGKILL, {_and(takers) or 'nobody'} ran the {len(after)} tick(s) "
                + ("that followed, without a gap or a double run" if clean
                   else "that followed, but not exactly once each")
            )
        return lines


def _parse(tick: str) -> float:
    return datetime.fromisoformat(tick.replace("Z", "+00:00")).timestamp()


def _format(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def cmd_demo(args: argparse.Namespace, ctx: Context) -> int:
    """``coordlock demo``: see the module docstring."""
    url = ctx.url
    if url is not None and not url.strip():
        ctx.open(url)  # raises the ConfigurationError for an empty URL
    return run_demo(url, args.seconds)


def add_parser(sub: Any, parents: list[Any]) -> None:
    """Register ``coordlock demo``."""
    demo = sub.add_parser(
        "demo",
        parents=parents,
        help="see a fenced lock and once-per-tick scheduling on this machine (~15 s)",
        description=(
            "1. Two holders of one lock: the first freezes past its TTL, the second takes the\n"
            "   lock with a greater fence, and the first's late write is rejected.\n"
            "2. Three scheduler processes run one job every second; one runs with its clock\n"
            "   2 s ahead and is killed with SIGKILL after a few seconds. A row per tick shows\n"
            "   who ran it: always exactly one.\n"
            "Uses a fresh SQLite file in a temporary folder unless --url is given (not\n"
            "memory://). Ctrl-C stops everything and removes the folder. Exits 0 when every\n"
            "tick ran exactly once, 1 otherwise."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--seconds", type=float, default=12.0, metavar="S",
        help="how long the scheduler part runs (default 12, at least 4)",
    )
    demo.set_defaults(func=cmd_demo)


__all__ = ["run_demo"]
