"""``push`` and ``pull`` of files and folders between this machine and a target.

A single file is streamed in 256 KiB frames; an interrupted transfer leaves ``<dest>.rmpart``,
and the next attempt continues from its end once the bytes already there are checked (sha256 of
the prefix on both ends). A folder travels as one tar stream of only the files that are missing
or differ (size or mtime) at the destination, so re-running a push after an interruption sends
only what did not arrive.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import progress
from .agent import transfer as tarring
from .agent import wire

if TYPE_CHECKING:
    from .api import Remote

CHUNK = wire.CHUNK


def _sha256_prefix(path: Path, size: int) -> str:
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _file_chunks(path: Path, offset: int) -> Any:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return
            yield view[:n]


def push(remote: Remote, local: str | os.PathLike[str], dest: str | None = None) -> dict[str, Any]:
    """Copy a local file or folder to the target (``dest`` relative to the session's folder
    there; default: the same base name). Returns what was sent."""
    if not str(local).strip():
        raise ValueError("push: name the file or folder to send (an empty name would mean the whole current folder)")
    src = Path(local).expanduser().resolve()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    dest = dest or src.name
    conn = remote.connection()
    common = {"cwd": remote.cwd}
    if src.is_dir():
        there = conn.request("list_tree", path=dest, missing_ok=True, **common)
        mine = tarring.tree(str(src))["files"]
        todo = tarring.differing(mine, there["files"])
        total = sum(e[1] for e in todo)
        if not todo:
            return {"path": there["root"], "files": 0, "bytes": 0, "skipped": len(mine)}
        update, close = progress.bar(total, f"push {src.name}/", remote.show_progress)

        def stream() -> Any:
            import queue
            import threading

            q: queue.Queue = queue.Queue(16)
            sink = tarring.FrameSink(q.put)

            def produce() -> None:
                try:
                    tarring.write_tar(sink, str(src), todo)  # type: ignore[arg-type]
                    sink.close()
                finally:
                    q.put(None)

            threading.Thread(target=produce, daemon=True).start()
            while True:
                item = q.get()
                if item is None:
                    return
                yield item

        try:
            ans = conn.upload({"kind": "tar", "dest": dest, "size": 0, **common}, stream(), update, remote.codec)
        finally:
            close()
        return {"path": ans["path"], "files": ans["files"], "bytes": total, "skipped": len(mine) - len(todo)}
    size = src.stat().st_size
    st = conn.request("stat", path=dest, partial=True, **common)
    if remote.transport.name.startswith("local:") and st["exists"] and os.path.realpath(st["path"]) == str(src):
        return {"path": st["path"], "bytes": 0, "skipped": 1}
    offset = 0
    part = st.get("partial")
    if part and 0 < part["size"] <= size and part["sha256"] == _sha256_prefix(src, part["size"]):
        offset = part["size"]
    update, close = progress.bar(size - offset, f"push {src.name}", remote.show_progress)
    try:
        mode = src.stat().st_mode & 0o777
        ans = conn.upload({"kind": "file", "dest": dest, "size": size, "offset": offset, "mode": mode,
                           "mtime": src.stat().st_mtime, **common}, _file_chunks(src, offset), update, remote.codec)
    finally:
        close()
    return {"path": ans["path"], "bytes": size - offset, "resumed_from": offset}


def pull(remote: Remote, path: str, local: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Copy a file or folder from the target to ``local`` (default: its base name here)."""
    if not str(path).strip():
        raise ValueError("pull: name the file or folder on the target")
    conn = remote.connection()
    common = {"cwd": remote.cwd}
    there = conn.request("list_tree", path=path, **common)
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
        update, close = progress.bar(total, f"pull {dest.name}/", remote.show_progress)
        from .api import CallReader

        try:
            reader = CallReader(conn.start("tar_stream", path=path, files=todo, z=remote.codec, **common))
            count = tarring.extract_tar(reader, str(dest), update)  # type: ignore[arg-type]
            reader.drain()
        finally:
            close()
        return {"path": str(dest), "files": count, "bytes": total, "skipped": len(there["files"]) - len(todo)}
    _, size, mode, mtime = there["files"][0]
    if dest.is_dir():
        dest = dest / Path(there["root"]).name
    if remote.transport.name.startswith("local:") and str(dest) == os.path.realpath(there["root"]):
        return {"path": str(dest), "bytes": 0, "skipped": 1}
    part = Path(str(dest) + tarring.PART)
    offset = 0
    if part.exists() and 0 < part.stat().st_size <= size:
        have = part.stat().st_size
        if conn.request("hash_prefix", path=path, size=have, **common)["sha256"] == _sha256_prefix(part, have):
            offset = have
    update, close = progress.bar(size - offset, f"pull {dest.name}", remote.show_progress)
    try:
        with open(part, "r+b" if offset else "wb") as f:
            f.truncate(offset)
            f.seek(offset)
            for _, payload in conn.start("read_file", path=path, offset=offset, z=remote.codec, **common):
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
