"""The client side of the agent protocol: many concurrent requests over one byte stream.

A reader thread sorts incoming frames by request id into per-request queues. Data frames of a
download are bounded per request (backpressure goes all the way to the SSH window), so pulling
a large value never buffers more than a few MiB in memory.
"""

from __future__ import annotations

import io
import itertools
import logging
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Protocol

from . import errors
from .agent import files, protocol, wire

log = logging.getLogger("remotemagic")

_LOST = object()
QUEUE_FRAMES = 64  # 64 frames of <= 1 MiB each


class AgentStream(Protocol):
    """A bidirectional byte stream to a running agent (a pipe, an SSH channel)."""

    def readinto(self, view: memoryview) -> int: ...

    def write(self, data: Any) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _wake(q: queue.Queue) -> None:
    """Put the end-of-stream marker in ``q`` (a consumer this far behind re-reads on its own:
    if the queue is full, one frame makes room for the news)."""
    try:
        q.put_nowait(_LOST)
    except queue.Full:
        try:
            q.get_nowait()
        except queue.Empty:
            pass
        try:
            q.put_nowait(_LOST)
        except queue.Full:
            pass


class Call:
    """One request in flight. Iterate for its data frames; ``result`` once it has ended."""

    def __init__(self, conn: "AgentConnection", rid: int, assembler: files.ObjectAssembler | None = None):
        self.conn = conn
        self.id = rid
        self.queue: queue.Queue = queue.Queue(QUEUE_FRAMES)
        self.result: Any = None
        self.payload: bytes = b""
        self.done = False
        #: set by :meth:`AgentConnection.start_object`: the reader thread builds the streamed value
        #: in it, and queues only ``{"more": true, "placed": n}`` markers for the data frames
        self.assembler = assembler
        self.assembly_error: Exception | None = None  # the bytes were not a value (set by the reader)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], bytearray]]:
        try:
            while True:
                item = self.queue.get()
                if item is _LOST:
                    raise errors.ConnectionLostError(f"connection to {self.conn.name} lost")
                header, payload = item
                if header.get("more"):
                    if header.get("z"):
                        payload = bytearray(wire.unpack(payload, header["z"]))
                    yield header, payload
                    continue
                self.done = True
                if not header.get("ok"):
                    raise errors.from_agent(header.get("error") or {})
                self.result = header.get("result")
                self.payload = bytes(payload)
                return
        finally:
            if not self.done:
                self.abandon()

    def wait(self) -> Any:
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Abandon the stream and wake a consumer blocked on it (it gets ConnectionLostError)."""
        self.abandon()
        _wake(self.queue)

    def abandon(self) -> None:
        """Stop listening (e.g. after Ctrl-C): ask the agent to stop streaming, drop frames."""
        self.conn.calls.pop(self.id, None)
        if not self.done and not self.conn.lost:
            try:
                self.conn.writer.send({"id": 0, "op": protocol.OP_CANCEL_STREAM, "target": self.id})
            except OSError:
                pass


class AgentConnection:
    """An open conversation with one agent."""

    def __init__(self, stream: AgentStream, name: str):
        self.stream = stream
        self.name = name
        self.writer = wire.FrameWriter(self._write, stream.flush)
        self.calls: dict[int, Call] = {}
        self.ids = itertools.count(1)
        self.lost = False
        self.bytes_sent = 0  # on the wire, after compression: what the link carried
        self.bytes_received = 0
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, name=f"remotemagic-reader-{name}", daemon=True)
        self.reader.start()

    def _write(self, data: Any) -> None:
        if self.lost:
            raise errors.ConnectionLostError(f"connection to {self.name} lost")
        try:
            self.stream.write(data)
            self.bytes_sent += len(data)
        except (OSError, EOFError, ValueError) as exc:
            self._mark_lost()
            raise errors.ConnectionLostError(f"connection to {self.name} lost: {exc}") from exc

    def _read(self) -> None:
        try:
            while True:
                header, plen = wire.read_header(self.stream.readinto)
                self.bytes_received += plen + wire.HEAD.size
                call = self.calls.get(header.get("id", -1))
                if call is not None and call.assembler is not None and plen and header.get("more"):
                    header, payload = self._assemble(call, header, plen), bytearray()
                else:
                    payload = wire.read_exact(self.stream.readinto, plen) if plen else bytearray()
                if call is None:
                    continue  # an abandoned stream's late frames
                if not header.get("more"):
                    self.calls.pop(call.id, None)
                while True:
                    try:
                        call.queue.put((header, payload), timeout=0.5)
                        break
                    except queue.Full:
                        if call.id not in self.calls and header.get("more"):
                            break  # abandoned while we waited
        except (wire.ConnectionLost, OSError, ValueError) as exc:
            log.debug("reader for %s ended: %s", self.name, exc)
        finally:
            self._mark_lost()

    def _assemble(self, call: Call, header: dict[str, Any], plen: int) -> dict[str, Any]:
        """Read a data frame of an object download straight into the value's memory (a packed
        frame is unpacked first); return the marker queued in its place. If the bytes are not a
        value, the rest of the call's bytes are read and dropped: the consumer raises."""
        readinto, asm = self.stream.readinto, call.assembler
        assert asm is not None
        if header.get("z"):
            packed = wire.read_exact(readinto, plen)
            if call.assembly_error is not None:
                return {"more": True, "placed": plen}
            try:
                data = wire.unpack(packed, header["z"])
                asm.feed(data)
            except Exception as exc:  # a corrupt frame, a codec error: this call fails, the link lives
                call.assembly_error = ValueError(f"a data frame could not be read: {exc}")
                return {"more": True, "placed": plen}
            return {"more": True, "placed": len(data)}
        left = plen
        while left:
            view = asm.want() if call.assembly_error is None else None
            if view is None:
                if call.assembly_error is None:
                    call.assembly_error = ValueError(f"{left} bytes more than the object holds")
                wire.read_exact(readinto, left)
                break
            k = readinto(view[:left])
            if not k:
                raise wire.ConnectionLost(f"stream ended {left} bytes before the end of a frame")
            left -= k
            try:
                asm.filled(k)
            except ValueError as exc:  # not an object file
                call.assembly_error = exc
        return {"more": True, "placed": plen}

    def _mark_lost(self) -> None:
        with self.lock:
            if self.lost:
                return
            self.lost = True
            pending = list(self.calls.values())
            self.calls.clear()
        for call in pending:
            _wake(call.queue)

    def start(self, op: str, **args: Any) -> Call:
        """Send request ``op`` with ``args``; iterate the returned :class:`Call` for its answer."""
        return self._start(op, args, None)

    def start_object(self, op: str, **args: Any) -> Call:
        """Like :meth:`start`, for a request that streams an object file: the reader thread reads
        its data frames straight into the value's final memory (see :func:`read_streamed_object`)."""
        return self._start(op, args, files.ObjectAssembler())

    def _start(self, op: str, args: dict[str, Any], assembler: files.ObjectAssembler | None) -> Call:
        if self.lost:
            raise errors.ConnectionLostError(f"connection to {self.name} lost")
        call = Call(self, next(self.ids), assembler)
        self.calls[call.id] = call
        self.writer.send({"id": call.id, "op": op, **args})
        return call

    def request(self, op: str, **args: Any) -> Any:
        """Send request ``op`` and wait for its answer (the result of a call without data frames)."""
        return self.start(op, **args).wait()

    def upload(self, begin: dict[str, Any], chunks: Iterable[Any], progress: Callable[[int], None] | None = None,
               codec: str | None = None) -> Any:
        """Send ``upload_begin``, the chunks as data frames (compressed with ``codec`` where that
        pays), ``upload_end``; return the answer."""
        call = self.start(protocol.OP_UPLOAD_BEGIN, **begin)
        packer = wire.Packer(codec) if codec else None
        for chunk in chunks:
            if call.id not in self.calls:  # the agent refused early
                break
            header: dict[str, Any] = {"id": call.id, "op": protocol.OP_DATA}
            payload = chunk
            if packer is not None:
                payload, z = packer.pack(chunk)
                if z:
                    header["z"] = z
            self.writer.send(header, payload)
            if progress:
                progress(len(chunk))
        if call.id in self.calls:
            self.writer.send({"id": call.id, "op": protocol.OP_UPLOAD_END})
        return call.wait()

    def close(self) -> None:
        self._mark_lost()  # wakes every call still waiting (it gets ConnectionLostError): the
        # reader's own _mark_lost, once the stream is closed, finds the connection lost already
        try:
            self.stream.close()
        except Exception:
            pass


class CallReader(io.RawIOBase):
    """A file-like view of a streaming call's data frames (to unpickle without a second copy)."""

    def __init__(self, call: Call, on_bytes: Callable[[int], None] | None = None):
        self.it = iter(call)
        self.buf = memoryview(b"")
        self.on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            try:
                _, payload = next(self.it)
            except StopIteration:
                return 0
            self.buf = memoryview(payload)
            if self.on_bytes:
                self.on_bytes(len(payload))
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def drain(self) -> None:
        """Read the call to its end (its final answer: raises the agent's error, if any)."""
        for _ in self.it:
            pass


def read_streamed_object(call: Call, on_bytes: Callable[[int], None] | None = None) -> Any:
    """The value a call streams as data frames (an object file, see
    :func:`remotemagic.agent.files.read_object`), once the call has ended. A call from
    :meth:`AgentConnection.start_object` is assembled by the reader thread (its frames here are
    byte counts for ``on_bytes``); another one is unpickled from its frames here. If the bytes are
    not a value, the rest of the call is read first: the agent's own error wins."""
    if call.assembler is None:
        reader = CallReader(call, on_bytes)
        try:
            value = files.read_object(reader)
        except ValueError:
            reader.drain()
            raise
        reader.drain()
        return value
    for header, _ in call:
        if on_bytes:
            on_bytes(header.get("placed", 0))
    if call.assembly_error is not None:
        raise call.assembly_error
    return call.assembler.value()
