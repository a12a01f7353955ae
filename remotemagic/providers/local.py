"""The ``local`` target kind: a worker process on this machine (no provider: nothing to start)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import TargetKind

if TYPE_CHECKING:  # pragma: no cover
    from ..api import Remote


def default_local_root() -> Path:
    """Where the local backend keeps its sessions: ``REMOTEMAGIC_LOCAL_ROOT``, else under the state folder."""
    from .. import state

    env = os.environ.get("REMOTEMAGIC_LOCAL_ROOT")
    return Path(env) if env else state.state_dir() / "local-target"


class LocalKind(TargetKind):
    name = "local"
    usage = "local"
    noun = "this machine"
    target_forms = ("'local'",)

    def open(self, target: str, *, session: str, root: str | None = None, **options: Any) -> Remote:
        from ..api import Remote
        from ..transport.local import LocalTransport

        path = root or (target[6:] if target.startswith("local:") else None) or default_local_root()
        remote = Remote(LocalTransport(path), session=session, cwd=options.pop("cwd", os.getcwd()), **options)
        remote.connect_args = {"target": "local", "root": str(Path(path).resolve()), "cwd": remote.cwd}
        return remote

    def connect(self, config: Any, address: str | None, *, root: str | None, session: str | None,
                options: dict[str, Any], python: str | None = None, trust: bool = False,
                ssh_config: str | None = None, start: bool = False,
                launch: dict[str, Any] | None = None) -> Remote:
        from ..connecting import connect

        return connect("local", session=session, root=root or config.local_root or None, **options)


KIND = LocalKind()
