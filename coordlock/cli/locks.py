"""``coordlock locks`` (who holds what) and ``coordlock unlock NAME --force``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .._protocol import ListsLocks, LockInfo, RunCoordinator
from .._validate import check_name
from ._common import (
    EX_FAILED,
    EX_UNAVAILABLE,
    EX_USAGE,
    Context,
    UsageError,
    holder_text,
    parse_owner,
    print_json,
)


def lock_record(info: LockInfo, now: float) -> dict[str, Any]:
    """The ``--json`` form of one held lock (the fields docs/cli.md documents)."""
    holder = parse_owner(info.owner)
    return {
        "name": info.name,
        "fence": info.fence,
        "holder": str(holder) if holder else None,
        "host": holder.host if holder else None,
        "pid": holder.pid if holder else None,
        "owner": info.owner,
        "expires_at": info.expires_at,
        "expires_in": None if info.expires_at is None else max(0.0, info.expires_at - now),
    }


def _held(coordinator: RunCoordinator) -> list[LockInfo] | None:
    if not isinstance(coordinator, ListsLocks):
        return None
    return coordinator.locks()


def cmd_locks(args: argparse.Namespace, ctx: Context) -> int:
    """List the locks held right now."""
    coordinator = ctx.open()
    try:
        held = _held(coordinator)
    finally:
        coordinator.close()
    if held is None:
        print("coordlock: this backend cannot list held locks", file=sys.stderr)
        return EX_UNAVAILABLE
    now = time.time()
    if ctx.json:
        print_json({"locks": [lock_record(info, now) for info in held]})
        return 0
    if not held:
        print("no locks held")
        return 0
    rows = [
        (
            info.name,
            str(info.fence),
            "-" if info.expires_at is None else f"{max(0.0, info.expires_at - now):.1f}s",
            holder_text(info.owner),
        )
        for info in held
    ]
    width = max(4, *(len(r[0]) for r in rows))
    print(f"{'NAME':<{width}}  {'FENCE':>20}  {'EXPIRES IN':>10}  HOLDER")
    for name, fence, left, holder in rows:
        print(f"{name:<{width}}  {fence:>20}  {left:>10}  {holder}")
    return 0


def _confirm(prompt: str) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def cmd_unlock(args: argparse.Namespace, ctx: Context) -> int:
    """Release a lock held by someone else (after a crash, say), with confirmation."""
    name = check_name(args.name, "NAME")
    if not args.force:
        raise UsageError(
            "unlock releases a lock that someone else holds: add --force to say you mean it"
        )
    if not args.yes and not _is_terminal():
        raise UsageError("not at a terminal, so nobody can confirm: add --yes to unlock anyway")
    coordinator = ctx.open()
    try:
        force_release = getattr(coordinator, "force_release", None)
        if not callable(force_release) or not getattr(coordinator, "can_force_release", True):
            print(
                f"coordlock: this backend ({type(coordinator).__name__}) cannot force-unlock",
                file=sys.stderr,
            )
            return EX_UNAVAILABLE
        held = _held(coordinator)
        info = next((i for i in held or [] if i.name == name), None)
        if held is not None and info is None:
            return _report(ctx, name, False, None, "not held")
        if not args.yes:
            who = (
                f" held by {holder_text(info.owner)} (fence {info.fence})"
                if info is not None
                else ""
            )
            if not _confirm(f"force-release lock {name!r}{who}? [y/N] "):
                print("coordlock: not unlocked", file=sys.stderr)
                return EX_FAILED
        released = bool(force_release(name))
    finally:
        coordinator.close()
    return _report(ctx, name, released, info, "released" if released else "not held")


def _report(
    ctx: Context, name: str, released: bool, info: LockInfo | None, outcome: str
) -> int:
    if ctx.json:
        print_json(
            {
                "name": name,
                "released": released,
                "previous": None if info is None else lock_record(info, time.time()),
            }
        )
    elif released:
        who = f" (was held by {holder_text(info.owner)}, fence {info.fence})" if info else ""
        print(f"released lock {name!r}{who}; its holder will find it lost at its next renewal")
    else:
        print(f"lock {name!r} was not held")
    return 0


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``coordlock locks`` and ``coordlock unlock``."""
    locks = sub.add_parser(
        "locks",
        parents=parents,
        help="list held locks: name, fence, time left, holder (host:pid)",
        description=(
            "List the locks held right now, where the backend can tell: name, fence, seconds\n"
            "until the lease expires unless renewed, and the holder as host:pid (the raw\n"
            "owner token when it has no host:pid form). --json prints\n"
            '{"locks": [{"name", "fence", "holder", "host", "pid", "owner", "expires_at",\n'
            '"expires_in"}]} with times in epoch seconds and seconds. Exits 69 when the\n'
            "backend cannot list its locks."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    locks.set_defaults(func=cmd_locks, supports_json=True)

    unlock = sub.add_parser(
        "unlock",
        parents=parents,
        help="force-release a lock someone else holds (--force; asks, or --yes)",
        description=(
            "Release the lock NAME whoever holds it, e.g. after its holder's host died and you\n"
            "cannot wait for the TTL. The holder is not stopped: it finds its lease lost at its\n"
            "next renewal, and the next acquisition still gets a greater fence. Needs --force;\n"
            "asks for confirmation at a terminal unless --yes. Exits 0 when the lock is free\n"
            f"afterwards, 1 when you answered no, {EX_USAGE} without --force (or without --yes\n"
            f"when not at a terminal), {EX_UNAVAILABLE} when the backend cannot force-unlock."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    unlock.add_argument("name", metavar="NAME", help="the lock to release")
    unlock.add_argument("--force", action="store_true", help="required: yes, release it")
    unlock.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    unlock.set_defaults(func=cmd_unlock, supports_json=True)
