"""Which notebook and cell a job comes from, and which pages are looking at this kernel.

Jupyter tells a kernel little about its frontends: each execute request carries the cell id in
its metadata (``cellId``, JupyterLab and Notebook 7) and the page's client id as the header's
``session``; the notebook path is in ``JPY_SESSION_NAME``. Which pages are connected *now* is
known only to the Jupyter server: our server extension (:mod:`remotemagic.jupyter`) writes the
client ids connected to each kernel to ``<state>/frontends/<kernel id>.json``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from . import state
from .agent import files, protocol


def notebook_path() -> str:
    """The notebook this kernel serves (Jupyter's session path), or '' outside Jupyter."""
    return os.environ.get("JPY_SESSION_NAME", "")


def kernel_id(shell: Any = None) -> str:
    """This kernel's id, from its connection file (``kernel-<id>.json``), or ''."""
    path = ""
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        app = getattr(kernel, "parent", None)
        path = getattr(app, "connection_file", "") or ""
    if not path:
        try:
            from ipykernel.connect import get_connection_file

            path = get_connection_file()
        except Exception:  # not in an ipykernel
            return ""
    m = re.match(r"kernel-(.+)\.json$", os.path.basename(path))
    return m.group(1) if m else ""


def parent_message(shell: Any) -> dict[str, Any]:
    """The request the kernel is answering (the execute request of the running cell)."""
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return {}
    try:
        parent = kernel.get_parent("shell")
    except TypeError:  # ipykernel < 6
        parent = kernel.get_parent()
    except Exception:
        parent = {}
    return parent or getattr(shell, "parent_header", None) or {}


def current_origin(shell: Any) -> dict[str, Any]:
    """Where the running cell comes from: notebook path, cell id, the page (client) and kernel."""
    parent = parent_message(shell)
    header = parent.get("header") or {}
    meta = parent.get("metadata") or {}
    origin = {"notebook": notebook_path(), "cell_id": meta.get("cellId") or meta.get("cell_id") or "",
              "client": header.get("session", ""), "msg_id": header.get("msg_id", ""), "kernel": kernel_id(shell)}
    return {k: v for k, v in origin.items() if v}


# -- which pages are connected (written by the server extension) -------------------------------
def frontends_file(kid: str, root: Path | None = None) -> Path:
    return (root or state.state_dir()) / "frontends" / f"{protocol.check_name('kernel', kid)}.json"


def write_frontends(kid: str, clients: list[str], root: Path | None = None) -> None:
    path = frontends_file(kid, root)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    files.write_json(str(path), {"kernel": kid, "clients": sorted(clients)})


def connected_clients(kid: str, root: Path | None = None) -> list[str] | None:
    """Client ids of the pages connected to kernel ``kid``; None if no server extension says."""
    if not kid:
        return None
    try:
        with open(frontends_file(kid, root)) as f:
            return list(json.load(f).get("clients") or [])
    except (OSError, ValueError):
        return None


def starter_gone(origin: dict[str, Any], root: Path | None = None) -> bool:
    """True when the server says the page that started this cell is no longer connected."""
    clients = connected_clients(origin.get("kernel", ""), root)
    return clients is not None and bool(origin.get("client")) and origin["client"] not in clients


def others_connected(origin: dict[str, Any], root: Path | None = None) -> bool:
    """True when a page other than the one that started this cell is connected to the kernel."""
    clients = connected_clients(origin.get("kernel", ""), root)
    return any(c != origin.get("client") for c in clients or ())


# -- this notebook's jobs ----------------------------------------------------------------------
def notebook_jobs(root: Path, notebook: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
    """Jobs started from ``notebook`` (default: this kernel's), oldest first."""
    notebook = notebook_path() if notebook is None else notebook
    if not notebook:
        return []
    return [j for j in state.list_jobs(root, target) if (j.get("origin") or {}).get("notebook") == notebook]


def unwatched(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs whose output nobody saw to the end: running now, or finished after their cell let go."""
    return [j for j in jobs if not j.get("watched")]


def unwatched_notice(root: Path, told: set[str] | None = None) -> str:
    """One line about this notebook's jobs that ran or run while nobody watched, or ''.

    Jobs in ``told`` are not news: the line is said again only when there is a new one."""
    jobs = unwatched(notebook_jobs(root))
    if not jobs or (told is not None and {j["id"] for j in jobs} <= told):
        return ""
    if told is not None:
        told.update(j["id"] for j in jobs)
    last = jobs[-1]["id"][-4:]
    running = [j for j in jobs if j.get("state") not in protocol.TERMINAL]
    what = f"{len(jobs)} job(s) that ran while nobody watched" + (f" ({len(running)} not finished when last seen)"
                                                                  if running else "")
    return (f"remotemagic: {os.path.basename(notebook_path())} has {what}: %ec2 output shows the last ({last}), "
            f"%ec2 wait {last} follows it, %ec2 jobs lists them.")


class FrontendWatch:
    """While a foreground cell follows its job: if the page that started it goes away (closed,
    reloaded), interrupt the main thread so the cell detaches and the kernel is free again.

    Only acts when the server extension publishes the connected pages; the main thread tells
    the interrupt apart by :attr:`fired`. One watcher thread per process serves every cell (it
    is started by the first one): a thread started per cell cost 0.1-0.5 ms of each cell."""

    def __init__(self, origin: dict[str, Any], every: float = 0.2, grace: float = 1.0,
                 root: Path | None = None):
        self.origin = origin
        self.root = root
        self.every = every
        self.grace = grace  # a websocket that drops and comes back at once is not a page gone
        self.fired = False
        self.gone_since: float | None = None

    def __enter__(self) -> "FrontendWatch":
        if self.origin.get("kernel") and self.origin.get("client"):
            _WATCHER.watch(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _WATCHER.unwatch(self)  # once this returns, this watch interrupts nothing


class _PageWatcher:
    """The thread behind :class:`FrontendWatch`: it checks the cell being watched (one at a
    time: the main thread runs one cell) every ``every`` seconds, and sleeps while there is none."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._current: FrontendWatch | None = None
        self._thread: threading.Thread | None = None

    def watch(self, watch: FrontendWatch) -> None:
        with self._cond:
            self._current = watch
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="remotemagic-frontend-watch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def unwatch(self, watch: FrontendWatch) -> None:
        with self._cond:
            if self._current is watch:
                self._current = None

    def _run(self) -> None:
        main = threading.main_thread().ident
        assert main is not None  # the main thread is always running
        while True:
            with self._cond:
                while self._current is None:
                    self._cond.wait()
                watch = self._current
                self._cond.wait(watch.every)  # a new cell's watch wakes it early
                if self._current is not watch:
                    continue
            gone = starter_gone(watch.origin, watch.root)  # (a file read: not under the lock)
            with self._cond:
                if self._current is not watch:
                    continue
                if not gone:
                    watch.gone_since = None
                    continue
                watch.gone_since = watch.gone_since or time.monotonic()
                if time.monotonic() - watch.gone_since >= watch.grace:
                    watch.fired = True
                    self._current = None
                    signal.pthread_kill(main, signal.SIGINT)  # as a Ctrl-C would: the cell detaches


_WATCHER = _PageWatcher()
