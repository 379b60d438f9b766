"""``coordlock jobs pause|resume|run NAME``: steer a scheduled job on every instance at once
(see :mod:`coordlock.scheduler.control`), and what ``coordlock jobs`` adds to each job from
the coordinator's control rows (paused, trigger, next run)."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import time
from typing import Any

from ..scheduler import control
from ._common import Context, print_json


def operator() -> str:
    """Who changed a job's state, as recorded: ``cli:<user>@<host>:<pid>``."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name (a container without passwd entry)
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return f"cli:{user}@{socket.gethostname()}:{os.getpid()}"


def _set(args: argparse.Namespace, ctx: Context, paused: bool) -> int:
    coordinator = ctx.open()
    try:
        control.set_paused(coordinator, args.name, paused, by=operator(), note=args.note)
    finally:
        coordinator.close()
    if ctx.json:
        print_json({"job": args.name, "paused": paused})
    elif paused:
        print(f"paused {args.name}: every instance skips its ticks from its next one")
    else:
        print(f"resumed {args.name}: every instance runs it again from its next tick")
    return 0


def cmd_pause(args: argparse.Namespace, ctx: Context) -> int:
    """Pause a job on every instance."""
    return _set(args, ctx, True)


def cmd_resume(args: argparse.Namespace, ctx: Context) -> int:
    """Resume a paused job on every instance."""
    return _set(args, ctx, False)


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """Ask the cluster to run a job once, now."""
    coordinator = ctx.open()
    try:
        registered = args.name in control.read_registry(coordinator)
        request = control.request_run(coordinator, args.name, by=operator())
    finally:
        coordinator.close()
    if ctx.json:
        print_json({"job": args.name, "request": request, "registered": registered})
        return 0
    print(f"run-now request {request} for {args.name}: one instance runs it within a second")
    if not registered:
        print(
            f"note: no scheduler has published a job named {args.name!r}; the request waits "
            f"up to {control.RUN_NOW_TTL / 3600:g} h for one that registers it"
        )
    return 0


def job_extras(coordinator: Any, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Per job name: ``paused``, ``trigger`` and ``next_run`` (epoch seconds or ``None``) from
    the control rows and the published registrations."""
    now = time.time() if now is None else now
    states = control.read_states(coordinator)
    registry = control.read_registry(coordinator)
    extras: dict[str, dict[str, Any]] = {}
    for name in set(states) | set(registry):
        row = registry.get(name)
        trigger = control.trigger_from_spec(row.tick) if row is not None else None
        state = states.get(name)
        extras[name] = {
            "paused": bool(state and state.paused),
            "trigger": row.error if row is not None else None,
            "next_run": trigger.next_after(now) if trigger is not None else None,
        }
    return extras


def add_parsers(jobs: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    """Register the actions of ``coordlock jobs``."""
    sub = jobs.add_subparsers(dest="jobs_action", metavar="ACTION")
    for name, func, text in (
        ("pause", cmd_pause, "pause a job on every instance (its ticks are skipped(paused))"),
        ("resume", cmd_resume, "resume a paused job on every instance"),
        ("run", cmd_run, "run a job once, now, on one instance (even while paused)"),
    ):
        action = sub.add_parser(name, parents=parents, help=text, description=text + ".")
        action.add_argument("name", metavar="NAME", help="the job's name")
        if name != "run":
            action.add_argument("--note", help="why (kept with the state, shown by status)")
        action.set_defaults(func=func, supports_json=True)
