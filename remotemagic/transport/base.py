"""The transport interface, and the agent source that every transport ships.

A transport knows how to reach one target: start the agent there as a long-lived process whose
stdin/stdout become one ``AgentStream``, install packages into the agent's environment, and
forward a local port to a port on the target. :class:`Transport` declares everything the rest
of remotemagic (``api``) may call on one; what a transport does beyond that (SSH's ``run``,
``link``, SFTP) belongs to its own package and its own callers. Shipping the agent (into
``<root>/agent/<version>/remotemagic_agent``) is the same for all transports.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from ..connection import AgentStream

AGENT_PACKAGE = "remotemagic_agent"


@lru_cache(maxsize=1)
def agent_sources() -> dict[str, bytes]:
    """The agent's source files by name (the local ``remotemagic/agent`` folder)."""
    folder = Path(__file__).resolve().parent.parent / "agent"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.py"))}


@lru_cache(maxsize=1)
def agent_version() -> str:
    """A hash of the agent's sources: local and remote can never disagree on protocol."""
    h = hashlib.sha256()
    for name, data in agent_sources().items():
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


class Forward(Protocol):
    """One open port forward: ``127.0.0.1:local_port`` here -> ``remote_host:remote_port`` there."""

    local_port: int
    remote_port: int
    remote_host: str

    @property
    def active(self) -> bool:
        """Whether it still forwards."""
        ...

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<local_port>/``."""
        ...

    def close(self) -> None:
        """Stop forwarding (the transport's link stays open)."""
        ...


class Transport(ABC):
    """Where the agent runs and how we talk to it."""

    #: A stable name for the target, e.g. ``local:/path`` or ``ssh://user@host:22``.
    name: str
    #: The agent's root folder on the target.
    root: str
    #: True when the agent runs on this machine: its files and ports are already here.
    is_local: bool = False

    def __init__(self) -> None:
        #: Environment for the agent and the workers it starts (e.g. REMOTEMAGIC_SPOT=1 on spot
        #: instances); set before :meth:`start_agent`.
        self.agent_env: dict[str, str] = {}
        #: Install packages from wheels shipped from here, never from the target's package index.
        self.offline_install = False

    @abstractmethod
    def start_agent(self) -> AgentStream:
        """Ship the agent if this version is not there yet, start it, return its stream."""

    @abstractmethod
    def pip_install(self, packages: Iterable[str], *pip_args: str) -> Iterator[str]:
        """``pip install`` into the agent's Python environment; yield pip's output lines, and
        raise at the end if it failed."""

    def open_forward(self, remote_port: int, local_port: int = 0, remote_host: str = "127.0.0.1") -> Forward:
        """Forward ``127.0.0.1:local_port`` here (0: any free port) to ``remote_host:remote_port``
        as the target sees it. ``ValueError`` for a bad or busy port, or a target that needs none."""
        raise ValueError(f"{self.name} has no port forwarding")

    def close(self) -> None:
        """Release the link (the agent exits; workers keep running)."""
