"""Coming back to the notebook, with real Jupyter kernels (jupyter_client): jobs know their
notebook and cell, `%ec2 output` / `%ec2 wait` need no id in a new kernel, `%load_ext` says
what ran unwatched, and a foreground job lets go of the kernel when its page is gone.

The connected pages are what the Jupyter server extension publishes
(`<state>/frontends/<kernel>.json`); here the test writes that file itself, as the server would
(the browser tests cover the server writing it).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from remotemagic import notebook, state

from .conftest import wait_for
from .test_reliability import Kernel, collect
from .workers import stop_workers

NOTEBOOK_NAME = "a-notebook-with-a-long-name.ipynb"

WAITING_CELL = (
    "%%ec2 run\n"
    "import os, time\n"
    "for i in range(3):\n"
    "    print('line', i, flush=True)\n"
    "while not os.path.exists({go!r}):\n"
    "    time.sleep(0.05)\n"
    "print('after the go-ahead', flush=True)\n"
)


class NotebookKernel(Kernel):
    """A kernel as Jupyter starts one for a notebook: JPY_SESSION_NAME set, cell ids sent, and
    a connection file named ``kernel-<kernel id>.json`` as the Jupyter server names it."""

    def __init__(self, env: dict[str, str], runtime: Path):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.connection_file = str(runtime / f"kernel-{uuid.uuid4()}.json")
        self.km.start_kernel(env=env)
        self.kc = self.connect()

    def run_cell(self, code: str, cell_id: str, kc: Any = None) -> str:
        kc = kc or self.kc
        msg = kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                                 "user_expressions": {}, "allow_stdin": False,
                                                 "stop_on_error": True})
        msg["metadata"]["cellId"] = cell_id
        kc.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    @property
    def kernel_id(self) -> str:
        return re.match(r"kernel-(.+)\.json$", os.path.basename(self.km.connection_file)).group(1)


@pytest.fixture
def nb(tmp_path: Path, _isolated_state: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path / "target"
    env = dict(os.environ, REMOTEMAGIC_STATE_DIR=str(_isolated_state), JPY_SESSION_NAME=str(tmp_path / NOTEBOOK_NAME))
    kernels: list[NotebookKernel] = []

    def start() -> NotebookKernel:
        k = NotebookKernel(env, tmp_path)
        kernels.append(k)
        return k

    try:
        yield {"start": start, "use": f"%load_ext remotemagic\n%ec2 use local --root {root}", "root": root,
               "state": _isolated_state, "go": tmp_path / "go", "path": env["JPY_SESSION_NAME"]}
    finally:
        for k in kernels:
            k.stop()
        stop_workers(root)


def only_job(state_dir: Path) -> dict[str, Any]:
    jobs = [j for j in state.list_jobs(state_dir) if j.get("kind") == "cell"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def target_state(root: Path, job_id: str) -> str:
    return json.loads((root / "jobs" / job_id / "status.json").read_text()).get("state", "")


def test_job_records_notebook_and_cell_and_jobs_shows_them(nb: dict[str, Any]) -> None:
    k = nb["start"]()
    k.execute(nb["use"])
    text, errs = collect(k.kc, k.run_cell("%%ec2 run\nprint('hello from the cell')", "cell-1234abcd"), 60)
    assert not errs and "hello from the cell" in text
    job = only_job(nb["state"])
    assert job["origin"]["notebook"] == nb["path"]
    assert job["origin"]["cell_id"] == "cell-1234abcd"
    assert job["origin"]["kernel"] == k.kernel_id and job["origin"]["client"] == k.kc.session.session
    listing, errs = k.execute("%ec2 jobs")
    assert not errs
    row = next(line for line in listing.splitlines() if line.startswith(job["id"]))
    assert "a-notebook-with-a-long-name " in row  # the whole session name, not cut to 12 characters
    assert f"{nb['path']}/cell-123" in row


def test_page_gone_detaches_then_new_kernel_needs_no_id(nb: dict[str, Any]) -> None:
    k = nb["start"]()
    k.execute(nb["use"])
    notebook.write_frontends(k.kernel_id, [k.kc.session.session], nb["state"])  # the page is connected
    msg_id = k.run_cell(WAITING_CELL.format(go=str(nb["go"])), "cell-a")
    collect(k.kc, msg_id, 60, until="line 2\n")
    job = only_job(nb["state"])
    # the page is closed: the server extension says no page is connected any more
    notebook.write_frontends(k.kernel_id, [], nb["state"])
    t0 = time.monotonic()
    text, errs = collect(k.kc, msg_id, 30)
    assert time.monotonic() - t0 < 5, "the cell did not let go of the kernel"
    assert not errs
    assert f"Detached from job {job['id']} (the page that ran this cell was closed or reloaded)" in text
    assert f"%ec2 cancel {job['id'][-4:]}" in text
    assert target_state(nb["root"], job["id"]) == "running"  # not cancelled
    answer, errs = k.execute("print(6 * 7)", timeout=10)  # the kernel answers
    assert answer.strip() == "42"
    nb["go"].touch()
    wait_for("the job to finish on its own", lambda: target_state(nb["root"], job["id"]) == "done")

    # a new kernel for the same notebook: told about it, and no id needed
    k.stop()
    k2 = nb["start"]()
    loaded, errs = k2.execute(nb["use"])
    assert not errs
    notices = [line for line in loaded.splitlines() if "nobody watched" in line]
    assert len(notices) == 1 and job["id"][-4:] in notices[0] and "%ec2 output" in notices[0], loaded
    out, errs = k2.execute("%ec2 output")
    assert not errs
    assert [line for line in out.splitlines() if line.startswith(("line", "after"))] == \
        ["line 0", "line 1", "line 2", "after the go-ahead"]
    waited, errs = k2.execute("%ec2 wait")
    assert not errs and "after the go-ahead" in waited
    again, _ = k2.execute("%load_ext remotemagic\n%ec2 use local --root " + str(nb["root"]))
    assert "nobody watched" not in again  # seen now


def test_interrupt_from_another_page_detaches_and_says_how_to_cancel(nb: dict[str, Any]) -> None:
    k = nb["start"]()
    k.execute(nb["use"])
    starter = k.kc.session.session
    notebook.write_frontends(k.kernel_id, [starter], nb["state"])
    msg_id = k.run_cell(WAITING_CELL.format(go=str(nb["go"])), "cell-b")
    collect(k.kc, msg_id, 60, until="line 2\n")
    job = only_job(nb["state"])
    notebook.write_frontends(k.kernel_id, [starter, "another-page"], nb["state"])  # someone came back to look
    k.km.interrupt_kernel()
    text, errs = collect(k.kc, msg_id, 30)
    assert not errs
    assert f"Detached from job {job['id']} (interrupted from a page that did not start it)" in text
    assert f"%ec2 cancel {job['id'][-4:]} to stop it" in text
    assert target_state(nb["root"], job["id"]) == "running"
    out, errs = k.execute(f"%ec2 cancel {job['id'][-4:]}")
    assert not errs and f"Job {job['id']}:" in out
    wait_for("the job to end after %ec2 cancel",
             lambda: target_state(nb["root"], job["id"]) in ("interrupted", "cancelled"))


def test_interrupt_from_the_only_page_still_interrupts(nb: dict[str, Any]) -> None:
    """The person who started the cell, alone on it, gets what Ctrl-C always did."""
    k = nb["start"]()
    k.execute(nb["use"] + "\n%config Ec2Magics.interrupt_grace = 0.1")
    notebook.write_frontends(k.kernel_id, [k.kc.session.session], nb["state"])
    msg_id = k.run_cell(WAITING_CELL.format(go=str(nb["go"])), "cell-c")
    collect(k.kc, msg_id, 60, until="line 2\n")
    job = only_job(nb["state"])
    k.km.interrupt_kernel()
    text, errs = collect(k.kc, msg_id, 30)
    assert "Interrupting job" in text
    wait_for("the job to be interrupted", lambda: target_state(nb["root"], job["id"]) == "interrupted")


def test_one_watcher_thread_serves_every_cell_and_fires_only_for_a_page_gone(tmp_path: Path) -> None:
    """The page watch of a foreground cell: a page still connected never interrupts, however
    many cells come and go, and they share one thread; a page gone interrupts the main thread
    (as the kernel's Ctrl-C would) -- for the next cell too, once the first has fired."""
    def watchers() -> int:
        return sum(t.name == "remotemagic-frontend-watch" for t in threading.enumerate())

    origin = {"kernel": "kernel-1", "client": "page-a"}
    notebook.write_frontends("kernel-1", ["page-a"], tmp_path)
    for _ in range(30):
        with notebook.FrontendWatch(origin, every=0.001, grace=0.0, root=tmp_path) as watch:
            time.sleep(0.003)  # (checked while it runs: the page is there, nothing happens)
        assert not watch.fired
    assert watchers() == 1
    notebook.write_frontends("kernel-1", ["page-b"], tmp_path)  # page-a was closed
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            with notebook.FrontendWatch(origin, every=0.01, grace=0.0, root=tmp_path) as watch:
                wait_for("the watch to interrupt the cell", lambda: False, timeout=60)
        assert watch.fired
    assert watchers() == 1
