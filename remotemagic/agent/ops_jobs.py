"""Op handlers for jobs: run, events, status, jobs, cancel, stdin, read_output.

A job is the folder ``jobs/<id>/``: ``spec.json`` (:class:`.protocol.JobSpec`), ``status.json``
(:class:`.protocol.JobStatus`), ``events.jsonl`` (:mod:`.events`), the markers ``queued`` (not
claimed by a worker yet: whoever unlinks it first -- the worker, or a cancel -- owns the job) and
``handed`` (the pid of the worker it was handed to), and ``outputs/<name>.obj``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from . import files, wire
from . import protocol as P
from .dirwatch import DirWatch
from .ops_files import check_object, stream_file
from .ops_sessions import kill_job, read_current, submit, worker_alive
from .protocol import RequestError
from .supervisor import mark_orphans

if TYPE_CHECKING:
    from .server import Agent

DATA = 1024 * 1024  # the most of an event log sent in one data frame
WATCHED_NAP = 0.05  # with a DirWatch, changes wake the follower; this only bounds a missed one


def job_dir(agent: Agent, job_id: str) -> str:
    jdir = agent.path("jobs", P.check_job_id(job_id))
    if not os.path.isdir(jdir):
        raise RequestError(f"no job {job_id} on this target", "UnknownJob")
    return jdir


def run(agent: Agent, rid: int, req: dict[str, Any]) -> Any:
    """Queue a job (write its folder, hand it to the session's worker); with ``follow``,
    stream its events like ``events``."""
    try:
        spec: dict[str, Any] = dict(P.check_spec(req["spec"]))
    except ValueError as exc:
        raise RequestError(str(exc), "ValueError") from None
    job_id = spec["id"]
    session = spec["session"]
    for digest in (spec.get("inputs") or {}).values():
        if not os.path.exists(agent.path("objects", P.check_object_name(digest))):
            raise RequestError(f"pushed value {digest[:12]} is missing on the target", "MissingObject")
    jdir = agent.path("jobs", job_id)
    os.makedirs(jdir, mode=0o700)
    spec["submitted"] = time.time()
    # not fsynced (4 fsyncs were a third of a warm cell's disk waits): until the job ends these
    # mean nothing after a machine crash, and the worker's final status write fsyncs the folder
    files.atomic_write(os.path.join(jdir, "spec.json"), [json.dumps(spec, indent=1, sort_keys=True).encode()],
                       durable=False)
    files.atomic_write(os.path.join(jdir, "status.json"), [json.dumps({"state": P.QUEUED}).encode()], durable=False)
    open(os.path.join(jdir, "events.jsonl"), "ab").close()
    files.atomic_write(os.path.join(jdir, "queued"), [b""], durable=False)
    cwd = os.path.expanduser(spec.get("cwd") or "~")
    try:
        notice = submit(agent, session, job_id, cwd)
    except Exception as exc:
        mark_orphans(agent.root, session, f"could not start: {exc}", job_ids=[job_id])
        raise
    if not req.get("follow"):  # a background job: the client shows the notice at once
        return {"job": job_id, "state": P.QUEUED, **({"notice": notice} if notice else {})}
    # the first follow: the client's inline budget (small -o values ride with the final status)
    # and codec (compressed event frames) apply to it as to a later `events`
    return events(agent, rid, {"job": job_id, "offset": 0, "follow": True, "inline": req.get("inline", 0),
                               "z": req.get("z")})


def events(agent: Agent, rid: int, req: dict[str, Any]) -> Any:
    """Stream the job's event log from a byte offset; end with its status (and small outputs)."""
    job_id = P.check_job_id(req["job"])
    jdir = job_dir(agent, job_id)
    offset = int(req.get("offset", 0))
    follow = bool(req.get("follow", True))
    log_path = os.path.join(jdir, "events.jsonl")
    packer = agent.packer(req)
    nap = 0.001
    checked = active = time.monotonic()
    # watching the folder before the first read: an append or the status's rename wakes us at
    # once (a warm cell waited ~1 ms for the next poll); without inotify, polls as before.
    # A one-off read (not ``follow``) never waits: no inotify instance for it
    with DirWatch(jdir, enabled=follow) as watch, open(log_path, "rb") as f:
        while rid not in agent.cancelled:
            f.seek(offset)
            data = f.read(DATA)
            if data and not data.endswith(b"\n"):
                data += f.readline()
                cut = data.rfind(b"\n") + 1
                data = data[:cut]
            if data:
                agent.more(rid, {"offset": offset}, data, packer)
                offset += len(data)
                nap = 0.001
                active = time.monotonic()
                continue
            status = files.read_json(os.path.join(jdir, "status.json"), {})
            if status.get("state") in P.TERMINAL:
                f.seek(offset)
                if b"\n" in f.read():
                    continue  # a last event landed between our read and the status
                return final_status(jdir, job_id, status, offset, req.get("inline", 0))
            if not follow:
                return {"job": job_id, "status": status, "offset": offset}
            if status.get("state") == P.QUEUED and not os.path.exists(os.path.join(jdir, "handed")):
                resubmit(agent, jdir)  # its worker died before starting it
            if time.monotonic() - checked > 2.0:
                checked = time.monotonic()
                check_orphan(agent, jdir, status)
            watch.wait(WATCHED_NAP if watch.active else nap)
            # unwatched, a short cell's end is seen within 2 ms; after a quiet second, polls slow to 50 ms
            nap = min(nap * 2, 0.05 if time.monotonic() - active > 1.0 else 0.002)
    return {"job": job_id, "detached": True, "offset": offset}


def resubmit(agent: Agent, jdir: str) -> None:
    spec = files.read_json(os.path.join(jdir, "spec.json"), {})
    if not spec or not os.path.exists(os.path.join(jdir, "queued")):
        return
    submit(agent, spec.get("session", "default"), spec["id"], os.path.expanduser(spec.get("cwd") or "~"))


def check_orphan(agent: Agent, jdir: str, status: dict[str, Any]) -> None:
    """A running job whose worker (and its supervisor) is gone: fail it here."""
    spec = files.read_json(os.path.join(jdir, "spec.json"), {})
    sdir = agent.path("sessions", spec.get("session", "default"))
    if status.get("state") == P.RUNNING and not worker_alive(sdir):
        mark_orphans(agent.root, spec.get("session", "default"),
                     "worker died (cause unknown: its supervisor is gone too)", job_ids=[spec["id"]])


def final_status(jdir: str, job_id: str, status: dict[str, Any], offset: int, inline: int) -> Any:
    """The status, with outputs smaller than ``inline`` bytes carried in the payload."""
    sizes: dict[str, int] = {}
    parts: list[bytes] = []
    # a job that did not finish gives no values: nobody takes them (a --retry takes the next attempt's)
    budget = int(inline or 0) if status.get("state") == P.DONE else 0
    for name, meta in (status.get("outputs") or {}).items():
        if meta.get("size", 0) <= budget:
            path = os.path.join(jdir, "outputs", name + ".obj")
            with open(path, "rb") as f:
                check_object(f, path)
                data = f.read()
            sizes[name] = len(data)
            parts.append(data)
            budget -= len(data)
    return {"job": job_id, "status": status, "offset": offset, "inline": sizes}, b"".join(parts)


def status(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    jdir = job_dir(agent, req["job"])
    return {
        "spec": files.read_json(os.path.join(jdir, "spec.json"), {}),
        "status": files.read_json(os.path.join(jdir, "status.json"), {}),
        "log_size": os.path.getsize(os.path.join(jdir, "events.jsonl")),
    }


def jobs(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    ids = sorted(n for n in os.listdir(agent.path("jobs")) if P.JOB_RE.match(n))
    limit = int(req.get("limit", 50))
    out = []
    for job_id in ids[-limit:]:
        jdir = agent.path("jobs", job_id)
        spec = files.read_json(os.path.join(jdir, "spec.json"), {})
        state = files.read_json(os.path.join(jdir, "status.json"), {})
        out.append({
            "id": job_id, "session": spec.get("session"), "kind": spec.get("kind", P.KIND_CELL),
            "code": spec.get("code", "")[:200], "outputs": spec.get("outputs") or [],
            "submitted": spec.get("submitted"), "state": state.get("state"),
            "started": state.get("started"), "finished": state.get("finished"),
            "origin": spec.get("origin") or {},
        })
    answer: dict[str, Any] = {"jobs": out}
    if req.get("active"):  # every queued or running job, not only among the last ``limit``
        answer["active"] = [
            job_id for job_id in ids
            if (files.read_json(agent.path("jobs", job_id, "status.json"), {}) or {}).get("state") not in P.TERMINAL
        ]
    return answer


def cancel(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    job_id = req["job"]
    jdir = job_dir(agent, job_id)
    try:
        os.unlink(os.path.join(jdir, "queued"))
    except FileNotFoundError:
        pass
    else:  # never started: it is ours to finish
        files.write_json(os.path.join(jdir, "status.json"), {"state": P.CANCELLED, "finished": time.time()})
        return {"state": P.CANCELLED}
    state = files.read_json(os.path.join(jdir, "status.json"), {})
    if state.get("state") in P.TERMINAL:
        return {"state": state["state"]}
    spec = files.read_json(os.path.join(jdir, "spec.json"), {})
    sdir = agent.path("sessions", spec.get("session", "default"))
    deadline = time.monotonic() + 2.0
    while True:  # claimed by the worker a moment ago: it becomes "current" within milliseconds
        current = read_current(sdir)
        worker = files.read_json(os.path.join(sdir, "worker.json"), {})
        if current == job_id and worker.get("pid"):
            if req.get("kill"):
                return kill_job(agent, spec.get("session", "default"), sdir, job_id, req)
            os.kill(int(worker["pid"]), signal.SIGINT)
            return {"state": "interrupting"}
        state = files.read_json(os.path.join(jdir, "status.json"), {})
        if state.get("state") in P.TERMINAL or time.monotonic() > deadline:
            return {"state": state.get("state", "unknown")}
        time.sleep(0.01)


def stdin(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """The user's answer to a job's ``input_request`` (see agent/stdin.py), written into the
    worker's FIFO (never to disk). Without ``answer``: only whether the worker still waits."""
    jdir = job_dir(agent, req["job"])
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


def read_output(agent: Agent, rid: int, req: dict[str, Any]) -> Any:
    """Stream a job's ``-o`` value file. With ``follow`` (and its ``size``, from the job's
    ``output`` event), stream it while the worker is still writing it."""
    jdir = job_dir(agent, req["job"])
    name = P.check_identifier(req["name"], "output")
    path = os.path.join(jdir, "outputs", name + ".obj")
    if req.get("follow"):
        return follow_output(agent, rid, jdir, path, int(req["size"]), agent.packer(req))
    return stream_file(agent, rid, path, 0, agent.packer(req), pickle=True)


def follow_output(agent: Agent, rid: int, jdir: str, path: str, size: int,
                  packer: wire.Packer | None) -> dict[str, Any]:
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
        check_object(f, path)
        buf = bytearray(wire.CHUNK)
        view = memoryview(buf)
        sent = 0
        nap, stalled = 0.0005, 0.0
        checked = time.monotonic()
        while sent < size:
            if rid in agent.cancelled:
                return {"size": sent, "cancelled": True}
            n = f.readinto(view[: min(wire.CHUNK, size - sent)])
            if n:
                agent.more(rid, {}, view[:n], packer)
                sent += n
                nap, stalled = 0.0005, 0.0
                continue
            if stalled >= 0.05:  # caught up with the writer for a while: is it still writing?
                stalled = 0.0
                state = files.read_json(os.path.join(jdir, "status.json"), {})
                gone = os.fstat(f.fileno()).st_nlink == 0  # the writer gave up and removed it
                if (gone or state.get("state") in P.TERMINAL) and not f.read(1):
                    why = "its writer removed it" if gone else f"job {state.get('state')}"
                    raise RequestError(f"output {os.path.basename(path)} ended at {sent} of {size} bytes "
                                       f"({why})", "IncompleteOutput")
                f.seek(sent)
                if time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    check_orphan(agent, jdir, state)
            time.sleep(nap)
            stalled += nap
            nap = min(nap * 2, 0.01)
    return {"size": sent}


HANDLERS = {
    P.OP_RUN: run,
    P.OP_EVENTS: events,
    P.OP_STATUS: status,
    P.OP_JOBS: jobs,
    P.OP_CANCEL: cancel,
    P.OP_STDIN: stdin,
    P.OP_READ_OUTPUT: read_output,
}
