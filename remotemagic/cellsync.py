"""A job's events as the outputs of the notebook cell that started it (nbformat 4 shape).

The Jupyter server extension (:mod:`remotemagic.jupyter`) serves these per cell; the
JupyterLab extension puts them into the cell. Rendering the whole log each time (instead of
appending deltas) is what makes every line appear exactly once, however often a page asks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from . import state
from .agent import protocol

RUN_PREFIX = "%%ec2 run"


def outputs_from_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """nbformat outputs for a job's events, as a live cell would have ended up showing them."""
    outs: list[dict[str, Any]] = []
    by_display: dict[str, list[dict[str, Any]]] = {}
    clear_pending = False
    for ev in events:
        kind = ev.get("type")
        if kind not in ("stream", "display_data", "execute_result", "update_display_data", "error", "clear_output"):
            continue
        if kind == "clear_output":
            if ev.get("wait"):
                clear_pending = True
            else:
                outs.clear()
                by_display.clear()
            continue
        if kind == "update_display_data":
            did = (ev.get("transient") or {}).get("display_id")
            for shown in by_display.get(did, []) if did else []:
                shown["data"] = ev.get("data") or {}
                shown["metadata"] = ev.get("metadata") or {}
            continue
        if clear_pending:
            outs.clear()
            by_display.clear()
            clear_pending = False
        if kind == "stream":
            name = ev.get("name") if ev.get("name") in ("stdout", "stderr") else "stdout"
            text = ev.get("text", "")
            if outs and outs[-1]["output_type"] == "stream" and outs[-1]["name"] == name:
                outs[-1]["text"] += text
            else:
                outs.append({"output_type": "stream", "name": name, "text": text})
        elif kind == "error":
            outs.append({"output_type": "error", "ename": ev.get("ename", ""), "evalue": ev.get("evalue", ""),
                         "traceback": list(ev.get("traceback") or [])})
        else:
            o: dict[str, Any] = {"output_type": kind, "data": ev.get("data") or {},
                                 "metadata": ev.get("metadata") or {}}
            if kind == "execute_result":
                o["execution_count"] = ev.get("execution_count")
            outs.append(o)
            did = (ev.get("transient") or {}).get("display_id")
            if did:
                by_display.setdefault(did, []).append(o)
    return outs


def same_notebook(origin_path: str, api_path: str, root_dir: str = "") -> bool:
    """Whether a job's ``origin.notebook`` (Jupyter's session path: relative to the server's root,
    or absolute in some versions) names the notebook at ``api_path``."""
    if not origin_path:
        return False
    a, b = origin_path.strip("/"), api_path.strip("/")
    if a == b:
        return True
    if root_dir and os.path.isabs(origin_path):
        return os.path.normpath(origin_path) == os.path.normpath(os.path.join(root_dir, b))
    return False


def cell_jobs(root: Path, api_path: str, root_dir: str = "") -> dict[str, dict[str, Any]]:
    """The newest job of each cell of the notebook at ``api_path``, by cell id."""
    latest: dict[str, dict[str, Any]] = {}
    for meta in state.list_jobs(root):  # oldest first: newer ones replace older ones
        origin = meta.get("origin") or {}
        if origin.get("cell_id") and meta.get("kind", "cell") == "cell" and \
                same_notebook(origin.get("notebook", ""), api_path, root_dir):
            latest[origin["cell_id"]] = meta
    return latest


def cell_view(root: Path, meta: dict[str, Any], have_offset: int | None = None) -> dict[str, Any]:
    """What a page needs to fill one cell: job id, state, log size, and (if changed) the outputs."""
    rec = state.JobRecord(root, meta["id"])
    offset = rec.offset
    view: dict[str, Any] = {"job": meta["id"], "state": meta.get("state"), "offset": offset,
                            "finished": meta.get("state") in protocol.TERMINAL, "code": meta.get("code", ""),
                            "client": (meta.get("origin") or {}).get("client", ""),
                            "detached": bool(meta.get("detached"))}
    if have_offset != offset:
        view["outputs"] = outputs_from_events(rec.events())
    return view


def follower_alive(meta: dict[str, Any]) -> bool:
    """Whether a process on this machine is mirroring the job's log right now."""
    pid = meta.get("follower")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

