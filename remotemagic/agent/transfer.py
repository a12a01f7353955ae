"""Files and folders on the move: safe tar extraction and tar streams, shared by both ends.

Folders travel as one uncompressed tar stream of just the files that differ, so ten thousand
small files cost one stream, not ten thousand round trips. Each extracted file is written to
``<name>.rmpart`` and renamed when complete: an interrupted transfer never leaves a truncated
file under its real name, and the next transfer skips every file that did arrive.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any, BinaryIO, Callable, Iterable

PART = ".rmpart"


def tree(top: str) -> dict[str, Any]:
    """Regular files under ``top`` as ``[relpath, size, mode, mtime]`` (or ``top`` itself)."""
    if not os.path.exists(top):
        raise FileNotFoundError(f"{top} does not exist")
    if not os.path.isdir(top):
        st = os.stat(top)
        return {"root": top, "dir": False, "files": [["", st.st_size, st.st_mode & 0o777, st.st_mtime]]}
    entries = []
    for base, dnames, fnames in os.walk(top):
        dnames.sort()
        for fname in sorted(fnames):
            if fname.endswith(PART):
                continue
            p = os.path.join(base, fname)
            if os.path.isfile(p) and not os.path.islink(p):
                st = os.stat(p)
                entries.append([os.path.relpath(p, top), st.st_size, st.st_mode & 0o777, st.st_mtime])
    return {"root": top, "dir": True, "files": entries}


def differing(src: list[list[Any]], dest: list[list[Any]]) -> list[list[Any]]:
    """Entries of ``src`` that ``dest`` lacks or has with another size or mtime."""
    have = {e[0]: (e[1], int(e[3])) for e in dest}
    return [e for e in src if have.get(e[0]) != (e[1], int(e[3]))]


def write_tar(out: BinaryIO, top: str, entries: Iterable[list[Any]]) -> None:
    """Stream the given files of ``top`` as a tar (``out`` needs only ``write``)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=256 * 1024) as tar:
        for rel, *_ in entries:
            path = os.path.join(top, rel)
            info = tar.gettarinfo(path, arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)


def _safe_target(dest: str, name: str) -> str:
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"refusing tar member {name!r}: it would land outside {dest}")
    return os.path.join(dest, name)


def extract_tar(stream: BinaryIO, dest: str, on_file: Callable[[int], None] | None = None) -> int:
    """Extract regular files and folders from a tar stream into ``dest``; return files written.

    Links, devices and any member outside ``dest`` are refused."""
    os.makedirs(dest, exist_ok=True)
    count = 0
    with tarfile.open(fileobj=stream, mode="r|", bufsize=256 * 1024) as tar:
        for member in tar:
            target = _safe_target(dest, member.name)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            if not member.isfile():
                raise ValueError(f"refusing tar member {member.name!r}: only files and folders travel")
            os.makedirs(os.path.dirname(target) or dest, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            part = target + PART
            with open(part, "wb") as f:
                while True:
                    chunk = src.read(1024 * 1024)
                    if not chunk:
                        break
                    f.write(chunk)
            os.chmod(part, member.mode & 0o777)
            os.utime(part, (member.mtime, member.mtime))
            os.replace(part, target)
            count += 1
            if on_file:
                on_file(member.size)
    return count


class FrameSink:
    """A write-only file object that sends what it is given in frames of ``size`` bytes."""

    def __init__(self, send: Callable[[bytes], None], size: int = 256 * 1024):
        self.send = send
        self.size = size
        self.buf = bytearray()

    def write(self, data: Any) -> int:
        self.buf += data
        while len(self.buf) >= self.size:
            self.send(bytes(self.buf[: self.size]))
            del self.buf[: self.size]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.buf:
            self.send(bytes(self.buf))
            self.buf.clear()
