"""Sessions and their workers, as the agent sees them: start one, hand it jobs, stop it, list them.

A session's folder ``sessions/<s>/`` holds ``lock`` (flocked by the worker's supervisor for its
whole life: liveness is "the lock is taken"), ``start.lock`` (held while a job is handed over, and
by a supervisor while it fails its dead worker's jobs, so the two never cross), ``worker.json``
(pid, cwd, ...; its mtime is when the worker was last busy), ``current`` (the running job),
``in.fifo`` (job ids in, one a line), ``died.json`` and ``stopping.json``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import checkpoint, files
from . import protocol as P
from .events import note_job
from .protocol import RequestError
from .supervisor import STOPPING, mark_orphans

if TYPE_CHECKING:
    from .server import Agent

WORKER_START_TIMEOUT = 120.0
STOP_GRACE = 5.0  # default seconds between interrupt, SIGTERM and SIGKILL when stopping a worker
KILL_WAIT = 10.0  # how long a SIGKILLed process group may take to go


def session_dir(agent: Agent, session: str) -> str:
    sdir = files.private_dir(agent.path("sessions", P.check_name("session", session)))
    try:  # its fifo takes job ids and its checkpoint is unpickled: nobody else may write there
        files.check_ours(sdir, "session folder")
    except PermissionError as exc:
        raise RequestError(str(exc), "UnsafeRoot") from None
    return sdir


def worker_alive(sdir: str) -> bool:
    return files.is_locked(os.path.join(sdir, "lock"))


def read_current(sdir: str) -> str:
    """The id of the job the session's worker runs now, or ""."""
    try:
        with open(os.path.join(sdir, "current")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def start_worker(agent: Agent, session: str, sdir: str, cwd: str, idle_hours: Any = None,
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
        index = files.read_json(os.path.join(sdir, checkpoint.CURRENT, "index.json"))
        if index and index.get("saved"):
            # keep that checkpoint: no automatic checkpoint until it is restored or replaced
            files.atomic_write(os.path.join(sdir, checkpoint.HOLD), [b""])
            when = time.strftime("%H:%M:%S", time.localtime(index["time"]))
            notice += (f". A checkpoint from {when} holds {len(index['saved'])} value(s) "
                       f"({', '.join(sorted(index['saved'])[:8])}): %ec2 checkpoint --restore brings them back")
            if restoring:
                notice = None
        os.replace(os.path.join(sdir, "died.json"), os.path.join(sdir, "died.prev.json"))
    files.remove(os.path.join(sdir, STOPPING))  # a stop that was cut short: not about this worker
    fifo = os.path.join(sdir, "in.fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo, 0o600)
    files.remove(os.path.join(sdir, "worker.json"))
    env = dict(os.environ)
    env["PYTHONPATH"] = agent.agent_dir
    env["PYTHONUNBUFFERED"] = "1"
    log = open(os.path.join(sdir, "worker.log"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "remotemagic_agent.worker", agent.root, session, cwd]
        + ([str(float(idle_hours))] if idle_hours is not None else []),
        cwd=agent.agent_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        close_fds=True,
    )
    log.close()
    threading.Thread(target=proc.wait, daemon=True).start()  # reaps it; the worker itself is detached
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while not os.path.exists(os.path.join(sdir, "worker.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = files.tail(os.path.join(sdir, "worker.log"), 20)
            tail = "(no log)" if tail is None else tail
            raise RequestError(f"the worker for session '{session}' did not start:\n{tail}", "WorkerStartError")
        time.sleep(0.01)
    return notice


def submit(agent: Agent, session: str, job_id: str, cwd: str) -> str | None:
    """Hand the job to the session's worker, starting one if there is none.

    Under ``start.lock`` (which a supervisor also takes before failing its dead worker's
    jobs) the job records which worker pid it was handed to, so a worker's death fails
    exactly the jobs it had -- never one submitted around the same moment."""
    sdir = session_dir(agent, session)
    handed = os.path.join(agent.path("jobs", job_id), "handed")
    notice = None
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while time.monotonic() < deadline:
        with files.locked(os.path.join(sdir, "start.lock")):
            alive = worker_alive(sdir)
            worker = files.read_json(os.path.join(sdir, "worker.json"), {}) or {}
            if not alive:
                spec = files.read_json(os.path.join(agent.path("jobs", job_id), "spec.json"), {}) or {}
                started = start_worker(agent, session, sdir, cwd, spec.get("worker_idle_hours"),
                                       restoring=bool(spec.get("attempt") or spec.get("auto_restore")))
                if started:  # the job's own log tells it (see remotemagic.notices)
                    notice = started
                    note_job(agent.path("jobs", job_id), started)
                continue
            if worker.get("pid"):
                files.atomic_write(handed, [str(worker["pid"]).encode()], durable=False)
                try:
                    files.write_fifo(os.path.join(sdir, "in.fifo"), job_id.encode() + b"\n")
                except OSError:  # no reader: that worker has just died
                    os.unlink(handed)
                else:
                    return notice
        # a supervisor is recording its worker's death: wait for it outside the lock
        time.sleep(0.02)
    raise RequestError(f"could not hand job {job_id} to a worker of session '{session}'")


def queued_jobs(agent: Agent, session: str) -> list[str]:
    out = []
    for job_id in sorted(os.listdir(agent.path("jobs"))):
        jdir = agent.path("jobs", job_id)
        if os.path.exists(os.path.join(jdir, "queued")):
            if files.read_json(os.path.join(jdir, "spec.json"), {}).get("session") == session:
                out.append(job_id)
    return out


def sessions(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    out = []
    for name in sorted(os.listdir(agent.path("sessions"))):
        sdir = agent.path("sessions", name)
        worker = files.read_json(os.path.join(sdir, "worker.json"), {})
        alive = worker_alive(sdir) and bool(worker)
        current = read_current(sdir) or None
        ck = files.read_json(os.path.join(sdir, checkpoint.CURRENT, "index.json"), {}) or {}
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


def kill_job(agent: Agent, session: str, sdir: str, job_id: str, req: dict[str, Any]) -> dict[str, Any]:
    """``cancel --kill``: kill the worker running ``job_id`` (its whole process group) now.
    The job ends ``cancelled``; the namespace is lost (the next job is told so)."""
    reason = str(req.get("reason") or f"killed by %ec2 cancel --kill (the worker of session '{session}' with it)")
    done = stop_worker(agent, session, sdir, reason, grace=0.0, interrupt=False, state=P.CANCELLED,
                       ename="Killed", queued=False, lost=True)
    status = files.read_json(os.path.join(agent.path("jobs", job_id), "status.json"), {})
    return {"state": status.get("state", P.CANCELLED), "killed": done.get("stopped", False),
            "notice": done.get("notice")}


def stop_session(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """Stop a session's worker for good: fail its queued jobs, interrupt the running one, then
    SIGTERM and SIGKILL its process group (``grace`` seconds apart), fail every job it held,
    and answer only once it is gone."""
    session = P.check_name("session", req["session"])
    sdir = session_dir(agent, session)
    reason = str(req.get("reason") or f"session '{session}' was restarted (%ec2 restart)")
    return stop_worker(agent, session, sdir, reason, grace=float(req.get("grace", STOP_GRACE)))


def stop_worker(agent: Agent, session: str, sdir: str, reason: str, *, grace: float, interrupt: bool = True,
                state: str = P.FAILED, ename: str = "SessionStopped", queued: bool = True,
                lost: bool = False) -> dict[str, Any]:
    worker = files.read_json(os.path.join(sdir, "worker.json"), {}) or {}
    pid = int(worker.get("pid") or 0)
    if not worker_alive(sdir) or not pid:
        return {"stopped": False, "failed": []}
    # the worker and its supervisor read this: end the running job with this reason, start no other
    files.write_json(os.path.join(sdir, STOPPING), {"reason": reason, "state": state, "ename": ename,
                                                     "pid": pid, "time": time.time()})
    try:
        current = P.check_job_id(read_current(sdir))
    except ValueError:
        current = ""
    failed: list[str] = []
    if queued:  # claim the session's queued jobs: none of them starts
        failed += mark_orphans(agent.root, session, reason, job_ids=queued_jobs(agent, session),
                               state=state, ename=ename)
    try:
        files.write_fifo(os.path.join(sdir, "in.fifo"), b"exit\n")
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
        if not worker_alive(sdir):
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
        while worker_alive(sdir) and time.monotonic() < deadline:
            time.sleep(0.02)
    if worker_alive(sdir):
        raise RequestError(f"the worker of session '{session}' (pid {pid}) is still alive after SIGKILL",
                           "WorkerStopError")
    # jobs it held that its supervisor did not fail (it was SIGKILLed with it)
    failed += mark_orphans(agent.root, session, reason, pid=pid, state=state, ename=ename)
    if current and current not in failed:  # failed by the worker or its supervisor
        st = files.read_json(agent.path("jobs", current, "status.json"), {}) or {}
        if (st.get("error") or {}).get("ename") == ename:
            failed.insert(0, current)
    for name in ("worker.json", "current"):
        files.remove(os.path.join(sdir, name))
    out: dict[str, Any] = {"stopped": True, "how": how, "failed": failed}
    if lost:
        files.write_json(os.path.join(sdir, "died.json"), {"cause": reason, "time": time.time(), "jobs": failed})
        out["notice"] = (f"the worker of session '{session}' was killed: its namespace is lost; the next job "
                         "starts in a fresh one (%ec2 checkpoint --restore loads the last checkpoint)")
    files.remove(os.path.join(sdir, STOPPING))
    return out


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


HANDLERS = {
    P.OP_SESSIONS: sessions,
    P.OP_STOP_SESSION: stop_session,
}
