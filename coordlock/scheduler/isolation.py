"""Process isolation: run a job in a child process that is killed when its timeout passes.

A thread cannot be stopped from outside, so a job with ``timeout=`` that must really end at the
timeout runs with ``isolation="process"``: the child is started with the ``spawn`` method by
default (safe in a threaded program; the job must be a picklable module-level function), its
result or exception text comes back over a pipe, and at the timeout it gets ``SIGKILL``.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

from .job import RunContext, _set_current


class JobTimeout(Exception):
    """The job ran past its ``timeout`` (and its child process, if any, was killed)."""


class ChildFailed(Exception):
    """The job failed in its child process; ``child_traceback`` holds the child's traceback."""

    def __init__(self, message: str, child_traceback: str | None = None) -> None:
        super().__init__(message)
        self.child_traceback = child_traceback


def _child_main(
    conn: Connection,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    ctx: RunContext,
) -> None:  # pragma: no cover - runs in the child process
    _set_current(ctx)
    try:
        func(*args, **dict(kwargs))
    except BaseException as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        conn.send(("error", text, traceback.format_exc()))
    else:
        conn.send(("ok", None, None))
    finally:
        conn.close()


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
) -> None:
    """Run ``func`` in a child process; raise :class:`JobTimeout` (after killing it) or
    :class:`ChildFailed`. Timeouts are real seconds."""
    parent, child = context.Pipe(duplex=False)
    proc = context.Process(  # type: ignore[attr-defined]
        target=_child_main,
        args=(child, func, args, kwargs, ctx),
        name=f"coordlock-job-{ctx.job}",
        daemon=True,
    )
    proc.start()
    child.close()
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


def make_context(method: str | None) -> BaseContext:
    """A multiprocessing context (``spawn`` unless told otherwise)."""
    return multiprocessing.get_context(method or "spawn")
