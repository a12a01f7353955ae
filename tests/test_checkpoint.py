"""Automatic checkpoints run beside the session, never in front of the next cell.

The worker forks after each cell; the child pickles the namespace as that cell left it and
swaps the checkpoint in. Here a value whose pickling blocks until a file appears
(``Blocker``) holds a checkpoint writer mid-write for as long as a test needs: the tests
then show, by the order of events and never by timing, that the next cells run meanwhile,
that the checkpoint holds exactly the state after its cell, that requests made meanwhile
coalesce to the newest one, and that a writer killed mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

import remotemagic
from remotemagic.agent import checkpoint as checkpoints
from remotemagic.agent import files

from .conftest import stop_workers, wait_for

BLOCKER = '''
import os, time

class Blocker:
    """Pickling it (only a checkpoint writer does) logs the writer's pid to <folder>/pickling,
    then waits for <folder>/release."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        with open(os.path.join(self.folder, "pickling"), "a") as f:
            f.write("%d\\n" % os.getpid())
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(self.folder, "release")) and time.monotonic() < deadline:
            time.sleep(0.01)
        return (str, ("released",))
'''


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "target"
    yield root
    stop_workers(root)


@pytest.fixture
def r(root: Path) -> Iterator[remotemagic.Remote]:
    remote = remotemagic.connect("local", root=str(root), session="s")
    yield remote
    remote.close()


def index(root: Path) -> dict[str, Any]:
    return files.read_json(str(root / "sessions" / "s" / "checkpoint" / "index.json"), {}) or {}


def saved_value(root: Path, name: str) -> Any:
    return files.load_object(str(root / "sessions" / "s" / "checkpoint" / f"{name}.obj"))


def checkpointed(root: Path, job: Any) -> dict[str, Any]:
    return wait_for(f"the checkpoint after {job.id}", lambda: index(root).get("after_job") == job.id and index(root))


def pickling_pids(folder: Path) -> list[int]:
    """The pids of the writers that reached the Blocker (whole lines only)."""
    try:
        text = (folder / "pickling").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead: the worker has not reaped it yet
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped since the kill(0) above
        return False


def run_ok(r: remotemagic.Remote, code: str) -> Any:
    job = r.run(code)
    assert job.state == "done", (job.state, list(job.events()))
    return job


def test_checkpoint_holds_the_state_after_its_cell(r: remotemagic.Remote, root: Path) -> None:
    for i in range(1, 4):
        last = run_ok(r, f"x = {i}\nhistory = list(range({i}))")
    ck = checkpointed(root, last)
    assert sorted(ck["saved"]) == ["history", "x"]
    assert saved_value(root, "x") == 3 and saved_value(root, "history") == [0, 1, 2]
    session = [s for s in r.sessions() if s["name"] == "s"][0]
    assert session["checkpoint"]["after_job"] == last.id
    os.kill(session["pid"], signal.SIGKILL)  # the namespace dies; the checkpoint brings it back
    fresh = r.run("print('x' in dir())")
    assert [e["text"] for e in fresh.events() if e["type"] == "stream"] == ["False\n"]
    assert sorted(r.restore_checkpoint()) == ["history", "x"]
    assert r.run("y = x * 10 + len(history)", pull=["y"]).result() == {"y": 33}


def test_a_long_checkpoint_does_not_delay_the_next_cells(r: remotemagic.Remote, root: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    before = run_ok(r, BLOCKER + "x = 1")
    checkpointed(root, before)
    blocked = run_ok(r, f"b = Blocker({str(first)!r})\nx = 2")
    writer = wait_for("the checkpoint writer to reach the Blocker", lambda: pickling_pids(first))[0]
    assert writer != [s for s in r.sessions() if s["name"] == "s"][0]["pid"]  # a child, not the worker

    # while that writer is stuck, cells run, and their own checkpoints wait (coalesced)
    third = run_ok(r, f"x = 3\nb.folder = {str(second)!r}\nprint('third ran')")
    assert [e["text"] for e in third.events() if e["type"] == "stream"] == ["third ran\n"]
    fourth = run_ok(r, "x = 4")
    assert alive(writer) and not (first / "release").exists()
    assert index(root)["after_job"] == before.id  # nothing half-done shows

    (first / "release").touch()
    ck = checkpointed(root, blocked)  # the state as cell 2 left it: later cells changed nothing in it
    assert saved_value(root, "x") == 2 and saved_value(root, "b") == "released"
    assert ck["saved"]["b"]["type"] == "__main__.Blocker"

    # then the newest pending request (cell 4), not cell 3's: one more writer, stuck in turn
    newer = wait_for("the next checkpoint writer", lambda: pickling_pids(second))
    assert index(root)["after_job"] == blocked.id
    (second / "release").touch()
    checkpointed(root, fourth)
    assert saved_value(root, "x") == 4
    assert pickling_pids(second) == newer and len(newer) == 1  # cell 3 was never checkpointed
    assert third.id not in (index(root)["after_job"], ck["after_job"])


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(r: remotemagic.Remote, root: Path,
                                                                   tmp_path: Path) -> None:
    folder = tmp_path / "block"
    folder.mkdir()
    good = run_ok(r, BLOCKER + "x = 1\ndata = list(range(1000))")
    checkpointed(root, good)
    run_ok(r, f"x = 2\ndata = None\nb = Blocker({str(folder)!r})")
    writer = wait_for("the checkpoint writer to reach the Blocker", lambda: pickling_pids(folder))[0]
    sdir = root / "sessions" / "s"
    assert (sdir / "checkpoint.new" / "x.obj").exists()  # mid-write: x (= 2) is written already
    os.kill(writer, signal.SIGKILL)
    wait_for("the worker to reap the killed writer", lambda: not alive(writer))
    assert index(root)["after_job"] == good.id
    assert saved_value(root, "x") == 1 and saved_value(root, "data") == list(range(1000))
    # the session goes on, and the next checkpoint replaces the partial folder
    (folder / "release").touch()
    later = run_ok(r, "x = 3")
    checkpointed(root, later)
    assert saved_value(root, "x") == 3 and not (sdir / "checkpoint.new").exists()


def test_a_writer_never_commits_once_its_worker_is_gone(r: remotemagic.Remote, root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "block"
    folder.mkdir()
    good = run_ok(r, BLOCKER + "x = 1")
    checkpointed(root, good)
    run_ok(r, f"x = 2\nb = Blocker({str(folder)!r})")
    writer = wait_for("the checkpoint writer to reach the Blocker", lambda: pickling_pids(folder))[0]
    worker = [s for s in r.sessions() if s["name"] == "s"][0]["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_for("the writer to die with its worker", lambda: not alive(writer))
    (folder / "release").touch()
    assert index(root)["after_job"] == good.id
    fresh = r.run("print('x' in dir())")  # a new worker, told about the held checkpoint
    assert fresh.state == "done"
    assert "x" in r.restore_checkpoint()
    assert r.run("y = x", pull=["y"]).result() == {"y": 1}


def test_recover_a_writer_killed_between_its_renames(tmp_path: Path) -> None:
    sdir = tmp_path / "session"
    sdir.mkdir(mode=0o700)
    checkpoints.save(str(sdir), [("x", 1)], 0, "job-1")
    os.rename(sdir / "checkpoint", sdir / "checkpoint.old")  # the first rename done, not the second
    checkpoints.recover(str(sdir))
    assert files.read_json(str(sdir / "checkpoint" / "index.json"))["after_job"] == "job-1"
    index = checkpoints.save(str(sdir), [("x", 2), ("f", open)], 0, "job-2")
    assert index["saved"].keys() == {"x", "f"} and not (sdir / "checkpoint.old").exists()
    assert files.load_object(str(sdir / "checkpoint" / "x.obj")) == 2


def test_a_value_over_the_limit_is_skipped_and_not_pickled_again(root: Path) -> None:
    r = remotemagic.connect("local", root=str(root), session="s", checkpoint_limit=4000)
    try:
        first = run_ok(r, "big = list(range(5000))\nblob = b'x' * 10_000\nsmall = 1")
        ck = checkpointed(root, first)
        assert sorted(ck["saved"]) == ["small"]
        assert ck["skipped"] == {"big": "larger than 4000 bytes", "blob": "larger than 4000 bytes"}
        assert list(ck["large"]) == ["big"]  # pickled once to learn it; blob's len() was enough
        key = ck["large"]["big"]
        again = run_ok(r, "small = 2")
        ck = checkpointed(root, again)
        assert ck["large"] == {"big": key} and "big" in ck["skipped"]  # the same object: not pickled again
        smaller = run_ok(r, "big = list(range(10))")  # a new object: looked at afresh
        ck = checkpointed(root, smaller)
        assert saved_value(root, "big") == list(range(10)) and "big" not in ck["large"]
    finally:
        r.close()
