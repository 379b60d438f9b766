"""PostgreSQL baselines for ``benchmarks/locks.py``, and the PostgreSQL lock benchmark with goals.

Functions (used by ``benchmarks/locks.py``):

* :func:`raw_pairs` – ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pairs per second on one
  autocommit psycopg connection: the floor any advisory-lock library pays.
* :func:`raw_handoffs` – release → waiter-holds latency by hand (``pg_advisory_lock`` blocked
  on a second connection), and tooz's PostgreSQL driver when tooz is installed.

Run alone against a throwaway server (never a production one: it creates a schema of its own
and drops it afterwards); without a URL it starts a throwaway PostgreSQL with fsync ON::

    python benchmarks/postgres_raw.py [postgresql://postgres@127.0.0.1:PORT/postgres]
        [--block 300] [--blocks 20] [--handoffs 300] [--count 2000]

It measures, in one run, in short alternating blocks on open connections (loopback figures on
a shared machine drift, so only per-block ratios measured side by side mean anything; the
median of the block ratios is reported):

* ``raw``: ``pg_try_advisory_lock`` + ``pg_advisory_unlock``;
* ``fence``: the lock and ``nextval`` of a sequence in one statement, plain unlock;
* ``one-write``: the lock, the fence and one UPDATE of an UNLOGGED lease row in one statement,
  plain unlock (the cheapest protected lock: the design floor of ``takeover=lease``);
* ``raw lean`` and ``one-write lean``: the same statements on the driver's floor (prepared
  once, libpq's ``send_query_prepared`` through psycopg's ``pq`` layer: the calls coordlock's
  own per-pair statements use). The references above go through psycopg's cursor API, which
  costs more client CPU than coordlock's path; the goals are judged against the faster of
  each pair of references, so coordlock's own overhead cannot hide behind the cursor's;
* coordlock ``lock()`` with ``takeover=lease`` (the default) and ``takeover=session``;
* the cost breakdown of each: statements (= round trips) per pair counted on the client, lease
  row writes per pair and WAL bytes per pair read from the server;
* handoff: release → blocked waiter holds, raw ``pg_advisory_lock`` vs coordlock, alternating.

and prints the goals of issue 16 as PASS/FAIL: ``lock()`` >= 0.9x one-write, ``takeover=session``
>= 0.9x raw (each against its faster client), handoff median <= raw blocking advisory +
0.1 ms; then the async figures of ``postgres_async.py`` with the goals of issue 11 (async
``lock()`` >= 0.9x a raw ``AsyncConnection``, async handoff <= sync + 0.2 ms, event-loop
stall < 20 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import pq
from psycopg.generators import execute as pq_execute

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile, timed_pairs
from postgres_async import raw_async_pairs, run_async  # noqa: F401 (raw_async_pairs: locks.py)

from coordlock.backends.postgres import URL_OPTIONS, PostgresCoordinator
from coordlock.backends.postgres.session import Session

TTL = 30.0
RAW_KEY = 0x636F6F72646C6F63  # any key; a raw benchmark needs no hashing
ONE_WRITE_KEY = 0x6F6E652D77726974
INT8_OID, TEXT_OID, FLOAT8_OID = 20, 25, 701

#: Goals (issue 16).
GOAL_LEASE_VS_ONE_WRITE = 0.9
GOAL_SESSION_VS_RAW = 0.9
GOAL_HANDOFF_SLACK_MS = 0.1


def _raw_url(url: str) -> str:
    """``url`` without coordlock-only query options (for psycopg)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in URL_OPTIONS]
    return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))


def _bench_url(url: str, schema: str, **extra: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("schema", *extra)]
    query += [("schema", schema), *extra.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(_raw_url(url), autocommit=True, prepare_threshold=0)


# -- the references (raw psycopg) -------------------------------------------------------------


def _one_write_sql(schema: str) -> str:
    s = f'"{schema}"'
    return (
        f"WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock(%(k)s) AS got)"
        f" UPDATE {s}.holders AS r SET owner = %(owner)s, fence = nextval('{s}.fence'),"
        f" acquired_at = clock_timestamp(),"
        f" expires_at = clock_timestamp() + %(ttl)s * interval '1 millisecond'"
        f" WHERE r.key = %(k)s AND (SELECT got FROM l) RETURNING r.fence"
    )


def _pair_loop(
    cur: psycopg.Cursor[Any], statement: str, params: Any, key: int
) -> Callable[[int], float]:
    def block(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            cur.execute(statement, params)
            row = cur.fetchone()
            assert row is not None and row[0], "uncontended raw lock failed"
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            cur.fetchone()
        return n / (time.perf_counter() - start)

    return block


class _Lean:
    """The driver's floor: statements prepared once, sent with libpq's ``send_query_prepared``
    and read through psycopg's ``pq`` layer — the same calls coordlock's per-pair statements
    use (``coordlock.backends.postgres.session``), without coordlock. A reference measured
    through the cursor API alone would flatter coordlock: its lean path skips the cursor."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pg = conn.pgconn
        self.count = 0

    def prepare(self, sql: str, oids: tuple[int, ...]) -> bytes:
        name = f"bench_lean_{self.count}".encode()
        self.count += 1
        self.pg.send_prepare(name, sql.encode(), param_types=oids)
        self._result()
        return name

    def run(self, name: bytes, values: list[bytes]) -> bytes | None:
        self.pg.send_query_prepared(name, values)
        res = self._result()
        return res.get_value(0, 0) if res.ntuples else None

    def _result(self) -> pq.abc.PGresult:
        res = self.conn.wait(pq_execute(self.pg))[-1]
        if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            raise psycopg.errors.error_from_result(res)
        return res


def _lean_pair_loop(
    lean: _Lean, sql: str, oids: tuple[int, ...], values: list[bytes], key: int
) -> Callable[[int], float]:
    """Pairs/s of ``sql`` (granting: a true or non-NULL first column) + a plain unlock, on the
    lean path."""
    take = lean.prepare(sql, oids)
    unlock = lean.prepare("SELECT pg_advisory_unlock($1)", (INT8_OID,))
    key_value = [str(key).encode()]

    def block(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            got = lean.run(take, values)
            assert got is not None and got != b"f", "uncontended raw lock failed"
            lean.run(unlock, key_value)
        return n / (time.perf_counter() - start)

    return block


def raw_pairs(url: str, n: int) -> float:
    """Raw ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pairs/s on one autocommit
    connection (psycopg 3, statements prepared as coordlock's are)."""
    with _connect(url) as conn:
        block = _pair_loop(conn.cursor(), "SELECT pg_try_advisory_lock(%s)", (RAW_KEY,), RAW_KEY)
        block(min(n, 200))  # warm up: prepare, fill caches
        return block(n)


def _lock_loop(coordinator: PostgresCoordinator) -> Callable[[int], float]:
    def block(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with coordinator.lock("bench", TTL):
                pass
        return n / (time.perf_counter() - start)

    return block


# -- handoffs ---------------------------------------------------------------------------------


def _handoffs(
    n: int,
    take: Callable[[], Any],
    wait_take: Callable[[], Any],
    give: Callable[[Any], None],
) -> list[float]:
    """Seconds from just before the holder's release to just after the blocked waiter holds."""
    samples: list[float] = []
    for _ in range(n):
        held = take()
        box: dict[str, Any] = {}
        got = threading.Event()

        def waiter(box: dict[str, Any] = box, got: threading.Event = got) -> None:
            box["lease"] = wait_take()
            box["t"] = time.perf_counter()
            got.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.01)  # let the waiter block on the server
        released = time.perf_counter()
        give(held)
        if not got.wait(30):
            raise RuntimeError("the waiter never got the lock")
        thread.join()
        samples.append(box["t"] - released)
        give(box["lease"])
    return samples


@contextmanager
def _coordlock_handoff(url: str) -> Iterator[Callable[[int], list[float]]]:
    holder = coordlock.connect(url)
    waiter = coordlock.connect(url)
    try:

        def run(n: int) -> list[float]:
            return _handoffs(
                n,
                lambda: holder.acquire("handoff", TTL, wait=10),
                lambda: waiter.acquire("handoff", TTL, wait=30),
                lambda lease: lease.release(),
            )

        run(10)  # warm up the spare connections
        yield run
    finally:
        holder.close()
        waiter.close()


@contextmanager
def _raw_handoff(url: str) -> Iterator[Callable[[int], list[float]]]:
    with _connect(url) as a, _connect(url) as b:
        conns = {"a": a, "b": b}

        def take() -> Any:
            a.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
            return "a"

        def wait_take() -> Any:
            b.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
            return "b"

        def give(which: Any) -> None:
            conns[which].execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))

        def run(n: int) -> list[float]:
            return _handoffs(n, take, wait_take, give)

        run(5)
        yield run


def raw_handoffs(url: str, n: int) -> dict[str, list[float]]:
    """Release → waiter-holds latency: by hand with psycopg, and tooz's driver if installed."""
    out: dict[str, list[float]] = {}
    with _raw_handoff(url) as run:
        out["raw"] = run(n)
    tooz = _tooz(url)
    if tooz is not None:
        first, second = tooz
        try:
            lock_a = first.get_lock(b"coordlock-bench-handoff")
            lock_b = second.get_lock(b"coordlock-bench-handoff")
            out["tooz"] = _handoffs(
                n,
                lambda: lock_a.acquire(blocking=True) and lock_a,
                lambda: lock_b.acquire(blocking=True) and lock_b,
                lambda lock: lock.release(),
            )
        finally:
            first.stop()
            second.stop()
    return out


def coordlock_pairs(url: str, n: int) -> float:
    """coordlock acquire + release pairs/s (fencing on, renewal on)."""
    coordinator = coordlock.connect(url)
    try:
        return timed_pairs(coordinator, n, ttl=TTL)
    finally:
        coordinator.close()


def _tooz(url: str) -> tuple[Any, Any] | None:
    """Two started tooz PostgreSQL coordinators, or None when tooz is not installed."""
    try:
        from tooz import coordination  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    members = []
    for i in range(2):
        member = coordination.get_coordinator(
            _raw_url(url), f"bench-{i}-{uuid.uuid4().hex[:6]}".encode()
        )
        member.start()
        members.append(member)
    return members[0], members[1]


# -- cost breakdown ---------------------------------------------------------------------------


class _StatementCounter:
    """Counts every statement coordlock's PostgreSQL sessions send while active (both the
    cursor and the lean path go through ``Session.run``)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = Session.run

    def __enter__(self) -> _StatementCounter:
        original = self._original

        def counting(session: Any, step: Any) -> Any:
            self.count += 1
            return original(session, step)

        Session.run = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Session.run = self._original  # type: ignore[method-assign]


def _holder_writes(admin: psycopg.Connection[Any], schema: str) -> int:
    admin.execute("SELECT pg_stat_clear_snapshot()")
    row = admin.execute(
        "SELECT coalesce(n_tup_ins + n_tup_upd + n_tup_del, 0) FROM pg_stat_user_tables"
        " WHERE schemaname = %s AND relname = 'holders'",
        (schema,),
    ).fetchone()
    return int(row[0]) if row else 0


def _wal(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def _settled_writes(admin: psycopg.Connection[Any], schema: str) -> int:
    """Lease-row writes counted by the server, once the ended sessions have reported them."""
    last = -1
    for _ in range(40):
        now = _holder_writes(admin, schema)
        if now == last:
            return now
        last = now
        time.sleep(0.25)
    return last


def cost(url: str, schema: str, n: int, admin: psycopg.Connection[Any]) -> dict[str, float]:
    """Statements (round trips) per pair, lease-row writes per pair and WAL bytes per pair
    of ``n`` coordlock ``lock()`` pairs on a fresh coordinator (its one-time session setup
    excluded: a first coordinator warms the name up and is closed before)."""
    warm = coordlock.connect(url)
    _lock_loop(warm)(50)  # type: ignore[arg-type]
    warm.close()
    coordinator = coordlock.connect(url)
    assert isinstance(coordinator, PostgresCoordinator)
    block = _lock_loop(coordinator)
    block(1)  # connects (setup statements are not per pair)
    before_writes = _settled_writes(admin, schema)
    wal = _wal(admin)
    with _StatementCounter() as counter:
        block(n)
        statements = counter.count
    wal = _wal(admin) - wal
    coordinator.close()  # its sessions end and report their table statistics
    # (close() marks the row of the name it released released: one write in n)
    writes = _settled_writes(admin, schema) - before_writes
    return {"statements": statements / n, "writes": writes / n, "wal": wal / n}


def _reference_cost(
    conn: psycopg.Connection[Any], admin: psycopg.Connection[Any], schema: str, n: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    cur = conn.cursor()
    one_write = _one_write_sql(schema)
    params = {"k": ONE_WRITE_KEY, "owner": "x" * 32, "ttl": TTL * 1000.0}
    seq_sql = f"SELECT CASE WHEN pg_try_advisory_lock(%s) THEN nextval('\"{schema}\".fence') END"
    loops = {
        "raw": _pair_loop(cur, "SELECT pg_try_advisory_lock(%s)", (RAW_KEY,), RAW_KEY),
        "fence": _pair_loop(cur, seq_sql, (RAW_KEY,), RAW_KEY),
        "one-write": _pair_loop(cur, one_write, params, ONE_WRITE_KEY),
    }
    for label, loop in loops.items():
        wal = _wal(admin)
        loop(n)
        out[label] = {"statements": 2.0, "wal": (_wal(admin) - wal) / n}
    return out


# -- the run ----------------------------------------------------------------------------------


def _dollar(query: str, names: tuple[str, ...]) -> str:
    """``query`` with ``%(name)s`` placeholders numbered ``$1``… in ``names`` order."""
    for number, name in enumerate(names, 1):
        query = query.replace(f"%({name})s", f"${number}")
    assert "%(" not in query, query
    return query


def _faster(rates: dict[str, list[float]], *labels: str) -> str:
    """The label of the faster reference (median pairs/s)."""
    return max(labels, key=lambda label: statistics.median(rates[label]))


def _ratios(num: list[float], den: list[float]) -> list[float]:
    return sorted(a / b for a, b in zip(num, den, strict=True))


def _summary(ratios: list[float]) -> str:
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return f"{statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})"


def _ms(samples: list[float]) -> str:
    return (
        f"median {statistics.median(samples) * 1000:7.3f} ms   "
        f"p99 {percentile(samples, 0.99) * 1000:7.3f} ms   (n={len(samples)})"
    )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run(url: str, block: int, blocks: int, handoffs: int, count: int) -> bool:
    """Run everything against ``url``; print the figures; True when every goal passed."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    lease_url = _bench_url(url, schema)
    session_url = _bench_url(url, schema, takeover="session")
    admin = _connect(url)
    try:
        row = admin.execute(
            "SELECT current_setting('server_version'), current_setting('fsync'),"
            " current_setting('synchronous_commit')"
        ).fetchone()
        assert row is not None
        print(
            f"server              PostgreSQL {row[0]}, fsync={row[1]}, synchronous_commit={row[2]}"
        )
        lease = coordlock.connect(lease_url)
        session = coordlock.connect(session_url)
        assert isinstance(lease, PostgresCoordinator) and isinstance(session, PostgresCoordinator)
        with lease.lock("bench", TTL):  # creates the schema
            pass
        admin.execute(
            f'INSERT INTO "{schema}".holders (key, name, owner, fence, pid, acquired_at,'
            " expires_at) VALUES (%s, 'one-write', 'x', 0, 0, now(), now())",
            (ONE_WRITE_KEY,),
        )
        conn = _connect(url)
        cur = conn.cursor()
        seq_sql = (
            f"SELECT CASE WHEN pg_try_advisory_lock(%s) THEN nextval('\"{schema}\".fence') END"
        )
        params = {"k": ONE_WRITE_KEY, "owner": uuid.uuid4().hex, "ttl": TTL * 1000.0}
        lean = _Lean(_connect(url))
        raw_key = [str(RAW_KEY).encode()]
        one_write_values = [
            str(ONE_WRITE_KEY).encode(), str(params["owner"]).encode(),
            repr(float(params["ttl"])).encode(),
        ]  # fmt: skip
        sides: dict[str, Callable[[int], float]] = {
            "raw": _pair_loop(cur, "SELECT pg_try_advisory_lock(%s)", (RAW_KEY,), RAW_KEY),
            "raw lean": _lean_pair_loop(
                lean, "SELECT pg_try_advisory_lock($1)", (INT8_OID,), raw_key, RAW_KEY
            ),
            "fence": _pair_loop(cur, seq_sql, (RAW_KEY,), RAW_KEY),
            "one-write": _pair_loop(cur, _one_write_sql(schema), params, ONE_WRITE_KEY),
            "one-write lean": _lean_pair_loop(
                lean, _dollar(_one_write_sql(schema), ("k", "owner", "ttl")),
                (INT8_OID, TEXT_OID, FLOAT8_OID), one_write_values, ONE_WRITE_KEY,
            ),
            "lock() lease": _lock_loop(lease),
            "lock() session": _lock_loop(session),
        }  # fmt: skip
        rates: dict[str, list[float]] = {label: [] for label in sides}
        order = list(sides)
        for side in sides.values():
            side(max(50, block // 3))  # warm up
        for i in range(blocks):  # rotate the order, so drift hits every side alike
            for label in order[i % len(order) :] + order[: i % len(order)]:
                rates[label].append(sides[label](block))
        lease.close()
        session.close()
        print(f"pairs               {blocks} rotating blocks of {block} pairs per side")
        for label, values in rates.items():
            print(f"{label:<19} {statistics.median(values):8.0f} pairs/s")
        # The goals are judged against the faster (stricter) of each reference's two clients.
        raw_ref = _faster(rates, "raw", "raw lean")
        one_ref = _faster(rates, "one-write", "one-write lean")
        lease_vs_one = _ratios(rates["lock() lease"], rates[one_ref])
        session_vs_raw = _ratios(rates["lock() session"], rates[raw_ref])
        print(f"raw lean / raw      {_summary(_ratios(rates['raw lean'], rates['raw']))}")
        print(f"fence / raw         {_summary(_ratios(rates['fence'], rates['raw']))}")
        print(f"one-write / raw     {_summary(_ratios(rates['one-write'], rates['raw']))}")
        print(f"lease / {raw_ref:<11} {_summary(_ratios(rates['lock() lease'], rates[raw_ref]))}")
        print(f"lease / {one_ref:<11} {_summary(lease_vs_one)}")
        print(f"session / {raw_ref:<9} {_summary(session_vs_raw)}")

        print("cost per pair       statements(=round trips)  lease-row writes  WAL bytes")
        refs = _reference_cost(conn, admin, schema, count)
        for label, figures in refs.items():
            writes = 1.0 if label == "one-write" else 0.0
            print(
                f"  {label:<17} {figures['statements']:10.2f} {writes:22.2f} {figures['wal']:12.1f}"
            )
        conn.close()
        lean.conn.close()
        for label, target in (("lock() lease", lease_url), ("lock() session", session_url)):
            figures = cost(target, schema, count, admin)
            print(
                f"  {label:<17} {figures['statements']:10.2f} {figures['writes']:22.3f}"
                f" {figures['wal']:12.1f}"
            )

        samples: dict[str, list[float]] = {"raw": [], "lease": [], "session": []}
        with (
            _raw_handoff(url) as raw_run,
            _coordlock_handoff(lease_url) as lease_run,
            _coordlock_handoff(session_url) as session_run,
        ):
            runs = {"raw": raw_run, "lease": lease_run, "session": session_run}
            per = max(1, handoffs // 3)
            for i in range(3):
                for label in list(runs)[i:] + list(runs)[:i]:
                    samples[label] += runs[label](per)
        for label, values in samples.items():
            print(f"handoff {label:<11} {_ms(values)}")

        raw_ms = statistics.median(samples["raw"]) * 1000
        goals = [
            (
                f"lock() takeover=lease >= {GOAL_LEASE_VS_ONE_WRITE}x {one_ref}",
                statistics.median(lease_vs_one) >= GOAL_LEASE_VS_ONE_WRITE,
                f"{statistics.median(lease_vs_one):.3f}x",
            ),
            (
                f"lock() takeover=session >= {GOAL_SESSION_VS_RAW}x {raw_ref}",
                statistics.median(session_vs_raw) >= GOAL_SESSION_VS_RAW,
                f"{statistics.median(session_vs_raw):.3f}x",
            ),
        ]
        for label in ("lease", "session"):
            ours_ms = statistics.median(samples[label]) * 1000
            goals.append(
                (
                    f"handoff {label} <= raw blocking advisory + {GOAL_HANDOFF_SLACK_MS} ms",
                    ours_ms <= raw_ms + GOAL_HANDOFF_SLACK_MS,
                    f"{ours_ms:.3f} ms vs {raw_ms:.3f} + {GOAL_HANDOFF_SLACK_MS} ms",
                )
            )
        goals += run_async(
            lease_url,
            _raw_url(url),
            block=block,
            blocks=blocks,
            handoffs=handoffs,
            sync_handoff_ms=statistics.median(samples["lease"]) * 1000,
        )
        for text, ok, detail in goals:
            print(f"{_verdict(ok)}  {text}: {detail}")
        return all(ok for _, ok, _ in goals)
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "url", nargs="?", help="postgresql:// URL of a throwaway server (default: start one)"
    )
    parser.add_argument("--block", type=int, default=300, help="pairs per block")
    parser.add_argument("--blocks", type=int, default=20, help="rotating blocks per side")
    parser.add_argument("--handoffs", type=int, default=300, help="handoffs per side")
    parser.add_argument("--count", type=int, default=2000, help="pairs for the cost breakdown")
    args = parser.parse_args(argv)
    if args.url:
        ok = run(args.url, args.block, args.blocks, args.handoffs, args.count)
        return 0 if ok else 1
    from coordlock.testing.servers import PostgresServer

    server = PostgresServer(fast=False)  # fsync ON: the real cost of every WAL flush
    server.start()
    try:
        print(f"started a throwaway PostgreSQL at {server.url} (fsync on)")
        ok = run(server.url, args.block, args.blocks, args.handoffs, args.count)
    finally:
        server.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
