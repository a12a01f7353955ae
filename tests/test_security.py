"""Issue #16's security items, reproduced as the attack: another user's folder, planted code or
pickles, and the victim using remotemagic. Each asserts the planted code did not run and the
user sees a clear error (the cell's error and what IPython printed)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

import remotemagic
from remotemagic import errors
from remotemagic.agent import files
from remotemagic.transport.base import AGENT_PACKAGE, agent_version
from remotemagic.transport.ssh import venv_marker

from .conftest import plain, run_ok
from .workers import stop_workers

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting files as another user needs root")


@pytest.fixture
def shell(fresh_shell: Any) -> Any:
    """A real IPython shell with the extension loaded and no target chosen yet."""
    return fresh_shell


def chown_tree(path: Path, uid: int = NOBODY) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def plant_root(root: Path, marker: Path, how: str) -> None:
    """What another user prepares: a root whose agent (and venv, for SSH) would run as whoever
    uses it and create ``marker``. ``how``: ``nobody`` (all of it theirs), ``777`` (a folder of
    ours that anybody can write), ``inner`` (our 0700 root, but its agent folder is theirs)."""
    pkg = root / "agent" / agent_version() / AGENT_PACKAGE
    pkg.mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').write('planted code ran')\n"
    for name in ("__init__.py", "server.py", "worker.py"):
        (pkg / name).write_text(code)
    (pkg / ".complete").write_text(agent_version())
    venv_bin = root / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f"#!/bin/sh\necho 'planted code ran' > '{marker}'\n")
    (venv_bin / "python").chmod(0o755)
    (root / "venv" / venv_marker()).write_text("planted")
    if how == "nobody":
        chown_tree(root)
    elif how == "777":
        root.chmod(0o777)
    else:
        root.chmod(0o700)
        chown_tree(root / "agent")


def ssh_use(sshd: Any, root: Path) -> str:
    from .ssh_fixtures import TEST_PYTHON

    return f"ec2 use ssh rmtest --root {root} --python {TEST_PYTHON} --ssh-config {sshd.ssh_config}"


def failed_cell(ip: Any, capsys: pytest.CaptureFixture, cell: str) -> tuple[BaseException, str]:
    """Run a cell that must fail: its error and everything the user saw."""
    result = ip.run_cell(cell)
    err = result.error_in_exec or result.error_before_exec
    assert err is not None, f"{cell!r} did not fail"
    out = capsys.readouterr()
    return err, plain(out.out + out.err)


# -- item 1: a root folder prepared by someone else ------------------------------------------------
@pytest.mark.parametrize("how", [pytest.param("nobody", marks=as_root), "777", pytest.param("inner", marks=as_root)])
@pytest.mark.parametrize("where", ["--root", "local_root", "REMOTEMAGIC_LOCAL_ROOT", "ssh"])
def test_planted_root_is_refused_and_its_code_never_runs(
        where: str, how: str, shell: Any, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    root = tmp_path / "shared" / "rm"
    root.parent.mkdir()
    marker = tmp_path / "planted-code-ran"
    plant_root(root, marker, how)
    if where == "--root":
        line = f"%ec2 use local --root {root}"
    elif where == "local_root":
        shell.run_line_magic("config", f"Ec2Magics.local_root = {str(root)!r}")
        line = "%ec2 use local"
    elif where == "REMOTEMAGIC_LOCAL_ROOT":
        monkeypatch.setenv("REMOTEMAGIC_LOCAL_ROOT", str(root))
        line = "%ec2 use local"
    else:
        line = "%" + ssh_use(request.getfixturevalue("sshd_server"), root)
    try:
        err, seen = failed_cell(shell, capsys, line)
        # the next cell must not run the planted code either (no fallback, no retry that trusts it)
        shell.run_cell("%%ec2 run\nprint('hello')")
    finally:
        stop_workers(root)
    assert not marker.exists(), "the planted code ran as the victim"
    assert isinstance(err, errors.UnsafeRootError), err
    assert "refusing to use" in seen and "Traceback" not in seen
    if how == "777":
        assert "writable by group" in seen and "chmod go-w" in seen
    else:
        assert "not to you" in seen and "root folder that you own" in seen


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_root_that_cannot_be_created_says_so(kind: str, shell: Any, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             request: pytest.FixtureRequest) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = blocker / "rm"
    if kind == "local":
        line = f"%ec2 use local --root {root}"
    else:
        line = "%" + ssh_use(request.getfixturevalue("sshd_server"), root)
    err, seen = failed_cell(shell, capsys, line)
    assert isinstance(err, errors.RootFolderError), err
    assert str(root) in seen and "Traceback" not in seen
    assert "python3-venv" not in seen and "venv" not in str(err)


# -- item 2: pickles read back from a target ------------------------------------------------------
class Planted:
    """Unpickling this creates ``path``: a stand-in for any code a pickle can run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def plant_pickle(path: Path, marker: Path) -> None:
    enc = files.encode(Planted(str(marker)), dumps=pickle.dumps)
    files.write_object(str(path), enc)


@pytest.mark.parametrize("how", [pytest.param("nobody", marks=as_root), "666", "777-folder"])
def test_store_restore_refuses_a_pickle_others_could_write(
        how: str, ip: Any, target: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "keep = [1, 2, 3]\nbait = 'x'")
    run_ok(ip, "%ec2_store keep bait")
    store = Path(target.root) / "store"
    marker = tmp_path / "pickle-ran"
    plant_pickle(store / "bait.obj", marker)  # replaces the stored value, as another user would
    if how == "nobody":
        os.chown(store / "bait.obj", NOBODY, NOBODY)
    elif how == "666":
        os.chmod(store / "bait.obj", 0o666)
    else:
        os.chmod(store, 0o777)
    ip.user_ns.pop("bait")
    try:
        for cell in ("%ec2_store -r bait", "%ec2_store -r --remote bait"):
            err, seen = failed_cell(ip, capsys, cell)
            assert not marker.exists(), f"{cell}: the planted pickle was unpickled"
            assert "refusing to load" in str(err) and str(store) in str(err), (cell, err)
            assert ("chmod go-w" if how != "nobody" else "not to you") in str(err)
            assert "Traceback" not in seen, seen
        assert "bait" not in ip.user_ns
        assert isinstance(ip.run_cell("%ec2_store -r bait").error_in_exec, errors.UnsafeObjectError)
    finally:
        os.chmod(store, 0o700)


@pytest.mark.parametrize("how", [pytest.param("nobody", marks=as_root), "666"])
def test_pulled_output_refused_when_others_could_write_it(
        how: str, ip: Any, target: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run --bg -o result\nresult = 42")
    job_id = capsys.readouterr().out.split("Job ", 1)[1].split()[0]
    jdir = Path(target.root) / "jobs" / job_id
    from .conftest import wait_for

    wait_for("the job to end", lambda: (files.read_json(str(jdir / "status.json"), {}) or {}).get("state") == "done")
    marker = tmp_path / "pickle-ran"
    plant_pickle(jdir / "outputs" / "result.obj", marker)
    if how == "nobody":
        os.chown(jdir / "outputs" / "result.obj", NOBODY, NOBODY)
    else:
        os.chmod(jdir / "outputs" / "result.obj", 0o666)
    err, seen = failed_cell(ip, capsys, f"%ec2 wait {job_id[-4:]}")
    assert not marker.exists(), "the planted output was unpickled"
    assert isinstance(err, errors.UnsafeObjectError), err
    assert "result.obj" in str(err) and "Traceback" not in seen
    assert "result" not in ip.user_ns


@as_root
def test_checkpoint_file_of_another_user_is_not_restored(ip: Any, target: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run\nkept = 1")
    run_ok(ip, "%ec2 checkpoint")
    ck = next(Path(target.root, "sessions").glob("*/checkpoint"))
    marker = tmp_path / "pickle-ran"
    plant_pickle(ck / "kept.obj", marker)
    os.chown(ck / "kept.obj", NOBODY, NOBODY)
    err, seen = failed_cell(ip, capsys, "%ec2 checkpoint --restore")
    assert not marker.exists(), "the planted checkpoint was unpickled"
    assert "refusing to load" in str(err) and "kept.obj" in str(err)


# -- item 8: -o with any Python identifier ----------------------------------------------------------
def test_non_ascii_output_names_round_trip(ip: Any) -> None:
    run_ok(ip, "数据 = [1, 2]")
    run_ok(ip, "%%ec2 run -i 数据 -o 变量,größe\n变量 = sum(数据) * 14\ngröße = bytes(3 * 1024 * 1024)")
    assert ip.user_ns["变量"] == 42
    assert len(ip.user_ns["größe"]) == 3 * 1024 * 1024
    run_ok(ip, "%%ec2 run -o ℌ\nℌ = 'normalised like Python does'")  # the cell binds H (NFKC)
    assert ip.user_ns["H"] == "normalised like Python does"
    run_ok(ip, "%ec2_store 变量")
    ip.user_ns.pop("变量")
    run_ok(ip, "%ec2_store -r 变量")
    assert ip.user_ns["变量"] == 42


def test_api_refuses_unsafe_store_before_unpickling(target: Any, tmp_path: Path) -> None:
    """The plain-Python API has the same check as the magics (they share the agent's)."""
    r = target.connect()
    try:
        r.store_put("v", {"a": 1})
        store = Path(target.root) / "store"
        os.chmod(store / "v.obj", 0o646)
        with pytest.raises(remotemagic.RemoteMagicError, match="writable by others"):
            r.store_get("v")
        os.chmod(store / "v.obj", 0o600)
        assert r.store_get("v") == {"a": 1}
    finally:
        r.close()


def test_own_root_keeps_working_with_a_group_writable_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With umask 002 (Ubuntu's default for user-private groups) nothing remotemagic writes in its
    root -- __pycache__ included -- becomes group-writable, so the next connect does not refuse
    our own agent."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    root = tmp_path / "root"
    old = os.umask(0o002)
    try:
        for _ in range(2):  # the second connect checks what the first one (and its imports) wrote
            r = remotemagic.connect("local", root=str(root), state_root=str(tmp_path / "state"))
            try:
                assert r.run("x = 1", pull=["x"]).result() == {"x": 1}
                r.stop_session()
            finally:
                r.close()
    finally:
        os.umask(old)
        stop_workers(root)
    assert list(root.glob("agent/*/*/__pycache__")), "the agent wrote no bytecode: this test checks nothing"
    bad = [str(p) for p in [root, *root.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o022]
    assert not bad, bad
