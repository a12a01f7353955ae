"""Checkpoints of a session's namespace, taken off the cell's critical path.

A checkpoint is the folder ``sessions/<s>/checkpoint/``: one object file per saved variable
and ``index.json`` (when, after which job, what was saved, what was skipped and why). It is
written as ``checkpoint.new/`` (every file fsynced) and swapped in with two renames; a writer
killed at any point leaves the previous checkpoint readable (``recover`` puts it back if it
was caught between the renames).

After each cell the worker calls :meth:`Background.request`: the worker **forks** and the
child -- a copy-on-write snapshot of the namespace as the cell left it, the way Redis' BGSAVE
works -- pickles and writes the checkpoint while the worker serves the next cell. At most one
child runs at a time; a request that comes while one runs replaces any older pending request
(the newest state wins) and is started when the running child ends -- and no sooner than the
last child took again, so writers keep at most about half of one CPU busy; they run at a
lower priority than the worker and everything else on the machine (a session of its own at
autogroup nice 19, and nice 10: see :func:`_lower_priority`). The child only pickles,
writes and ``os._exit``\\ s: no thread, finaliser, signal handler or output stream of the
worker runs in it.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable

from . import files

CURRENT, NEW, OLD, HOLD = "checkpoint", "checkpoint.new", "checkpoint.old", "checkpoint.hold"
ABANDONED = 3  # exit status of a child whose worker is gone: it did not commit
MAX_PAUSE = 60.0  # seconds: the longest wait between two writers (the last one's duration)
NICE = 10
AUTOGROUP_NICE = 19  # the child's own session (see _lower_priority)


class Abandoned(Exception):
    """The worker that forked this checkpoint is gone: do not replace the checkpoint."""


def recover(sdir: str) -> None:
    """A writer killed between its two renames leaves only ``checkpoint.old``: put it back."""
    cur, old = os.path.join(sdir, CURRENT), os.path.join(sdir, OLD)
    if not os.path.isdir(cur) and os.path.isfile(os.path.join(old, "index.json")):
        os.rename(old, cur)
        files.fsync_dir(sdir)


def save(sdir: str, items: Iterable[tuple[str, Any]], limit: int, job_id: str,
         commit: Callable[[], bool] = lambda: True, worker: int | None = None) -> dict[str, Any]:
    """Pickle ``items`` whose pickle is at most ``limit`` bytes (0: no limit) into
    ``checkpoint.new/``, then swap it in for ``checkpoint/`` if ``commit()`` still agrees.
    Returns the index.

    ``worker``: the pid of the process whose namespace this is. The index remembers which
    objects (by ``id`` and type, valid within that process) pickled larger than ``limit``, so
    the next checkpoint of the same worker skips them without pickling them again."""
    recover(sdir)
    previous = files.read_json(os.path.join(sdir, CURRENT, "index.json"), {}) or {}
    large = previous.get("large") or {} if worker and previous.get("worker") == worker else {}
    new = os.path.join(sdir, NEW)
    if os.path.isdir(new):
        shutil.rmtree(new, ignore_errors=True)
    files.private_dir(new)
    saved: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    too_large: dict[str, Any] = {}
    for name, value in items:
        if limit and _size_at_least(value) > limit:
            skipped[name] = _too_large(limit)
            continue
        key = [id(value), files.type_name(value)]
        if limit and large.get(name) == key:  # the same object as last time: still too large
            skipped[name] = _too_large(limit)
            too_large[name] = key
            continue
        try:
            enc = files.encode(value)
        except Exception as exc:
            skipped[name] = f"cannot be pickled: {type(exc).__name__}: {exc}"
            continue
        if limit and enc.size > limit:
            skipped[name] = _too_large(limit)
            too_large[name] = key
            continue
        files.write_object(os.path.join(new, name + ".obj"), enc, flush_behind=False)  # (no thread here)
        saved[name] = {"size": enc.size, "type": files.type_name(value)}
        del enc
    if not saved and skipped and previous.get("saved"):
        # saving nothing (every value skipped) must not replace a checkpoint that holds values
        shutil.rmtree(new, ignore_errors=True)
        return {**previous, "kept": True, "skipped_now": skipped}
    index = {"time": time.time(), "after_job": job_id, "saved": saved, "skipped": skipped,
             "worker": worker, "large": too_large}
    files.write_json(os.path.join(new, "index.json"), index)
    if not commit():
        raise Abandoned(job_id)
    cur, old = os.path.join(sdir, CURRENT), os.path.join(sdir, OLD)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(cur):
        os.rename(cur, old)
    os.rename(new, cur)
    files.fsync_dir(sdir)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.unlink(os.path.join(sdir, HOLD))
    except FileNotFoundError:
        pass
    return index


def unchanged(sdir: str, items: list[tuple[str, Any]], limit: int, worker: int) -> bool:
    """Would :func:`save` of ``items`` leave the current checkpoint as it is? Decided without
    pickling anything, in the worker, so that no writer is forked for nothing:

    * no user variable, and the current checkpoint holds none and skipped none;
    * every value over ``limit`` (by its size alone, or pickled too large before while it is the
      same object) and the current checkpoint holds values: ``save`` would keep it (``kept``);
    * every value over ``limit`` and the current checkpoint holds none and skipped the same names.

    With a namespace of one large array (or none at all) every cell used to fork the worker
    (copying its page tables: ~1 ms per GiB) and write, fsync and swap in the same empty index."""
    index = files.read_json(os.path.join(sdir, CURRENT, "index.json"))
    if not index or not limit and items:
        return False
    large = index.get("large") or {} if index.get("worker") == worker else {}
    for name, value in items:
        if _size_at_least(value) <= limit and large.get(name) != [id(value), files.type_name(value)]:
            return False  # this one would be pickled
    if not items:
        return not index.get("saved") and not index.get("skipped")
    return bool(index.get("saved")) or index.get("skipped") == {name: _too_large(limit) for name, _ in items}


class Background:
    """At most one forked checkpoint writer at a time; newer requests coalesce.

    ``items()`` yields the (name, value) pairs to save; it runs in the child. ``wake()`` is
    called from the reaper thread when a pending request can start: it must make the worker's
    main thread call :meth:`resume` once it is between jobs (the worker writes a line to its
    own FIFO)."""

    def __init__(self, sdir: str, items: Callable[[], Iterable[tuple[str, Any]]], wake: Callable[[], None]):
        self.sdir = sdir
        self.items = items
        self.wake = wake
        self.cond = threading.Condition()
        self.pid: int | None = None  # the running child
        self.pending: tuple[int, str] | None = None  # (limit, job id) to start when it ends
        self.quiet_until = 0.0  # monotonic: no new writer before (the last one's duration after it)
        self.started = 0  # children forked, for the record
        self.last_exit: int | None = None  # wait status of the last child reaped

    # -- main thread, between jobs ------------------------------------------------------------
    def request(self, limit: int, job_id: str) -> None:
        """Checkpoint the namespace as it is now: fork a writer, or (one is running) replace
        the pending request with this newer one."""
        with self.cond:
            if self.pid is not None or time.monotonic() < self.quiet_until:
                self.pending = (limit, job_id)  # the reaper wakes us when it may start
                return
            self.pending = None
        self._fork(limit, job_id)

    def idle(self) -> bool:
        """No writer runs and none is pending."""
        with self.cond:
            return self.pid is None and self.pending is None

    def resume(self) -> None:
        """Start the pending request, if any and no writer is running (main thread, idle)."""
        with self.cond:
            if self.pid is not None or self.pending is None or time.monotonic() < self.quiet_until:
                return
            limit, job_id = self.pending
            self.pending = None
        self._fork(limit, job_id)

    def cancel(self, timeout: float = 30.0) -> None:
        """Drop the pending request and kill the running writer (its partial folder is never
        swapped in); return once it is reaped. Before a synchronous checkpoint or a restore."""
        with self.cond:
            self.pending = None
            self.quiet_until = 0.0
            self.cond.notify_all()  # a reaper pausing before the next writer: nothing is pending now
            if self.pid is not None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.cond.wait_for(lambda: self.pid is None, timeout)

    # -- the fork -------------------------------------------------------------------------------
    def _fork(self, limit: int, job_id: str) -> None:
        parent = os.getpid()
        _prepare()  # imports done once here, not in every child
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()  # or the child's copy of the buffer could be written twice
            except Exception:
                pass
        with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork() may lead to deadlocks"
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                pid = os.fork()
            except OSError as exc:  # out of memory or processes: this checkpoint is skipped
                _say(f"remotemagic worker: cannot fork the checkpoint after {job_id}: {exc}\n")
                return
        if pid == 0:  # the child: pickle, write, exit -- nothing else
            os._exit(self._child(parent, limit, job_id))
        with self.cond:
            self.pid = pid
            self.started += 1
        threading.Thread(target=self._reap, args=(pid, time.monotonic()), name="checkpoint-reaper",
                         daemon=True).start()

    def _child(self, parent: int, limit: int, job_id: str) -> int:
        try:
            gc.disable()  # no finaliser of a user object runs in this copy
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the worker's code
            _lower_priority()  # the worker's next cell -- and everything else on the machine -- comes first
            _die_with_parent()
            if os.getppid() != parent:
                return ABANDONED
            # the session lock, the FIFO, user files and sockets are the worker's, not ours
            _close_fds()
            sys.stdout = sys.stderr = open(os.devnull, "w")  # the worker's streams take locks
            save(self.sdir, self.items(), limit, job_id, commit=lambda: os.getppid() == parent, worker=parent)
            return 0
        except Abandoned:
            return ABANDONED
        except BaseException as exc:
            _say(f"remotemagic worker: checkpoint after {job_id} failed: {type(exc).__name__}: {exc}\n")
            return 1

    def _reap(self, pid: int, started: float) -> None:
        status: int | None = None
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:  # reaped by someone else (user code calling os.wait)
                break
        now = time.monotonic()
        with self.cond:
            self.pid = None
            self.last_exit = status
            self.quiet_until = now + min(now - started, MAX_PAUSE)
            self.cond.notify_all()
        if status is not None and os.WIFSIGNALED(status):
            _say(f"remotemagic worker: checkpoint writer {pid} killed by signal {os.WTERMSIG(status)}; "
                 "the previous checkpoint stays\n")
        with self.cond:  # pause as long as that writer took (cancel() ends the pause), then start the next
            self.cond.wait_for(lambda: time.monotonic() >= self.quiet_until, max(0.0, self.quiet_until - now))
            pending = self.pending is not None and self.pid is None
        if pending:
            self.wake()


def _too_large(limit: int) -> str:
    return f"larger than {limit} bytes"


def _size_at_least(value: Any) -> int:
    """A cheap lower bound of a value's pickle size (0 if unknown): skipping a value over the
    limit must not cost pickling it first."""
    try:
        if isinstance(value, (bytes, bytearray, str)):
            return len(value)
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int):
            return nbytes
        if type(value).__module__.startswith("pandas") and hasattr(value, "memory_usage"):
            usage = value.memory_usage(index=True, deep=False)  # no string is visited
            return int(usage.sum() if hasattr(usage, "sum") else usage)
    except Exception:
        pass
    return 0


def _say(text: str) -> None:
    """To the worker's log (fd 2 between jobs) with one write: no stream, no lock."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def _close_fds() -> None:
    """Close every descriptor but 0-2 (the worker's log)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, 65536)
        return
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


_prctl: Any = None


def _prepare() -> None:
    """In the worker, before forking: what every child needs, imported once."""
    global _prctl
    import cloudpickle  # type: ignore[import-untyped]  # noqa: F401  (files.encode imports it; the child inherits it loaded)

    if _prctl is None and sys.platform.startswith("linux"):
        _prctl = files.libc_function("prctl") or False


def _lower_priority() -> None:
    """In the child: yield the CPU to every other process, not only to the worker.

    ``nice`` alone does not do that on Linux with autogroup scheduling (the default on desktop
    and cloud kernels, ``/proc/sys/kernel/sched_autogroup_enabled``): the CPU is first shared
    between *sessions*, and nice only orders the processes of one session. The worker runs in a
    session of its own, so a writer at nice 10 still took a full session's share from the agent,
    sshd and the client streaming the cell's outputs -- measured with a CPU-bound child of a
    ``setsid`` process: the competing process kept 0.63-0.66 of a core with nice 10, 0.82-0.84
    once the child sat alone in its own session at autogroup nice 19. So the child starts a
    session of its own (its worker's death still kills it: ``PR_SET_PDEATHSIG``) and lowers that
    session's autogroup priority, then its own nice (what counts without autogroup)."""
    try:
        os.setsid()
    except OSError:
        pass
    else:
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(AUTOGROUP_NICE))
        except OSError:  # no autogroup in this kernel, or not Linux
            pass
    try:
        os.nice(NICE)
    except OSError:
        pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the worker dies (best effort; the commit re-checks)."""
    if _prctl:
        try:
            _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:
            pass
