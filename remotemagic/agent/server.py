"""The agent: ``python -m remotemagic_agent.server ROOT``, speaking frames on stdin/stdout.

One agent runs per connection (a pipe to a local subprocess, or one SSH exec channel). It is
stateless beyond that connection: everything it knows is on disk under ROOT, so a new agent
after a dropped link picks up exactly where the last one was. Workers are separate detached
processes and outlive it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

from . import PROTOCOL, checkpoint, files, services, transfer, wire
from .worker import STOPPING, mark_orphans, note_job

DATA = 1024 * 1024
PIPE_SIZE = 1024 * 1024
ACTIVITY_EVERY = 30.0  # seconds between touches of <root>/activity (the idle auto-stop reads it)
WORKER_START_TIMEOUT = 120.0
STOP_GRACE = 5.0  # default seconds between interrupt, SIGTERM and SIGKILL when stopping a worker
KILL_WAIT = 10.0  # how long a SIGKILLed process group may take to go


class RequestError(Exception):
    """An error to report to the client as-is (``kind`` becomes the local exception class)."""

    def __init__(self, message: str, kind: str = "RemoteRequestError"):
        super().__init__(message)
        self.kind = kind


class Upload:
    def __init__(self, tmp: str, final: str, size: int, digest: str | None, offset: int = 0):
        self.tmp, self.final, self.size, self.digest = tmp, final, size, digest
        mode = "r+b" if offset else "wb"
        self.f = open(tmp, mode)
        if offset:
            self.f.truncate(offset)
            self.f.seek(offset)
        self.received = offset
        self.error: str | None = None

    def write(self, data: bytearray) -> None:
        if self.error:
            return
        try:
            self.f.write(data)
        except OSError as exc:  # disk full: remember, answer at the end, keep reading frames
            self.error = f"{type(exc).__name__}: {exc}"
        self.received += len(data)


class TarUpload:
    """A tar stream arriving in frames, extracted by a thread as it comes (through a pipe)."""

    def __init__(self, dest: str, size: int):
        self.dest, self.size, self.received = dest, size, 0
        r, w = os.pipe()
        self.reader = os.fdopen(r, "rb")
        self.pipe = os.fdopen(w, "wb")
        self.error: BaseException | None = None
        self.count = 0
        self.thread = threading.Thread(target=self._extract, daemon=True)
        self.thread.start()

    def _extract(self) -> None:
        try:
            self.count = transfer.extract_tar(self.reader, self.dest)
        except BaseException as exc:
            self.error = exc
        finally:
            self.reader.close()  # a writer still sending gets EPIPE instead of blocking

    def write(self, data: bytearray) -> None:
        if self.error is None:
            try:
                self.pipe.write(data)
            except (BrokenPipeError, ValueError):
                pass
        self.received += len(data)

    @property
    def f(self) -> Any:  # closed when the connection drops mid-upload
        return self.pipe

    @property
    def digest(self) -> None:
        return None

    def finish(self) -> dict[str, Any]:
        try:
            self.pipe.close()
        except BrokenPipeError:
            pass
        self.thread.join()
        if self.error is not None:
            if isinstance(self.error, OSError) and self.error.errno == 28:
                raise RequestError(f"writing into {self.dest} on the target failed: {self.error}", "RemoteDiskError")
            raise RequestError(f"extracting into {self.dest} failed: {type(self.error).__name__}: {self.error}")
        return {"files": self.count, "size": self.received, "path": self.dest}


class Agent:
    def __init__(self, root: str, out: Any):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.writer = wire.FrameWriter(out.write, out.flush)
        self.uploads: dict[int, Upload] = {}
        self.cancelled: set[int] = set()
        self.children: list[subprocess.Popen] = []
        #: why this root must not be used (another user owns or can write it), told to every client
        self.unsafe: str | None = None
        try:
            files.check_ours(self.root, "root folder", follow=True)
            for sub in ("objects", "store", "sessions", "jobs"):
                files.private_dir(os.path.join(self.root, sub))
                files.check_ours(os.path.join(self.root, sub))
        except PermissionError as exc:
            self.unsafe = str(exc)
        self.agent_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.activity_at = -ACTIVITY_EVERY

    # -- plumbing --------------------------------------------------------------------------
    def serve(self, readinto: Callable[[memoryview], int]) -> None:
        while True:
            try:
                header, payload = wire.read_frame(readinto)
            except wire.ConnectionLost:
                break
            rid = header.get("id", 0)
            op = header.get("op", "")
            self.note_activity()
            if op in ("data", "upload_begin", "upload_end"):
                try:
                    self.upload_frame(rid, op, header, payload)
                except Exception as exc:
                    self.uploads.pop(rid, None)
                    self.fail(rid, exc)
                continue
            if op == "cancel_stream":
                self.cancelled.add(int(header.get("target", -1)))
                continue
            threading.Thread(target=self.handle, args=(rid, op, header), daemon=True).start()
        for up in self.uploads.values():  # a dropped link: object temps go, file .rmpart stays
            up.f.close()
            if up.digest:
                try:
                    os.unlink(up.tmp)
                except OSError:
                    pass

    def note_activity(self) -> None:
        """A client is using this target: touch ``<root>/activity`` (at most every 30 s). An
        EC2 instance's idle auto-stop counts idle time from it, not from open connections."""
        now = time.monotonic()
        if now - self.activity_at < ACTIVITY_EVERY:
            return
        self.activity_at = now
        path = self.path("activity")
        try:
            os.utime(path)
        except FileNotFoundError:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                pass
        except OSError:
            pass

    def handle(self, rid: int, op: str, req: dict[str, Any]) -> None:
        method = getattr(self, "op_" + op, None)
        try:
            if method is None:
                raise RequestError(f"unknown request {op!r} (agent protocol {PROTOCOL})")
            if self.unsafe:
                raise RequestError(self.unsafe, "UnsafeRoot")
            result = method(rid, req)
            payload = b""
            if isinstance(result, tuple):
                result, payload = result
            self.writer.send({"id": rid, "ok": True, "result": result}, payload)
        except Exception as exc:
            self.fail(rid, exc)
        finally:
            self.cancelled.discard(rid)

    def fail(self, rid: int, exc: BaseException) -> None:
        kind = getattr(exc, "kind", type(exc).__name__)
        # an OSError names its file and says what is wrong (permission, not a folder...): no traceback
        detail = "" if isinstance(exc, (RequestError, ValueError, KeyError, OSError)) else traceback.format_exc()
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        self.writer.send({"id": rid, "ok": False, "error": {"type": kind, "message": message, "detail": detail}})

    def more(self, rid: int, header: dict[str, Any], payload: bytes | memoryview = b"",
             packer: wire.Packer | None = None) -> None:
        if packer is not None and payload:
            payload, z = packer.pack(payload)
            if z:
                header = {**header, "z": z}
        self.writer.send({"id": rid, "more": True, **header}, payload)

    @staticmethod
    def packer(req: dict[str, Any]) -> wire.Packer | None:
        z = req.get("z")
        return wire.Packer(z) if z in wire.codecs_available() else None

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # -- uploads (handled in the reader thread, in order) -------------------------------------
    def upload_frame(self, rid: int, op: str, header: dict[str, Any], payload: bytearray) -> None:
        if op == "upload_begin":
            if header.get("kind") == "object":
                digest = header["hash"]
                if not all(c in "0123456789abcdef" for c in digest) or not 32 <= len(digest) <= 64:
                    raise RequestError(f"invalid object hash {digest!r}")
                final = self.path("objects", digest)
                tmp = self.path("objects", f".tmp-{os.getpid()}-{rid}")
                self.uploads[rid] = Upload(tmp, final, int(header["size"]), digest)
            elif header.get("kind") == "tar":
                self.uploads[rid] = TarUpload(self.user_path(header["dest"], header.get("cwd")), int(header["size"]))
            else:
                final = self.user_path(header["dest"], header.get("cwd"))
                files.private_dir(os.path.dirname(final))  # creates only what is missing
                tmp = final + ".rmpart"
                offset = int(header.get("offset", 0))
                if offset and (not os.path.exists(tmp) or os.path.getsize(tmp) < offset):
                    raise RequestError(f"cannot resume {final}: partial file is missing or shorter")
                up = Upload(tmp, final, int(header["size"]), None, offset)
                up.mode = header.get("mode")  # type: ignore[attr-defined]
                up.mtime = header.get("mtime")  # type: ignore[attr-defined]
                self.uploads[rid] = up
        elif op == "data":
            up = self.uploads.get(rid)
            if up is not None:
                up.write(wire.unpack(payload, header["z"]) if header.get("z") else payload)
        else:
            up = self.uploads.pop(rid, None)
            if up is None:
                raise RequestError("upload_end without upload_begin")
            threading.Thread(target=self.finish_upload, args=(rid, up), daemon=True).start()

    def finish_upload(self, rid: int, up: Any) -> None:
        if isinstance(up, TarUpload):
            try:
                self.writer.send({"id": rid, "ok": True, "result": up.finish()})
            except Exception as exc:
                self.fail(rid, exc)
            return
        try:
            try:
                up.f.flush()
                os.fsync(up.f.fileno())
            except OSError as exc:
                up.error = up.error or f"{type(exc).__name__}: {exc}"
            up.f.close()
            if up.error:
                if up.digest:
                    os.unlink(up.tmp)
                raise RequestError(f"writing {up.final} on the target failed: {up.error}", "RemoteDiskError")
            if up.received != up.size:
                raise RequestError(f"upload of {up.final} incomplete: {up.received} of {up.size} bytes")
            mode = getattr(up, "mode", None)
            if mode is not None:
                os.chmod(up.tmp, int(mode) & 0o777)
            mtime = getattr(up, "mtime", None)
            if mtime is not None:
                os.utime(up.tmp, (mtime, mtime))
            os.replace(up.tmp, up.final)
            files.fsync_dir(os.path.dirname(up.final))
            self.writer.send({"id": rid, "ok": True, "result": {"size": up.received, "path": up.final}})
        except Exception as exc:
            self.fail(rid, exc)

    # -- basics ----------------------------------------------------------------------------
    def op_hello(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        from importlib import metadata

        import cloudpickle

        try:  # the version only: importing IPython here would cost ~0.2 s per connect
            ipy = metadata.version("ipython")
        except metadata.PackageNotFoundError:
            ipy = None
        return {
            "protocol": PROTOCOL,
            "python": platform.python_version(),
            "executable": sys.executable,
            "cloudpickle": cloudpickle.__version__,
            "ipython": ipy,
            "root": self.root,
            "home": os.path.expanduser("~"),
            "pid": os.getpid(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "codecs": wire.codecs_available(),
        }

    def op_ping(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"time": time.time()}

    # -- values ------------------------------------------------------------------------------
    def op_has_objects(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        missing = []
        for digest in req.get("hashes", []):
            path = self.path("objects", digest)
            if os.path.exists(path):
                os.utime(path)
            else:
                missing.append(digest)
        return {"missing": missing}

    def op_evict_objects(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """Drop least recently used objects until the cache is under ``limit`` bytes."""
        limit = int(req["limit"])
        odir = self.path("objects")
        entries = []
        for name in os.listdir(odir):
            if name.startswith("."):
                continue
            st = os.stat(os.path.join(odir, name))
            entries.append((st.st_mtime, st.st_size, name))
        entries.sort()
        total = sum(e[1] for e in entries)
        removed = 0
        keep = set(req.get("keep", []))
        for _, size, name in entries:
            if total <= limit:
                break
            if name in keep:
                continue
            os.unlink(os.path.join(odir, name))
            total -= size
            removed += 1
        return {"removed": removed, "total": total}

    # -- sessions and workers -----------------------------------------------------------------
    def session_dir(self, session: str) -> str:
        sdir = files.private_dir(self.path("sessions", files.check_name("session", session)))
        try:  # its fifo takes job ids and its checkpoint is unpickled: nobody else may write there
            files.check_ours(sdir, "session folder")
        except PermissionError as exc:
            raise RequestError(str(exc), "UnsafeRoot") from None
        return sdir

    @staticmethod
    def worker_alive(sdir: str) -> bool:
        try:
            with open(os.path.join(sdir, "lock"), "a+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return True
                return False
        except OSError:
            return False

    def start_worker(self, session: str, sdir: str, cwd: str, idle_hours: Any = None,
                     restoring: bool = False) -> str | None:
        """Start the session's worker (caller holds ``start.lock``); return a notice, if any.

        ``restoring``: the job that starts it restores the checkpoint itself (``--retry``,
        ``auto_restore``) and says so; no notice here then, unless there is nothing to restore."""
        if not os.path.isdir(cwd):
            raise RequestError(f"the working folder {cwd} does not exist on the target (or is not a folder): "
                               "create it, or choose another with %ec2 use ... --workdir", "WorkdirError")
        notice = None
        died = files.read_json(os.path.join(sdir, "died.json"))
        if not died and os.path.exists(os.path.join(sdir, "worker.json")):
            # a worker and its supervisor that went without a word: the machine stopped or rebooted
            # (an instance stop/start, a spot reclaim) or both were killed
            died = {"cause": "it went away with its supervisor -- the machine was restarted or both were killed",
                    "time": time.time(), "jobs": []}
            files.write_json(os.path.join(sdir, "died.json"), died)
        if died:
            notice = (
                f"the previous worker of session '{session}' stopped ({died.get('cause')}); "
                "its namespace was lost -- this job starts in a fresh one"
            )
            checkpoint.recover(sdir)  # a writer killed between its renames
            index = files.read_json(os.path.join(sdir, "checkpoint", "index.json"))
            if index and index.get("saved"):
                # keep that checkpoint: no automatic checkpoint until it is restored or replaced
                files.atomic_write(os.path.join(sdir, "checkpoint.hold"), [b""])
                when = time.strftime("%H:%M:%S", time.localtime(index["time"]))
                notice += (f". A checkpoint from {when} holds {len(index['saved'])} value(s) "
                           f"({', '.join(sorted(index['saved'])[:8])}): %ec2 checkpoint --restore brings them back")
                if restoring:
                    notice = None
            os.replace(os.path.join(sdir, "died.json"), os.path.join(sdir, "died.prev.json"))
        _unlink(os.path.join(sdir, STOPPING))  # a stop that was cut short: not about this worker
        fifo = os.path.join(sdir, "in.fifo")
        if not os.path.exists(fifo):
            os.mkfifo(fifo, 0o600)
        try:
            os.unlink(os.path.join(sdir, "worker.json"))
        except FileNotFoundError:
            pass
        env = dict(os.environ)
        env["PYTHONPATH"] = self.agent_dir
        env["PYTHONUNBUFFERED"] = "1"
        log = open(os.path.join(sdir, "worker.log"), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "remotemagic_agent.worker", self.root, session, cwd]
            + ([str(float(idle_hours))] if idle_hours is not None else []),
            cwd=self.agent_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        threading.Thread(target=proc.wait, daemon=True).start()
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not os.path.exists(os.path.join(sdir, "worker.json")):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = _tail(os.path.join(sdir, "worker.log"))
                raise RequestError(f"the worker for session '{session}' did not start:\n{tail}", "WorkerStartError")
            time.sleep(0.01)
        return notice

    def submit(self, session: str, job_id: str, cwd: str) -> str | None:
        """Hand the job to the session's worker, starting one if there is none.

        Under ``start.lock`` (which a supervisor also takes before failing its dead worker's
        jobs) the job records which worker pid it was handed to, so a worker's death fails
        exactly the jobs it had -- never one submitted around the same moment."""
        sdir = self.session_dir(session)
        handed = os.path.join(self.path("jobs", job_id), "handed")
        notice = None
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while time.monotonic() < deadline:
            with open(os.path.join(sdir, "start.lock"), "a+") as start_lock:
                fcntl.flock(start_lock, fcntl.LOCK_EX)
                alive = self.worker_alive(sdir)
                worker = files.read_json(os.path.join(sdir, "worker.json"), {}) or {}
                if not alive:
                    spec = files.read_json(os.path.join(self.path("jobs", job_id), "spec.json"), {}) or {}
                    started = self.start_worker(session, sdir, cwd, spec.get("worker_idle_hours"),
                                                restoring=bool(spec.get("attempt") or spec.get("auto_restore")))
                    if started:  # the job's own log tells it (see remotemagic.notices)
                        notice = started
                        note_job(self.path("jobs", job_id), started)
                    continue
                if worker.get("pid"):
                    files.atomic_write(handed, [str(worker["pid"]).encode()], durable=False)
                    try:
                        fd = os.open(os.path.join(sdir, "in.fifo"), os.O_WRONLY | os.O_NONBLOCK)
                    except OSError:  # no reader: that worker has just died
                        os.unlink(handed)
                    else:
                        try:
                            os.write(fd, job_id.encode() + b"\n")
                        finally:
                            os.close(fd)
                        return notice
            # a supervisor is recording its worker's death: wait for it outside the lock
            time.sleep(0.02)
        raise RequestError(f"could not hand job {job_id} to a worker of session '{session}'")

    def op_run(self, rid: int, req: dict[str, Any]) -> Any:
        spec = dict(req["spec"])
        job_id = files.check_job_id(spec["id"])
        session = files.check_name("session", spec.get("session", "default"))
        for digest in (spec.get("inputs") or {}).values():
            if not os.path.exists(self.path("objects", digest)):
                raise RequestError(f"pushed value {digest[:12]} is missing on the target", "MissingObject")
        jdir = self.path("jobs", job_id)
        os.makedirs(jdir, mode=0o700)
        spec["submitted"] = time.time()
        # not fsynced (4 fsyncs were a third of a warm cell's disk waits): until the job ends these
        # mean nothing after a machine crash, and the worker's final status write fsyncs the folder
        files.atomic_write(os.path.join(jdir, "spec.json"), [json.dumps(spec, indent=1, sort_keys=True).encode()],
                           durable=False)
        files.atomic_write(os.path.join(jdir, "status.json"), [b'{"state": "queued"}'], durable=False)
        open(os.path.join(jdir, "events.jsonl"), "ab").close()
        files.atomic_write(os.path.join(jdir, "queued"), [b""], durable=False)
        cwd = os.path.expanduser(spec.get("cwd") or "~")
        try:
            notice = self.submit(session, job_id, cwd)
        except Exception as exc:
            mark_orphans(self.root, session, f"could not start: {exc}", job_ids=[job_id])
            raise
        if not req.get("follow"):  # a background job: the client shows the notice at once
            return {"job": job_id, "state": "queued", **({"notice": notice} if notice else {})}
        return self.op_events(rid, {"job": job_id, "offset": 0, "follow": True})

    def op_events(self, rid: int, req: dict[str, Any]) -> Any:
        """Stream the job's event log from a byte offset; end with its status (and small outputs)."""
        job_id = files.check_job_id(req["job"])
        jdir = self.job_dir(job_id)
        offset = int(req.get("offset", 0))
        follow = bool(req.get("follow", True))
        log_path = os.path.join(jdir, "events.jsonl")
        packer = self.packer(req)
        nap = 0.001
        checked = active = time.monotonic()
        with open(log_path, "rb") as f:
            while rid not in self.cancelled:
                f.seek(offset)
                data = f.read(DATA)
                if data and not data.endswith(b"\n"):
                    data += f.readline()
                    cut = data.rfind(b"\n") + 1
                    data = data[:cut]
                if data:
                    self.more(rid, {"offset": offset}, data, packer)
                    offset += len(data)
                    nap = 0.001
                    active = time.monotonic()
                    continue
                status = files.read_json(os.path.join(jdir, "status.json"), {})
                if status.get("state") in files.TERMINAL:
                    f.seek(offset)
                    if b"\n" in f.read():
                        continue  # a last event landed between our read and the status
                    return self.final_status(jdir, job_id, status, offset, req.get("inline", 0))
                if not follow:
                    return {"job": job_id, "status": status, "offset": offset}
                if status.get("state") == "queued" and not os.path.exists(os.path.join(jdir, "handed")):
                    self.resubmit(jdir)  # its worker died before starting it
                if time.monotonic() - checked > 2.0:
                    checked = time.monotonic()
                    self.check_orphan(jdir, status)
                time.sleep(nap)
                # a short cell's end is seen within 2 ms; after a quiet second, polls slow to 50 ms
                nap = min(nap * 2, 0.05 if time.monotonic() - active > 1.0 else 0.002)
        return {"job": job_id, "detached": True, "offset": offset}

    def resubmit(self, jdir: str) -> None:
        spec = files.read_json(os.path.join(jdir, "spec.json"), {})
        if not spec or not os.path.exists(os.path.join(jdir, "queued")):
            return
        self.submit(spec.get("session", "default"), spec["id"], os.path.expanduser(spec.get("cwd") or "~"))

    def check_orphan(self, jdir: str, status: dict[str, Any]) -> None:
        spec = files.read_json(os.path.join(jdir, "spec.json"), {})
        sdir = self.path("sessions", spec.get("session", "default"))
        if status.get("state") == "running" and not self.worker_alive(sdir):
            mark_orphans(self.root, spec.get("session", "default"),
                         "worker died (cause unknown: its supervisor is gone too)", job_ids=[spec["id"]])

    def final_status(self, jdir: str, job_id: str, status: dict[str, Any], offset: int, inline: int) -> Any:
        """The status, with outputs smaller than ``inline`` bytes carried in the payload."""
        sizes: dict[str, int] = {}
        parts: list[bytes] = []
        budget = int(inline or 0)
        for name, meta in (status.get("outputs") or {}).items():
            if meta.get("size", 0) <= budget:
                path = os.path.join(jdir, "outputs", name + ".obj")
                with open(path, "rb") as f:
                    _check_object(f, path)
                    data = f.read()
                sizes[name] = len(data)
                parts.append(data)
                budget -= len(data)
        return {"job": job_id, "status": status, "offset": offset, "inline": sizes}, b"".join(parts)

    def job_dir(self, job_id: str) -> str:
        jdir = self.path("jobs", files.check_job_id(job_id))
        if not os.path.isdir(jdir):
            raise RequestError(f"no job {job_id} on this target", "UnknownJob")
        return jdir

    def op_status(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        jdir = self.job_dir(req["job"])
        return {
            "spec": files.read_json(os.path.join(jdir, "spec.json"), {}),
            "status": files.read_json(os.path.join(jdir, "status.json"), {}),
            "log_size": os.path.getsize(os.path.join(jdir, "events.jsonl")),
        }

    def op_jobs(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        ids = sorted(n for n in os.listdir(self.path("jobs")) if files.JOB_RE.match(n))
        limit = int(req.get("limit", 50))
        out = []
        for job_id in ids[-limit:]:
            jdir = self.path("jobs", job_id)
            spec = files.read_json(os.path.join(jdir, "spec.json"), {})
            status = files.read_json(os.path.join(jdir, "status.json"), {})
            out.append({
                "id": job_id, "session": spec.get("session"), "kind": spec.get("kind", "cell"),
                "code": spec.get("code", "")[:200], "outputs": spec.get("outputs") or [],
                "submitted": spec.get("submitted"), "state": status.get("state"),
                "started": status.get("started"), "finished": status.get("finished"),
                "origin": spec.get("origin") or {},
            })
        answer: dict[str, Any] = {"jobs": out}
        if req.get("active"):  # every queued or running job, not only among the last ``limit``
            answer["active"] = [
                job_id for job_id in ids
                if (files.read_json(self.path("jobs", job_id, "status.json"), {}) or {}).get("state") not in files.TERMINAL
            ]
        return answer

    def op_cancel(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        job_id = req["job"]
        jdir = self.job_dir(job_id)
        try:
            os.unlink(os.path.join(jdir, "queued"))
        except FileNotFoundError:
            pass
        else:  # never started: it is ours to finish
            files.write_json(os.path.join(jdir, "status.json"), {"state": "cancelled", "finished": time.time()})
            return {"state": "cancelled"}
        status = files.read_json(os.path.join(jdir, "status.json"), {})
        if status.get("state") in files.TERMINAL:
            return {"state": status["state"]}
        spec = files.read_json(os.path.join(jdir, "spec.json"), {})
        sdir = self.path("sessions", spec.get("session", "default"))
        deadline = time.monotonic() + 2.0
        while True:  # claimed by the worker a moment ago: it becomes "current" within milliseconds
            try:
                with open(os.path.join(sdir, "current")) as f:
                    current = f.read().strip()
            except FileNotFoundError:
                current = ""
            worker = files.read_json(os.path.join(sdir, "worker.json"), {})
            if current == job_id and worker.get("pid"):
                if req.get("kill"):
                    return self.kill_job(spec.get("session", "default"), sdir, job_id, req)
                os.kill(int(worker["pid"]), signal.SIGINT)
                return {"state": "interrupting"}
            status = files.read_json(os.path.join(jdir, "status.json"), {})
            if status.get("state") in files.TERMINAL or time.monotonic() > deadline:
                return {"state": status.get("state", "unknown")}
            time.sleep(0.01)

    def op_stdin(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """The user's answer to a job's ``input_request`` (see agent/stdin.py), written into the
        worker's FIFO (never to disk). Without ``answer``: only whether the worker still waits."""
        jdir = self.job_dir(req["job"])
        fifo = os.path.join(jdir, "stdin", f"{int(req['seq'])}.fifo")
        answer = req.get("answer")
        if answer is None:
            return {"waiting": os.path.exists(fifo)}
        if answer.get("error"):
            reply: dict[str, Any] = {"error": {"ename": str(answer["error"].get("ename", "EOFError")),
                                               "evalue": str(answer["error"].get("evalue", ""))}}
        else:
            reply = {"value": str(answer.get("value", ""))}
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails unless the worker waits on it
        except OSError:
            return {"waiting": False}
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        return {"waiting": True}

    def op_read_output(self, rid: int, req: dict[str, Any]) -> Any:
        """Stream a job's ``-o`` value file. With ``follow`` (and its ``size``, from the job's
        ``output`` event), stream it while the worker is still writing it."""
        jdir = self.job_dir(req["job"])
        name = _identifier(req["name"], "output")
        path = os.path.join(jdir, "outputs", name + ".obj")
        if req.get("follow"):
            return self.follow_output(rid, jdir, path, int(req["size"]), self.packer(req))
        return self.stream_file(rid, path, 0, self.packer(req), pickle=True)

    def follow_output(self, rid: int, jdir: str, path: str, size: int, packer: wire.Packer | None) -> dict[str, Any]:
        """Send ``size`` bytes of the output file as the worker writes them: its ``.part`` until
        the rename (the same inode), or the finished file. Ends with an error if the job ends
        without the file reaching ``size`` bytes (the write failed; the client then asks again
        the usual way and gets the job's own account of it)."""
        for candidate in (path, path + files.PART_SUFFIX, path):  # the rename can land in between
            try:
                f = open(candidate, "rb", buffering=0)
                break
            except FileNotFoundError:
                continue
        else:
            raise RequestError(f"output {os.path.basename(path)} is not being written", "FileNotFoundError")
        with f:
            _check_object(f, path)
            buf = bytearray(wire.CHUNK)
            view = memoryview(buf)
            sent = 0
            nap, stalled = 0.0005, 0.0
            checked = time.monotonic()
            while sent < size:
                if rid in self.cancelled:
                    return {"size": sent, "cancelled": True}
                n = f.readinto(view[: min(wire.CHUNK, size - sent)])
                if n:
                    self.more(rid, {}, view[:n], packer)
                    sent += n
                    nap, stalled = 0.0005, 0.0
                    continue
                if stalled >= 0.05:  # caught up with the writer for a while: is it still writing?
                    stalled = 0.0
                    status = files.read_json(os.path.join(jdir, "status.json"), {})
                    gone = os.fstat(f.fileno()).st_nlink == 0  # the writer gave up and removed it
                    if (gone or status.get("state") in files.TERMINAL) and not f.read(1):
                        why = "its writer removed it" if gone else f"job {status.get('state')}"
                        raise RequestError(f"output {os.path.basename(path)} ended at {sent} of {size} bytes "
                                           f"({why})", "IncompleteOutput")
                    f.seek(sent)
                    if time.monotonic() - checked > 1.0:
                        checked = time.monotonic()
                        self.check_orphan(jdir, status)
                time.sleep(nap)
                stalled += nap
                nap = min(nap * 2, 0.01)
        return {"size": sent}

    def stream_file(self, rid: int, path: str, offset: int, packer: wire.Packer | None = None,
                    pickle: bool = False) -> dict[str, Any]:
        """Send a file as data frames. ``pickle``: it is an object file the client will unpickle,
        so it (and its folder) must be ours and writable by nobody else."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise RequestError(f"{path} does not exist on the target", "FileNotFoundError") from None
        with f:
            if pickle:
                _check_object(f, path)
            st = os.fstat(f.fileno())
            f.seek(offset)
            buf = bytearray(wire.CHUNK)
            view = memoryview(buf)
            while rid not in self.cancelled:
                n = f.readinto(buf)
                if not n:
                    break
                self.more(rid, {}, view[:n], packer)
        return {"size": st.st_size, "mode": st.st_mode & 0o777, "mtime": st.st_mtime}

    def op_sessions(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        out = []
        for name in sorted(os.listdir(self.path("sessions"))):
            sdir = self.path("sessions", name)
            worker = files.read_json(os.path.join(sdir, "worker.json"), {})
            alive = self.worker_alive(sdir) and bool(worker)
            current = None
            try:
                with open(os.path.join(sdir, "current")) as f:
                    current = f.read().strip()
            except FileNotFoundError:
                pass
            ck = files.read_json(os.path.join(sdir, "checkpoint", "index.json"), {}) or {}
            pid = worker.get("pid") if alive else None
            try:
                busy_at = os.path.getmtime(os.path.join(sdir, "worker.json")) if alive else None
            except OSError:
                busy_at = None
            out.append({"name": name, "alive": alive, "pid": pid,
                        "cwd": worker.get("cwd") if alive else None,
                        "started": worker.get("started") if alive else None, "current": current if alive else None,
                        "rss": _rss(pid) if pid else None, "idle_since": None if current else busy_at,
                        "idle_hours": worker.get("idle_hours") if alive else None,
                        "checkpoint": {"time": ck.get("time"), "after_job": ck.get("after_job"),
                                       "names": sorted(ck.get("saved") or {})} if ck else None,
                        "spot_notice": files.read_json(os.path.join(sdir, "spot_notice.json"))})
        return {"sessions": out}

    def kill_job(self, session: str, sdir: str, job_id: str, req: dict[str, Any]) -> dict[str, Any]:
        """``cancel --kill``: kill the worker running ``job_id`` (its whole process group) now.
        The job ends ``cancelled``; the namespace is lost (the next job is told so)."""
        reason = str(req.get("reason") or f"killed by %ec2 cancel --kill (the worker of session '{session}' with it)")
        done = self.stop_worker(session, sdir, reason, grace=0.0, interrupt=False, state="cancelled",
                                ename="Killed", queued=False, lost=True)
        status = files.read_json(os.path.join(self.path("jobs", job_id), "status.json"), {})
        return {"state": status.get("state", "cancelled"), "killed": done.get("stopped", False),
                "notice": done.get("notice")}

    def op_stop_session(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """Stop a session's worker for good: fail its queued jobs, interrupt the running one, then
        SIGTERM and SIGKILL its process group (``grace`` seconds apart), fail every job it held,
        and answer only once it is gone."""
        session = files.check_name("session", req["session"])
        sdir = self.session_dir(session)
        reason = str(req.get("reason") or f"session '{session}' was restarted (%ec2 restart)")
        return self.stop_worker(session, sdir, reason, grace=float(req.get("grace", STOP_GRACE)))

    def stop_worker(self, session: str, sdir: str, reason: str, *, grace: float, interrupt: bool = True,
                    state: str = "failed", ename: str = "SessionStopped", queued: bool = True,
                    lost: bool = False) -> dict[str, Any]:
        worker = files.read_json(os.path.join(sdir, "worker.json"), {}) or {}
        pid = int(worker.get("pid") or 0)
        if not self.worker_alive(sdir) or not pid:
            return {"stopped": False, "failed": []}
        # the worker and its supervisor read this: end the running job with this reason, start no other
        files.write_json(os.path.join(sdir, STOPPING), {"reason": reason, "state": state, "ename": ename,
                                                         "pid": pid, "time": time.time()})
        try:
            with open(os.path.join(sdir, "current")) as f:
                current = files.check_job_id(f.read().strip())
        except (OSError, ValueError):
            current = ""
        failed: list[str] = []
        if queued:  # claim the session's queued jobs: none of them starts
            failed += mark_orphans(self.root, session, reason, job_ids=self.queued_jobs(session),
                                   state=state, ename=ename)
        try:
            fd = os.open(os.path.join(sdir, "in.fifo"), os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, b"exit\n")
            finally:
                os.close(fd)
        except OSError:
            pass
        try:
            pgid = os.getpgid(pid)
        except OSError:
            pgid = 0
        steps: list[tuple[str, float]] = [("SIGINT", grace), ("SIGTERM", grace)] if interrupt else []
        steps.append(("SIGKILL", KILL_WAIT))
        how = "exit"
        for name, wait in steps:
            if not self.worker_alive(sdir):
                break
            how = name
            try:
                if name == "SIGINT":
                    os.kill(pid, signal.SIGINT)
                elif pgid > 1:
                    os.killpg(pgid, getattr(signal, name))
            except OSError:
                pass
            deadline = time.monotonic() + wait
            while self.worker_alive(sdir) and time.monotonic() < deadline:
                time.sleep(0.02)
        if self.worker_alive(sdir):
            raise RequestError(f"the worker of session '{session}' (pid {pid}) is still alive after SIGKILL",
                               "WorkerStopError")
        # jobs it held that its supervisor did not fail (it was SIGKILLed with it)
        failed += mark_orphans(self.root, session, reason, pid=pid, state=state, ename=ename)
        if current and current not in failed:  # failed by the worker or its supervisor
            st = files.read_json(self.path("jobs", current, "status.json"), {}) or {}
            if (st.get("error") or {}).get("ename") == ename:
                failed.insert(0, current)
        for name in ("worker.json", "current"):
            _unlink(os.path.join(sdir, name))
        out: dict[str, Any] = {"stopped": True, "how": how, "failed": failed}
        if lost:
            files.write_json(os.path.join(sdir, "died.json"), {"cause": reason, "time": time.time(), "jobs": failed})
            out["notice"] = (f"the worker of session '{session}' was killed: its namespace is lost; the next job "
                             "starts in a fresh one (%ec2 checkpoint --restore loads the last checkpoint)")
        _unlink(os.path.join(sdir, STOPPING))
        return out

    def queued_jobs(self, session: str) -> list[str]:
        out = []
        for job_id in sorted(os.listdir(self.path("jobs"))):
            jdir = self.path("jobs", job_id)
            if os.path.exists(os.path.join(jdir, "queued")):
                if files.read_json(os.path.join(jdir, "spec.json"), {}).get("session") == session:
                    out.append(job_id)
        return out

    # -- the store -----------------------------------------------------------------------------
    def op_store_put(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        name = _identifier(req["name"])
        src = self.path("objects", req["hash"])
        if not os.path.exists(src):
            raise RequestError(f"value for {name!r} was not uploaded", "MissingObject")
        meta = dict(req.get("meta") or {})
        meta.update({"name": name, "stored": time.time(), "size": os.path.getsize(src)})
        with files.store_lock(self.root):
            files.link_or_copy(src, self.path("store", name + ".obj"))
            files.write_json(self.path("store", name + ".json"), meta)
        return meta

    def op_store_list(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        out = []
        sdir = self.path("store")
        for fname in sorted(os.listdir(sdir)):
            if fname.endswith(".obj") and not fname.startswith("."):
                name = fname[:-4]
                meta = files.read_json(os.path.join(sdir, name + ".json"), {}) or {"name": name}
                meta.setdefault("size", os.path.getsize(os.path.join(sdir, fname)))
                out.append(meta)
        return {"values": out}

    def op_store_get(self, rid: int, req: dict[str, Any]) -> Any:
        name = _identifier(req["name"])
        path = self.path("store", name + ".obj")
        if not os.path.exists(path):
            raise RequestError(f"no stored value named {name!r}", "KeyError")
        result = self.stream_file(rid, path, 0, self.packer(req), pickle=True)
        result["meta"] = files.read_json(self.path("store", name + ".json"), {})
        return result

    def op_store_delete(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        names = req.get("names")
        with files.store_lock(self.root):
            if names is None:
                names = [f[:-4] for f in os.listdir(self.path("store")) if f.endswith(".obj") and not f.startswith(".")]
            for name in names:
                _identifier(name)
                path = self.path("store", name + ".obj")
                if not os.path.exists(path):
                    raise RequestError(f"no stored value named {name!r}", "KeyError")
                os.unlink(path)
                try:
                    os.unlink(self.path("store", name + ".json"))
                except FileNotFoundError:
                    pass
        return {"deleted": names}

    # -- files ---------------------------------------------------------------------------------
    def user_path(self, path: str, cwd: str | None = None) -> str:
        """A user-given path on the target: ``~`` expanded, relative to ``cwd`` (default home)."""
        base = os.path.expanduser(cwd or "~")
        return os.path.abspath(os.path.join(base, os.path.expanduser(path)))

    def op_stat(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        path = self.user_path(req["path"], req.get("cwd"))
        out: dict[str, Any] = {"path": path, "real": os.path.realpath(path), "exists": os.path.exists(path)}
        if out["exists"]:
            st = os.stat(path)
            out.update(size=st.st_size, mode=st.st_mode & 0o777, is_dir=os.path.isdir(path))
        part = path + ".rmpart"
        if req.get("partial") and os.path.exists(part):
            size = os.path.getsize(part)
            h = hashlib.sha256()
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(DATA), b""):
                    h.update(chunk)
            out["partial"] = {"size": size, "sha256": h.hexdigest()}
        return out

    def op_list_tree(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        top = self.user_path(req["path"], req.get("cwd"))
        if not os.path.exists(top):
            if req.get("missing_ok"):
                return {"root": top, "dir": None, "files": []}
            raise RequestError(f"{top} does not exist on the target", "FileNotFoundError")
        return transfer.tree(top)

    def op_tar_stream(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """Stream a tar of the listed files of a folder as data frames."""
        top = self.user_path(req["path"], req.get("cwd"))
        packer = self.packer(req)
        sink = transfer.FrameSink(lambda chunk: self.more(rid, {}, chunk, packer))
        transfer.write_tar(sink, top, req["files"])  # type: ignore[arg-type]
        sink.close()
        return {"files": len(req["files"])}

    def op_hash_prefix(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """sha256 of the first ``size`` bytes of a file (to check a partial download)."""
        h = hashlib.sha256()
        left = int(req["size"])
        with open(self.user_path(req["path"], req.get("cwd")), "rb") as f:
            while left > 0:
                chunk = f.read(min(DATA, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
        return {"sha256": h.hexdigest(), "size": int(req["size"]) - left}

    def op_read_file(self, rid: int, req: dict[str, Any]) -> Any:
        return self.stream_file(rid, self.user_path(req["path"], req.get("cwd")), int(req.get("offset", 0)),
                                self.packer(req))

    # -- services: detached long-running processes (the Dask cluster; see services.py) -------
    def op_service_files(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"paths": services.write_files(self.root, req["group"], req.get("files") or {}),
                "group_dir": services.group_dir(self.root, req["group"])}

    def op_service_start(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return services.start(self.root, self.agent_dir, req["group"], req["name"], req["module"],
                              list(req.get("args") or []), req.get("env"), int(req.get("max_restarts", 5)),
                              req.get("restart_while_reachable"))

    def op_service_status(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("group") is None:
            return {"groups": services.groups(self.root)}
        return {"services": services.status(self.root, req["group"])}

    def op_service_stop(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"stopped": services.stop(self.root, req["group"], req.get("names"), float(req.get("grace", 5.0)),
                                         bool(req.get("remove")))}

    def op_service_logs(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": services.logs(self.root, req["group"], req["name"], int(req.get("lines", 40)))}

    def op_service_read(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": services.read_file(self.root, req["group"], req["name"])}


def _rss(pid: int) -> int | None:
    """Resident memory of a process in bytes (Linux: /proc; elsewhere None)."""
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _identifier(name: str, what: str = "store") -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise RequestError(f"invalid {what} name {name!r}: must be a Python identifier", "ValueError")
    return name


def _check_object(f: Any, path: str) -> None:
    """Refuse to serve an object file (a pickle: code) that another user owns or could write."""
    try:
        files.check_object_file(f, path)
    except PermissionError as exc:
        raise RequestError(str(exc), "UnsafeObject") from None


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return "(no log)"


def _widen_pipe(fd: int) -> None:
    """Give the pipe to sshd 1 MiB instead of 64 KiB: a 256 KiB frame then crosses in one
    read instead of four, with fewer switches between sshd and us (no-op for non-pipes)."""
    try:
        if fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032)) < PIPE_SIZE:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass  # not a pipe, not Linux, or above /proc/sys/fs/pipe-max-size


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    if not args:
        sys.stderr.write("usage: python -m remotemagic_agent.server ROOT\n")
        sys.exit(2)
    os.umask(0o077)
    for fd in (0, 1):
        _widen_pipe(fd)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must never corrupt the frame stream
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    agent = Agent(args[0], out)
    agent.serve(wire.fd_readinto(sys.stdin.buffer))


if __name__ == "__main__":
    main()
