"""Unit tests of the core: validation, registry, global coordinator, lock()/locked(), renewal."""

from __future__ import annotations

import inspect
import logging
import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

import coordlock
from coordlock import (
    BackendUnavailable,
    ConfigurationError,
    Lease,
    LockLost,
    LockNotAcquired,
    NotConfigured,
    _api,
)
from coordlock._validate import check_wait, parse_duration
from coordlock.backends import Attempt
from coordlock.backends.memory import MemoryCoordinator
from coordlock.testing.contract import eventually


@pytest.fixture
def mem() -> Iterator[MemoryCoordinator]:
    c = MemoryCoordinator(f"core-{uuid.uuid4().hex}")
    yield c
    c.close()


@pytest.fixture
def no_global(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("COORDLOCK_URL", raising=False)
    monkeypatch.setattr(_api, "_global", None)
    monkeypatch.setattr(_api, "_global_owned", False)
    monkeypatch.setattr(_api, "_global_from_env", None)
    yield


# -- import hygiene ----------------------------------------------------------------------------


def test_import_loads_no_driver() -> None:
    code = (
        "import sys, coordlock; coordlock.connect('memory://x');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('redis', 'psycopg', 'kazoo', 'psycopg_pool')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_match_the_design() -> None:
    assert set(coordlock.__all__) == {
        "BackendUnavailable", "ConfigurationError", "CoordlockError", "Lease", "LockLost",
        "LockNotAcquired", "NotConfigured", "RunCoordinator", "Scheduler", "configure",
        "connect", "get_coordinator", "lock", "locked",
        # the async API and the error for unexpected server answers
        "AsyncLease", "AsyncRunCoordinator", "BackendError", "aconnect",
    }
    for name in coordlock.__all__:
        assert hasattr(coordlock, name)
    for error in (ConfigurationError, LockNotAcquired, LockLost, BackendUnavailable):
        assert issubclass(error, coordlock.CoordlockError)
    assert issubclass(NotConfigured, ConfigurationError)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("1.5s", 1.5), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5", "0", "m10", "1h-3m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_check_wait() -> None:
    assert check_wait(None) == 0 and check_wait(False) == 0
    assert math.isinf(check_wait(True)) and math.isinf(check_wait(math.inf))
    assert check_wait(timedelta(seconds=3)) == 3
    with pytest.raises(ValueError):
        check_wait(-1)
    with pytest.raises(TypeError):
        check_wait("5")
    with pytest.raises(ValueError):
        check_wait(math.nan)


def test_lock_rejects_bad_arguments_at_the_call() -> None:
    with pytest.raises(ValueError):
        coordlock.lock("")
    with pytest.raises(TypeError):
        coordlock.lock(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        coordlock.lock("x", ttl=0)
    with pytest.raises(ValueError):
        coordlock.lock("x", wait=-2)
    with pytest.raises(TypeError):
        coordlock.lock("x", ttl="10")  # type: ignore[arg-type]


# -- registry ----------------------------------------------------------------------------------


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        coordlock.connect("etcd://localhost")
    for scheme in ("memory://", "sqlite://", "redis://", "postgresql://", "zookeeper://"):
        assert scheme in str(info.value)


@pytest.mark.parametrize("url", ["", "locks.db", "://x", "sqlite:relative.db"])
def test_malformed_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        coordlock.connect(url)


def test_connect_requires_str() -> None:
    with pytest.raises(TypeError):
        coordlock.connect(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("redis://127.0.0.1:1", "redis", "redis"),
        ("postgresql://x@127.0.0.1:1/db", "psycopg", "postgres"),
        ("zookeeper://127.0.0.1:1", "kazoo", "zookeeper"),
    ],
)
def test_missing_driver_names_the_extra(url: str, module: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import coordlock\n"
        f"try:\n    coordlock.connect({url!r})\n"
        "except coordlock.ConfigurationError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"pip install 'coordlock[{extra}]'" in out.stdout, out.stdout + out.stderr


def test_third_party_scheme_registration(mem: MemoryCoordinator) -> None:
    from coordlock._registry import known_schemes, register_backend

    seen: list[tuple[str, dict[str, Any]]] = []

    def factory(url: str, **options: Any) -> MemoryCoordinator:
        seen.append((url, options))
        return mem

    register_backend("thirdparty", factory)
    assert "thirdparty" in known_schemes()
    assert coordlock.connect("thirdparty://x", flavour=1) is mem
    assert seen == [("thirdparty://x", {"flavour": 1})]


def test_entry_points_register_builtins() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="coordlock.backends")}
    assert {"memory", "sqlite", "redis", "postgresql", "zookeeper"} <= names


def test_redact_hides_passwords() -> None:
    from coordlock._registry import redact

    assert redact("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"


# -- global coordinator ------------------------------------------------------------------------


def test_get_coordinator_not_configured(no_global: None) -> None:
    with pytest.raises(NotConfigured) as info:
        coordlock.get_coordinator()
    assert "coordlock.configure(" in str(info.value) and "COORDLOCK_URL" in str(info.value)


def test_env_url_fallback(no_global: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDLOCK_URL", f"memory://env-{uuid.uuid4().hex}")
    first = coordlock.get_coordinator()
    assert isinstance(first, MemoryCoordinator)
    assert coordlock.get_coordinator() is first  # built once
    monkeypatch.setenv("COORDLOCK_URL", "nope://x")
    with pytest.raises(ConfigurationError, match="COORDLOCK_URL"):
        coordlock.get_coordinator()


def test_configure_url_and_object(no_global: None, mem: MemoryCoordinator) -> None:
    built = coordlock.configure(f"memory://cfg-{uuid.uuid4().hex}")
    assert coordlock.get_coordinator() is built
    assert coordlock.configure(mem) is mem
    assert built.closed  # type: ignore[attr-defined]  # the one configure built is closed
    assert coordlock.get_coordinator() is mem
    coordlock.configure(f"memory://cfg-{uuid.uuid4().hex}")
    assert not mem.closed  # a coordinator the caller passed in is the caller's to close
    with pytest.raises(TypeError):
        coordlock.configure(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        coordlock.configure(mem, ttl=3)


def test_lock_uses_global_coordinator(no_global: None, mem: MemoryCoordinator) -> None:
    ctx = coordlock.lock("late-bound", ttl=5)  # built before configure(): looked up on entry
    coordlock.configure(mem)
    with ctx as lease:
        assert isinstance(lease, Lease)
        assert mem.acquire("late-bound", 5) is None
    assert mem.acquire("late-bound", 5) is not None


# -- lock() ------------------------------------------------------------------------------------


def test_lock_busy_and_wait(mem: MemoryCoordinator) -> None:
    holder = mem.acquire("script", 30)
    assert holder is not None
    with pytest.raises(LockNotAcquired, match="held by another owner"):
        with coordlock.lock("script", coordinator=mem):
            pass
    with pytest.raises(LockNotAcquired, match=r"after 0\.2s"):
        with coordlock.lock("script", wait=0.2, coordinator=mem):
            pass
    threading.Timer(0.2, holder.release).start()
    with coordlock.lock("script", wait=True, coordinator=mem) as lease:
        assert lease.fence > holder.fence


def test_lock_blocks_leave_nothing_behind_in_the_thread_context(mem: MemoryCoordinator) -> None:
    # One ContextVar per lock(...) object used to stay in the thread's context for good: a
    # `with coordinator.lock(...)` per job grew every worker thread's context without bound.
    import contextvars

    with mem.lock("warm-up"):
        pass
    before = len(contextvars.copy_context())
    for i in range(500):
        with mem.lock(f"job-{i % 7}") as lease:
            assert lease.name == f"job-{i % 7}"
    assert len(contextvars.copy_context()) <= before + 1


def test_nested_and_shared_lock_objects_track_their_own_blocks(mem: MemoryCoordinator) -> None:
    outer, inner = mem.lock("outer"), mem.lock("inner")
    with outer as a:
        with inner as b:
            assert outer.lease is a and inner.lease is b
        assert outer.lease is a and inner.lease is None
        seen: list[object] = []

        def other_thread() -> None:  # the same object, entered by another thread meanwhile
            seen.append(outer.lease)
            with inner as c:
                seen.append(inner.lease is c)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert seen == [None, True]
        assert outer.lease is a
    assert outer.lease is None and b.released and a.released


def test_lock_lost_raises_at_exit_and_logs(
    mem: MemoryCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="coordlock")
    with pytest.raises(LockLost) as info:
        with coordlock.lock("fragile", ttl=0.2, coordinator=mem, renew=False) as lease:
            assert eventually(lambda: lease.lost)
            assert eventually(lambda: "lost" in caplog.text)
    assert info.value.name == "fragile"
    assert "ttl elapsed" in str(info.value)


# -- locked() ----------------------------------------------------------------------------------


def test_locked_default_name_and_wraps(mem: MemoryCoordinator) -> None:
    @coordlock.locked(coordinator=mem)
    def cleanup(days: int, *, dry_run: bool = False) -> str:
        """Remove old rows."""
        return f"cleaned {days} {dry_run}"

    assert cleanup.__name__ == "cleanup" and cleanup.__doc__ == "Remove old rows."
    params = inspect.signature(cleanup).parameters
    assert list(params) == ["days", "dry_run"] and params["dry_run"].default is False
    expected = f"{__name__}.test_locked_default_name_and_wraps.<locals>.cleanup"
    assert cleanup.lock_name == expected  # type: ignore[attr-defined]
    assert cleanup(3, dry_run=True) == "cleaned 3 True"


def test_locked_skip_wait_raise(mem: MemoryCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    @coordlock.locked("job", coordinator=mem)
    def skip() -> str:
        calls.append("skip")
        return "ran"

    @coordlock.locked("job", on_busy="raise", coordinator=mem)
    def strict() -> None:
        calls.append("strict")

    @coordlock.locked("job", on_busy="wait", wait=5, coordinator=mem)
    def patient() -> str:
        calls.append("patient")
        return "waited"

    holder = mem.acquire("job", 30)
    assert holder is not None
    caplog.set_level(logging.INFO, logger="coordlock")
    assert skip() is None
    assert "held elsewhere" in caplog.text
    with pytest.raises(LockNotAcquired):
        strict()
    threading.Timer(0.2, holder.release).start()
    assert patient() == "waited"
    assert skip() == "ran"
    assert calls == ["patient", "skip"]


def test_locked_wait_times_out(mem: MemoryCoordinator) -> None:
    @coordlock.locked("slow", on_busy="wait", wait=0.2, coordinator=mem)
    def job() -> None:
        raise AssertionError("must not run")

    holder = mem.acquire("slow", 30)
    assert holder is not None
    with pytest.raises(LockNotAcquired):
        job()


def test_locked_passes_user_exceptions_and_releases(mem: MemoryCoordinator) -> None:
    @coordlock.locked("boom", coordinator=mem)
    def boom() -> None:
        raise ZeroDivisionError("mine")

    with pytest.raises(ZeroDivisionError, match="mine"):
        boom()
    assert mem.acquire("boom", 5) is not None  # released


def test_locked_on_methods_and_bare(mem: MemoryCoordinator, no_global: None) -> None:
    coordlock.configure(mem)

    class Reports:
        def __init__(self) -> None:
            self.runs = 0

        @coordlock.locked(ttl=5)
        def build(self, n: int) -> int:
            self.runs += n
            return self.runs

    @coordlock.locked
    def bare() -> str:
        return "bare"

    reports = Reports()
    assert reports.build(2) == 2 and reports.build(3) == 5
    assert Reports.build.lock_name.endswith("Reports.build")  # type: ignore[attr-defined]
    assert bare() == "bare"


def test_locked_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        coordlock.locked("x", on_busy="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        coordlock.locked("x", wait=3)  # wait without on_busy="wait"
    with pytest.raises(ValueError):
        coordlock.locked("", ttl=5)
    with pytest.raises(ValueError):
        coordlock.locked("x", ttl=-1)
    with pytest.raises(TypeError):
        coordlock.locked("x", coordinator=object())  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="generator"):

        @coordlock.locked("x")
        async def job() -> Any:
            yield 1


def test_locked_raises_lock_lost_after_the_call(mem: MemoryCoordinator) -> None:
    @coordlock.locked("lossy", ttl=0.2, coordinator=mem, renew=False)
    def job() -> str:
        assert eventually(lambda: mem.acquire("lossy", 5) is not None)
        return "done"

    with pytest.raises(LockLost):
        job()


# -- leases and renewal ------------------------------------------------------------------------


class FlakyCoordinator(MemoryCoordinator):
    """A memory coordinator whose extensions fail while ``down`` is set."""

    down = False

    def _extend(self, name: str, owner: str, ttl: float) -> bool:
        if self.down:
            raise BackendUnavailable("server down (test)")
        return super()._extend(name, owner, ttl)


def test_renewal_failure_marks_at_risk_then_lost() -> None:
    c = FlakyCoordinator(f"flaky-{uuid.uuid4().hex}")
    lease = c.acquire("flaky", 0.6)
    assert lease is not None
    states: list[str] = []
    lease.on_state(lambda _, state: states.append(state))
    c.down = True
    assert eventually(lambda: lease.lost)
    assert eventually(lambda: states == ["at-risk", "lost"]), states
    assert "ttl elapsed" in lease.lost_reason
    c.close()


def test_renewal_recovers_after_a_blip() -> None:
    c = FlakyCoordinator(f"blip-{uuid.uuid4().hex}")
    lease = c.acquire("blip", 1.5)
    assert lease is not None
    states: list[str] = []
    lease.on_state(lambda _, state: states.append(state))
    c.down = True
    assert eventually(lambda: "at-risk" in states)
    c.down = False
    assert eventually(lambda: "restored" in states)
    assert not lease.lost
    assert lease.release()
    c.close()


def test_callback_errors_are_logged_not_raised(
    mem: MemoryCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    lease = mem.acquire("cb", 0.2, renew=False)
    assert lease is not None

    def bad(_: Lease) -> None:
        raise RuntimeError("callback bug")

    ran = threading.Event()
    lease.on_lost(bad)
    lease.on_lost(lambda _: ran.set())
    assert ran.wait(10)
    assert eventually(lambda: "callback bug" in caplog.text)


def test_release_checks_type(mem: MemoryCoordinator) -> None:
    with pytest.raises(TypeError):
        mem.release("not a lease")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mem.extend(None, 5)  # type: ignore[arg-type]


def test_closed_coordinator_refuses(mem: MemoryCoordinator) -> None:
    lease = mem.acquire("c", 0.5)
    assert lease is not None
    mem.close()
    with pytest.raises(ConfigurationError, match="closed"):
        mem.acquire("d", 5)
    mem.close()  # idempotent


def test_lease_repr_and_remaining(mem: MemoryCoordinator) -> None:
    lease = mem.acquire("repr", 10)
    assert lease is not None
    assert "held" in repr(lease) and 0 < lease.remaining <= 10
    assert lease.coordinator is mem
    lease.release()
    assert "released" in repr(lease) and not lease.lost


def test_memory_clock_jump_is_judged_by_injected_clock() -> None:
    now = [1000.0]
    a = MemoryCoordinator(f"clock-{uuid.uuid4().hex}", clock=lambda: now[0])
    b = MemoryCoordinator(a.name, clock=lambda: now[0])
    lease = a.acquire("jump", 30, renew=False)
    assert lease is not None
    now[0] += 10  # time moves on, still inside the ttl
    assert b.acquire("jump", 30) is None
    now[0] += 25  # jump past the ttl: the table frees it
    taken = b.acquire("jump", 30)
    assert taken is not None and taken.fence > lease.fence
    a.close()
    b.close()


def test_sqlite_bad_files(tmp_path: Any) -> None:
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigurationError, match=r"corrupt\.db"):
        coordlock.connect(f"sqlite:///{bad}")
    with pytest.raises(ConfigurationError, match="does not exist"):
        coordlock.connect(f"sqlite:///{tmp_path}/missing/dir/x.db")
    with pytest.raises(ConfigurationError, match="unknown option"):
        coordlock.connect(f"sqlite:///{tmp_path}/x.db?colour=red")


def test_sqlite_read_only_file(tmp_path: Any) -> None:
    import os

    path = tmp_path / "ro.db"
    coordlock.connect(f"sqlite:///{path}").close()
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        if os.geteuid() == 0:
            # root ignores file modes: prove the error path with SQLite's own read-only mode.
            with pytest.raises(ConfigurationError, match=r"ro\.db"):
                c = coordlock.connect(f"sqlite:///{path}")
                c._conn.execute("PRAGMA query_only=1")  # type: ignore[attr-defined]
                c.acquire("x", 5)
        else:
            with pytest.raises(ConfigurationError, match=r"ro\.db"):
                coordlock.connect(f"sqlite:///{path}").acquire("x", 5)
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)


def test_sqlite_relative_and_absolute_urls(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = coordlock.connect("sqlite:///rel.db")
    assert (tmp_path / "rel.db").exists()
    absolute = coordlock.connect(f"sqlite:///{tmp_path}/abs.db")  # -> sqlite:////tmp/...
    assert (tmp_path / "abs.db").exists()
    lease = rel.acquire("x", 5)
    assert lease is not None and absolute.acquire("x", 5) is not None  # different files
    rel.close()
    absolute.close()


def test_fenced_oracle_detects_a_broken_lock(tmp_path: Any) -> None:
    """The checker must catch what a lock without mutual exclusion does."""
    from coordlock.testing.fenced import FencedRegister, HistoryLog, check

    class NoLock(MemoryCoordinator):
        def _try_acquire(self, name: str, owner: str, ttl: float, ticket: Any) -> Attempt:
            with self._t.lock:
                fence = self._t.fences.get(name, 0) + 1
                self._t.fences[name] = fence
                return Attempt.granted(fence)

    register = FencedRegister(tmp_path / "r.json")
    history = HistoryLog(tmp_path / "h.jsonl")
    c = NoLock(f"nolock-{uuid.uuid4().hex}")

    def worker(w: str) -> None:
        from coordlock.testing.fenced import run_worker

        run_worker(c, register, history, w, iterations=30, hold=0.002)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    report = check(history, register)
    assert report.c1_overlaps > 0
    assert report.writes_rejected > 0 or report.c3_lost_updates > 0
    assert not report.ok()
    c.close()


def test_fenced_register_rejects_stale_fence(tmp_path: Any) -> None:
    from coordlock.testing.fenced import FencedRegister

    register = FencedRegister(tmp_path / "r.json")
    assert register.write(1, fence=5) == (True, 1)
    assert register.write(2, fence=4) == (False, 0)
    assert register.write(2, fence=5) == (False, 0)
    assert register.write(2, fence=9) == (True, 2)
    assert register.read(fence=12) == 2  # a newer holder has read: fence 10 is stale now
    assert register.write(3, fence=10) == (False, 0)
    assert register.write(3, fence=12) == (True, 3)
    assert register.state() == {
        "value": 3, "max_fence": 12, "write_fence": 12, "accepted": 3, "rejected": 3
    }


def test_expires_at_is_wall_clock(mem: MemoryCoordinator) -> None:
    before = time.time()
    lease = mem.acquire("wall", 60)
    assert lease is not None
    assert before + 59 < lease.expires_at <= time.time() + 60


def test_fork_child_renews_its_own_leases(mem: MemoryCoordinator, tmp_path: Any) -> None:
    """After fork() the child has a working renewal thread (no silent loss, no deadlock)."""
    import os

    parent = mem.acquire("parent", 0.6)
    assert parent is not None
    out = tmp_path / "child.txt"
    pid = os.fork()
    if pid == 0:  # child
        try:
            child = mem.acquire("child", 0.3)
            time.sleep(1.0)  # > 3 ttls: renewal must keep it
            out.write_text("ok" if child is not None and not child.lost else "lost")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert out.read_text() == "ok"
    assert not parent.lost
    parent.release()
