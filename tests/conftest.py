"""Fixtures shared by the suite.

Every test gets its own state folder and target root; every worker a test starts is stopped
at teardown. ``remote`` and ``ip`` are parametrized over transports so the same tests run
locally and over SSH.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import remotemagic

from .workers import stop_workers

pytest_plugins = ["tests.ssh_fixtures"]

TRANSPORTS = ["local", "ssh"]


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("REMOTEMAGIC_STATE_DIR", str(state))
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    return state


class Target:
    """How to reach one kind of target in a test: ``connect()`` and the magic's ``use`` line."""

    def __init__(self, kind: str, root: Path, **options: Any):
        self.kind = kind
        self.root = root
        self.options = options

    def connect(self, **kw: Any) -> remotemagic.Remote:
        if self.kind == "local":
            return remotemagic.connect("local", root=str(self.root), **kw)
        kw.setdefault("cwd", str(Path.cwd()))  # same folder as the local backend uses
        return remotemagic.connect(self.options["target"], root=str(self.root), **{**self.options["connect"], **kw})

    @property
    def use_line(self) -> str:
        if self.kind == "local":
            return f"use local --root {self.root}"
        return self.options["use_line"]


@pytest.fixture(params=TRANSPORTS)
def target(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    work = tmp_path / "work"  # the local backend's session folder is the process's cwd
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path / "target"
    if request.param == "local":
        t = Target("local", root)
    else:
        t = request.getfixturevalue("ssh_target_factory")(root)
    yield t
    stop_workers(root)


@pytest.fixture(scope="session")
def ssh_shared_venv(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Bootstrap one remote venv over the real sshd; each test's root links to it."""
    from .ssh_fixtures import TEST_PYTHON

    shared = tmp_path_factory.mktemp("ssh-shared") / "root"
    r = remotemagic.connect("ssh:rmtest", root=str(shared), ssh_config=sshd_server.ssh_config,
                            python=TEST_PYTHON, state_root=str(shared.parent / "state"))
    r.close()
    yield shared / "venv"
    stop_workers(shared)


@pytest.fixture
def ssh_target_factory(sshd_server: Any, ssh_shared_venv: Path) -> Any:
    from .ssh_fixtures import TEST_PYTHON

    def make(root: Path) -> Target:
        root.mkdir(mode=0o700)
        os.chmod(root, 0o700)
        (root / "venv").symlink_to(ssh_shared_venv)
        cfg = sshd_server.ssh_config
        return Target("ssh", root, target="ssh:rmtest",
                      connect={"ssh_config": cfg, "python": TEST_PYTHON},
                      use_line=f"use ssh rmtest --root {root} --python {TEST_PYTHON} --ssh-config {cfg} "
                               f"--workdir {Path.cwd()}")

    return make


@pytest.fixture
def remote(target: Target) -> Iterator[remotemagic.Remote]:
    r = target.connect()
    yield r
    r.close()


@pytest.fixture
def ip(target: Target) -> Iterator[Any]:
    """A real IPython shell with the extension loaded and pointed at ``target``."""
    from IPython.testing import globalipapp

    shell = globalipapp.get_ipython()
    shell.run_line_magic("load_ext", "remotemagic")
    shell.run_line_magic("ec2", target.use_line)
    yield shell
    shell.run_line_magic("unload_ext", "remotemagic")
    shell.config.pop("Ec2Magics", None)
    shell.user_ns.clear()
    shell.user_ns.update(shell.user_ns_hidden)


def run_ok(ip: Any, cell: str) -> Any:
    """Run a cell; fail the test with the cell's error if it raised."""
    result = ip.run_cell(cell)
    err = result.error_in_exec or result.error_before_exec
    if err is not None:
        raise AssertionError(f"cell failed: {type(err).__name__}: {err}") from err
    return result.result


def plain(text: str) -> str:
    """Text without ANSI colour codes."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true (returned); fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pytest_configure(config: pytest.Config) -> None:
    """The Ctrl-C tests press Ctrl-C (SIGINT to this process). A background job of a script
    starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: install
    it, so the suite passes however it is started (CI, nohup, a script's ``&``)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """Keep each phase's report on the test item (browser tests screenshot failures)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def fresh_shell(_isolated_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real IPython shell with the extension loaded and no ``%ec2 use`` yet (cells that run
    pick the default local target under the isolated state folder, stopped at teardown)."""
    from IPython.testing import globalipapp

    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    shell = globalipapp.get_ipython()
    shell.run_line_magic("load_ext", "remotemagic")
    yield shell
    shell.run_line_magic("unload_ext", "remotemagic")
    shell.config.pop("Ec2Magics", None)
    shell.user_ns.clear()
    shell.user_ns.update(shell.user_ns_hidden)
    stop_workers(_isolated_state / "local-target")


def _leftover_agents(basetemp: str) -> list[tuple[int, str]]:
    """Processes of ours (agents, workers) still running from this run's temporary folders."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "remotemagic_agent" in cmd and basetemp in cmd:
            found.append((int(entry), cmd))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every worker a test starts, it stops: name (and kill) any that outlived the run."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or not os.path.isdir("/proc"):
        return
    basetemp = str(factory.getbasetemp())
    left = _leftover_agents(basetemp)
    deadline = time.monotonic() + 5  # an agent whose connection was just closed exits on its own
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _leftover_agents(basetemp)
    for pid, _ in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{len(left)} remotemagic process(es) outlived the tests (killed now):"]
        lines += [f"  {pid}: {cmd[:200]}" for pid, cmd in left[:20]]
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line("\n".join(lines), yellow=True)
        else:
            print("\n".join(lines))
