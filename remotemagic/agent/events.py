"""A job's event log: ``jobs/<id>/events.jsonl``, one JSON event a line (:data:`.protocol.Event`).

Every output of a cell -- stream text, display data, execute results, errors, notices -- is
appended here with one ``write`` before anything else can see it; the agent streams the file by
byte offset and the client mirrors it byte for byte. Used by the worker (a running job's log
and its stdout/stderr, batched) and by the agent and the supervisor (a notice, a failure).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
import time
from typing import Any

from .protocol import TERMINAL

FLUSH_INTERVAL = 0.05  # stdout/stderr text waits at most this long (the worker's flusher thread) ...
FLUSH_BYTES = 64 * 1024  # ... or until this much has come


_log_fd: int | None = None  # worker.log, wherever fds 1 and 2 point during a job (agent/fdcapture.py)


def keep_log_fd(fd: int) -> None:
    """Diagnostics go to ``fd`` (a duplicate of the worker's stderr, ``worker.log``) from now on."""
    global _log_fd
    _log_fd = fd


def write_log(text: str) -> None:
    """Write ``text`` to the worker's own log -- never into a job's output, even while a job's
    fds 1 and 2 are being captured."""
    if _log_fd is None:
        stream = sys.__stderr__ or sys.stderr
        stream.write(text)
        stream.flush()
        return
    data = text.encode(errors="replace")
    try:
        while data:
            data = data[os.write(_log_fd, data):]
    except OSError:
        pass


def diagnose(text: str) -> None:
    """A line for the worker's own log (``worker.log``), for whoever debugs the target."""
    write_log(f"remotemagic worker: {text}\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


_BACK_STEP = 1 << 20  # how far each step of the backward search for a log's last line reads


def last_line(path: str) -> bytes | None:
    """The last whole line of a file (without its newline), however long; None for a missing or
    empty file, or one whose last line was cut short (it does not end with a newline)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return None
            f.seek(end - 1)
            if f.read(1) != b"\n":
                return None
            parts: list[bytes] = []
            pos = end - 1
            while pos > 0:
                step = min(_BACK_STEP, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    parts.append(chunk[cut + 1:])
                    break
                parts.append(chunk)
            return b"".join(reversed(parts))
    except OSError:
        return None


def final_status(path: str) -> dict[str, Any] | None:
    """The job status carried by the log's last line, if that line is a final ``status`` event
    (the worker writes the whole status there and fsyncs the log before ``status.json``)."""
    line = last_line(path)
    try:
        event = json.loads(line) if line else None
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "status" or not isinstance(event.get("status"), dict):
        return None
    status: dict[str, Any] = event["status"]
    return status if status.get("state") == event.get("state") and status.get("state") in TERMINAL else None


class EventLog:
    """Append-only JSON-lines log of one job. Lines are written whole with one ``write``."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.lock = threading.Lock()
        self.failed: str | None = None

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("time", time.time())
        line = (json.dumps(event, default=_jsonable, separators=(",", ":")) + "\n").encode()
        with self.lock:
            if self.fd < 0:
                return
            try:
                view = memoryview(line)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self.size += len(line)
            except OSError as exc:  # disk full: drop the partial line, keep running, report at the end
                self.failed = self.failed or f"{type(exc).__name__}: {exc}"
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    pass

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                try:
                    os.fsync(self.fd)
                except OSError:
                    pass
                os.close(self.fd)
                self.fd = -1


class Router:
    """Where events go right now: the running job's log, else nowhere (worker.log via fd 2)."""

    def __init__(self) -> None:
        self.log: EventLog | None = None
        self.streams: list[EventStream] = []

    def emit(self, event: dict[str, Any]) -> None:
        for s in self.streams:
            s.flush()
        if self.log is not None:
            self.log.emit(event)


class EventStream(io.TextIOBase):
    """sys.stdout / sys.stderr of user code: text batched for up to 50 ms or 64 KiB."""

    def __init__(self, router: Router, name: str, fallback: Any):
        self.router = router
        self.name = name
        self.fallback = fallback
        self.parts: list[str] = []
        self.size = 0
        self.lock = threading.RLock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self.lock:
            self.parts.append(text)
            self.size += len(text)
            if self.size >= FLUSH_BYTES:
                self.flush()
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if not self.parts:
                return
            text = "".join(self.parts)
            self.parts.clear()
            self.size = 0
            log = self.router.log
            if log is not None:
                log.emit({"type": "stream", "name": self.name, "text": text})
            else:
                self.fallback.write(text)
                self.fallback.flush()


def note_job(jdir: str, text: str, level: str = "warning") -> None:
    """Write a user notice into a job's log (the client renders it like output)."""
    log = EventLog(os.path.join(jdir, "events.jsonl"))
    try:
        log.emit({"type": "notice", "level": level, "text": text})
    finally:
        log.close()
