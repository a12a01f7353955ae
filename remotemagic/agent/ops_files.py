"""Op handlers for the target's files: stat, list_tree, tar_stream, hash_prefix, read_file.

Also the helpers every op that streams a file uses (:func:`stream_file`, :func:`check_object`).
Paths are the user's (:func:`user_path`: ``~`` expanded, relative to ``cwd``, default home).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, BinaryIO

from . import files, transfer, wire
from . import protocol as P
from .protocol import RequestError

if TYPE_CHECKING:
    from .server import Agent


def user_path(path: str, cwd: str | None = None) -> str:
    """A user-given path on the target: ``~`` expanded, relative to ``cwd`` (default home)."""
    base = os.path.expanduser(cwd or "~")
    return os.path.abspath(os.path.join(base, os.path.expanduser(path)))


def check_object(f: BinaryIO, path: str) -> None:
    """Refuse to serve an object file (a pickle: code) that another user owns or could write."""
    try:
        files.check_object_file(f, path)
    except PermissionError as exc:
        raise RequestError(str(exc), "UnsafeObject") from None


def stream_file(agent: Agent, rid: int, path: str, offset: int, packer: wire.Packer | None = None,
                pickle: bool = False) -> dict[str, Any]:
    """Send a file as data frames. ``pickle``: it is an object file the client will unpickle,
    so it (and its folder) must be ours and writable by nobody else."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise RequestError(f"{path} does not exist on the target", "FileNotFoundError") from None
    with f:
        if pickle:
            check_object(f, path)
        st = os.fstat(f.fileno())
        f.seek(offset)
        buf = bytearray(wire.CHUNK)
        view = memoryview(buf)
        while rid not in agent.cancelled:
            n = f.readinto(buf)
            if not n:
                break
            agent.more(rid, {}, view[:n], packer)
    return {"size": st.st_size, "mode": st.st_mode & 0o777, "mtime": st.st_mtime}


def stat(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    path = user_path(req["path"], req.get("cwd"))
    out: dict[str, Any] = {"path": path, "real": os.path.realpath(path), "exists": os.path.exists(path)}
    if out["exists"]:
        st = os.stat(path)
        out.update(size=st.st_size, mode=st.st_mode & 0o777, is_dir=os.path.isdir(path))
    part = path + transfer.PART
    if req.get("partial") and os.path.exists(part):
        digest, size = files.sha256_prefix(part)
        out["partial"] = {"size": size, "sha256": digest}
    return out


def list_tree(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    top = user_path(req["path"], req.get("cwd"))
    if not os.path.exists(top):
        if req.get("missing_ok"):
            return {"root": top, "dir": None, "files": []}
        raise RequestError(f"{top} does not exist on the target", "FileNotFoundError")
    return transfer.tree(top)


def tar_stream(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """Stream a tar of the listed files of a folder as data frames."""
    top = user_path(req["path"], req.get("cwd"))
    packer = agent.packer(req)
    sink = transfer.FrameSink(lambda chunk: agent.more(rid, {}, chunk, packer))
    transfer.write_tar(sink, top, req["files"])  # type: ignore[arg-type]
    sink.close()
    return {"files": len(req["files"])}


def hash_prefix(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """sha256 of the first ``size`` bytes of a file (to check a partial download)."""
    digest, size = files.sha256_prefix(user_path(req["path"], req.get("cwd")), int(req["size"]))
    return {"sha256": digest, "size": size}


def read_file(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return stream_file(agent, rid, user_path(req["path"], req.get("cwd")), int(req.get("offset", 0)),
                       agent.packer(req))


HANDLERS = {
    P.OP_STAT: stat,
    P.OP_LIST_TREE: list_tree,
    P.OP_TAR_STREAM: tar_stream,
    P.OP_HASH_PREFIX: hash_prefix,
    P.OP_READ_FILE: read_file,
}
