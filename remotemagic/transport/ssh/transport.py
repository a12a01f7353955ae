"""The SSH transport: :class:`SSHTransport`, and the agent's exec channel as a stream.

One persistent connection per target (:mod:`.link`, through its jump hosts), with keepalives, is
shared by every :class:`SSHTransport` for that target; each ``start_agent()`` opens one new exec
channel on it, and a dead connection is replaced transparently.

A warm connect costs one exec: the agent script (:func:`.bootstrap.agent_script`) checks that
the root is safely ours and that this agent version and a complete venv are installed under it,
and ``exec``\\ s the agent, or exits naming what is missing. Only then is the host bootstrapped
(:mod:`.bootstrap`) and the script run again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shlex
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency

from ... import errors
from ..base import Transport
from . import bootstrap as _bootstrap
from .bootstrap import EXIT_MISSING, MARK, agent_script, unsafe_root_error
from .config import resolve
from .errors import BootstrapError, RemoteCommandError, SSHError
from .link import DEFAULT_KEEPALIVE, DEFAULT_TIMEOUT, MAX_PACKET, POOL, WINDOW, Link, open_link, pool_key

if TYPE_CHECKING:
    from .tunnel import Tunnel

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.remotemagic"
CHUNK = 256 * 1024  # Channel.sendall is quadratic on big buffers (MEASUREMENTS 2)
RECV_BLOCK = 4 * 1024 * 1024
TAIL_LINES = 30  # the output lines a failed script's error can quote


class ChannelStream:
    """An exec channel running the agent, as an AgentStream."""

    def __init__(self, chan: paramiko.Channel, pending: bytes, name: str, log_path: str):
        self.chan = chan
        self.pending = memoryview(pending)
        self.name = name
        self.log_path = log_path

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` from what came before the agent's first frame, then from the channel; 0 at the end."""
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
        received = memoryview(data)  # (slicing the bytes would copy them once more)
        view[:n] = received[:n]
        if n < len(data):
            self.pending = received[n:]
        return n

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), CHUNK):
                # paramiko sends any buffer (its stubs say bytes): no copy of the chunk
                self.chan.sendall(cast(bytes, view[start : start + CHUNK]))
        except paramiko.SSHException as exc:
            raise OSError(f"SSH channel to {self.name} failed: {exc}") from exc

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.shutdown_write()
        with contextlib.suppress(Exception):
            self.chan.close()


class ScriptLines:
    """A sh script running on the target over its own exec channel: iterate for its combined
    stdout and stderr, line by line; once that ends, ``status`` is its exit status and ``tail``
    its last :data:`TAIL_LINES` lines (for an error message). The channel is closed when the
    iteration ends or is abandoned."""

    def __init__(self, chan: paramiko.Channel):
        self.chan = chan
        #: The exit status, once the output has been read to its end (-1 before that).
        self.status = -1
        #: The last lines of output, oldest first.
        self.tail: list[str] = []

    def __iter__(self) -> Iterator[str]:
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        try:
            with self.chan.makefile("rb") as f:
                for raw in f:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    tail.append(line)
                    yield line
            self.status = self.chan.recv_exit_status()
        finally:
            self.tail = list(tail)
            self.chan.close()


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
        super().__init__()
        self.host = resolve(target, config_path=ssh_config, user=user, port=port,
                            identity_file=identity_file, known_hosts=known_hosts)
        self.name = f"ssh://{self.host.user}@{self.host.hostname}:{self.host.port}"
        self.root = root or DEFAULT_ROOT
        self.python = python
        self.timeout = float(connect_timeout or self.host.connect_timeout or DEFAULT_TIMEOUT)
        self.keepalive = int(keepalive or self.host.server_alive_interval or DEFAULT_KEEPALIVE)
        self.trust_on_first_use = trust_on_first_use
        #: How many times this transport bootstrapped the host (0 on the warm path).
        self.bootstraps = 0
        self._key = pool_key(self.host)
        self._lock = threading.RLock()
        self._closed = False
        POOL.acquire(self._key)

    # -- the connection ----------------------------------------------------------------------------
    def _open(self) -> Link:
        """A new link to the target (the pool calls this when it has no live one)."""
        t0 = time.monotonic()
        link = open_link(self.host, timeout=self.timeout, keepalive=self.keepalive,
                         trust_on_first_use=self.trust_on_first_use)
        t = link.transport
        log.info("SSH connection to %s open in %.0f ms (%s, cipher %s)", self.name, (time.monotonic() - t0) * 1000,
                 " -> ".join(h.describe() for h in [*self.host.proxy_jump, self.host]),
                 getattr(t, "local_cipher", "?"))
        return link

    def open_sftp(self) -> paramiko.SFTPClient:
        """An SFTP session on the live link (close it when done)."""
        sftp = paramiko.SFTPClient.from_transport(self.link().transport)
        if sftp is None:
            raise BootstrapError(f"{self.name}: cannot open an SFTP session (is the sftp subsystem enabled?)")
        return sftp

    def link(self, stale: Link | None = None) -> Link:
        """The live connection (shared per target); reconnects if it died."""
        with self._lock:
            if self._closed:  # used again after close(): take a share of the link again
                self._closed = False
                POOL.acquire(self._key)
        return POOL.get(self._key, self._open, stale)

    def _channel(self, command: str, combine_stderr: bool = False) -> paramiko.Channel:
        """A new exec channel running ``command`` (reconnecting once if the link is dead)."""
        link = self.link()
        for attempt in range(2):
            try:
                chan = link.transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                                   timeout=self.timeout)
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

    def root_sh(self) -> str:
        """The root folder as a sh word (``~`` expanded by the remote shell, the rest quoted)."""
        root = self.root
        if root == "~":
            return '"$HOME"'
        if root.startswith("~/"):
            return '"$HOME"/' + shlex.quote(root[2:])
        if not root.startswith("/"):
            return '"$HOME"/' + shlex.quote(root)
        return shlex.quote(root)

    def stream_lines(self, script: str) -> ScriptLines:
        """Start a sh script on the target; iterate the result for its combined output, line by
        line, then read its ``status`` and ``tail`` (see :class:`ScriptLines`)."""
        return ScriptLines(self._channel(self._sh(script), combine_stderr=True))

    def run(self, script: str, log_prefix: str | None = None) -> tuple[int, str]:
        """Run a sh script on the target; return its exit status and combined output."""
        script_lines = self.stream_lines(script)
        out: list[str] = []
        for line in script_lines:
            out.append(line)
            if log_prefix is not None:
                log.info("%s%s", log_prefix, line)
        return script_lines.status, "\n".join(out)

    # -- the agent -----------------------------------------------------------------------------------
    def _read_marker(self, chan: paramiko.Channel) -> tuple[str, set[str], bytes]:
        """Skip login-shell chatter up to our marker line; return (state, missing, rest): ``ok`` or
        ``missing``, what is missing (``agent``, ``venv``), and what came after the marker."""
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
                        _, state, what, root = line.decode("utf-8", "replace").split(" ", 3)
                        if state == "unsafe":
                            chan.close()
                            raise unsafe_root_error(self.name, self.root, uid=what, found=root)
                        self.root = root
                        chan.settimeout(None)
                        return state, {w for w in what.split(",") if w and w != "-"}, buf
                    log.debug("login shell on %s said: %r", self.name, line[:200])
                if len(buf) > 1024 * 1024:
                    break
        except errors.UnsafeRootError:
            raise
        except TimeoutError:
            chan.close()
            raise errors.ConnectionLostError(
                f"{self.name} did not start the agent within {max(self.timeout, 30.0):g} s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            chan.close()
            raise errors.ConnectionLostError(
                f"connection to {self.name} lost while starting the agent: {exc}") from exc
        exit_status = chan.recv_exit_status() if chan.exit_status_ready() else None
        err = b""
        with contextlib.suppress(Exception):
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
        chan.close()
        if exit_status is None:
            raise errors.ConnectionLostError(f"connection to {self.name} lost while starting the agent")
        raise SSHError(
            f"could not start the agent on {self.name} (exit status {exit_status}): "
            f"{err.decode('utf-8', 'replace').strip()[-2000:] or 'no output'}"
        )

    def start_agent(self) -> ChannelStream:
        """Start the agent over a new channel (bootstrapping the host first if needed)."""
        with self._lock:
            for attempt in range(2):
                chan = self._channel(self._sh(agent_script(self.root_sh(), self.agent_env)))
                state, missing, rest = self._read_marker(chan)
                if state == "ok":
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

    def bootstrap(self, missing: Iterable[str] = ("venv", "agent")) -> None:
        """Install what is missing under the root: the venv (with its packages) and/or the agent."""
        _bootstrap.bootstrap(self, missing)

    def upload_agent(self) -> None:
        """Put this agent version into ``<root>/agent/<version>`` over SFTP (.complete last)."""
        _bootstrap.upload_agent(self)

    # -- what api uses beyond the agent -------------------------------------------------------------
    def pip_install(self, packages: Iterable[str], *pip_args: str) -> Iterator[str]:
        """Run ``<root>/venv/bin/python -m pip install ...`` on the target; yield its output lines.

        Raises :class:`RemoteCommandError` at the end if pip failed.
        """
        pkgs = " ".join(shlex.quote(p) for p in [*pip_args, *packages])
        script = f"""umask 077
R={self.root_sh()}
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
        pip = self.stream_lines(script)
        yield from pip
        if pip.status != 0:
            raise RemoteCommandError(f"pip install on {self.name} failed (exit {pip.status}): "
                                     + "\n".join(pip.tail[-5:]), pip.status, "\n".join(pip.tail))

    def open_forward(self, remote_port: int, local_port: int = 0, remote_host: str = "127.0.0.1") -> Tunnel:
        """A port forward over this target's verified link (see :mod:`.tunnel`)."""
        from .tunnel import Tunnel  # sshtunnel only once a tunnel is asked for

        return Tunnel(self.link().transport, remote_port, local_port, remote_host)

    def close(self) -> None:
        """Give back this transport's share of the link (the last share closes it)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                POOL.release(self._key)
