"""Run history (``<runs>/<job>/<run_id>``, JSON, at most ``limit`` per job) and the listing of
held locks for ``coordlock locks``."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

from ..._protocol import LockInfo, RunRecord
from ._layout import LOCK_MARK, escape, ordered, seq_of, ttl_ms
from ._session import Session

try:
    from kazoo.exceptions import NodeExistsError, NoNodeError
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

log = logging.getLogger("coordlock")

#: Run paths (and job directories) a client remembers having written.
WRITTEN_MEMORY = 4096
#: Statuses a run's row never leaves (with its start time): a client that has read such a row
#: remembers its start time and reads it again only when it is among the newest asked for.
FINAL = frozenset({"finished", "failed", "skipped"})
#: Reads one history listing keeps in flight on the session at most.
READ_WINDOW = 64
#: Final rows a client remembers (path -> start time); past it, it forgets them all (and
#: reads every row once more).
FINAL_MEMORY = 100_000


class History:
    """Run records of the scheduler, bounded per job."""

    def __init__(self, session: Session, runs_dir: str, limit: int) -> None:
        self.session = session
        self.dir = runs_dir
        self.limit = limit
        self._lock = threading.Lock()
        # run paths this client created lately: their next rows are plain updates
        self._written: OrderedDict[str, None] = OrderedDict()
        self._created_since_check: dict[str, int] = {}  # job dir -> creates since a size check
        self._final: dict[str, float] = {}  # path of a row read as final -> its start time

    def record(self, run: RunRecord) -> None:
        """Store or update ``run`` (:meth:`record_many` of one row)."""
        self.record_many([run])

    def record_many(self, runs: list[RunRecord]) -> None:
        """Store or update every one of ``runs`` (distinct ``run_id``s); checks a job's size
        (and trims it) once per ``limit / 10`` new runs of this client.

        One write per row: a run this client wrote before is updated (``set``), any other one
        is created. Each failing write costs ZooKeeper a synced log entry, so the row's state
        is guessed, not probed; the writes that guessed wrong (created by another client, or
        trimmed) are sent again the other way. Pipelined: every first write is sent before any
        answer is awaited, then the second tries together, so the server syncs them to its log
        together and a batch costs about one synced write's time, not one per row. Raises the
        first error after every write was answered.
        """
        session = self.session
        session.ready()
        client = session.client

        def create(path: str, data: bytes) -> Any:
            return client.create_async(path, data, makepath=True)

        rows = []
        for run in runs:
            job_dir = f"{self.dir}/{escape(run.job)}"
            path = f"{job_dir}/{escape(run.run_id)}"
            data = json.dumps(vars(run)).encode()  # (flat fields: no deep copy)
            known = path in self._written
            first = client.set_async(path, data) if known else create(path, data)
            rows.append((job_dir, path, data, known, first))
        # (job dir, path, data, a create?, async result)
        again: list[tuple[str, str, bytes, bool, Any]] = []
        created: list[str] = []
        error: BaseException | None = None
        for job_dir, path, data, known, result in rows:
            try:
                session.get(result)
            except (NoNodeError, NodeExistsError) as exc:
                if isinstance(exc, NoNodeError) != known:
                    error = error or exc  # (a create whose parent vanished: not a guess)
                elif known:  # trimmed or deleted meanwhile: write it again
                    again.append((job_dir, path, data, True, create(path, data)))
                else:  # created by another client: update it
                    again.append((job_dir, path, data, False, client.set_async(path, data)))
                continue
            except Exception as exc:
                error = error or exc
                continue
            self._remember(path)
            if not known:
                created.append(job_dir)
        for job_dir, path, data, is_create, result in again:
            try:
                try:
                    session.get(result)
                except NodeExistsError:  # re-created elsewhere meanwhile: update it
                    session.get(client.set_async(path, data))
                    is_create = False
            except Exception as exc:
                error = error or exc
                continue
            self._remember(path)
            if is_create:
                created.append(job_dir)
        if error is not None:
            raise error
        for job_dir in dict.fromkeys(d for d in created if self._due_for_size_check(d)):
            stat = session.get(client.exists_async(job_dir))
            if stat is not None and stat.numChildren > self.limit + self.limit // 10:
                self._trim(job_dir)

    def _remember(self, path: str) -> None:
        with self._lock:
            self._written[path] = None
            self._written.move_to_end(path)
            while len(self._written) > WRITTEN_MEMORY:
                self._written.popitem(last=False)

    def _due_for_size_check(self, job_dir: str) -> bool:
        with self._lock:
            created = self._created_since_check.get(job_dir, 0) + 1
            if created >= max(1, self.limit // 10):
                self._created_since_check.pop(job_dir, None)
                return True
            if len(self._created_since_check) >= WRITTEN_MEMORY:
                self._created_since_check.clear()  # bounded; a cleared count only delays a check
            self._created_since_check[job_dir] = created
            return False

    def _trim(self, job_dir: str) -> None:
        runs = self._read(job_dir)
        runs.sort(key=lambda pair: pair[1].started, reverse=True)
        client = self.session.client
        deletes = [client.delete_async(f"{job_dir}/{child}") for child, _ in runs[self.limit :]]
        for result in deletes:
            with contextlib.suppress(NoNodeError):
                self.session.get(result)

    def _read(self, job_dir: str) -> list[tuple[str, RunRecord]]:
        session = self.session
        children = session.children(job_dir)
        reads = [(c, session.client.get_async(f"{job_dir}/{c}")) for c in children]
        runs = []
        for child, result in reads:
            try:
                raw, _ = session.get(result)
                runs.append((child, RunRecord(**json.loads(raw))))
            except NoNodeError:
                continue
            except (ValueError, TypeError):
                log.warning("ignoring unreadable run record %s/%s", job_dir, child)
        return runs

    def runs(self, job: str | None, limit: int) -> list[RunRecord]:
        """Newest runs first (by start time), at most ``self.limit`` per job (trimming lags by
        up to 10 %), optionally of one ``job``.

        ZooKeeper has no index by time: every row's start time must be known to pick the
        newest. The listings of every job are asked for at once; rows this client has read as
        final before (:data:`FINAL`) are not read again unless they are among the newest
        ``limit`` of their job and overall; every other row is read (pipelined). So a
        scheduler's periodic scan reads the new and unfinished rows, not the whole retained
        history each time."""
        session = self.session
        session.ready()
        client = session.client
        jobs = [escape(job)] if job is not None else session.children(self.dir)
        with self._lock:
            final = dict(self._final)
        wanted: list[str] = []
        present: set[str] = set()
        known: list[tuple[float, str]] = []  # final rows read before, newest of each job
        for job_dir, listing in self._pipelined(
            [f"{self.dir}/{j}" for j in jobs], client.get_children_async
        ):
            try:
                paths = [f"{job_dir}/{child}" for child in session.get(listing)]
            except NoNodeError:
                continue
            present.update(paths)
            seen = sorted(((final[p], p) for p in paths if p in final), reverse=True)
            known.extend(seen[: self.limit])
            wanted.extend(p for p in paths if p not in final)
        known.sort(reverse=True)
        wanted.extend(path for _, path in known[:limit])
        by_job: dict[str, list[RunRecord]] = {}
        read_final: dict[str, float] = {}
        for path, result in self._pipelined(wanted, client.get_async):
            try:
                raw, _ = session.get(result)
                run = RunRecord(**json.loads(raw))
            except NoNodeError:
                present.discard(path)
                continue
            except (ValueError, TypeError):
                log.warning("ignoring unreadable run record %s", path)
                continue
            by_job.setdefault(path.rpartition("/")[0], []).append(run)
            if run.status in FINAL:
                read_final[path] = run.started
        self._remember_final(wanted, read_final, present, everything=job is None)
        runs: list[RunRecord] = []
        for kept in by_job.values():
            kept.sort(key=lambda r: r.started, reverse=True)
            runs.extend(kept[: self.limit])
        runs.sort(key=lambda r: r.started, reverse=True)
        return runs[:limit]

    def _pipelined(
        self, paths: list[str], ask: Callable[[str], Any]
    ) -> Iterator[tuple[str, Any]]:
        """``(path, pending answer)`` for every path, at most :data:`READ_WINDOW` requests in
        flight: a long read must not queue thousands of requests on the session ahead of the
        claims and leases of the scheduler that shares it."""
        window: deque[tuple[str, Any]] = deque()
        for path in paths:
            if len(window) >= READ_WINDOW:
                yield window.popleft()
            window.append((path, ask(path)))
        yield from window

    def _remember_final(
        self, read: list[str], final_now: dict[str, float], present: set[str], *, everything: bool
    ) -> None:
        """Note what the rows just ``read`` were (final ones with their start time, the others
        forgotten) and, after a listing of every job, forget the rows that are gone."""
        with self._lock:
            final = self._final
            for path in read:
                if path in final_now:
                    final[path] = final_now[path]
                else:
                    final.pop(path, None)
            if everything:
                self._final = final = {p: t for p, t in final.items() if p in present}
            if len(final) > FINAL_MEMORY:
                self._final = {}


def list_locks(session: Session, locks_dir: str) -> list[LockInfo]:
    """Every held lock under ``locks_dir``: name, owner token, fence (czxid), expiry (epoch s,
    server clock). Holders certainly expired (by a lower bound of server time) are left out."""
    session.ready()
    client = session.client
    dirs = session.children(locks_dir)
    listings = [(d, client.get_children_async(f"{locks_dir}/{d}")) for d in dirs]
    heads = []
    for d, result in listings:
        try:
            children = session.get(result)
        except NoNodeError:
            continue
        seqs = [c for c in children if seq_of(c) is not None]
        if not seqs:
            continue
        head = ordered(seqs, seq_of(seqs[0]) or 0)[0][1]
        heads.append((d, head, client.get_async(f"{locks_dir}/{d}/{head}")))
    infos = []
    for d, head, result in heads:
        try:
            data, stat = session.get(result)
        except NoNodeError:
            continue
        now_ms = session.clock.at_least_ms()
        ttl = ttl_ms(data)
        expires = None if ttl is None else (stat.mtime + ttl) / 1000.0
        if expires is not None and now_ms >= expires * 1000.0:
            continue  # expired: the next contender will delete it
        owner = head.rpartition(LOCK_MARK)[0]
        infos.append(LockInfo(unquote(d), owner, int(stat.czxid), expires))
    infos.sort(key=lambda info: info.name)
    return infos
