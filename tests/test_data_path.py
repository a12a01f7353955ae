"""Values on the wire: deduplication, compression, bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import remotemagic


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
        job = r.run("y = x", push={{"x": x}}, pull=["y"])
        after_push = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del x
        y = job.result()["y"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        r.stop_session(); r.close()
        print(base, after_push, peak, y.nbytes)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    base, after_push, peak, size = map(int, out.stdout.split())
    assert after_push - base < 0.15 * size, (base, after_push)  # pushing adds almost nothing
    assert peak < base + 0.3 * size, (base, peak)  # pulling into the freed space: ~one copy
