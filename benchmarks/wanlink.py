"""A user-space WAN link for benchmarks: a TCP relay on 127.0.0.1 with latency and a bandwidth cap.

    with WanLink(target_port=2222, delay=0.020, rate_mbit=200) as link:   # 40 ms RTT, 200 Mbit/s
        ...connect to 127.0.0.1:link.port...

    python benchmarks/wanlink.py --selftest              # measures RTT and throughput through it
    python benchmarks/wanlink.py --target 2222 --delay-ms 20 --rate-mbit 200 --duration 600

Each direction of each connection is modelled as a bottleneck followed by a delay line:

* a *pacer* (a token bucket holding one chunk) serialises the bytes at ``rate``: a chunk of n
  bytes leaves the bottleneck at ``max(now, last departure) + n / rate``; the bottleneck of
  each direction is shared by all connections through the link, as on a real one;
* a *delay line* then holds every chunk for ``delay`` after it left the bottleneck, so latency
  and throughput overlap as on a real link (a bulk transfer runs at ``rate``; a small message
  on an idle link arrives ``delay`` later) -- not one sleep per chunk, which would serialise
  them;
* buffers are bounded: the reader stops reading (and TCP flow control pushes back on the
  sender over loopback) while the bottleneck holds more than ``queue`` seconds of data or the
  delay line more than ``rate * delay`` plus one ``queue`` worth of bytes.

What it does not model: packet loss, TCP slow start and congestion control across the long
path (each side's TCP runs over loopback to the relay), and jitter. Application-level flow
control (SSH channel windows, request/response round trips) sees the full latency and rate,
which is what these benchmarks are about. The kernel's netem would be the better tool; it is
not available here. Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable

LOCAL = "127.0.0.1"
RECV = 32 * 1024  # a chunk: 1.3 ms of serialisation at 200 Mbit/s
SOCK_BUF = 256 * 1024  # the relay's own kernel buffers, kept small so queues stay in the model


class _Pacer:
    """The bottleneck of one direction of the link, shared by every connection through it."""

    def __init__(self, rate: float):
        self.rate = rate
        self.departure = 0.0  # when the last accepted byte leaves the bottleneck
        self.lock = threading.Lock()

    def reserve(self, n: int, now: float) -> float:
        """Queue n bytes arriving at ``now``; return when their last byte has left the bottleneck."""
        with self.lock:
            self.departure = max(now, self.departure) + n / self.rate
            return self.departure


class _Direction:
    """One direction of one relayed connection: src -> pacer -> delay line -> dst."""

    def __init__(self, link: WanLink, src: socket.socket, dst: socket.socket, name: str, pacer: _Pacer):
        self.link = link
        self.pacer = pacer
        self.src, self.dst = src, dst
        self.name = name
        self.line: collections.deque[tuple[float, bytes]] = collections.deque()
        self.line_bytes = 0
        self.cond = threading.Condition()
        self.eof = False
        self.dead = False
        self.bytes = 0
        self.max_line = int(link.rate * (link.delay + link.queue)) + 4 * RECV
        self.threads = [
            threading.Thread(target=self._read, name=f"wan-read-{name}", daemon=True),
            threading.Thread(target=self._write, name=f"wan-write-{name}", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        delay, queue, pacer = self.link.delay, self.link.queue, self.pacer
        try:
            while not self.dead:
                data = self.src.recv(RECV)
                now = time.monotonic()
                if not data:
                    break
                due = pacer.reserve(len(data), now) + delay
                with self.cond:
                    self.line.append((due, data))
                    self.line_bytes += len(data)
                    self.bytes += len(data)
                    self.cond.notify()
                    # bounded buffers: hold off reading while the delay line is full
                    while self.line_bytes > self.max_line and not self.dead:
                        self.cond.wait(0.05)
                # ...and while the bottleneck holds more than `queue` seconds of data
                backlog = pacer.departure - time.monotonic()
                if backlog > queue:
                    time.sleep(backlog - queue)
        except OSError:
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.line and not self.eof and not self.dead:
                        self.cond.wait(0.25)
                    if self.dead or (not self.line and self.eof):
                        break
                    due, data = self.line[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.cond:
                    self.line.popleft()
                    self.line_bytes -= len(data)
                    self.cond.notify()
                self.dst.sendall(data)
            if not self.dead:  # the sender closed its side: pass the FIN on, after the bytes
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.link._kill(self)
        finally:
            self.link._done(self)

    def stop(self) -> None:
        self.dead = True
        with self.cond:
            self.cond.notify_all()


class WanLink:
    """A relay from 127.0.0.1:``port`` (0: pick one) to 127.0.0.1:``target_port``.

    ``delay`` is one-way in seconds (RTT = 2 * delay); ``rate_mbit`` caps each direction.
    ``queue`` is how much the bottleneck may hold, in seconds of data at ``rate``.
    ``idle_timeout`` (seconds) closes the listener after that long without any connection.
    """

    def __init__(self, target_port: int, delay: float = 0.020, rate_mbit: float = 200.0, port: int = 0,
                 queue: float = 0.010, idle_timeout: float | None = None):
        self.target = (LOCAL, int(target_port))
        self.delay = float(delay)
        self.rate = rate_mbit * 1e6 / 8  # bytes per second
        self.queue = float(queue)
        self.pacers = (_Pacer(self.rate), _Pacer(self.rate))  # to the target, from the target
        self.idle_timeout = idle_timeout
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOCAL, port))
        self.listener.listen(64)
        self.listener.settimeout(0.25)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[tuple[socket.socket, socket.socket, _Direction, _Direction]] = []
        self.accepted = 0
        self.closed = threading.Event()
        self.last_activity = time.monotonic()
        self.thread = threading.Thread(target=self._accept, name="wan-accept", daemon=True)
        self.thread.start()

    @property
    def rtt(self) -> float:
        return 2 * self.delay

    def __enter__(self) -> WanLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                with self.lock:
                    idle = not self.conns
                if (idle and self.idle_timeout is not None
                        and time.monotonic() - self.last_activity > self.idle_timeout):
                    self.close()
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            with self.lock:
                self.accepted += 1
                n = self.accepted
                up = _Direction(self, client, upstream, f"{n}-up", self.pacers[0])
                down = _Direction(self, upstream, client, f"{n}-down", self.pacers[1])
                self.conns.append((client, upstream, up, down))
                self.last_activity = time.monotonic()

    def _kill(self, direction: _Direction) -> None:
        """A write failed (the far end is gone): close the whole connection."""
        with self.lock:
            hit = [c for c in self.conns if direction in c[2:]]
        for client, upstream, up, down in hit:
            up.stop()
            down.stop()
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _done(self, direction: _Direction) -> None:
        """Close a connection once both of its directions have finished."""
        with self.lock:
            for conn in list(self.conns):
                client, upstream, up, down = conn
                if direction in (up, down) and not any(t.is_alive() and t is not threading.current_thread()
                                                       for d in (up, down) for t in d.threads[1:]):
                    self.conns.remove(conn)
                    up.stop()
                    down.stop()
                    for s in (client, upstream):
                        with contextlib.suppress(OSError):
                            s.close()
            self.last_activity = time.monotonic()

    def close(self) -> None:
        """Stop accepting and drop every live connection."""
        self.closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for client, upstream, up, down in conns:
            up.stop()
            down.stop()
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()


# -- self-check -----------------------------------------------------------------------------------
class _TestServer:
    """On 127.0.0.1: echoes lines ('P' ping), swallows ('U' upload) or emits ('D<n>' download) bytes."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((LOCAL, 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.received: dict[int, float] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            kind = conn.recv(1)
            if kind == b"P":
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
            elif kind == b"U":  # count until EOF, then answer the count
                n = 0
                while True:
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    n += len(data)
                conn.sendall(str(n).encode())
            elif kind == b"D":
                n = int(conn.recv(64).decode())
                chunk = os.urandom(1 << 20)
                view = memoryview(chunk)
                left = n
                while left > 0:
                    conn.sendall(view[: min(left, len(chunk))])
                    left -= min(left, len(chunk))

    def close(self) -> None:
        self.listener.close()


def _ping(port: int, count: int = 20) -> list[float]:
    out = []
    with socket.create_connection((LOCAL, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"P")
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            out.append(time.perf_counter() - t0)
    return out


def _upload(port: int, nbytes: int) -> float:
    """Seconds from the first byte sent to the server's count arriving, minus one RTT... returned raw."""
    chunk = memoryview(os.urandom(1 << 20))
    with socket.create_connection((LOCAL, port)) as s:
        s.sendall(b"U")
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            s.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        s.shutdown(socket.SHUT_WR)
        answer = s.recv(64)
        elapsed = time.perf_counter() - t0
    assert int(answer) == nbytes, (answer, nbytes)
    return elapsed


def _download(port: int, nbytes: int) -> float:
    with socket.create_connection((LOCAL, port)) as s:
        t0 = time.perf_counter()
        s.sendall(b"D" + str(nbytes).encode())
        got = 0
        while got < nbytes:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        elapsed = time.perf_counter() - t0
    assert got == nbytes, (got, nbytes)
    return elapsed


def selftest(delay: float = 0.020, rate_mbit: float = 200.0, seconds: float = 4.0,
             say: Callable[[str], None] = print) -> dict[str, float]:
    """Measure the link: ping-pong RTT (idle and under a bulk transfer) and bulk rate both ways."""
    server = _TestServer()
    link = WanLink(server.port, delay=delay, rate_mbit=rate_mbit)
    try:
        rtts = _ping(link.port)
        nbytes = int(link.rate * seconds)
        # bulk time = serialisation + one-way delay (last byte) + the answer's way back
        up = _upload(link.port, nbytes)
        down = _download(link.port, nbytes)
        up_rate = nbytes / (up - 2 * delay) * 8 / 1e6
        down_rate = nbytes / (down - 2 * delay) * 8 / 1e6
        # a ping while a bulk upload runs: queueing stays bounded
        loaded: list[float] = []
        bulk = threading.Thread(target=_upload, args=(link.port, nbytes // 2), daemon=True)
        bulk.start()
        time.sleep(0.3)
        loaded = _ping(link.port, 10)
        bulk.join()
        res = {
            "rtt_target_ms": 2 * delay * 1000,
            "rtt_median_ms": statistics.median(rtts) * 1000,
            "rtt_min_ms": min(rtts) * 1000,
            "rtt_max_ms": max(rtts) * 1000,
            "rtt_loaded_median_ms": statistics.median(loaded) * 1000,
            "rate_target_mbit": rate_mbit,
            "upload_mbit": up_rate,
            "download_mbit": down_rate,
            "bytes": nbytes,
        }
        say(f"wanlink self-test: target RTT {res['rtt_target_ms']:.1f} ms, {rate_mbit:g} Mbit/s each way")
        say(f"  ping-pong RTT (64 B, n={len(rtts)}): median {res['rtt_median_ms']:.2f} ms "
            f"(min {res['rtt_min_ms']:.2f}, max {res['rtt_max_ms']:.2f})")
        say(f"  bulk upload   {nbytes / 1e6:.0f} MB: {up_rate:.1f} Mbit/s ({nbytes / (up - 2 * delay) / 1e6:.1f} MB/s)")
        say(f"  bulk download {nbytes / 1e6:.0f} MB: {down_rate:.1f} Mbit/s "
            f"({nbytes / (down - 2 * delay) / 1e6:.1f} MB/s)")
        say(f"  ping-pong RTT during an upload: median {res['rtt_loaded_median_ms']:.2f} ms")
        return res
    finally:
        link.close()
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--selftest", action="store_true", help="measure RTT and throughput through the link and exit")
    p.add_argument("--target", type=int, help="port on 127.0.0.1 to forward to")
    p.add_argument("--port", type=int, default=0, help="port to listen on (127.0.0.1; default: any free port)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (RTT = 2x); default 20")
    p.add_argument("--rate-mbit", type=float, default=200.0, help="bandwidth per direction; default 200")
    p.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds (default 600)")
    p.add_argument("--idle-timeout", type=float, default=None, help="stop after this long with no connection")
    args = p.parse_args(argv)
    if args.selftest:
        res = selftest(args.delay_ms / 1000, args.rate_mbit)
        ok_rtt = abs(res["rtt_median_ms"] - res["rtt_target_ms"]) <= max(2.0, 0.05 * res["rtt_target_ms"])
        ok_rate = min(res["upload_mbit"], res["download_mbit"]) >= 0.9 * args.rate_mbit and \
            max(res["upload_mbit"], res["download_mbit"]) <= 1.05 * args.rate_mbit
        print(f"  RTT {'OK' if ok_rtt else 'OFF'}, rate {'OK' if ok_rate else 'OFF'}")
        return 0 if ok_rtt and ok_rate else 1
    if args.target is None:
        p.error("--target PORT is required (or --selftest)")
    with WanLink(args.target, args.delay_ms / 1000, args.rate_mbit, args.port, idle_timeout=args.idle_timeout) as link:
        print(f"127.0.0.1:{link.port} -> 127.0.0.1:{args.target}, RTT {2 * args.delay_ms:g} ms, "
              f"{args.rate_mbit:g} Mbit/s each way; stops after {args.duration:g} s", flush=True)
        try:
            link.closed.wait(args.duration)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
