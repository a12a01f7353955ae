"""``push`` and ``pull`` of files and folders between this machine and a target.

A single file is streamed in 256 KiB frames; an interrupted transfer leaves ``<dest>.rmpart``,
and the next attempt continues from its end once the bytes already there are checked (sha256 of
the prefix on both ends). A folder travels as one tar stream of only the files that are missing
or differ (size or mtime) at the destination, so re-running a push after an interruption sends
only what did not arrive.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, cast

from . import progress
from .agent import files, protocol, wire
from .agent import transfer as tarring
from .connection import AgentConnection, CallReader

CHUNK = wire.CHUNK


@dataclass
class Endpoint:
    """The target end of a transfer: its open agent connection and how to use it."""

    conn: AgentConnection
    #: the folder on the target that relative paths are under (None: the session's folder)
    cwd: str | None = None
    #: the compression codec agreed with the agent (None: none)
    codec: str | None = None
    show_progress: bool = True
    #: the target is this machine: copying a file onto itself is skipped
    same_machine: bool = False


def _file_chunks(path: Path, offset: int) -> Iterator[memoryview]:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return
            yield view[:n]


def _tar_frames(src: Path, todo: list[list[Any]]) -> Iterator[bytes]:
    """The tar stream of ``todo`` (entries of ``tarring.tree``) under ``src``, in frames, written
    by a thread so that reading the files overlaps sending them."""
    q: queue.Queue[bytes | None] = queue.Queue(16)
    sink = tarring.FrameSink(q.put)

    def produce() -> None:
        try:
            tarring.write_tar(cast(BinaryIO, sink), str(src), todo)
            sink.close()
        finally:
            q.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is None:
            return
        yield item


def push(to: Endpoint, local: str | os.PathLike[str], dest: str | None = None) -> dict[str, Any]:
    """Copy a local file or folder to the target (``dest`` relative to the session's folder
    there; default: the same base name). Returns what was sent."""
    if not str(local).strip():
        raise ValueError("push: name the file or folder to send (an empty name would mean the whole current folder)")
    src = Path(local).expanduser().resolve()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    dest = dest or src.name
    conn, cwd = to.conn, to.cwd
    if src.is_dir():
        there = conn.request(protocol.OP_LIST_TREE, path=dest, missing_ok=True, cwd=cwd)
        mine = tarring.tree(str(src))["files"]
        todo = tarring.differing(mine, there["files"])
        total = sum(e[1] for e in todo)
        if not todo:
            return {"path": there["root"], "files": 0, "bytes": 0, "skipped": len(mine)}
        update, close = progress.bar(total, f"push {src.name}/", to.show_progress)
        try:
            ans = conn.upload({"kind": "tar", "dest": dest, "size": 0, "cwd": cwd}, _tar_frames(src, todo), update,
                              to.codec)
        finally:
            close()
        return {"path": ans["path"], "files": ans["files"], "bytes": total, "skipped": len(mine) - len(todo)}
    size = src.stat().st_size
    st = conn.request(protocol.OP_STAT, path=dest, partial=True, cwd=cwd)
    if to.same_machine and st["exists"] and os.path.realpath(st["path"]) == str(src):
        return {"path": st["path"], "bytes": 0, "skipped": 1}
    offset = 0
    part = st.get("partial")
    if part and 0 < part["size"] <= size and part["sha256"] == files.sha256_prefix(str(src), part["size"])[0]:
        offset = part["size"]
    update, close = progress.bar(size - offset, f"push {src.name}", to.show_progress)
    try:
        mode = src.stat().st_mode & 0o777
        ans = conn.upload({"kind": "file", "dest": dest, "size": size, "offset": offset, "mode": mode,
                           "mtime": src.stat().st_mtime, "cwd": cwd}, _file_chunks(src, offset), update, to.codec)
    finally:
        close()
    return {"path": ans["path"], "bytes": size - offset, "resumed_from": offset}


def pull(frm: Endpoint, path: str, local: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Copy a file or folder from the target to ``local`` (default: its base name here)."""
    if not str(path).strip():
        raise ValueError("pull: name the file or folder on the target")
    conn, cwd = frm.conn, frm.cwd
    there = conn.request(protocol.OP_LIST_TREE, path=path, cwd=cwd)
    dest = Path(local if local is not None else Path(there["root"]).name).expanduser().resolve()
    if there["dir"]:
        if dest.exists() and not dest.is_dir():
            raise FileExistsError(f"{there['root']} is a folder on the target but {dest} is a file here: "
                                  "give another destination (%ec2 pull PATH LOCAL_FOLDER) or move that file")
        dest.mkdir(parents=True, exist_ok=True)
        mine = tarring.tree(str(dest))["files"]
        todo = tarring.differing(there["files"], mine)
        if not todo:
            return {"path": str(dest), "files": 0, "bytes": 0, "skipped": len(there["files"])}
        total = sum(e[1] for e in todo)
        update, close = progress.bar(total, f"pull {dest.name}/", frm.show_progress)
        try:
            reader = CallReader(conn.start(protocol.OP_TAR_STREAM, path=path, files=todo, z=frm.codec, cwd=cwd))
            count = tarring.extract_tar(cast(BinaryIO, reader), str(dest), update)
            reader.drain()
        finally:
            close()
        return {"path": str(dest), "files": count, "bytes": total, "skipped": len(there["files"]) - len(todo)}
    _, size, mode, mtime = there["files"][0]
    if dest.is_dir():
        dest = dest / Path(there["root"]).name
    if frm.same_machine and str(dest) == os.path.realpath(there["root"]):
        return {"path": str(dest), "bytes": 0, "skipped": 1}
    part = Path(str(dest) + tarring.PART)
    offset = 0
    if part.exists() and 0 < part.stat().st_size <= size:
        have = part.stat().st_size
        theirs = conn.request(protocol.OP_HASH_PREFIX, path=path, size=have, cwd=cwd)["sha256"]
        if theirs == files.sha256_prefix(str(part), have)[0]:
            offset = have
    update, close = progress.bar(size - offset, f"pull {dest.name}", frm.show_progress)
    try:
        with open(part, "r+b" if offset else "wb") as f:
            f.truncate(offset)
            f.seek(offset)
            for _, payload in conn.start(protocol.OP_READ_FILE, path=path, offset=offset, z=frm.codec, cwd=cwd):
                f.write(payload)
                update(len(payload))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if not offset and part.exists() and part.stat().st_size == 0:
            part.unlink()  # nothing arrived (the target refused it): nothing to resume
        raise
    finally:
        close()
    if part.stat().st_size != size:
        raise OSError(f"pull of {path} incomplete: {part.stat().st_size} of {size} bytes (run it again to resume)")
    os.chmod(part, mode)
    os.utime(part, (mtime, mtime))
    os.replace(part, dest)
    return {"path": str(dest), "bytes": size - offset, "resumed_from": offset}
