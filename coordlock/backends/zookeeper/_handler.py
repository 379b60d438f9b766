"""kazoo's threading handler with a cheaper ``select``.

kazoo's connection thread calls ``handler.select`` three to four times per request, and kazoo's
own version (``kazoo.handlers.utils.selector_select``) builds, fills and closes an epoll
selector on every call: profiled with 8 scheduler processes on ZooKeeper, those calls were the
largest single cost of a request in the client (about half of the connection thread's CPU).
:func:`poll_select` asks ``poll(2)`` directly: one C call, no per-call objects but the poller,
no limit on descriptor numbers (the reason kazoo left ``select(2)``).
"""

from __future__ import annotations

import math
import select
from typing import Any

try:
    from kazoo.handlers.threading import SequentialThreadingHandler
    from kazoo.handlers.utils import fileobj_to_fd
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

_READ = select.POLLIN | select.POLLPRI
#: What also wakes a reader or a writer: the peer hung up, an error, a closed descriptor (the
#: read or write that follows then fails and kazoo handles it as a lost connection).
_BROKEN = select.POLLHUP | select.POLLERR | select.POLLNVAL


def poll_select(
    rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """``select.select``'s contract (the objects of ``rlist``/``wlist`` that are ready within
    ``timeout`` seconds; ``xlist`` is never reported, as in kazoo's own) on ``poll(2)``.
    ``TypeError`` for an object without a descriptor, ``ValueError`` for a negative timeout."""
    if timeout is not None:
        if not isinstance(timeout, (int, float)):
            raise TypeError("timeout must be a number")
        if timeout < 0:
            raise ValueError("timeout must be non-negative")
    ms = None if timeout is None else math.ceil(timeout * 1000)
    if len(rlist) + len(wlist) == 1:  # kazoo's usual call: one socket, one way
        obj = rlist[0] if rlist else wlist[0]
        poller = select.poll()
        poller.register(fileobj_to_fd(obj), _READ if rlist else select.POLLOUT)
        if not poller.poll(ms):
            return [], [], []
        return ([obj], [], []) if rlist else ([], [obj], [])
    masks: dict[int, int] = {}
    readers: dict[int, list[Any]] = {}
    writers: dict[int, list[Any]] = {}
    for obj in rlist:
        fd = fileobj_to_fd(obj)
        masks[fd] = masks.get(fd, 0) | _READ
        readers.setdefault(fd, []).append(obj)
    for obj in wlist:
        fd = fileobj_to_fd(obj)
        masks[fd] = masks.get(fd, 0) | select.POLLOUT
        writers.setdefault(fd, []).append(obj)
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    ready = poller.poll(ms)
    readable: list[Any] = []
    writable: list[Any] = []
    for fd, events in ready:
        if events & (_READ | _BROKEN):
            readable.extend(readers.get(fd, ()))
        if events & (select.POLLOUT | _BROKEN):
            writable.extend(writers.get(fd, ()))
    return readable, writable, []


class PollingHandler(SequentialThreadingHandler):  # type: ignore[misc]
    """kazoo's :class:`SequentialThreadingHandler` whose ``select`` is :func:`poll_select`."""

    def select(self, *args: Any, **kwargs: Any) -> tuple[list[Any], list[Any], list[Any]]:
        return poll_select(*args, **kwargs)
