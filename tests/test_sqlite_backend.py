"""SQLite backend specifics (the contract suite covers the shared behaviour)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coordlock.backends.sqlite import SQLiteCoordinator

FIRST_OPEN = textwrap.dedent(
    """
    import os, sys, time
    from coordlock import connect
    go = float(sys.argv[2])
    while time.time() < go:  # every process opens the fresh file at the same instant
        pass
    c = connect(sys.argv[1])
    lease = c.acquire("first-open", 10, wait=30)
    assert lease is not None
    lease.release()
    c.close()
    print("ok", flush=True)
    """
)


def test_first_open_waits_for_a_writer_instead_of_failing_at_once(tmp_path: Path) -> None:
    """Issue 10 row 15: while another process writes to a file still in rollback-journal mode
    (a fresh file being set up), SQLite answers the switch to WAL with "database is locked" at
    once, without its busy timeout. The first open must wait (within ``timeout``) and work."""
    import sqlite3
    import threading

    path = tmp_path / "fresh.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    done = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    done.start()
    try:
        c = SQLiteCoordinator(path, timeout=30)
        lease = c.acquire("first-open", 10)
        assert lease is not None and lease.release()
        c.close()
    finally:
        done.join()
        writer.close()


@pytest.mark.parametrize("round_", range(2))
def test_concurrent_first_opens_of_a_fresh_file_all_succeed(tmp_path: Path, round_: int) -> None:
    url = f"sqlite:///{tmp_path}/fresh-{round_}.db"
    go = time.time() + 1.5  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_OPEN, url, repr(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(6)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    failures = [err for p, (_, err) in zip(procs, results, strict=True) if p.returncode != 0]
    assert not failures, failures[0]
    assert all(out.strip() == "ok" for out, _ in results)


def test_a_file_locked_for_good_says_what_happened(tmp_path: Path) -> None:
    import sqlite3

    from coordlock import BackendUnavailable

    path = tmp_path / "held.db"
    c = SQLiteCoordinator(path, timeout=0.3, retry_deadline=0)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(BackendUnavailable, match="stayed locked by another process"):
            c.acquire("x", 5)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        c.close()


def test_a_file_from_before_the_result_column_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    from coordlock.backends import RunRecord

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(  # the 0.1 layout of the run history
        "CREATE TABLE coordlock_runs (run_id TEXT PRIMARY KEY, job TEXT NOT NULL, "
        "tick TEXT NOT NULL, instance TEXT NOT NULL, started REAL NOT NULL, finished REAL, "
        "status TEXT NOT NULL, error TEXT);"
        "INSERT INTO coordlock_runs VALUES ('r0', 'job', 't0', 'i', 1.0, 2.0, 'finished', NULL);"
    )
    old.close()
    c = SQLiteCoordinator(path)
    try:
        c.record_run(RunRecord("r1", "job", "t1", "i", 3.0, 4.0, "finished", None, '{"n": 1}'))
        runs = {r.run_id: r for r in c.history("job")}
        assert runs["r1"].result == '{"n": 1}' and runs["r0"].result is None
    finally:
        c.close()
