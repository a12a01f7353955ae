"""The SSH transport: the agent runs on any host reachable with OpenSSH-style configuration.

One persistent paramiko connection per target (through its jump hosts), with keepalives, is
shared by every :class:`SSHTransport` for that target; each ``start_agent()`` opens one new exec
channel on it, and a dead connection is replaced transparently.

A warm connect costs one exec: a small ``sh`` script checks that this agent version and a
complete venv are installed under the remote root and ``exec``\\ s the agent, or exits with
status 97 naming what is missing. Only then is the host bootstrapped (interpreter check, venv,
packages, agent upload over SFTP) and the script run again. Everything installed is marked
complete last, so a half-finished install is never trusted.

Security: host keys are checked against known_hosts (``HostKeyAlias`` and ``[host]:port`` as
OpenSSH does); unknown hosts are refused unless ``trust_on_first_use=True``; a changed key is
always refused. Private keys readable by others are refused. Remote folders are 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import paramiko

from .. import errors, notices
from ..sshconfig import HostConfig, resolve
from .base import AGENT_PACKAGE, Transport, agent_sources, agent_version
from .ssh_errors import (
    AuthenticationError,
    BootstrapError,
    HostKeyChangedError,
    HostNotFoundError,
    KeyPermissionError,
    RemoteCommandError,
    SSHError,
    UnknownHostKeyError,
    UnreachableError,
)

log = logging.getLogger("remotemagic")

DEFAULT_ROOT = "~/.remotemagic"
DEFAULT_TIMEOUT = 10.0
DEFAULT_KEEPALIVE = 15
PREFERRED_CIPHER = "aes128-gcm@openssh.com"  # ~1.25x paramiko's default aes128-ctr (MEASUREMENTS 6)
CHUNK = 256 * 1024  # Channel.sendall is quadratic on big buffers (MEASUREMENTS 2)
MARK = "remotemagic-agent-v1"
EXIT_MISSING = 97
EXIT_UNSAFE = 96
MIN_IPYTHON = 8
_KEY_ALGOS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


# -- known_hosts ---------------------------------------------------------------------------------
@dataclass
class KnownKey:
    key: paramiko.PKey
    path: str
    lineno: int
    revoked: bool = False


def _glob_match(pattern: str, name: str) -> bool:
    """OpenSSH host patterns: ``*`` and ``?`` only (``[host]:port`` brackets are literal)."""
    rx = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(rx, name.lower()) is not None


def _host_matches(patterns: Iterable[str], name: str) -> bool:
    hit = False
    for pattern in patterns:
        if pattern.startswith("|1|"):
            try:
                if paramiko.HostKeys.hash_host(name, pattern) == pattern:
                    hit = True
            except Exception:
                continue
        elif pattern.startswith("!"):
            if _glob_match(pattern[1:], name):
                return False
        elif _glob_match(pattern, name):
            hit = True
    return hit


def _same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


class KnownHosts:
    """The entries of some known_hosts files (hashed names, patterns, ``@revoked``)."""

    def __init__(self, paths: Iterable[str]):
        self.paths = list(paths)
        self.entries: list[tuple[list[str], KnownKey]] = []
        for path in self.paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.readlines()
            except OSError:
                continue
            for lineno, raw in enumerate(lines, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                revoked = False
                if line.startswith("@"):
                    marker, _, line = line.partition(" ")
                    if marker != "@revoked":
                        continue  # @cert-authority: host certificates are not supported
                    revoked = True
                try:
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
                except Exception:
                    entry = None
                if entry is None:
                    continue
                self.entries.append((entry.hostnames, KnownKey(entry.key, path, lineno, revoked)))

    def lookup(self, name: str) -> list[KnownKey]:
        return [known for patterns, known in self.entries if _host_matches(patterns, name)]


def add_known_host(path: str, name: str, key: paramiko.PKey) -> None:
    """Append ``name keytype base64`` to a known_hosts file (created 0600 in a 0700 folder)."""
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def verify_host_key(hop: HostConfig, key: paramiko.PKey, known: KnownHosts, trust_on_first_use: bool) -> None:
    """Accept ``key`` for ``hop`` or raise UnknownHostKeyError / HostKeyChangedError."""
    name = hop.host_key_name
    entries = known.lookup(name)
    fp = f"{key.get_name()} {key.fingerprint}"
    for entry in entries:
        if entry.revoked and _same_key(entry.key, key):
            raise HostKeyChangedError(
                f"the host key of {hop.describe()} ({fp}) is marked @revoked in {entry.path}:{entry.lineno}: "
                "connection refused"
            )
    good = [e for e in entries if not e.revoked]
    if any(_same_key(e.key, key) for e in good):
        return
    if good:
        same_type = [e for e in good if e.key.get_name() == key.get_name()] or good
        old = same_type[0]
        raise HostKeyChangedError(
            f"HOST KEY CHANGED for {hop.describe()}: it presented {fp}, but {old.path}:{old.lineno} records "
            f"{old.key.get_name()} {old.key.fingerprint} for {name!r}. Someone could be intercepting the "
            "connection (or the host was reinstalled): connection refused. If you know the host was "
            f"rebuilt, remove the old key with  ssh-keygen -R '{name}' -f {old.path}  and connect again "
            "(after checking the new fingerprint with the host's owner)."
        )
    record = hop.known_hosts_files[0] if hop.known_hosts_files else os.path.expanduser("~/.ssh/known_hosts")
    if trust_on_first_use or hop.accept_new_host_keys:
        add_known_host(record, name, key)
        notices.notify(f"trusting {hop.describe()} on first use: recorded its host key {fp} as {name!r} in {record}",
                       logger=log)
        return
    searched = ", ".join(known.paths) or "(no known_hosts files)"
    keyscan = f"ssh-keyscan -p {hop.port} {hop.hostname}" if hop.port != 22 else f"ssh-keyscan {hop.hostname}"
    raise UnknownHostKeyError(
        f"the host key of {hop.describe()} is not known: it presented {fp}, and no key is recorded for "
        f"{name!r} in {searched}. Check that fingerprint with the host's owner (on the host: "
        f"ssh-keygen -lf /etc/ssh/ssh_host_{key.get_name().split('-')[-1]}_key.pub), then accept it: connect "
        f"once with trust_on_first_use=True (it is recorded into {record}), or add it yourself with "
        f"`{keyscan} >> {record}`" + (f" (HostKeyAlias: rename the entry to {name})" if hop.host_key_alias else "")
        + "."
    )


# -- keys and authentication -----------------------------------------------------------------------
def _public_blob(path: str) -> bytes | None:
    try:
        with open(path + ".pub") as f:
            fields = f.read().split()
        import base64

        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError):
        return None


def load_keys(hop: HostConfig) -> tuple[list[tuple[str, paramiko.PKey]], list[str]]:
    """The keys to offer, in order (identity files, then ssh-agent), and notes on skipped ones."""
    keys: list[tuple[str, paramiko.PKey]] = []
    notes: list[str] = []
    wanted_blobs: set[bytes] = set()
    for path in hop.identity_files:
        if not os.path.exists(path):
            if hop.identities_explicit:
                notes.append(f"{path} does not exist")
            continue
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            message = (
                f"private key {path} is readable by group or others (mode {mode:o}): it is refused, as "
                f"OpenSSH refuses it. Fix it with:  chmod 600 {path}"
            )
            if hop.identities_explicit:
                raise KeyPermissionError(message)
            notices.notify(message, logger=log)
            notes.append(f"{path} skipped: readable by others (chmod 600 {path})")
            continue
        blob = _public_blob(path)
        try:
            key = paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            notes.append(f"{path} is passphrase-protected: load it into ssh-agent (ssh-add {path})")
            if blob:
                wanted_blobs.add(blob)
            continue
        except Exception as exc:
            notes.append(f"{path} could not be loaded ({exc})")
            continue
        wanted_blobs.add(key.asbytes())
        keys.append((f"{path} ({key.get_name()} {key.fingerprint})", key))
    if hop.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent_keys = paramiko.Agent().get_keys()
        except Exception as exc:
            notes.append(f"ssh-agent unavailable ({exc})")
            agent_keys = ()
        have = {k.asbytes() for _, k in keys}
        for akey in agent_keys:
            blob = akey.asbytes()
            if blob in have or (hop.identities_only and blob not in wanted_blobs):
                continue
            comment = getattr(akey, "comment", "") or ""
            keys.append((f"ssh-agent key {akey.get_name()} {akey.fingerprint} {comment}".rstrip(), akey))
    return keys, notes


def authenticate(t: paramiko.Transport, hop: HostConfig) -> None:
    keys, notes = load_keys(hop)
    tried: list[str] = []
    for label, key in keys:
        try:
            remaining = t.auth_publickey(hop.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise AuthenticationError(
                f"{hop.describe()} does not accept public keys for user {hop.user!r} (it allows: "
                f"{', '.join(exc.allowed_types) or 'nothing'}); remotemagic logs in with keys only"
            ) from None
        except paramiko.AuthenticationException:
            tried.append(label)
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            tried.append(label)
            notes.append(f"the server closed the connection ({exc}); too many keys offered? set IdentitiesOnly yes")
            break
        if remaining:
            raise AuthenticationError(
                f"{hop.describe()} accepted {label} for {hop.user!r} but requires more authentication "
                f"({', '.join(remaining)}), which remotemagic does not do"
            )
        log.debug("authenticated to %s with %s", hop.describe(), label)
        return
    where = f"User in {hop.config_path}" if hop.config_path else "a User entry in ~/.ssh/config"
    raise AuthenticationError(
        f"authentication to {hop.describe()} failed for user {hop.user!r}. Keys tried: "
        + ("; ".join(tried) if tried else "none (no usable key found)")
        + (". Notes: " + "; ".join(notes) if notes else "")
        + ". Check the user name: cloud images log in as a default user -- 'ubuntu' on Ubuntu, "
        f"'ec2-user' on Amazon Linux, 'admin' on Debian -- not 'root' (give it as ssh://USER@host or {where}); "
        "and check that the key's public half is in that user's ~/.ssh/authorized_keys on the host"
    )


# -- connecting ------------------------------------------------------------------------------------
def _tcp_connect(hop: HostConfig, timeout: float, what: str) -> socket.socket:
    try:
        infos = socket.getaddrinfo(hop.hostname, hop.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        hint = f" (HostName of {hop.alias!r} in {hop.config_path})" if hop.config_path and hop.alias != hop.hostname else ""
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
                    raise UnreachableError(f"cannot start ProxyCommand {hop.proxy_command!r} for {names[0]}: {exc}") from None
                sock: Any = proxy
            elif i == 0:
                sock = _tcp_connect(hop, timeout, names[i])
            else:
                try:
                    sock = transports[-1].open_channel(
                        "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=timeout
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


class _Pool:
    """One live Link per target, shared by every SSHTransport to it (refcounted)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.links: dict[tuple, Link] = {}
        self.users: dict[tuple, int] = {}
        self.key_locks: dict[tuple, threading.Lock] = {}

    def acquire(self, key: tuple) -> None:
        with self.lock:
            self.users[key] = self.users.get(key, 0) + 1
            self.key_locks.setdefault(key, threading.Lock())

    def release(self, key: tuple) -> None:
        with self.lock:
            n = self.users.get(key, 0) - 1
            if n > 0:
                self.users[key] = n
                return
            self.users.pop(key, None)
            link = self.links.pop(key, None)
        if link is not None:
            link.close()

    def get(self, key: tuple, opener: Any, stale: Link | None = None) -> Link:
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


_POOL = _Pool()


def _pool_key(host: HostConfig) -> tuple:
    # everything that decides what we connect to and what we trust: a transport with stricter
    # known_hosts or other keys never rides on a link that another one accepted
    return tuple((h.user, h.hostname, h.port, h.host_key_name, h.proxy_command, tuple(h.known_hosts_files),
                  tuple(h.global_known_hosts_files), tuple(h.identity_files)) for h in [*host.proxy_jump, host])


# -- the agent stream ----------------------------------------------------------------------------------
RECV_BLOCK = 4 * 1024 * 1024


class ChannelStream:
    """An exec channel running the agent, as an AgentStream."""

    def __init__(self, chan: paramiko.Channel, pending: bytes, name: str, log_path: str):
        self.chan = chan
        self.pending = memoryview(pending)
        self.name = name
        self.log_path = log_path

    def readinto(self, view: memoryview) -> int:
        if self.pending:
            n = min(len(view), len(self.pending))
            view[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        try:
            # Take everything paramiko has buffered in one call: small recv()s (an 8-byte frame
            # head, a JSON header) make it delete the front of a buffer of up to the window size
            # each time -- measured at 1 GiB: 3.0-5.8 s of client CPU, vs 1.6-2.2 s like this.
            data = self.chan.recv(max(len(view), RECV_BLOCK))
        except (OSError, EOFError, paramiko.SSHException):
            return 0
        if not data:
            if self.chan.exit_status_ready():
                status = self.chan.recv_exit_status()
                if status not in (0, -1):
                    log.warning("the agent on %s exited with status %s (its log: %s on the target)",
                                self.name, status, self.log_path)
            return 0
        n = min(len(view), len(data))
        view[:n] = data[:n]
        if n < len(data):
            self.pending = memoryview(data)[n:]
        return n

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), CHUNK):
                self.chan.sendall(view[start : start + CHUNK])
        except paramiko.SSHException as exc:
            raise OSError(f"SSH channel to {self.name} failed: {exc}") from exc

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.shutdown_write()
        with contextlib.suppress(Exception):
            self.chan.close()


# -- remote scripts ---------------------------------------------------------------------------------
PROBE_PY = r"""
import sys, json, os, platform
info = {"version": "%d.%d.%d" % tuple(sys.version_info[:3]), "executable": sys.executable,
        "machine": platform.machine(), "system": platform.system()}
try:
    info["libc"] = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError, AttributeError):
    info["libc"] = ""
try:
    import importlib.util as u
    for m in ("venv", "ensurepip", "virtualenv", "pip"):
        info[m] = u.find_spec(m) is not None
    from importlib import metadata
    for d in ("cloudpickle", "ipython"):
        try:
            info[d] = metadata.version(d)
        except Exception:
            info[d] = None
except Exception as e:
    info["error"] = repr(e)
print("probe=" + json.dumps(info))
"""


# Before anything under the root runs: the root and what is directly in it, the agent folder,
# this agent version (all of it) and the venv (down to its site-packages' entries) must belong
# to us and not be writable by group or others (symlinks are judged themselves; -H follows a
# root or venv that is a symlink). Otherwise print the first offender (``ls -ldn``) and stop.
# One exception: uv makes the empty lock file ``venv/.lock`` mode 0666 whatever the umask; it is
# only ever locked, never read or run, and the venv folder holding it is checked.
UNSAFE_SH = r"""U=$(id -u)
rm_unsafe() {
  [ -e "$1" ] || [ -h "$1" ] || return 0
  o=$(find -H "$@" \( ! -user "$U" -o \( ! -type l \( -perm -020 -o -perm -002 \) \) \) -print 2>/dev/null) || {
    echo "!$1"; return 0; }
  printf '%s\n' "$o" | head -n 1
}
B=$(rm_unsafe "$R" -maxdepth 1)
[ -n "$B" ] || B=$(rm_unsafe "$R/agent" -maxdepth 1)
[ -n "$B" ] || B=$(rm_unsafe "$V")
[ -n "$B" ] || B=$(rm_unsafe "$R/venv" -maxdepth 4 ! \( -path "$R/venv/.lock" -type f \))
if [ -n "$B" ]; then
  case "$B" in
    "!"*) B=${B#!}; I="nocheck:-" ;;
    *) I=$(ls -ldn -- "$B" | awk '{print $1 ":" $3}') ;;
  esac
  echo "MARK unsafe $U $I $B"
  exit EXIT_UNSAFE
fi""".replace("MARK", MARK).replace("EXIT_UNSAFE", str(EXIT_UNSAFE))


def _local_cloudpickle() -> str:
    import cloudpickle

    return cloudpickle.__version__


def sftp_replace(sftp: paramiko.SFTPClient, tmp: str, path: str) -> None:
    """Rename ``tmp`` over ``path`` on the host: atomically where the server has the
    posix-rename extension, else remove then rename (plain SFTP rename refuses to overwrite)."""
    try:
        sftp.posix_rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            sftp.remove(path)
        sftp.rename(tmp, path)


def venv_marker() -> str:
    """The file that says ``<root>/venv`` is complete for this Python minor and cloudpickle."""
    major, minor = sys.version_info[:2]
    return f".remotemagic-ok-py{major}.{minor}-cloudpickle{_local_cloudpickle()}"


def _major(version: str | None) -> int:
    m = re.match(r"\d+", version or "")
    return int(m.group()) if m else 0


class SSHTransport(Transport):
    """The agent on an SSH host, over one persistent paramiko connection."""

    def __init__(
        self,
        target: str,
        *,
        root: str | None = None,
        ssh_config: str | os.PathLike[str] | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        trust_on_first_use: bool = False,
        python: str = "python3",
        connect_timeout: float | None = None,
        user: str | None = None,
        port: int | None = None,
        identity_file: str | os.PathLike[str] | None = None,
        keepalive: int | None = None,
    ):
        self.host = resolve(target, config_path=ssh_config, user=user, port=port,
                            identity_file=identity_file, known_hosts=known_hosts)
        self.name = f"ssh://{self.host.user}@{self.host.hostname}:{self.host.port}"
        self.root = root or DEFAULT_ROOT
        self.python = python
        self.timeout = float(connect_timeout or self.host.connect_timeout or DEFAULT_TIMEOUT)
        self.keepalive = int(keepalive or self.host.server_alive_interval or DEFAULT_KEEPALIVE)
        self.trust_on_first_use = trust_on_first_use
        #: Environment for the agent and its workers (e.g. REMOTEMAGIC_SPOT=1 on spot instances).
        self.agent_env: dict[str, str] = {}
        self.bootstraps = 0
        #: Package sync and bootstrap ship wheels from here instead of using the host's index.
        self.offline_install = False
        self._key = _pool_key(self.host)
        self._lock = threading.RLock()
        self._closed = False
        _POOL.acquire(self._key)

    # -- the connection ----------------------------------------------------------------------------
    def _open(self) -> Link:
        t0 = time.monotonic()
        link = open_link(self.host, timeout=self.timeout, keepalive=self.keepalive,
                         trust_on_first_use=self.trust_on_first_use)
        t = link.transport
        log.info("SSH connection to %s open in %.0f ms (%s, cipher %s)", self.name, (time.monotonic() - t0) * 1000,
                 " -> ".join(h.describe() for h in [*self.host.proxy_jump, self.host]),
                 getattr(t, "local_cipher", "?"))
        return link

    def link(self, stale: Link | None = None) -> Link:
        """The live connection (shared per target); reconnects if it died."""
        with self._lock:
            if self._closed:  # used again after close(): take a share of the link again
                self._closed = False
                _POOL.acquire(self._key)
        return _POOL.get(self._key, self._open, stale)

    def _channel(self, command: str, combine_stderr: bool = False) -> paramiko.Channel:
        """A new exec channel running ``command`` (reconnecting once if the link is dead)."""
        link = self.link()
        for attempt in range(2):
            try:
                chan = link.transport.open_session(timeout=self.timeout)
                if combine_stderr:
                    chan.set_combine_stderr(True)
                chan.exec_command(command)
                return chan
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if attempt:
                    raise errors.ConnectionLostError(f"cannot open a channel to {self.name}: {exc}") from exc
                log.info("SSH connection to %s unusable (%s); reconnecting", self.name, exc)
                link = self.link(stale=link)
        raise AssertionError("unreachable")

    @staticmethod
    def _sh(script: str) -> str:
        """Run a POSIX sh script whatever the login shell is (bash, zsh, fish, csh...)."""
        return "sh -c " + shlex.quote(script)

    def _root_sh(self) -> str:
        root = self.root
        if root == "~":
            return '"$HOME"'
        if root.startswith("~/"):
            return '"$HOME"/' + shlex.quote(root[2:])
        if not root.startswith("/"):
            return '"$HOME"/' + shlex.quote(root)
        return shlex.quote(root)

    def _stream(self, script: str) -> tuple[paramiko.Channel, Iterator[str]]:
        chan = self._channel(self._sh(script), combine_stderr=True)

        def lines() -> Iterator[str]:
            with chan.makefile("rb") as f:
                for raw in f:
                    yield raw.decode("utf-8", "replace").rstrip("\r\n")

        return chan, lines()

    def run(self, script: str, log_prefix: str | None = None) -> tuple[int, str]:
        """Run a sh script on the target; return its exit status and combined output."""
        chan, lines = self._stream(script)
        out: list[str] = []
        try:
            for line in lines:
                out.append(line)
                if log_prefix is not None:
                    log.info("%s%s", log_prefix, line)
            return chan.recv_exit_status(), "\n".join(out)
        finally:
            chan.close()

    # -- the agent -----------------------------------------------------------------------------------
    def _agent_script(self) -> str:
        return f"""umask 077
R={self._root_sh()}
V="$R/agent/{agent_version()}"
{UNSAFE_SH}
M=
[ -f "$V/{AGENT_PACKAGE}/.complete" ] || M=agent
{{ [ -f "$R/venv/{venv_marker()}" ] && [ -x "$R/venv/bin/python" ]; }} || M="$M,venv"
if [ -z "$M" ] && cd "$V"; then
  PYTHONPATH="$V"; export PYTHONPATH{self._env_sh()}
  echo "{MARK} ok - $R"
  exec "$R/venv/bin/python" -m {AGENT_PACKAGE}.server "$R" 2>>"$R/agent.log"
fi
echo "{MARK} missing ${{M:-agent}} $R"
exit {EXIT_MISSING}
"""

    def _env_sh(self) -> str:
        return "".join(f"\n  {k}={shlex.quote(v)}; export {k}" for k, v in sorted(self.agent_env.items())
                       if k.isidentifier())

    def _read_marker(self, chan: paramiko.Channel) -> tuple[str, set[str], bytes]:
        """Skip login-shell chatter up to our marker line; return (status, missing, rest)."""
        chan.settimeout(max(self.timeout, 30.0))
        buf = b""
        mark = MARK.encode() + b" "
        try:
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(mark):
                        _, status, what, root = line.decode("utf-8", "replace").split(" ", 3)
                        if status == "unsafe":
                            chan.close()
                            raise self._unsafe(what, root)
                        self.root = root
                        chan.settimeout(None)
                        return status, {w for w in what.split(",") if w and w != "-"}, buf
                    log.debug("login shell on %s said: %r", self.name, line[:200])
                if len(buf) > 1024 * 1024:
                    break
        except errors.UnsafeRootError:
            raise
        except TimeoutError:
            chan.close()
            raise errors.ConnectionLostError(f"{self.name} did not start the agent within {max(self.timeout, 30.0):g} s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            chan.close()
            raise errors.ConnectionLostError(f"connection to {self.name} lost while starting the agent: {exc}") from exc
        status = chan.recv_exit_status() if chan.exit_status_ready() else None
        err = b""
        with contextlib.suppress(Exception):
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
        chan.close()
        if status is None:
            raise errors.ConnectionLostError(f"connection to {self.name} lost while starting the agent")
        raise SSHError(
            f"could not start the agent on {self.name} (exit status {status}): "
            f"{err.decode('utf-8', 'replace').strip()[-2000:] or 'no output'}"
        )

    def _unsafe(self, uid: str, found: str) -> errors.UnsafeRootError:
        """The agent script's report of a path under the root that is not safely ours."""
        info, _, path = found.partition(" ")
        mode, _, owner = info.partition(":")
        if mode == "nocheck":
            why = ("it could not be checked: `find` failed on it there (is it readable, and does the host's find "
                   "support -H and -maxdepth?), and nothing is run from a folder that was not checked")
        elif owner != uid:
            why = (f"it belongs to uid {owner} there, not to you (uid {uid}), so code or pickles another user put "
                   "there would run as you. Use a root folder that you own and only you can write (a new one, "
                   "or leave --root / remote_root unset for the default ~/.remotemagic)")
        else:
            why = (f"it is writable by group or others ({mode}), so another user could put code there that "
                   f"would run as you. Fix it on the host with: chmod go-w {shlex.quote(path)} (or chmod 700), "
                   "or use a folder only you can write")
        return errors.UnsafeRootError(f"{self.name}: refusing to use the root folder {self.root}: {path} is not "
                                      f"safe: {why}. Nothing from it was run.")

    def start_agent(self) -> ChannelStream:
        """Start the agent over a new channel (bootstrapping the host first if needed)."""
        with self._lock:
            for attempt in range(2):
                chan = self._channel(self._sh(self._agent_script()))
                status, missing, rest = self._read_marker(chan)
                if status == "ok":
                    return ChannelStream(chan, rest, self.name, posixpath.join(self.root, "agent.log"))
                with contextlib.suppress(Exception):
                    code = chan.recv_exit_status()
                    if code != EXIT_MISSING:
                        log.debug("agent check on %s exited %s", self.name, code)
                chan.close()
                if attempt:
                    raise BootstrapError(f"{self.name}: still missing after bootstrap: {', '.join(sorted(missing))}")
                log.info("%s: bootstrapping %s under %s", self.name, " and ".join(sorted(missing)), self.root)
                self.bootstrap(missing)
        raise AssertionError("unreachable")

    # -- bootstrap ------------------------------------------------------------------------------------
    def bootstrap(self, missing: Iterable[str] = ("venv", "agent")) -> None:
        """Install what is missing under the root: the venv (with its packages) and/or the agent."""
        missing = set(missing)
        t0 = time.monotonic()
        self.bootstraps += 1
        self._make_root()
        if "venv" in missing:
            self._bootstrap_venv()
        if "agent" in missing:
            self.upload_agent()
        log.info("%s: bootstrap done in %.1f s", self.name, time.monotonic() - t0)

    def _make_root(self) -> None:
        """Create the root (0700) or say why it cannot be: before any install is attempted, so a
        root we cannot write is reported as that, not as a missing venv module."""
        status, out = self.run(f"""umask 077
R={self._root_sh()}
mkdir -p "$R" 2>&1 && chmod 700 "$R" 2>&1 && test -w "$R" && exit 0
echo "$R is not writable"
exit 1
""")
        if status != 0:
            detail = " ".join(out.strip().splitlines()[-2:])[-500:]
            raise errors.RootFolderError(
                f"{self.name}: cannot create or write the root folder {self.root} on the host ({detail}). "
                "Choose a folder you can write there: --root, or Ec2Magics.remote_root (default ~/.remotemagic)"
            )

    def _probe(self) -> dict[str, Any]:
        py = shlex.quote(self.python)
        script = f"""R={self._root_sh()}
echo "home=$HOME"
echo "root=$R"
for u in "$(command -v uv 2>/dev/null)" "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv" "$R/tools/uv/bin/uv"; do
  if [ -n "$u" ] && [ -x "$u" ]; then echo "uv=$u"; break; fi
done
P=$(command -v {py} 2>/dev/null) || exit 0
echo "python=$P"
"$P" -c {shlex.quote(PROBE_PY)} 2>&1 || "$P" --version 2>&1 | sed 's/^/pyversion=/'
"""
        status, out = self.run(script)
        facts: dict[str, Any] = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("home", "root", "uv", "python", "pyversion", "probe") and key not in facts:
                facts[key] = value
        if "probe" in facts:
            import json

            try:
                facts["probe"] = json.loads(facts["probe"])
            except ValueError:
                facts.pop("probe")
        if status != 0 or "root" not in facts:
            raise BootstrapError(f"probing {self.name} failed (exit {status}): {out[-2000:]}")
        self.root = facts["root"]
        return facts

    def _install_uv(self, facts: dict[str, Any]) -> str | None:
        info = facts.get("probe") or {}
        if not info.get("pip"):
            return None
        log.info("%s: installing uv with pip into %s/tools/uv", self.name, self.root)
        status, out = self.run(
            f"umask 077\nR={shlex.quote(self.root)}\n"
            f'{shlex.quote(facts["python"])} -m pip install --disable-pip-version-check --retries 1 --timeout 15 '
            '--target "$R/tools/uv" uv && test -x "$R/tools/uv/bin/uv"',
            log_prefix=f"[{self.host.alias} pip] ",
        )
        if status != 0:
            log.warning("%s: could not install uv with pip: %s", self.name, out.strip().splitlines()[-1:] or "")
            return None
        return posixpath.join(self.root, "tools/uv/bin/uv")

    def _ship_uv(self, info: dict[str, Any], python: tuple[int, ...], required: bool) -> str | None:
        """Bring uv from here (the wheel for the host's platform, unpacked, sent over SFTP)."""
        from ..envsync import bootstrap as envboot

        try:
            return envboot.ship_uv(self, info, (python[0], python[1]))
        except BootstrapError:
            if required:
                raise
            log.info("%s: could not ship uv", self.name, exc_info=True)
            return None

    def _uv_python(self, uv: str) -> str:
        want = "{}.{}".format(*sys.version_info[:2])
        q = shlex.quote(uv)
        status, out = self.run(f"{q} python find {want}")
        if status != 0:
            log.info("%s: provisioning Python %s with uv", self.name, want)
            status, out = self.run(f"{q} python install {want} && {q} python find {want}",
                                   log_prefix=f"[{self.host.alias} uv] ")
        path = out.strip().splitlines()[-1] if out.strip() else ""
        if status != 0 or not path.startswith("/"):
            raise BootstrapError(f"{self.name}: uv ({uv}) could not provide Python {want}: {out[-2000:]}")
        return path

    def _bootstrap_venv(self) -> None:
        facts = self._probe()
        want = sys.version_info[:2]
        want_s = "{}.{}".format(*want)
        info = facts.get("probe") or {}
        found = None
        if "python" in facts:
            version = info.get("version") or facts.get("pyversion", "unknown version")
            found = f"{facts['python']} is Python {version}"
        base: str | None = None
        if info.get("version") and tuple(int(x) for x in info["version"].split(".")[:2]) == want:
            base = info.get("executable") or facts["python"]
        uv = facts.get("uv")
        if base is None:
            uv = uv or self._install_uv(facts) or self._ship_uv(info, want, required=False)
            if not uv:
                what = found or f"there is no {self.python!r} on its PATH"
                raise BootstrapError(
                    f"{self.name}: {what}, but this kernel runs Python {want_s}, and pickles need the same "
                    f"minor version at both ends. Install Python {want_s} there and connect with "
                    f"python='python{want_s}' (or its full path), or install uv there "
                    "(curl -LsSf https://astral.sh/uv/install.sh | sh, or pip install uv) and connect again: "
                    f"remotemagic then provisions Python {want_s} with it"
                )
            base = self._uv_python(uv)
            info = {}
        cp = _local_cloudpickle()
        if not uv and info:  # uv first; on a bare host nothing else can make the venv
            bare = not (info.get("venv") and info.get("ensurepip")) and not info.get("virtualenv")
            uv = self._ship_uv(info, want, required=bare)
        log.info("%s: creating %s/venv from %s", self.name, self.root, base)
        # never --system-site-packages: the venv holds what package sync puts there, at the
        # local versions, whatever the host's interpreter happens to carry
        self._create_venv(base, uv, info, want_s)
        from ..envsync import bootstrap as envboot

        envboot.install_agent_packages(self, self.offline_install)
        check = (
            "import sys, cloudpickle, IPython; "
            "print('%d.%d' % sys.version_info[:2], cloudpickle.__version__, IPython.__version__)"
        )
        status, out = self.run(f'R={shlex.quote(self.root)}\n"$R/venv/bin/python" -c {shlex.quote(check)} 2>&1')
        got = out.strip().splitlines()[-1].split() if out.strip() else []
        if status != 0 or got[:2] != [want_s, cp]:
            raise BootstrapError(
                f"{self.name}: the new venv {self.root}/venv does not provide Python {want_s} with "
                f"cloudpickle {cp} and IPython: {out[-2000:]}"
            )
        status, out = self.run(
            f'umask 077\nR={shlex.quote(self.root)}\necho "{" ".join(got)}" > "$R/venv/{venv_marker()}"'
        )
        if status != 0:
            raise BootstrapError(f"{self.name}: cannot write the venv marker: {out}")

    def _create_venv(self, base: str, uv: str | None, info: dict[str, Any], want_s: str) -> None:
        b = shlex.quote(base)
        attempts = [f'{shlex.quote(uv)} venv -q --python {b} "$R/venv"'] if uv else []  # ~0.1 s, no pip
        attempts.append(f'{b} -m venv "$R/venv"')
        if info.get("virtualenv") or not info:
            attempts.append(f'{b} -m virtualenv -q "$R/venv"')
        outputs = []
        prefix = f'umask 077\nR={shlex.quote(self.root)}\nmkdir -p "$R" && chmod 700 "$R" && rm -rf "$R/venv" || exit 1\n'
        for cmd in attempts:
            status, out = self.run(prefix + cmd + " 2>&1")
            if status == 0:
                self.run(f'chmod 700 {shlex.quote(self.root)}/venv')
                return
            outputs.append(f"$ {cmd}\n{out.strip()[-1500:]}")
        self.run(f'rm -rf {shlex.quote(self.root)}/venv')
        raise BootstrapError(
            f"{self.name}: cannot create a virtual environment with {base}:\n" + "\n".join(outputs)
            + f"\nOn Debian/Ubuntu install the venv module: sudo apt install python3-venv (or python{want_s}-venv); "
            "or install virtualenv or uv on the host, then connect again"
        )

    def pip_install(self, packages: Iterable[str], *pip_args: str) -> Iterator[str]:
        """Run ``<root>/venv/bin/python -m pip install ...`` on the target; yield its output lines.

        Raises :class:`RemoteCommandError` at the end if pip failed.
        """
        pkgs = " ".join(shlex.quote(p) for p in [*pip_args, *packages])
        script = f"""umask 077
R={self._root_sh()}
P="$R/venv/bin/python"
[ -x "$P" ] || {{ echo "no venv at $R/venv: connect once first"; exit 3; }}
if ! "$P" -m pip --version >/dev/null 2>&1 && ! "$P" -m ensurepip --default-pip >/dev/null 2>&1; then
  for u in "$R/tools/uv/bin/uv" "$(command -v uv 2>/dev/null)" "$HOME/.local/bin/uv"; do
    if [ -n "$u" ] && [ -x "$u" ]; then exec "$u" pip install --python "$P" {pkgs}; fi
  done
  echo "pip is not available in $R/venv, ensurepip failed and there is no uv (apt install python3-venv?)"; exit 3
fi
exec "$P" -m pip install --disable-pip-version-check {pkgs}
"""
        chan, lines = self._stream(script)
        tail: list[str] = []
        try:
            for line in lines:
                tail = [*tail[-29:], line]
                yield line
            status = chan.recv_exit_status()
        finally:
            chan.close()
        if status != 0:
            raise RemoteCommandError(f"pip install on {self.name} failed (exit {status}): " + "\n".join(tail[-5:]),
                                     status, "\n".join(tail))

    def upload_agent(self) -> None:
        """Put this agent version into ``<root>/agent/<version>`` over SFTP (.complete last)."""
        sftp = paramiko.SFTPClient.from_transport(self.link().transport)
        if sftp is None:
            raise BootstrapError(f"{self.name}: cannot open an SFTP session (is the sftp subsystem enabled?)")
        try:
            if not self.root.startswith("/"):
                home = sftp.normalize(".")
                self.root = posixpath.join(home, self.root[2:] if self.root.startswith("~/") else self.root.lstrip("~"))
            vdir = posixpath.join(self.root, "agent", agent_version())
            pkg = posixpath.join(vdir, AGENT_PACKAGE)
            for folder in (self.root, posixpath.join(self.root, "agent"), vdir, pkg):
                self._sftp_mkdir(sftp, folder)
            token = secrets.token_hex(4)
            for name, data in agent_sources().items():
                self._sftp_put(sftp, posixpath.join(pkg, name), data, token)
            self._sftp_put(sftp, posixpath.join(pkg, ".complete"), agent_version().encode(), token)
            log.info("%s: uploaded agent %s to %s", self.name, agent_version(), vdir)
        except OSError as exc:
            raise BootstrapError(f"{self.name}: uploading the agent to {self.root} failed: {exc}") from exc
        finally:
            sftp.close()

    @staticmethod
    def _sftp_mkdir(sftp: paramiko.SFTPClient, path: str) -> None:
        try:
            sftp.stat(path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):  # a concurrent bootstrap may win the race
                sftp.mkdir(path, 0o700)
        sftp.chmod(path, 0o700)

    @staticmethod
    def _sftp_put(sftp: paramiko.SFTPClient, path: str, data: bytes, token: str) -> None:
        tmp = f"{path}.tmp-{token}"
        with sftp.open(tmp, "wb") as f:
            f.chmod(0o600)
            f.write(data)
        sftp_replace(sftp, tmp, path)

    # -- the rest -------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                _POOL.release(self._key)

    def describe(self) -> str:
        hops = [*self.host.proxy_jump, self.host]
        if len(hops) > 1:
            return f"{self.name} (via {', '.join(h.describe() for h in hops[:-1])})"
        return self.name


__all__ = ["ChannelStream", "KnownHosts", "Link", "SSHTransport", "open_link", "verify_host_key"]
