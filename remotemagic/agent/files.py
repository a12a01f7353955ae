"""On-disk layout of a target's root, atomic writes and object (pickle) files.

Layout under the root (folders 0700, files 0600 -- pickles are code)::

    agent/<version>/remotemagic_agent/   this package, as shipped
    objects/<xxh3-128 hex>               content-addressed pushed values (bounded, LRU)
    store/<name>.obj, store/<name>.json  %ec2_store values and their metadata
    sessions/<name>/                     one worker per session: lock, start.lock, worker.json,
                                         in.fifo (job ids in), worker.log, checkpoint/
    jobs/<job id>/                       spec.json, events.jsonl, status.json, outputs/<name>.obj

Names and job states are :mod:`.protocol`'s (re-exported here for older callers).

An object file is ``MAGIC``, a count of out-of-band buffers, the length of the pickle and of each
buffer, the pickle (protocol 5), then the buffers. Loading reads each buffer straight into its
final bytearray, so a 1 GiB array needs 1 GiB, not 2.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import pickle
import struct
import tempfile
import threading
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Protocol

from . import wire
from .protocol import JOB_RE, NAME_RE, TERMINAL, check_job_id, check_name  # noqa: F401 (re-exported)

MAGIC = b"RMOBJ2\n"  # out-of-band buffers start at 64-byte offsets (so they can be mapped, aligned)
MAGIC_V1 = b"RMOBJ1\n"  # buffers packed without padding: still read
ALIGN = 64
PART_SUFFIX = ".part"  # an object file being written (see atomic_write's ``on_open``)
MAP_AT_LEAST = 1024 * 1024  # buffers this large are mapped copy-on-write, not read
_COUNT = struct.Struct(">IQ")  # number of buffers, pickle length
_LEN = struct.Struct(">Q")


def private_dir(path: str) -> str:
    """Create ``path`` and any missing parents with mode 0700 (``makedirs`` would not)."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
    return path


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Make a file that is already in place durable, and its folder's entry for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path) or ".")


WRITEBACK_EVERY = 8 * 2**20  # bytes of a durable file between two flushes of it in the background


@functools.cache
def libc_function(name: str, argtypes: tuple[str, ...] | None = None, restype: str = "c_int") -> Any:
    """The C library's function ``name`` (errno kept), typed with the ``ctypes`` type names
    given; None where there is none (another OS, a Python built without ctypes). Looked up
    once, on first use: ctypes is imported only then, not when an agent starts."""
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (ImportError, OSError, AttributeError):
        return None
    if argtypes is not None:
        fn.argtypes = [getattr(ctypes, t) for t in argtypes]
        fn.restype = getattr(ctypes, restype)
    return fn


class Writeback:
    """Flushes a growing durable file to disk in the background every ``WRITEBACK_EVERY``
    bytes, so that the fsync at its end waits for the last stretch, not for the whole file.

    A thread (started once the file passes ``WRITEBACK_EVERY``; small files never start one)
    calls ``fdatasync`` while the writer goes on writing. ``fdatasync``, not
    ``sync_file_range``: the latter only hands the pages to the device, and the final fsync's
    cache flush still waited for all of them -- 512 MiB written at 170 MB/s, fsync 0.6 s with
    ``sync_file_range`` every 8 MiB, 0.01 s with this (docs/performance.md). Nothing is promised
    before that final fsync; :meth:`close` (before it, and before the file is closed) stops the
    thread and returns the error a flush met: the kernel reports a write error to one fsync of
    an open file only, so the final fsync may not see it again -- the writer must raise it."""

    def __init__(self, f: Any, start: int = 0):
        self.f, self.started = f, start
        self.flushes = 0  # fdatasync calls made (tests read it)
        self.error: OSError | None = None  # what a flush met (see close)
        self._cond = threading.Condition()
        self._pending = self._closed = False
        self._thread: threading.Thread | None = None

    def wrote(self, end: int) -> None:
        """``end``: the file's length so far."""
        if end - self.started < WRITEBACK_EVERY:
            return
        self.f.flush()  # (what the file object buffers is not the kernel's to write yet)
        self.started = end
        with self._cond:
            if self._closed:
                return
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self.f.fileno(),),
                                                name="remotemagic-writeback", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self, fd: int) -> None:
        datasync = getattr(os, "fdatasync", os.fsync)  # (macOS has no fdatasync)
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._pending = False
            try:
                datasync(fd)
            except OSError as exc:
                self.error = exc  # no more flushes: the writer raises it at close
                return
            self.flushes += 1

    def close(self) -> OSError | None:
        """Stop the thread (a flush under way is waited for: the final fsync needs it anyway);
        the error a flush met, if any: the file is not durable then, whatever fsync says next."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        return self.error


_RENAME_EXCHANGE = 2  # renameat2's flag (Linux 3.15; ext4, xfs, btrfs, tmpfs)
_AT_FDCWD = -100


def _exchange_call() -> Any:
    """libc's ``renameat2`` (Linux, glibc 2.28), or None where it is missing."""
    return libc_function("renameat2", ("c_int", "c_char_p", "c_int", "c_char_p", "c_uint"))


_exchange_unsupported: set[int] = set()  # st_dev of file systems that refused the exchange


def swap_in(tmp: str, path: str) -> bool:
    """Exchange the files ``tmp`` and ``path`` in one atomic step (``path`` then holds what
    ``tmp`` held, and ``tmp`` the old file, to be unlinked). False, with nothing changed, where
    it cannot: no ``path`` yet, no ``renameat2``, a file system without the exchange."""
    call = _exchange_call()
    if call is None:
        return False
    if _exchange_unsupported and os.stat(tmp).st_dev in _exchange_unsupported:  # (no stat per write)
        return False
    if call(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes  # (loaded already: libc_function found renameat2 through it)

    err = ctypes.get_errno()
    if err == errno.ENOENT:
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        _exchange_unsupported.add(os.stat(tmp).st_dev)
        return False
    raise OSError(err, os.strerror(err), path)


def atomic_write(path: str, chunks: Iterable[bytes | bytearray | memoryview], durable: bool = True,
                 on_open: Callable[[], None] | None = None, swap: bool = False, flush_behind: bool = True) -> int:
    """Write to a temporary file beside ``path``, fsync, rename over ``path``. Returns bytes.

    ``durable=False`` skips the fsyncs (the rename stays atomic): for markers that mean nothing
    after a machine crash -- the processes they describe are gone then too. A durable file past
    8 MiB is flushed by a thread while it is written (:class:`Writeback`), unless
    ``flush_behind=False`` (a forked checkpoint writer starts no thread).

    ``swap`` (with ``durable=False``): an existing ``path`` is replaced by exchanging it with the
    new file (:func:`swap_in`), then the old one is unlinked -- as atomic for readers as a
    rename, but it skips what ext4 does on a rename over a file (``auto_da_alloc``: it starts
    writing the new file out; a small file's replace took 0.34-0.38 ms here, by exchange
    0.12-0.17 ms), so a machine crash soon after may leave the file empty. Only for files
    nobody needs then: a worker's ``current`` and a job's ``status.json`` (a final status
    comes back from the job's log).

    With ``on_open``, the temporary file has the well-known name ``<path>.part`` (so a reader
    can follow it while it is written; it reads the same inode after the rename), and
    ``on_open`` is called once that file exists, before the first byte is written."""
    folder = os.path.dirname(path) or "."
    if on_open is not None:
        tmp = path + PART_SUFFIX
        try:
            os.unlink(tmp)  # a dead writer's leftover: start a fresh inode
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    else:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            writeback = Writeback(f) if durable and flush_behind else None
            try:
                if on_open is not None:
                    on_open()
                for chunk in chunks:
                    f.write(chunk)
                    size += len(memoryview(chunk).cast("B")) if not isinstance(chunk, bytes) else len(chunk)
                    if writeback is not None:
                        writeback.wrote(size)
            finally:
                failed = writeback.close() if writeback is not None else None  # before the file is closed
            if failed is not None:
                raise failed
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if swap and not durable and swap_in(tmp, path):
            os.unlink(tmp)  # the old file
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.truncate(tmp, 0)  # frees the blocks now, even while a reader holds the file open
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(folder)
    return size


def write_json(path: str, data: Any) -> None:
    atomic_write(path, [json.dumps(data, indent=1, sort_keys=True).encode()])


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return default
    except ValueError:
        return default


class Encoded:
    """A value pickled with protocol 5: the pickle and its out-of-band buffers, not yet joined."""

    def __init__(self, header: bytes, buffers: list[memoryview], hasher: Any = None):
        self.hasher = hasher or hashlib.sha256
        self.pickle = header
        self.buffers = buffers
        self.prefix = MAGIC + _COUNT.pack(len(buffers), len(header)) + b"".join(
            _LEN.pack(len(b)) for b in buffers
        )
        self.size = sum(len(p) if isinstance(p, bytes) else memoryview(p).nbytes for p in self.parts())
        self._digest: str | None = None

    def parts(self) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = [self.prefix, self.pickle]
        offset = len(self.prefix) + len(self.pickle)
        for buf in self.buffers:
            pad = -offset % ALIGN
            if pad:
                out.append(bytes(pad))
            out.append(buf)
            offset += pad + len(buf)
        return out

    def chunks(self, size: int = 256 * 1024) -> Iterable[memoryview]:
        for part in self.parts():
            view = memoryview(part).cast("B")
            for start in range(0, len(view), size):
                yield view[start : start + size]

    @property
    def digest(self) -> str:
        if self._digest is None:
            h = self.hasher()
            for part in self.parts():
                h.update(part)
            self._digest = h.hexdigest()
        return self._digest


def encode(value: Any, dumps: Any = None, hasher: Any = None) -> Encoded:
    """Pickle ``value`` (cloudpickle by default) keeping large buffers out of band."""
    if dumps is None:
        import cloudpickle  # type: ignore[import-untyped]

        dumps = cloudpickle.dumps
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            view = buf.raw()
        except BufferError:  # not contiguous: let pickle copy it in band
            return True
        if view.nbytes < 64 * 1024:
            return True
        buffers.append(view.cast("B") if view.format != "B" else view)
        return False

    header = dumps(value, protocol=5, buffer_callback=keep)
    return Encoded(header, buffers, hasher)


def write_object(path: str, enc: Encoded, on_open: Callable[[], None] | None = None,
                 flush_behind: bool = True) -> int:
    """Write an object file atomically. With ``on_open``, it is written as ``<path>.part`` (a
    reader may stream it while it grows: see ``atomic_write``)."""
    return atomic_write(path, enc.chunks(), on_open=on_open, flush_behind=flush_behind)


class Readable(Protocol):
    """What reading an object needs: a file, a socket's file, a stream of data frames (api.CallReader)."""

    def read(self, size: int = -1, /) -> Any: ...

    def readinto(self, buffer: Any, /) -> Any: ...


def _read_head(f: Readable) -> tuple[bool, list[int], bytearray]:
    magic = f.read(len(MAGIC))
    if magic not in (MAGIC, MAGIC_V1):
        raise ValueError("not a remotemagic object file (bad magic)")
    nbuf, hlen = _COUNT.unpack(_read(f, _COUNT.size))
    lengths = [_LEN.unpack(_read(f, _LEN.size))[0] for _ in range(nbuf)]
    return magic == MAGIC, lengths, _read(f, hlen)


def _offsets(aligned: bool, start: int, lengths: list[int]) -> list[int]:
    out, offset = [], start
    for n in lengths:
        if aligned:
            offset += -offset % ALIGN
        out.append(offset)
        offset += n
    return out


class ObjectAssembler:
    """Builds a value from the bytes of an object file as they come, in pieces of any size.

    :meth:`want` hands out the memory the next bytes belong in -- for an out-of-band buffer, that
    buffer's final bytearray -- so a reader can ``readinto`` it straight from a socket or a
    channel: a streamed 1 GiB array is received with no copy besides the one into its memory.
    :meth:`feed` copies bytes in for a reader that already holds them.
    """

    def __init__(self) -> None:
        self.received = 0
        self._magic = bytearray(len(MAGIC))
        self._counts = bytearray(_COUNT.size)
        self._lengths_raw = bytearray()
        self._aligned = True
        self._lengths: list[int] = []
        self._header = bytearray()
        self._buffers: list[bytearray] = []
        # (memory to fill, what it is): the head first, then lengths, pickle, padding and buffers
        self._todo: list[tuple[memoryview, str]] = [(memoryview(self._magic), "magic"),
                                                    (memoryview(self._counts), "counts")]
        self._done = 0  # bytes of self._todo[0] filled

    def want(self) -> memoryview | None:
        """Where the next bytes go (fill a prefix of it, then call :meth:`filled`); None once complete."""
        if not self._todo:
            return None
        view, _ = self._todo[0]
        return view[self._done :]

    def filled(self, n: int) -> None:
        """``n`` bytes were written to the start of the view :meth:`want` returned."""
        self.received += n
        self._done += n
        view, what = self._todo[0]
        if self._done < len(view):
            return
        self._todo.pop(0)
        self._done = 0
        if what == "magic":
            if self._magic not in (MAGIC, MAGIC_V1):
                raise ValueError("not a remotemagic object file (bad magic)")
            self._aligned = self._magic == MAGIC
        elif what == "counts":
            self._parsed_counts()
        elif what == "lengths":
            self._lengths = [n for (n,) in _LEN.iter_unpack(self._lengths_raw)]
            self._plan()
        if self._todo and not len(self._todo[0][0]):
            self.filled(0)  # an empty pickle or buffer: nothing to wait for

    def _parsed_counts(self) -> None:
        nbuf, hlen = _COUNT.unpack(self._counts)
        self._lengths_raw = bytearray(_LEN.size * nbuf)
        self._header = bytearray(hlen)
        self._todo.append((memoryview(self._lengths_raw), "lengths"))

    def _plan(self) -> None:
        self._todo.append((memoryview(self._header), "pickle"))
        position = len(MAGIC) + _COUNT.size + len(self._lengths_raw) + len(self._header)
        for offset, n in zip(_offsets(self._aligned, position, self._lengths), self._lengths, strict=True):
            if offset > position:
                self._todo.append((memoryview(bytearray(offset - position)), "padding"))
            buf = bytearray(n)
            self._buffers.append(buf)
            self._todo.append((memoryview(buf), "buffer"))
            position = offset + n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in; ValueError if it runs past the end of the object."""
        src = memoryview(data).cast("B")
        while src:
            view = self.want()
            if view is None:
                raise ValueError(f"{len(src)} bytes more than the object holds")
            n = min(len(view), len(src))
            view[:n] = src[:n]
            src = src[n:]
            self.filled(n)

    def value(self) -> Any:
        """Unpickle the complete object; ValueError if bytes are missing."""
        if self._todo:
            raise ValueError("object file is truncated")
        return pickle.loads(self._header, buffers=self._buffers)


def read_object(f: Readable) -> Any:
    """Load a value from an object file or stream written by ``write_object``, reading each
    buffer straight into its final bytearray."""
    asm = ObjectAssembler()
    while (view := asm.want()) is not None:
        n = f.readinto(view)
        if not n:
            raise ValueError("object file is truncated")
        asm.filled(n)
    return asm.value()


def load_object(path: str) -> Any:
    """Load an object file -- only from a folder that nobody but its owner (us) can write.

    Large buffers are mapped copy-on-write (``MAP_PRIVATE``) instead of read: loading a 1 GiB
    array costs next to nothing and no memory until pages are used, the page cache is shared,
    and the array stays writable (writes stay private). Object files are only ever replaced by
    rename, never rewritten in place, so a mapping never sees them change."""
    import mmap

    with open(path, "rb", buffering=0) as f:
        check_object_file(f, path)
        aligned, lengths, header = _read_head(f)
        size = os.fstat(f.fileno()).st_size
        if not aligned or max(lengths, default=0) < MAP_AT_LEAST:
            f.seek(0)
            return read_object(f)
        start = len(MAGIC) + _COUNT.size + _LEN.size * len(lengths) + len(header)
        offsets = _offsets(True, start, lengths)
        if offsets[-1] + lengths[-1] > size:
            raise ValueError("object file is truncated")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mm)
    buffers = [view[o : o + n] for o, n in zip(offsets, lengths, strict=True)]
    return pickle.loads(header, buffers=buffers)


def check_private(folder: str) -> None:
    """Refuse a folder that others could have written pickles (which are code) into."""
    why = unsafe_reason(folder, os.stat(folder), "folder")
    if why:
        raise PermissionError(f"refusing to load pickles from {why}")


def _user(uid: int, bare: bool = False) -> str:
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"
    return f"{name}, uid {uid}" if bare else f"{name} (uid {uid})"


def unsafe_reason(path: str, st: os.stat_result, what: str = "") -> str | None:
    """Why ``path`` (with ``st`` from lstat/fstat) is not safe to trust, or None: it must belong
    to us and not be writable by group or others (a symlink's own mode means nothing). The
    reason starts with "the <what> <path>" and says what to fix."""
    import stat as stat_mod

    me = os.getuid()
    what = what or ("folder" if stat_mod.S_ISDIR(st.st_mode) else "file")
    if st.st_uid != me:
        return (f"the {what} {path}: it belongs to {_user(st.st_uid)}, not to you ({_user(me, True)}), so code or "
                "pickles another user put there would run as you. Use a root folder that you own and only you "
                "can write (a new one, or leave --root / local_root / remote_root unset for the default)")
    if not stat_mod.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        return (f"the {what} {path}: it is writable by {who} (mode {st.st_mode & 0o7777:04o}), so another user "
                f"could put code there that would run as you. Fix it with: chmod go-w {path} (or chmod 700), "
                "or use a folder only you can write")
    return None


def check_ours(path: str, what: str = "", follow: bool = False) -> None:
    """Raise PermissionError (saying what to fix) unless ``path`` is ours and not writable by
    group or others. A symlink is judged itself unless ``follow``."""
    st = os.stat(path) if follow else os.lstat(path)
    why = unsafe_reason(path, st, what)
    if why:
        raise PermissionError(f"refusing to use {why}")


def check_tree(top: str, depth: int | None = None, what: str = "") -> None:
    """``check_ours`` for ``top`` (followed if a symlink) and everything under it, ``depth``
    levels down (None: all). Symlinks inside are judged themselves, never followed."""
    check_ours(top, what, follow=True)
    if depth == 0 or not os.path.isdir(top):
        return
    try:
        entries = list(os.scandir(top))
    except FileNotFoundError:
        return
    for entry in entries:
        check_ours(entry.path)
        if entry.is_dir(follow_symlinks=False):
            check_tree(entry.path, None if depth is None else depth - 1)


def check_object_file(f: BinaryIO, path: str) -> None:
    """Before unpickling or serving an object file: its folder and the open file itself must be
    ours and writable by nobody else (pickles are code)."""
    check_private(os.path.dirname(path))
    why = unsafe_reason(path, os.fstat(f.fileno()), "object file")
    if why:
        raise PermissionError(f"refusing to load {why}")


def _read(f: Readable, n: int) -> bytearray:
    """Exactly ``n`` bytes, read straight into a new bytearray: a stream (a raw file, frames off
    the wire) may return fewer per read."""
    try:
        return wire.read_exact(f.readinto, n)
    except wire.ConnectionLost:
        raise ValueError("object file is truncated") from None


def preview(value: Any, width: int = 60) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break storing
        text = f"<unrepresentable: {type(exc).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class locked:
    """Holds an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block:
    the store's writers (``store/.lock``), the hand-over of jobs to a session's worker
    (``sessions/<s>/start.lock``)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> "locked":
        self.f = open(self.path, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def is_locked(path: str) -> bool:
    """Whether some process holds a ``flock`` on ``path`` (a session's ``lock``: its worker's
    supervisor lives). A file that cannot be opened counts as not locked."""
    try:
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            return False
    except OSError:
        return False


def tail(path: str, lines: int, window: int = 256 * 1024) -> str | None:
    """The last ``lines`` lines of a log file (read from its last ``window`` bytes); None if it
    cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - window))
            data = f.read()
    except OSError:
        return None
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def store_lock(root: str) -> locked:
    """Serialises store writers across agents and workers (flock on ``store/.lock``)."""
    return locked(os.path.join(private_dir(os.path.join(root, "store")), ".lock"))


def remove(path: str) -> None:
    """Unlink ``path``; already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_fifo(path: str, line: bytes) -> None:
    """Write ``line`` into the FIFO ``path`` without blocking: OSError (ENXIO) if nobody reads it."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def sha256_prefix(path: str, size: int | None = None, block: int = 1024 * 1024) -> tuple[str, int]:
    """sha256 of the first ``size`` bytes of a file (None: all of it), and how many there were."""
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        for chunk in _blocks(f, size, block):
            h.update(chunk)
            done += len(chunk)
    return h.hexdigest(), done


def _blocks(f: BinaryIO, size: int | None, block: int) -> Iterator[bytes]:
    left = size
    while left is None or left > 0:
        chunk = f.read(block if left is None else min(block, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def link_or_copy(src: str, dest: str) -> None:
    """Atomically make ``dest`` hold the bytes of ``src`` (a hard link where possible)."""
    folder = os.path.dirname(dest)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(dest)}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f:
            atomic_write(tmp, iter(lambda: f.read(1 << 20), b""))
    os.replace(tmp, dest)
    fsync_dir(folder)
