"""Coming back to the notebook, in a real browser: JupyterLab on 127.0.0.1 with our server and
JupyterLab extensions, driven by Debian's Chromium through Playwright.

A `%%ec2 run` cell prints lines, then waits for a file the test creates (never a fixed sleep),
then prints more. The page is closed while it runs and opened again; what the person sees in
the ORIGINAL cell (the DOM) is what is asserted. Screenshots of a failing test are kept in
``tests/artifacts/``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest

from remotemagic import notebook, state

from .conftest import wait_for
from .workers import stop_workers

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LABEXT = Path(__file__).resolve().parent.parent / "remotemagic" / "jupyter" / "labextension"
FIRST = 8  # lines the job prints before it waits for the test's go-ahead

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium (tests/run.sh installs it)")
playwright_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server this test started, and what the test needs to talk to it."""

    def __init__(self, tmp: Path, state_dir: Path):
        self.dir = tmp / "notebooks"
        self.dir.mkdir()
        self.target_root = tmp / "target"
        self.state_dir = state_dir
        self.release = tmp / "release"
        self.port = _free_port()
        self.token = "t" + os.urandom(8).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        home = tmp / "jhome"
        labext = home / "data" / "labextensions"  # the user data dir: JupyterLab looks there
        labext.mkdir(parents=True)
        (labext / "remotemagic").symlink_to(LABEXT)
        cfg = home / "config"
        (cfg / "labconfig").mkdir(parents=True)
        (cfg / "labconfig" / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(cfg), "JUPYTER_DATA_DIR": str(home / "data"),
               "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
               "REMOTEMAGIC_STATE_DIR": str(state_dir), "JUPYTER_PLATFORM_DIRS": "1"}
        env.pop("JPY_SESSION_NAME", None)
        self.log = open(tmp / "jupyterlab.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.dir}", '--ServerApp.jpserver_extensions={"remotemagic.jupyter": True}',
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly", "--LabApp.workspaces_dir=" + str(home / "workspaces")]
            + (["--allow-root"] if os.geteuid() == 0 else []),
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("JupyterLab to answer", self._up, timeout=90)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            self.log.flush()
            raise AssertionError("JupyterLab exited:\n" + Path(self.log.name).read_text()[-3000:])
        try:
            return bool(self.api("GET", "/api/status"))
        except OSError:
            return False

    def api(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else {}

    def notebook(self, name: str, code: str) -> Path:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(f"%load_ext remotemagic\n%ec2 use local --root {self.target_root}"),
                    nbformat.v4.new_code_cell(code)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = self.dir / name
        nbformat.write(nb, path)
        return path

    def stop(self) -> None:
        try:
            for k in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{k['id']}")
        except OSError:
            pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()
        stop_workers(self.target_root)


@pytest.fixture
def lab(tmp_path: Path, _isolated_state: Path) -> Iterator[Lab]:
    server = Lab(tmp_path, _isolated_state)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def pages(request: pytest.FixtureRequest, browser: Any) -> Iterator[list[Any]]:
    """Every page a test opens; screenshots of the open ones are kept if the test fails."""
    opened: list[Any] = []
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    yield opened
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        for i, page in enumerate(opened):
            if not page.is_closed():
                page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{i}.png"), full_page=True)
    context.close()


# -- driving JupyterLab ---------------------------------------------------------------------------
JOB = (
    "%%ec2 run\n"
    "import os, time\n"
    "def wait_file(p):\n"
    "    while not os.path.exists(p):\n"
    "        time.sleep(0.05)\n"
    "for i in range(16):\n"
    "    if i in (8, 12):\n"
    "        wait_file(f'{GO}{i}')\n"
    "    print(f'line {i:02d}', flush=True)\n"
    "    time.sleep(0.05)\n"
)
ALL = 16


def go(lab: "Lab", i: int) -> None:
    """Let the job past line ``i`` (it waits for this file before printing it)."""
    Path(f"{lab.release}{i}").touch()


def open_notebook(lab: Lab, browser: Any, pages: list[Any], name: str) -> Any:
    context = browser.contexts[0] if browser.contexts else browser.new_context()
    page = context.new_page()
    pages.append(page)
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.locator(".jp-NotebookPanel .jp-Cell").nth(1).wait_for(timeout=60_000)
    return page


def kernel_idle(page: Any) -> bool:
    return page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0


def run_cell(page: Any, index: int) -> None:
    """Shift+Enter in the cell. A page that has just loaded may drop the first one (its kernel
    connection not quite ready): pressed again only if the cell's prompt shows it never ran."""
    cell = page.locator(".jp-NotebookPanel .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputArea-prompt")
    for _ in range(3):
        select = page.locator(".jp-Dialog button.jp-mod-accept")  # "Select Kernel": the notebook's own
        if select.count():
            select.first.click()
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            wait_for("the cell to start", lambda: prompt.inner_text().strip() not in ("[ ]:", ""), timeout=10)
            return
        except AssertionError:
            continue
    raise AssertionError(f"cell {index} never started")


def output_text(page: Any, index: int) -> str:
    return page.locator(".jp-NotebookPanel .jp-Cell").nth(index).locator(".jp-OutputArea").inner_text()


def record_texts(page: Any, index: int, needle: str) -> None:
    """From now on the page keeps every text that cell ``index``'s output shows with ``needle``
    in it, however briefly (a MutationObserver in the page): see :func:`recorded_text`."""
    page.evaluate("""([index, needle]) => {
        window.__recorded = [];
        const cell = document.querySelectorAll('.jp-NotebookPanel .jp-Cell')[index];
        const look = () => {
            const text = (cell.querySelector('.jp-OutputArea') || {}).innerText || '';
            if (text.includes(needle)) window.__recorded.push(text);
        };
        new MutationObserver(look).observe(cell, {subtree: true, childList: true, characterData: true});
        look();
    }""", [index, needle])


def recorded_text(page: Any) -> str | None:
    """The first text :func:`record_texts` kept, or None yet."""
    return page.evaluate("() => (window.__recorded || [])[0] || null")


def lines(text: str) -> list[str]:
    return re.findall(r"line \d\d", text)


def expected(n: int) -> list[str]:
    return [f"line {i:02d}" for i in range(n)]


def job_meta(lab: Lab) -> dict[str, Any]:
    jobs = [j for j in state.list_jobs(lab.state_dir) if j.get("kind") == "cell"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def target_state(lab: Lab, job_id: str) -> str:
    status = json.loads((lab.target_root / "jobs" / job_id / "status.json").read_text())
    return status.get("state", "")


def start_job(lab: Lab, browser: Any, pages: list[Any], name: str) -> tuple[Any, dict[str, Any]]:
    lab.notebook(name, JOB.replace("{GO}", str(lab.release)))
    page = open_notebook(lab, browser, pages, name)
    wait_for("the kernel to start", lambda: kernel_idle(page), timeout=60)
    run_cell(page, 0)
    wait_for("%ec2 use to answer", lambda: "Using local" in output_text(page, 0), timeout=60)
    run_cell(page, 1)
    wait_for("the first lines, live", lambda: len(lines(output_text(page, 1))) >= 3, timeout=60)
    return page, job_meta(lab)


def timed_answer(page: Any, index: int, code: str, answer: str) -> float:
    """Type ``code`` into the (new, empty) cell ``index``, run it: seconds until ``answer`` shows."""
    page.keyboard.type(code)
    t0 = time.monotonic()
    page.keyboard.press("Shift+Enter")  # runs it and opens a new cell below, in edit mode
    wait_for(f"the kernel's answer in cell {index}", lambda: answer in output_text(page, index), timeout=60)
    return time.monotonic() - t0


def assert_kernel_answers(lab: Lab, page: Any, job: dict[str, Any], within: float = 2.0) -> float:
    """The kernel is free: a cell typed under the job's cell answers within ``within`` s of what the
    page and kernel take for a cell right then.

    Timed from once this page is connected to the kernel (JupyterLab's own start-up is not the
    kernel's), and against a second, identical cell run right after it: what that one takes is
    the machine's load and the browser's rendering, not a kernel held by the job; the first one
    waits longer only as long as the kernel is not free. (The answer coming at all while the job
    still waits for its go-ahead is what shows the job does not hold the kernel.)"""
    kid = job["origin"]["kernel"]
    wait_for("this page's connection to the kernel",
             lambda: any(c != job["origin"]["client"] for c in notebook.connected_clients(kid, lab.state_dir) or ()),
             timeout=60)
    cells = page.locator(".jp-NotebookPanel .jp-Cell")
    cells.nth(1).locator(".jp-InputArea-prompt").click()  # command mode on the job's cell
    page.keyboard.press("b")  # a new cell below
    page.keyboard.press("Enter")
    took = timed_answer(page, 2, "print('kernel answers', 6 * 7)", "kernel answers 42")
    then = timed_answer(page, 3, "print('kernel answers again', 6 * 7)", "kernel answers again 42")
    assert took - then < within, (f"the kernel took {took:.1f}s to answer after the page came back, "
                                  f"{then:.1f}s for the next cell")
    return took


def save(page: Any) -> None:
    page.locator(".jp-NotebookPanel .jp-Cell").nth(0).locator(".jp-InputArea-prompt").click()
    page.keyboard.press("Control+s")


def saved_lines(path: Path, index: int = 1) -> list[str]:
    try:
        nb = nbformat.read(path, as_version=4)
    except (ValueError, OSError):  # caught mid-save
        return []
    text = "".join(o.get("text", "") for o in nb.cells[index].outputs if o.output_type == "stream")
    return lines(text)


# -- the scenarios --------------------------------------------------------------------------------
def test_reopen_while_running_then_live_and_saved(lab: Lab, browser: Any, pages: list[Any]) -> None:
    page, job = start_job(lab, browser, pages, "running.ipynb")
    assert job["origin"]["cell_id"] and job["origin"]["notebook"].endswith("running.ipynb")
    page.close()

    page = open_notebook(lab, browser, pages, "running.ipynb")
    assert target_state(lab, job["id"]) == "running"  # still waiting for the go-ahead
    wait_for("the first lines back in the original cell",
             lambda: lines(output_text(page, 1)) == expected(FIRST), timeout=30)
    assert_kernel_answers(lab, page, job)
    go(lab, 8)
    wait_for("lines 8-11 while the job still runs (live)",
             lambda: lines(output_text(page, 1)) == expected(12), timeout=60)
    assert target_state(lab, job["id"]) == "running"
    go(lab, 12)
    wait_for("every line, once, in the original cell",
             lambda: lines(output_text(page, 1)) == expected(ALL), timeout=60)
    save(page)
    wait_for("the output in the saved .ipynb",
             lambda: saved_lines(lab.dir / "running.ipynb") == expected(ALL), timeout=30)


def test_reopen_after_the_job_finished(lab: Lab, browser: Any, pages: list[Any]) -> None:
    page, job = start_job(lab, browser, pages, "finished.ipynb")
    page.close()
    go(lab, 8)
    go(lab, 12)
    wait_for("the job to finish with nobody watching", lambda: target_state(lab, job["id"]) == "done", timeout=60)

    page = open_notebook(lab, browser, pages, "finished.ipynb")
    wait_for("every line, once, in the original cell", lambda: lines(output_text(page, 1)) == expected(ALL), timeout=30)
    assert_kernel_answers(lab, page, job)
    save(page)
    wait_for("the output in the saved .ipynb",
             lambda: saved_lines(lab.dir / "finished.ipynb") == expected(ALL), timeout=30)


def test_reopen_after_a_kernel_restart(lab: Lab, browser: Any, pages: list[Any]) -> None:
    page, job = start_job(lab, browser, pages, "restarted.ipynb")
    page.close()
    lab.api("POST", f"/api/kernels/{job['origin']['kernel']}/restart")  # the old kernel is gone
    go(lab, 8)

    page = open_notebook(lab, browser, pages, "restarted.ipynb")
    wait_for("lines 0-11 in the original cell, with the job still running",
             lambda: lines(output_text(page, 1)) == expected(12), timeout=30)
    assert target_state(lab, job["id"]) == "running"
    go(lab, 12)
    wait_for("every line, once, in the original cell", lambda: lines(output_text(page, 1)) == expected(ALL), timeout=30)
    # the new kernel: %load_ext says in one line what ran while nobody watched
    run_cell(page, 0)
    wait_for("the unwatched-jobs line", lambda: "nobody watched" in output_text(page, 0), timeout=60)
    assert output_text(page, 0).count("nobody watched") == 1
    assert job["id"][-4:] in output_text(page, 0)
    assert lines(output_text(page, 1)) == expected(ALL)
    save(page)
    wait_for("the output in the saved .ipynb",
             lambda: saved_lines(lab.dir / "restarted.ipynb") == expected(ALL), timeout=30)


def test_one_interrupt_from_a_second_page_does_not_cancel(lab: Lab, browser: Any, pages: list[Any]) -> None:
    first, job = start_job(lab, browser, pages, "interrupt.ipynb")
    second = open_notebook(lab, browser, pages, "interrupt.ipynb")  # the first page is still open
    wait_for("the running job's lines in the second page too",
             lambda: lines(output_text(second, 1)) == expected(FIRST), timeout=30)
    assert not kernel_idle(first)  # the first page's cell still follows the job
    kid = job["origin"]["kernel"]
    wait_for("the second page's kernel connection",
             lambda: len(notebook.connected_clients(kid, lab.state_dir) or []) == 2, timeout=30)
    # The first page soon fills the let-go cell with the job's own outputs, without the line that
    # says how to cancel: the page itself records every text its cell shows with that line in it
    # (polling from here could miss it on a busy machine).
    record_texts(first, 1, f"%ec2 cancel {job['id'][-4:]}")
    second.locator(".jp-NotebookPanel .jp-Cell").nth(0).locator(".jp-InputArea-prompt").click()
    second.keyboard.press("i")
    second.keyboard.press("i")  # JupyterLab's "interrupt the kernel", once

    said = wait_for("the first page to say it detached and how to cancel", lambda: recorded_text(first), timeout=30)
    assert "did not start it" in said
    assert_kernel_answers(lab, second, job)
    assert target_state(lab, job["id"]) == "running"  # not cancelled
    go(lab, 8)
    go(lab, 12)
    wait_for("every line, once, in the second page's cell",
             lambda: lines(output_text(second, 1)) == expected(ALL), timeout=60)
    # the last line is out before the final status is written: wait for it (never "cancelled")
    wait_for("the job to finish, not cancelled", lambda: target_state(lab, job["id"]) == "done", timeout=60)
    # the first page's cell let go of the job: it is filled like any other, every line once
    wait_for("every line, once, in the first page's cell too",
             lambda: lines(output_text(first, 1)) == expected(ALL), timeout=30)
