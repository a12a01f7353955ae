"""Output that bypasses ``sys.stdout``: C and C++ extensions, ``os.system``, child processes.

While a job runs, file descriptors 1 and 2 of the worker point at two capture files in the
session's folder; a thread forwards what lands there to the job's stdout and stderr streams,
so it reaches the cell like a ``print`` does. Files rather than pipes: a writer never waits for
us, so a C extension that prints a lot while holding the GIL cannot deadlock the worker.
Between jobs, descriptors 1 and 2 go back to ``worker.log``.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import sys
import threading
from typing import Any

FDS = (1, 2)
READ = 64 * 1024


def _flush_pending() -> None:
    """Flush what is buffered on its way to fds 1 and 2: Python's own ``sys.__stdout__`` and
    ``sys.__stderr__``, and C's stdio (``printf`` to a file is block-buffered until then)."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


class FdCapture:
    """Sends bytes written to fds 1 and 2 during a job to ``streams[fd].write(text)``."""

    def __init__(self, folder: str, streams: dict[int, Any]):
        self.streams = streams
        self.saved = {fd: os.dup(fd) for fd in FDS}  # worker.log
        self.files = {
            fd: os.open(os.path.join(folder, f"fd{fd}.capture"),
                        os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
            for fd in FDS
        }
        self.offsets = dict.fromkeys(FDS, 0)
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in FDS}
        self.lock = threading.Lock()
        self.active = False

    def start(self) -> None:
        """A job starts: fds 1 and 2 now write into the (emptied) capture files."""
        _flush_pending()
        with self.lock:
            for fd, cap in self.files.items():
                os.ftruncate(cap, 0)
                self.offsets[fd] = 0
                self.decoders[fd].reset()
                os.dup2(cap, fd)
            self.active = True

    def stop(self) -> None:
        """The job ends: forward everything written so far, point fds 1 and 2 back at the log."""
        _flush_pending()
        with self.lock:
            if not self.active:
                return
            for fd in FDS:
                os.dup2(self.saved[fd], fd)
            self.active = False
            self._forward(final=True)

    def pump(self) -> None:
        """Forward what arrived since the last call (the worker's flusher thread calls this)."""
        with self.lock:
            if self.active:
                self._forward(final=False)

    def _forward(self, final: bool) -> None:
        for fd, cap in self.files.items():
            decoder = self.decoders[fd]
            while True:
                try:
                    data = os.pread(cap, READ, self.offsets[fd])
                except OSError:
                    break
                if not data:
                    break
                self.offsets[fd] += len(data)
                text = decoder.decode(data)
                if text:
                    self.streams[fd].write(text)
            if final:
                text = decoder.decode(b"", final=True)
                if text:
                    self.streams[fd].write(text)
