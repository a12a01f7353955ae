"""Values on the wire: deduplication, compression, bounded memory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import remotemagic
from remotemagic.agent import files

from .conftest import wait_for


def test_unchanged_value_is_not_sent_twice(remote: remotemagic.Remote) -> None:
    x = np.random.default_rng(1).random(2_000_000)  # 16 MB
    conn = remote.connection()
    before = conn.bytes_sent
    remote.run("s = float(x.sum())", push={"x": x})
    first = conn.bytes_sent - before
    assert first > x.nbytes
    before = conn.bytes_sent
    job = remote.run("s = float(x.sum())", push={"x": x}, pull=["s"])
    again = conn.bytes_sent - before
    assert again < 10_000, again  # the code and a hash, not the array
    assert job.result()["s"] == pytest.approx(float(x.sum()))
    x[0] += 1  # changed: sent again
    before = conn.bytes_sent
    remote.run("pass", push={"x": x})
    assert conn.bytes_sent - before > x.nbytes


def test_object_cache_is_bounded_lru(remote: remotemagic.Remote, target) -> None:
    remote.object_cache_limit = 3_000_000
    for i in range(4):
        remote.run("pass", push={"v": np.full(125_000, float(i))})  # ~1 MB each
    if target.kind == "local":
        objects = [p for p in (Path(target.root) / "objects").iterdir() if not p.name.startswith(".")]
        assert sum(p.stat().st_size for p in objects) <= 3_000_000
        assert len(objects) == 2
        # the evicted ones were renamed out at once and are unlinked after the answer
        wait_for("the evicted objects' files to go",
                 lambda: not [p for p in (Path(target.root) / "objects").iterdir() if p.name.startswith(".evicted-")],
                 timeout=30)
        leftover = Path(target.root) / "objects" / ".evicted-0123"  # what a dead agent left renamed
        leftover.write_bytes(b"x")
        remote.request("evict_objects", limit=3_000_000, keep=[])
        wait_for("a dead agent's evicted leftover to go", lambda: not leftover.exists(), timeout=30)
    # an evicted value the client thought was there is sent again, not an error
    assert remote.run("t = float(v[0])", push={"v": np.full(125_000, 0.0)}, pull=["t"]).result() == {"t": 0.0}
    # the newest is still there: pushing it again sends nothing
    remote._known.clear()
    conn = remote.connection()
    before = conn.bytes_sent
    remote.run("pass", push={"v": np.full(125_000, 3.0)})
    assert conn.bytes_sent - before < 10_000


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_compression_on_the_wire(target, codec: str, tmp_path: Path) -> None:
    r = target.connect(compression=codec)
    try:
        assert r.codec == codec
        conn = r.connection()
        compressible = np.arange(2_000_000, dtype=np.float64)  # 16 MB, very regular
        before = conn.bytes_sent
        job = r.run("y = x[::-1].copy()", push={"x": compressible}, pull=["y"])
        sent = conn.bytes_sent - before
        assert sent < compressible.nbytes / 2, sent
        before_in = conn.bytes_received
        y = job.result()["y"]
        np.testing.assert_array_equal(y, compressible[::-1])
        assert conn.bytes_received - before_in < compressible.nbytes / 2
        noise = np.random.default_rng(0).random(1_000_000)  # incompressible: sent raw, still right
        before = conn.bytes_sent
        got = r.run("z = x", push={"x": noise}, pull=["z"]).result()["z"]
        np.testing.assert_array_equal(got, noise)
        assert conn.bytes_sent - before < noise.nbytes * 1.02
        f = tmp_path / "text.csv"
        f.write_text("a,b,c\n" + "1,2,3\n" * 500_000)
        before = conn.bytes_sent
        r.push(f, "text.csv")
        assert conn.bytes_sent - before < f.stat().st_size / 5
        back = tmp_path / "back.csv"
        r.pull("text.csv", back)
        assert back.read_bytes() == f.read_bytes()
    finally:
        r.close()


def test_a_pull_of_packed_and_raw_frames_arrives_whole(target) -> None:
    """The agent packs a frame only where that pays: a value that is regular, then noise, then
    regular again comes as packed frames, raw ones, packed ones -- assembled in order."""
    r = target.connect(compression="zlib")
    try:
        conn = r.connection()
        before = conn.bytes_received
        job = r.run("import numpy as np\n"
                    "y = np.concatenate([np.arange(1_000_000.0), np.random.default_rng(1).random(500_000), "
                    "np.arange(4_000_000.0)])", pull=["y"])
        y = job.result()["y"]
        expected = np.concatenate([np.arange(1_000_000.0), np.random.default_rng(1).random(500_000),
                                   np.arange(4_000_000.0)])
        np.testing.assert_array_equal(y, expected)
        assert conn.bytes_received - before < 0.6 * y.nbytes  # the regular parts did travel packed
    finally:
        r.close()


def test_auto_compression_is_off_on_a_fast_link(remote: remotemagic.Remote) -> None:
    assert remote.compression == "auto" and remote.codec is None


def test_bad_compression_option(target) -> None:
    with pytest.raises(ValueError, match="compression must be"):
        target.connect(compression="brotli")


def test_push_memory_stays_bounded(target, tmp_path: Path) -> None:
    """Pushing and pulling a 400 MB array in a fresh process peaks well under twice its size."""
    import subprocess
    import sys
    import textwrap

    if target.kind != "local":
        pytest.skip("measured by benchmarks/ over SSH")
    script = tmp_path / "mem.py"
    script.write_text(textwrap.dedent(f"""
        import resource, numpy as np, remotemagic
        r = remotemagic.connect("local", root={str(target.root)!r}, show_progress=False)
        x = np.ones(50_000_000)  # 400 MB
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        r.run("pass", push={{"x": x}})
        after_push = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del x
        y = r.run("y = x", pull=["y"]).result()["y"]  # streamed while the worker writes it
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        r.stop_session(); r.close()
        print(base, after_push, peak, y.nbytes)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    base, after_push, peak, size = map(int, out.stdout.split())
    assert after_push - base < 0.15 * size, (base, after_push)  # pushing adds almost nothing
    assert peak < base + 0.3 * size, (base, peak)  # pulling into the freed space: ~one copy


# -- outputs stream while the worker writes them -----------------------------------------------
def test_large_output_streams_while_it_is_written(remote: remotemagic.Remote) -> None:
    remote.inline_limit = 1000
    job = remote.run("import numpy as np\ny = np.arange(3_000_000, dtype=np.int64)", pull=["y"])
    announced = [e for e in job.events() if e.get("type") == "output"]
    assert [(e["name"], e["size"]) for e in announced] == [("y", job.meta["status"]["outputs"]["y"]["size"])]
    assert "y" in job._prefetch  # started by that event, before the job ended
    np.testing.assert_array_equal(job.result()["y"], np.arange(3_000_000, dtype=np.int64))
    assert job._prefetch == {}


def _follow_output(remote: remotemagic.Remote, job_id: str, size: int, got: list) -> threading.Thread:
    from remotemagic.connection import read_streamed_object

    def run() -> None:
        try:
            call = remote.connection().start_object("read_output", job=job_id, name="y", follow=True, size=size)
            got.append(read_streamed_object(call, got.append))
        except Exception as exc:
            got.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_agent_follows_an_output_file_as_it_grows(remote: remotemagic.Remote, target) -> None:
    """The agent's side, with the test playing the worker: bytes of ``<name>.obj.part`` reach
    the client before the file is finished; the rename does not disturb the stream."""
    job = remote.run("import time\ntime.sleep(60)", background=True)
    wait_for("the job to run", lambda: job.state == "running", 20)
    out = Path(target.root) / "jobs" / job.id / "outputs"
    files.private_dir(str(out))
    enc = files.encode(bytearray(range(256)) * 12_000)  # ~3 MB, one out-of-band buffer
    data = b"".join(bytes(p) for p in enc.parts())
    half = len(data) // 2
    part = out / "y.obj.part"
    with open(part, "wb") as f:
        f.write(data[:half])
        f.flush()
        got: list = []
        t = _follow_output(remote, job.id, enc.size, got)
        wait_for("the first half to arrive", lambda: sum(n for n in got if isinstance(n, int)) >= half - 512 * 1024, 20)
        assert t.is_alive()  # it waits for the rest, it does not end at the current end of file
        f.write(data[half:])
    os.replace(part, out / "y.obj")
    t.join(20)
    assert not t.is_alive() and got[-1] == bytearray(range(256)) * 12_000
    job.cancel()


def test_followed_output_that_stops_growing_ends_with_an_error(remote: remotemagic.Remote, target) -> None:
    job = remote.run("import time\ntime.sleep(60)", background=True)
    wait_for("the job to run", lambda: job.state == "running", 20)
    out = Path(target.root) / "jobs" / job.id / "outputs"
    files.private_dir(str(out))
    enc = files.encode(bytearray(3_000_000))
    data = b"".join(bytes(p) for p in enc.parts())
    (out / "y.obj.part").write_bytes(data[:100_000])  # a writer that gives up at 100 kB
    got: list = []
    t = _follow_output(remote, job.id, enc.size, got)
    time.sleep(0.3)
    assert t.is_alive()  # still running: the writer may go on
    job.cancel()
    t.join(20)
    assert not t.is_alive()
    assert isinstance(got[-1], remotemagic.errors.RemoteRequestError)
    assert f"ended at 100000 of {enc.size} bytes" in str(got[-1])


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("remotemagic-prefetch-") and t.is_alive()]


def test_streamed_output_nobody_will_take_is_dropped(remote: remotemagic.Remote) -> None:
    """A job that fails after its outputs were announced, or a Ctrl-C while following it: the
    transfer stops and its memory goes, instead of finishing in the background."""
    remote.inline_limit = 1000
    job = remote.run("import numpy as np\ny = np.ones(4_000_000)\nraise ValueError('boom')", pull=["y"])
    assert job.state == "error" and any(e["type"] == "output" for e in job.events())
    assert job._prefetch == {}
    with pytest.raises(remotemagic.RemoteError, match="boom"):
        job.result()
    wait_for("the stream to end", lambda: not _prefetch_threads(), 20)

    def interrupt_on_output(event: dict) -> None:
        if event.get("type") == "output":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        remote.run("import time\ny = np.ones(4_000_000)", pull=["y"], on_event=interrupt_on_output)
    job = remote.last_job
    assert job is not None and job._prefetch == {}
    wait_for("the stream to end", lambda: not _prefetch_threads(), 20)
    assert job.wait(timeout=60) == "done"
    np.testing.assert_array_equal(job.result()["y"], np.ones(4_000_000))  # read the plain way
