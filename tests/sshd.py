"""A real OpenSSH sshd on 127.0.0.1 for tests: own config, host key, client key, known_hosts.

    server = SSHServer(tmp_path / "sshd").start()
    ...  # server.port, server.user, server.client_key, server.known_hosts, server.write_ssh_config()
    server.stop()

Needs /usr/sbin/sshd (Debian package openssh-server); fails loudly if it is missing.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def require_sshd() -> None:
    if not os.path.exists(SSHD):
        raise RuntimeError(
            f"{SSHD} is missing: the SSH tests need a real OpenSSH server. "
            "Install it with:  apt-get install -y openssh-server"
        )
    if not os.path.exists(SSH_KEYGEN):
        raise RuntimeError("ssh-keygen is missing: apt-get install -y openssh-client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519", comment: str = "remotemagic-test") -> str:
    """Make a key pair without passphrase (0600); return the public key line."""
    for p in (path, path.with_name(path.name + ".pub")):
        if p.exists():
            p.unlink()
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)], check=True)
    os.chmod(path, 0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def ensure_login_allowed(user: str) -> None:
    """With ``UsePAM no`` sshd refuses accounts whose password field is locked ('!...')."""
    if os.geteuid() != 0:
        return
    try:
        with open("/etc/shadow") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == user:
                    field = rest.split(":", 1)[0]
                    if field.startswith("!"):
                        subprocess.run(["usermod", "-p", "*", user], check=True)
                    return
    except FileNotFoundError:
        return


class SSHServer:
    """One sshd process on 127.0.0.1 with everything it needs in ``folder``."""

    def __init__(self, folder: str | os.PathLike[str], port: int | None = None, user: str | None = None,
                 client_key: Path | None = None, host_key: Path | None = None, env: dict[str, str] | None = None):
        require_sshd()
        self.env = dict(env or {})  # set in every session (sshd's SetEnv)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.user = user or pwd.getpwuid(os.getuid()).pw_name
        self.home = pwd.getpwnam(self.user).pw_dir
        self.host_key = host_key or self.folder / "ssh_host_ed25519_key"
        if not self.host_key.exists():
            keygen(self.host_key, comment="test-host")
        public = self.host_key.with_name(self.host_key.name + ".pub").read_text()
        self.host_key_type, self.host_key_b64 = public.split()[:2]
        self.client_key = client_key or self.folder / "id_ed25519"
        if not self.client_key.exists():
            keygen(self.client_key)
        self.authorized_keys = self.folder / "authorized_keys"
        self.authorized_keys.write_text(self.client_key.with_name(self.client_key.name + ".pub").read_text())
        os.chmod(self.authorized_keys, 0o600)
        self.known_hosts = self.folder / "known_hosts"
        self.known_hosts.write_text(self.host_key_line + "\n")
        os.chmod(self.known_hosts, 0o600)
        self.config = self.folder / "sshd_config"
        self.log_path = self.folder / "sshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host_key_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def host_key_line(self) -> str:
        """The known_hosts line for this server."""
        return f"{self.host_key_name} {self.host_key_type} {self.host_key_b64}"

    def write_config(self) -> None:
        self.config.write_text(
            f"""Port {self.port}
ListenAddress {self.host}
HostKey {self.host_key}
PidFile {self.folder / "sshd.pid"}
AuthorizedKeysFile {self.authorized_keys}
UsePAM no
StrictModes no
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
Subsystem sftp internal-sftp
"""
            + ("SetEnv " + " ".join(f"{k}={v}" for k, v in self.env.items()) + "\n" if self.env else "")
        )

    def start(self, timeout: float = 10.0) -> "SSHServer":
        require_sshd()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        ensure_login_allowed(self.user)
        self.write_config()
        test = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"sshd rejected its test config: {test.stderr}")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(4).startswith(b"SSH-"):  # our sshd, speaking
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not accept connections on port {self.port} in {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.log.close()

    def __enter__(self) -> "SSHServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_ssh_config(self, path: str | os.PathLike[str] | None = None, alias: str = "rmtest",
                         extra_hosts: str = "", **options: object) -> Path:
        """An OpenSSH client config with ``Host alias`` for this server; ``options`` add keywords."""
        path = Path(path) if path else self.folder / "ssh_config"
        settings: dict[str, object] = {
            "HostName": self.host,
            "Port": self.port,
            "User": self.user,
            "IdentityFile": self.client_key,
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": self.known_hosts,
        }
        settings.update(options)  # options replace the defaults (OpenSSH: the first value wins)
        lines = [f"Host {alias}", *(f"    {k} {v}" for k, v in settings.items())]
        path.write_text("\n".join(lines) + "\n" + extra_hosts)
        os.chmod(path, 0o600)
        return path

    def host_entry(self, alias: str, **options: object) -> str:
        """A ``Host`` block for this server, to append to another config (e.g. a jump host)."""
        lines = [f"Host {alias}", f"    HostName {self.host}", f"    Port {self.port}", f"    User {self.user}",
                 f"    IdentityFile {self.client_key}", "    IdentitiesOnly yes"]
        lines += [f"    {k} {v}" for k, v in options.items()]
        return "\n".join(lines) + "\n"


class TCPProxy:
    """A threaded TCP forwarder on 127.0.0.1 to ``target_port``.

    ``cut()`` closes the live connections (both ends see a reset/EOF at once); ``freeze()`` stops
    forwarding on them without closing anything (a link that died silently: laptop asleep, NAT
    state gone). New connections are forwarded normally after either.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.frozen: set[int] = set()
        self.accepted = 0
        self.cuts = 0
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                if id(src) in self.frozen:
                    time.sleep(0.05)  # hold the bytes: nothing passes, nothing closes
                    if self.closed:
                        break
                    continue
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(262144)
                if not data:
                    break
                if id(src) in self.frozen:
                    continue  # frozen while we waited: these bytes are lost, as on a dead link
                dst.sendall(data)
        except (OSError, ValueError):  # closed under us by cut() / close()
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        """Close every current connection (both sides); new ones are still accepted."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.cuts += 1
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(conns) // 2

    def freeze(self) -> int:
        """Stop forwarding on every current connection, without closing it."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.frozen.update(id(c) for c in conns)
            self.parked = getattr(self, "parked", []) + conns  # keep them open (and alive) until close()
        return len(conns) // 2

    def close(self) -> None:
        self.closed = True
        with self.lock:
            self.conns += getattr(self, "parked", [])
            self.parked = []
        try:
            self.listener.close()
        except OSError:
            pass
        self.cut()
