"""The client's connection reader: object downloads are assembled in the value's memory.

The peer here is a scripted agent on a socketpair that sends chosen frames (a real agent never
sends a broken object file); the pulls through real agents are in test_data_path.py.
"""

from __future__ import annotations

import random
import socket
import threading
from typing import Any, Callable

import numpy as np
import pytest

from remotemagic import errors
from remotemagic.agent import files, wire
from remotemagic.connection import AgentConnection, read_streamed_object


class SocketStream:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def readinto(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
        except OSError:
            return 0

    def write(self, data: Any) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
        except OSError:
            pass
        self.sock.close()


Script = Callable[[dict[str, Any], wire.FrameWriter], None]


@pytest.fixture
def scripted() -> Any:
    """``connect(script)``: a connection whose peer answers each request with ``script``."""
    opened: list[tuple[AgentConnection, socket.socket, threading.Thread]] = []

    def connect(script: Script) -> AgentConnection:
        ours, theirs = socket.socketpair()
        peer = SocketStream(theirs)
        out = wire.FrameWriter(peer.write)

        def serve() -> None:
            try:
                while True:
                    request, _ = wire.read_frame(peer.readinto)
                    script(request, out)
            except (wire.ConnectionLost, OSError):
                theirs.close()  # the agent is gone: so is its end of the link

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        conn = AgentConnection(SocketStream(ours), "scripted")
        opened.append((conn, theirs, t))
        return conn

    yield connect
    for conn, theirs, t in opened:
        conn.close()
        theirs.close()
        t.join(5)


def object_bytes(value: Any) -> bytes:
    return b"".join(bytes(p) for p in files.encode(value).parts())


def send_in_frames(out: wire.FrameWriter, rid: int, data: bytes, sizes: list[int], codec: str | None = None) -> None:
    packer = wire.Packer(codec) if codec else None
    at = 0
    for n in sizes:
        chunk = data[at : at + n]
        at += n
        header: dict[str, Any] = {"id": rid, "more": True}
        if packer is not None and random.random() < 0.5:  # packed and raw frames mixed
            chunk, z = packer.pack(chunk)
            if z:
                header["z"] = z
        out.send(header, chunk)
    assert at >= len(data)


def random_sizes(total: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.choice([1, 7, 64, 4096, 65_537, 300_000]))
    return sizes


VALUES = [
    12,
    "text" * 1000,
    np.arange(1_000_000, dtype=np.int64),
    {"a": np.ones(100_000), "b": [np.zeros(70_000, dtype=np.uint8), bytearray(200_000)], "c": np.empty(0)},
]


@pytest.mark.parametrize("codec", [None, "zlib"])
@pytest.mark.parametrize("index", range(len(VALUES)))
def test_a_value_arrives_whole_in_frames_of_any_size(scripted: Any, index: int, codec: str | None) -> None:
    value = VALUES[index]
    data = object_bytes(value)

    def script(req: dict[str, Any], out: wire.FrameWriter) -> None:
        send_in_frames(out, req["id"], data, random_sizes(len(data), index), codec)
        out.send({"id": req["id"], "ok": True, "result": {"size": len(data)}})

    conn = scripted(script)
    counted: list[int] = []
    call = conn.start_object("read_output")
    got = read_streamed_object(call, counted.append)
    assert sum(counted) == len(data)  # progress sees every byte
    assert call.result == {"size": len(data)}
    if isinstance(value, dict):
        np.testing.assert_array_equal(got["a"], value["a"])
        assert got["b"][1] == value["b"][1] and got["c"].size == 0
    elif isinstance(value, np.ndarray):
        np.testing.assert_array_equal(got, value)
        assert got.flags.writeable  # the array owns writable memory, as a local one does
    else:
        assert got == value


def test_bytes_that_are_not_a_value_fail_that_call_only(scripted: Any) -> None:
    good = object_bytes(np.arange(300_000))
    bad = b"NOTANOBJECTFILE" + bytes(500_000)

    def script(req: dict[str, Any], out: wire.FrameWriter) -> None:
        payload = {"bad": bad, "good": good, "long": good + b"trailing"}[req["what"]]
        send_in_frames(out, req["id"], payload, random_sizes(len(payload), 3))
        out.send({"id": req["id"], "ok": True, "result": None})

    conn = scripted(script)
    with pytest.raises(ValueError, match="bad magic"):
        read_streamed_object(conn.start_object("read_output", what="bad"))
    with pytest.raises(ValueError, match="8 bytes more than the object holds"):
        read_streamed_object(conn.start_object("read_output", what="long"))
    # the link is in step: the next download on it arrives whole
    np.testing.assert_array_equal(read_streamed_object(conn.start_object("read_output", what="good")),
                                  np.arange(300_000))


@pytest.mark.parametrize("final, raised, message", [
    ({"ok": False, "error": {"type": "FileNotFoundError", "message": "y was removed"}}, FileNotFoundError,
     "y was removed"),  # the agent's own error wins over the cut value
    ({"ok": True, "result": None}, ValueError, "truncated"),  # no error from the agent: the value is cut short
])
def test_a_value_cut_short(scripted: Any, final: dict[str, Any], raised: type, message: str) -> None:
    data = object_bytes(np.arange(300_000))

    def script(req: dict[str, Any], out: wire.FrameWriter) -> None:
        send_in_frames(out, req["id"], data[:100_000], [65_536, 100_000 - 65_536])
        out.send({"id": req["id"], **final})

    conn = scripted(script)
    with pytest.raises(raised, match=message):
        read_streamed_object(conn.start_object("read_output"))


def test_a_lost_link_mid_value_raises_connection_lost(scripted: Any) -> None:
    data = object_bytes(np.arange(300_000))

    def script(req: dict[str, Any], out: wire.FrameWriter) -> None:
        out.send({"id": req["id"], "more": True}, data[:50_000])
        raise OSError("the agent dies")

    conn = scripted(script)
    with pytest.raises(errors.ConnectionLostError):
        read_streamed_object(conn.start_object("read_output"))
