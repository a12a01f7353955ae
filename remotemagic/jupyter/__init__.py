"""Jupyter server extension: puts each ``%%ec2 run`` cell's output back into that cell.

Enabled by ``pip install remotemagic[jupyter]`` (``jupyter_server_config.d/remotemagic.json``).
It does three things, all in the Jupyter server process:

* publishes which pages (client ids) are connected to each kernel, to
  ``<state>/frontends/<kernel id>.json``: a foreground cell whose page went away detaches, so
  the kernel answers a reopened page at once (:class:`remotemagic.notebook.FrontendWatch`);
* serves ``GET /remotemagic/cells?path=NOTEBOOK``: for each cell of that notebook, its newest
  job and that job's outputs rendered from the local event-log mirror (the JupyterLab
  extension puts them into the cell, live while the job runs);
* keeps mirroring a job of an open notebook that no process follows any more (its kernel
  detached or was restarted), by reconnecting to the target the way the kernel did.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .. import api, cellsync, jobs, notebook, state
from ..agent import protocol

log = logging.getLogger(__name__)

PUBLISH_EVERY_MS = 200


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "remotemagic.jupyter"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "remotemagic"}]


class FrontendPublisher:
    """Writes the client ids connected to each running kernel whenever they change."""

    def __init__(self, kernel_manager: Any, root: Path):
        self.kernel_manager = kernel_manager
        self.root = root
        self.last: dict[str, list[str]] = {}

    def open_sessions(self) -> dict[str, list[str]]:
        from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

        out: dict[str, list[str]] = {kid: [] for kid in self.kernel_manager.list_kernel_ids()}
        for key in list(ZMQChannelsWebsocketConnection._open_sessions):
            kid, _, client = key.partition(":")
            if kid in out and client:
                out[kid].append(client)
        return {k: sorted(v) for k, v in out.items()}

    def publish(self) -> None:
        try:
            now = self.open_sessions()
            for kid, clients in now.items():
                if self.last.get(kid) != clients:
                    notebook.write_frontends(kid, clients, self.root)
            for kid in set(self.last) - set(now):  # kernel gone: nobody reads its file any more
                try:
                    notebook.frontends_file(kid, self.root).unlink()
                except (FileNotFoundError, ValueError):
                    pass
            self.last = now
        except Exception:  # never let the periodic callback die
            log.exception("remotemagic: publishing connected pages failed")


class Mirrors:
    """Follows jobs that nobody mirrors any more, one thread each, until they end."""

    def __init__(self, root: Path):
        self.root = root
        self.threads: dict[str, threading.Thread] = {}
        self.failed: dict[str, float] = {}
        self.lock = threading.Lock()

    def ensure(self, meta: dict[str, Any]) -> None:
        job_id = meta["id"]
        if meta.get("state") in protocol.TERMINAL or not meta.get("reconnect") or cellsync.follower_alive(meta):
            return
        with self.lock:
            t = self.threads.get(job_id)
            if (t is not None and t.is_alive()) or time.monotonic() - self.failed.get(job_id, -1e9) < 10:
                return
            t = threading.Thread(target=self._follow, args=(meta,), name=f"remotemagic-mirror-{job_id}", daemon=True)
            self.threads[job_id] = t
            t.start()

    def _follow(self, meta: dict[str, Any]) -> None:
        args = dict(meta["reconnect"])
        target = args.pop("target")
        try:
            remote = api.connect(target, session=meta.get("session") or "default", show_progress=False,
                                 state_root=str(self.root), **args)
        except Exception as exc:
            log.warning("remotemagic: cannot reach %s to mirror job %s: %s", target, meta["id"], exc)
            self.failed[meta["id"]] = time.monotonic()
            return
        try:
            remote.prefetch_outputs = False
            jobs.Job(remote, meta["id"]).follow()
        except Exception as exc:
            log.warning("remotemagic: mirroring job %s stopped: %s", meta["id"], exc)
            self.failed[meta["id"]] = time.monotonic()
        finally:
            remote.close()


def _handlers(root: Path, root_dir: str, mirrors: Mirrors) -> list[Any]:
    from jupyter_server.base.handlers import APIHandler
    from tornado import web

    class CellsHandler(APIHandler):
        @web.authenticated
        def get(self) -> None:
            path = self.get_argument("path")
            have: dict[str, int] = {}
            for item in filter(None, self.get_argument("have", "").split(",")):
                job, _, off = item.partition(":")
                if off.isdigit():
                    have[job] = int(off)
            cells = {}
            for cell_id, meta in cellsync.cell_jobs(root, path, root_dir).items():
                mirrors.ensure(meta)
                cells[cell_id] = cellsync.cell_view(root, meta, have.get(meta["id"]))
            self.finish(json.dumps({"cells": cells, "prefix": cellsync.RUN_PREFIX}))

    return [(r"/remotemagic/cells", CellsHandler)]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join
    from tornado.ioloop import PeriodicCallback

    root = state.state_dir()
    root_dir = os.path.abspath(os.path.expanduser(getattr(serverapp, "root_dir", "") or os.getcwd()))
    mirrors = Mirrors(root)
    base = serverapp.web_app.settings.get("base_url", "/")
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base, pattern), handler)
                                           for pattern, handler in _handlers(root, root_dir, mirrors)])
    publisher = FrontendPublisher(serverapp.kernel_manager, root)
    callback = PeriodicCallback(publisher.publish, PUBLISH_EVERY_MS)
    callback.start()
    serverapp.web_app.settings["remotemagic_publisher"] = callback
    serverapp.log.info("remotemagic: cell outputs come back from %s", root)


# the names jupyter_server looks for
load_jupyter_server_extension = _load_jupyter_server_extension
