"""Moved to :mod:`remotemagic.transport.ssh.errors`: this re-export goes once nothing imports it."""

from .ssh.errors import *  # noqa: F403
from .ssh.errors import __all__  # noqa: F401
