"""The magics through a real IPython shell (run_cell), over every transport."""

from __future__ import annotations

import gc
import os
import re
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from IPython.core.error import UsageError

import remotemagic

from .conftest import plain, run_ok, wait_for


def test_run_pushes_and_pulls(ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "import numpy as np\nx = np.arange(5)")
    run_ok(ip, "%%ec2 run -i x -o y,z\ny = x + 1\nz = 'done'\nprint('on the target:', y.sum())")
    np.testing.assert_array_equal(ip.user_ns["y"], np.arange(1, 6))
    assert ip.user_ns["z"] == "done"
    assert "on the target: 15" in capsys.readouterr().out


def test_remote_error_is_a_local_error_with_remote_traceback(ip: Any, capsys: pytest.CaptureFixture) -> None:
    result = ip.run_cell("%%ec2 run\ndef inner():\n    return 1 / 0\ninner()")
    err = result.error_in_exec
    assert isinstance(err, remotemagic.RemoteError) and isinstance(err, ZeroDivisionError)
    assert type(err).__name__ == "ZeroDivisionError" and str(err) == "division by zero"
    out = capsys.readouterr()
    text = plain(out.out + out.err)
    assert "ZeroDivisionError: division by zero" in text and "raised on the target, job " in text
    assert "inner()" in text and "magics.py" not in text  # the remote frames, not ours


def test_remote_value_and_error_behave_as_local(ip: Any) -> None:
    result = ip.run_cell("%%ec2 run\n6 * 7", store_history=True)  # as a notebook does
    count = result.execution_count
    assert repr(ip.user_ns["_"]) == "42" and repr(ip.user_ns["Out"][count]) == "42"  # Out[n] and _ updated here
    run_ok(ip, "try:\n    get_ipython().run_cell_magic('ec2', 'run', 'int(\"x\")')\n"
               "except ValueError as exc:\n    caught = (type(exc).__name__, str(exc))")
    assert ip.user_ns["caught"] == ("ValueError", "invalid literal for int() with base 10: 'x'")


def test_usage_errors(ip: Any) -> None:
    for cell, match in [
        ("%%ec2 run -i nope\npass", "no variable named 'nope'"),
        ("%%ec2 run -o 'a b'\npass", "not a variable name"),
        ("%ec2 frobnicate", "unknown command"),
        ("%ec2 run", "cell magic"),
        ("%ec2 output zzzz", "no job"),
        ("%%ec2 run --session ../x\npass", "invalid session name"),
    ]:
        result = ip.run_cell(cell)
        err = result.error_in_exec or result.error_before_exec
        assert err is not None and match in str(err), (cell, err)


def test_unpicklable_push_names_the_variable(ip: Any) -> None:
    run_ok(ip, "import threading\nlk = threading.Lock()")
    result = ip.run_cell("%%ec2 run -i lk\nprint(lk)")
    assert isinstance(result.error_in_exec, UsageError)
    assert "'lk'" in str(result.error_in_exec) and "cannot be pickled" in str(result.error_in_exec)


def test_missing_output_still_delivers_others(ip: Any) -> None:
    result = ip.run_cell("%%ec2 run -o a,b\na = 5")
    assert isinstance(result.error_in_exec, remotemagic.MissingOutputError)
    assert "not defined by the cell: b" in str(result.error_in_exec)
    assert ip.user_ns["a"] == 5


def test_background_then_wait_in_a_new_kernel(ip: Any, target: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run --bg -o result\nimport time\nprint('working')\ntime.sleep(0.3)\nresult = 6 * 7")
    out = capsys.readouterr().out
    job_id = out.split("Job ", 1)[1].split()[0]
    # a "new kernel": unload, forget everything, load again
    ip.run_line_magic("unload_ext", "remotemagic")
    ip.user_ns.pop("result", None)
    ip.run_line_magic("load_ext", "remotemagic")
    ip.run_line_magic("ec2", target.use_line)
    run_ok(ip, f"%ec2 wait {job_id[-4:]}")
    assert ip.user_ns["result"] == 42
    assert "working" in capsys.readouterr().out


def test_output_rerenders_everything(ip: Any, target: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run\nfor i in range(3): print('line', i)\n"
               "from IPython.display import HTML, display\ndisplay(HTML('<p>x</p>'))")
    capsys.readouterr()
    ip.run_line_magic("unload_ext", "remotemagic")
    ip.run_line_magic("load_ext", "remotemagic")
    ip.run_line_magic("ec2", target.use_line)
    jobs = remotemagic.state.list_jobs(remotemagic.state.state_dir())
    run_ok(ip, f"%ec2 output {jobs[-1]['id']}")
    out = capsys.readouterr().out
    assert "line 0\nline 1\nline 2\n" in out and "<IPython.core.display.HTML object>" in out


def test_jobs_status_cancel(ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run --bg\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    job_id = capsys.readouterr().out.split("Job ", 1)[1].split()[0]
    run_ok(ip, "%ec2 jobs")
    assert job_id in capsys.readouterr().out
    run_ok(ip, "%ec2 status")
    status = capsys.readouterr().out
    assert "Sessions:" in status and "default" in status
    wait_for("the job to show as running", lambda: "running" in _capture(ip, capsys, "%ec2 jobs"))
    run_ok(ip, f"%ec2 cancel {job_id}")
    assert "interrupting" in capsys.readouterr().out
    result = ip.run_cell(f"%ec2 wait {job_id}")
    assert isinstance(result.error_in_exec, remotemagic.RemoteError)
    assert result.error_in_exec.ename == "KeyboardInterrupt"


def test_a_pulled_value_deleted_in_the_notebook_is_freed(ip: Any) -> None:
    # one value small enough to come inline with the job's end, one streamed as a file
    run_ok(ip, "%%ec2 run -o small,big\nimport numpy as np\nsmall = np.zeros(10)\nbig = np.ones(1 << 21)")
    gone = [weakref.ref(ip.user_ns["small"]), weakref.ref(ip.user_ns["big"])]
    run_ok(ip, "del small, big")
    gc.collect()
    assert [ref() for ref in gone] == [None, None]  # no copy kept beside the notebook's
    run_ok(ip, "%ec2 wait")  # the same job's values, read from the target again
    assert ip.user_ns["small"].sum() == 0 and ip.user_ns["big"].sum() == 1 << 21


def test_ctrl_c_interrupts_remote_code_and_session_survives(ip: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    flag = tmp_path / "started"
    run_ok(ip, "%%ec2 run\nkept = 'yes'")

    def press_ctrl_c() -> None:
        wait_for("the cell to start", flag.exists)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=press_ctrl_c)
    t.start()
    result = ip.run_cell(f"%%ec2 run\nimport time, pathlib\npathlib.Path({str(flag)!r}).touch()\n"
                         "while True: time.sleep(0.05)")
    t.join()
    err = result.error_in_exec
    assert isinstance(err, remotemagic.RemoteError) and err.ename == "KeyboardInterrupt", err
    assert isinstance(err, KeyboardInterrupt)
    out = capsys.readouterr()
    assert "Interrupting job" in out.err
    shown = plain(out.out + out.err)
    assert "KeyboardInterrupt" in shown and "on_sigint" not in shown  # no worker frames
    run_ok(ip, "%%ec2 run -o kept2\nkept2 = kept")
    assert ip.user_ns["kept2"] == "yes"


def test_second_ctrl_c_detaches(ip: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flag = tmp_path / "started"

    def press_twice() -> None:
        wait_for("the cell to start", flag.exists)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=press_twice)
    t.start()
    code = (f"%%ec2 run\nimport time, pathlib\npathlib.Path({str(flag)!r}).touch()\n"
            "while True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass\n")
    run_ok(ip, code)  # the cell returns: detached, the job runs on
    t.join()
    err = capsys.readouterr().err
    assert "Detached from job" in err and "%ec2 wait" in err
    job = ip.run_line_magic("ec2", "jobs")  # noqa: F841 - prints
    assert "running" in capsys.readouterr().out


def test_store_like_percent_store(ip: Any, target: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "a = 1\nb = [1, 2, 3]")
    run_ok(ip, "%ec2_store a b")
    assert capsys.readouterr().out == "Stored 'a' (int)\nStored 'b' (list)\n"
    run_ok(ip, "%ec2_store")
    listing = capsys.readouterr().out
    assert "a" in listing and "[1, 2, 3]" in listing and "int" in listing
    result = ip.run_cell("%ec2_store nope")
    assert isinstance(result.error_in_exec, UsageError) and "Unknown variable 'nope'" in str(result.error_in_exec)
    # another process restores what this kernel stored
    other = target.connect()
    try:
        assert other.store_get("b") == [1, 2, 3]
    finally:
        other.close()
    run_ok(ip, "del a, b\n%ec2_store -r b")
    assert ip.user_ns["b"] == [1, 2, 3] and "a" not in ip.user_ns
    run_ok(ip, "%ec2_store -r")
    assert ip.user_ns["a"] == 1
    run_ok(ip, "%ec2_store -d a")
    result = ip.run_cell("%ec2_store -d a")
    assert isinstance(result.error_in_exec, UsageError)
    run_ok(ip, "%ec2_store -z")
    capsys.readouterr()
    run_ok(ip, "%ec2_store")
    assert "No values stored" in capsys.readouterr().out


def test_store_remote_only_value(ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run\nmodel = {'weights': list(range(5))}")
    run_ok(ip, "%ec2_store --remote model")
    assert "Stored 'model' (dict)" in capsys.readouterr().out
    assert "model" not in ip.user_ns
    run_ok(ip, "%ec2_store -r model")
    assert ip.user_ns["model"] == {"weights": [0, 1, 2, 3, 4]}
    result = ip.run_cell("%ec2_store --remote missing_thing")
    assert isinstance(result.error_in_exec, UsageError)


def test_config_and_unload(ip: Any, tmp_path: Path) -> None:
    root = tmp_path / "configured"
    run_ok(ip, f"%config Ec2Magics.local_root = {str(root)!r}")
    run_ok(ip, "%%ec2 run\npass")
    assert (root / "jobs").is_dir()
    ip.run_line_magic("unload_ext", "remotemagic")
    assert "ec2" not in ip.magics_manager.magics["line"]
    assert "ec2" not in ip.magics_manager.magics["cell"]
    assert "ec2_store" not in ip.magics_manager.magics["line"]
    ip.run_line_magic("load_ext", "remotemagic")  # the fixture unloads again
    from .conftest import stop_workers

    stop_workers(root)


def _capture(ip: Any, capsys: pytest.CaptureFixture, line: str) -> str:
    run_ok(ip, line)
    return capsys.readouterr().out




# -- user notices, and where cells run (issue #16 items 5 and 6) ----------------------------------
def _magics(ip: Any) -> Any:
    from remotemagic.magics import _loaded

    return _loaded[id(ip)]


def _kill_worker(ip: Any, checkpointed: bool = True) -> None:
    """SIGKILL the session's worker (after its automatic checkpoint) and wait until it is gone."""
    remote = _magics(ip).remote
    last = remote.last_job.id

    def session() -> dict:
        return [s for s in remote.sessions() if s["name"] == remote.session][0]

    if checkpointed:
        wait_for("the automatic checkpoint", lambda: (session()["checkpoint"] or {}).get("after_job") == last)
    os.kill(session()["pid"], signal.SIGKILL)
    wait_for("the worker to be gone", lambda: not session()["alive"])


def test_lost_namespace_is_told_in_the_cell(ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run\nlost = 1")
    _kill_worker(ip)
    capsys.readouterr()
    run_ok(ip, "%%ec2 run\nprint('lost' in dir())")
    out = capsys.readouterr()
    assert out.out == "False\n"
    assert "[remotemagic] warning: the previous worker of session 'default' stopped (worker died, signal 9" in out.err
    assert "its namespace was lost" in out.err and "%ec2 checkpoint --restore brings them back" in out.err
    run_ok(ip, "%ec2 output")  # the notice is one of the job's events: replayed with its output
    replay = capsys.readouterr()
    assert "its namespace was lost" in replay.err and replay.out.startswith("False\n")
    # a background job: told when the cell returns
    _kill_worker(ip, checkpointed=False)  # the dead worker's checkpoint is held until restored
    capsys.readouterr()
    run_ok(ip, "%%ec2 run --bg\nx = 1")
    out = capsys.readouterr()
    assert "its namespace was lost" in out.err and "runs in the background" in out.out


@pytest.fixture
def bare_ip(fresh_shell: Any) -> Any:
    """A real IPython shell with the extension loaded and no %ec2 use."""
    return fresh_shell


def test_no_use_says_once_which_target_cells_run_on(bare_ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(bare_ip, "%%ec2 run\nprint('hi')")
    out = capsys.readouterr()
    assert out.out == "hi\n"
    assert "[remotemagic] no %ec2 use in this kernel: cells run on local:" in out.err
    assert "Ec2Magics.target = 'local'" in out.err
    run_ok(bare_ip, "%%ec2 run\nprint('again')")
    assert "no %ec2 use" not in capsys.readouterr().err


def test_failed_use_never_falls_back_to_another_target(bare_ip: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "ssh_config"
    cfg.write_text("")
    flag = tmp_path / "ran"
    result = bare_ip.run_cell(f"%ec2 use ssh nobody@127.0.0.1:{port} --ssh-config {cfg}")
    assert result.error_in_exec is not None
    for cell in (f"%%ec2 run\nimport pathlib\npathlib.Path({str(flag)!r}).touch()", "%ec2 jobs"):
        result = bare_ip.run_cell(cell)
        err = result.error_in_exec
        assert isinstance(err, UsageError), err
        assert f"%ec2 use ssh nobody@127.0.0.1:{port} failed (" in str(err) and "until a %ec2 use" in str(err)
    assert not flag.exists()
    assert "no %ec2 use" not in capsys.readouterr().err
    run_ok(bare_ip, "%ec2 use local")
    run_ok(bare_ip, f"%%ec2 run\nimport pathlib\npathlib.Path({str(flag)!r}).touch()")
    assert flag.exists()


# -- stopping what does not want to stop (issue #16 items 3 and 4) --------------------------------
STUBBORN = ("%%ec2 run --bg\nimport time, pathlib\npathlib.Path({flag!r}).touch()\n"
            "while True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass\n")


def _bg(ip: Any, capsys: pytest.CaptureFixture, cell: str) -> str:
    run_ok(ip, cell)
    return capsys.readouterr().out.split("Job ", 1)[1].split()[0]


def test_restart_stops_a_busy_worker_and_fails_its_jobs(ip: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flag = tmp_path / "started"
    run_ok(ip, "%config Ec2Magics.stop_grace = 0.5")
    run_ok(ip, "%%ec2 run\nold = 1")
    stubborn = _bg(ip, capsys, STUBBORN.format(flag=str(flag)))
    wait_for("the job to start", flag.exists)
    queued = _bg(ip, capsys, "%%ec2 run --bg\nprint('never')")
    run_ok(ip, "%ec2 restart")
    out = capsys.readouterr().out
    # the job swallows KeyboardInterrupt: SIGTERM ends it, or SIGKILL if a loaded machine lets the grace pass first
    assert re.search(r"Session 'default': worker stopped \(with SIG(TERM|KILL)\); "
                     r"2 job\(s\) it held or queued failed", out), out
    assert stubborn in out and queued in out
    for job_id in (stubborn, queued):
        err = ip.run_cell(f"%ec2 wait {job_id}").error_in_exec
        assert isinstance(err, remotemagic.RemoteError) and err.state == "failed", err
        assert err.ename == "SessionStopped" and "session 'default' was restarted (%ec2 restart)" in err.evalue
    capsys.readouterr()
    run_ok(ip, "%%ec2 run -o fresh\nfresh = 'old' not in dir()")  # the next cell runs at once, in a new worker
    assert ip.user_ns["fresh"] is True
    assert "never" not in capsys.readouterr().out


def test_cancel_escalates_to_killing_the_worker(ip: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%config Ec2Magics.stop_grace = 0.5")
    run_ok(ip, "%%ec2 run\nkept = 1")
    flag = tmp_path / "one"
    job_id = _bg(ip, capsys, STUBBORN.format(flag=str(flag)))
    wait_for("the job to start", flag.exists)
    run_ok(ip, f"%ec2 cancel {job_id[-6:]}")
    out = capsys.readouterr()
    assert f"Job {job_id}: interrupting\nJob {job_id}: cancelled\n" == out.out
    assert "still runs 0.5 s after the interrupt" in out.err and "its namespace is lost" in out.err
    err = ip.run_cell(f"%ec2 wait {job_id}").error_in_exec
    assert isinstance(err, remotemagic.RemoteError) and err.state == "cancelled" and err.ename == "Killed", err
    capsys.readouterr()
    run_ok(ip, "%%ec2 run\nprint('kept' in dir())")
    out = capsys.readouterr()
    assert out.out == "False\n" and "killed by %ec2 cancel: still running 0.5 s after the interrupt" in out.err
    # --kill: at once
    flag = tmp_path / "two"
    job_id = _bg(ip, capsys, STUBBORN.format(flag=str(flag)))
    wait_for("the job to start", flag.exists)
    run_ok(ip, f"%ec2 cancel --kill {job_id}")
    assert capsys.readouterr().out == f"Job {job_id}: cancelled\n"
    run_ok(ip, "%%ec2 run -o v\nv = 2")
    assert ip.user_ns["v"] == 2


# -- idle workers exit (issue #16 item 10) --------------------------------------------------------
def test_idle_worker_exits_after_a_checkpoint(ip: Any, capsys: pytest.CaptureFixture) -> None:
    remote = _magics(ip).remote

    def session(name: str = "default") -> dict:
        return [s for s in remote.sessions() if s["name"] == name][0]

    run_ok(ip, "%%ec2 run --session other\nx = 1")  # a worker that stays (24 h)
    wait_for("the job's end", lambda: not session("other")["current"])
    capsys.readouterr()
    run_ok(ip, "%ec2 sessions")
    listing = capsys.readouterr().out
    row = [line for line in listing.splitlines() if line.strip().startswith("other ")][0]
    assert str(session("other")["pid"]) in row and " MB " in row and row.endswith("  idle"), listing
    assert re.search(r" \d+\.\ds  idle$", row), row
    run_ok(ip, "%config Ec2Magics.worker_idle_hours = 0.0005")  # 1.8 s
    run_ok(ip, "%%ec2 run\nkeep = 41")
    wait_for("the idle worker to exit", lambda: not session()["alive"])
    assert session("other")["alive"]
    run_ok(ip, "%%ec2 run\nprint('keep' in dir())")
    out = capsys.readouterr()
    assert out.out == "False\n"
    assert "idle for 0.0005 h, it exited to free its memory; checkpointed 1 value(s) first" in out.err, out.err
    assert "%ec2 checkpoint --restore brings them back" in out.err
    run_ok(ip, "%ec2 checkpoint --restore")
    run_ok(ip, "%%ec2 run -o keep\npass")
    assert ip.user_ns["keep"] == 41
    # %ec2 restart --all stops every session's worker
    run_ok(ip, "%config Ec2Magics.worker_idle_hours = 24")
    capsys.readouterr()
    run_ok(ip, "%ec2 restart --all")
    out = capsys.readouterr().out
    assert "Session 'default': worker stopped" in out and "Session 'other': worker stopped" in out
    assert not any(s["alive"] for s in remote.sessions())


def test_host_key_recorded_on_first_use_is_told(bare_ip: Any, sshd_server: Any, ssh_shared_venv: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from .ssh_fixtures import TEST_PYTHON

    known = tmp_path / "kh" / "known_hosts"  # the host was never seen
    cfg = sshd_server.write_ssh_config(tmp_path / "cfg", alias="fresh", UserKnownHostsFile=known)
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    (root / "venv").symlink_to(ssh_shared_venv)
    run_ok(bare_ip, f"%ec2 use ssh fresh --root {root} --python {TEST_PYTHON} --ssh-config {cfg} --trust-new-host")
    err = capsys.readouterr().err
    assert "[remotemagic] warning: trusting" in err and "on first use: recorded its host key" in err, err
    assert str(known) in err and known.read_text().strip() == sshd_server.host_key_line


# -- issue #16 item 9: each of these was a raw traceback or a silent surprise -----------------------
def _fails(ip: Any, capsys: pytest.CaptureFixture, cell: str, *expected: str) -> str:
    """Run a cell that must fail with a one-line UsageError containing ``expected``; return what
    the user saw."""
    result = ip.run_cell(cell)
    err = result.error_in_exec or result.error_before_exec
    out = capsys.readouterr()
    seen = plain(out.out + out.err)
    assert isinstance(err, UsageError), (cell, err)
    for text in expected:
        assert text in str(err) and text in seen, (cell, text, seen)
    assert "Traceback" not in seen, seen
    return seen


def test_bad_session_name_on_run_and_restart(ip: Any, capsys: pytest.CaptureFixture) -> None:
    for cell in ("%%ec2 run --session ../x\nprint('ran')", "%ec2 restart --session ../x",
                 "%ec2 checkpoint --session ../x"):
        seen = _fails(ip, capsys, cell, "invalid session name '../x'")
        assert "ran" not in seen


def test_unterminated_quote_in_any_magic_line(ip: Any, capsys: pytest.CaptureFixture) -> None:
    for cell in ("%ec2 push 'unclosed", "%ec2_store 'x", "%%ec2 run -o 'a\nprint('ran')"):
        seen = _fails(ip, capsys, cell, "cannot read the line", "No closing quotation")
        assert "ran" not in seen


def test_pull_of_an_unreadable_file(ip: Any, capsys: pytest.CaptureFixture) -> None:
    path = "/proc/sys/vm/compact_memory"  # write-only, even for root
    try:
        open(path).close()
    except PermissionError:
        pass
    else:
        pytest.skip(f"{path} is readable here")
    _fails(ip, capsys, f"%ec2 pull {path}", f"%ec2 pull {path}", "Permission denied")
    assert not Path("compact_memory").exists() and not Path("compact_memory.rmpart").exists()


def test_pull_folder_onto_an_existing_file(ip: Any, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    folder = tmp_path / "remote-folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    blocker = tmp_path / "here.txt"
    blocker.write_text("keep me")
    _fails(ip, capsys, f"%ec2 pull {folder} {blocker}", "is a file here")
    assert blocker.read_text() == "keep me"


def test_push_of_an_empty_name_sends_nothing(ip: Any, capsys: pytest.CaptureFixture) -> None:
    before = sorted(os.listdir("."))
    _fails(ip, capsys, "%ec2 push ''", "empty name")
    assert "Pushed" not in capsys.readouterr().out
    assert sorted(os.listdir(".")) == before


def test_timeout_must_be_positive(ip: Any, capsys: pytest.CaptureFixture) -> None:
    for value in ("-1", "0", "nan", "inf", "soon"):
        seen = _fails(ip, capsys, f"%%ec2 run --timeout {value}\nprint('ran')", "--timeout")
        assert "ran" not in seen
    _fails(ip, capsys, "%ec2 wait --timeout -1", "positive number of seconds")


def test_jobs_count_must_be_positive(ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run\npass")
    for value in ("-5", "0"):
        _fails(ip, capsys, f"%ec2 jobs -n {value}", "positive number")


def test_missing_workdir_is_an_error(ip: Any, target: Any, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    _fails(ip, capsys, f"%ec2 {target.use_line} --workdir {missing}", str(missing), "does not exist")
    assert not missing.exists()


def test_workdir_of_a_running_session_is_not_ignored_silently(ip: Any, target: Any, capsys: pytest.CaptureFixture,
                                                              tmp_path: Path) -> None:
    run_ok(ip, "%%ec2 run\nimport os\nprint(os.getcwd())")
    first = capsys.readouterr().out
    other = tmp_path / "elsewhere"
    other.mkdir()
    run_ok(ip, f"%ec2 {target.use_line} --workdir {other}")
    out = capsys.readouterr().out
    assert f"is already running in {Path.cwd()}" in out and "%ec2 restart" in out, (first, out)
    run_ok(ip, "%ec2 restart")
    run_ok(ip, "%%ec2 run\nimport os\nprint(os.getcwd())")
    assert str(other) in capsys.readouterr().out


def test_checkpoint_that_saves_nothing_keeps_the_good_one(ip: Any, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, "%%ec2 run\nkept = list(range(1000))")
    run_ok(ip, "%ec2 checkpoint")
    assert "Checkpointed 1 value(s): kept" in capsys.readouterr().out
    run_ok(ip, "%ec2 checkpoint --max-bytes 10")
    out = capsys.readouterr()
    assert "Nothing checkpointed" in out.out + out.err and "kept the checkpoint" in out.out + out.err
    run_ok(ip, "%ec2 restart")
    run_ok(ip, "%ec2 checkpoint --restore")
    run_ok(ip, "%%ec2 run -o kept\npass")
    assert ip.user_ns["kept"] == list(range(1000))


def test_status_counts_every_running_job(ip: Any, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    run_ok(ip, f"%%ec2 run --bg --session slow\nimport os, time\nwhile not os.path.exists({str(flag)!r}):\n"
               "    time.sleep(0.02)")
    for _ in range(21):  # the slow job is no longer among the last 20
        run_ok(ip, "%%ec2 run\npass")
    capsys.readouterr()
    try:
        run_ok(ip, "%ec2 status")
        out = capsys.readouterr().out
        assert "20 recent, 1 queued or running" in out, out
    finally:
        flag.write_text("go")
