"""The local state folder: an index of every job and a byte-exact mirror of its event log.

``<state>/jobs/<id>/meta.json`` says which target and session ran the job, its code and its
``-o`` names; ``events.jsonl`` holds the bytes of the remote event log received so far, so the
mirror's size *is* the offset to resume streaming from, and ``%ec2 output JOB`` re-renders a
job in a new kernel even when its target is gone.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import platformdirs

from .agent import files, protocol


def state_dir() -> Path:
    """``$REMOTEMAGIC_STATE_DIR``, else the platform's user state folder."""
    env = os.environ.get("REMOTEMAGIC_STATE_DIR")
    path = Path(env) if env else Path(platformdirs.user_state_dir("remotemagic"))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def new_job_id() -> str:
    """A sortable, unique job id: UTC time to the millisecond, then 16 random bits."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{random.getrandbits(16):04x}"


class JobRecord:
    """One job in the local index."""

    def __init__(self, root: Path, job_id: str):
        self.id = protocol.check_job_id(job_id)
        self.dir = root / "jobs" / job_id
        self.events_path = self.dir / "events.jsonl"

    @property
    def exists(self) -> bool:
        return (self.dir / "meta.json").exists()

    def create(self, **meta: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_meta({"id": self.id, **meta})
        self.events_path.touch(mode=0o600, exist_ok=True)

    @property
    def meta(self) -> dict[str, Any]:
        return files.read_json(str(self.dir / "meta.json"), {}) or {}

    def update(self, release: int | None = None, **changes: Any) -> None:
        """Apply ``changes``; with ``release`` (a pid), also clear ``follower`` if that process
        is still the one named there -- in the same locked read-modify-write."""
        with self._lock():
            meta = self.meta
            meta.update(changes)
            if release is not None and meta.get("follower") == release:
                meta["follower"] = None
            self._write_meta(meta)

    def _write_meta(self, meta: dict[str, Any]) -> None:
        """Atomic (a reader sees the whole old or new record) but not fsynced: two fsyncs per
        write were most of a warm cell's local cost, and this index is a cache -- the target
        keeps every job's spec, status and log durably, and ``sync`` fills the mirror again."""
        files.atomic_write(str(self.dir / "meta.json"), [json.dumps(meta, indent=1, sort_keys=True).encode()],
                           durable=False)

    @property
    def offset(self) -> int:
        try:
            return self.events_path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, offset: int, data: bytes | bytearray) -> bytes:
        """Append the log bytes that start at ``offset``; return only the bytes that were new.

        Two readers of one job (two kernels) may both mirror it: whatever overlaps what is
        already here is dropped, so the mirror never holds a byte twice or skips one.
        """
        with self._lock():
            size = self.offset
            if offset > size:
                raise ValueError(f"gap in the event log of {self.id}: have {size} bytes, got data at {offset}")
            new = bytes(data[size - offset :]) if offset + len(data) > size else b""
            if new:
                with open(self.events_path, "ab") as f:
                    f.write(new)
            return new

    def events(self, start: int = 0) -> Iterator[dict[str, Any]]:
        try:
            with open(self.events_path, "rb") as f:
                f.seek(start)
                for line in f:
                    if line.endswith(b"\n"):
                        yield json.loads(line)
        except FileNotFoundError:
            return

    def _lock(self) -> files.locked:
        return files.locked(str(self.dir / ".lock"))


def list_jobs(root: Path, target: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    jdir = root / "jobs"
    if not jdir.exists():
        return out
    for name in sorted(os.listdir(jdir)):
        if not protocol.JOB_RE.match(name):
            continue
        meta = JobRecord(root, name).meta
        if meta and (target is None or meta.get("target") == target):
            out.append(meta)
    return out
