"""PostgreSQL backend specifics (the shared behaviours are in tests/test_contract.py).

Real throwaway PostgreSQL servers from the coordlock pytest plugin; every loop is bounded by a
count and a deadline, and no test asserts a wall-clock duration.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import coordlock
from coordlock import ConfigurationError, Lease
from coordlock.backends._pg_keys import lock_key
from coordlock.backends.postgres import SCHEMA_VERSION, PostgresCoordinator
from coordlock.backends.postgres.session import Session
from coordlock.testing.contract import CoordinatorContract
from coordlock.testing.contract import eventually as contract_eventually
from coordlock.testing.servers import PostgresServer

PATIENCE = 20.0


def eventually(predicate: Callable[[], bool], within: float = PATIENCE) -> bool:
    """The contract suite's bounded poll, with this module's longer patience."""
    return contract_eventually(predicate, within)


def _schema() -> str:
    return f"t_{uuid.uuid4().hex}"


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return f"{postgres_server.url}?schema={_schema()}"


@pytest.fixture
def coordinator(pg_url: str) -> Iterator[PostgresCoordinator]:
    c = coordlock.connect(pg_url)
    assert isinstance(c, PostgresCoordinator)
    yield c
    c.close()


@pytest.fixture
def other(pg_url: str) -> Iterator[PostgresCoordinator]:
    c = coordlock.connect(pg_url)
    assert isinstance(c, PostgresCoordinator)
    yield c
    c.close()


def admin(server: PostgresServer) -> psycopg.Connection[Any]:
    return psycopg.connect(server.url, autocommit=True)


def session_of(lease: Lease) -> Session:
    coordinator = lease.coordinator
    assert isinstance(coordinator, PostgresCoordinator)
    held = coordinator._registry.held[lease.name]
    assert held.owner == lease.owner
    return held.session


def setting(session: Session, name: str) -> str:
    """``SHOW name`` on a coordinator's own session (under its mutex)."""
    with session.mutex:
        row = session.conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


# -- T8: the key hash -----------------------------------------------------------------------------

#: Golden vectors: never change them. (namespace, name) → signed 64-bit advisory key.
GOLDEN = [
    ("coordlock", "nightly-report", -8600211268409845929),
    ("coordlock", "a", -4718271970963007924),
    ("coordlock", "ünïcødé ☃", -7419463173465478518),
    ("coordlock", "x" * 512, 7274389873968117192),
    ("coordlock", "job@2026-01-01T00:00:00Z", -8840783153931325825),
    ("", "nightly-report", -378585136516800271),
    ("t_0123", "nightly-report", 4911731990859122861),
    ("coordlock", " lead", 956068880352675241),
    ("coordlock", "with/slash", -499914931812310255),
]


@pytest.mark.parametrize(("namespace", "name", "key"), GOLDEN)
def test_key_golden_vectors(namespace: str, name: str, key: int) -> None:
    assert lock_key(name, namespace) == key


def test_key_default_namespace_is_the_schema(postgres_server: PostgresServer) -> None:
    default = PostgresCoordinator.from_url(postgres_server.url)
    custom = PostgresCoordinator.from_url(f"{postgres_server.url}?schema=t_0123")
    spaced = PostgresCoordinator.from_url(f"{postgres_server.url}?schema=t_0123&namespace=")
    try:
        assert default.key("nightly-report") == -8600211268409845929
        assert custom.key("nightly-report") == 4911731990859122861
        assert spaced.key("nightly-report") == -378585136516800271
    finally:
        for c in (default, custom, spaced):
            c.close()


def test_key_matches_the_documented_sql(postgres_server: PostgresServer) -> None:
    sql = (
        "SELECT ('x' || left(encode(sha256(convert_to(%s, 'UTF8') || '\\x00'::bytea"
        " || convert_to(%s, 'UTF8')), 'hex'), 16))::bit(64)::bigint"
    )
    with admin(postgres_server) as conn:
        for namespace, name, key in GOLDEN:
            row = conn.execute(sql, (namespace, name)).fetchone()
            assert row is not None and row[0] == key


def test_keys_of_100k_names_do_not_collide() -> None:
    names = [f"job-{i}" for i in range(60_000)]
    names += [
        f"tenant/{i % 97}/report@2026-01-{1 + i % 28:02d}T{i % 24:02d}:00Z#{i}"
        for i in range(40_000)
    ]
    assert len(set(names)) == 100_000
    keys = {lock_key(name) for name in names}
    assert len(keys) == 100_000
    assert all(-(2**63) <= k < 2**63 for k in keys)
    # the whole 64-bit range is used (16- or 32-bit hashes would fail both checks)
    assert min(keys) < -(2**62) and max(keys) > 2**62
    assert len({k & 0xFFFFFFFF for k in keys}) > 99_990


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transaction", "statement", "TRANSACTION"])
def test_pgbouncer_transaction_pooling_is_refused(
    postgres_server: PostgresServer, mode: str
) -> None:
    with pytest.raises(ConfigurationError, match="session") as info:
        coordlock.connect(f"{postgres_server.url}?pgbouncer={mode}")
    assert "pool_mode=session" in str(info.value)
    with pytest.raises(ConfigurationError):
        PostgresCoordinator(postgres_server.url, pgbouncer=mode)


def test_pgbouncer_session_pooling_is_accepted(pg_url: str) -> None:
    c = coordlock.connect(f"{pg_url}&pgbouncer=session")
    try:
        lease = c.acquire("via-session-pool", 10)
        assert lease is not None and lease.release()
    finally:
        c.close()
    with pytest.raises(ConfigurationError, match="pgbouncer"):
        coordlock.connect(f"{pg_url}&pgbouncer=maybe")


def test_a_pooling_proxy_is_detected_by_the_session_pid(
    coordinator: PostgresCoordinator,
) -> None:
    lease = coordinator.acquire("pooled", 10)
    assert lease is not None
    session = session_of(lease)
    session.pid += 1  # what a transaction-pooling proxy looks like: another backend answers
    with pytest.raises(ConfigurationError, match="PgBouncer"):
        coordinator.acquire("pooled-2", 10)
    assert lease.lost  # a lock on a session that is not ours is not trusted
    again = coordinator.acquire("pooled-3", 10)  # a new session works
    assert again is not None and again.release()


def test_unknown_url_options_are_named(postgres_server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="bogus") as info:
        coordlock.connect(f"{postgres_server.url}?schema=t_x&bogus=1&also_bad=2")
    assert "also_bad" in str(info.value)
    with pytest.raises(ConfigurationError, match="schema"):
        coordlock.connect(f"{postgres_server.url}?schema=bad-name")
    with pytest.raises(ConfigurationError, match="retry_deadline"):
        coordlock.connect(f"{postgres_server.url}?retry_deadline=soon")
    c = coordlock.connect(f"{postgres_server.url}?application_name=mine&connect_timeout=3")
    assert isinstance(c, PostgresCoordinator)
    assert "application_name=mine" in c._conninfo and "connect_timeout=3" in c._conninfo
    c.close()
    c = coordlock.connect(postgres_server.url.replace("postgresql://", "postgres://", 1))
    assert isinstance(c, PostgresCoordinator)
    c.close()


def test_unreachable_server_raises_backend_unavailable() -> None:
    from coordlock.testing.servers import free_port

    c = coordlock.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/x?retry_deadline=0.3")
    try:
        with pytest.raises(coordlock.BackendUnavailable):
            c.acquire("nobody-home", 10)
    finally:
        c.close()


# -- schema ---------------------------------------------------------------------------------------

RACE_SCRIPT = textwrap.dedent(
    """
    import sys
    import coordlock
    sys.stdin.readline()  # start together
    c = coordlock.connect(sys.argv[1])
    lease = c.acquire("race-" + sys.argv[2], 10)
    won = c.claim("race@tick", 30)
    print("OK", lease.fence, "WON" if won else "LOST", flush=True)
    lease.release()
    c.close()
    """
)


def test_schema_creation_race_between_many_processes(
    postgres_server: PostgresServer,
) -> None:
    schema = _schema()
    url = f"{postgres_server.url}?schema={schema}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, url, str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(12)
    ]
    time.sleep(0.5)  # let them import; then all connect to the empty schema at once
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.split())
    assert all(o[0] == "OK" for o in outputs)
    assert sorted(o[2] for o in outputs) == ["LOST"] * 11 + ["WON"]
    assert len({int(o[1]) for o in outputs}) == 12  # one fence sequence for all of them
    with admin(postgres_server) as conn:
        rows = conn.execute(f'SELECT key, value FROM "{schema}".meta').fetchall()
        assert rows == [("schema_version", str(SCHEMA_VERSION))]
        kinds = conn.execute(
            "SELECT c.relname, c.relpersistence FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'S') ORDER BY 1",
            (schema,),
        ).fetchall()
    assert dict(kinds) == {
        "claims": "p",
        "fence": "p",
        "holders": "u",  # UNLOGGED: only informational
        "meta": "p",
        "runs": "p",
    }


def test_a_newer_schema_version_is_refused(pg_url: str, postgres_server: PostgresServer) -> None:
    c = coordlock.connect(pg_url)
    assert isinstance(c, PostgresCoordinator)
    lease = c.acquire("make-schema", 10)
    assert lease is not None and lease.release()
    c.close()
    schema = pg_url.rsplit("schema=", 1)[1]
    with admin(postgres_server) as conn:
        conn.execute(f"UPDATE \"{schema}\".meta SET value = '99'")
    c = coordlock.connect(pg_url)
    try:
        with pytest.raises(ConfigurationError, match="version 99"):
            c.acquire("x", 10)
    finally:
        c.close()


# -- blocking waits -------------------------------------------------------------------------------


def test_a_blocking_wait_sleeps_on_the_server_and_wakes_on_release(
    coordinator: PostgresCoordinator, other: PostgresCoordinator, postgres_server: PostgresServer
) -> None:
    lease = coordinator.acquire("wake-me", 30)
    assert lease is not None
    result: dict[str, Any] = {}

    def wait() -> None:
        result["lease"] = other.acquire("wake-me", 30, wait=PATIENCE)

    thread = threading.Thread(target=wait)
    thread.start()
    try:
        with admin(postgres_server) as conn:

            def waiting_on_advisory_lock() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
                    " WHERE l.locktype = 'advisory' AND NOT l.granted"
                    " AND a.wait_event_type = 'Lock' AND a.wait_event = 'advisory'"
                    " AND l.classid::int8 = ((%s::int8 >> 32) & 4294967295)",
                    (coordinator.key("wake-me"),),
                ).fetchone()
                return row is not None and row[0] == 1

            # the waiter blocks inside pg_advisory_lock (no polling)
            assert eventually(waiting_on_advisory_lock)
        assert lease.release()
    finally:
        thread.join(PATIENCE)
    waited = result.get("lease")
    assert isinstance(waited, Lease) and waited.fence > lease.fence
    # the connection that waited is the session that now holds the lock
    assert session_of(waited) is not other._sync.main
    assert coordinator.acquire("wake-me", 10) is None
    assert waited.release()
    assert coordinator.acquire("wake-me", 10) is not None


def test_wait_is_cancelled_by_close(
    coordinator: PostgresCoordinator, other: PostgresCoordinator
) -> None:
    lease = coordinator.acquire("closing", 30)
    assert lease is not None
    outcome: dict[str, object] = {}

    def wait() -> None:
        try:
            outcome["lease"] = other.acquire("closing", 30, wait=True)
        except coordlock.CoordlockError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=wait)
    thread.start()
    assert eventually(
        lambda: any(s.mutex.locked() and not s.main for s in other._registry.sessions)
    )
    other.close()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), ConfigurationError)  # "closed"
    assert lease.release()


# -- TTL with teeth: idle_session_timeout ---------------------------------------------------------


def test_idle_session_timeout_follows_the_smallest_ttl(
    coordinator: PostgresCoordinator,
) -> None:
    long = coordinator.acquire("long", 9)
    assert long is not None
    session = session_of(long)
    assert setting(session, "idle_session_timeout") == "9s"
    short = coordinator.acquire("short", 2.5)
    assert short is not None and session_of(short) is session
    assert setting(session, "idle_session_timeout") == "2500ms"
    assert short.release()
    # the keeper raises it back to the smallest ttl still held (within a third of the old one)
    assert eventually(lambda: setting(session, "idle_session_timeout") == "9s")
    assert long.release()
    assert eventually(lambda: setting(session, "idle_session_timeout") == "0")


def test_a_hung_holder_loses_its_session_within_the_ttl(
    coordinator: PostgresCoordinator, other: PostgresCoordinator, postgres_server: PostgresServer
) -> None:
    """Nothing of the holder runs (no renewal, no keeper): the server ends its session."""
    lease = coordinator.acquire("hung", 1.0)
    assert lease is not None
    pid = session_of(lease).pid
    coordinator._renewer.stop()  # what a hung process does: nothing
    coordinator._keeper.stop()
    started = time.monotonic()
    taken = other.acquire("hung", 10, wait=PATIENCE)
    waited = time.monotonic() - started
    assert taken is not None and taken.fence > lease.fence
    with admin(postgres_server) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        assert row.fetchone() == (0,)  # the server ended the hung holder's session
    assert lease.lost
    print(f"\nhung holder (ttl 1.0 s): next holder in {waited:.3f} s")
    assert taken.release()


def test_renew_false_lease_is_unlocked_by_the_keeper_without_ending_the_session(
    coordinator: PostgresCoordinator, other: PostgresCoordinator
) -> None:
    keep = coordinator.acquire("kept", 30)
    brief = coordinator.acquire("brief", 0.3, renew=False)
    assert keep is not None and brief is not None
    assert session_of(keep) is session_of(brief)
    pid = session_of(keep).pid
    assert eventually(lambda: other.acquire("brief", 10) is not None)
    assert brief.lost and not keep.lost  # only the expired lock went; the session lives on
    assert session_of(keep).pid == pid
    assert keep.release()


# -- loss detection (T7) --------------------------------------------------------------------------


def test_terminated_session_fires_lost_and_reconnects(
    coordinator: PostgresCoordinator, other: PostgresCoordinator, postgres_server: PostgresServer
) -> None:
    first = coordinator.acquire("terminated-1", 5)
    second = coordinator.acquire("terminated-2", 5)
    assert first is not None and second is not None
    fired: list[tuple[str, float]] = []
    done = threading.Event()

    def on_lost(lease: Lease) -> None:
        fired.append((lease.name, time.monotonic()))
        if len(fired) == 2:
            done.set()

    first.on_lost(on_lost)
    second.on_lost(on_lost)
    pid = session_of(first).pid
    with admin(postgres_server) as conn:
        killed_at = time.monotonic()
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        assert row == (True,)
    assert done.wait(PATIENCE), "on_lost did not fire for the leases of the ended session"
    delay = max(t for _, t in fired) - killed_at
    print(f"\nloss detected {delay * 1000:.1f} ms after pg_terminate_backend")
    assert first.lost and second.lost
    assert first.release() is False
    # PostgreSQL freed the advisory locks with the session, but the holder's lease (>= 3 s
    # left: renewed every ttl/3) still stands: nobody may take the lock before it runs out.
    assert other.acquire("terminated-2", 5) is None
    again = coordinator.acquire("terminated-1", 5, wait=PATIENCE)  # after the lease ran out
    assert again is not None and again.fence > first.fence
    assert session_of(again).pid != pid
    assert again.release()


# -- fences ---------------------------------------------------------------------------------------


def test_fences_survive_a_lost_sequence_tail(pg_url: str, postgres_server: PostgresServer) -> None:
    """A restore or an async-replica failover may set the sequence back: new sessions move it
    up to the server clock first, so fences still increase."""
    c = coordlock.connect(pg_url)
    lease = c.acquire("restored", 10)
    assert lease is not None and lease.release()
    c.close()
    schema = pg_url.rsplit("schema=", 1)[1]
    with admin(postgres_server) as conn:
        conn.execute(f"SELECT setval('\"{schema}\".fence', 42)")
    c = coordlock.connect(pg_url)
    try:
        after = c.acquire("restored", 10)
        assert after is not None and after.fence > lease.fence
        assert after.release()
    finally:
        c.close()


def test_fences_increase_across_a_server_crash(fresh_postgres_server: PostgresServer) -> None:
    url = f"{fresh_postgres_server.url}?schema=crash&retry_deadline=30"
    c = coordlock.connect(url)
    try:
        fences = []
        for _ in range(40):  # more than the 32 values a sequence logs ahead
            lease = c.acquire("crash", 10)
            assert lease is not None
            fences.append(lease.fence)
            lease.release()
        held = c.acquire("held-over-crash", 30)
        assert held is not None
        old_pid = fresh_postgres_server.pid
        fresh_postgres_server.restart(kill=True)
        assert fresh_postgres_server.pid != old_pid  # it really crashed and came back
        assert eventually(lambda: held.lost)
        after = c.acquire("crash", 10)
        assert after is not None and after.fence > max(fences)
        assert after.release()
    finally:
        c.close()


# -- listing, claims, closing ---------------------------------------------------------------------


def test_locks_lists_other_coordinators_locks(
    coordinator: PostgresCoordinator, other: PostgresCoordinator
) -> None:
    lease = coordinator.acquire("listed-elsewhere", 30)
    assert lease is not None
    infos = {i.name: i for i in other.locks()}
    assert "listed-elsewhere" in infos
    info = infos["listed-elsewhere"]
    assert info.owner == lease.owner and info.fence == lease.fence
    assert info.expires_at is not None and info.expires_at > time.time()
    assert lease.release()
    assert "listed-elsewhere" not in {i.name for i in other.locks()}


def test_claim_retry_by_the_same_claimant_is_idempotent(
    coordinator: PostgresCoordinator,
) -> None:
    keys = ["a@t", "b@t"]
    claimant = "c" * 32
    q = coordinator._q

    coordinator.claim("warm-up@t", 1)  # connects the auxiliary session

    def claim(who: str) -> set[str]:
        session = coordinator._sync.aux
        assert isinstance(session, Session)
        with session.mutex:
            rows = session.conn.execute(q.claim, (who, 30_000.0, keys)).fetchall()
        return {r[0] for r in rows}

    assert claim(claimant) == set(keys)
    # a transport retry of the same call gets its own claims back; anybody else gets nothing
    assert claim(claimant) == set(keys)
    assert claim("d" * 32) == set()
    assert coordinator.claim_many(keys, 30) == set()


def test_close_marks_held_leases_lost(pg_url: str) -> None:
    c = coordlock.connect(pg_url)
    lease = c.acquire("closed-under-me", 30)
    assert lease is not None
    c.close()
    assert lease.lost
    other = coordlock.connect(pg_url)
    try:
        again = other.acquire("closed-under-me", 30)  # the server released it at once
        assert again is not None and again.release()
    finally:
        other.close()


class TestContractTakeoverSession(CoordinatorContract):
    """The whole contract again with ``takeover=session`` (no lease rows)."""

    @pytest.fixture
    def backend_url(self, postgres_server: PostgresServer) -> str:
        return f"{postgres_server.url}?schema={_schema()}&takeover=session"


def test_takeover_session_frees_a_terminated_holders_lock_at_once(
    postgres_server: PostgresServer,
) -> None:
    url = f"{postgres_server.url}?schema={_schema()}&takeover=session"
    a, b = coordlock.connect(url), coordlock.connect(url)
    try:
        lease = a.acquire("freed", 30)
        assert lease is not None
        with admin(postgres_server) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (session_of(lease).pid,))
        taken = b.acquire("freed", 30, wait=PATIENCE)  # no lease to wait out
        assert taken is not None and taken.fence > lease.fence
        assert eventually(lambda: lease.lost)
        assert taken.release()
    finally:
        a.close()
        b.close()
    with pytest.raises(ConfigurationError, match="takeover"):
        coordlock.connect(f"{postgres_server.url}?takeover=never")


def test_history_rows_keep_any_text_and_nulls_on_the_lean_path(
    coordinator: PostgresCoordinator,
) -> None:
    """History rows are sent as text parameters of a prepared statement: unicode, quotes,
    backslashes, newlines, NULLs and full float precision come back unchanged."""
    from coordlock._protocol import RunRecord

    job = f"jöb/ü '{uuid.uuid4().hex}' \\ \"x\""
    first = RunRecord(
        run_id=f"r-{uuid.uuid4().hex}", job=job, tick="2026-12-03T00:00:00Z",
        instance="host:1:ïnst", started=1764720000.123456789, finished=None,
        status="running", error=None, result=None,
    )  # fmt: skip
    coordinator.record_run(first)
    (row,) = coordinator.history(job)
    assert row == first
    done = RunRecord(
        **{**first.__dict__, "finished": 1764720001.5, "status": "failed",
           "error": "ValueError: line 1\nline 2 'q' \\ ✓", "result": "{\"a\": [1, 2]}"},
    )  # fmt: skip
    coordinator.record_run(done)
    assert coordinator.history(job) == [done]


def test_history_rows_in_one_statement_keep_any_text_and_nulls(
    coordinator: PostgresCoordinator,
) -> None:
    """Many rows at once go as array literals: every character an array literal treats
    specially (quotes, backslashes, braces, commas, the word NULL, blanks, the empty string)
    comes back unchanged, and so do NULLs and full float precision."""
    from coordlock._protocol import RunRecord

    job = f"batch-{uuid.uuid4().hex}"
    odd = ['a "q" \\ b', "{x,y}", "NULL", "null", "", " ", "tab\tnl\nend", "ü✓'", "\\", '"']
    rows = [
        RunRecord(
            run_id=f"r{i}-{text}", job=job, tick=f"t{text}", instance=text or "i",
            started=1764720000.123456789 + i, finished=None if i % 2 else 1764720001.0 / 3,
            status="running" if i % 2 else "failed", error=None if i % 3 else text,
            result=text if i % 2 else None,
        )
        for i, text in enumerate(odd)
    ]  # fmt: skip
    coordinator.record_runs(rows)
    got = {r.run_id: r for r in coordinator.history(job, 100)}
    assert got == {r.run_id: r for r in rows}
