"""The backend contract suite: one set of behaviours every backend must pass (tooz style).

Use it from a test module::

    from coordlock.testing.contract import CoordinatorContract

    class TestContract(CoordinatorContract):
        pass

It needs a ``backend_url`` fixture giving a fresh, isolated URL per test; the pytest plugin in
:mod:`coordlock.testing.plugin` provides one for every built-in backend. A third-party backend
passes the suite by providing its own ``backend_url`` fixture.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import LockLost, LockNotAcquired, connect, lock
from .._lease import BaseLease, Lease
from .._protocol import KeepsHistory, ListsLocks, RecordsMany, RunRecord
from .fenced import run_fenced
from .modes import MODES, AsyncLeaseView, AsyncLockView, AsyncRunner, Mode, forge, view

#: Upper bound for polling loops in this suite (seconds). Bounds, never assertions on time.
PATIENCE = 15.0


def eventually(predicate: Callable[[], bool], within: float = PATIENCE, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``within`` seconds pass; return the last result."""
    stop = time.monotonic() + within
    while time.monotonic() < stop:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def acquire_eventually(coordinator: Any, name: str, ttl: float = 10) -> Any:
    """Try to take ``name`` until it works (bounded by :data:`PATIENCE`); fail the test if not."""
    stop = time.monotonic() + PATIENCE
    while time.monotonic() < stop:
        lease = coordinator.acquire(name, ttl)
        if lease is not None:
            return lease
        time.sleep(0.02)
    pytest.fail(f"lock {name!r} never became free within {PATIENCE}s")


CLAIM_SCRIPT = """
import sys
from coordlock import connect
c = connect(sys.argv[1])
try:
    sys.stdin.readline()  # start together
    print("WON" if c.claim(sys.argv[2], 30) else "LOST", flush=True)
finally:
    c.close()
"""


class CoordinatorContract:
    """Behaviours every backend promises, each run through the sync API and the async API
    (``mode``). Units are seconds throughout.

    Test bodies are written once against the sync surface; in ``async`` mode the
    ``coordinator`` and ``other`` fixtures are
    :class:`~coordlock.testing.modes.AsyncCoordinatorView` objects whose every call goes
    through ``aacquire``/``arelease``/``async with`` on a real event loop.
    """

    #: Set to True for a backend that only works inside one process (like ``memory://``): the
    #: multi-process behaviours then run with threads.
    single_process: bool = False

    def _in_process(self, url: str) -> bool:
        return self.single_process or url.startswith("memory://")

    @pytest.fixture(params=MODES)
    def mode(self, request: pytest.FixtureRequest) -> Mode:
        mode: Mode = request.param
        return mode

    @pytest.fixture
    def runner(self, mode: Mode) -> Iterator[AsyncRunner | None]:
        if mode == "sync":
            yield None
            return
        runner = AsyncRunner()
        yield runner
        runner.close()

    def _open(self, url: str, mode: Mode, runner: AsyncRunner | None) -> Any:
        return view(connect(url), mode, runner)

    @pytest.fixture
    def coordinator(
        self, backend_url: str, mode: Mode, runner: AsyncRunner | None
    ) -> Iterator[Any]:
        c = self._open(backend_url, mode, runner)
        yield c
        c.close()

    @pytest.fixture
    def other(self, backend_url: str, mode: Mode, runner: AsyncRunner | None) -> Iterator[Any]:
        """A second coordinator on the same backend: plays another instance."""
        c = self._open(backend_url, mode, runner)
        yield c
        c.close()

    # -- basics ------------------------------------------------------------------------------

    def test_acquire_release_roundtrip(self, coordinator: Any, mode: Mode) -> None:
        lease = coordinator.acquire("basic", 10)
        assert isinstance(lease, Lease if mode == "sync" else AsyncLeaseView)
        assert lease.name == "basic" and isinstance(lease.fence, int) and lease.fence > 0
        assert not lease.lost and lease.expires_at > time.time()
        assert coordinator.acquire("basic", 10) is None
        assert lease.release() is True
        assert lease.release() is False  # twice: nothing left to release
        again = coordinator.acquire("basic", 10)
        assert again is not None and again.fence > lease.fence
        assert again.owner != lease.owner
        again.release()

    def test_names_are_independent(self, coordinator: Any) -> None:
        first = coordinator.acquire("one", 10)
        second = coordinator.acquire("two", 10)
        assert first is not None and second is not None
        first.release()
        second.release()

    @pytest.mark.parametrize(
        "name", ["with/slash", "colon:and {braces}", "ünïcødé ☃", "x" * 512, " lead", "a\\b"]
    )
    def test_awkward_names(self, coordinator: Any, name: str) -> None:
        lease = coordinator.acquire(name, 10)
        assert lease is not None and lease.name == name
        assert coordinator.acquire(name, 10) is None
        assert lease.release()

    def test_owner_is_unique_per_acquisition(self, coordinator: Any) -> None:
        owners = set()
        for _ in range(5):
            lease = coordinator.acquire("owners", 10)
            assert lease is not None
            owners.add(lease.owner)
            lease.release()
        assert len(owners) == 5

    def test_fence_increases_across_coordinators(
        self, backend_url: str, mode: Mode, runner: AsyncRunner | None
    ) -> None:
        fences = []
        for _ in range(3):  # a client restart is a new coordinator
            c = self._open(backend_url, mode, runner)
            try:
                lease = c.acquire("restarts", 10)
                assert lease is not None
                fences.append(lease.fence)
                lease.release()
            finally:
                c.close()
        assert fences == sorted(fences) and len(set(fences)) == 3

    def test_bad_input_raises_at_the_call(self, coordinator: Any) -> None:
        with pytest.raises(ValueError):
            coordinator.acquire("", 10)
        with pytest.raises(TypeError):
            coordinator.acquire(42, 10)
        with pytest.raises(ValueError):
            coordinator.acquire("x", 0)
        with pytest.raises(ValueError):
            coordinator.acquire("x", -1)
        with pytest.raises(ValueError):
            coordinator.acquire("x", 1, wait=-1)
        with pytest.raises(ValueError):
            coordinator.claim("", 10)
        with pytest.raises(ValueError):
            coordinator.claim("k", 0)
        assert coordinator.acquire("x", 1) is not None  # nothing was left behind

    # -- ownership ---------------------------------------------------------------------------

    def test_non_owner_release_and_extend_do_nothing(self, coordinator: Any, other: Any) -> None:
        lease = coordinator.acquire("owned", 10)
        assert lease is not None
        for who in (coordinator, other):
            assert who.release(forge(who, lease, "f" * 32)) is False
            assert who.extend(forge(who, lease, "f" * 32), 10) is False
        assert other.acquire("owned", 10) is None  # still held by the real owner
        assert not lease.lost
        assert lease.release() is True

    def test_release_after_takeover_returns_false(
        self, coordinator: Any, other: Any
    ) -> None:
        # a ttl a loaded machine's first (async) round trip cannot outlast: a grant whose reply
        # comes after its own ttl is let go (PostgreSQL), never handed out already lost
        stale = coordinator.acquire("takeover", 1.0, renew=False)
        assert stale is not None
        fresh = None

        def take() -> bool:
            nonlocal fresh
            fresh = other.acquire("takeover", 10)
            return fresh is not None

        assert eventually(take), "the lock was not free after its ttl"
        assert fresh is not None and fresh.fence > stale.fence
        assert stale.lost
        assert stale.release() is False
        assert stale.extend() is False
        assert other.acquire("takeover", 10) is None  # the stale holder deleted nothing
        assert fresh.release() is True

    # -- ttl, renewal, loss ------------------------------------------------------------------

    def test_ttl_expiry_lets_another_owner_in(
        self, coordinator: Any, other: Any
    ) -> None:
        lost = threading.Event()
        lease = coordinator.acquire("expiring", 0.5, renew=False)
        assert lease is not None
        lease.on_lost(lambda _: lost.set())
        assert other.acquire("expiring", 10) is None
        assert lost.wait(PATIENCE), "on_lost did not fire after the ttl elapsed"
        assert lease.lost
        assert acquire_eventually(other, "expiring").fence > lease.fence

    def test_renewal_keeps_lock_past_ttl(
        self, coordinator: Any, other: Any
    ) -> None:
        lease = coordinator.acquire("renewed", 2.0)  # renewed every 0.67 s: slack for load
        assert lease is not None
        stop = time.monotonic() + 6.5  # > 3 ttls
        while time.monotonic() < stop:
            assert other.acquire("renewed", 10) is None
            time.sleep(0.1)
        assert not lease.lost
        assert lease.release() is True

    def test_holder_that_stops_renewing_loses_the_lock(
        self, coordinator: Any, other: Any
    ) -> None:
        lease = coordinator.acquire("stops", 0.6)
        assert lease is not None
        seen: list[BaseLease] = []
        lease.on_lost(seen.append)
        lease.renew = False  # the holder stops renewing (as a hung holder would)
        assert eventually(lambda: lease.lost), "lease never turned lost"
        assert eventually(lambda: seen == [lease]), "on_lost callback did not run once"
        assert acquire_eventually(other, "stops").fence > lease.fence
        assert lease.extend() is False

    def test_extend_moves_expiry(self, coordinator: Any) -> None:
        lease = coordinator.acquire("extend", 1, renew=False)
        assert lease is not None
        before = lease.expires_at
        assert lease.extend(30) is True
        assert lease.expires_at > before + 20
        assert lease.ttl == 30
        time.sleep(1.2)  # past the original ttl: the extension must hold
        assert not lease.lost
        assert coordinator.acquire("extend", 1) is None
        assert lease.release() is True

    def test_on_lost_after_loss_fires_at_once(self, coordinator: Any) -> None:
        lease = coordinator.acquire("late-callback", 0.2, renew=False)
        assert lease is not None
        assert eventually(lambda: lease._lost)
        seen: list[BaseLease] = []
        lease.on_lost(seen.append)
        assert eventually(lambda: seen == [lease]), "a callback added after the loss never ran"

    # -- waiting -----------------------------------------------------------------------------

    def test_wait_times_out(self, coordinator: Any, other: Any) -> None:
        lease = coordinator.acquire("busy", 30)
        assert lease is not None
        assert other.acquire("busy", 10, wait=0.3) is None
        with pytest.raises(LockNotAcquired):
            with other.lock("busy", 10, wait=0.3):
                pass
        with pytest.raises(LockNotAcquired):
            with other.lock("busy", 10):
                pass
        assert lease.release()

    def test_waiter_gets_lock_when_released(
        self, coordinator: Any, other: Any
    ) -> None:
        lease = coordinator.acquire("handoff", 30)
        assert lease is not None
        timer = threading.Timer(0.3, lease.release)
        timer.start()
        try:
            waited = other.acquire("handoff", 10, wait=PATIENCE)
        finally:
            timer.join()
        assert waited is not None and waited.fence > lease.fence
        waited.release()

    def test_waiter_gets_lock_when_holder_expires(
        self, coordinator: Any, other: Any
    ) -> None:
        lease = coordinator.acquire("dead-holder", 0.5, renew=False)
        assert lease is not None
        waited = other.acquire("dead-holder", 10, wait=PATIENCE)
        assert waited is not None and waited.fence > lease.fence
        waited.release()

    def test_wait_forever(self, coordinator: Any, other: Any) -> None:
        lease = coordinator.acquire("forever", 30)
        assert lease is not None
        threading.Timer(0.2, lease.release).start()
        waited = other.acquire("forever", 10, wait=math.inf)
        assert waited is not None
        waited.release()

    # -- the context manager -----------------------------------------------------------------

    def test_lock_context_releases(self, coordinator: Any) -> None:
        with coordinator.lock("ctx", 10) as lease:
            assert coordinator.acquire("ctx", 10) is None
        assert lease.released
        again = coordinator.acquire("ctx", 10)
        assert again is not None
        again.release()

    def test_lock_context_raises_lock_lost(
        self, coordinator: Any, other: Any
    ) -> None:
        with pytest.raises(LockLost):
            with coordinator.lock("lost-ctx", 0.3, renew=False):
                assert eventually(lambda: other.acquire("lost-ctx", 10) is not None)

    def test_lock_context_keeps_user_exception(self, coordinator: Any) -> None:
        with pytest.raises(KeyError):
            with coordinator.lock("boom", 10):
                raise KeyError("mine")
        lease = coordinator.acquire("boom", 10)
        assert lease is not None  # released despite the error
        lease.release()

    # -- minimum hold (ShedLock's lockAtLeastFor) and force-unlock ---------------------------

    def test_hold_at_least_keeps_the_name_taken_after_release(
        self, coordinator: Any, other: Any
    ) -> None:
        hold = 1.0
        started = time.monotonic()
        lease = coordinator.acquire("held-min", 30, hold_at_least=hold)
        assert lease is not None
        assert lease.release() is True
        assert other.acquire("held-min", 10) is None  # released, but the hold is not over
        later = other.acquire("held-min", 10, wait=PATIENCE)  # PATIENCE < ttl: freed by the hold
        assert later is not None and later.fence > lease.fence
        assert time.monotonic() - started >= hold * 0.9  # never before the hold (clock slack)
        assert later.release() is True

    def test_hold_at_least_already_over_frees_at_once(self, coordinator: Any, other: Any) -> None:
        lease = coordinator.acquire("held-over", 30, hold_at_least=0.2)
        assert lease is not None
        time.sleep(0.4)
        assert lease.release() is True
        again = other.acquire("held-over", 10)
        assert again is not None
        again.release()

    def test_hold_at_least_bad_values(self, coordinator: Any) -> None:
        with pytest.raises(ValueError):
            coordinator.acquire("held-bad", 10, hold_at_least=-1)
        with pytest.raises(TypeError):
            coordinator.acquire("held-bad", 10, hold_at_least="5")

    def test_force_release_frees_a_held_lock(self, coordinator: Any, other: Any) -> None:
        real = getattr(coordinator, "coordinator", coordinator)
        if not getattr(real, "can_force_release", False):
            pytest.skip("this backend cannot force-unlock")  # declared, not hidden
        lease = coordinator.acquire("forced", 30)
        assert lease is not None
        assert other.force_release("forced") is True
        assert other.force_release("forced") is False  # nothing left
        taken = other.acquire("forced", 10)
        assert taken is not None and taken.fence > lease.fence
        assert lease.extend() is False and lease.lost  # the old holder finds out
        assert lease.release() is False
        assert other.acquire("forced", 10) is None  # the old holder deleted nothing
        assert taken.release() is True

    # -- claims ------------------------------------------------------------------------------

    def test_claim_is_once_only(self, coordinator: Any, other: Any) -> None:
        assert coordinator.claim("job@2026-01-01T00:00:00Z", 30) is True
        assert coordinator.claim("job@2026-01-01T00:00:00Z", 30) is False
        assert other.claim("job@2026-01-01T00:00:00Z", 30) is False
        assert other.claim("job@2026-01-01T00:01:00Z", 30) is True

    def test_claim_expires_after_hold(self, coordinator: Any) -> None:
        assert coordinator.claim("short", 0.3) is True
        assert coordinator.claim("short", 0.3) is False
        assert eventually(lambda: coordinator.claim("short", 30))

    def test_claim_many(self, coordinator: Any, other: Any) -> None:
        keys = [f"tick-job{i}@2026-01-01T00:00:00Z" for i in range(50)]
        assert coordinator.claim("tick-job3@2026-01-01T00:00:00Z", 30)
        won = coordinator.claim_many(keys, 30)
        assert won == set(keys) - {"tick-job3@2026-01-01T00:00:00Z"}
        assert other.claim_many(keys, 30) == set()
        assert coordinator.claim_many([], 30) == set()
        with pytest.raises(TypeError):
            coordinator.claim_many("a-string", 30)

    def test_claim_once_across_concurrent_processes(
        self, backend_url: str, coordinator: Any
    ) -> None:
        key = "race@2026-01-01T00:00:00Z"
        if self._in_process(backend_url):
            results: list[bool] = []
            barrier = threading.Barrier(8)

            def claim() -> None:
                c = connect(backend_url)
                barrier.wait()
                results.append(c.claim(key, 30))
                c.close()

            threads = [threading.Thread(target=claim) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(PATIENCE)
            assert sorted(results) == [False] * 7 + [True]
            return
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLAIM_SCRIPT, backend_url, key],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(8)
        ]
        time.sleep(0.5)  # let them import and connect (the claim itself waits for the go)
        outputs = []
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(out.strip())
        assert sorted(outputs) == ["LOST"] * 7 + ["WON"]

    # -- tick claims: once per tick outside the Scheduler ------------------------------------
    # coordlock.lock(cron=/every=), @locked(...) and `coordlock run --every` claim
    # f"{name}@{tick UTC}" (the Scheduler's key) before the lock. An hourly schedule whose
    # tick is this very second (offset) keeps these tests independent of the time of day.

    @staticmethod
    def _tick_lock(coordinator: Any, runner: AsyncRunner | None, name: str, **options: Any) -> Any:
        """``coordlock.lock(name, ...)`` on ``coordinator``, entered in the view's mode."""
        real = getattr(coordinator, "coordinator", coordinator)
        held = lock(name, 10, coordinator=real, **options)
        return held if runner is None else AsyncLockView(held, runner)

    @staticmethod
    def _hour_at_now() -> tuple[float, float]:
        """(offset, tick): an hourly schedule with a tick at the current whole second."""
        now = int(time.time())
        return float(now % 3600), float(now)

    def test_tick_lock_runs_each_tick_once(
        self, coordinator: Any, other: Any, runner: AsyncRunner | None
    ) -> None:
        from ..scheduler import tick_key

        offset, tick = self._hour_at_now()
        key = f"hourly@{tick_key(tick)}"
        with self._tick_lock(coordinator, runner, "hourly", every=3600, offset=offset) as lease:
            assert lease.fence > 0
            with pytest.raises(LockNotAcquired) as running:  # another server, meanwhile
                with self._tick_lock(other, runner, "hourly", every=3600, offset=offset):
                    pass
        assert running.value.reason == "claimed-elsewhere"  # type: ignore[attr-defined]
        with pytest.raises(LockNotAcquired) as late:  # a server whose cron fired late
            with self._tick_lock(other, runner, "hourly", every=3600, offset=offset):
                pass
        assert late.value.reason == "claimed-elsewhere"  # type: ignore[attr-defined]
        assert late.value.key == key  # type: ignore[attr-defined]
        free = other.acquire("hourly", 10)  # only the tick is taken, not the lock
        assert free is not None and free.fence > lease.fence
        free.release()

    def test_tick_claims_interoperate_with_the_scheduler(
        self, coordinator: Any, other: Any, runner: AsyncRunner | None
    ) -> None:
        from ..scheduler import tick_key

        offset, tick = self._hour_at_now()
        assert other.claim(f"sync@{tick_key(tick)}", 30)  # a Scheduler won this tick
        with pytest.raises(LockNotAcquired):
            with self._tick_lock(coordinator, runner, "sync", every=3600, offset=offset):
                pass
        with self._tick_lock(coordinator, runner, "export", every=3600, offset=offset):
            pass
        assert other.claim(f"export@{tick_key(tick)}", 30) is False  # the Scheduler loses

    def test_off_tick_call_claims_nothing(
        self, coordinator: Any, other: Any, runner: AsyncRunner | None
    ) -> None:
        offset = float((int(time.time()) + 1800) % 3600)  # the nearest tick is 30 min away
        with pytest.raises(LockNotAcquired) as off:
            with self._tick_lock(coordinator, runner, "offtick", every=3600, offset=offset):
                pass
        assert off.value.reason == "off-tick"  # type: ignore[attr-defined]
        with self._tick_lock(coordinator, runner, "offtick", every=3600, offset=offset,
                             off_tick="run") as lease:  # fmt: skip
            assert other.acquire("offtick", 10) is None  # the lock alone still excludes
        again = other.acquire("offtick", 10)
        assert again is not None and again.fence > lease.fence
        again.release()

    # -- mutual exclusion under load ---------------------------------------------------------

    def test_mutual_exclusion_fenced_register(
        self, backend_url: str, tmp_path: Path, mode: Mode
    ) -> None:
        report = run_fenced(
            backend_url, tmp_path, workers=8, iterations=500, ttl=10, wait=60, mode=mode,
            threads=self._in_process(backend_url),
        )
        print(f"\n[{backend_url.split(':')[0]} {mode}] fenced register: {report.summary()}")
        assert report.acquisitions == 8 * 500
        assert report.writes_accepted == 8 * 500 and report.writes_rejected == 0
        assert report.final_value == 8 * 500
        assert report.c1_overlaps == 0
        assert report.c2_stale_accepted == 0
        assert report.c3_lost_updates == 0
        assert report.c4_fence_inversions == 0

    # -- optional capabilities ---------------------------------------------------------------

    def test_locks_listing(self, coordinator: Any) -> None:
        if not isinstance(getattr(coordinator, "coordinator", coordinator), ListsLocks):
            pytest.skip("this backend cannot list held locks")  # declared, not hidden
        lease = coordinator.acquire("listed", 10)
        assert lease is not None
        held = {info.name: info for info in coordinator.locks()}
        assert "listed" in held and held["listed"].fence == lease.fence
        assert held["listed"].owner == lease.owner
        lease.release()
        assert "listed" not in {info.name for info in coordinator.locks()}

    def test_run_history(self, coordinator: Any) -> None:
        if not isinstance(getattr(coordinator, "coordinator", coordinator), KeepsHistory):
            pytest.skip("this backend keeps no run history")  # declared, not hidden
        base = time.time()
        for i in range(3):
            coordinator.record_run(RunRecord(f"r{i}", "job-a", f"t{i}", "inst", base + i))
        coordinator.record_run(RunRecord("r1", "job-a", "t1", "inst", base + 1, base + 2,
                                         "failed", "boom"))
        coordinator.record_run(RunRecord("x", "job-b", "t0", "inst", base))
        runs = coordinator.history("job-a")
        assert [r.run_id for r in runs] == ["r2", "r1", "r0"]
        assert runs[1].status == "failed" and runs[1].error == "boom"
        assert runs[1].finished == pytest.approx(base + 2)
        assert len(coordinator.history(limit=2)) == 2
        assert {r.job for r in coordinator.history()} == {"job-a", "job-b"}

    def test_run_history_rows_written_at_once(self, coordinator: Any) -> None:
        """``record_runs`` leaves what ``record_run`` of each row in order would: a later row
        of a run wins, updates go through it too, odd text comes back unchanged."""
        target = getattr(coordinator, "coordinator", coordinator)
        if not isinstance(target, RecordsMany):
            pytest.skip("this backend writes history one row at a time")  # declared
        base = time.time()
        rows = [RunRecord(f"m{i}", "job-m", f"t{i}", "inst", base + i) for i in range(5)]
        failed = RunRecord("m1", "job-m", "t1", "inst", base + 1, base + 1.5, "failed",
                           "line 1\nline 'q' \\ \"x\" ✓", '{"a": [1, null]}')  # fmt: skip
        target.record_runs([])  # nothing to write
        target.record_runs([*rows, failed])
        runs = coordinator.history("job-m")
        assert [r.run_id for r in runs] == ["m4", "m3", "m2", "m1", "m0"]
        assert runs[3] == failed  # the later row of m1 won
        assert runs[0] == rows[4] and runs[0].finished is None and runs[0].error is None
        done = RunRecord("m0", "job-m", "t0", "inst", base, base + 0.5, "finished")
        target.record_runs([done, RunRecord("n0", "job-n", "t0", "inst", base)])
        assert coordinator.history("job-m")[-1] == done
        assert [r.run_id for r in coordinator.history("job-n")] == ["n0"]
        careless: Any = target  # (calls a type checker would refuse)
        with pytest.raises(TypeError):
            careless.record_runs([rows[0], "not a record"])
        with pytest.raises(TypeError):
            careless.record_runs(rows[0])  # one record, not a sequence of them
        assert coordinator.history("job-m")[-1] == done  # nothing written by the refused calls
