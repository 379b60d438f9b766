"""Once-only claims and the cleanup sweep.

``<claims>/<key>`` – a persistent node whose data holds the hold time and the claimer's token,
with one child named by that token (the identity of the claim). An expired claim is replaced
atomically by one multi (delete the old token child, create ours, set the data); a sweep
deletes expired claims and lock directories that stayed empty long enough.

Expiry is judged against a LOWER bound of server time (``ServerClock.at_least_ms``): a claim is
replaced or swept only when the server clock has certainly passed ``mtime + hold``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

from ..._errors import BackendUnavailable
from ._layout import batch_id, claim_data, claim_info, escape
from ._session import Session

try:
    from kazoo.exceptions import (
        BadVersionError,
        NoAuthError,
        NodeExistsError,
        NoNodeError,
        NotEmptyError,
    )
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

#: Claims created per multi on the fast path of ``claim_many`` (keeps a request far below
#: ZooKeeper's 1 MB jute.maxbuffer even with 512-character keys).
CLAIM_BATCH = 200
#: A lock directory must stay empty and untouched this long (seconds) before a sweep deletes it:
#: far above ``_locks.QUIET_TTL`` (a recreated directory restarts its sequence counter, so it
#: must not happen while a fast-path expectation is live).
LOCK_DIR_MIN_IDLE = 600.0
#: Bounds of one sweep pass.
SWEEP_BATCH = 500
SWEEP_MAX_DELETES = 10_000


def _failed(outcome: Any) -> bool:
    """True when a multi failed; raises its NoAuthError (access refused is not "taken")."""
    for item in outcome:
        if isinstance(item, NoAuthError):
            raise item
    return any(isinstance(item, Exception) for item in outcome)


class Claims:
    """Claims under ``claims_dir``, and the sweep of claims and idle lock directories."""

    def __init__(self, session: Session, claims_dir: str, locks_dir: str, clock_path: str) -> None:
        self.session = session
        self.dir = claims_dir
        self.locks_dir = locks_dir
        self.clock_path = clock_path
        self.empty_dirs: dict[str, tuple[int, float]] = {}  # dir -> (pzxid, first seen empty)

    def claim_round(self, keys: Sequence[str], hold: float, token: str) -> set[str]:
        """One pipelined batch of multis: create every claim; replace the expired ones.

        Replacing an expired claim is one multi – delete the old token child, create ours, set
        the data – so exactly one replacer wins, and a claim recreated meanwhile (same path,
        version back at 0: the ABA case a delete-with-version would miss) is never touched.
        The ``set_data`` in each multi returns the server clock (mtime).
        """
        session = self.session
        session.ready()
        client = session.client
        data = claim_data(hold, token)
        paths = {key: f"{self.dir}/{escape(key)}" for key in keys}

        def create(path: str) -> Any:
            tx = client.transaction()
            tx.create(path, data)
            tx.create(f"{path}/{token}", b"")
            tx.set_data(path, data)
            return tx.commit_async()

        won: set[str] = set()
        found: dict[str, Any] = {}  # key -> its pending read (claimed already, maybe expired)
        if len(paths) > 1:  # fast path: fresh keys in a few multis, one log write each
            won, rest = self.claim_batches(paths, data, token)
            if not rest:
                return won
            # Contended (another instance claimed some of these first): read before writing,
            # so a key claimed elsewhere costs a read served by the server we talk to, not a
            # failing multi (a synced write) of its own. Only absent keys are created.
            reads = {key: client.get_async(paths[key]) for key in rest}
            paths = {}
            for key, result in reads.items():
                try:
                    found[key] = session.get(result)
                except NoNodeError:
                    paths[key] = f"{self.dir}/{escape(key)}"
        results = {key: create(path) for key, path in paths.items()}
        existing: list[str] = []
        for key, result in results.items():
            outcome = session.get(result)
            _failed(outcome)  # access refused: raise
            if isinstance(outcome[0], NoNodeError):  # no claims directory yet
                session.get(client.ensure_path_async(self.dir))
                outcome = session.get(create(paths[key]))
            if isinstance(outcome[0], NodeExistsError):
                existing.append(key)
            elif _failed(outcome):
                raise BackendUnavailable(f"claim {key!r}: {outcome!r}")
            else:
                session.clock.note_reply(outcome[-1].mtime, time.monotonic())
                won.add(key)
        if not existing and not found:
            return won
        paths.update((key, f"{self.dir}/{escape(key)}") for key in found)
        reads = {key: client.get_async(paths[key]) for key in existing}
        now_ms = session.server_now_ms(self.clock_path, refresh=True)
        replacing = {}
        for key in [*found, *reads]:
            try:
                raw, stat = found[key] if key in found else session.get(reads[key])
            except NoNodeError:  # swept meanwhile: claim it afresh
                replacing[key] = create(paths[key])
                continue
            info = claim_info(raw)
            if info.get("by") == token:
                won.add(key)  # an earlier attempt of this call won (its reply was lost)
            elif now_ms >= stat.mtime + int(info.get("hold_ms", 0)):
                tx = client.transaction()
                tx.delete(f"{paths[key]}/{info.get('by')}")
                tx.create(f"{paths[key]}/{token}", b"")
                tx.set_data(paths[key], data)
                replacing[key] = tx.commit_async()
        for key, result in replacing.items():
            outcome = session.get(result)
            if not _failed(outcome):
                session.clock.note_reply(outcome[-1].mtime, time.monotonic())
                won.add(key)
        return won

    def claim_batches(
        self, paths: dict[str, str], data: bytes, token: str
    ) -> tuple[set[str], list[str]]:
        """Create the claims of up to ``CLAIM_BATCH`` keys per multi, all multis pipelined.

        A multi is all-or-nothing: one key that exists (claimed elsewhere, or a missing claims
        directory) rolls its whole batch back. Each claim of a batch carries the batch's
        identity (:func:`batch_id` of its keys). When a batch fails on a key that another
        multi created *with the same identity* – the usual case: every scheduler instance
        cuts a tick's keys into the same chunks – and that claim has not expired, every key of
        the batch was claimed by that one multi: the batch is lost after one read, instead of
        one read per key (8 instances × 200 jobs: about 1,400 reads a tick otherwise). Returns
        the keys won and those left for the per-key round, which sorts out existing, expired
        and own (lost-reply) claims.
        """
        session = self.session
        client = session.client
        keys = list(paths)
        info = claim_info(data)
        pending = []
        for start in range(0, len(keys), CLAIM_BATCH):
            chunk = keys[start : start + CLAIM_BATCH]
            marked = json.dumps({**info, "batch": batch_id(chunk)}).encode()
            tx = client.transaction()
            for key in chunk:
                tx.create(paths[key], marked)
                tx.create(f"{paths[key]}/{token}", b"")
            tx.set_data(paths[chunk[0]], marked)  # its stat carries the server clock
            pending.append((chunk, tx.commit_async()))
        won: set[str] = set()
        rest: list[str] = []
        taken: list[tuple[list[str], Any]] = []  # (chunk, read of the claim it failed on)
        for chunk, result in pending:
            outcome = session.get(result)
            if not _failed(outcome):
                session.clock.note_reply(outcome[-1].mtime, time.monotonic())
                won.update(chunk)
                continue
            # ops are (create claim, create token child) per key, then one set_data
            at = next((i for i, op in enumerate(outcome) if isinstance(op, NodeExistsError)), -1)
            if at < 0 or at % 2 or at // 2 >= len(chunk):
                rest.extend(chunk)  # not a claim that exists (no claims directory yet, ...)
            else:
                taken.append((chunk, client.get_async(paths[chunk[at // 2]])))
        now_ms: float | None = None
        for chunk, read in taken:
            try:
                raw, stat = session.get(read)
            except NoNodeError:  # swept meanwhile
                rest.extend(chunk)
                continue
            found = claim_info(raw)
            if found.get("batch") != batch_id(chunk):
                rest.extend(chunk)  # claimed by another set of keys: ask key by key
                continue
            if now_ms is None:
                now_ms = session.server_now_ms(self.clock_path, refresh=True)
            if now_ms >= stat.mtime + int(found.get("hold_ms", 0)):
                rest.extend(chunk)  # expired: the per-key round replaces what it may
            elif found.get("by") == token:
                won.update(chunk)  # an earlier attempt of this call won (its reply was lost)
            # else: lost, the whole batch, to one multi of another claimer
        return won, rest

    # -- cleanup ---------------------------------------------------------------------------

    def sweep_claims(self) -> int:
        """Delete expired claims (token child and claim in one multi, version-checked)."""
        session = self.session
        client = session.client
        children = session.children(self.dir)
        if not children:
            return 0
        now_ms = session.server_now_ms(self.clock_path, refresh=True)
        deleted = 0
        for start in range(0, len(children), SWEEP_BATCH):
            batch = [f"{self.dir}/{c}" for c in children[start : start + SWEEP_BATCH]]
            reads = [(path, client.get_async(path)) for path in batch]
            deletes = []
            for path, result in reads:
                try:
                    raw, stat = session.get(result)
                except NoNodeError:
                    continue
                info = claim_info(raw)
                if now_ms >= stat.mtime + int(info.get("hold_ms", 0)):
                    tx = client.transaction()
                    if stat.numChildren:
                        tx.delete(f"{path}/{info.get('by')}")
                    tx.delete(path, version=stat.version)
                    deletes.append(tx.commit_async())
            for result in deletes:
                if not _failed(session.get(result)):
                    deleted += 1
            if deleted >= SWEEP_MAX_DELETES:
                break
        return deleted

    def sweep_lock_dirs(self) -> int:
        """Delete lock directories seen empty and untouched (same ``pzxid``) for at least
        :data:`LOCK_DIR_MIN_IDLE` seconds."""
        session = self.session
        client = session.client
        names = session.children(self.locks_dir)
        stats = [(n, client.exists_async(f"{self.locks_dir}/{n}")) for n in names]
        empty: dict[str, tuple[int, float]] = {}
        deletes = []
        now = time.monotonic()
        for name, result in stats:
            stat = session.get(result)
            if stat is None or stat.numChildren:
                continue
            seen = self.empty_dirs.get(name)
            if seen is None or seen[0] != stat.pzxid:
                empty[name] = (stat.pzxid, now)
            elif now - seen[1] >= LOCK_DIR_MIN_IDLE:
                path = f"{self.locks_dir}/{name}"
                deletes.append(client.delete_async(path, version=stat.version))
            else:
                empty[name] = seen
        deleted = 0
        for result in deletes[:SWEEP_MAX_DELETES]:
            with contextlib.suppress(NoNodeError, NotEmptyError, BadVersionError):
                session.get(result)
                deleted += 1
        self.empty_dirs = empty
        return deleted
