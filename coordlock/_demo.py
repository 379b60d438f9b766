"""``coordlock demo``: several scheduler processes, one job, every tick run exactly once.

Starts ``instances`` scheduler processes (default 3) on one coordinator (an embedded SQLite file
in a temporary directory unless a URL is given), all with the same job ``tick`` every second.
Instance ``b`` runs with its clock 2 s ahead, so it reaches each tick first and wins it; after a
few seconds it is killed with SIGKILL and the others take over. At the end a table shows each
tick, which instance ran it and how many runs it got — always 1.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from ._registry import redact

SKEW = 2.0
JOB = "interval"


def _names(count: int) -> list[str]:
    return [chr(ord("a") + i) if i < 26 else f"i{i}" for i in range(count)]


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by SIGKILL
    return lines


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def run_demo(
    url: str | None, seconds: float, instances: int = 3, *, out: TextIO | None = None
) -> int:
    """Run the demo and print its table; returns 0 when every tick ran exactly once."""
    stream = out or sys.stdout
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError("instances must be an int >= 1")
    if seconds < 4:
        raise ValueError("seconds must be at least 4")
    workdir = Path(tempfile.mkdtemp(prefix="coordlock-demo-"))
    target = url or f"sqlite:///{workdir / 'demo.db'}"
    runs, events = workdir / "runs.jsonl", workdir / "events.jsonl"
    names = _names(instances)
    offsets = {name: (SKEW if i == 1 else 0.0) for i, name in enumerate(names)}
    victim = names[1] if instances >= 3 else None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    print(f"coordlock demo: {instances} scheduler process(es) on {redact(target)}", file=stream)
    print(f"job {JOB!r} every second; claim key '{JOB}@<tick UTC>'", file=stream)
    for name in names:
        note = f"clock {offsets[name]:+.1f} s"
        if name == victim:
            note += ", killed with SIGKILL after a few seconds"
        print(f"  instance {name}: {note}", file=stream)
    print(file=stream)
    killed_at: float | None = None
    try:
        for name in names:
            procs[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coordlock.scheduler._worker",
                    "--url",
                    target,
                    "--instance",
                    name,
                    f"--offset={offsets[name]}",
                    "--runs",
                    str(runs),
                    "--events",
                    str(events),
                    "--interval",
                    "1",
                    "--duration",
                    str(seconds + 60),
                ],
                stdin=subprocess.DEVNULL,
            )

        def ready() -> bool:
            got = {e["instance"] for e in _read_jsonl(events) if e.get("kind") == "ready"}
            return got >= set(names)

        if not _wait_for(ready, 30):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            print(f"instances did not start (exited: {', '.join(dead) or 'none'})", file=stream)
            return 2
        started = time.monotonic()
        if victim is not None:
            kill_after = min(max(3.0, seconds / 3), seconds - 2)
            time.sleep(kill_after)

            # Kill the victim right after one of its runs ended, so it holds no claim it
            # has not run yet (a kill between claim and run loses that tick: at-most-once).
            def victim_just_finished() -> bool:
                mine = [r for r in _read_jsonl(runs) if r.get("instance") == victim]
                return bool(mine) and mine[-1].get("phase") == "end"

            _wait_for(victim_just_finished, 3)
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(10)
            killed_at = time.time()
        left = seconds - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    status = _report(_read_jsonl(runs), offsets, victim, killed_at, stream)
    if url is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"(run log kept in {workdir})", file=stream)
    return status


def _report(
    runs: list[dict[str, object]],
    offsets: dict[str, float],
    victim: str | None,
    killed_at: float | None,
    stream: TextIO,
) -> int:
    by_tick: dict[str, list[str]] = defaultdict(list)
    for record in runs:
        if record.get("phase") == "begin" and record.get("job") == JOB:
            by_tick[str(record["key"]).split("@", 1)[1]].append(str(record["instance"]))
    if not by_tick:
        print("no tick ran: is the coordinator reachable?", file=stream)
        return 1
    ticks = sorted(by_tick, key=_parse)
    first, last = _parse(ticks[0]), _parse(ticks[-1])
    every = [first + i for i in range(round(last - first) + 1)]
    print(f"{'tick (UTC)':<12} {'ran on':<28} {'runs':>4}", file=stream)
    duplicates = missed = 0
    per_instance: dict[str, int] = defaultdict(int)
    kill_shown = False
    for tick in every:
        key = _format(tick)
        ran = by_tick.get(key, [])
        if (
            killed_at is not None
            and not kill_shown
            and tick - offsets.get(victim or "", 0) > (killed_at)
        ):
            print(f"{'':<12} -- instance {victim} killed (SIGKILL) --", file=stream)
            kill_shown = True
        for name in ran:
            per_instance[name] += 1
        duplicates += max(0, len(ran) - 1)
        missed += 1 if not ran else 0
        who = ", ".join(f"{n} (clock {offsets.get(n, 0):+.0f} s)" for n in ran) or "-"
        mark = "" if len(ran) == 1 else "  <-- !"
        print(f"{key[11:19]:<12} {who:<28} {len(ran):>4}{mark}", file=stream)
    print(file=stream)
    shares = ", ".join(f"{n} {c}" for n, c in sorted(per_instance.items()))
    verdict = "each ran exactly once" if not duplicates and not missed else "NOT exactly once"
    print(
        f"{len(every)} ticks, {verdict}: duplicates {duplicates}, missed {missed} "
        f"(runs per instance: {shares})",
        file=stream,
    )
    if victim is not None and killed_at is not None:
        print(
            f"instance {victim}, its clock {offsets[victim]:+.0f} s ahead, reached each tick "
            "first and won it until SIGKILL; the others took over without a gap or a double run",
            file=stream,
        )
    return 0 if not duplicates and not missed else 1


def _parse(tick: str) -> float:
    return datetime.fromisoformat(tick.replace("Z", "+00:00")).timestamp()


def _format(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


__all__ = ["run_demo"]

if __name__ == "__main__":  # pragma: no cover - manual use: python -m coordlock._demo [URL]
    raise SystemExit(run_demo(sys.argv[1] if len(sys.argv) > 1 else None, 10.0))
