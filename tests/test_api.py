"""The plain-Python API over every transport: run, push/pull, events, errors, sessions."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import remotemagic
from remotemagic.agent import files

from .conftest import stop_workers


def test_push_compute_pull(remote: remotemagic.Remote) -> None:
    x = np.arange(1_000_000, dtype=np.float64)  # > 64 KiB: travels out of band
    job = remote.run("y = x * 2\ntotal = float(y.sum())", push={"x": x}, pull=["y", "total"])
    assert job.state == "done"
    got = job.result()
    np.testing.assert_array_equal(got["y"], x * 2)
    assert got["total"] == float((x * 2).sum())


def test_large_output_is_pulled_not_inlined(remote: remotemagic.Remote) -> None:
    remote.inline_limit = 1000
    job = remote.run("import numpy as np\nbig = np.ones(500_000)", pull=["big"])
    assert job._values == {}  # too big to travel with the status
    assert job.result()["big"].sum() == 500_000


def test_large_in_band_pickles_cross_frames(remote: remotemagic.Remote) -> None:
    """A value pickled in band (a list, not an array) bigger than one 256 KiB frame: the
    pickle is read across frames (regression: it was refused as a truncated object file)."""
    remote.inline_limit = 1000
    assert remote.run("y = list(range(300_000))", pull=["y"]).result()["y"] == list(range(300_000))
    remote.store_put("big", {"k": [str(i) for i in range(100_000)]})
    assert remote.store_get("big") == {"k": [str(i) for i in range(100_000)]}


def test_namespace_persists_within_a_session(remote: remotemagic.Remote) -> None:
    remote.run("counter = 41")
    assert remote.run("counter += 1", pull=["counter"]).result() == {"counter": 42}


def test_output_streams_live(remote: remotemagic.Remote, tmp_path: Path) -> None:
    """The cell blocks until the test has *seen* its first line: only live streaming passes."""
    flag = tmp_path / "seen"
    code = (
        "import os, time\n"
        "print('first', flush=True)\n"
        f"while not os.path.exists({str(flag)!r}): time.sleep(0.01)\n"
        "print('second')\n"
    )
    job = remote.run(code, background=True)
    seen: list[str] = []

    def on_event(ev: dict) -> None:
        if ev["type"] == "stream":
            seen.append(ev["text"])
            if "first" in ev["text"]:
                flag.touch()

    assert job.follow(on_event, timeout=60) == "done"
    assert "".join(seen) == "first\nsecond\n"


FD_CELL = """
import ctypes, os, subprocess
os.system("echo from-system")
subprocess.run(["sh", "-c", "echo to-stderr >&2"])
ctypes.CDLL(None).printf(b"from-printf %d\\n", 42)
print("from-print")
"""


def test_output_written_to_file_descriptors_reaches_the_cell(remote: remotemagic.Remote) -> None:
    """C code, os.system and child processes write to fds 1/2, not sys.stdout: still shown."""
    job = remote.run(FD_CELL)
    assert job.state == "done"
    text = {name: "".join(e["text"] for e in job.events() if e["type"] == "stream" and e["name"] == name)
            for name in ("stdout", "stderr")}
    for line in ("from-system", "from-printf 42", "from-print"):
        assert line in text["stdout"], text
    assert "to-stderr" in text["stderr"], text
    # between jobs the descriptors point back at the worker's log: nothing leaks into the next job
    assert [e for e in remote.run("pass").events() if e["type"] == "stream"] == []


def test_file_descriptor_output_streams_live(remote: remotemagic.Remote) -> None:
    seen: dict[str, float] = {}

    def on_event(ev: dict) -> None:
        if ev.get("type") == "stream":
            for word in ev["text"].split():
                seen.setdefault(word, time.monotonic())

    remote.run("import os, time\nos.system('echo early')\ntime.sleep(2)\nprint('late')", on_event=on_event)
    assert seen["late"] - seen["early"] > 1.0, seen  # shown while the job ran, not at its end


def test_requests_mark_the_target_as_in_use(remote: remotemagic.Remote, target) -> None:
    """The agent touches <root>/activity when a client uses it (EC2's idle auto-stop reads it)."""
    remote.run("pass")
    activity = Path(target.root) / "activity"
    assert time.time() - activity.stat().st_mtime < 120
    assert activity.stat().st_mode & 0o777 == 0o600


def test_rich_outputs_are_mime_bundles(remote: remotemagic.Remote) -> None:
    code = (
        "from IPython.display import display, HTML, JSON\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(JSON({'a': 1}))\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "plt.show()\n"
        "class R:\n"
        "    def _repr_html_(self): return '<i>rich</i>'\n"
        "R()\n"
    )
    job = remote.run(code)
    assert job.state == "done", list(job.events())
    events = list(job.events())
    bundles = [e["data"] for e in events if e["type"] in ("display_data", "execute_result")]
    assert any(b.get("text/html") == "<b>bold</b>" for b in bundles)
    assert any(b.get("application/json") == {"a": 1} for b in bundles)
    pngs = [b["image/png"] for b in bundles if "image/png" in b]
    assert pngs and pngs[0].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    results = [e for e in events if e["type"] == "execute_result"]
    assert results[-1]["data"]["text/html"] == "<i>rich</i>"


def test_remote_exception_carries_traceback(remote: remotemagic.Remote) -> None:
    job = remote.run("def f():\n    raise ValueError('boom')\nf()")
    assert job.state == "error"
    with pytest.raises(remotemagic.RemoteError) as info:
        job.result()
    err = info.value
    assert err.ename == "ValueError" and err.evalue == "boom"
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err.traceback))
    assert "boom" in text and "----> 3 f()" in text
    assert remote.run("ok = 1", pull=["ok"]).result() == {"ok": 1}  # session still usable


def test_unpicklable_value_is_refused_before_submitting(remote: remotemagic.Remote) -> None:
    before = len(remote.jobs())
    with pytest.raises(remotemagic.UnpicklableValueError, match=r"'lock'.*cannot be pickled"):
        remote.run("pass", push={"lock": threading.Lock()})
    assert len(remote.jobs()) == before


def test_missing_output_names_it_and_delivers_the_rest(remote: remotemagic.Remote) -> None:
    job = remote.run("a = 1\nimport threading\nlk = threading.Lock()", pull=["a", "nope", "lk"])
    with pytest.raises(remotemagic.MissingOutputError) as info:
        job.result()
    assert "nope" in str(info.value) and "'lk' could not be pickled" in str(info.value)
    assert info.value.values == {"a": 1}


def test_bad_names(remote: remotemagic.Remote) -> None:
    with pytest.raises(remotemagic.UnknownJobError):
        remote.job("20200101-000000-000-abcd")
    with pytest.raises(remotemagic.UnknownJobError):
        remote.job("zzzz")
    with pytest.raises(ValueError, match="invalid session name"):
        remote.run("pass", session="../escape")
    with pytest.raises(ValueError, match="invalid session name"):
        remote.run("pass", session="a/b")


def test_background_job_and_reattach(remote: remotemagic.Remote) -> None:
    job = remote.run("import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.2)\nres = 'ok'",
                     background=True, pull=["res"])
    assert job.state in ("queued", "running")
    again = remote.job(job.id[-4:])
    assert again.id == job.id
    assert again.wait(timeout=60) == "done"
    assert again.result() == {"res": "ok"}
    text = "".join(e["text"] for e in again.events() if e["type"] == "stream")
    assert text == "0\n1\n2\n"


def test_wait_timeout(remote: remotemagic.Remote) -> None:
    job = remote.run("import time\ntime.sleep(30)", background=True)
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.5)
    assert job.cancel() in ("interrupting", "cancelled")
    assert job.wait(timeout=30) == "interrupted"


def test_cancel_interrupts_and_session_survives(remote: remotemagic.Remote) -> None:
    remote.run("keep = 'still here'")
    job = remote.run("import time\nprint('started', flush=True)\nwhile True: time.sleep(0.05)", background=True)
    for _ in _events_until(job, lambda e: e.get("text") == "started\n"):
        pass
    assert job.cancel() == "interrupting"
    assert job.wait(timeout=30) == "interrupted"
    err = job.error()
    assert err is not None and err.ename == "KeyboardInterrupt"
    assert remote.run("x = keep", pull=["x"]).result() == {"x": "still here"}


def test_cancel_queued_job(remote: remotemagic.Remote) -> None:
    first = remote.run("import time\ntime.sleep(1.5)", background=True)
    second = remote.run("print('never')", background=True)
    assert second.cancel() == "cancelled"
    assert first.wait(timeout=30) == "done"
    assert second.wait(timeout=30) == "cancelled"
    assert not any(e.get("text") for e in second.events())


def test_timeout_interrupts(remote: remotemagic.Remote) -> None:
    job = remote.run("import time\ntime.sleep(60)", timeout=0.5)
    assert job.state == "timeout"
    assert "timeout" in str(job.error())


def test_worker_killed_mid_job(remote: remotemagic.Remote, capsys: pytest.CaptureFixture) -> None:
    remote.run("lost = 1")
    job = remote.run("import time\nprint('go', flush=True)\ntime.sleep(60)", background=True)
    for _ in _events_until(job, lambda e: e.get("text") == "go\n"):
        pass
    worker = [s for s in remote.sessions() if s["name"] == remote.session][0]
    os.kill(worker["pid"], signal.SIGKILL)
    assert job.wait(timeout=30) == "failed"
    err = job.error()
    assert err is not None and "worker died, signal 9 (SIGKILL)" in err.evalue
    capsys.readouterr()
    nxt = remote.run("print('lost' in dir())")
    # a script with no renderer: the notice is written to stderr, and kept with the job's events
    assert "[remotemagic] warning: the previous worker" in capsys.readouterr().err
    assert [e for e in nxt.events() if e["type"] == "notice" and "namespace was lost" in e["text"]]
    assert any("namespace was lost" in n["text"] for n in remote.notices)
    assert [e["text"] for e in nxt.events() if e["type"] == "stream"] == ["False\n"]


def test_closing_a_connection_wakes_every_call_still_waiting(target, tmp_path: Path) -> None:
    """A stream still open when the connection is closed (a job's log followed by a thread, a
    value nobody took) ends at once with ConnectionLostError instead of waiting forever (the
    close marked the link lost first, so the reader's end woke nobody)."""
    from remotemagic.agent import protocol

    r = target.connect()
    gate = tmp_path / "go"
    try:
        job = r.run(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)",
                    background=True)
        call = r.connection().start(protocol.OP_EVENTS, job=job.id, offset=0, follow=True)
        ended: list[BaseException] = []

        def follow() -> None:
            try:
                for _ in call:
                    pass
            except BaseException as exc:
                ended.append(exc)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        r.close()
        follower.join(30)
        assert not follower.is_alive(), "a call left waiting after its connection was closed"
        assert ended and isinstance(ended[0], remotemagic.errors.ConnectionLostError)
    finally:
        gate.touch()
        r.close()


def test_sessions_side_by_side(target) -> None:
    a = target.connect(session="nb-a")
    b = target.connect(session="nb-b")
    try:
        ja = a.run("import time\nv = 'a'\ntime.sleep(0.5)", background=True)
        jb = b.run("import time\nv = 'b'\ntime.sleep(0.5)", background=True)
        t0 = time.monotonic()
        assert ja.wait(timeout=30) == "done" and jb.wait(timeout=30) == "done"
        assert time.monotonic() - t0 < 5
        assert a.run("w = v", pull=["w"]).result() == {"w": "a"}
        assert b.run("w = v", pull=["w"]).result() == {"w": "b"}
        names = {s["name"] for s in a.sessions() if s["alive"]}
        assert {"nb-a", "nb-b"} <= names
    finally:
        a.close()
        b.close()


def test_store_roundtrip_across_processes(remote: remotemagic.Remote, target) -> None:
    meta = remote.store_put("shared", {"k": np.arange(3)})
    assert meta["type"] == "dict" and meta["size"] > 0
    other = target.connect()  # another process would do exactly this
    try:
        got = other.store_get("shared")
        np.testing.assert_array_equal(got["k"], np.arange(3))
        listed = {v["name"]: v for v in other.store_list()}
        assert listed["shared"]["preview"].startswith("{'k': array([0, 1, 2])")
        other.store_delete("shared")
        with pytest.raises(KeyError):
            remote.store_get("shared")
    finally:
        other.close()


def test_store_from_remote_namespace(remote: remotemagic.Remote) -> None:
    remote.run("import numpy as np\nonly_remote = np.full(10, 7)")
    st = remote.store_from_session(["only_remote"])
    assert "only_remote" in st["stored"]
    np.testing.assert_array_equal(remote.store_get("only_remote"), np.full(10, 7))
    remote.stop_session()
    remote.restore_to_session(["only_remote"])
    assert remote.run("s = int(only_remote.sum())", pull=["s"]).result() == {"s": 70}


def test_output_survives_a_new_client_and_a_removed_target(target, tmp_path: Path) -> None:
    import shutil

    r = target.connect()
    job = r.run("print('kept')")
    r.close()
    stop_workers(target.root)
    shutil.rmtree(target.root)
    from remotemagic import state

    record = state.JobRecord(state.state_dir(), job.id)
    assert [e["text"] for e in record.events() if e["type"] == "stream"] == ["kept\n"]
    assert record.meta["state"] == "done"


def test_files_are_private(remote: remotemagic.Remote, target) -> None:
    remote.run("v = 1", pull=["v"]).result()
    remote.store_put("p", 1)
    root = Path(target.root)  # the loopback sshd's host is this machine: inspect it directly
    for path in root.rglob("*"):
        if path.is_symlink() or path.is_fifo() or path.is_socket() or "venv" in path.relative_to(root).parts[:1]:
            continue
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode & 0o077 == 0, (path, oct(mode))


def _events_until(job: remotemagic.Job, pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.sync()
        for ev in job.events():
            yield ev
            if pred(ev):
                return
        time.sleep(0.02)
    raise AssertionError("event never arrived")


def test_object_files_roundtrip_and_reject_truncation(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random(100_000)
    enc = files.encode({"a": arr, "s": "x"})
    assert len(enc.buffers) == 1  # the array's data is out of band
    path = str(tmp_path / "o")
    files.write_object(path, enc)
    back = files.load_object(path)
    np.testing.assert_array_equal(back["a"], arr)
    with open(path, "r+b") as f:
        f.truncate(enc.size - 10)
    with pytest.raises(ValueError, match="truncated"):
        files.load_object(path)


def test_local_modules_travel_with_the_cell(remote: remotemagic.Remote, tmp_path: Path, monkeypatch) -> None:
    """A helpers.py beside the notebook is importable in the cell, and edits reach the target."""
    import sys

    src = tmp_path / "mods"
    (src / "mypkg").mkdir(parents=True)
    (src / "rm_helpers_mod.py").write_text("def double(x):\n    return 2 * x\n")
    (src / "mypkg" / "__init__.py").write_text("from .inner import VALUE\n")
    (src / "mypkg" / "inner.py").write_text("VALUE = 'pkg ok'\n")
    monkeypatch.syspath_prepend(str(src))
    code = "import rm_helpers_mod\nfrom mypkg import VALUE\nr = (rm_helpers_mod.double(21), VALUE)"
    assert remote.run(code, pull=["r"]).result() == {"r": (42, "pkg ok")}
    (src / "rm_helpers_mod.py").write_text("def double(x):\n    return 3 * x\n")
    sys.modules.pop("rm_helpers_mod", None)
    assert remote.run(code, pull=["r"]).result() == {"r": (63, "pkg ok")}


def test_large_buffers_are_mapped_aligned_and_private(tmp_path: Path) -> None:
    folder = tmp_path / "objs"
    folder.mkdir(mode=0o700)
    arr = np.arange(1_000_000, dtype=np.float64)  # 8 MB: mapped, not read
    enc = files.encode({"x": arr, "tag": "t"})
    path = str(folder / "o")
    files.write_object(path, enc)
    back = files.load_object(path)["x"]
    np.testing.assert_array_equal(back, arr)
    assert back.flags.aligned and back.flags.writeable
    back[:10] = -1  # copy-on-write: the file, and the next load, are unchanged
    assert files.load_object(path)["x"][0] == 0
    with open(path, "r+b") as f:
        f.truncate(enc.size - 1)
    with pytest.raises(ValueError, match="truncated"):
        files.load_object(path)


def test_input_without_a_frontend_fails_at_once(remote: remotemagic.Remote) -> None:
    from IPython.core.error import StdinNotImplementedError

    job = remote.run("answer = input('Your name? ')", background=True)
    job.wait(timeout=60)
    with pytest.raises(StdinNotImplementedError, match="nobody can answer it") as info:
        job.result()
    assert isinstance(info.value, remotemagic.RemoteError)
    assert not [e for e in job.events() if e["type"] == "input_request"]
