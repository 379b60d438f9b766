"""The Redis backend's read-side extras: ``locks()`` (who holds what) and run history."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .._protocol import LockInfo, RunRecord
from .._validate import check_records

try:
    from redis.exceptions import NoScriptError
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from .._registry import missing_driver

    raise missing_driver("redis", "redis", "redis") from exc

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

    from .._retry import RetryPolicy
    from ._redis_keys import KeyLayout

T = TypeVar("T")
SCAN_COUNT = 500


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ListingMixin:
    """``locks()``, ``record_run()``/``record_runs()`` and ``history()`` for
    :class:`RedisCoordinator`."""

    client: redis.Redis
    description: str
    keys: KeyLayout
    history_limit: int
    _policy: RetryPolicy
    _record_script: Script
    _history_script: Script

    if TYPE_CHECKING:

        def _check_open(self) -> None: ...  # provided by BaseCoordinator

    def _ask(self, fn: Callable[[], T], what: str) -> T:
        """``fn`` with the coordinator's retries and error translation."""
        return self._policy.call(fn, f"redis {what} on {self.description}")

    def _scan_lock_keys(self) -> Iterator[list[bytes | str]]:
        pattern = self.keys.lock_pattern()
        cursor = 0

        def page() -> tuple[int, list[bytes | str]]:
            reply = self.client.scan(cursor, match=pattern, count=SCAN_COUNT)
            return int(reply[0]), list(reply[1])

        while True:
            cursor, keys = self._ask(page, "scan")
            if keys:
                yield keys
            if cursor == 0:
                return

    def locks(self) -> list[LockInfo]:
        """Every lock currently held under this prefix (``SCAN``; not a snapshot)."""
        self._check_open()
        found: list[LockInfo] = []
        for batch in self._scan_lock_keys():
            names = [n for n in (self.keys.name_of_lock(text(k)) for k in batch) if n is not None]

            def query(names: list[str] = names) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.get(self.keys.lock(name))
                    pipe.pttl(self.keys.lock(name))
                    pipe.get(self.keys.fence(name))
                replies: list[Any] = pipe.execute()
                return replies

            replies = self._ask(query, "locks")
            now = time.time()
            for i, name in enumerate(names):
                owner, pttl, fence = replies[3 * i : 3 * i + 3]
                if owner is None:
                    continue
                expires = now + pttl / 1000 if isinstance(pttl, int) and pttl >= 0 else None
                found.append(LockInfo(name, text(owner), int(fence or 0), expires))
        found.sort(key=lambda info: info.name)
        return found

    def record_run(self, run: RunRecord) -> None:
        """Store or update ``run``; keeps the newest ``history_limit`` runs of each job."""
        if not isinstance(run, RunRecord):
            raise TypeError(f"expected a RunRecord, not {type(run).__name__}")
        self._check_open()
        keys, args = self._record_call(run)
        script = self._record_script
        self._ask(lambda: script(keys=keys, args=args), "record_run")

    def record_runs(self, runs: Sequence[RunRecord]) -> None:
        """Store or update each of ``runs``: one script call per row, all in one pipelined
        round trip (not a transaction: a retry after a lost connection writes them again,
        which only rewrites the same rows)."""
        checked = check_records(runs)
        self._check_open()
        if not checked:
            return
        calls = [self._record_call(run) for run in checked]
        script = self._record_script

        def send() -> None:
            # EVALSHA in a plain pipeline: Script.__call__ on a pipeline would add a
            # SCRIPT EXISTS round trip before every batch; a server that lost the script
            # (restarted, flushed) answers NOSCRIPT and the batch is sent again once loaded
            for attempt in (1, 2):
                pipe = self.client.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                try:
                    pipe.execute()
                    return
                except NoScriptError:
                    if attempt == 2:
                        raise
                    self.client.script_load(script.script)

        self._ask(send, "record_runs")

    def _record_call(self, run: RunRecord) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of the record script for ``run``."""
        fields: list[str] = [
            "run_id", run.run_id, "job", run.job, "tick", run.tick, "instance", run.instance,
            "started", repr(float(run.started)), "status", run.status,
        ]  # fmt: skip
        if run.finished is not None:
            fields += ["finished", repr(float(run.finished))]
        if run.error is not None:
            fields += ["error", run.error]
        if run.result is not None:
            fields += ["result", run.result]
        k = self.keys
        keys = [k.run_prefix + run.run_id, k.job_index_prefix + run.job, k.all_index]
        args: list[str | int] = [
            run.run_id, repr(float(run.started)), self.history_limit, k.run_prefix, *fields,
        ]  # fmt: skip
        return keys, args

    def history(self, job: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest runs first (of ``job``, or of every job), at most ``limit``."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError("limit must be an int")
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._check_open()
        index = self.keys.all_index if job is None else self.keys.job_index_prefix + job
        script = self._history_script
        args: list[str | int] = [limit, self.keys.run_prefix]
        rows = self._ask(lambda: script(keys=[index], args=args), "history")
        return [run_from_hash(row) for row in cast("list[list[bytes]]", rows)]


def run_from_hash(flat: Sequence[bytes | str]) -> RunRecord:
    data: Mapping[str, str] = {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    finished = data.get("finished")
    return RunRecord(
        run_id=data.get("run_id", ""),
        job=data.get("job", ""),
        tick=data.get("tick", ""),
        instance=data.get("instance", ""),
        started=float(data.get("started", "0")),
        finished=float(finished) if finished is not None else None,
        status=data.get("status", "running"),
        error=data.get("error"),
        result=data.get("result"),
    )
