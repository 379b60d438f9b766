"""Process isolation: run a job in a child process that ends when its timeout passes, and never
outlives its scheduler.

A thread cannot be stopped from outside, so a job with ``timeout=`` that must really end at the
timeout runs with ``isolation="process"``: the child is started with the ``spawn`` method by
default (safe in a threaded program; the job must be a picklable module-level function), its
result or exception text comes back over a pipe, and at the timeout it gets ``SIGKILL``. An
``async def`` job runs in the child with :func:`asyncio.run`.

The child is bound to its scheduler three ways, so that a scheduler killed with ``SIGKILL``
(or frozen) leaves no job running without its no-overlap lease:

1. Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` – the kernel kills the child when the
   scheduler's thread that started it dies (the child checks its parent right after, in case
   the scheduler died first).
2. Everywhere: a thread in the child blocks on a pipe whose other end only the scheduler holds;
   end of file (the scheduler exited, however it died) ends the child.
3. The child ends itself :data:`CHILD_GRACE` seconds after its own ``timeout``, even when the
   scheduler is alive but cannot kill it (frozen by ``SIGSTOP``, a debugger, a VM pause).
"""

from __future__ import annotations

import ctypes
import inspect
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

from .job import RunContext, _set_current

#: Seconds after its timeout a child ends itself if the scheduler has not killed it.
CHILD_GRACE = 1.0
#: Exit codes of a child that ended itself.
EXIT_ORPHANED = 70  # its scheduler is gone
EXIT_TIMEOUT = 71  # its timeout passed and the scheduler did not kill it

_PR_SET_PDEATHSIG = 1


class JobTimeout(Exception):
    """The job ran past its ``timeout`` (its child process was killed, or its task cancelled)."""


class ChildFailed(Exception):
    """The job failed in its child process; ``child_traceback`` holds the child's traceback."""

    def __init__(self, message: str, child_traceback: str | None = None) -> None:
        super().__init__(message)
        self.child_traceback = child_traceback


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent (thread) dies.
    Returns ``False`` where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch_parent(alive: Connection, deadline: float | None) -> None:  # pragma: no cover
    """Child thread: end the process when the scheduler's end of ``alive`` closes (end of
    file), or at ``deadline`` (``time.monotonic()``)."""
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if alive.poll(remaining):
            try:
                alive.recv()
            except (EOFError, OSError):
                os._exit(EXIT_ORPHANED)
            continue
        sys.stderr.write(
            f"coordlock: job process {os.getpid()} passed its timeout and its scheduler did "
            "not end it: exiting\n"
        )
        os._exit(EXIT_TIMEOUT)


def _child_main(
    conn: Connection,
    alive: Connection,
    inherited: Connection | None,
    parent_pid: int | None,
    pdeathsig: bool,
    timeout: float | None,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    ctx: RunContext,
) -> None:  # pragma: no cover - runs in the child process
    if inherited is not None:
        inherited.close()  # fork: our copy of the scheduler's end would hide its exit
    if pdeathsig:
        set_parent_death_signal()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)  # the scheduler died before the death signal was armed
    deadline = None if timeout is None else time.monotonic() + timeout + CHILD_GRACE
    threading.Thread(target=_watch_parent, args=(alive, deadline), daemon=True).start()
    _set_current(ctx)
    try:
        result = func(*args, **dict(kwargs))
        if inspect.isawaitable(result):
            import asyncio

            asyncio.run(_await(result))
    except BaseException as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        conn.send(("error", text, traceback.format_exc()))
    else:
        conn.send(("ok", None, None))
    finally:
        conn.close()


async def _await(awaitable: Awaitable[object]) -> object:  # pragma: no cover - in the child
    return await awaitable


class ChildRegistry:
    """The live child processes of one scheduler, so ``stop()`` can kill stragglers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: set[Any] = set()

    def add(self, proc: Any) -> None:
        with self._lock:
            self._children.add(proc)

    def discard(self, proc: Any) -> None:
        with self._lock:
            self._children.discard(proc)

    def kill_all(self) -> int:
        with self._lock:
            children = list(self._children)
        for proc in children:
            if proc.is_alive():
                proc.kill()
        for proc in children:
            proc.join(5)
        return len(children)


def run_in_process(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    ctx: RunContext,
    *,
    timeout: float | None,
    context: BaseContext,
    registry: ChildRegistry,
    pdeathsig: bool = True,
) -> None:
    """Run ``func`` in a child process; raise :class:`JobTimeout` (after killing it) or
    :class:`ChildFailed`. Timeouts are real seconds. ``pdeathsig=False`` leaves the child to
    the pipe watch alone (tests of the portable path)."""
    parent, child = context.Pipe(duplex=False)
    alive_r, alive_w = context.Pipe(duplex=False)
    method = context.get_start_method()
    # With forkserver the child's parent is the server process, not this one.
    parent_pid = os.getpid() if method in ("spawn", "fork") else None
    inherited = alive_w if method == "fork" else None
    proc = context.Process(  # type: ignore[attr-defined]
        target=_child_main,
        args=(child, alive_r, inherited, parent_pid, pdeathsig, timeout, func, args, kwargs, ctx),
        name=f"coordlock-job-{ctx.job}",
        daemon=True,
    )
    try:
        proc.start()
    finally:
        child.close()
        alive_r.close()
    registry.add(proc)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        result: tuple[str, str | None, str | None] | None = None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if parent.poll(0.5 if remaining is None else min(remaining, 0.5)):
                try:
                    result = parent.recv()
                except EOFError:
                    result = None
                break
            if not proc.is_alive():
                # Exited without a word (killed, os._exit): drain a last message if any.
                if parent.poll(0):
                    try:
                        result = parent.recv()
                    except EOFError:
                        result = None
                break
            if deadline is not None and time.monotonic() >= deadline:
                proc.kill()
                proc.join(5)
                raise JobTimeout(f"timed out after {timeout:g}s; child process {proc.pid} killed")
        proc.join(5)
        if result is None:
            raise ChildFailed(f"child process {proc.pid} exited with code {proc.exitcode}")
        status, text, tb = result
        if status != "ok":
            raise ChildFailed(str(text), tb)
    finally:
        registry.discard(proc)
        parent.close()
        alive_w.close()


def make_context(method: str | None) -> BaseContext:
    """A multiprocessing context (``spawn`` unless told otherwise)."""
    return multiprocessing.get_context(method or "spawn")
