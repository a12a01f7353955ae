"""SSH fleets: two real sshd servers on 127.0.0.1 (plus an address where nothing listens, a host
that is down), brought up through the plain-Python API and through ``%ec2 start|use|stop fleet``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from remotemagic.agent import files
from remotemagic.providers.fleet import Fleet, FleetError, FleetHost

from .conftest import run_ok, stop_workers
from .ssh_fixtures import TEST_PYTHON, wheelhouse_env
from .sshd import SSHServer, free_port


@pytest.fixture(scope="module")
def second_sshd(tmp_path_factory: pytest.TempPathFactory, sshd_server: SSHServer) -> Iterator[SSHServer]:
    """Another sshd (own host key and port, same client key): the fleet's second host."""
    server = SSHServer(tmp_path_factory.mktemp("fleet-sshd"), client_key=sshd_server.client_key,
                       env=wheelhouse_env())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet_env(tmp_path: Path, sshd_server: SSHServer, second_sshd: SSHServer, ssh_shared_venv: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An SSH config with ``fleet-a``, ``fleet-b`` (the two sshd) and ``fleet-down`` (nothing
    listens there), and one agent root per host (both hosts are this machine)."""
    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.host_key_line + "\n" + second_sshd.host_key_line + "\n")
    down_port = free_port()
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        sshd_server.host_entry("fleet-a", UserKnownHostsFile=known)
        + second_sshd.host_entry("fleet-b", UserKnownHostsFile=known)
        + f"Host fleet-down\n    HostName 127.0.0.1\n    Port {down_port}\n    User {sshd_server.user}\n"
          f"    IdentityFile {sshd_server.client_key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {known}\n"
    )
    roots = {}
    for name in ("a", "b", "down"):
        root = tmp_path / f"root-{name}"
        root.mkdir(mode=0o700)
        (root / "venv").symlink_to(ssh_shared_venv)  # the remote venv, built once for the session
        roots[name] = root
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    hosts = [{"host": "fleet-a", "root": str(roots["a"])}, {"host": "fleet-down", "root": str(roots["down"])},
             {"host": "fleet-b", "root": str(roots["b"])}]
    yield SimpleNamespace(cfg=cfg, roots=roots, hosts=hosts)
    for root in roots.values():
        stop_workers(root)


def _workers(root: Path) -> dict[str, int]:
    """session -> pid of every worker process alive under ``root``."""
    out = {}
    for sdir in (root / "sessions").glob("*") if (root / "sessions").exists() else []:
        pid = (files.read_json(str(sdir / "worker.json"), {}) or {}).get("pid")
        if pid and _alive(int(pid)):
            out[sdir.name] = int(pid)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_fleet_api_start_run_stop(fleet_env: Any) -> None:
    fleet = Fleet("lab", fleet_env.hosts, ssh_config=str(fleet_env.cfg), python=TEST_PYTHON, show_progress=False,
                  connect_timeout=5, session="fleet-test")
    try:
        results = fleet.start()
        assert [r.host for r in results] == ["fleet-a", "fleet-down", "fleet-b"]
        ok = {r.host: r.ok for r in results}
        assert ok == {"fleet-a": True, "fleet-down": False, "fleet-b": True}
        down = results[1]
        assert down.error is not None and down.line().startswith("fleet-down: DOWN -- ")
        assert results[0].line().startswith("fleet-a: up, Python ")
        assert len(fleet.remotes) == 2 and fleet.primary is fleet.remote("fleet-a")
        # each host runs cells, in its own root
        for host, name in (("fleet-a", "a"), ("fleet-b", "b")):
            remote = fleet.remote(host)
            assert remote is not None
            assert remote.run(f"where = {name!r}", pull=["where"]).result() == {"where": name}
            assert set(_workers(fleet_env.roots[name])) == {"fleet-test"}
        # a second start checks the hosts that are up (no new connection) and tries the down one again
        first = fleet.remote("fleet-a")
        again = fleet.start(sync=["cloudpickle"])  # already there at this kernel's version: nothing installed
        assert fleet.remote("fleet-a") is first and [r.ok for r in again] == [True, False, True]
        assert again[0].detail.startswith("up, Python ") and "failed" not in again[0].detail
        status = {row["name"]: row["state"] for row in fleet.status()}
        assert status == {"fleet-a": "up", "fleet-down": "down", "fleet-b": "up"}

        stopped = fleet.stop(grace=1.0)
        lines = [r.line() for r in stopped]
        assert lines[0].startswith("fleet-a: stopped 1 worker(s): session fleet-test")
        assert lines[1].startswith("fleet-down: DOWN")
        assert lines[2].startswith("fleet-b: stopped 1 worker(s)")
        assert _workers(fleet_env.roots["a"]) == {} and _workers(fleet_env.roots["b"]) == {}
        assert fleet.remotes == []
    finally:
        fleet.close()


def test_fleet_use_skips_a_host_that_is_down(fleet_env: Any) -> None:
    from remotemagic import notices

    hosts = [FleetHost.parse(fleet_env.hosts[1]), FleetHost.parse(fleet_env.hosts[2])]  # down first
    with Fleet("pair", hosts, ssh_config=str(fleet_env.cfg), python=TEST_PYTHON, show_progress=False,
               connect_timeout=5) as fleet, notices.collect() as told:
        primary = fleet.use()
        assert primary is fleet.remote("fleet-b") and fleet.remote("fleet-down") is None
        assert any("fleet-down did not answer; cells run on fleet-b" in n["text"] for n in told)
        assert primary.run("x = 6 * 7", pull=["x"]).result() == {"x": 42}
        fleet.stop(grace=1.0)


def test_no_host_up_is_one_error_naming_each(fleet_env: Any) -> None:
    with Fleet("gone", [fleet_env.hosts[1]], ssh_config=str(fleet_env.cfg), python=TEST_PYTHON,
               show_progress=False, connect_timeout=5) as fleet:
        with pytest.raises(FleetError, match="no host of fleet 'gone' answers:\nfleet-down: DOWN"):
            fleet.use()


@pytest.fixture
def fleet_shell(fleet_env: Any) -> Iterator[Any]:
    from IPython.testing import globalipapp

    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "remotemagic")
    for line in (f"Ec2Magics.ssh_config = {str(fleet_env.cfg)!r}", f"Ec2Magics.remote_python = {TEST_PYTHON!r}",
                 "Ec2Magics.show_progress = False", "Ec2Magics.session = 'fleet-magics'",
                 f"Ec2Magics.fleets = {{'lab': {fleet_env.hosts!r}}}"):
        ip.run_line_magic("config", line)
    yield ip
    from remotemagic.providers.fleet.provider import close_all

    ip.run_line_magic("unload_ext", "remotemagic")
    ip.config.pop("Ec2Magics", None)
    close_all()


def test_fleet_through_the_magics(fleet_shell: Any, fleet_env: Any, capsys: pytest.CaptureFixture) -> None:
    from remotemagic.magics import _loaded

    run_ok(fleet_shell, "%ec2 start fleet lab")
    out = capsys.readouterr().out
    assert "Fleet lab: 2 of 3 host(s) up (fleet-down down)" in out
    assert "  fleet-a: up, Python " in out and "  fleet-b: up, Python " in out and "  fleet-down: DOWN -- " in out
    magics = _loaded[id(fleet_shell)]
    assert magics.where["kind"] == "fleet" and magics.where["host"] == "lab"

    run_ok(fleet_shell, "%ec2 status")
    out = capsys.readouterr().out
    assert "Fleet:    lab, 2 of 3 host(s) up" in out
    assert "  fleet-a: up (cells run here)" in out and "  fleet-b: up\n" in out and "  fleet-down: DOWN -- " in out

    run_ok(fleet_shell, "%%ec2 run -o v\nv = 'on the primary'")
    assert fleet_shell.user_ns["v"] == "on the primary"
    assert set(_workers(fleet_env.roots["a"])) == {"fleet-magics"} and _workers(fleet_env.roots["b"]) == {}

    # terminate and resize are not for SSH hosts: said in one line
    result = fleet_shell.run_cell("%ec2 terminate -y")
    assert "%ec2 terminate does not apply to fleet targets (fleet supports: start, stop)" in str(result.error_in_exec)

    run_ok(fleet_shell, "%ec2 stop")  # the current target: the fleet
    out = capsys.readouterr().out
    assert "Fleet lab: our workers stopped on 2 of 3 host(s) (fleet-down unreachable); the machines keep running" in out
    assert "  fleet-a: stopped 1 worker(s): session fleet-magics" in out and "  fleet-b: no worker was running" in out
    deadline = time.monotonic() + 10
    while _workers(fleet_env.roots["a"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers(fleet_env.roots["a"]) == {}

    # cells still run there: the next one starts a fresh worker on the primary
    run_ok(fleet_shell, "%%ec2 run -o w\nw = 2")
    assert fleet_shell.user_ns["w"] == 2
    run_ok(fleet_shell, "%ec2 stop fleet lab")
    run_ok(fleet_shell, "%ec2 use fleet lab")
    assert "Using " in capsys.readouterr().out
    run_ok(fleet_shell, "%ec2 stop fleet lab")


def test_unload_ext_closes_the_fleets_connections(fleet_shell: Any, fleet_env: Any) -> None:
    from remotemagic.providers.fleet import provider

    run_ok(fleet_shell, "%ec2 start fleet lab")
    fleets = list(provider._live.values())
    assert fleets and all(f.remotes for f in fleets)
    fleet_shell.run_line_magic("unload_ext", "remotemagic")
    assert provider._live == {} and all(f.remotes == [] for f in fleets)
    fleet_shell.run_line_magic("load_ext", "remotemagic")
