"""The per-session worker: ``python -m remotemagic_agent.worker ROOT SESSION CWD``.

Started detached by the agent (own session and process group, so it outlives the SSH link and
the local kernel). The process forks once:

* the **supervisor** (parent, :mod:`.supervisor`) holds the session lock, waits for the worker
  and, if the worker dies (SIGKILL, out of memory, a crash in C code), marks its jobs failed with
  the cause and leaves ``died.json`` so the next job is told that the namespace was lost;
* the **worker** (child, :class:`Worker`) holds the session namespace in a headless IPython shell
  (:func:`.cellshell.make_shell`) and runs the jobs named on its FIFO ``in.fifo`` one after
  another. Every output -- stream text, display data, execute results, errors -- is appended to
  the job's ``events.jsonl`` (:mod:`.events`) before anything else sees it.
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import json
import os
import queue
import select
import shutil
import signal
import sys
import threading
import time
from typing import Any

from . import cellshell, files, recover, spot
from . import checkpoint as checkpoints
from . import protocol as P
from .events import FLUSH_INTERVAL, EventLog, EventStream, Router, diagnose, keep_log_fd, write_log
from .fdcapture import FdCapture
from .supervisor import STOPPING, supervise

RESERVE_BYTES = 1024 * 1024  # freed when the disk is full, so a final status can still be written
SKIP_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
TIMEOUT_GRACE = 30.0
SPOT_GRACE = 10.0  # a spot reclaim leaves ~2 minutes: interrupt again this often


class Releaser:
    """Drops values in a thread of its own, off the cell's path.

    A cell's inputs replace what the namespace held under their names; the old value can be
    big, and freeing it slow: a 512 MiB array pushed before is a mapped object file, and once
    that object was evicted from the store, its release frees the file's blocks and pages --
    0.40 s on the push of the next value (docs/performance.md). Python runs finalizers in
    whichever thread drops the last reference (its garbage collector does so anyway), so
    moving the drop to this thread changes when, not what. Limits: one thread, in order (a
    finalizer that blocks holds up the values after it), and a checkpoint writer forked while a
    release is under way keeps that value's pages until it exits."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def release(self, values: list[Any]) -> None:
        """Take the references in ``values`` (the list is emptied by the thread)."""
        if not values:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="remotemagic-release", daemon=True)
                self._thread.start()
        self._queue.put(values)

    def _run(self) -> None:
        while True:
            values = self._queue.get()
            values.clear()  # the last references go here
            del values


class Worker:
    """One session's namespace: runs the jobs named on ``sessions/<s>/in.fifo``, one at a time."""

    def __init__(self, root: str, session: str, idle_hours: float = 0.0):
        self.root = root
        self.idle_hours = idle_hours  # exit after this long without a job (0: never); each job may change it
        self.busy_at = time.time()  # when the last job ended
        self.session = session
        self.sdir = os.path.join(root, "sessions", session)
        self.router = Router()
        self.releaser = Releaser()
        self.in_user_code = False
        self.timed_out = False
        self._timer_job: str | None = None
        self.job_id: str | None = None  # the job run_job is running
        self.interrupt_pending = False  # a cancel came before the job's code started
        self.spot: dict[str, Any] | None = None  # the spot reclaim notice, once one came
        self.spot_job: str | None = None  # the job that was running when it came
        self.spot_saved = False  # the spot checkpoint is taken (main thread only)
        self.spot_lock = threading.Lock()  # orders the writes of spot_notice.json
        self.fresh = True  # no job has run here yet (recover.restore_before_cell restores only then)
        # the automatic checkpoint after each cell: a forked child writes it (agent/checkpoint.py)
        self.checkpoints = checkpoints.Background(self.sdir, self.checkpoint_items, self._wake_for_checkpoint)

    # -- signals -------------------------------------------------------------------------
    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.in_user_code:
            raise KeyboardInterrupt
        if self.job_id is not None:  # claimed but not started yet: do not start it
            self.interrupt_pending = True

    # -- main loop -----------------------------------------------------------------------
    def serve(self) -> None:
        fifo = os.path.join(self.sdir, "in.fifo")
        out = sys.stdout
        self.stdout = EventStream(self.router, "stdout", out)
        self.stderr = EventStream(self.router, "stderr", sys.stderr)
        self.router.streams = [self.stdout, self.stderr]
        self.capture = FdCapture(self.sdir, {1: self.stdout, 2: self.stderr})
        keep_log_fd(self.capture.saved[2])
        self.shell = cellshell.make_shell(self.router.emit)
        sys.stdout, sys.stderr = self.stdout, self.stderr  # type: ignore[assignment]
        signal.signal(signal.SIGINT, self.on_sigint)
        threading.Thread(target=self._flusher, daemon=True).start()
        self.make_reserve()
        # O_RDWR keeps the FIFO open with no writer, so readline never sees EOF.
        fd = os.open(fifo, os.O_RDWR)
        checkpoints.recover(self.sdir)
        files.write_json(os.path.join(self.sdir, "worker.json"),
                         {"pid": os.getpid(), "started": time.time(), "idle_hours": self.idle_hours,
                          "cwd": os.getcwd()})
        spot.start(self.on_spot_notice, log=write_log)  # only with REMOTEMAGIC_SPOT=1
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            buf = b""
            while True:
                if not buf and self.idle_hours > 0:
                    left = self.busy_at + self.idle_hours * 3600 - time.time()
                    if not select.select([pipe], [], [], max(0.0, left))[0]:
                        if self.idle_exit(pipe):
                            return
                        continue
                chunk = pipe.read(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    job_id = line.decode().strip()
                    if job_id == "exit":
                        return
                    if job_id == "spot":  # on_spot_notice woke us up
                        self.spot_checkpoint(None)
                        continue
                    if job_id == "checkpoint":  # the last checkpoint writer ended; one is pending
                        self.checkpoints.resume()
                        continue
                    try:
                        P.check_job_id(job_id)
                    except ValueError:
                        continue
                    self.run_job(job_id)
                    self.busy_at = time.time()
                    if os.path.exists(os.path.join(self.sdir, STOPPING)):
                        return  # being stopped: no other job starts here

    def idle_exit(self, pipe: Any) -> bool:
        """No job for ``idle_hours``: checkpoint the namespace, then exit (True) -- unless a job
        arrived meanwhile (False). The next job's notice says how to restore the checkpoint."""
        held = os.path.exists(os.path.join(self.sdir, "checkpoint.hold"))  # a dead worker's, not restored yet
        saved = "its checkpoint from before was kept" if held else "nothing could be checkpointed"
        if not held:
            try:
                index = self.checkpoint(0, "idle", report=False)["checkpoint"]
                saved = f"checkpointed {len(index['saved'])} value(s) first"
            except Exception as exc:  # exit anyway: the point is to free the memory
                saved = f"the checkpoint failed ({type(exc).__name__}: {exc})"
                diagnose(f"idle checkpoint failed: {exc}")
        with files.locked(os.path.join(self.sdir, "start.lock")):  # no job is being handed to us meanwhile
            if select.select([pipe], [], [], 0)[0]:
                self.busy_at = time.time()
                return False
            cause = f"idle for {self.idle_hours:g} h, it exited to free its memory; {saved}"
            files.write_json(os.path.join(self.sdir, "died.json"), {"cause": cause, "time": time.time(), "jobs": []})
            files.remove(os.path.join(self.sdir, "worker.json"))
        return True

    # -- a full disk must not leave a job "running" forever --------------------------------------
    def make_reserve(self) -> None:
        path = os.path.join(self.sdir, "reserve")
        if os.path.exists(path) and os.path.getsize(path) == RESERVE_BYTES:
            return
        try:
            files.atomic_write(path, [bytes(RESERVE_BYTES)])
        except OSError:
            pass

    def write_status(self, jdir: str, status: dict[str, Any]) -> None:
        """Replace the job's ``status.json``. Made durable only *after* the rename: a running
        status means nothing after a machine crash, and a final one is already on disk in the
        log's last event (``run_job`` fsyncs the log first; after a crash, ``mark_orphans``
        takes it from there) -- so the agent, which answers once the final status is in place,
        does not wait for this file's own fsync."""
        path = os.path.join(jdir, "status.json")
        try:
            files.atomic_write(path, [json.dumps(status, indent=1, sort_keys=True).encode()], durable=False,
                              swap=True)
            if status.get("state") != P.RUNNING:
                files.fsync_file(path)
            return
        except OSError as exc:
            first = exc
        try:  # free the emergency reserve and try once more
            os.unlink(os.path.join(self.sdir, "reserve"))
        except OSError:
            pass
        try:
            files.write_json(path, status)
        except OSError as exc:
            diagnose(f"cannot write {path}: {first}; {exc}")

    def _flusher(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            try:
                self.capture.pump()
            except Exception:
                pass
            for s in self.router.streams:
                try:
                    s.flush()
                except Exception:
                    pass

    # -- one job -------------------------------------------------------------------------
    def run_job(self, job_id: str) -> None:
        self.spot_checkpoint(None)  # no job starts between a spot notice and its checkpoint
        jdir = os.path.join(self.root, "jobs", job_id)
        try:
            os.unlink(os.path.join(jdir, "queued"))  # claim it; a cancel may have claimed it first
        except FileNotFoundError:
            return
        self.interrupt_pending = False
        self.job_id = job_id
        spec = files.read_json(os.path.join(jdir, "spec.json"), {}) or {}
        spec_idle = spec.get("worker_idle_hours")
        if isinstance(spec_idle, (int, float)) and spec_idle >= 0:
            self.idle_hours = float(spec_idle)
        # "current" before "running": a cancel that sees the job running also finds it current
        files.atomic_write(os.path.join(self.sdir, "current"), [job_id.encode()], durable=False, swap=True)
        log = EventLog(os.path.join(jdir, "events.jsonl"))
        status: dict[str, Any] = {"state": P.RUNNING, "started": time.time(), "pid": os.getpid()}
        self.write_status(jdir, status)
        self.router.log = log
        log.emit({"type": "status", "state": P.RUNNING})
        state = P.DONE
        error: dict[str, Any] | None = None
        self.capture.start()
        try:
            kind = spec.get("kind", P.KIND_CELL)
            if kind == P.KIND_CELL:
                recover.restore_before_cell(self, spec, log.emit)  # --retry, auto_restore
                state, error, extra = self.run_cell(jdir, spec)
                status.update(extra)
            elif kind == P.KIND_STORE:
                status.update(self.store_names(spec))
            elif kind == P.KIND_RESTORE:
                status.update(self.restore_names(spec))
            elif kind == P.KIND_CHECKPOINT:
                status.update(self.checkpoint(int(spec.get("limit") or 0), spec["id"], report=True))
            elif kind == P.KIND_RESTORE_CHECKPOINT:
                status.update(self.restore_checkpoint())
            else:
                raise ValueError(f"unknown job kind {kind!r}")
        except BaseException as exc:  # a broken input or a full disk: report it, keep serving
            state = P.ERROR
            error = {"ename": type(exc).__name__, "evalue": str(exc), "traceback": []}
            log.emit({"type": "error", **error})
        finally:
            self.capture.stop()
            for s in self.router.streams:
                s.flush()
        if self.spot_job == job_id and self.spot and spec.get("kind", P.KIND_CELL) == P.KIND_CELL:
            state, error = P.INTERRUPTED, {"ename": "SpotInterruption", "evalue": self.spot["message"], "traceback": []}
        stopping = files.read_json(os.path.join(self.sdir, STOPPING))
        if stopping and state != P.DONE:  # interrupted because the session is being stopped
            state = str(stopping.get("state") or P.FAILED)
            error = {"ename": str(stopping.get("ename") or "SessionStopped"), "evalue": str(stopping.get("reason")),
                     "traceback": []}
            log.emit({"type": "error", **error})
        if log.failed:
            state = P.ERROR
            error = {"ename": "OSError", "evalue": f"writing output failed: {log.failed}", "traceback": []}
            files.remove(os.path.join(self.sdir, "reserve"))  # room for this error and the final status
            log.failed = None
            log.emit({"type": "error", **error})
        status.update({"state": state, "finished": time.time()})
        if error:
            status["error"] = error
        # the whole final status rides in the log's last event, and the log is fsynced (close)
        # before status.json appears: the one fsync a cell's answer waits for
        log.emit({"type": "status", "state": state, "status": status})
        self.router.log = None
        log.close()
        self.write_status(jdir, status)
        try:
            os.unlink(os.path.join(self.sdir, "current"))
        except OSError:
            pass
        self.job_id = None
        self.fresh = False
        try:  # its mtime is when the worker was last busy (%ec2 sessions shows the idle time)
            os.utime(os.path.join(self.sdir, "worker.json"))
        except OSError:
            pass
        limit = spec.get("checkpoint_limit") or 0
        held = os.path.exists(os.path.join(self.sdir, "checkpoint.hold"))  # a dead worker's, not restored yet
        if self.spot is not None and not self.spot_saved:
            self.spot_checkpoint(job_id)  # replaces the size-limited one below
        elif stopping:
            pass  # its namespace is being dropped on purpose
        elif (spec.get("kind", P.KIND_CELL) == P.KIND_CELL and limit > 0 and not held
              and state in (P.DONE, P.ERROR, P.INTERRUPTED, P.TIMEOUT)):
            if not self.checkpoint_unchanged(int(limit)):
                self.checkpoints.request(int(limit), job_id)  # forked: the next job does not wait for it
        self.make_reserve()

    def install_modules(self, modules: dict[str, str]) -> None:
        """Write the local modules the cell imports into ``sessions/<s>/modules`` (first on
        sys.path); a module whose source changed is imported afresh by the cell."""
        mdir = files.private_dir(os.path.join(self.sdir, "modules"))
        if mdir not in sys.path:
            sys.path.insert(0, mdir)
        for rel, text in modules.items():
            parts = rel.replace("\\", "/").split("/")
            if any(p in ("", ".", "..") for p in parts) or not rel.endswith(".py"):
                raise ValueError(f"refusing module path {rel!r}")
            path = os.path.join(mdir, *parts)
            data = text.encode("utf-8")
            try:
                with open(path, "rb") as f:
                    if f.read() == data:
                        continue
            except FileNotFoundError:
                pass
            files.private_dir(os.path.dirname(path))
            files.atomic_write(path, [data])
            # a same-size rewrite within the same second would pass the .pyc's mtime+size check
            shutil.rmtree(os.path.join(os.path.dirname(path), "__pycache__"), ignore_errors=True)
            top = parts[0][:-3] if len(parts) == 1 else parts[0]
            for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
                del sys.modules[name]  # changed: the cell's import loads the new source
            importlib.invalidate_caches()

    def run_cell(self, jdir: str, spec: dict[str, Any]) -> tuple[str, dict | None, dict]:
        ns = self.shell.user_ns
        if spec.get("modules"):
            self.install_modules(spec["modules"])
        replaced: list[Any] = []
        for name, digest in (spec.get("inputs") or {}).items():
            path = os.path.join(self.root, "objects", digest)
            value = files.load_object(path)
            if name in ns:
                replaced.append(ns[name])
            ns[name] = value
            del value  # the namespace holds it now, and only it (a cell may drop it)
            try:
                os.utime(path)  # most recently used
            except OSError:
                pass
        self.releaser.release(replaced)  # what the inputs replaced is freed beside the cell
        del replaced
        timeout = spec.get("timeout")
        self.timed_out = False
        if timeout:
            self._timer_job = spec["id"]
            threading.Thread(target=self._timeout, args=(float(timeout), spec["id"]), daemon=True).start()
        if self.interrupt_pending:  # cancelled between being claimed and starting
            self.router.emit({"type": "error", "ename": "KeyboardInterrupt", "evalue": "cancelled before it started",
                              "traceback": []})
            return P.INTERRUPTED, {"ename": "KeyboardInterrupt", "evalue": "cancelled before it started"}, {}
        restore = cellshell.prepare(self.shell, spec, jdir, self.router.emit)  # cell number, colours, stdin
        self.in_user_code = True
        try:
            result = self.shell.run_cell(spec.get("code", ""), store_history=True)
        except KeyboardInterrupt:  # arrived between user code and IPython's own handler
            result = None
        finally:
            self.in_user_code = False
            self._timer_job = None
            restore()
        err = None if result is None else (result.error_in_exec or result.error_before_exec)
        state = P.DONE
        error = None
        if result is None or err is not None:
            ename = type(err).__name__ if err is not None else "KeyboardInterrupt"
            state = P.TIMEOUT if self.timed_out else (P.INTERRUPTED if ename == "KeyboardInterrupt" else P.ERROR)
            error = {"ename": ename, "evalue": str(err) if err is not None else ""}
            if err is not None:
                error["emodule"] = type(err).__module__
            if self.timed_out:
                error["evalue"] = f"job exceeded its timeout of {timeout} s"
        extra = self.save_outputs(jdir, spec.get("outputs") or [])
        return state, error, extra

    def _timeout(self, seconds: float, job_id: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if self._timer_job != job_id:
                return
        while self._timer_job == job_id:
            self.timed_out = True
            self.router.emit({"type": "stream", "name": "stderr",
                              "text": f"\n[remotemagic] timeout of {seconds:g} s reached: interrupting\n"})
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(TIMEOUT_GRACE)

    # -- spot reclaim ---------------------------------------------------------------------
    def on_spot_notice(self, notice: dict[str, Any]) -> None:
        """The spot watcher's callback (its thread, once): interrupt the job, then checkpoint.

        The namespace is not thread-safe, so this thread never touches it. It records the
        notice (``self.spot``; ``spot_notice.json`` with ``checkpoint: null`` until the
        checkpoint is taken), tells the running job's log, marks that job (``self.spot_job``:
        ``run_job`` ends it as ``interrupted`` / ``SpotInterruption``) and sends it SIGINT like
        ``_timeout`` does (again every ``SPOT_GRACE`` s while it is still in user code).

        The main thread takes the checkpoint in ``spot_checkpoint`` as soon as it is free: at
        the end of the running job, before it starts any other job, or -- when idle -- on the
        ``spot`` line this thread writes to the FIFO to wake it.
        """
        action, when = str(notice.get("action", "unknown")), str(notice.get("time", "unknown"))
        job = self.job_id
        record = {"action": action, "time": when, "received": time.time(), "job": job,
                  "message": f"interrupted: spot reclaim ({action} at {when})", "checkpoint": None}
        self.spot, self.spot_job = record, job  # from here on the main thread may checkpoint
        self.router.emit({"type": "stream", "name": "stderr",
                          "text": f"[remotemagic] spot instance reclaim notice: {action} at {when}; "
                                  "checkpointing the session\n"})
        self.router.emit({"type": "spot_notice", "action": action, "time": when})
        with self.spot_lock:
            if not self.spot_saved:  # else the main thread writes the complete record
                self._write_spot_notice(record)
        try:
            files.write_fifo(os.path.join(self.sdir, "in.fifo"), b"spot\n")
        except OSError as exc:
            diagnose(f"cannot wake the worker for the spot checkpoint: {exc}")
        while job is not None and self.job_id == job:
            if self.in_user_code:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(SPOT_GRACE)
            else:
                time.sleep(0.02)

    def spot_checkpoint(self, job_id: str | None) -> None:
        """Main thread: after a spot notice, checkpoint every value (no size limit), once, and
        complete ``spot_notice.json`` with the checkpoint's time and names (or its error)."""
        if self.spot is None or self.spot_saved:
            return
        self.spot_saved = True
        record = dict(self.spot)
        try:
            index = self.checkpoint(0, job_id or "spot", report=False)["checkpoint"]
            record["checkpoint"] = {"time": index["time"], "after_job": index["after_job"],
                                    "names": sorted(index["saved"]), "skipped": index["skipped"]}
        except Exception as exc:
            record["checkpoint_error"] = f"{type(exc).__name__}: {exc}"
            diagnose(f"spot checkpoint failed: {record['checkpoint_error']}")
        with self.spot_lock:
            self._write_spot_notice(record)

    def _write_spot_notice(self, record: dict[str, Any]) -> None:
        try:
            files.write_json(os.path.join(self.sdir, "spot_notice.json"), record)
        except OSError as exc:
            diagnose(f"cannot write spot_notice.json: {exc}")

    def save_outputs(self, jdir: str, names: list[str]) -> dict[str, Any]:
        ns = self.shell.user_ns
        outputs: dict[str, Any] = {}
        missing: list[str] = []
        failed: dict[str, str] = {}
        if names:
            files.private_dir(os.path.join(jdir, "outputs"))
        for name in names:
            if name not in ns:
                missing.append(name)
                continue
            try:
                enc = files.encode(ns[name])
            except Exception as exc:
                failed[name] = f"could not be pickled on the target ({type(exc).__name__}: {exc})"
                continue
            try:
                # the "output" event lets a client that follows the job start streaming the
                # file while it is still being written (the agent follows ``<name>.obj.part``)
                announce = functools.partial(self.router.emit, {"type": "output", "name": name, "size": enc.size})
                files.write_object(os.path.join(jdir, "outputs", name + ".obj"), enc, on_open=announce)
                outputs[name] = {"size": enc.size, "type": files.type_name(ns[name])}
            except Exception as exc:
                failed[name] = f"could not be saved on the target ({type(exc).__name__}: {exc})"
        return {"outputs": outputs, "missing": missing, "unpicklable": failed}

    # -- store <-> namespace ----------------------------------------------------------------
    def store_names(self, spec: dict[str, Any]) -> dict[str, Any]:
        ns = self.shell.user_ns
        sdir = files.private_dir(os.path.join(self.root, "store"))
        stored, missing = {}, []
        for name in spec.get("names", []):
            if name not in ns:
                missing.append(name)
                continue
            value = ns[name]
            enc = files.encode(value)
            meta = {"name": name, "type": files.type_name(value), "size": enc.size,
                    "preview": files.preview(value), "stored": time.time(), "by": f"session {self.session}"}
            files.write_object(os.path.join(sdir, name + ".obj"), enc)
            files.write_json(os.path.join(sdir, name + ".json"), meta)
            stored[name] = meta
            self.router.emit({"type": "stream", "name": "stdout", "text": f"Stored '{name}' ({meta['type']})\n"})
        return {"stored": stored, "missing": missing}

    def restore_names(self, spec: dict[str, Any]) -> dict[str, Any]:
        ns = self.shell.user_ns
        sdir = os.path.join(self.root, "store")
        restored, missing = [], []
        for name in spec.get("names", []):
            path = os.path.join(sdir, name + ".obj")
            if not os.path.exists(path):
                missing.append(name)
                continue
            ns[name] = files.load_object(path)
            restored.append(name)
        return {"restored": restored, "missing": missing}

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_items(self) -> Any:
        """The (name, value) pairs a checkpoint saves: user variables, not modules or IPython's own."""
        shell = self.shell
        hidden = set(shell.user_ns_hidden)
        for name, value in list(shell.user_ns.items()):
            if name.startswith("_") or name in hidden or name in SKIP_NAMES or type(value).__name__ == "module":
                continue
            yield name, value

    def checkpoint_unchanged(self, limit: int) -> bool:
        """True when a checkpoint now would leave the current one as it is (no child is forked):
        see :func:`.checkpoint.unchanged`. Never while a writer runs or waits: its commit would
        change the current one."""
        if not self.checkpoints.idle():
            return False
        return checkpoints.unchanged(self.sdir, list(self.checkpoint_items()), limit, os.getpid())

    def _wake_for_checkpoint(self) -> None:
        """The checkpoint reaper's thread: have the main thread start the pending checkpoint
        once it is between jobs (a line on our own FIFO, like the spot watcher's)."""
        try:
            files.write_fifo(os.path.join(self.sdir, "in.fifo"), b"checkpoint\n")
        except OSError as exc:
            diagnose(f"cannot start the pending checkpoint: {exc}")

    def checkpoint(self, limit: int, job_id: str, report: bool = False) -> dict[str, Any]:
        """Now, in this process: pickle every user variable whose pickle is at most ``limit``
        bytes (0: no limit) into ``checkpoint.new/``, then swap it in for ``checkpoint/``
        (never half a checkpoint). A background checkpoint still running is dropped first:
        this one is newer."""
        self.checkpoints.cancel()
        index = checkpoints.save(self.sdir, self.checkpoint_items(), limit, job_id, worker=os.getpid())
        if index.get("kept"):  # every value skipped: the previous checkpoint stays
            if report:
                skipped = index["skipped_now"]
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(index["time"]))
                self.router.emit({"type": "stream", "name": "stderr", "text":
                                  f"Nothing checkpointed ({len(skipped)} value(s) skipped); kept the checkpoint of "
                                  f"{when} ({len(index['saved'])} value(s): "
                                  f"{', '.join(sorted(index['saved'])[:8])})\n"})
                for name, why in sorted(skipped.items()):
                    self.router.emit({"type": "stream", "name": "stderr", "text": f"  skipped {name}: {why}\n"})
            return {"checkpoint": {k: v for k, v in index.items() if k != "skipped_now"}, "kept": True}
        saved, skipped = index["saved"], index["skipped"]
        if report:
            names = ", ".join(sorted(saved)) or "nothing"
            self.router.emit({"type": "stream", "name": "stdout",
                              "text": f"Checkpointed {len(saved)} value(s): {names}\n"})
            for name, why in sorted(skipped.items()):
                self.router.emit({"type": "stream", "name": "stderr", "text": f"  skipped {name}: {why}\n"})
        return {"checkpoint": index}

    def restore_checkpoint(self, report: bool = True) -> dict[str, Any]:
        self.checkpoints.cancel()
        checkpoints.recover(self.sdir)
        for folder in ("checkpoint", "checkpoint.old"):
            path = os.path.join(self.sdir, folder)
            index = files.read_json(os.path.join(path, "index.json"))
            if index:
                break
        else:
            raise FileNotFoundError(f"session '{self.session}' has no checkpoint")
        restored = []
        for name in index["saved"]:
            self.shell.user_ns[name] = files.load_object(os.path.join(path, name + ".obj"))
            restored.append(name)
        files.remove(os.path.join(self.sdir, "checkpoint.hold"))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(index["time"]))
        if report:
            self.router.emit({"type": "stream", "name": "stdout",
                              "text": f"Restored {len(restored)} value(s) from the checkpoint of {when}: "
                                      f"{', '.join(sorted(restored))}\n"})
        return {"restored": restored, "checkpoint": index}


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    root, session, cwd = args[:3]
    idle_hours = float(args[3]) if len(args) > 3 else 0.0
    os.umask(0o077)
    P.check_name("session", session)
    sdir = os.path.join(root, "sessions", session)
    lock = open(os.path.join(sdir, "lock"), "a+")  # held for the life of the process (and its fork)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another worker serves this session
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        supervise(root, session, child)
        return
    os.chdir(cwd if os.path.isdir(cwd) else os.path.expanduser("~"))
    sys.path.insert(0, "")
    os.environ.pop("PYTHONPATH", None)
    Worker(root, session, idle_hours).serve()


if __name__ == "__main__":
    main()
