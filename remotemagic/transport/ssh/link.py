"""The SSH connection to a target: TCP or ProxyCommand, ProxyJump hops, handshake, keepalive, pool.

:func:`open_link` connects through every hop (the first over TCP or a ``ProxyCommand``, the next
ones over ``direct-tcpip`` channels of the previous hop), checks each host key against
known_hosts and authenticates, and returns a :class:`Link`. One live link per target is shared
by every transport to it (:data:`POOL`, refcounted); a dead one is replaced on the next use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency

from .auth import authenticate
from .config import HostConfig
from .errors import HostNotFoundError, UnreachableError
from .known_hosts import KnownHosts, verify_host_key

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_KEEPALIVE = 15
PREFERRED_CIPHER = "aes128-gcm@openssh.com"  # ~1.25x paramiko's default aes128-ctr (MEASUREMENTS 6)
# What the target may send before we acknowledge (paramiko's default: 2 MiB) and the largest
# packet it may send (default 32 KiB). paramiko spends its time per packet, so 255 KiB packets
# with an 8 MiB window read 256 MiB from a loopback sshd at 345-364 MB/s with 0.61-0.65 s of
# client CPU, where the defaults gave 227-267 MB/s and 0.88-1.16 s (docs/performance.md). A large
# window with small packets is worse than the defaults (106-152 MB/s: MEASUREMENTS.md item 4).
WINDOW = 8 * 1024 * 1024
MAX_PACKET = 255 * 1024  # the whole SSH packet must stay under OpenSSH's 256 KiB limit
# paramiko asks for new keys after 512 MiB each way, and a channel closed by the server while
# that exchange is pending stalls its transport thread for 30 s, then kills the connection
# (paramiko issue 822, open since 2016; reproduced here with exec channels: 2 of 2 tries). Leave
# rekeying to the server, which sends no channel message during its own exchange, up to RFC
# 4344's limit for 128-bit block ciphers (2**32 blocks, 64 GiB), as OpenSSH does.
REKEY_BYTES = 2**36
REKEY_PACKETS = 2**31
_KEY_ALGOS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


def _tcp_connect(hop: HostConfig, timeout: float, what: str) -> socket.socket:
    try:
        infos = socket.getaddrinfo(hop.hostname, hop.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        hint = (f" (HostName of {hop.alias!r} in {hop.config_path})"
                if hop.config_path and hop.alias != hop.hostname else "")
        raise HostNotFoundError(
            f"cannot resolve host name {hop.hostname!r}{hint} for {what}: {exc.strerror}. "
            "Check the spelling, your DNS/VPN, or use the IP address"
        ) from None
    failures: list[str] = []
    timed_out = False
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except TimeoutError:
            timed_out = True
            failures.append(f"{addr[0]}: timed out after {timeout:g} s")
            sock.close()
            continue
        except OSError as exc:
            failures.append(f"{addr[0]}: {exc.strerror or exc}")
            sock.close()
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle costs ~40 ms per round trip
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    kind_text = "timed out connecting to" if timed_out else "cannot connect to"
    hint = (" -- is the host up, the port right, and SSH allowed from here (firewall / security group)?"
            if timed_out else " -- is sshd running there and listening on that port?")
    raise UnreachableError(f"{kind_text} {what} at {hop.hostname}:{hop.port} ({'; '.join(failures)}){hint}")


def _prefer(options: Iterable[str], first: Iterable[str]) -> tuple[str, ...]:
    options = tuple(options)
    head = tuple(x for x in first if x in options)
    return head + tuple(x for x in options if x not in head)


class _ProxyCommand(paramiko.ProxyCommand):
    """paramiko's ProxyCommand, but ``close`` never signals a pid that was already reaped."""

    def close(self) -> None:
        proc = self.process
        if proc.poll() is None:
            proc.terminate()  # Popen checks returncode first: never a recycled pid
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
        with contextlib.suppress(Exception):
            proc.wait(timeout=2)

    @property
    def closed(self) -> bool:
        return self.process.returncode is not None

    @closed.setter
    def closed(self, value: bool) -> None:  # paramiko's base class may assign it
        pass


def _start_client(t: paramiko.Transport, sock: Any, timeout: float) -> None:
    """``start_client`` that also notices a ProxyCommand that died (paramiko would wait it out)."""
    done = threading.Event()
    t.start_client(event=done)
    deadline = time.monotonic() + timeout
    proc = getattr(sock, "process", None)
    while not done.wait(0.05):
        if not t.is_active():
            break
        if proc is not None and proc.poll() is not None:
            err = b""
            with contextlib.suppress(Exception):
                os.set_blocking(proc.stderr.fileno(), False)
                err = proc.stderr.read() or b""
            detail = " | ".join(err.decode("utf-8", "replace").strip().splitlines()[-3:])[-500:]
            raise paramiko.SSHException(f"the ProxyCommand exited with status {proc.returncode}"
                                        + (f": {detail}" if detail else ""))
        if time.monotonic() > deadline:
            raise paramiko.SSHException(f"no SSH handshake within {timeout:g} s")
    if not t.is_active():
        raise t.get_exception() or paramiko.SSHException("negotiation failed")


def _handshake(hop: HostConfig, sock: Any, what: str, timeout: float, keepalive: int,
               trust_on_first_use: bool) -> paramiko.Transport:
    """SSH handshake, host key check and authentication over ``sock``."""
    known = KnownHosts(hop.known_hosts_files + hop.global_known_hosts_files)
    t = paramiko.Transport(sock)
    t.set_log_channel("remotemagic.paramiko")  # its tracebacks become our exceptions, not stderr noise
    try:
        t.banner_timeout = timeout
        t.handshake_timeout = timeout
        t.auth_timeout = max(timeout, 30.0)
        opts = t.get_security_options()
        opts.ciphers = _prefer(opts.ciphers, [PREFERRED_CIPHER])
        known_types: list[str] = []
        for entry in known.lookup(hop.host_key_name):
            known_types.extend(_KEY_ALGOS.get(entry.key.get_name(), (entry.key.get_name(),)))
        if known_types:  # ask for the key type we can verify, as OpenSSH does
            opts.key_types = _prefer(opts.key_types, known_types)
        try:
            _start_client(t, sock, timeout)
            key = t.get_remote_server_key()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise UnreachableError(
                f"{what} ({hop.hostname}:{hop.port}) did not complete the SSH handshake: "
                f"{exc or type(exc).__name__} -- is an SSH server answering there?"
            ) from None
        verify_host_key(hop, key, known, trust_on_first_use)
        try:
            authenticate(t, hop)
        except (EOFError, OSError) as exc:
            raise UnreachableError(f"{what}: connection lost during authentication ({exc})") from None
        t.set_keepalive(keepalive)
        t.packetizer.REKEY_BYTES, t.packetizer.REKEY_PACKETS = REKEY_BYTES, REKEY_PACKETS
        return t
    except BaseException:
        t.close()
        raise


class Link:
    """One authenticated SSH connection to a target, with the connections to its jump hosts.

    With ``keepalive`` set, a watchdog asks the target for an answer every ``keepalive`` seconds
    and closes the link when ``count_max`` intervals pass without one (OpenSSH's
    ServerAliveInterval / ServerAliveCountMax): a link that died silently (laptop asleep, NAT
    timeout, no RST) is then noticed in seconds instead of TCP's many minutes, and the agent
    streams on it end, so callers reconnect and resume.
    """

    def __init__(self, transports: list[paramiko.Transport], proxy: Any = None, keepalive: float = 0,
                 count_max: int = 3, name: str = ""):
        self.transports = transports
        self.proxy = proxy
        self.name = name
        self._stop = threading.Event()
        if keepalive > 0 and transports:
            threading.Thread(target=self._watch, args=(keepalive, max(1, count_max)),
                             name=f"remotemagic-keepalive-{name}", daemon=True).start()

    def _watch(self, interval: float, count_max: int) -> None:
        t = self.transport
        while not self._stop.wait(interval):
            if not self.alive():
                return
            answered = threading.Event()

            def ping(answered: threading.Event) -> None:
                with contextlib.suppress(Exception):
                    t.global_request("keepalive@openssh.com", wait=True)  # any answer will do
                answered.set()

            threading.Thread(target=ping, args=(answered,), daemon=True).start()
            if not answered.wait(interval * count_max) and not self._stop.is_set():
                log.warning("no answer from %s for %g s: dropping the connection (it will be re-opened)",
                            self.name, interval * count_max)
                self.close()
                return

    @property
    def transport(self) -> paramiko.Transport:
        return self.transports[-1]

    def alive(self) -> bool:
        return all(t.is_active() for t in self.transports)

    def close(self) -> None:
        self._stop.set()
        for t in reversed(self.transports):
            with contextlib.suppress(Exception):
                t.close()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()


def _hop_names(hops: list[HostConfig]) -> list[str]:
    n = len(hops) - 1
    names = [f"jump host {i + 1} of {n} {hop.describe()}" for i, hop in enumerate(hops[:-1])]
    target = f"target {hops[-1].describe()}"
    if n:
        target += f" (via jump host {hops[-2].describe()})"
    names.append(target)
    if hops[0].proxy_command:
        names[0] += f" (through ProxyCommand {hops[0].proxy_command!r})"
    return names


def open_link(host: HostConfig, *, timeout: float = DEFAULT_TIMEOUT, keepalive: int = DEFAULT_KEEPALIVE,
              trust_on_first_use: bool = False, count_max: int | None = None) -> Link:
    """Connect through every hop (ProxyJump channels, or a ProxyCommand) and authenticate."""
    hops = [*host.proxy_jump, host]
    names = _hop_names(hops)
    transports: list[paramiko.Transport] = []
    proxy = None
    try:
        for i, hop in enumerate(hops):
            if i == 0 and hop.proxy_command:
                try:
                    proxy = _ProxyCommand(hop.proxy_command)
                except Exception as exc:
                    raise UnreachableError(
                        f"cannot start ProxyCommand {hop.proxy_command!r} for {names[0]}: {exc}") from None
                sock: Any = proxy
            elif i == 0:
                sock = _tcp_connect(hop, timeout, names[i])
            else:
                try:
                    sock = transports[-1].open_channel(
                        "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=timeout,
                        window_size=WINDOW, max_packet_size=MAX_PACKET
                    )
                except paramiko.ChannelException as exc:
                    raise UnreachableError(
                        f"{names[i - 1]} could not open a connection to {names[i]} at {hop.hostname}:{hop.port} "
                        f"({exc.text or 'connect failed'}): the host is down, the port is wrong, the name does "
                        "not resolve from the jump host, or the jump host forbids forwarding"
                    ) from None
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise UnreachableError(
                        f"timed out or failed opening a channel to {names[i]} through {names[i - 1]}: {exc}"
                    ) from None
            transports.append(_handshake(hop, sock, names[i], timeout, keepalive, trust_on_first_use))
    except BaseException:
        Link(transports, proxy).close()
        raise
    return Link(transports, proxy, keepalive, count_max or host.server_alive_count_max or 3,
                f"ssh://{host.address}")


#: What decides what we connect to and what we trust, per hop (see :func:`pool_key`).
PoolKey = tuple[tuple[Any, ...], ...]


class Pool:
    """One live Link per target, shared by every SSHTransport to it (refcounted)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.links: dict[PoolKey, Link] = {}
        self.users: dict[PoolKey, int] = {}
        self.key_locks: dict[PoolKey, threading.Lock] = {}

    def acquire(self, key: PoolKey) -> None:
        """Take a share of the target's link (it is opened on the first :meth:`get`)."""
        with self.lock:
            self.users[key] = self.users.get(key, 0) + 1
            self.key_locks.setdefault(key, threading.Lock())

    def release(self, key: PoolKey) -> None:
        """Give a share back; the last one closes the link."""
        with self.lock:
            n = self.users.get(key, 0) - 1
            if n > 0:
                self.users[key] = n
                return
            self.users.pop(key, None)
            link = self.links.pop(key, None)
        if link is not None:
            link.close()

    def get(self, key: PoolKey, opener: Callable[[], Link], stale: Link | None = None) -> Link:
        """The target's live link: ``opener()`` makes a new one if there is none, it died, or it is ``stale``."""
        with self.lock:
            key_lock = self.key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self.lock:
                link = self.links.get(key)
            if link is not None and link is not stale and link.alive():
                return link
            if link is not None:
                link.close()
            link = opener()
            with self.lock:
                self.links[key] = link
            return link


POOL = Pool()


def pool_key(host: HostConfig) -> PoolKey:
    # everything that decides what we connect to and what we trust: a transport with stricter
    # known_hosts or other keys never rides on a link that another one accepted
    return tuple((h.user, h.hostname, h.port, h.host_key_name, h.proxy_command, tuple(h.known_hosts_files),
                  tuple(h.global_known_hosts_files), tuple(h.identity_files)) for h in [*host.proxy_jump, host])
