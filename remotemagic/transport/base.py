"""The transport interface, and the agent source that every transport ships.

A transport knows how to reach one target: run a short command there, write a file there, and
start the agent as a long-lived process whose stdin/stdout become one ``AgentStream``. Shipping
the agent (into ``<root>/agent/<version>/remotemagic_agent``) is the same for all transports.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

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


class Transport(ABC):
    """Where the agent runs and how we talk to it."""

    #: A stable name for the target, e.g. ``local:/path`` or ``ssh://user@host:22``.
    name: str
    #: The agent's root folder on the target.
    root: str

    @abstractmethod
    def start_agent(self) -> AgentStream:
        """Ship the agent if this version is not there yet, start it, return its stream."""

    def close(self) -> None:
        """Release the link (the agent exits; workers keep running)."""

    def describe(self) -> str:
        return self.name
