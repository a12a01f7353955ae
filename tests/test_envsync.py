"""Package sync, bare hosts, offline and online hosts -- against real sshd targets on 127.0.0.1.

The targets install only from the test wheelhouse (``tests/run.sh`` fills it with the local
versions), from wheels the client ships, or from a real PEP 503 index served on 127.0.0.1.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd
import pytest

import remotemagic
import remotemagic.envsync
from remotemagic.envsync import localenv, needs, wheels
from remotemagic.envsync.sync import syncer

from .conftest import plain, run_ok
from .ssh_fixtures import TEST_PYTHON, WHEELHOUSE, _running, wheelhouse_env
from .sshd import SSHServer, free_port
from .workers import stop_workers


def connect(server: SSHServer, root: Path, tmp_path: Path, **kw: Any) -> remotemagic.Remote:
    kw.setdefault("python", TEST_PYTHON)
    return remotemagic.connect("ssh:rmtest", root=str(root), ssh_config=server.ssh_config,
                               state_root=str(tmp_path / "state"), **kw)


def remote_versions(r: remotemagic.Remote, *modules: str) -> dict[str, str]:
    code = f"import {', '.join(modules)}\nvers = {{m: globals()[m].__version__ for m in {modules!r}}}"
    job = r.run(code, pull=["vers"])
    assert job.state == "done", job.error()
    return job.result()["vers"]


# -- what a job needs ---------------------------------------------------------------------------------
def test_modules_named_by_pickles_and_imports() -> None:
    from remotemagic.agent import files

    def uses_numpy(x: Any) -> Any:
        return np.sum(x)

    assert needs.pickle_modules(files.encode(np.arange(1_000_000)).pickle) == {"numpy"}
    assert {"pandas", "numpy"} <= needs.pickle_modules(files.encode(pd.DataFrame({"a": [1.0]})).pickle)
    assert "numpy" in needs.pickle_modules(files.encode(uses_numpy, cloudpickle.dumps).pickle)
    assert needs.pickle_modules(files.encode({"numpy": "just a string"}).pickle) == set()
    got = needs.needed_modules("import os, json\nimport numpy as np\nfrom pandas import DataFrame\n!ls")
    assert got == {"numpy", "pandas"}  # stdlib left out; IPython syntax understood
    env = localenv.current()
    closure = {d.name for d in env.closure(frozenset(env.dists_for_modules({"pandas"})))}
    assert {"pandas", "numpy", "python-dateutil", "six"} <= closure
    assert "remotemagic" not in env.dists_for_modules({"remotemagic"})


def test_wheels_for_another_platform_fail_clearly(wheel_sources: str) -> None:
    """Wrong architecture or too old a glibc: a clear error naming the platform, nothing half-done."""
    arm = wheels.Platform("aarch64", (2, 35), sys.version_info[:2])
    got, failed = wheels.fetch([f"numpy=={np.__version__}"], arm)
    assert not got and "numpy" in next(iter(failed)) and "aarch64" in failed[f"numpy=={np.__version__}"]
    with pytest.raises(wheels.NoWheelError, match="no uv build for Linux aarch64"):
        wheels.uv_binary(arm)
    old = wheels.Platform("x86_64", (2, 5), sys.version_info[:2])
    with pytest.raises(wheels.NoWheelError, match="glibc 2.5"):
        wheels.uv_binary(old)
    musl = wheels.Platform("x86_64", None, sys.version_info[:2])
    with pytest.raises(wheels.NoWheelError, match="no glibc"):
        musl.platform_tags()


# -- the venv does not borrow the host interpreter's packages ------------------------------------------
def test_remote_venv_is_isolated_from_the_base_interpreter(remote: remotemagic.Remote, target: Any) -> None:
    """The fresh-venv property: the SSH tests' venv never sees the base interpreter's site-packages,
    so numpy there comes from package sync at the local version, whatever the base carries."""
    if target.kind != "ssh":
        pytest.skip("the local backend runs this interpreter")
    cfg = (target.root / "venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    job = remote.run("import sys, site\nimport numpy\npaths = [p for p in sys.path if 'site-packages' in p]\n"
                     "where = numpy.__file__", pull=["paths", "where"])
    out = job.result()
    venv = os.path.realpath(target.root / "venv")
    assert all(os.path.realpath(p).startswith(venv) for p in out["paths"]), out["paths"]
    assert os.path.realpath(out["where"]).startswith(venv)


# -- a bare host: no venv, ensurepip, pip, virtualenv or uv; no index -----------------------------------
def test_bare_host_runs_numpy_and_pandas_at_local_versions(bare_sshd: SSHServer, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    r = connect(bare_sshd, root, tmp_path, python="python3")
    try:
        status, out = r.transport.run("command -v python3; python3 -c 'import venv' 2>&1; "
                                      "python3 -c 'import ensurepip' 2>&1; python3 -m pip --version 2>&1; "
                                      "command -v uv virtualenv pip pip3; echo PIP_NO_INDEX=$PIP_NO_INDEX")
        assert out.splitlines()[0] == bare_sshd.bare_python  # type: ignore[attr-defined]
        assert "No module named 'venv'" in out and "No module named 'ensurepip'" in out
        assert "No module named pip" in out and "PIP_NO_INDEX=1" in out
        assert (root / "tools" / "uv" / "bin" / "uv").exists()  # brought by the client
        assert r.info["cloudpickle"] == cloudpickle.__version__
        df = pd.DataFrame({"a": np.arange(5.0)})
        job = r.run("import numpy, pandas\ntotal = float(df['a'].sum())\n"
                    "vers = (numpy.__version__, pandas.__version__)",
                    push={"df": df}, pull=["total", "vers"])
        assert job.state == "done", job.error()
        assert job.result() == {"total": 10.0, "vers": (np.__version__, pd.__version__)}
        shown = capsys.readouterr().err  # a notice (remotemagic.notices): stderr without a collector
        assert "[remotemagic] Installing on" in shown and f"numpy=={np.__version__}" in shown and "pandas==" in shown
        shipped = {p.name.split("-")[0] for p in (root / "wheels").glob("*.whl")}
        assert {"numpy", "pandas", "cloudpickle", "ipython"} <= shipped
        record = json.loads((root / "venv" / "remotemagic-packages.json").read_text())
        assert record["numpy"]["version"] == np.__version__ and record["numpy"]["source"] == "shipped wheels"
        assert record["pandas"]["via"] == "uv"
    finally:
        r.close()
        stop_workers(root)


# -- an online host: a real PEP 503 index on 127.0.0.1 -----------------------------------------------
@pytest.fixture(scope="module")
def simple_index(tmp_path_factory: pytest.TempPathFactory, wheel_sources: str) -> Iterator[tuple[str, Path]]:
    """``python -m http.server`` over a PEP 503 layout made from the test wheelhouse; yields
    (index URL, its access log)."""
    folder = tmp_path_factory.mktemp("index")
    simple = folder / "simple"
    by_project: dict[str, list[str]] = {}
    for whl in sorted(Path(WHEELHOUSE).glob("*.whl")):
        by_project.setdefault(localenv.norm(whl.name.split("-")[0]), []).append(whl.name)
    (folder / "files").mkdir()
    for project, names in by_project.items():
        (simple / project).mkdir(parents=True)
        links = "".join(f'<a href="../../files/{html.escape(n)}">{html.escape(n)}</a>\n' for n in names)
        (simple / project / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
        for n in names:
            os.symlink(Path(WHEELHOUSE).resolve() / n, folder / "files" / n)
    (simple / "index.html").write_text("".join(f'<a href="{p}/">{p}</a>\n' for p in by_project))
    port = free_port()
    log = folder / "access.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(folder)], stdout=logf, stderr=logf)
    try:
        url = f"http://127.0.0.1:{port}/simple/"
        deadline = time.monotonic() + 30
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(url + "numpy/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the test index did not start") from None
                time.sleep(0.05)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def online_sshd(tmp_path_factory: pytest.TempPathFactory, simple_index: tuple[str, Path]) -> Iterator[SSHServer]:
    url, _ = simple_index
    env = {"UV_INDEX_URL": url, "PIP_INDEX_URL": url, "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null",
           "UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never"}
    yield from _running(SSHServer(tmp_path_factory.mktemp("online-sshd"), env=env))


def test_online_host_installs_from_its_index(online_sshd: SSHServer, simple_index: tuple[str, Path],
                                             tmp_path: Path) -> None:
    url, log = simple_index
    root = tmp_path / "root"
    r = connect(online_sshd, root, tmp_path)
    try:
        vers = remote_versions(r, "numpy", "pandas")
        assert vers == {"numpy": np.__version__, "pandas": pd.__version__}
        requests = log.read_text()
        assert "GET /simple/numpy/" in requests and "GET /simple/cloudpickle/" in requests
        assert "GET /files/numpy-" in requests
        assert not list((root / "wheels").glob("*.whl")) if (root / "wheels").exists() else True  # nothing shipped
        record = json.loads((root / "venv" / "remotemagic-packages.json").read_text())
        assert record["numpy"]["source"] == "index" and record["numpy"]["via"] == "uv"
    finally:
        r.close()
        stop_workers(root)


def test_offline_install_ships_even_when_an_index_is_there(online_sshd: SSHServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = connect(online_sshd, root, tmp_path, offline_install=True)
    try:
        assert remote_versions(r, "numpy") == {"numpy": np.__version__}
        assert any(p.name.startswith("numpy-") for p in (root / "wheels").glob("*.whl"))
        s = syncer(r.transport)
        before = s.target.queries
        r.run("import numpy\nx = 1").result()  # warm: nothing missing, no round trip for the check
        r.run("import numpy, cloudpickle\nx = 2", push={"a": np.arange(3)}).result()
        assert s.target.queries == before
    finally:
        r.close()
        stop_workers(root)


# -- version skew, no wheel for the target, an editable package, --dry-run (magics) --------------------
@pytest.fixture(scope="module")
def fresh_target(sshd_server: SSHServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SSHServer, Path]]:
    root = tmp_path_factory.mktemp("envsync-fresh") / "root"
    yield sshd_server, root
    stop_workers(root)


@pytest.fixture
def shell(fresh_target: tuple[SSHServer, Path], tmp_path: Path) -> Iterator[Any]:
    from IPython.testing import globalipapp

    server, root = fresh_target
    sh = globalipapp.get_ipython()
    sh.run_line_magic("load_ext", "remotemagic")
    sh.run_line_magic("ec2", f"use ssh rmtest --root {root} --python {TEST_PYTHON} --ssh-config {server.ssh_config}")
    yield sh
    sh.run_line_magic("unload_ext", "remotemagic")
    sh.config.pop("Ec2Magics", None)
    sh.user_ns.clear()
    sh.user_ns.update(sh.user_ns_hidden)


def fake_wheel(folder: Path, name: str, version: str, body: str) -> Path:
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return wheel


def test_version_skew_auto_warns_exact_replaces(shell: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import six

    remote = shell.magics_manager.registry["Ec2Magics"].get_remote()
    old = fake_wheel(tmp_path, "six", "1.0.0", "__version__ = '1.0.0'\n")
    list(remote.pip_install(str(old), "--no-index", "--no-deps", "--force-reinstall"))
    capsys.readouterr()
    run_ok(shell, "%%ec2 run -o v\nimport six\nv = six.__version__")
    assert shell.user_ns["v"] == "1.0.0"  # auto keeps what is there...
    err = plain(capsys.readouterr().err)
    assert f"version skew on {remote.target}: six 1.0.0 there, {six.__version__} here" in err  # ...and says so
    assert err.count("version skew") == 1
    shell.run_line_magic("config", "Ec2Magics.package_sync = 'exact'")
    run_ok(shell, "%%ec2 run -o v\nimport six\nv = six.__version__")
    err = plain(capsys.readouterr().err)
    assert "version skew" not in err
    assert f"Replaced six 1.0.0 -> {six.__version__}: a session that already imported it" in err
    run_ok(shell, "%ec2 restart")
    run_ok(shell, "%%ec2 run -o v\nimport six\nv = six.__version__")
    assert shell.user_ns["v"] == six.__version__


def test_sync_dry_run_then_install_and_no_wheel_for_target(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import tqdm

    remote = shell.magics_manager.registry["Ec2Magics"].get_remote()
    shell.run_line_magic("ec2", "sync numpy --dry-run")
    out = plain(capsys.readouterr().out)
    assert "Dry run" in out
    assert any(line.startswith("numpy") and "would install" in line for line in out.splitlines()), out
    status, _ = remote.transport.run(f'"{remote.transport.root}/venv/bin/python" -c "import numpy"')
    assert status != 0  # nothing installed by a dry run
    # tqdm is not in the test wheelhouse: no wheel for the target, say so; numpy is installed
    shell.run_line_magic("ec2", "sync numpy tqdm")
    out = plain(capsys.readouterr().out)
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.split()}
    assert "installed" in rows["numpy"]
    assert "skipped" in rows["tqdm"] and f"no wheel of tqdm=={tqdm.__version__}" in rows["tqdm"]
    assert remote.run("import numpy\nv = numpy.__version__", pull=["v"]).result() == {"v": np.__version__}
    shell.run_line_magic("ec2", "sync numpy")
    lines = plain(capsys.readouterr().out).splitlines()
    assert any(line.startswith("numpy") and "already there" in line for line in lines)
    shell.run_line_magic("ec2", "status")
    status_out = plain(capsys.readouterr().out)
    assert f"numpy {np.__version__} (uv, " in status_out


def test_editable_local_package_is_built_and_shipped(shell: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    proj = tmp_path / "rmlocalpkg"
    (proj / "rmlocalpkg").mkdir(parents=True)
    (proj / "rmlocalpkg" / "__init__.py").write_text("VALUE = 'from a local folder'\n")
    (proj / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools", "wheel"]\nbuild-backend = '
                                         '"setuptools.build_meta"\n[project]\nname = "rmlocalpkg"\nversion = "0.3"\n')
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", WHEELHOUSE,
           "-e", str(proj)]
    subprocess.run(pip, check=True, capture_output=True)
    try:
        shell.run_line_magic("ec2", "sync rmlocalpkg")
        out = plain(capsys.readouterr().out)
        row = next(line for line in out.splitlines() if line.startswith("rmlocalpkg"))
        assert "installed" in row and f"built from {proj}" in row
        remote = shell.magics_manager.registry["Ec2Magics"].get_remote()
        status, text = remote.transport.run(f'cd / && "{remote.transport.root}/venv/bin/python" -c '
                                            '"import rmlocalpkg; print(rmlocalpkg.VALUE)"')
        assert (status, text.strip()) == (0, "from a local folder")
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "rmlocalpkg"], capture_output=True)


def test_restore_into_remote_session_installs_what_the_value_needs(shell: Any,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``%ec2_store -r --remote`` loads a stored value on the target: its packages come first."""
    remote = shell.magics_manager.registry["Ec2Magics"].get_remote()
    shell.user_ns["df"] = pd.DataFrame({"a": [1.0, 2.0, 3.0]})
    run_ok(shell, "%ec2_store df")
    # the target loses pandas (its venv rebuilt, someone uninstalled it) while the value stays stored
    uv = syncer(remote.transport).target.query()["uv"]
    status, out = remote.transport.run(f'{uv} pip uninstall --python "{remote.transport.root}/venv/bin/python" pandas')
    assert status == 0, out
    remotemagic.envsync.invalidate(remote.transport)
    run_ok(shell, "%ec2 restart")
    capsys.readouterr()
    run_ok(shell, "%ec2_store -r --remote df")
    shown = capsys.readouterr()
    assert f"pandas=={pd.__version__}" in plain(shown.err)  # the install notice, in the cell's output
    assert "Restored 'df' into the remote session" in plain(shown.out)
    run_ok(shell, "%%ec2 run -o n\nn = float(df['a'].sum())")
    assert shell.user_ns["n"] == 6.0


def test_package_sync_off(sshd_server: SSHServer, tmp_path: Path) -> None:
    """package_sync='off': nothing is installed, the job fails like before (and says why)."""
    root = tmp_path / "root"
    r = connect(sshd_server, root, tmp_path, package_sync="off")
    try:
        job = r.run("import pandas")
        assert job.state == "error" and "No module named 'pandas'" in str(job.error())
    finally:
        r.close()
        stop_workers(root)


def test_wheelhouse_env_is_offline() -> None:
    """The test targets never reach a real index (a guard for the fixtures themselves)."""
    env = wheelhouse_env()
    assert env["PIP_NO_INDEX"] == "1" and env["UV_FIND_LINKS"] == WHEELHOUSE
