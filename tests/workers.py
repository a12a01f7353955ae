"""Stopping the detached workers a test started (they outlive agents by design)."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

from remotemagic.agent import files


def stop_workers(root: str | os.PathLike[str]) -> None:
    """Stop every worker (and its supervisor) under a target root."""
    sroot = Path(root) / "sessions"
    if not sroot.exists():
        return
    for sdir in sroot.iterdir():
        info = files.read_json(str(sdir / "worker.json"), {}) or {}
        pid = info.get("pid")
        if pid:
            try:
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    for sdir in sroot.iterdir():
        while time.monotonic() < deadline:
            try:
                with open(sdir / "lock", "a+") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.02)
