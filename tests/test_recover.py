"""Recovering on its own (issue 15): ``--retry`` after a worker death, ``auto_restore``, OOM clarity.

Every fault is real: the worker process is SIGKILLed by the test while the job waits on a gate
file (so nothing depends on a sleep), on the local backend and through the loopback sshd.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import remotemagic
from remotemagic.agent import files

from .conftest import plain, run_ok, wait_for

GATED = (
    "import os, time\n"
    "print('attempt starts, a =', a, flush=True)\n"
    "open({started!r}, 'a').write('x')\n"
    "while not os.path.exists({gate!r}):\n"
    "    time.sleep(0.02)\n"
    "a = a + 1\n"
    "print('finished with a =', a, flush=True)\n"
)


def worker_pid(root: Path, session: str) -> int:
    return int((files.read_json(str(root / "sessions" / session / "worker.json"), {}) or {}).get("pid") or 0)


def checkpointed_after(root: Path, session: str, job_id: str) -> bool:
    index = files.read_json(str(root / "sessions" / session / "checkpoint" / "index.json"), {}) or {}
    return index.get("after_job") == job_id


def kill_when_started(root: Path, session: str, started: Path, gate: Path) -> None:
    """SIGKILL the worker once the gated job is running, then open the gate (for the next attempt)."""
    wait_for("the job to start", started.exists, timeout=60)
    os.kill(worker_pid(root, session), signal.SIGKILL)
    wait_for("the worker to be gone", lambda: not worker_pid(root, session), timeout=30)
    gate.touch()


def test_retry_after_sigkill_restores_the_namespace(ip: Any, target: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import threading

    run_ok(ip, "%%ec2 run\na = 41\nbig = bytearray(3000)")
    magics = ip.magics_manager.registry["Ec2Magics"]
    session = magics.remote.session
    first = magics.remote.last_job
    wait_for("the checkpoint after the first cell",
             lambda: checkpointed_after(target.root, session, first.id), timeout=60)
    started, gate = tmp_path / "started", tmp_path / "gate"
    killer = threading.Thread(target=kill_when_started, args=(target.root, session, started, gate))
    killer.start()
    capsys.readouterr()
    run_ok(ip, "%%ec2 run --retry 1 -o a\n" + GATED.format(started=str(started), gate=str(gate)))
    killer.join()
    out = capsys.readouterr()
    text = plain(out.out + out.err)
    assert ip.user_ns["a"] == 42  # from the attempt that finished, on the restored a = 41
    assert text.count("attempt starts, a = 41") == 2, text
    assert "finished with a = 42" in text
    line = [ln for ln in text.splitlines() if "attempt 2 of 2" in ln]
    assert len(line) == 1, text
    assert "attempt 2 of 2: worker died (SIGKILL); restored a, big from the checkpoint of" in line[0], line


def test_retry_api_shows_each_attempt_and_pulls_once(remote: remotemagic.Remote, target: Any, tmp_path: Path) -> None:
    import threading

    first = remote.run("a = 1")
    wait_for("the checkpoint", lambda: checkpointed_after(target.root, remote.session, first.id), timeout=60)
    ck = files.read_json(str(target.root / "sessions" / remote.session / "checkpoint" / "index.json"))
    started, gate = tmp_path / "started", tmp_path / "gate"
    killer = threading.Thread(target=kill_when_started, args=(target.root, remote.session, started, gate))
    killer.start()
    events: list[dict] = []
    job = remote.run(GATED.format(started=str(started), gate=str(gate)), pull=["a"], retries=2,
                     on_event=events.append)
    killer.join()
    assert job.result() == {"a": 2}
    notes = [e["text"] for e in events if e["type"] == "notice"]
    when = time.strftime("%H:%M:%S", time.localtime(ck["time"]))
    assert notes == [f"attempt 2 of 3: worker died (SIGKILL); restored a from the checkpoint of {when}"], notes
    texts = "".join(e.get("text", "") for e in events if e["type"] == "stream")
    assert texts.count("attempt starts, a = 1") == 2 and "finished with a = 2" in texts
    assert [j["state"] for j in remote.jobs()[-2:]] == ["failed", "done"]  # two attempts, the first failed


def test_no_retry_when_the_cell_raises(remote: remotemagic.Remote) -> None:
    events: list[dict] = []
    job = remote.run("print('once')\nraise ValueError('mine')", retries=3, on_event=events.append)
    assert job.state == "error"
    assert [e["text"] for e in events if e["type"] == "stream"] == ["once\n"]
    assert not [e for e in events if e["type"] == "notice"]
    assert len([j for j in remote.jobs() if j["kind"] == "cell"]) == 1


def test_without_retry_a_killed_worker_fails_the_job(remote: remotemagic.Remote, target: Any, tmp_path: Path) -> None:
    import threading

    remote.run("a = 1")
    started, gate = tmp_path / "started", tmp_path / "gate"
    killer = threading.Thread(target=kill_when_started, args=(target.root, remote.session, started, gate))
    killer.start()
    job = remote.run(GATED.format(started=str(started), gate=str(gate)))
    killer.join()
    assert job.state == "failed"
    assert job.error().ename == "WorkerDied"
    assert len([j for j in remote.jobs() if j["kind"] == "cell"]) == 2


def test_auto_restore_after_worker_death(ip: Any, target: Any, capsys: pytest.CaptureFixture) -> None:
    magics = ip.magics_manager.registry["Ec2Magics"]
    magics.checkpoint_max_bytes = 10_000
    magics.auto_restore = True
    run_ok(ip, "%%ec2 run\nx = 5\nname = 'kept'\nhuge = bytearray(50_000)")
    remote, session = magics.remote, magics.remote.session
    wait_for("the checkpoint", lambda: checkpointed_after(target.root, session, remote.last_job.id), timeout=60)
    os.kill(worker_pid(target.root, session), signal.SIGKILL)
    wait_for("the worker to be gone", lambda: not worker_pid(target.root, session), timeout=30)
    capsys.readouterr()
    run_ok(ip, "%%ec2 run -o y\ny = x * 2\nprint(name, 'huge' in dir())")
    out = capsys.readouterr()
    text = plain(out.out + out.err)
    assert ip.user_ns["y"] == 10
    assert "kept False" in text
    notice = [ln for ln in text.splitlines() if "restored" in ln]
    assert len(notice) == 1, text
    assert f"the previous worker of session '{session}' stopped (worker died, signal 9 (SIGKILL)" in notice[0]
    assert "restored name, x from the checkpoint of" in notice[0]
    assert "not restored, too large to checkpoint: huge" in notice[0]
    assert "namespace was lost" not in text  # the agent's "fresh namespace" notice is not shown as well
    capsys.readouterr()
    run_ok(ip, "%%ec2 run\nprint(x)")  # no death since: nothing restored, nothing said
    assert "restored" not in plain(capsys.readouterr().err)


ALLOCATE = (
    "import os, time\n"
    "block = b'x' * ({mb} * 1024 * 1024)  # every page touched\n"
    "open({started!r}, 'a').write('x')\n"
    "while True:\n"
    "    time.sleep(0.05)\n"
)


def test_sigkilled_worker_is_reported_with_the_memory_it_reached(ip: Any, target: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import threading

    run_ok(ip, "%%ec2 run\nready = 1")
    magics = ip.magics_manager.registry["Ec2Magics"]
    session = magics.remote.session
    started, gate = tmp_path / "started", tmp_path / "gate"
    killer = threading.Thread(target=kill_when_started, args=(target.root, session, started, gate))
    killer.start()
    capsys.readouterr()
    result = ip.run_cell("%%ec2 run\n" + ALLOCATE.format(mb=150, started=str(started)))
    killer.join()
    err = result.error_in_exec
    assert err is not None and err.ename == "WorkerDied", err
    out = capsys.readouterr()
    text = plain(str(err) + out.out + out.err)
    import re

    m = re.search(r"signal 9 \(SIGKILL\) -- killed, possibly by the out-of-memory killer; it had reached "
                  r"([\d.]+) MiB of memory \(the machine has ([\d.]+) GiB\)", text)
    assert m, text
    assert 150 <= float(m.group(1)) < 400  # the 150 MiB block plus the interpreter and IPython
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3
    assert abs(float(m.group(2)) - total) < 0.1
    status = magics.remote.last_job._status
    assert status["error"]["peak_rss"] >= 150 * 1024**2 and status["error"]["signal"] == 9


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_retry_and_fallback_usage_errors(ip: Any) -> None:
    from IPython.core.error import UsageError

    magics = ip.magics_manager.registry["Ec2Magics"]
    with pytest.raises(UsageError, match="--fallback goes with --spot"):
        magics.ec2("start --fallback")
    with pytest.raises(UsageError, match="not with --bg"):
        magics.ec2("run --bg --retry 2", "x = 1")
    with pytest.raises(UsageError, match=">= 0"):
        magics.ec2("run --retry -1", "x = 1")


def test_auto_restore_after_the_worker_went_with_its_supervisor(target: Any) -> None:
    """What an instance stop/start does to a session: worker and supervisor gone without a word."""
    remote = target.connect(auto_restore=True)
    try:
        first = remote.run("x = 7")
        wait_for("the checkpoint", lambda: checkpointed_after(target.root, remote.session, first.id), timeout=60)
        pid = worker_pid(target.root, remote.session)
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the whole group, supervisor included
        wait_for("the group to be gone", lambda: not _alive(pid), timeout=30)
        assert worker_pid(target.root, remote.session) == pid  # nobody was left to tidy up
        events: list[dict] = []
        job = remote.run("y = x + 1", pull=["y"], on_event=events.append)
        assert job.result() == {"y": 8}
        notes = [e["text"] for e in events if e["type"] == "notice"]
        assert len(notes) == 1 and notes[0].startswith(
            f"the previous worker of session '{remote.session}' stopped (it went away with its supervisor -- the "
            "machine was restarted or both were killed); restored x from the checkpoint of"), notes
    finally:
        remote.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
