"""Nothing lost: disconnects, kernel deaths, dropped links, full disks, concurrent writers.

Each test injects the fault for real (a Jupyter client that goes away, a kernel killed with
SIGKILL, the agent process killed mid-stream, a 6 MB tmpfs, two processes racing) and checks
that the output is complete, in order, with no duplicate, and that no file is left corrupt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import remotemagic
from remotemagic.agent import events, files

from .conftest import stop_workers

COUNT_CELL = (
    "%%ec2 run -o total\n"
    "import time\n"
    "total = 0\n"
    "for i in range({n}):\n"
    "    print('line', i, flush=True)\n"
    "    total += i\n"
    "    time.sleep({pause})\n"
)


def numbered(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^line (\d+)$", text, re.M)]


# -- real Jupyter kernels ----------------------------------------------------------------------
class Kernel:
    def __init__(self, env: dict[str, str]):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.connect()

    def connect(self) -> Any:
        kc = self.km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        return kc

    def execute(self, code: str, kc: Any = None, timeout: float = 120) -> tuple[str, list[dict]]:
        """Run code, return (stream text, error contents) of that request."""
        kc = kc or self.kc
        msg_id = kc.execute(code)
        return collect(kc, msg_id, timeout)

    def stop(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)


def collect(kc: Any, msg_id: str, timeout: float, until: str | None = None) -> tuple[str, list[dict]]:
    text, errs = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            text.append(content["text"])
            if until and until in "".join(text):
                return "".join(text), errs
        elif kind == "error":
            errs.append(content)
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(text), errs
    raise AssertionError(f"no idle after {timeout}s; got {''.join(text)[-500:]!r}")


@pytest.fixture
def kernel_env(_isolated_state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["REMOTEMAGIC_STATE_DIR"] = str(_isolated_state)
    return env


def test_browser_disconnect_loses_nothing(target: Any, kernel_env: dict[str, str]) -> None:
    k = Kernel(kernel_env)
    try:
        k.execute(f"%load_ext remotemagic\n%ec2 {target.use_line}")
        msg_id = k.kc.execute(COUNT_CELL.format(n=40, pause=0.05))
        collect(k.kc, msg_id, 60, until="line 3\n")
        k.kc.stop_channels()  # the browser tab closes mid-run
        time.sleep(1.0)  # lines printed while nobody is connected
        k.kc = k.connect()  # a new browser tab, same kernel
        text, errs = k.execute("%ec2 output\nprint('total =', total)")
        assert not errs, errs
        assert numbered(text) == list(range(40))
        assert "total = 780" in text
    finally:
        k.stop()
        stop_workers(target.root)


GATED_COUNT_CELL = (
    "%%ec2 run -o total\n"
    "import os, time\n"
    "total = 0\n"
    "for i in range(30):\n"
    "    print('line', i, flush=True)\n"
    "    total += i\n"
    "    while i == 15 and not os.path.exists({gate!r}):  # until the test has seen it running\n"
    "        time.sleep(0.05)\n"
    "    time.sleep(0.05)\n"
)


@pytest.mark.parametrize("how", ["killed", "restarted"])
def test_kernel_killed_mid_job_then_wait_in_new_kernel(target: Any, kernel_env: dict[str, str], how: str,
                                                       tmp_path: Path) -> None:
    """Jupyter interrupts a kernel before killing or restarting it: the job must run on.

    The job holds at line 15 until the test has counted it as running in the new kernel
    (a fixed-length job could end first on a loaded machine)."""
    gate = tmp_path / "gate"
    k1 = Kernel(kernel_env)
    try:
        k1.execute(f"%load_ext remotemagic\n%ec2 {target.use_line}")
        msg_id = k1.kc.execute(GATED_COUNT_CELL.format(gate=str(gate)))
        collect(k1.kc, msg_id, 60, until="line 2\n")
    finally:
        if how == "killed":
            k1.km.shutdown_kernel(now=True)  # interrupt, then SIGKILL
        else:
            k1.km.restart_kernel(now=False)  # interrupt, shutdown request, a new kernel process
            k1.km.shutdown_kernel(now=True)
        k1.kc.stop_channels()
    k2 = Kernel(kernel_env)
    try:
        text, errs = k2.execute(f"%load_ext remotemagic\n%ec2 {target.use_line}\n%ec2 jobs")
        assert not errs, errs
        running = [line.split()[0] for line in text.splitlines() if " running " in line]
        assert len(running) == 1, text
        gate.touch()
        text, errs = k2.execute(f"%ec2 wait {running[0]}\nprint('total =', total)")
        assert not errs, errs
        assert numbered(text) == list(range(30))
        assert "total = 435" in text
    finally:
        k2.stop()
        stop_workers(target.root)


def test_lost_namespace_notice_reaches_a_notebook(target: Any, kernel_env: dict[str, str]) -> None:
    """A notice is part of what the cell shows in a real kernel, not a log record."""
    k = Kernel(kernel_env)
    try:
        k.execute(f"%load_ext remotemagic\n%ec2 {target.use_line}")
        text, errs = k.execute("%%ec2 run\nkept = 1")
        assert not errs, errs
        worker = files.read_json(str(target.root / "sessions" / "default" / "worker.json"))
        os.kill(int(worker["pid"]), signal.SIGKILL)
        text, errs = k.execute("%%ec2 run\nprint('kept' in dir())")
        assert not errs, errs
        assert "False" in text
        assert "[remotemagic] warning: the previous worker of session 'default' stopped" in text
        assert "its namespace was lost" in text
    finally:
        k.stop()
        stop_workers(target.root)


# -- the link ----------------------------------------------------------------------------------
def test_agent_killed_mid_stream_resumes_without_gap_or_duplicate(remote: remotemagic.Remote) -> None:
    job = remote.run("import time\nfor i in range(60):\n    print('line', i, flush=True)\n    time.sleep(0.02)",
                     background=True)
    seen: list[str] = []
    first_agent = remote.info["pid"]
    killed = threading.Event()

    def on_event(ev: dict) -> None:
        if ev["type"] == "stream":
            seen.append(ev["text"])
            if not killed.is_set() and "line 10\n" in ev["text"]:
                killed.set()
                os.kill(first_agent, signal.SIGKILL)  # the link dies mid-stream

    assert job.follow(on_event, timeout=60) == "done"
    assert killed.is_set() and remote.info["pid"] != first_agent
    assert numbered("".join(seen)) == list(range(60))
    assert numbered("".join(e["text"] for e in job.events() if e["type"] == "stream")) == list(range(60))


# -- the disk ----------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        stop_workers(mnt / "root")
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_job(tiny_disk: Path) -> None:
    r = remotemagic.connect("local", root=str(tiny_disk / "root"), checkpoint_limit=0)
    try:
        first = r.run("print('before')", pull=[])
        r.store_put("precious", list(range(100)))
        job = r.run("for i in range(400):\n    print('x' * 50_000)\nprint('unreachable?')")
        assert job.state == "error"
        err = job.error()
        assert err is not None and "No space left on device" in err.evalue
        # what was there before is intact, and every status file is whole JSON
        assert [e["text"] for e in first.events() if e["type"] == "stream"] == ["before\n"]
        assert r.store_get("precious") == list(range(100))
        for status in (tiny_disk / "root" / "jobs").glob("*/status.json"):
            assert json.loads(status.read_text())["state"] in files.TERMINAL
        # an upload that does not fit is refused cleanly, leaving no partial object
        with pytest.raises(remotemagic.errors.RemoteDiskError, match="No space left"):
            r.run("pass", push={"big": np.ones(2_000_000)})
        assert not [p for p in (tiny_disk / "root" / "objects").iterdir() if p.name.startswith(".tmp")]
    finally:
        r.close()


def test_output_that_does_not_fit_is_reported_not_half_delivered(tiny_disk: Path) -> None:
    """An 8 MB ``-o`` value on a 6 MB disk: the client, already streaming it while the worker
    writes it, gets a clear error instead of half a value, and no partial file is left."""
    r = remotemagic.connect("local", root=str(tiny_disk / "root"), checkpoint_limit=0)
    try:
        job = r.run("big = bytearray(8_000_000)\nsmall = 42", pull=["big", "small"])
        assert [e["name"] for e in job.events() if e["type"] == "output"][:1] == ["big"]
        with pytest.raises(remotemagic.MissingOutputError,
                           match=r"'big' could not be saved on the target \(OSError: .*No space left") as info:
            job.result()
        assert info.value.values == {"small": 42}
        assert not list((tiny_disk / "root" / "jobs").glob("*/outputs/*.part"))
        assert r.run("z = 1", pull=["z"]).result() == {"z": 1}  # the session goes on
    finally:
        r.close()


# -- concurrency -------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, numpy as np, remotemagic
    root, session, me = sys.argv[1], sys.argv[2], int(sys.argv[3])
    r = remotemagic.connect("local", root=root, session=session)
    code = "import time\\nfor i in range(5):\\n    time.sleep(0.05)\\nmine = %d" % me
    job = r.run(code, background=True, pull=["mine"])
    for k in range(25):
        r.store_put("shared", np.full(200_000, me * 1000 + k))
        got = r.store_get("shared")
        assert (got == got[0]).all(), "torn value"
        assert got.shape == (200_000,)
    assert job.result() == {"mine": me}
    r.close()
    print("ok")
""")


def test_two_kernels_one_target_no_interference(target: Any, tmp_path: Path) -> None:
    if target.kind != "local":
        pytest.skip("the writers connect with the local backend")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(target.root), f"nb{i}", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip() == "ok", err
    r = target.connect()
    try:
        last = r.store_get("shared")
        assert (last == last[0]).all() and last[0] // 1000 in (1, 2)
    finally:
        r.close()


# -- security ----------------------------------------------------------------------------------
def test_no_secrets_on_the_target(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "SECRETabc123notforthetarget"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MY_API_TOKEN", secret)
    r = target.connect()
    try:
        r.run("import os\nprint('working')\nv = 1", pull=["v"]).result()
        r.store_put("x", 1)
        r.checkpoint()
    finally:
        r.close()
    for path in Path(target.root).rglob("*"):  # over SSH too: the loopback host is this machine
        if path.is_file() and not path.is_fifo():
            assert secret.encode() not in path.read_bytes(), path


def test_pickles_only_from_private_folders(remote: remotemagic.Remote, target: Any) -> None:
    objects = Path(target.root) / "objects"
    remote.run("pass", push={"v": 1})
    os.chmod(objects, 0o777)
    try:
        job = remote.run("print(v)", push={"v": 1})
        assert job.state == "error"
        assert "refusing to load pickles" in str(job.error())
    finally:
        os.chmod(objects, 0o700)


def test_checkpoint_restores_after_worker_death(remote: remotemagic.Remote) -> None:
    job = remote.run("a = 1\nb = list(range(5))\nimport threading\nlk = threading.Lock()")
    deadline = time.monotonic() + 30
    while True:  # the automatic checkpoint is written just after the job's status
        worker = [s for s in remote.sessions() if s["name"] == remote.session][0]
        if (worker["checkpoint"] or {}).get("after_job") == job.id or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert worker["checkpoint"]["names"] == ["a", "b"]
    os.kill(worker["pid"], signal.SIGKILL)
    fresh = remote.run("print('a' in dir())")  # a new worker; must not overwrite the checkpoint
    streams = [e["text"] for e in fresh.events() if e["type"] == "stream"]
    assert streams == ["False\n"], (fresh.state, list(fresh.events()))
    assert sorted(remote.restore_checkpoint()) == ["a", "b"]
    assert remote.run("c = a + len(b)", pull=["c"]).result() == {"c": 6}
    saved = remote.checkpoint(limit=100)["saved"]
    assert "lk" not in saved and {"a", "b", "c"} <= set(saved)


def test_status_and_store_files_are_never_torn(remote: remotemagic.Remote, target: Any) -> None:
    """Readers racing a writer always see a whole previous or whole new store value."""
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        other = target.connect()
        try:
            while not stop.is_set():
                try:
                    v = other.store_get("racy")
                except KeyError:
                    continue
                if not (v == v[0]).all():
                    bad.append("torn")
        finally:
            other.close()

    remote.store_put("racy", np.zeros(100_000))
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            remote.store_put("racy", np.full(100_000, float(i)))
    finally:
        stop.set()
        t.join()
    assert not bad


def test_sshd_killed_and_restarted_mid_job(ssh_shared_venv: Path, tmp_path: Path) -> None:
    """The SSH daemon and every connection it serves die mid-job; it comes back on the same port.
    The job runs on; the client reconnects with backoff and resumes with no gap or duplicate."""
    from .ssh_fixtures import TEST_PYTHON
    from .sshd import SSHServer

    server = SSHServer(tmp_path / "sshd").start()
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    (root / "venv").symlink_to(ssh_shared_venv)
    cfg = server.write_ssh_config(alias="restarting")
    r = remotemagic.connect("ssh:restarting", root=str(root), ssh_config=str(cfg), python=TEST_PYTHON,
                            reconnect_timeout=60, state_root=str(tmp_path / "state"))
    try:
        job = r.run("import time\nfor i in range(50):\n    print('line', i, flush=True)\n    time.sleep(0.04)",
                    background=True)
        seen: list[str] = []
        restarted = threading.Event()

        def restart() -> None:
            # this sshd's per-connection processes (not the detached workers below them, not other sshds)
            sessions = [p for p in _descendants(server.proc.pid) if _comm(p) == "sshd"]
            server.stop()  # the listener...
            for pid in sessions:  # ...and every connection it served
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
            server.start()
            restarted.set()

        def on_event(ev: dict) -> None:
            if ev["type"] == "stream":
                seen.append(ev["text"])
                if len(seen) == 10:
                    threading.Thread(target=restart).start()

        assert job.follow(on_event, timeout=120) == "done"
        assert restarted.wait(30)
        assert numbered("".join(seen)) == list(range(50))
        assert numbered("".join(e["text"] for e in job.events() if e["type"] == "stream")) == list(range(50))
    finally:
        r.close()
        stop_workers(root)
        server.stop()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_a_final_status_a_machine_crash_lost_comes_back_from_the_log(
        target: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker fsyncs the log -- whose last event carries the job's whole final status --
    before it renames status.json into place, and fsyncs that file only after the cell has its
    answer. What a machine crash in between leaves on disk (the running status.json beside the
    whole log, and no process at all) must come back as the job ended, with its -o value: not
    as a job whose worker died."""
    remote = target.connect()
    try:
        job = remote.run("y = 6 * 7\nprint('made y')", pull=["y"])
        assert job.result() == {"y": 42}
        jdir = target.root / "jobs" / job.id
        ended = json.loads((jdir / "status.json").read_text())
        last = json.loads((jdir / "events.jsonl").read_bytes().splitlines()[-1])
        assert (last["type"], last["state"], last["status"]) == ("status", "done", ended)
        pid = int((files.read_json(str(target.root / "sessions" / remote.session / "worker.json"), {}) or {})["pid"])
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the reboot: worker and supervisor gone
        running = {"state": "running", "started": ended["started"], "pid": ended["pid"]}
        files.atomic_write(str(jdir / "status.json"), [json.dumps(running).encode()])
    finally:
        remote.close()
    monkeypatch.setenv("REMOTEMAGIC_STATE_DIR", str(tmp_path / "another-kernel"))  # its own index
    other = target.connect()
    try:
        again = other.job(job.id)
        assert again.wait(timeout=60) == "done"
        assert again.result() == {"y": 42}
        assert [e["text"] for e in again.events() if e["type"] == "stream"] == ["made y\n"]
        assert json.loads((jdir / "status.json").read_text()) == ended
    finally:
        other.close()


def test_a_final_status_is_read_from_the_log_whatever_its_size(tmp_path: Path) -> None:
    """The restore above reads the log's last line: a status of a few MiB (a %ec2_store of
    thousands of names) comes back whole, a last line cut short by the crash does not count,
    and neither does a log whose last event is not a final status."""
    path = str(tmp_path / "events.jsonl")
    log = events.EventLog(path)
    log.emit({"type": "stream", "name": "stdout", "text": "x" * 5000 + "\n"})
    status = {"state": "done", "started": 1.0, "finished": 2.0,
              "stored": [f"name_{i:07d}_{'v' * 40}" for i in range(60_000)]}  # ~3.5 MB of JSON
    log.emit({"type": "status", "state": "done", "status": status})
    log.close()
    assert os.path.getsize(path) > 3_000_000
    assert events.final_status(path) == status
    with open(path, "ab") as f:
        f.write(b'{"type":"status","state":"failed","status":{"state":"fa')  # torn by the crash
    assert events.final_status(path) is None
    with open(path, "ab") as f:
        f.write(b'\n{"type":"stream","name":"stdout","text":"late\\n"}\n')
    assert events.final_status(path) is None
    assert events.final_status(str(tmp_path / "missing.jsonl")) is None
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert events.final_status(str(tmp_path / "empty.jsonl")) is None


def test_a_status_a_crash_left_empty_is_failed_or_restored_never_left_hanging(tmp_path: Path) -> None:
    """status.json is swapped in without an fsync, so a machine crash may leave it empty: the
    job whose worker is gone is then failed (or, had it ended, restored from its log) like one
    with a readable status -- not left "running" forever. A job with no status.json yet (being
    created) is left alone."""
    from remotemagic.agent import supervisor

    def job(job_id: str, status: bytes | None, final: dict[str, Any] | None) -> Path:
        jdir = tmp_path / "jobs" / job_id
        jdir.mkdir(parents=True)
        (jdir / "spec.json").write_text(json.dumps({"session": "s"}))
        (jdir / "handed").write_text("4242")
        if status is not None:
            (jdir / "status.json").write_bytes(status)
        log = events.EventLog(str(jdir / "events.jsonl"))
        log.emit({"type": "stream", "name": "stdout", "text": "working\n"})
        if final is not None:
            log.emit({"type": "status", "state": final["state"], "status": final})
        log.close()
        return jdir

    lost = job("20261203-000000-000-0001", b"", None)
    ended = {"state": "done", "started": 1.0, "finished": 2.0, "pid": 4242}
    finished = job("20261203-000000-000-0002", b"\0" * 40, ended)
    creating = job("20261203-000000-000-0003", None, None)
    marked = supervisor.mark_orphans(str(tmp_path), "s", "worker died, signal 9 (SIGKILL)", pid=4242)
    assert marked == [lost.name]
    failed = json.loads((lost / "status.json").read_text())
    assert failed["state"] == "failed" and failed["error"]["evalue"] == "worker died, signal 9 (SIGKILL)"
    assert json.loads((finished / "status.json").read_text()) == ended
    assert not (creating / "status.json").exists()
