"""Port forwards to a target with sshtunnel, over the connection remotemagic already has.

sshtunnel would normally open a second SSH connection of its own, without our host-key checks
and without ProxyJump. Here its forwarder rides on the verified, authenticated paramiko
transport of the target's link (through every jump host), and only its forward servers are
stopped when a tunnel closes. The local end is always bound to 127.0.0.1. A :class:`Tunnel` is
the SSH transport's ``Forward`` (see ``transport.base``).
"""

from __future__ import annotations

import logging
import socket

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency
import sshtunnel  # type: ignore[import-untyped]

log = logging.getLogger(__name__)


class _ForwarderOnLink(sshtunnel.SSHTunnelForwarder):
    """sshtunnel's forwarder, riding on an existing authenticated paramiko transport."""

    def __init__(self, transport: paramiko.Transport, remote_port: int, local_port: int, remote_host: str):
        self._shared_transport = transport
        super().__init__(
            ("127.0.0.1", 22),  # not used: the gateway connection is the link's
            ssh_username="unused",
            ssh_password="unused",
            ssh_config_file=None,
            allow_agent=False,
            host_pkey_directories=[],
            remote_bind_address=(remote_host, remote_port),
            local_bind_address=("127.0.0.1", local_port),
            logger=log,
            set_keepalive=0,
        )

    def _connect_to_gateway(self) -> None:
        self._transport = self._shared_transport

    def _stop_transport(self, force: bool = False) -> None:
        for srv in self._server_list:
            srv.shutdown()
            srv.server_close()
        self.is_alive = False


class Tunnel:
    """One forward: ``127.0.0.1:local_port`` here -> ``remote_host:remote_port`` on the target."""

    def __init__(self, transport: paramiko.Transport, remote_port: int, local_port: int = 0,
                 remote_host: str = "127.0.0.1"):
        if not 0 < remote_port < 65536:
            raise ValueError(f"remote port {remote_port} is not a TCP port")
        if local_port and not 0 < local_port < 65536:
            raise ValueError(f"local port {local_port} is not a TCP port")
        if local_port:
            _check_free(local_port)
        self.remote_port = remote_port
        self.remote_host = remote_host
        self._fwd = _ForwarderOnLink(transport, remote_port, local_port, remote_host)
        self._fwd.start()
        self.local_port: int = self._fwd.local_bind_port
        log.info("tunnel 127.0.0.1:%d -> %s:%d on the target", self.local_port, remote_host, remote_port)

    @property
    def active(self) -> bool:
        """Whether the forward still runs."""
        return bool(self._fwd.is_alive and self._fwd.is_active)

    @property
    def url(self) -> str:
        """The local end as an HTTP address."""
        return f"http://127.0.0.1:{self.local_port}/"

    def close(self) -> None:
        """Stop the forward's servers (the link it rode on stays open)."""
        self._fwd.stop()

    def __repr__(self) -> str:
        state = "open" if self.active else "closed"
        return f"<Tunnel 127.0.0.1:{self.local_port} -> {self.remote_host}:{self.remote_port} ({state})>"


def _check_free(port: int) -> None:
    """ValueError naming the port when something here listens on ``127.0.0.1:port`` already."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError as exc:
        raise ValueError(f"local port {port} is already in use on 127.0.0.1: pick another or omit it") from exc
    finally:
        s.close()

