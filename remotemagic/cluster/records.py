"""The local record of a cluster (``<state>/clusters/<id>/cluster.json``) and re-attaching to it.

The cluster's processes outlive the kernel that started them. The record says what runs where
(each member's ``connect()`` arguments, addresses and file paths, which worker runs on which
member), so a new kernel can find a running cluster, connect to its members again, reopen the
forwards and the client -- and stop it. Members reached in ways that cannot be repeated from
the record (EC2 instances; connections made with options that are not plain values) make the
cluster one that only its own kernel can manage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..agent import files
from .core import Cluster, ClusterError, Member

log = logging.getLogger(__name__)
RECORD = "cluster.json"


def save(c: Cluster) -> None:
    """Write ``c``'s record, atomically (0600 in its 0700 folder)."""
    members = _unique([c.primary, *c.members])
    index = {id(m): i for i, m in enumerate(members)}
    files.private_dir(str(c.folder))
    files.write_json(str(c.folder / RECORD), {
        "id": c.id, "kind": c.kind, "scheduler": c.address, "stopped": c.stopped, "n": c.n,
        "dashboard_port": c.dashboard_port,
        "nthreads": c.nthreads, "memory_limit": c.memory_limit, "idle_stop_minutes": c.idle_stop_minutes,
        "members": [{"target": m.remote.target, "connect": m.remote.connect_args, "address": m.address,
                     "paths": m.paths, "hourly": m.hourly, "instance_id": m.instance_id} for m in members],
        "primary": index[id(c.primary)],
        "worker_members": [index[id(m)] for m in c.members],
        "workers": {w: index[id(m)] for w, m in c.workers.items()}})


def _unique(members: list[Member]) -> list[Member]:
    return list({id(m): m for m in members}.values())


def running(state_root: str | Path) -> list[dict[str, Any]]:
    """Records of clusters not stopped, newest first."""
    top = Path(state_root) / "clusters"
    out = []
    for folder in sorted(top.iterdir(), reverse=True) if top.is_dir() else []:
        rec = files.read_json(str(folder / RECORD))
        if rec and not rec.get("stopped") and rec.get("scheduler"):
            out.append(rec)
    return out


def reattach(rec: dict[str, Any], state_root: str | Path, connect: Any = None) -> Cluster:
    """A :class:`Cluster` for a record, its members connected again (``connect(**args)``,
    default :func:`remotemagic.api.connect`). The client is made by ``Cluster.connect()``."""
    from .. import api

    connect = connect or (lambda target, **kw: api.connect(target, **kw))
    remotes: list[Any] = []
    try:
        members = []
        for m in rec["members"]:
            args = dict(m.get("connect") or {})
            if not args.get("target"):
                raise ClusterError(f"cluster {rec['id']}: {m['target']} cannot be reached again from its record "
                                   "(only the kernel that started the cluster can manage it)")
            target = args.pop("target")
            remote = connect(target, state_root=str(state_root), **{k: v for k, v in args.items() if v is not None})
            remotes.append(remote)
            members.append(Member(remote, m["address"], dict(m.get("paths") or {}), m.get("hourly"),
                                  m.get("instance_id")))
        c = Cluster(rec["id"], rec["kind"], members[rec["primary"]], [members[i] for i in rec["worker_members"]],
                    nthreads=rec.get("nthreads", 1), idle_stop_minutes=rec.get("idle_stop_minutes", 0),
                    memory_limit=rec.get("memory_limit", "auto"), state_root=Path(state_root))
        c.local_paths = {p.name: str(p) for p in (c.folder / "tls").iterdir()}
        c.address = rec["scheduler"]
        c.workers = {w: members[i] for w, i in rec["workers"].items()}
        c.n = rec["n"]
        c.dashboard_port = rec.get("dashboard_port")
        c.owned = list(remotes)
        c.open_forwards()
        return c
    except BaseException:
        for r in remotes:
            r.close()
        raise
