"""The magics through a real IPython shell (run_cell), over every transport."""

from __future__ import annotations

import os
import signal
import threading
import time
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
    run_ok(ip, "%%ec2 run\nfor i in range(3): print('line', i)\nfrom IPython.display import HTML, display\ndisplay(HTML('<p>x</p>'))")
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


def test_ctrl_c_interrupts_remote_code_and_session_survives(ip: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flag = tmp_path / "started"
    run_ok(ip, "%%ec2 run\nkept = 'yes'")

    def press_ctrl_c() -> None:
        wait_for("the cell to start", flag.exists)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=press_ctrl_c)
    t.start()
    result = ip.run_cell(f"%%ec2 run\nimport time, pathlib\npathlib.Path({str(flag)!r}).touch()\nwhile True: time.sleep(0.05)")
    t.join()
    err = result.error_in_exec
    assert isinstance(err, remotemagic.RemoteError) and err.ename == "KeyboardInterrupt", err
    assert isinstance(err, KeyboardInterrupt)
    out = capsys.readouterr()
    assert "Interrupting job" in out.err
    assert "KeyboardInterrupt" in plain(out.out + out.err) and "on_sigint" not in plain(out.out + out.err)  # no worker frames
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


