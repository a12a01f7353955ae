"""push / pull of files and folders: content, resume, skipping, safety."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pytest

import remotemagic
from remotemagic.agent import transfer

from .conftest import run_ok


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    for i in range(200):
        (src / "sub" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (src / "sub" / "deeper" / "blob.bin").write_bytes(os.urandom(3_000_000))
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    return src


def _same_tree(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert (a / rel).stat().st_mode & 0o777 == (b / rel).stat().st_mode & 0o777, rel


def test_folder_roundtrip_and_skip_unchanged(remote: remotemagic.Remote, tree: Path, tmp_path: Path) -> None:
    first = remote.push(tree, "project")
    assert first["files"] == 202 and first["skipped"] == 0
    again = remote.push(tree, "project")
    assert again["files"] == 0 and again["skipped"] == 202
    (tree / "sub" / "f3.txt").write_text("changed\n")
    os.utime(tree / "sub" / "f3.txt", (1, 1))
    third = remote.push(tree, "project")
    assert third["files"] == 1
    back = tmp_path / "back"
    got = remote.pull("project", back)
    assert got["files"] == 202
    _same_tree(tree, back)
    assert remote.pull("project", back)["files"] == 0


def test_single_file_push_resumes_from_a_partial(remote: remotemagic.Remote, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5_000_000))
    done = remote.push(big, "stage/big.bin")
    path = Path(done["path"])
    # an interrupted transfer leaves a .rmpart; the next push continues after what is there
    path.rename(str(path) + ".rmpart")
    os.truncate(str(path) + ".rmpart", 2_000_000)
    again = remote.push(big, "stage/big.bin")
    assert again["resumed_from"] == 2_000_000 and again["bytes"] == 3_000_000
    assert path.read_bytes() == big.read_bytes()
    # a partial that does not match the file is not trusted
    path.rename(str(path) + ".rmpart")
    with open(str(path) + ".rmpart", "r+b") as f:
        f.write(b"garbage!")
    assert remote.push(big, "stage/big.bin")["resumed_from"] == 0
    assert path.read_bytes() == big.read_bytes()


def test_single_file_pull_resumes(remote: remotemagic.Remote, tmp_path: Path) -> None:
    big = tmp_path / "orig.bin"
    big.write_bytes(os.urandom(4_000_000))
    remote.push(big, "out.bin")
    dest = tmp_path / "fetched.bin"
    Path(str(dest) + ".rmpart").write_bytes(big.read_bytes()[:1_500_000])
    got = remote.pull("out.bin", dest)
    assert got["resumed_from"] == 1_500_000
    assert dest.read_bytes() == big.read_bytes()
    assert not Path(str(dest) + ".rmpart").exists()


def test_missing_paths_are_clear_errors(remote: remotemagic.Remote, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        remote.push(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist on the target"):
        remote.pull("no/such/thing", tmp_path / "x")


def test_tar_extraction_refuses_escapes(tmp_path: Path) -> None:
    for name in ("../evil.txt", "/etc/evil", "a/../../evil"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        buf.seek(0)
        with pytest.raises(ValueError, match="outside"):
            transfer.extract_tar(buf, str(tmp_path / "dest"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    buf.seek(0)
    with pytest.raises(ValueError, match="only files and folders"):
        transfer.extract_tar(buf, str(tmp_path / "dest"))
    assert not (tmp_path / "evil.txt").exists()


def test_push_pull_magics(ip: Any, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_ok(ip, f"%ec2 push {tree} proj")
    assert "Pushed" in capsys.readouterr().out
    run_ok(ip, f"%%ec2 run -o n\nimport os\nn = len(os.listdir(os.path.expanduser({'proj/sub'!r})))")
    assert ip.user_ns["n"] == 201
    run_ok(ip, f"%ec2 pull proj/run.sh {tmp_path / 'run.sh'}")
    assert (tmp_path / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    result = ip.run_cell(f"%ec2 push {tmp_path / 'missing'}")
    assert "does not exist" in str(result.error_in_exec)


def pieces_past_a_flush(data: bytes, start: int, flushed: Any) -> Iterator[bytes]:
    """``data`` from ``start`` in 1 MiB pieces; past the first 8 MiB, the next waits until a
    background flush has begun (``flushed``, a threading.Event the test's fdatasync sets)."""
    for i in range(start, len(data), 2**20):
        if i - start >= 9 * 2**20:
            assert flushed.wait(60), "no flush while the file was being written"
        yield data[i:i + 2**20]


def test_durable_writes_are_flushed_in_the_background_as_they_grow(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads and object files are flushed to disk every 8 MiB by another thread while they are
    still being written (so the final fsync waits for the last stretch only); the bytes intact."""
    import threading

    from remotemagic.agent import files, uploads

    real = os.fdatasync
    flushed: list[tuple[int, str]] = []  # (the file's size then, the thread that flushed)
    first = threading.Event()

    def spy(fd: int) -> None:
        flushed.append((os.fstat(fd).st_size, threading.current_thread().name))
        first.set()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    data = os.urandom(20 * 2**20)
    mib = 2**20

    files.atomic_write(str(tmp_path / "obj"), pieces_past_a_flush(data, 0, first))
    assert (tmp_path / "obj").read_bytes() == data
    assert flushed and all(name == "remotemagic-writeback" for _, name in flushed)
    assert 8 * mib <= flushed[0][0] < len(data)  # while it was written, once 8 MiB were there

    flushed.clear()  # an upload resumed at 5 MiB: 8 MiB more before the first flush
    first.clear()
    part = tmp_path / "up.part"
    part.write_bytes(data[: 5 * mib])
    up = uploads.Upload(str(part), str(tmp_path / "up"), len(data), None, offset=5 * mib)
    for piece in pieces_past_a_flush(data, 5 * mib, first):
        up.write(piece)
    assert up.finish() == {"size": len(data), "path": str(tmp_path / "up")}
    assert (tmp_path / "up").read_bytes() == data
    assert flushed and 13 * mib <= flushed[0][0] < len(data)
    assert up.writeback.flushes == len(flushed)

    flushed.clear()  # a marker written without fsync: no flush, no thread
    files.atomic_write(str(tmp_path / "marker"), [data], durable=False)
    assert flushed == []


def test_a_write_error_met_by_a_background_flush_fails_the_write(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports a write error to one fsync of an open file: when the background flush
    met it, the final fsync may succeed -- the write must fail anyway, and leave nothing behind."""
    import errno
    import threading

    from remotemagic.agent import files, uploads

    met = threading.Event()

    def failing(fd: int) -> None:
        met.set()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)  # the final fsync (os.fsync) is the real one
    data = os.urandom(12 * 2**20)

    with pytest.raises(OSError, match="Input/output error"):
        files.atomic_write(str(tmp_path / "obj"), pieces_past_a_flush(data, 0, met))
    assert list(tmp_path.iterdir()) == []

    met.clear()
    up = uploads.Upload(str(tmp_path / "up.part"), str(tmp_path / "up"), len(data), "f" * 32)
    for piece in pieces_past_a_flush(data, 0, met):
        up.write(piece)
    with pytest.raises(Exception, match="Input/output error") as info:
        up.finish()
    assert getattr(info.value, "kind", "") == "RemoteDiskError"
    assert list(tmp_path.iterdir()) == []
