"""%ec2 tunnel: sshtunnel forwards over the target's verified link, bound to 127.0.0.1 only."""

from __future__ import annotations

import http.server
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import remotemagic

from .conftest import run_ok
from .ssh_fixtures import TEST_PYTHON


@pytest.fixture
def web_server() -> Any:
    """An HTTP server on the target's side (the loopback sshd's host is this machine)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = f"hello from {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_tunnel_over_ssh(sshd_server: Any, ssh_remote_root: str, web_server: int, tmp_path: Path) -> None:
    r = remotemagic.connect("ssh:rmtest", root=ssh_remote_root, ssh_config=sshd_server.ssh_config,
                            python=TEST_PYTHON, state_root=str(tmp_path / "state"))
    try:
        t = r.tunnel(web_server)
        assert _get(t.url + "x") == "hello from /x"
        for srv in t._fwd._server_list:  # the local end listens on loopback only
            assert srv.socket.getsockname()[0] == "127.0.0.1"
        assert r.tunnels == {t.local_port: t}
        r.close_tunnel(t.local_port)
        with pytest.raises(OSError):
            _get(t.url)
        with pytest.raises(KeyError):
            r.close_tunnel(t.local_port)
    finally:
        r.close()


def test_tunnel_through_jump_hosts(sshd_server: Any, jump_sshd: Any, ssh_remote_root: str, web_server: int,
                                   tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.host_key_line + "\n" + jump_sshd.host_key_line + "\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(jump_sshd.host_entry("jump", UserKnownHostsFile=known)
                   + sshd_server.host_entry("behind", ProxyJump="jump", UserKnownHostsFile=known))
    r = remotemagic.connect("ssh:behind", root=ssh_remote_root, ssh_config=str(cfg), python=TEST_PYTHON,
                            state_root=str(tmp_path / "state"))
    try:
        t = r.tunnel(web_server)
        assert _get(t.url + "via-jump") == "hello from /via-jump"
    finally:
        r.close()


def test_tunnel_magic(ip: Any, target: Any, web_server: int, capsys: pytest.CaptureFixture) -> None:
    if target.kind == "local":
        result = ip.run_cell(f"%ec2 tunnel {web_server}")
        assert "needs no tunnel" in str(result.error_in_exec)
        return
    run_ok(ip, f"%ec2 tunnel {web_server}")
    out = capsys.readouterr().out
    url = out.split("Tunnel open: ", 1)[1].split()[0]
    assert _get(url) == "hello from /"
    run_ok(ip, "%ec2 tunnel")
    port = int(url.rsplit(":", 1)[1].strip("/"))
    assert f"127.0.0.1:{port} -> port {web_server}" in capsys.readouterr().out
    run_ok(ip, f"%ec2 tunnel --close {port}")
    result = ip.run_cell(f"%ec2 tunnel --close {port}")
    assert "no tunnel" in str(result.error_in_exec)


def test_open_tunnel_keeps_the_target_marked_in_use(sshd_server: Any, ssh_remote_root: str, web_server: int,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tunnel traffic does not reach the agent, so while a tunnel is open the client pings it
    (an instance's idle auto-stop counts from the agent's last request); it stops after."""
    import time

    from remotemagic import api

    monkeypatch.setattr(api, "HEARTBEAT_EVERY", 0.2)
    r = remotemagic.connect("ssh:rmtest", root=ssh_remote_root, ssh_config=sshd_server.ssh_config,
                            python=TEST_PYTHON, state_root=str(tmp_path / "state"))
    try:
        conn = r.connection()
        t = r.tunnel(web_server)
        before = conn.bytes_sent
        time.sleep(1.5)
        assert conn.bytes_sent - before > 0  # pings went out
        assert (Path(ssh_remote_root) / "activity").exists()
        r.close_tunnel(t.local_port)
        assert r._heartbeat is not None
        r._heartbeat.join(10)  # it sees no tunnel at its next beat and ends
        assert not r._heartbeat.is_alive()
        quiet = conn.bytes_sent
        time.sleep(0.6)
        assert conn.bytes_sent == quiet
    finally:
        r.close()
