"""The base class of every throwaway server: one process group on a loopback port with its
data in a temporary directory, started, probed, stopped, crashed, paused and cleaned up."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

from ._common import (
    HOST,
    INSTALL_HINT,
    ServerUnavailable,
    _die_with_parent,
    _group_members,
    _make_workdir,
    _process_state,
    _tail,
    free_port,
)
from ._install import ensure_installed

_S = TypeVar("_S", bound="ManagedServer")

_registry_lock = threading.Lock()
_live: dict[int, ManagedServer] = {}
_exit_hooks: list[Callable[[], None]] = []
"""Called by the atexit hook after every server is closed (e.g. to drop shared templates)."""


def _cleanup_all() -> None:
    """atexit hook: close every server this process started and did not close."""
    with _registry_lock:
        servers = list(_live.values())
    for server in reversed(servers):
        with contextlib.suppress(Exception):
            server.close(timeout=5.0)
    for hook in _exit_hooks:
        with contextlib.suppress(Exception):
            hook()


atexit.register(_cleanup_all)


# --------------------------------------------------------------------------------------------
# the base class
# --------------------------------------------------------------------------------------------


class ManagedServer:
    """One server process on ``127.0.0.1:<port>`` with its data in a temporary directory.

    Lifecycle: ``start()`` spawns it and waits until it answers a real request; ``stop()`` asks
    it to shut down and waits; ``kill()`` SIGKILLs its whole process group and waits until every
    process of it is gone; ``restart()`` brings it back on the SAME port with the SAME data
    directory (a server configured without persistence loses its data, as it would in real
    life); ``pause()`` / ``resume()`` SIGSTOP / SIGCONT the whole process group (clients then
    see connects succeed and requests hang); ``close()`` stops it for good and deletes its
    directory. A ``with`` block starts it and closes it. Servers still alive at interpreter exit
    are closed by an atexit hook, and the kernel kills them if the creating process dies.

    Servers must be started from the main thread or a thread that outlives them: the kernel's
    parent-death signal fires when the *thread* that spawned the server exits.

    Attributes: ``host`` (always ``"127.0.0.1"``), ``port``, ``url`` (a coordlock URL),
    ``workdir`` (temporary directory), ``log_path``, ``pid`` (None while not running).
    """

    kind: ClassVar[str] = ""
    stop_signal: ClassVar[int] = signal.SIGTERM
    _READY_ERRORS: ClassVar[tuple[type[BaseException], ...]] = (
        OSError,
        ValueError,
        subprocess.SubprocessError,
    )

    host: str = HOST

    def __init__(self, *, port: int | None = None, start_timeout: float = 60.0) -> None:
        """``port``: fixed port (default: :func:`free_port`); ``start_timeout``: seconds a
        start may take before :class:`ServerUnavailable` is raised."""
        self._port_fixed = port is not None
        self.port: int = port if port is not None else free_port()
        self.start_timeout = float(start_timeout)
        self.workdir: Path = _make_workdir(self.kind)
        self.log_path: Path = self.workdir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._prepared = False
        self._paused = False
        self._closed = False
        self._ever_ready = False
        self.last_start_seconds: float | None = None
        """Seconds the last ``start()`` took until the server answered (spawn + readiness)."""
        with _registry_lock:  # so that atexit removes the directory even if never started
            _live[id(self)] = self

    # -- hooks for subclasses ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The coordlock URL of this server."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create data directories once, before the first start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, timeout: float) -> bool:
        """One readiness check that talks to the server; True when it is serving."""
        raise NotImplementedError

    def _run_as(self) -> tuple[int, int] | None:
        """(uid, gid) to run the server as, or None for the current user."""
        return None

    def _child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def _log_files(self) -> list[Path]:
        return [self.log_path]

    # -- public API -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the server (leader of its process group), None when not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def paused(self) -> bool:
        """True between ``pause()`` and ``resume()``."""
        return self._paused and self.is_running()

    def is_running(self) -> bool:
        """True while the server process exists (a paused server is running)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log file(s)."""
        chunks = []
        for path in self._log_files():
            text = _tail(path, lines)
            if text.strip():
                chunks.append(f"--- {path} ---\n{text}")
        return "\n".join(chunks) or "(log is empty)"

    def start(self: _S, *, wait: bool = True, timeout: float | None = None) -> _S:
        """Start the server (no-op if running) and, with ``wait``, block until it answers.

        ``timeout`` (seconds, default ``start_timeout``) bounds the wait. Raises
        :class:`ServerUnavailable` (binaries missing, process exited, no answer in time).
        Returns ``self``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} was closed; create a new server")
            if self.is_running():
                return self
            ensure_installed(self.kind)
            if not self._prepared:
                self._prepare()
                self._prepared = True
            attempts = 1 if (self._port_fixed or self._ever_ready) else 3
            for attempt in range(attempts):
                began = time.monotonic()
                self._spawn()
                if not wait:
                    return self
                try:
                    self.wait_ready(timeout)
                except ServerUnavailable as exc:
                    if attempt + 1 < attempts and self._address_in_use():
                        self._discard_process()
                        self.port = free_port()  # lost a race for the port: take another
                        continue
                    self._discard_process()
                    raise ServerUnavailable(str(exc)) from None
                self.last_start_seconds = time.monotonic() - began
                return self
            raise AssertionError("unreachable")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server answers a real request (bounded by ``timeout`` seconds,
        default ``start_timeout``); raise :class:`ServerUnavailable` with the log tail if the
        process exits or does not answer in time."""
        limit = self.start_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        delay = 0.02
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerUnavailable(
                    f"{self.kind} server on {self.host}:{self.port} is not running "
                    f"(exit code {code}).\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            try:
                if self._probe(max(0.05, min(1.0, remaining))):
                    self._ever_ready = True
                    return
            except self._READY_ERRORS:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"{self.kind} server on {self.host}:{self.port} (pid {proc.pid}) did not "
                    f"answer within {limit:g}s.\n{self.log_tail()}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down gracefully and wait until all its processes are gone.

        After ``timeout`` seconds the process group is SIGKILLed. Data stays for ``restart()``.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, self.stop_signal)
                if self._paused:
                    self._signal_group(signal.SIGCONT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait(10.0)
            self._reap_group(proc.pid)
            self._proc = None
            self._paused = False

    def kill(self) -> None:
        """SIGKILL the server's whole process group (a crash) and wait until it is gone."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                self._signal_group(signal.SIGKILL)
                proc.wait(10.0)
            self._reap_group(proc.pid)
            self._proc = None
            self._paused = False

    def restart(self: _S, *, kill: bool = False, timeout: float | None = None) -> _S:
        """Stop (or with ``kill=True`` crash) the server and start it again on the same port
        with the same data directory; waits until it answers (``timeout`` seconds)."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP the whole process group and wait (max 5s) until the kernel reports it
        stopped. Connections are still accepted by the kernel, but nothing is answered."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{self!r} is not running")
            self._signal_group(signal.SIGSTOP)
            self._paused = True
            deadline = time.monotonic() + 5.0
            while _process_state(proc.pid) not in ("T", "t", None):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self!r} did not stop after SIGSTOP")
                time.sleep(0.01)

    def resume(self) -> None:
        """SIGCONT the process group after ``pause()``."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{self!r} is not running")
            self._signal_group(signal.SIGCONT)
            self._paused = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop the server for good (SIGKILL if a graceful stop fails) and delete its
        directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.stop(timeout)
            except Exception:
                self.kill()
            finally:
                self._closed = True
                with _registry_lock:
                    _live.pop(id(self), None)
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self: _S) -> _S:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.is_running() else "stopped")
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid} {state}>"

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        command = self._command()
        run_as = self._run_as()
        parent = os.getpid()
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=self._child_env(),
                    start_new_session=True,  # own process group: pause/kill reach children
                    preexec_fn=(lambda: _die_with_parent(parent)) if in_main_thread else None,
                    user=run_as[0] if run_as else None,
                    group=run_as[1] if run_as else None,
                    extra_groups=[] if run_as else None,
                )
            except OSError as exc:
                raise ServerUnavailable(f"cannot run {command[0]}: {exc}; {INSTALL_HINT}") from exc
        self._paused = False

    def _discard_process(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10.0)
            self._reap_group(proc.pid)
        self._proc = None
        self._paused = False

    def _address_in_use(self) -> bool:
        needles = ("address already in use", "bindexception", "could not create listen socket")
        text = self.log_tail(80).lower()
        return any(needle in text for needle in needles)

    def _signal_group(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _reap_group(self, pgid: int, timeout: float = 10.0) -> None:
        """Wait (bounded) until no process of the group is left; SIGKILL stragglers."""
        deadline = time.monotonic() + timeout
        killed = False
        while _group_members(pgid):
            if time.monotonic() > deadline:
                if killed:
                    return
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + 5.0
            time.sleep(0.01)
