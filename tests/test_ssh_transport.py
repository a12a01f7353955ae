"""The SSH transport against real OpenSSH sshd servers on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
import uuid
import zipfile
from pathlib import Path

import pytest

import remotemagic
from remotemagic.transport import agent_version
from remotemagic.transport.ssh import SSHTransport, bootstrap, open_link, resolve, venv_marker
from remotemagic.transport.ssh.errors import (
    AuthenticationError,
    BootstrapError,
    HostKeyChangedError,
    HostNotFoundError,
    KeyPermissionError,
    RemoteCommandError,
    SSHConfigError,
    UnknownHostKeyError,
    UnreachableError,
)

try:
    from .ssh_fixtures import TEST_PYTHON, jump_sshd, ssh_remote_root, sshd_server, stop_workers, tcp_proxy  # noqa: F401
    from .sshd import SSHServer, free_port, keygen
except ImportError:
    from ssh_fixtures import TEST_PYTHON, jump_sshd, ssh_remote_root, sshd_server, stop_workers, tcp_proxy  # noqa: F401
    from sshd import SSHServer, free_port, keygen

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # only the keys the tests name
    monkeypatch.setenv("REMOTEMAGIC_STATE_DIR", str(tmp_path / "local-state"))


def connect(target: str, root: str, state: Path, **kw):
    kw.setdefault("python", TEST_PYTHON)
    kw.setdefault("show_progress", False)
    return remotemagic.connect(target, root=root, state_root=state, session="t" + uuid.uuid4().hex[:8], **kw)


def finish(r) -> None:
    try:
        r.stop_session()
    finally:
        r.close()


def stdout_of(job) -> str:
    return "".join(e.get("text", "") for e in job.events() if e.get("type") == "stream" and e.get("name") == "stdout")


# -- connecting and running ------------------------------------------------------------------------
def test_alias_runs_a_cell(sshd_server: SSHServer, ssh_remote_root: str, tmp_path: Path) -> None:
    r = connect("ssh:rmtest", ssh_remote_root, tmp_path, ssh_config=sshd_server.ssh_config)
    try:
        assert r.target == f"ssh://{sshd_server.user}@127.0.0.1:{sshd_server.port}"
        job = r.run("import os\ny = x * 2\nprint('pid', os.getpid(), y)", push={"x": 21}, pull=["y"])
        assert job.result() == {"y": 42}
        assert "42" in stdout_of(job)
        # one connection per target, a new channel per agent
        t = r.transport
        assert isinstance(t, SSHTransport)
        link = t.link()
        assert link.transport.local_cipher == "aes128-gcm@openssh.com"
        assert link.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # remote folders 0700, files 0600
        root = Path(ssh_remote_root)
        pkg = root / "agent" / agent_version() / "remotemagic_agent"
        for folder in (root, root / "agent", pkg.parent, pkg, root / "venv"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        for f in [*(p for p in pkg.iterdir() if p.is_file()), root / "venv" / venv_marker()]:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert not list(pkg.glob("*.tmp-*"))
    finally:
        finish(r)


def test_ssh_url_and_home_root(sshd_server: SSHServer, tmp_path: Path) -> None:
    """``ssh://user@host:port`` without any config file; ``~`` in root is the remote home."""
    empty = tmp_path / "empty_config"
    empty.write_text("")
    rel = f".remotemagic-test-{uuid.uuid4().hex[:8]}"
    home_root = Path(sshd_server.home) / rel
    try:
        r = connect(f"ssh://{sshd_server.user}@127.0.0.1:{sshd_server.port}", f"~/{rel}", tmp_path,
                    ssh_config=empty, known_hosts=sshd_server.known_hosts, identity_file=sshd_server.client_key)
        try:
            assert r.transport.root == str(home_root)
            assert r.run("z = 6 * 7", pull=["z"]).result() == {"z": 42}
        finally:
            finish(r)
        assert (home_root / "agent" / agent_version() / "remotemagic_agent" / ".complete").exists()
    finally:
        stop_workers(home_root)
        shutil.rmtree(home_root, ignore_errors=True)


def test_second_connect_reuses_bootstrap(sshd_server: SSHServer, tmp_path: Path) -> None:
    root = tmp_path / "fresh-root"
    r = connect("ssh:rmtest", str(root), tmp_path, ssh_config=sshd_server.ssh_config)
    try:
        assert r.transport.bootstraps == 1
    finally:
        finish(r)
    marker = root / "agent" / agent_version() / "remotemagic_agent" / ".complete"
    files = [marker, *marker.parent.glob("*.py"), root / "venv" / venv_marker(), root / "venv" / "pyvenv.cfg"]
    before = {f: f.stat().st_mtime_ns for f in files}
    inodes = {f: f.stat().st_ino for f in files}
    r = connect("ssh:rmtest", str(root), tmp_path, ssh_config=sshd_server.ssh_config)
    try:
        assert r.transport.bootstraps == 0  # the fast path: one exec, nothing uploaded
        assert r.run("v = 1 + 1", pull=["v"]).result() == {"v": 2}
    finally:
        finish(r)
        stop_workers(root)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert {f: f.stat().st_ino for f in files} == inodes


def test_half_installed_agent_is_not_trusted(sshd_server: SSHServer, ssh_remote_root: str, tmp_path: Path) -> None:
    """Without its .complete marker, an agent folder is re-uploaded (and the venv kept)."""
    t = SSHTransport("rmtest", root=ssh_remote_root, ssh_config=sshd_server.ssh_config, python=TEST_PYTHON)
    try:
        t.start_agent().close()  # make sure the root is bootstrapped
        pkg = Path(ssh_remote_root) / "agent" / agent_version() / "remotemagic_agent"
        (pkg / ".complete").unlink()
        (pkg / "server.py").write_text("raise SystemExit('half-written')\n")
        venv_mtime = (Path(ssh_remote_root) / "venv" / venv_marker()).stat().st_mtime_ns
        t.bootstraps = 0
        stream = t.start_agent()
        stream.close()
        assert t.bootstraps == 1
        assert (pkg / ".complete").exists()
        assert "half-written" not in (pkg / "server.py").read_text()
        assert (Path(ssh_remote_root) / "venv" / venv_marker()).stat().st_mtime_ns == venv_mtime
    finally:
        t.close()


def test_proxyjump_two_hops(sshd_server: SSHServer, jump_sshd: SSHServer, ssh_remote_root: str, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.host_key_line + "\n" + jump_sshd.host_key_line + "\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        jump_sshd.host_entry("jump", UserKnownHostsFile=known)
        + jump_sshd.host_entry("jump2", UserKnownHostsFile=known)
        + sshd_server.host_entry("behind", ProxyJump="jump,jump2", UserKnownHostsFile=known)
    )
    host = resolve("behind", config_path=cfg)
    assert [h.alias for h in host.proxy_jump] == ["jump", "jump2"]
    r = connect("ssh:behind", ssh_remote_root, tmp_path, ssh_config=cfg)
    try:
        assert len(r.transport.link().transports) == 3
        assert r.run("import socket\nh = socket.gethostname()", pull=["h"]).result() == {"h": socket.gethostname()}
    finally:
        finish(r)


def test_pip_install_streams_lines(sshd_server: SSHServer, ssh_remote_root: str, tmp_path: Path) -> None:
    wheel = tmp_path / "rmtestpkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("rmtestpkg/__init__.py", "VALUE = 7\n")
        z.writestr("rmtestpkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: rmtestpkg\nVersion: 0.1\n")
        z.writestr("rmtestpkg-0.1.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("rmtestpkg-0.1.dist-info/RECORD", "rmtestpkg/__init__.py,,\nrmtestpkg-0.1.dist-info/METADATA,,\n"
                   "rmtestpkg-0.1.dist-info/WHEEL,,\nrmtestpkg-0.1.dist-info/RECORD,,\n")
    t = SSHTransport("rmtest", root=ssh_remote_root, ssh_config=sshd_server.ssh_config, python=TEST_PYTHON)
    try:
        t.start_agent().close()
        lines = list(t.pip_install([str(wheel)], "--no-index", "--no-deps", "--force-reinstall"))
        assert any("Successfully installed rmtestpkg" in line for line in lines), lines
        status, out = t.run(f'"{ssh_remote_root}/venv/bin/python" -c "import rmtestpkg; print(rmtestpkg.VALUE)"')
        assert (status, out.strip()) == (0, "7")
        with pytest.raises(RemoteCommandError) as info:
            list(t.pip_install(["rm-no-such-package-xyz"], "--no-index"))
        assert info.value.status != 0
    finally:
        t.run(f'"{ssh_remote_root}/venv/bin/python" -m pip uninstall -y -q rmtestpkg')
        t.close()


def test_stream_lines_gives_lines_status_and_tail(sshd_server: SSHServer, tmp_path: Path) -> None:
    t = SSHTransport("rmtest", root=str(tmp_path / "root"), ssh_config=sshd_server.ssh_config)
    try:
        seen: list[str] = []
        script = t.stream_lines("i=0; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); done; echo oops >&2; exit 3")
        for line in script:
            seen.append(line)
        assert seen == [f"line {i}" for i in range(40)] + ["oops"]  # stderr comes in the same stream
        assert script.status == 3
        assert script.tail == seen[-30:]
        assert script.chan.closed
        abandoned = t.stream_lines("echo first; echo second")
        assert next(iter(abandoned)) == "first"
        assert abandoned.chan.closed  # the iteration was dropped (CPython closes the generator at once)
        ok = t.stream_lines("echo done")
        assert list(ok) == ["done"] and ok.status == 0 and ok.tail == ["done"]
    finally:
        t.close()


def test_a_channel_that_closes_as_keys_would_be_renewed_leaves_the_link_alive(sshd_server: SSHServer,
                                                                              tmp_path: Path) -> None:
    """paramiko asks for new keys after 512 MiB; a channel the server closes while that exchange
    is pending stalls paramiko's transport thread for 30 s, then the link dies (paramiko issue
    822). 512 MiB that end with their channel, then a command on the same link: it is alive."""
    t = SSHTransport("rmtest", root=str(tmp_path / "root"), ssh_config=sshd_server.ssh_config)
    try:
        link = t.link()
        chan = t._channel("head -c 536870912 /dev/zero")
        got = 0
        while data := chan.recv(4 << 20):
            got += len(data)
        assert got == 2**29 and chan.recv_exit_status() == 0
        assert t.run("echo still here") == (0, "still here")
        assert t.link() is link and link.transport.is_active()  # the same link: it never died
    finally:
        t.close()


# -- host keys ---------------------------------------------------------------------------------------
def test_unknown_host_refused_then_trusted_on_first_use(sshd_server: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "kh" / "known_hosts"  # does not exist yet
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="fresh", UserKnownHostsFile=known)
    with pytest.raises(UnknownHostKeyError) as info:
        open_link(resolve("fresh", config_path=cfg))
    msg = str(info.value)
    assert "not known" in msg and "trust_on_first_use=True" in msg and sshd_server.host_key_name in msg
    assert not known.exists()
    link = open_link(resolve("fresh", config_path=cfg), trust_on_first_use=True)
    link.close()
    line = known.read_text().strip()
    assert line == sshd_server.host_key_line
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    open_link(resolve("fresh", config_path=cfg)).close()  # known now: no TOFU needed
    assert known.read_text().strip() == line  # recorded once
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")  # HashKnownHosts-style entries are honoured too
    open_link(resolve("fresh", config_path=cfg)).close()


def test_host_key_alias(sshd_server: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"my-box {sshd_server.host_key_type} {sshd_server.host_key_b64}\n")
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="aliased", UserKnownHostsFile=known,
                                       HostKeyAlias="my-box")
    open_link(resolve("aliased", config_path=cfg)).close()


def test_changed_host_key_refused(tmp_path: Path, sshd_server: SSHServer) -> None:
    port = free_port()
    first = SSHServer(tmp_path / "a", port=port, client_key=sshd_server.client_key).start()
    known = tmp_path / "known_hosts"
    try:
        known.write_text(first.host_key_line + "\n")
        cfg = first.write_ssh_config(tmp_path / "cfg", alias="box", UserKnownHostsFile=known)
        open_link(resolve("box", config_path=cfg)).close()
    finally:
        first.stop()
    second = SSHServer(tmp_path / "b", port=port, client_key=sshd_server.client_key).start()
    try:
        assert second.host_key_b64 != first.host_key_b64
        for tofu in (False, True):  # trust on first use never accepts a CHANGED key
            with pytest.raises(HostKeyChangedError) as info:
                open_link(resolve("box", config_path=cfg), trust_on_first_use=tofu)
            msg = str(info.value)
            assert "HOST KEY CHANGED" in msg and f"{known}:1" in msg and "ssh-keygen -R" in msg
        assert known.read_text() == first.host_key_line + "\n"
    finally:
        second.stop()


# -- keys and authentication ---------------------------------------------------------------------------
def test_loose_key_permissions_refused(sshd_server: SSHServer, tmp_path: Path) -> None:
    key = tmp_path / "loose_key"
    shutil.copy(sshd_server.client_key, key)
    os.chmod(key, 0o644)
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="loose", IdentityFile=key)
    with pytest.raises(KeyPermissionError) as info:
        connect("ssh:loose", str(tmp_path / "root"), tmp_path, ssh_config=cfg)
    assert f"chmod 600 {key}" in str(info.value)


def test_wrong_key_names_user_and_keys(sshd_server: SSHServer, tmp_path: Path) -> None:
    key = tmp_path / "other_key"
    keygen(key)
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="wrong", IdentityFile=key)
    with pytest.raises(AuthenticationError) as info:
        connect("ssh:wrong", str(tmp_path / "root"), tmp_path, ssh_config=cfg)
    msg = str(info.value)
    assert f"for user {sshd_server.user!r}" in msg and str(key) in msg
    assert "ubuntu" in msg and "ec2-user" in msg and "not 'root'" in msg


# -- unreachable ---------------------------------------------------------------------------------------
def test_unreachable_port_names_the_hop(sshd_server: SSHServer, jump_sshd: SSHServer, tmp_path: Path) -> None:
    dead = free_port()
    known = tmp_path / "known_hosts"
    known.write_text(jump_sshd.host_key_line + "\n")
    cfg = tmp_path / "cfg"
    cfg.write_text(
        f"Host dead\n  HostName 127.0.0.1\n  Port {dead}\n  User root\n  IdentityFile {sshd_server.client_key}\n"
        + jump_sshd.host_entry("jump", UserKnownHostsFile=known)
        + f"Host deadbehind\n  HostName 127.0.0.1\n  Port {dead}\n  ProxyJump jump\n"
        f"  IdentityFile {sshd_server.client_key}\n  UserKnownHostsFile {known}\n"
        + "Host nowhere\n  HostName no-such-host.invalid\n"
    )
    with pytest.raises(UnreachableError) as info:
        connect("ssh:dead", str(tmp_path / "root"), tmp_path, ssh_config=cfg)
    assert "target 'dead'" in str(info.value) and str(dead) in str(info.value)
    with pytest.raises(UnreachableError) as info:
        open_link(resolve("deadbehind", config_path=cfg))
    msg = str(info.value)
    assert "jump host 1 of 1 'jump'" in msg and "target 'deadbehind'" in msg and str(dead) in msg
    with pytest.raises(HostNotFoundError) as info2:
        open_link(resolve("nowhere", config_path=cfg))
    assert "no-such-host.invalid" in str(info2.value) and "resolve" in str(info2.value)


def test_silent_port_times_out_naming_the_hop(sshd_server: SSHServer, tmp_path: Path) -> None:
    """A port that accepts TCP but never speaks SSH: a timeout naming the hop, in about the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = tmp_path / "cfg"
        cfg.write_text(f"Host mute\n  HostName 127.0.0.1\n  Port {silent.getsockname()[1]}\n"
                       f"  IdentityFile {sshd_server.client_key}\n")
        t0 = time.monotonic()
        with pytest.raises(UnreachableError) as info:
            open_link(resolve("mute", config_path=cfg), timeout=1.0)
        assert time.monotonic() - t0 < 10
    assert "target 'mute'" in str(info.value) and "handshake" in str(info.value)


# -- faults ----------------------------------------------------------------------------------------
def test_link_cut_mid_job_loses_nothing(sshd_server: SSHServer, ssh_remote_root: str, tmp_path: Path,
                                        tcp_proxy) -> None:
    proxy = tcp_proxy(sshd_server.port)
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="flaky", Port=proxy.port,
                                       HostKeyAlias=sshd_server.host_key_name)
    r = connect("ssh:flaky", ssh_remote_root, tmp_path, ssh_config=cfg, reconnect_timeout=30)
    try:
        n = 40
        job = r.run(f"import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep(0.04)",
                    background=True)
        seen: list[str] = []
        cut_at: list[int] = []

        def on_event(event: dict) -> None:
            if event.get("type") == "stream":
                seen.append(event.get("text", ""))
                lines_so_far = "".join(seen).count("\n")
                if not cut_at and lines_so_far >= 10:
                    cut_at.append(lines_so_far)
                    proxy.cut()  # mid-job: the job keeps running on the host, the link is gone

        state = job.wait(timeout=60, on_event=on_event)
        assert cut_at and cut_at[0] < n - 10
        assert state == "done"
        assert proxy.cuts == 1 and proxy.accepted >= 2  # it did reconnect through the proxy
        lines = stdout_of(job).splitlines()
        assert lines == [str(i) for i in range(n)]
        assert "".join(seen).splitlines() == [str(i) for i in range(n)]  # live: no gap, no duplicate
    finally:
        finish(r)


# -- more ways in ------------------------------------------------------------------------------------
RELAY = """import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    os.write(1, d)
"""


def test_proxycommand(sshd_server: SSHServer, tmp_path: Path) -> None:
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="viacmd", ProxyCommand=f"{TEST_PYTHON} {relay} %h %p")
    t = SSHTransport("viacmd", root=str(tmp_path / "root"), ssh_config=cfg)
    try:
        assert t.run("echo via-proxy-command") == (0, "via-proxy-command")
        assert t.link().proxy is not None
    finally:
        t.close()
    dead = sshd_server.write_ssh_config(tmp_path / "cfg2", alias="viadead", Port=free_port(),
                                        ProxyCommand=f"{TEST_PYTHON} {relay} %h %p")
    with pytest.raises(UnreachableError) as info:
        open_link(resolve("viadead", config_path=dead), timeout=5)
    assert "ProxyCommand" in str(info.value) and "target 'viadead'" in str(info.value)


def test_ssh_agent_keys(sshd_server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No IdentityFile: the key comes from a real ssh-agent (and is named in errors)."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd_server.client_key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no default ~/.ssh/id_* keys
        cfg = tmp_path / "cfg"
        cfg.write_text(f"Host withagent\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n  User {sshd_server.user}\n"
                       f"  UserKnownHostsFile {sshd_server.known_hosts}\n")
        t = SSHTransport("withagent", root=str(tmp_path / "root"), ssh_config=cfg)
        try:
            assert t.run("echo agent-ok") == (0, "agent-ok")
        finally:
            t.close()
        other = tmp_path / "other"
        keygen(other)
        subprocess.run(["ssh-add", "-D", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(["ssh-add", "-q", str(other)], env=env, check=True, capture_output=True)
        with pytest.raises(AuthenticationError) as info:
            open_link(resolve("withagent", config_path=cfg))
        assert "ssh-agent key" in str(info.value)
    finally:
        agent.terminate()
        agent.wait(timeout=5)


def test_missing_interpreter_is_a_clear_error(sshd_server: SSHServer, tmp_path: Path) -> None:
    t = SSHTransport("rmtest", root=str(tmp_path / "root"), ssh_config=sshd_server.ssh_config,
                     python="python-that-does-not-exist")
    try:
        if bootstrap.probe(t).get("uv"):
            pytest.skip("uv is installed on this host: it would provision the interpreter instead")
        with pytest.raises(BootstrapError) as info:
            t.start_agent()
        msg = str(info.value)
        assert "no 'python-that-does-not-exist'" in msg and "python='python3." in msg and "uv" in msg
    finally:
        t.close()


def test_fresh_host_bootstrap_with_pip(offline_sshd: SSHServer, tmp_path: Path) -> None:
    """An interpreter without cloudpickle: a venv with pip, then pip install cloudpickle==local, ipython
    (~7 s; from the local wheelhouse tests/run.sh fills: no network beyond 127.0.0.1)."""
    python = os.environ.get("REMOTEMAGIC_TEST_BARE_PYTHON", "/usr/bin/python3")
    root = tmp_path / "root"
    r = connect("ssh:rmtest", str(root), tmp_path, ssh_config=offline_sshd.ssh_config, python=python)
    try:
        assert r.transport.run("echo $PIP_NO_INDEX")[1].strip() == "1"  # offline: the wheelhouse only
        assert r.info["executable"] == f"{root}/venv/bin/python"
        import cloudpickle

        assert r.info["cloudpickle"] == cloudpickle.__version__
        assert r.run("w = 5", pull=["w"]).result() == {"w": 5}
    finally:
        finish(r)
        stop_workers(root)


def _other_minor_python() -> str | None:
    """An interpreter of another minor version than this one (pyenv's, or on PATH)."""
    import glob
    import sys

    here = "{}.{}".format(*sys.version_info[:2])
    for minor in ("3.12", "3.13", "3.10"):
        if minor == here:
            continue
        candidates = [*sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python{minor}"))),
                      f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
        for path in candidates:
            try:  # pyenv shims exist for versions that are not selected: run it to be sure
                if os.path.exists(path) and subprocess.run([path, "-c", "pass"], capture_output=True,
                                                           timeout=20).returncode == 0:
                    return path
            except (OSError, subprocess.SubprocessError):
                continue
    return None


def test_other_python_minor_is_provisioned_with_uv(offline_sshd: SSHServer, tmp_path: Path) -> None:
    """The host's python3 is another minor version and there is no uv: uv is pip-installed
    into the root from the wheelhouse, finds this minor on the host (downloads are off here), and
    the venv is built from it."""
    import sys

    other = _other_minor_python()
    if other is None:
        pytest.skip("no Python of another minor version on this machine")
    root = tmp_path / "root"
    r = connect("ssh:rmtest", str(root), tmp_path, ssh_config=offline_sshd.ssh_config, python=other)
    try:
        assert (root / "tools" / "uv" / "bin" / "uv").exists()
        assert r.info["python"].startswith("{}.{}.".format(*sys.version_info[:2]))
        assert r.info["executable"] == f"{root}/venv/bin/python"
        assert r.run("import sys\nv = sys.version_info[:2]", pull=["v"]).result() == {"v": sys.version_info[:2]}
    finally:
        finish(r)
        stop_workers(root)


def test_frozen_link_detected_by_keepalive(sshd_server: SSHServer, ssh_remote_root: str, tmp_path: Path,
                                           tcp_proxy) -> None:
    """A link that dies silently (no RST, no EOF) is dropped by the keepalive watchdog and resumed."""
    proxy = tcp_proxy(sshd_server.port)
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="frozen", Port=proxy.port,
                                       HostKeyAlias=sshd_server.host_key_name, ServerAliveCountMax=2)
    r = connect("ssh:frozen", ssh_remote_root, tmp_path, ssh_config=cfg, keepalive=1, reconnect_timeout=30)
    try:
        n = 40
        job = r.run(f"import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep(0.05)",
                    background=True)
        seen: list[str] = []
        frozen_at: list[float] = []

        def on_event(event: dict) -> None:
            if event.get("type") == "stream":
                seen.append(event.get("text", ""))
                if not frozen_at and "".join(seen).count("\n") >= 5:
                    frozen_at.append(time.monotonic())
                    proxy.freeze()

        assert job.wait(timeout=60, on_event=on_event) == "done"
        assert frozen_at and time.monotonic() - frozen_at[0] < 20  # noticed in ~2 keepalive intervals
        assert proxy.accepted >= 2
        assert stdout_of(job).splitlines() == [str(i) for i in range(n)]
        assert "".join(seen).splitlines() == [str(i) for i in range(n)]
    finally:
        finish(r)


# -- Include in the SSH config ----------------------------------------------------------------------
def test_include_is_followed_like_openssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh" / "config.d").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / ".ssh" / "config.d" / "10-alpha").write_text("Host alpha\n    HostName alpha.example\n")
    (home / ".ssh" / "config.d" / "20-delta").write_text("Host delta\n    HostName delta.example\n    Port 2222\n")
    (home / ".ssh" / "beta-extra").write_text("Port 2200\nHost gamma\n    HostName gamma.example\n")
    cfg = home / ".ssh" / "config"
    cfg.write_text(
        "Include config.d/* ~/.ssh/does-not-exist\n"  # relative to ~/.ssh, globbed, missing skipped
        "User bob\n"  # still top level after the include: applies to every host
        "Host beta\n"
        "    HostName beta.example\n"
        "    Include beta-extra\n"  # inside a block: applies to beta only
        "    IdentityFile ~/.ssh/beta_key\n"  # after it: still beta's, not gamma's
    )
    alpha = resolve("alpha", config_path=cfg)
    assert (alpha.hostname, alpha.port, alpha.user) == ("alpha.example", 22, "bob")
    assert resolve("delta", config_path=cfg).port == 2222
    beta = resolve("beta", config_path=cfg)
    assert (beta.hostname, beta.port) == ("beta.example", 2200)
    assert beta.identity_files == [str(home / ".ssh" / "beta_key")]
    gamma = resolve("gamma", config_path=cfg)
    assert (gamma.hostname, gamma.port, gamma.identities_explicit) == ("gamma.example", 22, False)

    (home / ".ssh" / "loop").write_text("Include loop\n")
    cfg.write_text("Include loop\n")
    with pytest.raises(SSHConfigError, match="Include nested deeper"):
        resolve("alpha", config_path=cfg)


def test_host_from_an_included_file_runs_a_cell(sshd_server: SSHServer, ssh_remote_root: str, tmp_path: Path) -> None:
    main = tmp_path / "config"
    main.write_text(f"Include {sshd_server.ssh_config}\n")
    main.chmod(0o600)
    r = connect("ssh:rmtest", ssh_remote_root, tmp_path, ssh_config=str(main))
    try:
        assert r.run("y = 6 * 7", pull=["y"]).result() == {"y": 42}
    finally:
        finish(r)
