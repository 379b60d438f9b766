"""Redis backend: unit tests on fakeredis, plus what only a real server shows.

The fakeredis part checks scripts, keys, URL parsing, history and listing quickly. The
real-server part (throwaway ``redis-server`` processes from ``coordlock.testing.servers``)
checks what fakeredis cannot: fences across a restart without persistence, waiters woken by a
release instead of polling, Sentinel discovery, recovery after the server dies or hangs.
No test asserts a wall-clock duration; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

import coordlock
from coordlock import BackendUnavailable, ConfigurationError
from coordlock._lease import Lease
from coordlock._protocol import ClaimsMany, KeepsHistory, ListsLocks, RunCoordinator, RunRecord

redis = pytest.importorskip("redis")
fakeredis = pytest.importorskip("fakeredis")

from redis.crc import key_slot  # noqa: E402

from coordlock.backends import redis as backend  # noqa: E402
from coordlock.backends.redis import RedisCoordinator  # noqa: E402
from coordlock.testing.servers import RedisServer, SentinelServer, free_port, redis_command  # noqa: E402

PATIENCE = 15.0

#: The acquire script of the key layout before 0.2 (``{<prefix><name>}:lock``/``:fence``),
#: as an old client runs it. KEYS: lock, fence, waiters. ARGV: owner, ttl_ms, floor, flag_ms.
OLD_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local fence = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) + 1
  if now > fence then fence = now end
  local floor = tonumber(ARGV[3]) or 0
  if floor >= fence then fence = floor + 1 end
  local text = string.format('%.0f', fence)
  redis.call('SET', KEYS[2], text)
  return text
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
return redis.call('PTTL', KEYS[1])
"""


def attempt(c: RedisCoordinator, name: str, owner: str, ttl: float, *, register: float) -> Any:
    """One acquire attempt that queues ``owner`` for ``register`` s when the lock is busy."""
    ticket = backend.Ticket(owner, ttl)
    return c._acquired(name, ticket, c._evalsha(*c._acquire_call(name, owner, ttl, register)))


def old_layout_acquire(client: Any, prefix: str, name: str) -> int:
    """Take ``name`` as a pre-0.2 client would (old keys); return its fence."""
    tag = "{" + prefix + name + "}"
    owner = uuid.uuid4().hex
    keys = [tag + ":lock", tag + ":fence", tag + ":waiters"]
    reply = client.eval(OLD_ACQUIRE, 3, *keys, owner, 30_000, 0, 15_000)
    assert isinstance(reply, bytes), "the old-layout lock was busy"
    client.delete(tag + ":lock")  # released
    return int(reply)


AWKWARD = [
    "plain",
    "with/slash",
    "colon:and {braces}",
    "}starts",
    "{",
    "}",
    "a}:lock",
    "ü ☃",
    "*?[x]",
]


def rc(url: str, **options: Any) -> RedisCoordinator:
    """``coordlock.connect`` typed as the Redis backend (it must pick that backend)."""
    coordinator = coordlock.connect(url, **options)
    assert isinstance(coordinator, RedisCoordinator)
    return coordinator


def eventually(predicate: Callable[[], bool], within: float = PATIENCE) -> bool:
    stop = time.monotonic() + within
    while time.monotonic() < stop:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------------------------------
# fakeredis
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_server() -> Any:
    return fakeredis.FakeServer()


def make_fake(server: Any, **kw: Any) -> RedisCoordinator:
    client = fakeredis.FakeRedis(server=server)
    waiter = fakeredis.FakeRedis(server=server)
    return RedisCoordinator(client, wait_client=waiter, **kw)


@pytest.fixture
def fake(fake_server: Any) -> Iterator[RedisCoordinator]:
    c = make_fake(fake_server, prefix="t:")
    yield c
    c.close()


@pytest.fixture
def fake_other(fake_server: Any) -> Iterator[RedisCoordinator]:
    c = make_fake(fake_server, prefix="t:")
    yield c
    c.close()


class TestFake:
    def test_declares_the_optional_protocols(self, fake: RedisCoordinator) -> None:
        assert isinstance(fake, RunCoordinator)
        assert isinstance(fake, ClaimsMany)
        assert isinstance(fake, ListsLocks)
        assert isinstance(fake, KeepsHistory)

    def test_acquire_release_and_fences(
        self, fake: RedisCoordinator, fake_other: RedisCoordinator
    ) -> None:
        lease = fake.acquire("job", 10)
        assert lease is not None and lease.fence > 0
        assert fake_other.acquire("job", 10) is None
        assert fake.client.get(fake.lock_key("job")) == lease.owner.encode()
        assert lease.release() is True
        assert fake.client.get(fake.lock_key("job")) is None
        again = fake_other.acquire("job", 10)
        assert again is not None and again.fence > lease.fence
        again.release()

    def test_try_acquire_is_idempotent_for_the_same_owner(self, fake: RedisCoordinator) -> None:
        owner = uuid.uuid4().hex
        first = fake._try_acquire("idem", owner, 10, None)
        assert first.fence is not None
        again = fake._try_acquire("idem", owner, 10, None)  # a retried call
        assert again.fence == first.fence
        assert fake._try_acquire("idem", uuid.uuid4().hex, 10, None).fence is None
        assert fake._release("idem", owner)

    def test_fence_is_at_least_server_time_in_microseconds(self, fake: RedisCoordinator) -> None:
        seconds, micros = fake.client.time()
        lease = fake.acquire("clock", 10)
        assert lease is not None
        assert lease.fence >= seconds * 1_000_000 + micros
        assert lease.fence < 2**53  # exact in Lua doubles
        lease.release()

    def test_fence_survives_a_lost_fence_key(
        self, fake: RedisCoordinator, fake_server: Any
    ) -> None:
        first = fake.acquire("wiped", 10)
        assert first is not None
        first.release()
        fake.client.delete(fake.fence_key("wiped"))  # what a restart without persistence does
        fresh = make_fake(fake_server, prefix="t:")
        try:
            second = fresh.acquire("wiped", 10)  # a new client: no floor remembered
            assert second is not None and second.fence > first.fence
            second.release()
        finally:
            fresh.close()

    def test_stored_fence_ahead_of_the_clock_still_grows(self, fake: RedisCoordinator) -> None:
        ahead = 2**52  # a fence from a server whose clock ran far ahead
        fake.client.set(fake.fence_key("ahead"), str(ahead))
        lease = fake.acquire("ahead", 10)
        assert lease is not None and lease.fence == ahead + 1
        lease.release()

    def test_fence_grows_across_the_key_layout_change(self, fake_server: Any) -> None:
        client = fakeredis.FakeRedis(server=fake_server)
        old = old_layout_acquire(client, "t:", "migrating")
        fresh = make_fake(fake_server, prefix="t:")  # a new client: no floor remembered
        try:
            lease = fresh.acquire("migrating", 10)
            assert lease is not None and lease.fence > old
            lease.release()
        finally:
            fresh.close()

    def test_old_layout_fence_ahead_of_the_clock_is_the_floor(self, fake_server: Any) -> None:
        # Server time alone would not do: an old fence may run ahead of the clock (a server
        # whose clock was stepped back, many acquisitions in one microsecond).
        client = fakeredis.FakeRedis(server=fake_server)
        client.set("{t:ahead-old}:fence", str(2**52))
        fresh = make_fake(fake_server, prefix="t:")
        try:
            lease = fresh.acquire("ahead-old", 10)
            assert lease is not None and lease.fence == 2**52 + 1
            lease.release()
            # From then on the new fence key rules (the old key is read only when it is absent).
            client.set("{t:ahead-old}:fence", str(2**53 - 10))
            again = fresh.acquire("ahead-old", 10)
            assert again is not None and again.fence == 2**52 + 2
            again.release()
        finally:
            fresh.close()

    def test_legacy_fence_read_can_be_switched_off(self, fake_server: Any) -> None:
        client = fakeredis.FakeRedis(server=fake_server)
        client.set("{t:no-legacy}:fence", str(2**52))
        fresh = make_fake(fake_server, prefix="t:", legacy_fences=False)
        try:
            lease = fresh.acquire("no-legacy", 10)
            assert lease is not None and lease.fence < 2**52
            lease.release()
        finally:
            fresh.close()

    def test_client_floor_beats_a_regressed_server(self, fake: RedisCoordinator) -> None:
        lease = fake.acquire("floor", 10)
        assert lease is not None
        lease.release()
        floor = lease.fence + 10**12  # as if this process had seen a much higher fence
        fake._seen["floor"] = floor
        fake.client.delete(fake.fence_key("floor"))
        again = fake.acquire("floor", 10)
        assert again is not None and again.fence == floor + 1
        again.release()

    def test_seen_fences_are_bounded(self, fake: RedisCoordinator) -> None:
        for i in range(backend.SEEN_FENCES_MAX):
            fake._seen[f"n{i}"] = i
        lease = fake.acquire("one-more", 10)
        assert lease is not None
        assert len(fake._seen) == backend.SEEN_FENCES_MAX
        assert "n0" not in fake._seen and fake._seen["one-more"] == lease.fence
        lease.release()

    def test_release_and_extend_compare_the_owner(
        self, fake: RedisCoordinator, fake_other: RedisCoordinator
    ) -> None:
        lease = fake.acquire("cmp", 10)
        assert lease is not None
        assert fake._release("cmp", "x" * 32) is False
        assert fake_other._extend("cmp", "x" * 32, 10) is False
        assert fake.client.get(fake.lock_key("cmp")) == lease.owner.encode()
        assert fake._extend("cmp", lease.owner, 100) is True
        assert fake.client.pttl(fake.lock_key("cmp")) > 10_000
        assert lease.release()
        assert fake._extend("cmp", lease.owner, 10) is False  # gone: never re-created

    def test_uncontended_pairs_leave_only_fence_and_tombstone(
        self, fake: RedisCoordinator, fake_other: RedisCoordinator
    ) -> None:
        lease = fake.acquire("quiet", 10)
        assert lease is not None
        assert fake_other.acquire("quiet", 10) is None  # a try without waiting: not queued
        assert fake.client.exists(fake.queue_key("quiet"), fake.keys.waiting("quiet")) == 0
        lease.release()
        keys = {k.decode() for k in fake.client.keys("t:{quiet}*")}
        assert keys == {fake.fence_key("quiet"), fake.keys.released("quiet", lease.owner)}
        tombstone = fake.keys.released("quiet", lease.owner)
        assert 0 < fake.client.pttl(tombstone) <= fake._tombstone_ms

    def test_release_hands_over_first_come_first_served(self, fake: RedisCoordinator) -> None:
        holder = fake.acquire("fifo", 10)
        assert holder is not None
        first, second = "a" * 32, "b" * 32
        assert attempt(fake, "fifo", first, 7, register=5).fence is None
        assert attempt(fake, "fifo", second, 9, register=5).fence is None
        assert attempt(fake, "fifo", first, 7, register=5).fence is None  # keeps its place
        assert fake._release("fifo", holder.owner)
        assert fake.client.get(fake.lock_key("fifo")) == first.encode()
        assert 6_000 < fake.client.pttl(fake.lock_key("fifo")) <= 7_000  # the waiter's ttl
        item = fake.client.lpop(fake.wake_key("fifo", first))
        fence, delay = backend.parse_hand_over(item)
        assert fence > holder.fence and 0 <= delay < 5
        assert fake.client.get(fake.fence_key("fifo")) == str(fence).encode()
        assert fake._release("fifo", first)
        assert fake.client.get(fake.lock_key("fifo")) == second.encode()
        assert fake._release("fifo", second)
        assert fake.client.exists(fake.lock_key("fifo")) == 0
        holder.release()  # long since handed over: refused, nothing touched
        assert fake.client.exists(fake.lock_key("fifo")) == 0

    def test_hand_over_skips_expired_registrations(self, fake: RedisCoordinator) -> None:
        holder = fake.acquire("stale", 10)
        assert holder is not None
        assert attempt(fake, "stale", "d" * 32, 10, register=0.001).fence is None  # "died"
        time.sleep(0.05)
        assert fake._release("stale", holder.owner)
        assert fake.client.exists(fake.lock_key("stale")) == 0  # freed, not given to the dead
        assert fake.client.exists(fake.wake_key("stale", "d" * 32)) == 0

    def test_abandon_passes_a_hand_over_on(self, fake: RedisCoordinator) -> None:
        holder = fake.acquire("gave-up", 10)
        assert holder is not None
        quitter, patient = "q" * 32, "p" * 32
        assert attempt(fake, "gave-up", quitter, 10, register=5).fence is None
        assert attempt(fake, "gave-up", patient, 10, register=5).fence is None
        assert fake._release("gave-up", holder.owner)  # handed to the quitter...
        queued = backend.Ticket(quitter, 10, queued=True)
        fake._abandon("gave-up", quitter, queued)  # ...who gave up meanwhile: on to the next
        assert fake.client.get(fake.lock_key("gave-up")) == patient.encode()
        assert fake.client.exists(fake.wake_key("gave-up", quitter)) == 0
        fake._abandon("gave-up", "x" * 32, backend.Ticket("x" * 32, 10, queued=True))
        fake._abandon("gave-up", patient, backend.Ticket(patient, 10))  # never queued: no-op
        assert fake.client.get(fake.lock_key("gave-up")) == patient.encode()
        assert fake._release("gave-up", patient)

    def test_queued_attempt_that_finds_the_lock_free_takes_it(self, fake: RedisCoordinator) -> None:
        reply = attempt(fake, "free", "w" * 32, 10, register=5)
        assert reply.fence is not None and reply.started is None  # the base's send time
        assert fake.client.exists(fake.queue_key("free")) == 0
        queued = backend.Ticket("w" * 32, 10, queued=True, previous=123.0)
        call = fake._acquire_call("free", "w" * 32, 10, 5)
        again = fake._acquired("free", queued, fake._evalsha(*call))  # handed over / retried
        assert again.fence == reply.fence and again.started == 123.0  # the earlier send time

    def test_force_release_frees_and_fences_keep_growing(self, fake: RedisCoordinator) -> None:
        lease = fake.acquire("forced", 60)
        assert lease is not None
        assert fake._force_release("forced") is True
        assert fake._force_release("forced") is False  # nothing held any more
        again = fake.acquire("forced", 10)
        assert again is not None and again.fence > lease.fence
        assert lease.release() is False and again.release() is True

    def test_waiter_is_woken_by_release(
        self, fake: RedisCoordinator, fake_other: RedisCoordinator
    ) -> None:
        lease = fake.acquire("handoff", 60)
        assert lease is not None
        timer = threading.Timer(0.2, lease.release)
        timer.start()
        try:
            waited = fake_other.acquire("handoff", 10, wait=PATIENCE)
        finally:
            timer.join()
        # The holder's ttl (60 s) is far beyond the wait: only the release could free it.
        assert waited is not None and waited.fence > lease.fence
        waited.release()

    def test_wait_times_out(self, fake: RedisCoordinator, fake_other: RedisCoordinator) -> None:
        lease = fake.acquire("busy", 60)
        assert lease is not None
        assert fake_other.acquire("busy", 10, wait=0.2) is None
        lease.release()

    def test_claim_many_one_call_and_idempotent(self, fake: RedisCoordinator) -> None:
        keys = [f"job{i}@2026-01-01T00:00:00Z" for i in range(5)]
        assert fake.claim("job2@2026-01-01T00:00:00Z", 30)
        assert fake.claim_many(keys, 30) == set(keys) - {"job2@2026-01-01T00:00:00Z"}
        assert fake.claim_many(keys, 30) == set()
        # The script itself: a retry with the same token wins the same keys again.
        redis_keys = [fake.claim_key(k) for k in ["r1", "r2"]]
        token = uuid.uuid4().hex
        claim = fake._claim_script
        assert claim(keys=redis_keys, args=[30_000, token]) == [1, 2]
        assert claim(keys=redis_keys, args=[30_000, token]) == [1, 2]
        assert claim(keys=redis_keys, args=[30_000, "other"]) == []
        assert 0 < fake.client.pttl(fake.claim_key("r1")) <= 30_000

    def test_claims_do_not_collide_with_locks(self, fake: RedisCoordinator) -> None:
        lease = fake.acquire("claims", 10)  # a lock named like the claims' hash tag
        assert lease is not None
        assert fake.claim("lock", 10) is True
        assert fake.claim("claims}:lock", 10) is True
        assert [info.name for info in fake.locks()] == ["claims"]
        assert lease.release()

    @pytest.mark.parametrize("name", AWKWARD)
    def test_keys_of_one_name_share_one_slot(self, fake: RedisCoordinator, name: str) -> None:
        owner = "f" * 32
        keys = [fake.lock_key(name), fake.fence_key(name), fake.queue_key(name)]
        keys += [fake.keys.waiting(name), fake.wake_key(name, owner)]
        keys += [fake.keys.released(name, owner)]
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert len(set(keys)) == 6

    def test_layout_is_prefix_then_hash_tag_on_the_name(self, fake: RedisCoordinator) -> None:
        assert fake.lock_key("nightly") == "t:{nightly}:lock"
        assert fake.fence_key("nightly") == "t:{nightly}:fence"
        assert fake.queue_key("nightly") == "t:{nightly}:queue"
        assert fake.wake_key("nightly", "o1") == "t:{nightly}:wake:o1"
        assert fake.claim_key("job@1") == "t:claim:{claims}:job@1"
        assert key_slot(b"t:{nightly}:lock") == key_slot(b"nightly")  # the tag is the name

    @pytest.mark.parametrize("name", [*AWKWARD, "\\", "\\}", "}}", "\\x"])
    def test_every_key_starts_with_the_prefix(self, fake: RedisCoordinator, name: str) -> None:
        lease = fake.acquire(name, 10)
        assert lease is not None
        assert attempt(fake, name, "w" * 32, 10, register=5).fence is None  # queued
        assert fake.claim(name, 10)
        fake.record_run(RunRecord(f"r-{name}", name, "t0", "i1", 1_700_000_000.0))
        lease.release()  # hands over to the waiter, leaves a tombstone
        keys = [k.decode() for k in fake.client.keys("*")]
        assert len(keys) >= 7
        assert all(k.startswith("t:") for k in keys), keys
        assert [i.name for i in fake.locks()] == [name]  # now the waiter's

    def test_escaped_names_never_collide(self, fake: RedisCoordinator) -> None:
        names = ["}", "\\}", "\\\\}", "x", "\\x", "}x", "\\}x", "\\"]
        keys = {fake.lock_key(n) for n in names}
        assert len(keys) == len(names)
        leases = [fake.acquire(n, 10) for n in names]
        assert all(leases)
        assert sorted(i.name for i in fake.locks()) == sorted(names)
        for lease in leases:
            assert lease is not None and lease.release()

    def test_claim_and_history_keys_share_one_slot_each(self, fake: RedisCoordinator) -> None:
        claims = {key_slot(fake.claim_key(k).encode()) for k in AWKWARD}
        assert len(claims) == 1
        runs = {
            key_slot(k.encode())
            for k in [
                fake.keys.all_index,
                fake.keys.run_prefix + "r1",
                fake.keys.run_prefix + "}{",
                fake.keys.job_index_prefix + "job",
                fake.keys.job_index_prefix + "{x}",
            ]
        }
        assert len(runs) == 1

    def test_locks_lists_awkward_names_and_only_its_prefix(self, fake_server: Any) -> None:
        mine = make_fake(fake_server, prefix="a*[b]:")
        theirs = make_fake(fake_server, prefix="a-x:")
        try:
            held = [mine.acquire(n, 10) for n in AWKWARD]
            assert all(held)
            other = theirs.acquire("other", 10)
            assert other is not None
            infos = {info.name: info for info in mine.locks()}
            assert set(infos) == set(AWKWARD)
            for lease in held:
                assert lease is not None
                info = infos[lease.name]
                assert info.owner == lease.owner and info.fence == lease.fence
                assert info.expires_at is not None and info.expires_at > time.time()
            assert [i.name for i in theirs.locks()] == ["other"]
            for lease in held:
                assert lease is not None and lease.release()
            assert mine.locks() == []
        finally:
            mine.close()
            theirs.close()

    def test_history_is_bounded_and_updates(self, fake_server: Any) -> None:
        c = make_fake(fake_server, prefix="h:", history_limit=3)
        try:
            base = 1_700_000_000.0
            for i in range(5):
                c.record_run(RunRecord(f"r{i}", "job", f"t{i}", "i1", base + i))
            c.record_run(RunRecord("x", "other", "t", "i2", base + 10, base + 11, "finished"))
            runs = c.history("job")
            assert [r.run_id for r in runs] == ["r4", "r3", "r2"]
            assert not c.client.exists(c.keys.run_prefix + "r0")  # trimmed runs are deleted
            c.record_run(RunRecord("r4", "job", "t4", "i1", base + 4, base + 5, "failed", "E"))
            updated = c.history("job", limit=1)[0]
            assert (updated.status, updated.error, updated.finished) == ("failed", "E", base + 5)
            everything = c.history()
            assert [r.run_id for r in everything] == ["x", "r4", "r3", "r2"]
            assert everything[1].instance == "i1" and everything[1].tick == "t4"
            assert c.history("missing") == []
            assert len(c.history(limit=2)) == 2
            with pytest.raises(ValueError):
                c.history(limit=0)
            with pytest.raises(TypeError):
                c.record_run("not a run")  # type: ignore[arg-type]
        finally:
            c.close()

    def test_renewal_notices_takeover(self, fake: RedisCoordinator) -> None:
        lease = fake.acquire("stolen", 0.6)
        assert lease is not None
        lost = threading.Event()
        lease.on_lost(lambda _: lost.set())
        fake.client.set(fake.lock_key("stolen"), "intruder", px=60_000)
        assert lost.wait(PATIENCE), "renewal did not notice the key was taken over"
        assert lease.lost and "no longer ours" in lease.lost_reason
        assert lease.release() is False
        assert fake.client.get(fake.lock_key("stolen")) == b"intruder"  # untouched

    def test_closed_coordinator_refuses(self, fake_server: Any) -> None:
        c = make_fake(fake_server, prefix="closed:")
        c.close()
        c.close()  # idempotent
        with pytest.raises(ConfigurationError):
            c.acquire("x", 1)
        with pytest.raises(ConfigurationError):
            c.locks()

    def test_bad_constructor_arguments(self, fake_server: Any) -> None:
        client = fakeredis.FakeRedis(server=fake_server)
        for prefix in ("", "a{b", "a}b", 5):
            with pytest.raises(ConfigurationError):
                RedisCoordinator(client, prefix=prefix)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            RedisCoordinator(client, history_limit=0)


# ---------------------------------------------------------------------------------------------
# URLs (no server needed: redis-py connects lazily)
# ---------------------------------------------------------------------------------------------


class TestUrls:
    def pool_kwargs(self, c: RedisCoordinator) -> dict[str, Any]:
        kwargs: dict[str, Any] = c.client.connection_pool.connection_kwargs
        return kwargs

    def test_redis_url(self) -> None:
        c = rc("redis://:s3cret@127.0.0.1:7777/3?prefix=app:&socket_timeout=1.5")
        try:
            assert isinstance(c, RedisCoordinator)
            kw = self.pool_kwargs(c)
            assert (kw["host"], kw["port"], kw["db"], kw["password"]) == (
                "127.0.0.1",
                7777,
                3,
                "s3cret",
            )
            assert kw["socket_timeout"] == 1.5
            wait_kw = c.wait_client.connection_pool.connection_kwargs
            assert wait_kw["socket_timeout"] == 1.5 + backend.MAX_BLOCK
            assert c.prefix == "app:"
            assert "s3cret" not in repr(c)
        finally:
            c.close()

    def test_defaults(self) -> None:
        c = rc("redis://127.0.0.1:7777")
        try:
            kw = self.pool_kwargs(c)
            assert c.prefix == backend.DEFAULT_PREFIX
            assert kw["socket_timeout"] == backend.DEFAULT_SOCKET_TIMEOUT
            assert kw["socket_connect_timeout"] == backend.DEFAULT_CONNECT_TIMEOUT
            assert c.retry_deadline == 10.0
        finally:
            c.close()

    def test_keyword_options_win(self) -> None:
        c = rc(
            "redis://127.0.0.1:7777?socket_timeout=9",
            prefix="kw:",
            socket_timeout=0.5,
            retry_deadline=0.25,
            history_limit=7,
        )
        try:
            assert c.prefix == "kw:"
            assert self.pool_kwargs(c)["socket_timeout"] == 0.5
            assert c.retry_deadline == 0.25 and c.history_limit == 7
        finally:
            c.close()

    def test_rediss_and_unix(self) -> None:
        tls = rc("rediss://127.0.0.1:7777/0?ssl_cert_reqs=none")
        sock = rc("unix:///tmp/coordlock-test.sock?db=2&prefix=u:")
        try:
            assert tls.client.connection_pool.connection_class is redis.SSLConnection
            assert sock.client.connection_pool.connection_class is redis.UnixDomainSocketConnection
            kw = self.pool_kwargs(sock)
            assert kw["path"] == "/tmp/coordlock-test.sock" and kw["db"] == 2
            assert sock.prefix == "u:"
        finally:
            tls.close()
            sock.close()

    def test_blocking_is_bounded_by_the_wait_clients_socket_timeout(self) -> None:
        short = RedisCoordinator(redis.Redis(host="127.0.0.1", port=7777, socket_timeout=1.0))
        default = rc("redis://127.0.0.1:7777")
        try:
            assert short._max_block == pytest.approx(0.8)
            assert default._max_block == backend.MAX_BLOCK
        finally:
            short.close()
            default.close()

    def test_sentinel_url(self) -> None:
        c = rc(
            "redis+sentinel://:pw@127.0.0.1:26400,localhost,[::1]:26402/mymaster/4"
            "?sentinel_password=spw&prefix=s:"
        )
        try:
            pool: Any = c.client.connection_pool
            assert pool.service_name == "mymaster"
            sentinels = pool.sentinel_manager.sentinels
            addrs = [
                (
                    s.connection_pool.connection_kwargs["host"],
                    s.connection_pool.connection_kwargs["port"],
                )
                for s in sentinels
            ]
            assert addrs == [("127.0.0.1", 26400), ("localhost", 26379), ("::1", 26402)]
            assert sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
            assert pool.connection_kwargs["db"] == 4
            assert pool.connection_kwargs["password"] == "pw"
            assert c.prefix == "s:"
        finally:
            c.close()

    @pytest.mark.parametrize(
        "url",
        [
            "redis://127.0.0.1:7777?bogus=1",
            "redis://127.0.0.1:7777?prefix=",
            "redis://127.0.0.1:7777?prefix=a{b",
            "redis://127.0.0.1:7777?retry_deadline=soon",
            "redis://127.0.0.1:7777?history_limit=0",
            "redis://127.0.0.1:7777?socket_timeout=x",
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel://127.0.0.1:26379/m/0/extra",
            "redis+sentinel://127.0.0.1:bad/m",
            "redis+sentinel://127.0.0.1:26379/m?ssl_cert_reqs=none",
            "redis+sentinel://127.0.0.1:26379/m/notadb",
            "redis://127.0.0.1:7777/abc",  # redis-py alone would silently use database 0
            "redis://127.0.0.1:7777/1/2",
            "rediss://127.0.0.1:7777/x1",
            "redis://127.0.0.1:7777?db=x",
            "redis://127.0.0.1:7777?db=-1",
            "redis://127.0.0.1:7777?legacy_fences=maybe",
        ],
    )
    def test_bad_urls(self, url: str) -> None:
        with pytest.raises(ConfigurationError):
            coordlock.connect(url)

    def test_bad_database_path_says_what_is_wrong(self) -> None:
        with pytest.raises(ConfigurationError, match="database index") as caught:
            coordlock.connect("redis://:s3cret@127.0.0.1:7777/abc")
        assert "s3cret" not in str(caught.value)
        with pytest.raises(ConfigurationError, match="db"):
            coordlock.connect("redis://127.0.0.1:7777", db="abc")

    def test_database_path_forms(self) -> None:
        for url, db in [
            ("redis://127.0.0.1:7777", 0),
            ("redis://127.0.0.1:7777/", 0),
            ("redis://127.0.0.1:7777/5", 5),
            ("redis://127.0.0.1:7777/5/", 5),
        ]:
            c = rc(url)
            try:
                assert self.pool_kwargs(c).get("db", 0) == db, url
            finally:
                c.close()

    def test_unknown_option_is_named(self) -> None:
        with pytest.raises(ConfigurationError, match="frobnicate"):
            coordlock.connect("redis://127.0.0.1:7777?frobnicate=1")
        with pytest.raises(ConfigurationError, match="nonsense"):
            coordlock.connect("redis://127.0.0.1:7777", nonsense=True)

    def test_missing_driver_message(self) -> None:
        code = (
            "import sys; sys.modules['redis'] = None\n"
            "import coordlock\n"
            "try:\n"
            "    coordlock.connect('redis://127.0.0.1:7777')\n"
            "except coordlock.ConfigurationError as e:\n"
            "    print(e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert "pip install 'coordlock[redis]'" in out

    def test_import_coordlock_does_not_import_redis(self) -> None:
        code = "import sys, coordlock; print('redis' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------
# real redis-server
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    """The shared server of the session (never crashed here)."""
    return redis_server


@pytest.fixture
def fresh(fresh_redis_server: RedisServer) -> RedisServer:
    """A server of this test alone (it may be killed, restarted or paused)."""
    return fresh_redis_server


def url_of(server: RedisServer, **query: object) -> str:
    query.setdefault("prefix", f"t{uuid.uuid4().hex[:8]}:")
    return server.url + "?" + "&".join(f"{k}={v}" for k, v in query.items())


def redis_command_list(server: Any, *args: str) -> list[Any]:
    reply = redis_command(server.port, *args)
    return list(reply) if isinstance(reply, list) else []


class LosesReplies(redis.Connection):
    """A redis-py connection that, when armed, lets the server execute a command and then
    loses its reply (disconnects and raises ``ConnectionError``), as a broken network would.

    ``arm(sha, between)`` drops the reply of the next ``EVALSHA sha …``; ``between()`` runs
    after the server executed it and before the caller sees the error.
    """

    armed: ClassVar[dict[str, Callable[[], None]]] = {}
    dropped: ClassVar[list[str]] = []

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self._sent = args
        super().send_command(*args, **kwargs)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().read_response(*args, **kwargs)  # the server did execute it
        sent = getattr(self, "_sent", ())
        if len(sent) > 1 and sent[0] == "EVALSHA" and sent[1] in self.armed:
            between = self.armed.pop(sent[1])
            self.dropped.append(sent[1])
            self.disconnect()
            between()
            raise redis.ConnectionError("reply lost (test)")
        return reply


@pytest.fixture
def lossy(server: RedisServer) -> Iterator[RedisCoordinator]:
    LosesReplies.armed.clear()
    LosesReplies.dropped.clear()
    pool = redis.ConnectionPool(
        connection_class=LosesReplies,
        host=server.host,
        port=server.port,
        socket_timeout=2,
        retry=backend.urls.no_retry(),
    )
    c = RedisCoordinator(redis.Redis(connection_pool=pool), prefix=f"l{uuid.uuid4().hex[:6]}:")
    yield c
    c.close()
    pool.disconnect()


def evalsha_calls(client: Any) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0))


class TestRealServer:
    def test_fence_grows_across_a_restart_without_persistence(self, fresh: RedisServer) -> None:
        url = url_of(fresh)
        before = rc(url)
        lease = before.acquire("restart", 30)
        assert lease is not None
        old_pid = fresh.pid
        fresh.kill()
        fresh.start()
        assert fresh.pid != old_pid and fresh.command("DBSIZE") == 0  # really restarted, empty
        after = rc(url)  # a new client: no fence floor remembered
        try:
            again = after.acquire("restart", 30)  # the old lock vanished with the data
            assert again is not None and again.fence > lease.fence
            again.release()
            # The old client recovers too (stale pooled connections, script cache reloaded).
            third = before.acquire("restart", 30)
            assert third is not None and third.fence > again.fence
            assert lease.release() is False  # never deletes the new owner's lock
            assert third.release() is True
        finally:
            before.close()
            after.close()

    def test_history_batch_is_one_round_trip_and_survives_a_script_flush(
        self, server: RedisServer
    ) -> None:
        """``record_runs`` sends its rows as EVALSHA in one pipeline (no SCRIPT EXISTS before
        it); a server that lost the script (SCRIPT FLUSH, a restart) gets it loaded again."""
        with rc(url_of(server)) as c:
            base = time.time()
            rows = [RunRecord(f"b{i}", "batch-job", f"t{i}", "inst", base + i) for i in range(5)]
            c.record_runs(rows[:1])  # loads the script
            exists = c.client.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0)
            c.record_runs(rows)
            stats = c.client.info("commandstats")
            assert stats.get("cmdstat_script|exists", {}).get("calls", 0) == exists
            c.client.script_flush()
            done = [RunRecord(r.run_id, r.job, r.tick, r.instance, r.started, base + 9, "finished")
                    for r in rows]  # fmt: skip
            c.record_runs(done)
            assert sorted(c.history("batch-job"), key=lambda r: r.run_id) == done

    def test_waiter_woken_by_release_without_polling(self, fresh: RedisServer) -> None:
        url = url_of(fresh)
        with rc(url) as holder_side, rc(url) as waiter_side:
            lease = holder_side.acquire("wake", 60)  # no renewal due during the test
            assert lease is not None
            fresh.command("CONFIG", "RESETSTAT")
            got: list[Lease | None] = []
            thread = threading.Thread(
                target=lambda: got.append(waiter_side.acquire("wake", 10, wait=PATIENCE))
            )
            thread.start()
            time.sleep(1.0)  # the waiter blocks in BLPOP meanwhile
            lease.release()
            thread.join(PATIENCE)
            assert got and got[0] is not None and got[0].fence > lease.fence
            # Only the release could free a 60 s lease inside the wait; the waiter asked a
            # handful of times (first try, after the wake-up), not every few milliseconds.
            calls = evalsha_calls(waiter_side.client)
            assert calls <= 5, f"{calls} script calls: the waiter polled"
            got[0].release()

    def test_waiter_notices_dead_holder_by_its_ttl(self, fresh: RedisServer) -> None:
        url = url_of(fresh)
        with rc(url) as holder_side, rc(url) as waiter_side:
            lease = holder_side.acquire("dead", 1.0, renew=False)  # nobody will release it
            assert lease is not None
            fresh.command("CONFIG", "RESETSTAT")
            waited = waiter_side.acquire("dead", 10, wait=PATIENCE)
            assert waited is not None and waited.fence > lease.fence
            calls = evalsha_calls(waiter_side.client)
            assert calls <= 6, f"{calls} script calls: the waiter polled"
            waited.release()

    def test_many_waiters_all_get_the_lock(self, server: RedisServer) -> None:
        url = url_of(server)
        with rc(url) as c:
            held: list[int] = []
            errors: list[BaseException] = []
            inside = threading.Lock()

            def worker() -> None:
                try:
                    for _ in range(20):
                        lease = c.acquire("crowd", 30, wait=PATIENCE)
                        assert lease is not None
                        assert inside.acquire(blocking=False), "two threads inside"
                        held.append(lease.fence)
                        inside.release()
                        assert lease.release()
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            assert len(held) == 120 and len(set(held)) == 120
            assert held == sorted(held)  # appended inside the lock: fence order = hold order

    def test_wait_forever_is_bounded_by_the_holder(self, server: RedisServer) -> None:
        url = url_of(server)
        with rc(url) as a, rc(url) as b:
            lease = a.acquire("forever", 0.5, renew=False)
            assert lease is not None
            waited = b.acquire("forever", 5, wait=math.inf)
            assert waited is not None and waited.fence > lease.fence
            waited.release()

    def test_sentinel_discovers_the_master(self, redis_sentinel: SentinelServer) -> None:
        sentinel, master = redis_sentinel, redis_sentinel.master
        url = sentinel.url + f"?prefix=s{uuid.uuid4().hex[:6]}:"
        with rc(url) as c, rc(url) as d:
            lease = c.acquire("via-sentinel", 10)
            assert lease is not None
            assert d.acquire("via-sentinel", 10) is None
            assert [i.name for i in d.locks()] == ["via-sentinel"]
            key = c.lock_key("via-sentinel")
            assert master.command("GET", key) == lease.owner
            threading.Timer(0.2, lease.release).start()
            waited = d.acquire("via-sentinel", 10, wait=PATIENCE)
            assert waited is not None and waited.fence > lease.fence
            assert c.claim("tick", 10) and not d.claim("tick", 10)
            waited.release()

    def test_server_down_raises_backend_unavailable_then_recovers(self, fresh: RedisServer) -> None:
        c = rc(url_of(fresh, retry_deadline=0.5, socket_connect_timeout=0.5))
        try:
            lease = c.acquire("down", 30)
            assert lease is not None
            fresh.kill()
            with pytest.raises(BackendUnavailable):
                c.acquire("other", 30)
            with pytest.raises(BackendUnavailable):
                c.claim("k", 10)
            fresh.start()
            again = c.acquire("down", 30)  # the data is gone with the restart
            assert again is not None and again.fence > lease.fence
            again.release()
        finally:
            c.close()

    def test_hung_server_times_out(self, fresh: RedisServer) -> None:
        c = rc(url_of(fresh, retry_deadline=0.3, socket_timeout=0.3))
        try:
            assert c.claim("warm", 10)
            fresh.pause()
            try:
                with pytest.raises(BackendUnavailable):
                    c.acquire("hung", 30)
            finally:
                fresh.resume()
            lease = c.acquire("hung", 30)
            assert lease is not None
            lease.release()
        finally:
            c.close()

    def test_retry_covers_a_short_outage(self, fresh: RedisServer) -> None:
        c = rc(url_of(fresh, retry_deadline=20))
        try:
            assert c.claim("warm", 10)
            fresh.kill()
            restarter = threading.Timer(0.5, fresh.start)
            restarter.start()
            try:
                lease = c.acquire("outage", 30)  # retried until the server is back
            finally:
                restarter.join()
            assert lease is not None
            lease.release()
        finally:
            c.close()

    def test_close_unblocks_a_waiter(self, server: RedisServer) -> None:
        url = url_of(server)
        holder = rc(url)
        waiter = rc(url)
        try:
            lease = holder.acquire("closing", 60)
            assert lease is not None
            outcome: list[object] = []

            def wait() -> None:
                try:
                    outcome.append(waiter.acquire("closing", 10, wait=PATIENCE))
                except Exception as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=wait)
            thread.start()
            time.sleep(0.3)
            waiter.close()
            thread.join(PATIENCE)
            assert not thread.is_alive()
            assert outcome and not isinstance(outcome[0], Lease)
            lease.release()
        finally:
            holder.close()
            waiter.close()

    def test_unix_socket(self, tmp_path: Any) -> None:
        sock = tmp_path / "redis.sock"
        with RedisServer(extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700")) as s:
            assert eventually(sock.exists)
            with rc(f"unix://{sock}?prefix=u:") as c:
                lease = c.acquire("over-unix", 10)
                assert lease is not None
                assert s.command("EXISTS", "u:{over-unix}:lock") == 1
                lease.release()

    def test_wrong_password_fails_at_once(self) -> None:
        with RedisServer() as s:
            s.command("CONFIG", "SET", "requirepass", "right")
            # A huge retry deadline: were auth errors retried, this would hang (and time out).
            wrong = rc(s.url.replace("redis://", "redis://:Wr0ngS3cret@") + "?retry_deadline=3600")
            right = rc(s.url.replace("redis://", "redis://:right@") + "?prefix=pw:")
            try:
                with pytest.raises(ConfigurationError, match=r"(?i)pass|auth") as caught:
                    wrong.acquire("x", 10)
                assert "Wr0ngS3cret" not in str(caught.value)  # the password is never shown
                lease = right.acquire("x", 10)
                assert lease is not None and lease.release()
            finally:
                wrong.close()
                right.close()

    def test_renewal_against_a_hung_server_gives_up_within_the_ttl(
        self, fresh: RedisServer
    ) -> None:
        # retry_deadline is huge: renewal must still not keep retrying past the lease's ttl.
        c = rc(url_of(fresh, retry_deadline=3600, socket_timeout=0.2))
        try:
            lease = c.acquire("hung-renewal", 0.9)
            assert lease is not None
            states: list[str] = []
            lost = threading.Event()
            lease.on_state(lambda _, state: states.append(state))
            lease.on_lost(lambda _: lost.set())
            fresh.pause()
            try:
                assert lost.wait(PATIENCE), "on_lost never fired while the server hung"
            finally:
                fresh.resume()
            assert lease.lost and states[-1] == "lost"
            assert lease.release() is False
        finally:
            c.close()

    def test_sentinel_failover_keeps_fences_increasing(self) -> None:
        with (
            RedisServer() as master,
            RedisServer() as replica,
        ):
            replica.command("REPLICAOF", master.host, str(master.port))
            with SentinelServer(master, down_after=1.0, failover_timeout=3.0) as sentinel:

                def sentinel_knows_replica() -> bool:
                    reply = redis_command_list(sentinel, "SENTINEL", "REPLICAS", "mymaster")
                    return any(str(replica.port) in str(item) for item in reply)

                assert eventually(sentinel_knows_replica, 30), "sentinel never saw the replica"

                def replica_in_sync() -> bool:  # WAIT below needs a synced replica link
                    info = replica.command("INFO", "replication")
                    return "master_link_status:up" in (
                        info.decode() if isinstance(info, bytes) else str(info)
                    )

                assert eventually(replica_in_sync, 30), "the replica never finished its sync"
                url = sentinel.url + "?prefix=fo:&retry_deadline=30"
                with rc(url) as c:
                    lease = c.acquire("failover", 1.0, renew=False)
                    assert lease is not None
                    assert eventually(  # replicated (WAIT is safe to repeat)
                        lambda: master.command("WAIT", "1", "1000", timeout=5) == 1, 30
                    ), "the lock never reached the replica"
                    master.kill()
                    # The promoted replica serves the next acquisitions; the old lock either
                    # expired there or was lost, and the fence still grew.
                    again = c.acquire("failover", 10, wait=30)
                    assert again is not None and again.fence > lease.fence
                    assert sentinel.master_address() == (replica.host, replica.port)
                    assert again.release() is True

    def test_lost_release_reply_is_still_a_clean_release(self, lossy: RedisCoordinator) -> None:
        lease = lossy.acquire("lossy", 30)
        assert lease is not None
        lost: list[Lease] = []
        lease.on_lost(lost.append)
        LosesReplies.armed[lossy._release_script.sha] = lambda: None
        assert lease.release() is True  # the retry finds this owner's tombstone
        assert LosesReplies.dropped == [lossy._release_script.sha]  # the fault happened
        assert not lost and not lease.lost
        assert lossy.client.exists(lossy.lock_key("lossy")) == 0
        with lossy.lock("lossy", 30):  # the context manager raises no LockLost either
            LosesReplies.armed[lossy._release_script.sha] = lambda: None
        assert len(LosesReplies.dropped) == 2

    def test_lost_release_reply_while_others_take_over(
        self, lossy: RedisCoordinator, server: RedisServer
    ) -> None:
        # Between the executed release and its retry, another owner takes the lock, releases
        # it, and takes it again: a single "last released by" marker would be overwritten.
        with rc(f"{server.url}?prefix={lossy.prefix}") as other:
            lease = lossy.acquire("contended", 30)
            assert lease is not None
            held: list[Lease] = []

            def others_meanwhile() -> None:
                first = other.acquire("contended", 30)
                assert first is not None and first.release()
                second = other.acquire("contended", 30)
                assert second is not None
                held.append(second)

            LosesReplies.armed[lossy._release_script.sha] = others_meanwhile
            lost: list[Lease] = []
            lease.on_lost(lost.append)
            assert lease.release() is True
            assert len(LosesReplies.dropped) == 1 and not lost and not lease.lost
            assert held and lossy.client.get(lossy.lock_key("contended")) == held[-1].owner.encode()
            assert held[-1].release()

    def test_release_of_a_lost_lease_is_still_refused(self, lossy: RedisCoordinator) -> None:
        lease = lossy.acquire("expired", 0.05, renew=False)
        assert lease is not None
        assert eventually(lambda: lossy.client.exists(lossy.lock_key("expired")) == 0)
        LosesReplies.armed[lossy._release_script.sha] = lambda: None
        assert lease.release() is False  # no tombstone of this owner: really not ours
        assert LosesReplies.dropped and lease.lost

    def test_database_index_out_of_range_fails_at_once(self, server: RedisServer) -> None:
        # A huge retry deadline: were it retried, the call would hang (and time out).
        url = server.url.rsplit("/", 1)[0] + "/99?retry_deadline=3600"
        with rc(url) as c:
            with pytest.raises(ConfigurationError, match="DB index is out of range"):
                c.acquire("x", 10)
            with pytest.raises(ConfigurationError, match="DB index is out of range"):
                c.claim("x", 10)

    def test_cli_exits_78_on_a_bad_database(self, server: RedisServer) -> None:
        base = server.url.rsplit("/", 1)[0]
        for path, says in [("/99", "out of range"), ("/abc", "database index")]:
            done = subprocess.run(
                [sys.executable, "-m", "coordlock.cli", "locks", "--url", base + path],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 78, (path, done.stdout, done.stderr)
            assert says in done.stderr and "Traceback" not in done.stderr

    def test_no_server_at_all(self) -> None:
        port = free_port()
        c = rc(f"redis://127.0.0.1:{port}?retry_deadline=0.2")
        try:
            with pytest.raises(BackendUnavailable):
                c.acquire("nobody", 10)
        finally:
            c.close()


def test_worker_processes_share_one_fence_sequence(server: RedisServer, tmp_path: Any) -> None:
    """Processes that lock the same name see one strictly increasing fence sequence."""
    url = url_of(server)
    script = (
        "import sys, coordlock\n"
        "c = coordlock.connect(sys.argv[1])\n"
        "for _ in range(50):\n"
        "    l = c.acquire('shared', 10, wait=30)\n"
        "    print(l.fence, flush=True)\n"
        "    l.release()\n"
        "c.close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    fences: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        fences += [int(line) for line in out.split()]
    assert len(fences) == 150 and len(set(fences)) == 150


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_sigstopped_holder_is_lost_after_resume(server: RedisServer) -> None:
    """A holder process paused past its ttl finds its lease lost on resume (quick T1)."""
    url = url_of(server)
    script = (
        "import sys, time, coordlock\n"
        "c = coordlock.connect(sys.argv[1])\n"
        "l = c.acquire('paused', 0.5)\n"
        "print(l.fence, flush=True)\n"
        "sys.stdin.readline()\n"  # the test pauses us here, then resumes and says go
        "time.sleep(0.2)\n"
        "print('LOST' if l.lost else 'HELD', l.release(), flush=True)\n"
        "c.close()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        fence = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGSTOP)
        with rc(url) as other:
            taken = other.acquire("paused", 30, wait=PATIENCE)  # free once the ttl ran out
            assert taken is not None and taken.fence > fence
            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=60)
            assert out.split() == ["LOST", "False"]
            assert taken.release() is True  # the resumed holder deleted nothing
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# new hooks: fork, server_info, force release, native asyncio
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_never_uses_the_parents_connection(server: RedisServer) -> None:
    """Issue 10 row 8 for Redis: a child using the inherited coordinator opens connections of
    its own (it is another owner: the parent's lock is refused to it), and the parent's
    connection survives the child (the child did not close it on the wire)."""
    with rc(url_of(server)) as c:
        lease = c.acquire("forked", 30)
        assert lease is not None
        parent_id = c.client.client_id()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report (refused?, own connection id), never return
            status = 1
            try:
                os.close(read)
                refused = c.acquire("forked", 5) is None
                own = c.acquire("child-own", 5)
                child_id = c.client.client_id()
                ok = refused and own is not None and own.release() and child_id != parent_id
                os.write(write, b"ok" if ok else f"{refused} {child_id}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, said
        assert said == "ok", said
        assert c.client.client_id() == parent_id  # the same connection, still open
        assert lease.extend(30) and lease.release()


def test_server_info_reports_version_and_clock(server: RedisServer) -> None:
    with rc(url_of(server)) as c:
        info = c.server_info()
    expected = str(server.command("INFO", "server")).split("redis_version:")[1].split()[0]
    assert info.backend == "redis" and info.version == expected.strip("\\r")
    assert info.server_time is not None and info.measured_at is not None
    assert abs(info.server_time - info.measured_at) < 60  # same machine: the same clock


def test_force_release_hands_the_lock_to_a_waiter(server: RedisServer) -> None:
    with rc(url_of(server)) as c, rc(url_of(server, prefix=c.prefix)) as d:
        assert c.can_force_release
        lease = c.acquire("stuck", 60)
        assert lease is not None
        got: list[Lease | None] = []
        waiter = threading.Thread(target=lambda: got.append(d.acquire("stuck", 10, wait=PATIENCE)))
        waiter.start()
        assert eventually(lambda: c.client.exists(c.queue_key("stuck")) == 1)
        assert c.force_release("stuck") is True
        waiter.join(PATIENCE)
        assert got and got[0] is not None and got[0].fence > lease.fence
        assert lease.extend(60) is False and lease.lost  # the old holder finds out
        assert got[0].release()


def test_async_api_uses_redis_asyncio_not_threads(server: RedisServer) -> None:
    async def main() -> list[int]:
        c = coordlock.connect(url_of(server))
        try:
            first = await c.aacquire("native", 10)
            assert first is not None

            async def later() -> None:
                await asyncio.sleep(0.2)
                assert await first.release()

            release = asyncio.create_task(later())
            second = await c.aacquire("native", 10, wait=PATIENCE)  # a hand-over, awaited
            await release
            assert second is not None and await second.extend(10)
            assert await c.aclaim("tick@1", 10) and not await c.aclaim("tick@1", 10)
            fences = [first.fence, second.fence]
            assert await second.release()
            assert c._executor is None  # no hook ran on a worker thread
            return fences
        finally:
            await c.aclose()

    fences = asyncio.run(main())
    assert fences[1] > fences[0]


def test_event_loop_stall_with_50_tasks(server: RedisServer, capsys: Any) -> None:
    """50 tasks lock, wait (hand-overs) and release on one loop while a ticker measures the
    longest stall of the loop (after a warm-up round). The figure is printed (goal < 20 ms),
    not judged here."""

    async def main() -> tuple[float, int]:
        c = coordlock.connect(url_of(server))
        stalls: list[float] = []
        done = asyncio.Event()
        held = 0

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                stalls.append(now - last - 0.005)
                last = now

        async def worker(i: int) -> None:
            nonlocal held
            for _ in range(5):
                async with c.lock(f"stall-{i % 5}", ttl=5, wait=PATIENCE):
                    held += 1
                    await asyncio.sleep(0.002)

        # Warm up: one-time costs of a process's first lock (lazy imports of the metrics
        # hooks, the script cache) are not what this measures.
        await asyncio.gather(*(worker(i) for i in range(5)))
        held = 0
        tick = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(worker(i) for i in range(50)))
        finally:
            done.set()
            await tick
            await c.aclose()
        return max(stalls), held

    worst, held = asyncio.run(main())
    with capsys.disabled():
        print(f"\nredis: max event-loop stall {worst * 1000:.1f} ms over {held} lock holds")
    assert held == 250
    assert worst < PATIENCE  # a bound only: the figure is printed, not judged here
