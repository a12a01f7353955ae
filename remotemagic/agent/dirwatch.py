"""Wake up when a folder changes, instead of polling it blind (Linux inotify through ctypes).

The agent follows a job by reading its folder while the worker writes it (``events.jsonl``
grows, ``status.json`` is renamed into place). Polling that every 1-2 ms cost a warm cell about
a millisecond of waiting for the next poll; with a :class:`DirWatch` the follower wakes within
microseconds of the worker's write. Where inotify is missing (not Linux, no such symbol in the
C library, the per-user limit of inotify instances reached) :meth:`DirWatch.wait` just sleeps,
as the polling did, so a caller never depends on it to make progress.

Closing an inotify descriptor that has seen events waits for the kernel's SRCU grace period
(8-12 ms measured here): longer than the whole cell it watched. :meth:`DirWatch.close` hands
the descriptor to one background thread that closes it, so the answer goes out first.
"""

from __future__ import annotations

import functools
import os
import queue
import select
import sys
import threading
import time
from typing import Any

from .files import libc_function

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE


_closing: queue.SimpleQueue[int] = queue.SimpleQueue()


def _closer() -> None:
    while True:
        os.close(_closing.get())


@functools.cache
def _start_closer() -> None:
    threading.Thread(target=_closer, name="dirwatch-closer", daemon=True).start()


def _inotify() -> tuple[Any, Any] | None:
    """The C library's ``inotify_init1`` and ``inotify_add_watch``, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    init = libc_function("inotify_init1", ("c_int",))
    add_watch = libc_function("inotify_add_watch", ("c_int", "c_char_p", "c_uint32"))
    return (init, add_watch) if init is not None and add_watch is not None else None


class DirWatch:
    """Changes in one folder (not its subfolders): :meth:`wait` returns early when one lands.

    Create it *before* reading what it watches: a change made after that wakes the next
    :meth:`wait` even if it landed before the wait began (inotify queues it)."""

    def __init__(self, path: str, mask: int = CHANGES, enabled: bool = True):
        """``enabled=False``: a watch that only sleeps (for a caller that will not wait)."""
        self.fd = -1
        calls = _inotify() if enabled else None
        if calls is None:
            return
        init, add_watch = calls
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:  # EMFILE: max_user_instances reached -- sleep instead
            return
        if add_watch(fd, os.fsencode(path), mask) < 0:
            os.close(fd)
            return
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    @property
    def active(self) -> bool:
        """True when changes wake :meth:`wait`; False when it only sleeps."""
        return self.fd >= 0

    def wait(self, timeout: float) -> bool:
        """Return True as soon as the folder changed (since the last call), else False after
        ``timeout`` seconds."""
        if self.fd < 0:
            time.sleep(timeout)
            return False
        if not self.poller.poll(max(0, int(timeout * 1000 + 0.999))):
            return False
        try:
            while os.read(self.fd, 65536):  # drain: one wake-up for all changes so far
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        """Stop watching (the descriptor is closed in the background: see the module's doc)."""
        if self.fd >= 0:
            _start_closer()
            _closing.put(self.fd)
            self.fd = -1

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
