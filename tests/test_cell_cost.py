"""What a warm cell does not pay for any more (issue #17): a checkpoint writer forked when the
checkpoint would not change, a writer that competes with the rest of the machine, and separate
writes of the local job index for what the final write can carry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import remotemagic
from remotemagic.agent import checkpoint as checkpoints
from remotemagic.agent import files

from .conftest import run_ok, stop_workers, wait_for


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "target"
    yield root
    stop_workers(root)


@pytest.fixture
def r(root: Path) -> Iterator[remotemagic.Remote]:
    remote = remotemagic.connect("local", root=str(root), session="s", checkpoint_limit=1000)
    yield remote
    remote.close()


def children(pid: int) -> list[int]:
    """The live (or not yet reaped) child processes of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def ok(r: remotemagic.Remote, code: str) -> Any:
    job = r.run(code)
    assert job.state == "done", (job.state, list(job.events()))
    return job


def test_no_writer_when_the_checkpoint_would_not_change(r: remotemagic.Remote, root: Path) -> None:
    sdir = root / "sessions" / "s"
    first = ok(r, "pass")
    ck = wait_for("the first checkpoint", lambda: (files.read_json(str(sdir / "checkpoint" / "index.json")) or {}))
    assert ck["after_job"] == first.id and ck["saved"] == {} and ck["skipped"] == {}
    worker = [s for s in r.sessions() if s["name"] == "s"][0]["pid"]
    wait_for("its writer reaped", lambda: not children(worker))
    # from here any writer fails -- and says so in worker.log with the job it follows
    (sdir / "checkpoint.new").write_text("not a folder")
    nothing = ok(r, "pass")  # no variable, and the checkpoint holds none: no writer
    # only a value over the limit, which the index does not list yet: a writer (that fails here)
    big = ok(r, "big = bytes(10_000)")
    logged = wait_for("its failure in worker.log",
                      lambda: "failed" in (text := (sdir / "worker.log").read_text()) and text)
    assert big.id in logged and nothing.id not in logged
    wait_for("that writer reaped", lambda: not children(worker))
    (sdir / "checkpoint.new").unlink()
    small = ok(r, "x = 1")
    assert wait_for("the checkpoint of x", lambda: (files.read_json(str(sdir / "checkpoint" / "index.json")) or {})
                    .get("after_job") == small.id)


def test_unchanged_decides_without_pickling(tmp_path: Path) -> None:
    sdir = tmp_path / "s"
    (sdir / "checkpoint").mkdir(parents=True)

    def index(**fields: Any) -> None:
        (sdir / "checkpoint" / "index.json").write_text(json.dumps({"after_job": "j", "worker": 7, **fields}))

    class Unpicklable:
        nbytes = 5000

        def __reduce__(self) -> Any:
            raise AssertionError("unchanged() must not pickle")

    big = Unpicklable()
    assert not checkpoints.unchanged(str(sdir), [], 1000, 7)  # no index yet: write one
    index(saved={}, skipped={})
    assert checkpoints.unchanged(str(sdir), [], 1000, 7)
    assert not checkpoints.unchanged(str(sdir), [("x", 1)], 1000, 7)  # a small value: pickle it
    assert not checkpoints.unchanged(str(sdir), [("big", big)], 1000, 7)  # the index does not list it
    index(saved={}, skipped={"big": "larger than 1000 bytes"})
    assert checkpoints.unchanged(str(sdir), [("big", big)], 1000, 7)
    assert not checkpoints.unchanged(str(sdir), [("big", big)], 2000, 7)  # another limit, another reason
    assert not checkpoints.unchanged(str(sdir), [("big", big)], 0, 7)  # no limit: it is saved
    index(saved={"old": {"size": 3, "type": "int"}}, skipped={})
    assert checkpoints.unchanged(str(sdir), [("big", big)], 1000, 7)  # save() would keep that checkpoint
    assert not checkpoints.unchanged(str(sdir), [], 1000, 7)  # every variable deleted: an empty one replaces it
    value = [1, 2, 3]  # small by size, but pickled too large before while the same object
    index(saved={"old": {}}, skipped={}, large={"v": [id(value), files.type_name(value)]})
    assert checkpoints.unchanged(str(sdir), [("v", value)], 1000, 7)
    assert not checkpoints.unchanged(str(sdir), [("v", value)], 1000, 8)  # another worker's ids mean nothing


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no autogroup scheduling in this kernel")
def test_the_writer_has_a_session_of_its_own_at_the_lowest_priority() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # what a checkpoint child does first
        try:
            checkpoints._lower_priority()
            with open("/proc/self/autogroup") as f:
                os.write(write, json.dumps([os.getsid(0) == os.getpid(), f.read(), os.nice(0)]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        own_session, autogroup, nice = json.loads(f.read())
    os.waitpid(pid, 0)
    assert own_session and autogroup.strip().endswith(f"nice {checkpoints.AUTOGROUP_NICE}")
    assert nice >= checkpoints.NICE


def test_a_foreground_cell_ends_with_one_index_write(fresh_shell: Any) -> None:
    """The record names this kernel as its follower from the start; the final write clears it
    and marks the job watched -- no separate writes for either."""
    run_ok(fresh_shell, "%%ec2 run\nx = 1")
    magics = fresh_shell.magics_manager.registry["Ec2Magics"]
    remote = magics.get_remote()
    job = remote.last_job
    assert job.marked_watched and not remote.watching
    meta = job.meta
    assert meta["state"] == "done" and meta["watched"] is True and meta["follower"] is None
    run_ok(fresh_shell, "%%ec2 run --bg\nimport time; time.sleep(0.01)")
    bg = remote.last_job
    bg.wait()
    assert not bg.marked_watched and not bg.meta.get("watched")  # nobody showed it: %ec2 output will say


def test_a_follower_wakes_on_the_workers_write_not_on_its_next_poll(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent follows a job's folder with a DirWatch: another process's append or rename
    wakes it (a 60 s wait returns at once), a folder nobody writes does not."""
    from remotemagic.agent import dirwatch

    jdir = tmp_path / "job"
    jdir.mkdir()
    (jdir / "events.jsonl").write_bytes(b"")
    with dirwatch.DirWatch(str(jdir)) as watch:
        assert watch.active  # Linux: inotify
        assert not watch.wait(0.01)
        writer = ("import os, sys\n"
                  "open(os.path.join(sys.argv[1], 'events.jsonl'), 'ab').write(b'{}\\n')\n")
        subprocess.run([sys.executable, "-c", writer, str(jdir)], check=True)
        assert watch.wait(60)
        assert not watch.wait(0.01)  # drained: one wake-up for what happened so far
        renamer = ("import os, sys\n"
                   "open(os.path.join(sys.argv[1], '.s.part'), 'w').write('{}')\n"
                   "os.replace(os.path.join(sys.argv[1], '.s.part'), os.path.join(sys.argv[1], 'status.json'))\n")
        subprocess.run([sys.executable, "-c", renamer, str(jdir)], check=True)
        assert watch.wait(60)
    assert watch.fd == -1
    monkeypatch.setattr(dirwatch, "_inotify", lambda: None)  # no inotify: it sleeps, as polling did
    with dirwatch.DirWatch(str(jdir)) as blind:
        assert not blind.active and not blind.wait(0.001)


def test_a_swapped_in_file_is_whole_for_readers_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's status.json and a worker's ``current`` are replaced by exchanging them with the
    new file (renameat2 RENAME_EXCHANGE: no ext4 flush of the new file on the cell's path): a
    reader meanwhile sees the old or the new file, whole, never none; no temporary file stays;
    a first write, or a system without the exchange, renames as before."""
    path = tmp_path / "status.json"
    files.atomic_write(str(path), [b'{"state": "queued"}'], durable=False, swap=True)  # no file yet: a rename
    assert json.loads(path.read_text()) == {"state": "queued"}
    seen: list[bytes] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(path.read_bytes())
            except OSError as exc:  # no file for a moment: what a swap must never show
                failed.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            files.atomic_write(str(path), [json.dumps({"state": "running", "n": i, "pad": "x" * 3000}).encode()],
                               durable=False, swap=True)
    finally:
        stop.set()
        reader.join()
    assert not failed and seen and all(json.loads(b)["state"] in ("queued", "running") for b in seen)
    assert json.loads(path.read_text())["n"] == 299
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    assert files.swap_in(str(path), str(tmp_path / "nothing-there")) is False  # nothing changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    if sys.platform == "linux":  # the exchange itself, here (ext4 or tmpfs)
        (tmp_path / "new").write_bytes(b"new")
        assert files.swap_in(str(tmp_path / "new"), str(path)) is True
        assert path.read_bytes() == b"new" and json.loads((tmp_path / "new").read_text())["n"] == 299
        (tmp_path / "new").unlink()

    monkeypatch.setattr(files, "_exchange_call", lambda: None)  # e.g. macOS: a plain rename
    files.atomic_write(str(path), [b'{"state": "done"}'], durable=False, swap=True)
    assert json.loads(path.read_text()) == {"state": "done"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_what_the_inputs_replace_is_released_beside_the_cell_not_before_it(r: remotemagic.Remote,
                                                                           tmp_path: Path) -> None:
    """Pushing a new value under a name frees the old one in a thread of the worker's own: the
    cell does not wait for it (freeing a pushed 512 MiB array whose object was evicted took
    0.4 s). Here the old value's release waits for a file the test creates after the cell."""
    gate, freed = tmp_path / "go", tmp_path / "freed"
    ok(r, "import os, time\n"
          "class Held:\n"
          "    def __del__(self):\n"
          "        deadline = time.monotonic() + 60\n"
          f"        while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n"
          "            time.sleep(0.01)\n"
          f"        open({str(freed)!r}, 'w').close()\n"
          "x = Held()\n")
    job = r.run("y = x + 1", push={"x": 41}, pull=["y"])
    assert job.state == "done" and job.result() == {"y": 42}
    assert not freed.exists()  # still being released, while the cell is done
    gate.touch()
    wait_for("the old value's release to end", freed.exists, timeout=60)
    assert r.run("z = x", pull=["z"]).result() == {"z": 41}
