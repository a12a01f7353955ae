"""The embedded local backend: the agent is a subprocess on this machine.

Nothing to install and no network: the same agent, workers and on-disk layout as on a remote
host, under a local root folder, so everything but the link itself is exercised for real.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from .. import errors
from ..agent import files
from .base import AGENT_PACKAGE, Forward, Transport, agent_sources, agent_version


class PipeStream:
    """The agent subprocess's stdin/stdout as an AgentStream."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self._in = cast(io.RawIOBase, proc.stdout)  # unbuffered (bufsize=0): a FileIO
        self._out = proc.stdin

    def readinto(self, view: memoryview) -> int:
        try:
            return self._in.readinto(view) or 0
        except (OSError, ValueError):
            return 0

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._out.write(view)
            if n is None:
                n = 0
            view = view[n:]

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        for f in (self._out, self._in):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LocalTransport(Transport):
    """Runs the agent with this interpreter under ``root`` (0700)."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]):
        super().__init__()
        self.root = str(Path(root).expanduser().resolve())
        self.name = f"local:{self.root}"
        self.python = sys.executable

    def check_root(self) -> None:
        """Refuse a root, or an agent version under it, that another user owns or could have
        written into: the agent runs from there as us (and unpickles what it finds)."""
        try:
            if os.path.lexists(self.root):
                files.check_tree(self.root, depth=1, what="root folder")
            agent = os.path.join(self.root, "agent")
            if os.path.lexists(agent):
                files.check_tree(agent, depth=1, what="agent folder")
            vdir = os.path.join(agent, agent_version())
            if os.path.lexists(vdir):
                files.check_tree(vdir, what="agent version folder")
        except PermissionError as exc:
            raise errors.UnsafeRootError(f"{self.name}: {exc}") from None

    def ship_agent(self) -> str:
        """Copy the agent source into its versioned folder (once per version); return it.
        Nothing from the root is used before :meth:`check_root` accepted it."""
        self.check_root()
        vdir = os.path.join(self.root, "agent", agent_version())
        pkg = os.path.join(vdir, AGENT_PACKAGE)
        marker = os.path.join(pkg, ".complete")
        try:
            files.private_dir(self.root)
        except OSError as exc:
            raise errors.RootFolderError(
                f"cannot create the local target's root folder {self.root}: {exc.strerror or exc}. "
                "Choose a folder you can write (--root, Ec2Magics.local_root or REMOTEMAGIC_LOCAL_ROOT)"
            ) from None
        if not os.path.exists(marker):
            files.private_dir(pkg)
            for name, data in agent_sources().items():
                files.atomic_write(os.path.join(pkg, name), [data])
            files.atomic_write(marker, [agent_version().encode()])
        return vdir

    def start_agent(self) -> PipeStream:
        vdir = self.ship_agent()
        env = {**os.environ, **self.agent_env}
        env["PYTHONPATH"] = vdir
        log_path = os.path.join(self.root, "agent.log")
        log = open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(
            [self.python, "-m", f"{AGENT_PACKAGE}.server", self.root],
            cwd=vdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
            close_fds=True,
            umask=0o077,  # from the start: what Python writes there (__pycache__) is ours alone
        )
        log.close()
        return PipeStream(proc)

    def pip_install(self, packages: Iterable[str], *pip_args: str) -> Iterator[str]:
        """The local backend runs this interpreter: install into its environment."""
        cmd = [self.python, "-m", "pip", "install", "--disable-pip-version-check", *pip_args, *packages]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = [*tail[-29:], line.rstrip("\n")]
            yield line.rstrip("\n")
        if proc.wait() != 0:
            raise RuntimeError("pip install failed:\n" + "\n".join(tail[-5:]))

    def open_forward(self, remote_port: int, local_port: int = 0, remote_host: str = "127.0.0.1") -> Forward:
        """Nothing to forward: the agent's ports are on this machine already."""
        raise ValueError(f"{self.name} is this machine: port {remote_port} needs no tunnel")
