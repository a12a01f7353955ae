"""The per-session worker: ``python -m remotemagic_agent.worker ROOT SESSION CWD``.

Started detached by the agent (own session and process group, so it outlives the SSH link and
the local kernel). The process forks once:

* the **supervisor** (parent) holds the session lock, waits for the worker and, if the worker
  dies (SIGKILL, out of memory, a crash in C code), marks its jobs failed with the cause and
  leaves ``died.json`` so the next job is told that the namespace was lost;
* the **worker** (child) holds the session namespace in a headless IPython shell and runs the
  jobs named on its FIFO one after another. Every output -- stream text, display data, execute
  results, errors -- is appended to the job's ``events.jsonl`` before anything else sees it.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import importlib
import io
import json
import os
import select
import signal
import sys
import threading
import time
from typing import Any

from . import cellshell, files, recover, spot
from . import checkpoint as checkpoints
from .fdcapture import FdCapture

RESERVE_BYTES = 1024 * 1024  # freed when the disk is full, so a final status can still be written
SKIP_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
FLUSH_INTERVAL = 0.05
FLUSH_BYTES = 64 * 1024
TIMEOUT_GRACE = 30.0
SPOT_GRACE = 10.0  # a spot reclaim leaves ~2 minutes: interrupt again this often
STOPPING = "stopping.json"  # in the session folder while the agent stops its worker (restart, cancel --kill)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


class EventLog:
    """Append-only JSON-lines log of one job. Lines are written whole with one ``write``."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.lock = threading.Lock()
        self.failed: str | None = None

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("time", time.time())
        line = (json.dumps(event, default=_jsonable, separators=(",", ":")) + "\n").encode()
        with self.lock:
            if self.fd < 0:
                return
            try:
                view = memoryview(line)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self.size += len(line)
            except OSError as exc:  # disk full: drop the partial line, keep running, report at the end
                self.failed = self.failed or f"{type(exc).__name__}: {exc}"
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    pass

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                try:
                    os.fsync(self.fd)
                except OSError:
                    pass
                os.close(self.fd)
                self.fd = -1


class Router:
    """Where events go right now: the running job's log, else nowhere (worker.log via fd 2)."""

    def __init__(self) -> None:
        self.log: EventLog | None = None
        self.streams: list[EventStream] = []

    def emit(self, event: dict[str, Any]) -> None:
        for s in self.streams:
            s.flush()
        if self.log is not None:
            self.log.emit(event)


class EventStream(io.TextIOBase):
    """sys.stdout / sys.stderr of user code: text batched for up to 50 ms or 64 KiB."""

    def __init__(self, router: Router, name: str, fallback: Any):
        self.router = router
        self.name = name
        self.fallback = fallback
        self.parts: list[str] = []
        self.size = 0
        self.lock = threading.RLock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self.lock:
            self.parts.append(text)
            self.size += len(text)
            if self.size >= FLUSH_BYTES:
                self.flush()
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if not self.parts:
                return
            text = "".join(self.parts)
            self.parts.clear()
            self.size = 0
            log = self.router.log
            if log is not None:
                log.emit({"type": "stream", "name": self.name, "text": text})
            else:
                self.fallback.write(text)
                self.fallback.flush()


def make_shell(router: Router) -> Any:
    """A headless IPython shell whose outputs become Jupyter-shaped events."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            router.emit(
                {
                    "type": "update_display_data" if update else "display_data",
                    "data": data,
                    "metadata": metadata or {},
                    "transient": transient or {},
                }
            )

        def clear_output(self, wait=False):
            router.emit({"type": "clear_output", "wait": bool(wait)})

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            router.emit(
                {
                    "type": "execute_result",
                    "data": format_dict,
                    "metadata": md_dict or {},
                    "execution_count": self.prompt_count,
                }
            )

    class Shell(InteractiveShell):
        display_pub_class = Publisher
        displayhook_class = Hook

        def _showtraceback(self, etype, evalue, stb):
            name = etype.__name__ if isinstance(etype, type) else str(etype)
            router.emit(
                {
                    "type": "error",
                    "ename": name,
                    "evalue": str(evalue),
                    "emodule": getattr(etype, "__module__", None),  # the client re-raises the same type
                    "traceback": stb if isinstance(stb, list) else [stb],
                }
            )

        def _get_exc_info(self, exc_tuple=None):
            etype, value, tb = super()._get_exc_info(exc_tuple)
            return etype, value, cellshell.trim_traceback(tb)

        def show_usage_error(self, exc):  # one error event, shown once by the client
            router.emit({"type": "error", "ename": "UsageError", "evalue": str(exc),
                         "emodule": "IPython.core.error", "traceback": []})

        def enable_gui(self, gui=None):  # no event loop here; 'inline' needs none
            pass

    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    shell = Shell.instance(colors="Linux")
    shell.history_manager.enabled = False
    cellshell.setup(shell, router.emit)
    return shell


class Worker:
    def __init__(self, root: str, session: str, idle_hours: float = 0.0):
        self.root = root
        self.idle_hours = idle_hours  # exit after this long without a job (0: never); each job may change it
        self.busy_at = time.time()  # when the last job ended
        self.session = session
        self.sdir = os.path.join(root, "sessions", session)
        self.router = Router()
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
        self.shell = make_shell(self.router)
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
        spot.start(self.on_spot_notice)  # only with REMOTEMAGIC_SPOT=1
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
                        files.check_job_id(job_id)
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
                sys.__stderr__.write(f"remotemagic worker: idle checkpoint failed: {exc}\n")
        with open(os.path.join(self.sdir, "start.lock"), "a+") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)  # no job is being handed to us meanwhile
            if select.select([pipe], [], [], 0)[0]:
                self.busy_at = time.time()
                return False
            cause = f"idle for {self.idle_hours:g} h, it exited to free its memory; {saved}"
            files.write_json(os.path.join(self.sdir, "died.json"), {"cause": cause, "time": time.time(), "jobs": []})
            _unlink(os.path.join(self.sdir, "worker.json"))
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
        path = os.path.join(jdir, "status.json")
        try:
            if status.get("state") == "running":  # means nothing after a machine crash: no fsync
                files.atomic_write(path, [json.dumps(status, indent=1, sort_keys=True).encode()], durable=False)
            else:
                files.write_json(path, status)
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
            sys.__stderr__.write(f"remotemagic worker: cannot write {path}: {first}; {exc}\n")

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
        spec_idle = (files.read_json(os.path.join(jdir, "spec.json"), {}) or {}).get("worker_idle_hours")
        if isinstance(spec_idle, (int, float)) and spec_idle >= 0:
            self.idle_hours = float(spec_idle)
        # "current" before "running": a cancel that sees the job running also finds it current
        files.atomic_write(os.path.join(self.sdir, "current"), [job_id.encode()], durable=False)
        spec = files.read_json(os.path.join(jdir, "spec.json"), {})
        log = EventLog(os.path.join(jdir, "events.jsonl"))
        status: dict[str, Any] = {"state": "running", "started": time.time(), "pid": os.getpid()}
        self.write_status(jdir, status)
        self.router.log = log
        log.emit({"type": "status", "state": "running"})
        state = "done"
        error: dict[str, Any] | None = None
        self.capture.start()
        try:
            kind = spec.get("kind", "cell")
            if kind == "cell":
                recover.restore_before_cell(self, spec, log.emit)  # --retry, auto_restore
                state, error, extra = self.run_cell(jdir, spec)
                status.update(extra)
            elif kind == "store":
                status.update(self.store_names(spec))
            elif kind == "restore":
                status.update(self.restore_names(spec))
            elif kind == "checkpoint":
                status.update(self.checkpoint(int(spec.get("limit") or 0), spec["id"], report=True))
            elif kind == "restore_checkpoint":
                status.update(self.restore_checkpoint())
            else:
                raise ValueError(f"unknown job kind {kind!r}")
        except BaseException as exc:  # a broken input or a full disk: report it, keep serving
            state = "error"
            error = {"ename": type(exc).__name__, "evalue": str(exc), "traceback": []}
            log.emit({"type": "error", **error})
        finally:
            self.capture.stop()
            for s in self.router.streams:
                s.flush()
        if self.spot_job == job_id and self.spot and spec.get("kind", "cell") == "cell":
            state, error = "interrupted", {"ename": "SpotInterruption", "evalue": self.spot["message"], "traceback": []}
        stopping = files.read_json(os.path.join(self.sdir, STOPPING))
        if stopping and state != "done":  # interrupted because the session is being stopped
            state = str(stopping.get("state") or "failed")
            error = {"ename": str(stopping.get("ename") or "SessionStopped"), "evalue": str(stopping.get("reason")),
                     "traceback": []}
            log.emit({"type": "error", **error})
        if log.failed:
            state = "error"
            error = {"ename": "OSError", "evalue": f"writing output failed: {log.failed}", "traceback": []}
            _unlink(os.path.join(self.sdir, "reserve"))  # room for this error and the final status
            log.failed = None
            log.emit({"type": "error", **error})
        status.update({"state": state, "finished": time.time()})
        if error:
            status["error"] = error
        log.emit({"type": "status", "state": state})
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
        elif spec.get("kind", "cell") == "cell" and limit > 0 and not held and state in ("done", "error", "interrupted", "timeout"):
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
            _rmtree(os.path.join(os.path.dirname(path), "__pycache__"))
            top = parts[0][:-3] if len(parts) == 1 else parts[0]
            for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
                del sys.modules[name]  # changed: the cell's import loads the new source
            importlib.invalidate_caches()

    def run_cell(self, jdir: str, spec: dict[str, Any]) -> tuple[str, dict | None, dict]:
        ns = self.shell.user_ns
        if spec.get("modules"):
            self.install_modules(spec["modules"])
        for name, digest in (spec.get("inputs") or {}).items():
            path = os.path.join(self.root, "objects", digest)
            ns[name] = files.load_object(path)
            try:
                os.utime(path)  # most recently used
            except OSError:
                pass
        timeout = spec.get("timeout")
        self.timed_out = False
        if timeout:
            self._timer_job = spec["id"]
            threading.Thread(target=self._timeout, args=(float(timeout), spec["id"]), daemon=True).start()
        if self.interrupt_pending:  # cancelled between being claimed and starting
            self.router.emit({"type": "error", "ename": "KeyboardInterrupt", "evalue": "cancelled before it started",
                              "traceback": []})
            return "interrupted", {"ename": "KeyboardInterrupt", "evalue": "cancelled before it started"}, {}
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
        state = "done"
        error = None
        if result is None or err is not None:
            ename = type(err).__name__ if err is not None else "KeyboardInterrupt"
            state = "timeout" if self.timed_out else ("interrupted" if ename == "KeyboardInterrupt" else "error")
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
            self.router.emit({"type": "stream", "name": "stderr", "text": f"\n[remotemagic] timeout of {seconds:g} s reached: interrupting\n"})
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
                          "text": f"[remotemagic] spot instance reclaim notice: {action} at {when}; checkpointing the session\n"})
        self.router.emit({"type": "spot_notice", "action": action, "time": when})
        with self.spot_lock:
            if not self.spot_saved:  # else the main thread writes the complete record
                self._write_spot_notice(record)
        try:
            fd = os.open(os.path.join(self.sdir, "in.fifo"), os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, b"spot\n")
            finally:
                os.close(fd)
        except OSError as exc:
            sys.__stderr__.write(f"remotemagic worker: cannot wake the worker for the spot checkpoint: {exc}\n")
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
            sys.__stderr__.write(f"remotemagic worker: spot checkpoint failed: {record['checkpoint_error']}\n")
        with self.spot_lock:
            self._write_spot_notice(record)

    def _write_spot_notice(self, record: dict[str, Any]) -> None:
        try:
            files.write_json(os.path.join(self.sdir, "spot_notice.json"), record)
        except OSError as exc:
            sys.__stderr__.write(f"remotemagic worker: cannot write spot_notice.json: {exc}\n")

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

    def _wake_for_checkpoint(self) -> None:
        """The checkpoint reaper's thread: have the main thread start the pending checkpoint
        once it is between jobs (a line on our own FIFO, like the spot watcher's)."""
        try:
            fd = os.open(os.path.join(self.sdir, "in.fifo"), os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, b"checkpoint\n")
            finally:
                os.close(fd)
        except OSError as exc:
            sys.__stderr__.write(f"remotemagic worker: cannot start the pending checkpoint: {exc}\n")

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
                                  f"{when} ({len(index['saved'])} value(s): {', '.join(sorted(index['saved'])[:8])})\n"})
                for name, why in sorted(skipped.items()):
                    self.router.emit({"type": "stream", "name": "stderr", "text": f"  skipped {name}: {why}\n"})
            return {"checkpoint": {k: v for k, v in index.items() if k != "skipped_now"}, "kept": True}
        saved, skipped = index["saved"], index["skipped"]
        if report:
            names = ", ".join(sorted(saved)) or "nothing"
            self.router.emit({"type": "stream", "name": "stdout", "text": f"Checkpointed {len(saved)} value(s): {names}\n"})
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
        _unlink(os.path.join(self.sdir, "checkpoint.hold"))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(index["time"]))
        if report:
            self.router.emit({"type": "stream", "name": "stdout",
                              "text": f"Restored {len(restored)} value(s) from the checkpoint of {when}: "
                                      f"{', '.join(sorted(restored))}\n"})
        return {"restored": restored, "checkpoint": index}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def note_job(jdir: str, text: str, level: str = "warning") -> None:
    """Write a user notice into a job's log (the client renders it like output)."""
    log = EventLog(os.path.join(jdir, "events.jsonl"))
    try:
        log.emit({"type": "notice", "level": level, "text": text})
    finally:
        log.close()


def mark_orphans(root: str, session: str, cause: str, pid: int | None = None,
                 job_ids: list[str] | None = None, state: str = "failed", ename: str = "WorkerDied",
                 details: dict[str, Any] | None = None) -> list[str]:
    """Fail the unfinished jobs of ``session`` that were handed to worker ``pid`` (or the
    ``job_ids`` given) with ``cause``; return their ids. A job handed to another worker, or to
    none yet, is left alone: a live worker will run it."""
    jroot = os.path.join(root, "jobs")
    marked = []
    if job_ids is None:
        try:
            job_ids = sorted(os.listdir(jroot))
        except FileNotFoundError:
            return marked
    for job_id in job_ids:
        jdir = os.path.join(jroot, job_id)
        status = files.read_json(os.path.join(jdir, "status.json"), {})
        if status.get("state") in files.TERMINAL or not status:
            continue
        spec = files.read_json(os.path.join(jdir, "spec.json"), {})
        if spec.get("session") != session:
            continue
        if pid is not None:
            try:
                with open(os.path.join(jdir, "handed")) as f:
                    if int(f.read().strip() or 0) != pid:
                        continue
            except (FileNotFoundError, ValueError):
                continue
            if os.path.exists(os.path.join(jdir, "queued")):
                # handed over but never started (lost in the dead worker's FIFO): release it,
                # the agent hands it to the next worker
                _unlink(os.path.join(jdir, "handed"))
                continue
        _unlink(os.path.join(jdir, "queued"))
        error = {"ename": ename, "evalue": cause, "traceback": [], **(details or {})}
        log = EventLog(os.path.join(jdir, "events.jsonl"))
        log.emit({"type": "error", **error})
        log.emit({"type": "status", "state": state})
        log.close()
        status.update({"state": state, "finished": time.time(), "error": error})
        files.write_json(os.path.join(jdir, "status.json"), status)
        marked.append(job_id)
    return marked


def describe_exit(status: int, memory: dict[str, int] | None = None) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        hint = " -- killed, possibly by the out-of-memory killer" if sig == signal.SIGKILL else ""
        if sig == signal.SIGKILL and memory and memory.get("peak_rss"):
            hint += f"; it had reached {recover.size(memory['peak_rss'])} of memory"
            if memory.get("mem_total"):
                hint += f" (the machine has {recover.size(memory['mem_total'])})"
        return f"worker died, signal {sig} ({name}){hint}"
    return f"worker exited with status {os.WEXITSTATUS(status)}"


def supervise(root: str, session: str, child: int) -> None:
    sdir = os.path.join(root, "sessions", session)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def forward(signum: int, frame: Any) -> None:
        try:
            os.kill(child, signum)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 0
            break
    clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    with open(os.path.join(sdir, "start.lock"), "a+") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)  # no job is being handed to our worker meanwhile
        for name in ("worker.json", "current"):
            _unlink(os.path.join(sdir, name))
        stopping = files.read_json(os.path.join(sdir, STOPPING))
        if not clean and stopping:  # the agent is stopping us (restart, cancel --kill): it says why
            mark_orphans(root, session, str(stopping.get("reason")), pid=child,
                         state=str(stopping.get("state") or "failed"), ename=str(stopping.get("ename") or "SessionStopped"))
        elif not clean:
            memory = recover.memory_report()  # the peak of the worker (our only child) and the machine's
            cause = describe_exit(status, memory)
            details = {**memory, "signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {}
            jobs = mark_orphans(root, session, cause, pid=child, details=details)
            files.write_json(os.path.join(sdir, "died.json"), {"cause": cause, "time": time.time(), "jobs": jobs})


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    root, session, cwd = args[:3]
    idle_hours = float(args[3]) if len(args) > 3 else 0.0
    os.umask(0o077)
    files.check_name("session", session)
    sdir = os.path.join(root, "sessions", session)
    lock = open(os.path.join(sdir, "lock"), "a+")
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
