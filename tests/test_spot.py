"""Spot reclaim notices, caught on the instance by the worker's IMDSv2 watcher.

The metadata service is a real HTTP server on 127.0.0.1 that speaks the IMDSv2 token
protocol (PUT for a token, the token on every GET, 401 without it); the workers are real
local-backend workers pointed at it through ``REMOTEMAGIC_IMDS_URL``.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

import remotemagic
from remotemagic.agent import files, spot

from .conftest import stop_workers, wait_for

ACTION_PATH = "/latest/meta-data/spot/instance-action"
NOTICE = {"action": "stop", "time": "2026-11-22T04:10:00Z"}
NOTICE_LINE = "[remotemagic] spot instance reclaim notice: stop at 2026-11-22T04:10:00Z; checkpointing the session\n"


class FakeIMDS:
    """A tiny IMDSv2: tokens from ``PUT /latest/api/token``, 401 for a GET without a valid one,
    404 on the instance-action path until :attr:`notice` is set."""

    def __init__(self) -> None:
        self.notice: dict[str, Any] | None = None
        self.tokens: set[str] = set()
        self.log: list[tuple[str, str, int]] = []  # (method, path, answer)
        self.ttls: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
                with fake.lock:
                    fake.log.append((self.command, self.path, code))
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token":
                    return self.answer(404)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self.answer(400)
                token = secrets.token_urlsafe(24)
                with fake.lock:
                    fake.tokens.add(token)
                    fake.ttls.append(ttl)
                self.answer(200, token.encode())

            def do_GET(self) -> None:
                with fake.lock:
                    valid = self.headers.get("X-aws-ec2-metadata-token") in fake.tokens
                    notice = fake.notice
                if not valid:
                    return self.answer(401)
                if self.path == ACTION_PATH and notice is not None:
                    return self.answer(200, json.dumps(notice).encode(), "application/json")
                self.answer(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, method: str, code: int | None = None) -> int:
        with self.lock:
            return sum(1 for m, _, c in self.log if m == method and (code is None or c == code))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def imds() -> Iterator[FakeIMDS]:
    fake = FakeIMDS()
    yield fake
    fake.stop()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    work = tmp_path / "work"  # the local backend's workers start in the process's cwd
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path / "target"
    yield root
    stop_workers(root)


def enable_spot(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Set before connecting: the agent, and so every worker, inherits this environment."""
    monkeypatch.setenv("REMOTEMAGIC_SPOT", "1")
    monkeypatch.setenv("REMOTEMAGIC_IMDS_URL", url)
    monkeypatch.setenv("REMOTEMAGIC_SPOT_POLL", "0.1")


def final_notice(root: Path, session: str = "default") -> dict[str, Any] | None:
    """spot_notice.json once the worker has completed it with the checkpoint."""
    data = files.read_json(str(root / "sessions" / session / "spot_notice.json"))
    return data if data and (data.get("checkpoint") or data.get("checkpoint_error")) else None


def session_info(remote: remotemagic.Remote, name: str = "default") -> dict[str, Any]:
    return next(s for s in remote.sessions() if s["name"] == name)


def test_emulator_enforces_the_token_protocol(imds: FakeIMDS) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(imds.url + ACTION_PATH, timeout=5)
    assert info.value.code == 401
    info.value.close()
    watcher = spot.SpotWatcher(lambda n: None, base_url=imds.url, interval=0.1)
    assert watcher.poll_once() is None  # PUT a token, then 404: no notice
    assert imds.ttls == ["21600"] and imds.count("GET", 404) == 1
    imds.tokens.clear()  # the service forgot our token: a 401, a fresh token, the same question
    imds.notice = NOTICE
    assert watcher.poll_once() == NOTICE
    assert imds.count("PUT") == 2 and imds.count("GET", 401) == 2  # our probe + the stale token


def test_running_job_is_interrupted_and_checkpointed(root: Path, imds: FakeIMDS,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    enable_spot(monkeypatch, imds.url)
    r = remotemagic.connect("local", root=str(root), checkpoint_limit=0)  # no automatic checkpoints
    try:
        r.run("a = 41\nwords = ['spot', 'check']")
        job = r.run("import time\nfor i in range(5000):\n    print('tick', i, flush=True)\n    time.sleep(0.02)\n"
                    "after = 1", background=True)

        def ticking() -> bool:
            job.sync()
            return any(e["type"] == "stream" and "tick" in e["text"] for e in job.events())

        wait_for("the job to print", ticking)
        wait_for("the watcher to poll", lambda: imds.count("GET", 404) >= 2)
        assert not (root / "sessions" / "default" / "spot_notice.json").exists()
        imds.notice = NOTICE

        assert job.wait(timeout=30) == "interrupted"
        err = job.error()
        assert err is not None and err.ename == "SpotInterruption"
        assert "spot reclaim" in err.evalue and "stop at 2026-11-22T04:10:00Z" in err.evalue
        events = list(job.events())
        assert any(e["type"] == "stream" and e["name"] == "stderr" and e["text"] == NOTICE_LINE for e in events)
        assert any(e["type"] == "spot_notice" and e["action"] == "stop" and e["time"] == NOTICE["time"]
                   for e in events)

        notice = wait_for("spot_notice.json with the checkpoint", lambda: final_notice(root))
        assert notice["action"] == "stop" and notice["time"] == NOTICE["time"] and notice["job"] == job.id
        info = session_info(r)
        ck = info["checkpoint"]
        assert {"a", "words", "i"} <= set(ck["names"]) and "after" not in ck["names"]
        assert ck["after_job"] == job.id and ck["time"] == notice["checkpoint"]["time"]
        assert info["spot_notice"]["checkpoint"]["names"] == ck["names"]

        assert imds.count("GET", 401) == 0 and imds.ttls and set(imds.ttls) == {"21600"}
        assert r.run("b = a + 1", pull=["b"]).result() == {"b": 42}  # the session lives on
    finally:
        r.close()


def test_idle_session_is_checkpointed(root: Path, imds: FakeIMDS, monkeypatch: pytest.MonkeyPatch) -> None:
    enable_spot(monkeypatch, imds.url)
    r = remotemagic.connect("local", root=str(root), checkpoint_limit=0)
    try:
        assert r.run("x = 5\nlabel = 'idle'").state == "done"
        assert session_info(r)["checkpoint"] is None
        wait_for("the watcher to poll", lambda: imds.count("GET", 404) >= 1)
        imds.notice = NOTICE
        notice = wait_for("spot_notice.json with the checkpoint", lambda: final_notice(root))
        assert notice["job"] is None and "checkpoint_error" not in notice
        ck = session_info(r)["checkpoint"]
        assert {"x", "label"} <= set(ck["names"]) and ck["after_job"] == "spot"
        calls = imds.count("GET")
        time.sleep(0.5)
        assert imds.count("GET") == calls  # one notice, then the watcher is done
    finally:
        r.close()


def test_watcher_is_off_without_spot_env(root: Path, imds: FakeIMDS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOTEMAGIC_SPOT", raising=False)
    monkeypatch.setenv("REMOTEMAGIC_IMDS_URL", imds.url)
    monkeypatch.setenv("REMOTEMAGIC_SPOT_POLL", "0.05")
    imds.notice = NOTICE
    r = remotemagic.connect("local", root=str(root))
    try:
        assert r.run("import time\ntime.sleep(0.5)\nz = 1").state == "done"
        time.sleep(0.3)
        assert imds.log == []
        assert session_info(r)["spot_notice"] is None
    finally:
        r.close()


def test_unreachable_metadata_service_is_logged_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    enable_spot(monkeypatch, f"http://127.0.0.1:{port}")
    r = remotemagic.connect("local", root=str(root))
    try:
        assert r.run("import time\ntime.sleep(1.5)\nv = 2", pull=["v"]).result() == {"v": 2}
        log = (root / "sessions" / "default" / "worker.log").read_text()
        assert log.count("spot watcher cannot use the instance metadata service") == 1, log
    finally:
        r.close()
