"""The agent: ``python -m remotemagic_agent.server ROOT``, speaking frames on stdin/stdout.

One agent runs per connection (a pipe to a local subprocess, or one SSH exec channel). It is
stateless beyond that connection: everything it knows is on disk under ROOT, so a new agent
after a dropped link picks up exactly where the last one was. Workers are separate detached
processes and outlive it.

This module is the connection: it reads frames, feeds upload frames to :mod:`.uploads` in
order, runs every other request in a thread of its own through :data:`HANDLERS` (op name ->
handler, by area: :mod:`.ops_jobs`, :mod:`.ops_sessions`, :mod:`.ops_store`, :mod:`.ops_files`)
once its header has the keys :data:`.protocol.OPS` declares for it, and writes the answers. A handler
is ``handler(agent, rid, request) -> result`` (or ``(result, payload)``); it sends data frames with
:meth:`Agent.more` and raises :class:`.protocol.RequestError` for an error the client should see as-is.
"""

from __future__ import annotations

import fcntl
import os
import platform
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

from . import files, ops_files, ops_jobs, ops_sessions, ops_store, services, uploads, wire
from . import protocol as P
from .protocol import RequestError

PIPE_SIZE = 1024 * 1024
ACTIVITY_EVERY = 30.0  # seconds between touches of <root>/activity (the idle auto-stop reads it)

Handler = Callable[["Agent", int, dict[str, Any]], Any]


class Agent:
    """One connection's agent over ``root``; answers are written to ``out``."""

    def __init__(self, root: str, out: Any):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.writer = wire.FrameWriter(out.write, out.flush)
        self.uploads: dict[int, uploads.Upload | uploads.TarUpload] = {}
        self.cancelled: set[int] = set()
        #: why this root must not be used (another user owns or can write it), told to every client
        self.unsafe: str | None = None
        try:
            files.check_ours(self.root, "root folder", follow=True)
            for sub in ("objects", "store", "sessions", "jobs"):
                files.private_dir(os.path.join(self.root, sub))
                files.check_ours(os.path.join(self.root, sub))
        except PermissionError as exc:
            self.unsafe = str(exc)
        self.agent_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.activity_at = -ACTIVITY_EVERY

    # -- plumbing --------------------------------------------------------------------------
    def serve(self, readinto: Callable[[memoryview], int]) -> None:
        while True:
            try:
                header, payload = wire.read_frame(readinto)
            except wire.ConnectionLost:
                break
            rid = header.get("id", 0)
            op = header.get("op", "")
            self.note_activity()
            if op in P.UPLOAD_OPS:
                try:
                    uploads.on_frame(self, rid, op, header, payload)
                except Exception as exc:
                    failed = self.uploads.pop(rid, None)
                    if failed is not None:
                        failed.abandon()  # its file (and its flush thread) go now, not at exit
                    self.fail(rid, exc)
                continue
            if op == P.OP_CANCEL_STREAM:
                self.cancelled.add(int(header.get("target", -1)))
                continue
            threading.Thread(target=self.handle, args=(rid, op, header), daemon=True).start()
        for up in self.uploads.values():  # a dropped link: object temps go, file .rmpart stays
            up.abandon()

    def note_activity(self) -> None:
        """A client is using this target: touch ``<root>/activity`` (at most every 30 s). An
        EC2 instance's idle auto-stop counts idle time from it, not from open connections."""
        now = time.monotonic()
        if now - self.activity_at < ACTIVITY_EVERY:
            return
        self.activity_at = now
        path = self.path("activity")
        try:
            os.utime(path)
        except FileNotFoundError:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                pass
        except OSError:
            pass

    def handle(self, rid: int, op: str, req: dict[str, Any]) -> None:
        handler = HANDLERS.get(op)
        try:
            if handler is None:
                raise RequestError(f"unknown request {op!r} (agent protocol {P.PROTOCOL})")
            if self.unsafe:
                raise RequestError(self.unsafe, "UnsafeRoot")
            P.check(P.OPS[op], req, f"{op} request")  # an unknown or missing field: ValueError naming it
            result = handler(self, rid, req)
            payload = b""
            if isinstance(result, tuple):
                result, payload = result
            self.writer.send({"id": rid, "ok": True, "result": result}, payload)
        except Exception as exc:
            self.fail(rid, exc)
        finally:
            self.cancelled.discard(rid)

    def fail(self, rid: int, exc: BaseException) -> None:
        kind = getattr(exc, "kind", type(exc).__name__)
        # an OSError names its file and says what is wrong (permission, not a folder...): no traceback
        detail = "" if isinstance(exc, (RequestError, ValueError, KeyError, OSError)) else traceback.format_exc()
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        self.writer.send({"id": rid, "ok": False, "error": {"type": kind, "message": message, "detail": detail}})

    def more(self, rid: int, header: dict[str, Any], payload: bytes | memoryview = b"",
             packer: wire.Packer | None = None) -> None:
        """Send a data frame of request ``rid`` (compressed by ``packer`` where that pays)."""
        if packer is not None and payload:
            payload, z = packer.pack(payload)
            if z:
                header = {**header, "z": z}
        self.writer.send({"id": rid, "more": True, **header}, payload)

    @staticmethod
    def packer(req: dict[str, Any]) -> wire.Packer | None:
        """The packer for the codec the request asked for (``z``), if this end has it."""
        z = req.get("z")
        return wire.Packer(z) if z in wire.codecs_available() else None

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)


# -- basics ----------------------------------------------------------------------------------------
def hello(agent: Agent, rid: int, req: dict[str, Any]) -> P.HelloAnswer:
    from importlib import metadata

    import cloudpickle  # type: ignore[import-untyped]

    try:  # the version only: importing IPython here would cost ~0.2 s per connect
        ipy = metadata.version("ipython")
    except metadata.PackageNotFoundError:
        ipy = None
    return {
        "protocol": P.PROTOCOL,
        "python": platform.python_version(),
        "executable": sys.executable,
        "cloudpickle": cloudpickle.__version__,
        "ipython": ipy,
        "root": agent.root,
        "home": os.path.expanduser("~"),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "codecs": wire.codecs_available(),
    }


def ping(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return {"time": time.time()}


HANDLERS: dict[str, Handler] = {
    P.OP_HELLO: hello,
    P.OP_PING: ping,
    **ops_store.HANDLERS,
    **ops_jobs.HANDLERS,
    **ops_sessions.HANDLERS,
    **ops_files.HANDLERS,
    **services.HANDLERS,
}
"""Every request op (:data:`.protocol.OPS`) and its handler."""


def _widen_pipe(fd: int) -> None:
    """Give the pipe to sshd 1 MiB instead of 64 KiB: a 256 KiB frame then crosses in one
    read instead of four, with fewer switches between sshd and us (no-op for non-pipes)."""
    try:
        if fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032)) < PIPE_SIZE:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass  # not a pipe, not Linux, or above /proc/sys/fs/pipe-max-size


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    if not args:
        sys.stderr.write("usage: python -m remotemagic_agent.server ROOT\n")
        sys.exit(2)
    os.umask(0o077)
    for fd in (0, 1):
        _widen_pipe(fd)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must never corrupt the frame stream
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    agent = Agent(args[0], out)
    agent.serve(wire.fd_readinto(sys.stdin.buffer))


if __name__ == "__main__":
    main()
