"""The target's Python environment follows the notebook: package sync, bare hosts, offline hosts.

- :mod:`.needs`: which modules a job needs (cell imports, modules its pickles name);
- :mod:`.localenv`: which local distributions (and versions, and requirements) provide them;
- :mod:`.wheels`: wheels for the target's platform, fetched here into a local cache;
- :mod:`.target`: the target's venv over SSH -- query, install (uv, else pip), ship over SFTP;
- :mod:`.sync`: the per-job check and install, and ``%ec2 sync``'s plan;
- :mod:`.bootstrap`: a venv with cloudpickle and IPython on any host, bare ones included.
"""

from . import needs
from .sync import (
                   MODES,
                   PackageSyncError,
                   Row,
                   before_upload,
                   format_rows,
                   installed_record,
                   invalidate,
                   notify,
                   supported,
                   sync_rows,
                   syncer,
)

__all__ = ["MODES", "PackageSyncError", "Row", "before_upload", "format_rows", "installed_record", "invalidate", "needs",
           "notify", "supported", "sync_rows", "syncer"]
