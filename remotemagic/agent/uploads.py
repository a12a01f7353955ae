"""Uploads: ``upload_begin``, ``data`` frames, ``upload_end`` (handled in the agent's reader thread, in order).

Three kinds (:class:`.protocol.UploadBeginRequest`):

* ``object`` -- a pushed value, written to ``objects/.tmp-<pid>-<id>`` and renamed to
  ``objects/<name>`` when complete (a dropped link removes the temporary file);
* ``file`` -- a user file, written to ``<dest>.rmpart`` (kept when the link drops: the next
  upload resumes it from ``offset``) and renamed over ``<dest>`` with its mode and mtime;
* ``tar`` -- a folder's changed files as one tar stream, extracted by a thread as it arrives.

A write that fails (a full disk) is remembered and answered at ``upload_end``: the reader keeps
reading the upload's frames so the stream stays in step.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from . import files, transfer, wire
from . import protocol as P
from .ops_files import user_path
from .protocol import RequestError

if TYPE_CHECKING:
    from .server import Agent


class Upload:
    """An object or a file arriving in data frames."""

    def __init__(self, tmp: str, final: str, size: int, digest: str | None, offset: int = 0,
                 mode: int | None = None, mtime: float | None = None):
        self.tmp, self.final, self.size, self.digest = tmp, final, size, digest
        self.mode, self.mtime = mode, mtime
        self.f = open(tmp, "r+b" if offset else "wb")
        if offset:
            self.f.truncate(offset)
            self.f.seek(offset)
        self.received = offset
        self.error: str | None = None
        self.writeback = files.Writeback(self.f, offset)

    def write(self, data: bytes | bytearray) -> None:
        if self.error:
            return
        try:
            self.f.write(data)
            self.writeback.wrote(self.received + len(data))
        except OSError as exc:  # disk full: remember, answer at the end, keep reading frames
            self.error = f"{type(exc).__name__}: {exc}"
        self.received += len(data)

    def finish(self) -> dict[str, Any]:
        """fsync, check, rename into place; the answer's result."""
        failed = self.writeback.close()
        if failed is not None:
            self.error = self.error or f"{type(failed).__name__}: {failed}"
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        self.f.close()
        if self.error:
            if self.digest:
                os.unlink(self.tmp)
            raise RequestError(f"writing {self.final} on the target failed: {self.error}", "RemoteDiskError")
        if self.received != self.size:
            raise RequestError(f"upload of {self.final} incomplete: {self.received} of {self.size} bytes")
        if self.mode is not None:
            os.chmod(self.tmp, int(self.mode) & 0o777)
        if self.mtime is not None:
            os.utime(self.tmp, (self.mtime, self.mtime))
        os.replace(self.tmp, self.final)
        files.fsync_dir(os.path.dirname(self.final))
        return {"size": self.received, "path": self.final}

    def abandon(self) -> None:
        """The link dropped mid-upload: an object's temporary file goes, a file's ``.rmpart`` stays."""
        self.writeback.close()
        self.f.close()
        if self.digest:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


class TarUpload:
    """A tar stream arriving in frames, extracted by a thread as it comes (through a pipe)."""

    def __init__(self, dest: str, size: int):
        self.dest, self.size, self.received = dest, size, 0
        r, w = os.pipe()
        self.reader = os.fdopen(r, "rb")
        self.pipe = os.fdopen(w, "wb")
        self.error: BaseException | None = None
        self.count = 0
        self.thread = threading.Thread(target=self._extract, daemon=True)
        self.thread.start()

    def _extract(self) -> None:
        try:
            self.count = transfer.extract_tar(self.reader, self.dest)
        except BaseException as exc:
            self.error = exc
        finally:
            self.reader.close()  # a writer still sending gets EPIPE instead of blocking

    def write(self, data: bytes | bytearray) -> None:
        if self.error is None:
            try:
                self.pipe.write(data)
            except (BrokenPipeError, ValueError):
                pass
        self.received += len(data)

    def finish(self) -> dict[str, Any]:
        try:
            self.pipe.close()
        except BrokenPipeError:
            pass
        self.thread.join()
        if self.error is not None:
            if isinstance(self.error, OSError) and self.error.errno == 28:
                raise RequestError(f"writing into {self.dest} on the target failed: {self.error}", "RemoteDiskError")
            raise RequestError(f"extracting into {self.dest} failed: {type(self.error).__name__}: {self.error}")
        return {"files": self.count, "size": self.received, "path": self.dest}

    def abandon(self) -> None:
        self.pipe.close()


def begin(agent: Agent, rid: int, header: dict[str, Any]) -> Upload | TarUpload:
    P.check(P.UploadBeginRequest, header, "upload_begin request")
    kind = header.get("kind")
    if kind == "object":
        try:
            digest = P.check_object_name(header["hash"])
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        tmp = agent.path("objects", f".tmp-{os.getpid()}-{rid}")
        return Upload(tmp, agent.path("objects", digest), int(header["size"]), digest)
    if kind == "tar":
        return TarUpload(user_path(header["dest"], header.get("cwd")), int(header["size"]))
    final = user_path(header["dest"], header.get("cwd"))
    files.private_dir(os.path.dirname(final))  # creates only what is missing
    tmp = final + transfer.PART
    offset = int(header.get("offset", 0))
    if offset and (not os.path.exists(tmp) or os.path.getsize(tmp) < offset):
        raise RequestError(f"cannot resume {final}: partial file is missing or shorter")
    return Upload(tmp, final, int(header["size"]), None, offset, mode=header.get("mode"), mtime=header.get("mtime"))


def on_frame(agent: Agent, rid: int, op: str, header: dict[str, Any], payload: bytearray) -> None:
    """One frame of an upload (``op`` is one of :data:`.protocol.UPLOAD_OPS`)."""
    if op == P.OP_UPLOAD_BEGIN:
        agent.uploads[rid] = begin(agent, rid, header)
    elif op == P.OP_DATA:
        up = agent.uploads.get(rid)
        if up is not None:
            up.write(wire.unpack(payload, header["z"]) if header.get("z") else payload)
    else:
        up = agent.uploads.pop(rid, None)
        if up is None:
            raise RequestError("upload_end without upload_begin")
        threading.Thread(target=finish, args=(agent, rid, up), daemon=True).start()


def finish(agent: Agent, rid: int, up: Upload | TarUpload) -> None:
    """After ``upload_end`` (in a thread: fsync and extraction must not hold up the reader)."""
    try:
        agent.writer.send({"id": rid, "ok": True, "result": up.finish()})
    except Exception as exc:
        agent.fail(rid, exc)
