"""remotemagic: run notebook cells on a bigger machine, with nothing lost.

``%load_ext remotemagic`` registers ``%ec2`` / ``%%ec2`` and ``%ec2_store``; from plain Python,
``remotemagic.connect(target)`` returns a :class:`Remote` with the same verbs.
"""

from __future__ import annotations

import logging
from typing import Any

from .api import Job, Remote, connect, connect_ec2
from .errors import (
    ConnectionLostError,
    MissingOutputError,
    RemoteError,
    RemoteMagicError,
    UnknownJobError,
    UnpicklableValueError,
    VersionMismatchError,
)

__version__ = "0.1.0"
__all__ = [
    "connect", "connect_ec2", "Remote", "Job", "RemoteMagicError", "RemoteError", "ConnectionLostError",
    "MissingOutputError", "UnknownJobError", "UnpicklableValueError", "VersionMismatchError",
    "load_ipython_extension", "unload_ipython_extension",
]

logging.getLogger("remotemagic").addHandler(logging.NullHandler())


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext remotemagic``."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext remotemagic``: close connections, remove the magics."""
    from .magics import unload

    unload(ipython)
