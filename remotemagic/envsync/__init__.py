"""The target's Python environment follows the notebook: package sync, bare hosts, offline hosts.

- :mod:`.needs`: which modules a job needs (cell imports, modules its pickles name);
- :mod:`.localenv`: which local distributions (and versions, and requirements) provide them;
- :mod:`.wheels`: wheels for the target's platform, fetched here into a local cache;
- :mod:`.target`: the target's venv over SSH -- query, install (uv, else pip), ship over SFTP;
- :mod:`.sync`: the per-job check and install, and ``%ec2 sync``'s plan;
- :mod:`.bootstrap`: a venv with cloudpickle and IPython on any host, bare ones included.

Importing this package is cheap: the submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .. import errors

MODES = ("auto", "exact", "off")


class PackageSyncError(errors.RemoteMagicError):
    """A package a job needs cannot be installed on the target."""


_LAZY = {"Row": "sync", "before_upload": "sync", "format_rows": "sync", "installed_record": "sync",
         "invalidate": "sync", "notify": "sync", "supported": "sync", "sync_rows": "sync", "syncer": "sync"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("needs", "localenv", "wheels", "target", "sync", "bootstrap"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", "PackageSyncError", "Row", "before_upload", "format_rows", "installed_record", "invalidate",
           "needs", "notify", "supported", "sync_rows", "syncer"]
