"""How bytes and commands move between this process and a target."""

from .base import Transport, agent_sources, agent_version

__all__ = ["Transport", "agent_sources", "agent_version"]
