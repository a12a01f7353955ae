"""Moved to :mod:`remotemagic.transport.ssh.config`: this re-export goes once nothing imports it."""

from .transport.ssh.config import HostConfig, load_config, parse_target, resolve  # noqa: F401
