"""Shared plumbing of the throwaway servers: the loopback address, free ports, the error
type, and process helpers (parent-death signal, process-group state, log tails, work
directories). Knows nothing about any particular server."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
"""The only address any server here listens on."""

INSTALL_HINT = (
    "install the servers with: apt-get install -y redis-server postgresql zookeeper "
    "default-jre-headless   (or run backends/install.sh as root)"
)

KINDS: tuple[str, ...] = ("redis", "sentinel", "postgres", "zookeeper", "zookeeper-ensemble")
"""Server kinds understood by :func:`ensure_installed` and the command line."""


class ServerUnavailable(RuntimeError):
    """A server binary is missing, or a server failed to start or answer within its deadline.

    The message says what is missing or failed (with the tail of the server log) and how to
    install the servers.
    """


# --------------------------------------------------------------------------------------------
# free ports
# --------------------------------------------------------------------------------------------

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()
_rng = random.SystemRandom()  # immune to tests that seed the global `random`


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _xdist_worker_index() -> int | None:
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    return int(match.group(1)) if match else None


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now.

    The port is taken from *below* the kernel's ephemeral range when that range leaves room
    (normally 15000..32767): outgoing connections and ``bind(port=0)`` never take such a port,
    so a server that is killed and restarted can bind its port again even while thousands of
    client connections come and go. Each pytest-xdist worker draws from its own slice, and one
    process never hands out the same port twice. Falls back to ``bind(127.0.0.1:0)``.
    There is still a window between this call and the server binding the port; servers started
    here retry with another port when the first start fails with "address in use".
    """
    eph_lo, _ = _ephemeral_range()
    lo, hi = 15000, eph_lo - 1
    with _port_lock:
        if hi - lo >= 1000:
            worker = _xdist_worker_index()
            if worker is not None:
                slices = 32
                size = (hi - lo + 1) // slices
                lo = lo + (worker % slices) * size
                hi = lo + size - 1
            for _ in range(300):
                port = _rng.randint(lo, hi)
                if port not in _ports_handed_out and _port_is_free(port):
                    _ports_handed_out.add(port)
                    return port
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((HOST, 0))
                port = int(probe.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise ServerUnavailable("no free TCP port found on 127.0.0.1")


def port_is_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port`` (bounded by ``timeout``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# process plumbing
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:  # resolved at import, never in a freshly forked child
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when its parent thread exits."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (R, S, T, Z, ...) or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_WORKDIR_RE = re.compile(r"coordlock-srv-[a-z-]+-(\d+)-\w+")
_swept = False


def _sweep_stale_workdirs() -> None:
    """Remove work directories whose owning process is gone (left by SIGKILLed runs)."""
    global _swept
    if _swept:
        return
    _swept = True
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            match = _WORKDIR_RE.fullmatch(entry.name)
            if not match or not entry.is_dir() or entry.is_symlink():
                continue
            owner = int(match.group(1))
            if owner == os.getpid() or _process_state(owner) not in (None, "Z", "X"):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def _make_workdir(kind: str) -> Path:
    _sweep_stale_workdirs()
    return Path(tempfile.mkdtemp(prefix=f"coordlock-srv-{kind}-{os.getpid()}-"))
