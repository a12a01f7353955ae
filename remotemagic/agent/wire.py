"""Frames on a byte stream: ``>II`` (header length, payload length), a JSON header, a payload.

Every request carries an integer ``id``; every answer frame carries the same id. An answer is
either an intermediate data frame (``"more": true``) or the final one (``"ok": true|false``).
Payloads are raw bytes (chunks of a file, of a pickle, of an event log), never re-encoded.
"""

from __future__ import annotations

import json
import struct
import threading
from typing import Any, BinaryIO, Callable

HEAD = struct.Struct(">II")
CHUNK = 256 * 1024  # paramiko's Channel.sendall is quadratic on big buffers: stay at 256 KiB
MAX_HEADER = 16 * 1024 * 1024


class ConnectionLost(EOFError):
    """The byte stream ended (EOF or an I/O error) in the middle of the conversation."""


def read_exact(readinto: Callable[[memoryview], int], n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = readinto(view[got:])
        if not k:
            raise ConnectionLost(f"stream ended after {got} of {n} bytes")
        got += k
    return buf


def read_header(readinto: Callable[[memoryview], int]) -> tuple[dict[str, Any], int]:
    """Read the head and header of the next frame; return the header and the payload's length
    (the payload is next on the stream). Raise ConnectionLost at a clean or unclean end of stream."""
    hlen, plen = HEAD.unpack(read_exact(readinto, HEAD.size))
    if hlen > MAX_HEADER:
        raise ConnectionLost(f"corrupt frame header ({hlen} bytes)")
    return json.loads(read_exact(readinto, hlen)), plen


def read_frame(readinto: Callable[[memoryview], int]) -> tuple[dict[str, Any], bytearray]:
    """Read one frame; raise ConnectionLost at a clean or unclean end of stream."""
    header, plen = read_header(readinto)
    return header, read_exact(readinto, plen) if plen else bytearray()


class FrameWriter:
    """Writes whole frames, one at a time, from any thread."""

    def __init__(self, write: Callable[[Any], None], flush: Callable[[], None] | None = None):
        self._write = write
        self._flush = flush
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        h = json.dumps(header, separators=(",", ":")).encode()
        view = memoryview(payload).cast("B") if payload else memoryview(b"")
        with self._lock:
            self._write(HEAD.pack(len(h), len(view)) + h)
            for start in range(0, len(view), CHUNK):
                self._write(view[start : start + CHUNK])
            if self._flush:
                self._flush()


def fd_readinto(stream: BinaryIO) -> Callable[[memoryview], int]:
    """A readinto for a raw or buffered binary stream that returns 0 at EOF."""
    raw = getattr(stream, "readinto1", None) or getattr(stream, "readinto")  # noqa: B009 (BinaryIO lacks it)

    def readinto(view: memoryview) -> int:
        try:
            return raw(view) or 0
        except (OSError, ValueError):
            return 0

    return readinto


# -- compression of data frames ------------------------------------------------------------------
def codecs_available() -> list[str]:
    """Codecs this end can use, best first: zstd where the zstandard package is installed
    (optional on a target), zlib always (standard library)."""
    out = []
    try:
        import zstandard  # noqa: F401

        out.append("zstd")
    except ImportError:
        pass
    out.append("zlib")
    return out


class Packer:
    """Compresses data chunks with ``codec``; chunks that do not shrink by 10 % travel raw,
    and after a run of those it stops trying for a while (random or already-compressed data
    costs almost nothing)."""

    RAW_RUN = 4
    PAUSE = 64

    def __init__(self, codec: str):
        self.codec = codec
        self.raw_run = 0
        self.skip = 0
        if codec == "zstd":
            import zstandard

            self._compress = zstandard.ZstdCompressor(level=1).compress
        elif codec == "zlib":
            import zlib

            self._compress = lambda data: zlib.compress(data, 1)
        else:
            raise ValueError(f"unknown codec {codec!r}")

    def pack(self, chunk: Any) -> tuple[Any, str | None]:
        if self.skip:
            self.skip -= 1
            return chunk, None
        packed = self._compress(chunk)
        if len(packed) < 0.9 * len(chunk):
            self.raw_run = 0
            return packed, self.codec
        self.raw_run += 1
        if self.raw_run >= self.RAW_RUN:
            self.raw_run = 0
            self.skip = self.PAUSE
        return chunk, None


def unpack(payload: Any, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(payload)
    if codec == "zlib":
        import zlib

        return zlib.decompress(payload)
    raise ValueError(f"unknown codec {codec!r}")
