"""The supervisor of a session's worker, and failing the jobs of a worker that is gone.

``python -m remotemagic_agent.worker`` forks once: the parent runs :func:`supervise` (it holds
the session lock, waits for the worker and, if the worker dies -- SIGKILL, out of memory, a
crash in C code -- fails its jobs with the cause and leaves ``died.json`` so the next job is told
that the namespace was lost). :func:`mark_orphans` is also how the agent fails jobs whose worker
it stopped (``stop_session``, ``cancel --kill``) or found gone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from . import files, recover
from .events import EventLog, final_status
from .protocol import FAILED, RUNNING, TERMINAL

STOPPING = "stopping.json"  # in the session folder while the agent stops its worker (restart, cancel --kill)


def mark_orphans(root: str, session: str, cause: str, pid: int | None = None,
                 job_ids: list[str] | None = None, state: str = FAILED, ename: str = "WorkerDied",
                 details: dict[str, Any] | None = None) -> list[str]:
    """Fail the unfinished jobs of ``session`` that were handed to worker ``pid`` (or the
    ``job_ids`` given) with ``cause``; return their ids. A job handed to another worker, or to
    none yet, is left alone: a live worker will run it. A job whose log ends with its final
    status event (it finished; a machine crash lost the rename of its ``status.json``) gets
    that status back, not a failure."""
    jroot = os.path.join(root, "jobs")
    marked: list[str] = []
    if job_ids is None:
        try:
            job_ids = sorted(os.listdir(jroot))
        except FileNotFoundError:
            return marked
    for job_id in job_ids:
        jdir = os.path.join(jroot, job_id)
        status = _status(os.path.join(jdir, "status.json"))
        if status.get("state") in TERMINAL:
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
                files.remove(os.path.join(jdir, "handed"))
                continue
        ended = final_status(os.path.join(jdir, "events.jsonl"))
        if ended is not None:  # it finished: a machine crash lost status.json's rename, not the log
            files.write_json(os.path.join(jdir, "status.json"), ended)
            continue
        if not status:
            continue
        files.remove(os.path.join(jdir, "queued"))
        error = {"ename": ename, "evalue": cause, "traceback": [], **(details or {})}
        log = EventLog(os.path.join(jdir, "events.jsonl"))
        log.emit({"type": "error", **error})
        log.emit({"type": "status", "state": state})
        log.close()
        status.update({"state": state, "finished": time.time(), "error": error})
        files.write_json(os.path.join(jdir, "status.json"), status)
        marked.append(job_id)
    return marked


def _status(path: str) -> dict[str, Any]:
    """A job's status; {} while it has none yet (the agent is creating the job). A file that is
    there but empty or cut short -- what a machine crash can leave of a status swapped in
    without an fsync (``files.atomic_write(swap=True)``) -- reads as a job that was running."""
    try:
        with open(path, "rb") as f:
            status = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"state": RUNNING}
    return status if isinstance(status, dict) else {"state": RUNNING}


def describe_exit(status: int, memory: dict[str, int] | None = None) -> str:
    """The cause of a worker's end, from its wait status: the signal, and the memory it had reached."""
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
    """Wait for the worker ``child``; if it did not exit cleanly, fail its jobs with the cause."""
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
    with files.locked(os.path.join(sdir, "start.lock")):  # no job is being handed to our worker meanwhile
        for name in ("worker.json", "current"):
            files.remove(os.path.join(sdir, name))
        stopping = files.read_json(os.path.join(sdir, STOPPING))
        if not clean and stopping:  # the agent is stopping us (restart, cancel --kill): it says why
            mark_orphans(root, session, str(stopping.get("reason")), pid=child,
                         state=str(stopping.get("state") or FAILED),
                         ename=str(stopping.get("ename") or "SessionStopped"))
        elif not clean:
            memory = recover.memory_report()  # the peak of the worker (our only child) and the machine's
            cause = describe_exit(status, memory)
            details = {**memory, "signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {}
            jobs = mark_orphans(root, session, cause, pid=child, details=details)
            files.write_json(os.path.join(sdir, "died.json"), {"cause": cause, "time": time.time(), "jobs": jobs})
