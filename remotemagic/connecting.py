"""``connect(target)``: find the target's kind in the registry and let it open a :class:`~remotemagic.api.Remote`.

Nothing kind-specific is here: each kind (:mod:`remotemagic.providers.registry`) parses its own
target form and takes its own options. ``remotemagic.api`` re-exports these names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .providers import registry
from .providers.local import default_local_root

if TYPE_CHECKING:  # pragma: no cover
    from .api import Remote

__all__ = ["connect", "connect_ec2", "default_local_root", "default_session"]


def default_session() -> str:
    """The notebook's file name when Jupyter tells us (``JPY_SESSION_NAME``), else ``default``."""
    name = os.environ.get("JPY_SESSION_NAME", "")
    stem = Path(name).stem if name else ""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:64]
    return stem or "default"


def connect(target: str = "local", *, session: str | None = None, root: str | None = None, **options: Any) -> Remote:
    """Connect to a target and return a :class:`~remotemagic.api.Remote`.

    ``target`` is ``"local"`` (a worker process on this machine under ``root``),
    ``"ssh://user@host:port"``, ``"ssh:ALIAS"`` (an SSH config alias) or ``"ssh"`` with
    ``host=...``, ``"ec2:NAME"`` (one of our EC2 instances, see :func:`connect_ec2`), or
    ``"fleet:NAME"`` (the primary host of an SSH fleet, see :mod:`remotemagic.providers.fleet`).
    ``session`` names the remote namespace (default: the notebook's name, else ``default``).
    The other options are the :class:`~remotemagic.api.Remote`'s and the kind's own.
    """
    kind = registry.for_target(target)
    return kind.open(target, session=session or default_session(), root=root, **options)


def connect_ec2(name: str, *, session: str | None = None, root: str | None = None, start: bool = True,
                provider: Any = None, **options: Any) -> Remote:
    """Attach to our instance ``name`` -- starting it if stopped, launching it if there is none
    (``start=False``: only attach to a running one) -- and connect over SSH.

    Options: ``region``, ``profile``, ``instance_type``, ``spot`` (``fallback``: on-demand when
    there is no spot capacity), ``ami``, ``disk_gb``,
    ``key_name``, ``key_file``, ``user``, ``ssh_cidrs``, ``idle_stop_minutes``, and the SSH
    options of :func:`connect` (``ssh_config``, ``known_hosts``, ``python``...)."""
    from .providers.ec2.kind import connect_ec2 as connect_instance

    return connect_instance(name, session=session, root=root, start=start, provider=provider, **options)
