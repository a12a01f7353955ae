"""Bootstrap help for SSH hosts: bring uv to a bare host, fill a new venv with the agent's packages.

A host whose ``python3`` has no ``venv``/``ensurepip``/``virtualenv``/``pip`` and no ``uv``
(Ubuntu's cloud images, minimal containers) gets uv from here: the uv wheel for its platform
(from the local cache, else the package index) is unpacked here and its binary shipped over
SFTP to ``<root>/tools/uv/bin/uv``. The venv then gets cloudpickle and IPython with their
requirements at this kernel's versions, from the host's index or as shipped wheels.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from . import localenv, wheels
from .sync import syncer
from .target import TargetError

log = logging.getLogger(__name__)

AGENT_DISTS = frozenset({"cloudpickle", "ipython"})
#: Installed with them when this kernel has them: the agent uses them if present (zstd on the wire).
AGENT_OPTIONAL = frozenset({"zstandard"})


def probe_platform(info: dict[str, Any], python: tuple[int, int]) -> wheels.Platform:
    """The target's platform from the bootstrap probe (its interpreter's answers)."""
    m = re.match(r"glibc (\d+)\.(\d+)", info.get("libc") or "")
    glibc = (int(m.group(1)), int(m.group(2))) if m else None
    return wheels.Platform(info.get("machine") or "?", glibc, python, info.get("system") or "Linux")


def ship_uv(transport: Any, info: dict[str, Any], python: tuple[int, int]) -> str:
    """Ship uv for the target's platform; return its path there. Raises ``BootstrapError``."""
    from ..transport.ssh.errors import BootstrapError

    plat = probe_platform(info, python)
    try:
        exe = wheels.uv_binary(plat)
    except wheels.NoWheelError as exc:
        raise BootstrapError(
            f"{transport.name}: its Python has no venv, ensurepip, virtualenv or pip and there is no uv, and "
            f"remotemagic cannot bring uv for it: {exc}. Install python3-venv (or uv) on the host"
        ) from None
    log.info("%s: shipping uv (%s) for %s", transport.name, exe.parent.name, plat.describe())
    try:
        return syncer(transport).target.ship_uv(exe)
    except TargetError as exc:
        raise BootstrapError(f"{transport.name}: {exc}") from None


def install_agent_packages(transport: Any, offline: bool = False) -> None:
    """cloudpickle and IPython (and what they require) at the local versions, into ``<root>/venv``."""
    from ..transport.ssh.errors import BootstrapError

    env = localenv.current()
    missing = sorted(AGENT_DISTS - set(env.dists))
    if missing:
        raise BootstrapError(f"this kernel's environment lacks {', '.join(missing)}")
    s = syncer(transport)
    with s.lock:
        s.invalidate()
        try:
            rows = s.plan(env.closure(AGENT_DISTS | (AGENT_OPTIONAL & set(env.dists))), "exact")
            s.apply(rows, offline=offline)
        except TargetError as exc:
            raise BootstrapError(f"{transport.name}: installing the agent's packages into {transport.root}/venv "
                                 f"failed: {exc}") from None
    skipped = [r for r in rows if r.action == "skip" and r.name not in AGENT_OPTIONAL]
    if skipped:
        raise BootstrapError(f"{transport.name}: cannot install the agent's packages into {transport.root}/venv: "
                             + "; ".join(f"{r.name}=={r.local}: {r.why}" for r in skipped))
