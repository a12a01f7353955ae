"""A port forward that outlives its SSH link: 127.0.0.1:<port> here -> host:port seen from a target.

:class:`~remotemagic.tunnel.Tunnel` rides on one paramiko transport: when that link drops,
its port stays bound but leads nowhere. The cluster's scheduler and dashboard must stay at the
same local address for the life of the cluster (the notebook's ``Client`` reconnects to the
address it knows), so this forward opens a ``direct-tcpip`` channel on the target's *current*
link for each new connection, reconnecting the link when it died. A connection made while the
target is unreachable is closed at once; the next one, after the link is back, goes through.
The local end is always bound to 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)
CHUNK = 256 * 1024
OPEN_TIMEOUT = 15.0


class LinkForward:
    """Forward ``127.0.0.1:local_port`` to ``remote_host:remote_port`` through ``transport``
    (an SSH transport of ours: its ``link()`` reconnects)."""

    def __init__(self, transport: Any, remote_port: int, remote_host: str = "127.0.0.1", local_port: int = 0):
        self.transport = transport
        self.remote_host = remote_host
        self.remote_port = int(remote_port)
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", local_port))
        self._server.listen(64)
        self.local_port: int = self._server.getsockname()[1]
        self._closed = threading.Event()
        self._open: set[Any] = set()
        self._links: dict[Any, tuple[Any, int]] = {}  # local socket -> (SSH transport of its channel, peer port)
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"remotemagic-forward-{self.local_port}", daemon=True).start()

    @property
    def active(self) -> bool:
        return not self._closed.is_set()

    def _channel(self, peer: tuple[str, int]) -> Any:
        link = self.transport.link()
        for attempt in range(2):
            try:
                return link.transport.open_channel("direct-tcpip", (self.remote_host, self.remote_port), peer,
                                                   timeout=OPEN_TIMEOUT)
            except Exception as exc:
                if attempt:
                    raise
                log.info("forward %d: link unusable (%s); reconnecting", self.local_port, exc)
                link = self.transport.link(stale=link)
        raise AssertionError("unreachable")

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, peer = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            chan = self._channel(peer)
        except Exception as exc:
            log.info("forward %d -> %s:%d: %s", self.local_port, self.remote_host, self.remote_port, exc)
            sock.close()
            return
        with self._lock:
            self._open.update((sock, chan))
            self._links[sock] = (chan.get_transport(), peer[1])
        t = threading.Thread(target=self._pump, args=(chan.recv, sock.sendall, sock, chan), daemon=True)
        t.start()
        self._pump(sock.recv, chan.sendall, sock, chan)
        t.join()
        with self._lock:
            self._open.difference_update((sock, chan))
            self._links.pop(sock, None)

    @staticmethod
    def _pump(read: Any, write: Any, sock: socket.socket, chan: Any) -> None:
        try:
            while True:
                data = read(CHUNK)
                if not data:
                    break
                write(data)
        except Exception:
            pass
        finally:  # either side ending ends both
            for end in (sock, chan):
                try:
                    end.close()
                except Exception:
                    pass

    def drop_stale(self) -> set[int]:
        """Close the connections whose channel is on a link that is not the live one any more
        (after a drop): their far end is gone, and the local peer should learn it now, not when
        its next write fails. Returns the local ports of the peers whose connections remain open
        on the live link."""
        with self._lock:
            links = dict(self._links)
        if not links:
            return set()
        live = self.transport.link().transport
        alive: set[int] = set()
        for sock, (t, port) in links.items():
            if t is live and t.is_active() and sock.fileno() != -1:
                alive.add(port)
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        return alive

    def close(self) -> None:
        self._closed.set()
        try:
            self._server.close()
        except OSError:
            pass
        with self._lock:
            ends, self._open = list(self._open), set()
        for end in ends:
            try:
                end.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<LinkForward 127.0.0.1:{self.local_port} -> {self.remote_host}:{self.remote_port}>"
