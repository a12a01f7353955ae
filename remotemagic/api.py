"""The plain-Python API: ``connect(target)`` returns a :class:`Remote`; ``Remote.run`` a :class:`Job`.

No IPython display code here: the magics (``remotemagic.magics``) are a thin layer over this,
and everything works the same from a script::

    import remotemagic
    r = remotemagic.connect("local")
    job = r.run("y = x * 2\\nprint(y)", push={"x": 21}, pull=["y"])
    job.result()          # {'y': 42}
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import envsync, errors, notices, progress, reclaim, retry, state, transfer, values
from .agent import files, protocol
from .connection import AgentConnection, CallReader, read_streamed_object
from .jobs import EventHandler, Job, OutputPrefetch, parse_events
from .transport.base import Forward, Transport

log = logging.getLogger(__name__)

__all__ = ["Remote", "Job", "OutputPrefetch", "CallReader", "EventHandler", "parse_events", "connect", "connect_ec2",
           "default_session", "default_local_root"]

INLINE_LIMIT = 1024 * 1024
OBJECT_CACHE_LIMIT = 20 * 1024**3
FAST_LINK_RTT = 0.005  # s: a round trip under this (loopback, a LAN) is not worth compressing for
CHECKPOINT_LIMIT = 64 * 1024**2
HEARTBEAT_EVERY = 60.0  # seconds, while a tunnel is open
WORKER_IDLE_HOURS = 24.0
STOP_GRACE = 5.0  # seconds between interrupt, SIGTERM and SIGKILL when a worker is stopped
RECLAIM_WAIT_MINUTES = 60.0  # how long to wait for a reclaimed spot instance to come back


class Remote:
    """One target (local worker, SSH host or EC2 instance) and its sessions, jobs and store."""

    def __init__(
        self,
        transport: Transport,
        *,
        session: str = "default",
        cwd: str | None = None,
        state_root: str | os.PathLike[str] | None = None,
        reconnect_timeout: float = 60.0,
        inline_limit: int = INLINE_LIMIT,
        object_cache_limit: int = OBJECT_CACHE_LIMIT,
        checkpoint_limit: int = CHECKPOINT_LIMIT,
        worker_idle_hours: float = WORKER_IDLE_HOURS,
        compression: str = "auto",
        show_progress: bool = True,
        prefetch_outputs: bool = True,
        package_sync: str = "auto",
        offline_install: bool = False,
        auto_restore: bool = False,
        reclaim_wait_minutes: float = RECLAIM_WAIT_MINUTES,
    ):
        self.transport = transport
        #: After the session's worker died (or the machine restarted), the next cell first loads
        #: the last checkpoint into the new worker and says what came back (a notice in its log).
        self.auto_restore = bool(auto_restore)
        if not reclaim_wait_minutes >= 0:
            raise ValueError(f"reclaim_wait_minutes must be >= 0 (0: do not wait), not {reclaim_wait_minutes!r}")
        #: How long ``run(..., retries=N)`` and :meth:`wait_through_reclaim` wait for a reclaimed
        #: spot instance to be started again by AWS (see :mod:`remotemagic.reclaim`; 0: not at all).
        self.reclaim_wait_minutes = float(reclaim_wait_minutes)
        #: While waiting for a reclaimed spot instance: ``{"since", "state", "text", "instance"}``
        #: (what the cell's waiting line shows); None otherwise.
        self.waiting: dict[str, Any] | None = None
        #: Set by the magics around a foreground cell: a job that ends while followed is recorded
        #: as ``watched`` in its final write (``jobs.Job._finish``), not in a write of its own.
        self.watching = False
        #: Builds the transport to the same machine after it came back with a new address (set by
        #: the ``ec2`` kind; None: this target's machine does not come back by itself).
        self.reopen_transport: Callable[[Any], Transport] | None = None
        self.target = transport.name
        self.session = protocol.check_name("session", session)
        self.cwd = cwd
        self.state_root = Path(state_root) if state_root else state.state_dir()
        self.reconnect_timeout = reconnect_timeout
        self.inline_limit = inline_limit
        self.object_cache_limit = object_cache_limit
        self.checkpoint_limit = checkpoint_limit
        if not worker_idle_hours >= 0:
            raise ValueError(f"worker_idle_hours must be >= 0 (0: never), not {worker_idle_hours!r}")
        #: A session's worker exits after this many hours without a job, checkpointing first (0: never).
        self.worker_idle_hours = float(worker_idle_hours)
        if compression not in ("auto", "zstd", "zlib", "none"):
            raise ValueError(f"compression must be auto, zstd, zlib or none, not {compression!r}")
        self.compression = compression
        self.codec: str | None = None
        self.show_progress = show_progress
        self.prefetch_outputs = prefetch_outputs
        #: "auto" | "exact" | "off": install what a job needs on the target first (see envsync).
        self.package_sync = package_sync
        #: Ship wheels from here even if the target could reach a package index.
        self.offline_install = offline_install
        self._pushed_modules: dict[str, list[str]] = {}
        transport.offline_install = offline_install  # bootstrap ships wheels too
        self.info: dict[str, Any] = {}
        self._conn: AgentConnection | None = None
        self._lock = threading.RLock()
        self._known: set[str] = set()
        self.last_job: Job | None = None
        self.tunnels: dict[int, Forward] = {}
        self._heartbeat: threading.Thread | None = None
        self._closing = threading.Event()
        #: For a target on a machine that a provider starts and stops (EC2): the machine (a
        #: ``providers.ec2.InstanceInfo``) and its provider (a ``providers.base.Provider``).
        self.instance: Any = None
        self.provider: Any = None
        #: The user notices raised while connecting (also shown: see :mod:`remotemagic.notices`).
        self.notices: list[dict[str, Any]] = []
        #: the working folder as the target resolves it (None: the target's home folder)
        self.workdir: str | None = None
        #: How another process (the Jupyter server extension) can reach this target again:
        #: the arguments of :func:`connect`, kept in each job's local record. None: it can't.
        self.connect_args: dict[str, Any] | None = None
        with notices.collect(propagate=True) as got:
            try:
                self._connect_first()
            finally:
                self.notices.extend(got)
        if cwd is not None:
            self._check_cwd()

    def _check_cwd(self) -> None:
        """A working folder that does not exist on the target is an error now, not a job that
        silently runs somewhere else later."""
        st = self.request(protocol.OP_STAT, path=self.cwd)
        if not st.get("exists") or not st.get("is_dir"):
            self.close()
            what = "is not a folder" if st.get("exists") else "does not exist"
            raise ValueError(f"the working folder {self.cwd} {what} on {self.target}: create it there, or "
                             "choose another (--workdir, or cwd=)")
        self.workdir = st.get("real") or st["path"]

    def __repr__(self) -> str:
        return f"<Remote {self.target} session={self.session}>"

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the connection ----------------------------------------------------------------------
    def _open(self) -> AgentConnection:
        conn = AgentConnection(self.transport.start_agent(), self.target)
        try:
            info = conn.request(protocol.OP_HELLO)
            rtt = float("inf")
            for _ in range(3):  # the best of up to three: one late answer on a busy machine is not a slow link
                t0 = time.perf_counter()
                conn.request(protocol.OP_PING)
                rtt = min(rtt, time.perf_counter() - t0)
                if rtt < FAST_LINK_RTT:
                    break
        except Exception:
            conn.close()
            raise
        local = sys.version_info[:2]
        remote = tuple(int(x) for x in info["python"].split(".")[:2])
        if remote != local:
            conn.close()
            raise errors.VersionMismatchError(
                f"{self.target} runs Python {info['python']} ({info['executable']}) but this kernel "
                f"runs {sys.version.split()[0]}: pickles need the same minor version at both ends"
            )
        self.info = info
        self.codec = self._choose_codec(info, rtt)
        return conn

    def _choose_codec(self, info: dict[str, Any], rtt: float) -> str | None:
        """``auto`` compresses on links that are slow enough for it to pay: any transport but
        the local pipe, with a round trip over 5 ms (a WAN, not a LAN or loopback)."""
        theirs = info.get("codecs") or ["zlib"]
        from .agent import wire

        common = [c for c in wire.codecs_available() if c in theirs]
        if self.compression == "none" or not common:
            return None
        if self.compression == "auto":
            if self.transport.is_local or rtt < FAST_LINK_RTT:
                return None
            return common[0]
        if self.compression not in common:
            raise ValueError(f"compression {self.compression!r} is not available on {self.target} (it has {theirs})")
        return self.compression

    def _connect_first(self) -> None:
        self._conn = self._open()
        log.info("connected to %s (Python %s, agent pid %s)", self.target, self.info["python"], self.info["pid"])

    def connection(self) -> AgentConnection:
        """The open connection; after a drop, reconnect with backoff (up to ``reconnect_timeout``)."""
        with self._lock:
            if self._conn is not None and not self._conn.lost:
                return self._conn
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            deadline = time.monotonic() + self.reconnect_timeout
            delay = 0.1
            while True:
                try:
                    self._conn = self._open()
                    log.warning("reconnected to %s", self.target)
                    return self._conn
                except (OSError, EOFError, errors.ConnectionLostError) as exc:
                    if time.monotonic() + delay > deadline:
                        raise errors.ConnectionLostError(
                            f"lost the connection to {self.target} and could not reconnect within "
                            f"{self.reconnect_timeout:g} s: {exc}"
                        ) from exc
                    log.info("reconnecting to %s in %.1f s (%s)", self.target, delay, exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)

    def request(self, op: str, **args: Any) -> Any:
        """One request/answer with the agent, retried once over a fresh connection if the link dropped."""
        try:
            return self.connection().request(op, **args)
        except errors.ConnectionLostError:
            return self.connection().request(op, **args)

    def close(self) -> None:
        """Close the link. Workers, jobs and stored values stay on the target."""
        self._closing.set()
        with self._lock:
            for t in list(self.tunnels.values()):
                t.close()
            self.tunnels.clear()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.transport.close()

    def reattach(self, instance: Any, timeout: float | None = None) -> None:
        """The machine came back as ``instance`` (a new address): drop the old link and transport,
        connect through a new one (the same agent environment), retrying for up to ``timeout`` s
        while its SSH server starts."""
        if self.reopen_transport is None:
            raise ValueError(f"{self.target}: no way to reach its machine again")
        with self._lock:
            old = self.transport
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            old.close()
            self.transport = self.reopen_transport(instance)
            self.transport.agent_env.update(old.agent_env)
            self.transport.offline_install = self.offline_install
            self.instance = instance
            self._known.clear()  # the object cache survives a stop, but ask again rather than assume
            saved, self.reconnect_timeout = self.reconnect_timeout, max(self.reconnect_timeout, timeout or 0)
            try:
                self.connection()
            finally:
                self.reconnect_timeout = saved
        log.warning("reconnected to %s at %s", self.target, getattr(instance, "host", "?"))

    # -- values --------------------------------------------------------------------------------
    def _push(self, items: dict[str, Any], code: str = "") -> dict[str, str]:
        """Pickle and upload the values the target does not have yet; return name -> hash.
        First the target gets the packages that ``code`` and these pickles need (package sync)."""
        if items:
            values.register_local_modules()  # once per push: it scans sys.modules
        encoded = {name: values.encode(name, value) for name, value in items.items()}
        if code or encoded:
            envsync.before_upload(self, code, [enc.pickle for enc in encoded.values()])
        self._pushed_modules = {name: sorted(envsync.needs.pickle_modules(enc.pickle)) for name, enc in encoded.items()}
        digests = {name: enc.digest for name, enc in encoded.items()}
        unknown = sorted({d for d in digests.values() if d not in self._known})
        missing = set(self.request(protocol.OP_HAS_OBJECTS, hashes=unknown)["missing"]) if unknown else set()
        self._known.update(set(unknown) - missing)
        sent: set[str] = set()
        for name, enc in encoded.items():
            if enc.digest not in missing or enc.digest in sent:
                continue
            update, close = progress.bar(enc.size, f"push {name}", self.show_progress)
            try:
                self.connection().upload(
                    {"kind": "object", "hash": enc.digest, "size": enc.size}, enc.chunks(), update, self.codec
                )
            finally:
                close()
            sent.add(enc.digest)
            self._known.add(enc.digest)
        if sent:
            self.request(protocol.OP_EVICT_OBJECTS, limit=self.object_cache_limit, keep=sorted(set(digests.values())))
        return digests

    # -- jobs ----------------------------------------------------------------------------------
    def run(
        self,
        code: str,
        push: dict[str, Any] | None = None,
        pull: Iterable[str] | None = None,
        *,
        background: bool = False,
        session: str | None = None,
        timeout: float | None = None,
        on_event: EventHandler | None = None,
        execution_count: int | None = None,
        colors: str | None = None,
        stdin: bool = False,
        origin: dict[str, Any] | None = None,
        retries: int = 0,
    ) -> Job:
        """Run ``code`` in a session on the target.

        ``push`` values are bound in the session namespace first; ``pull`` names are pickled
        when the cell ends (``Job.result()`` returns them). In the foreground, events go to
        ``on_event`` as they arrive and the call returns when the job ends; with
        ``background=True`` it returns at once.

        ``execution_count`` runs the cell as ``In[n]`` (tracebacks say ``Cell In[n]``, the value
        goes to ``Out[n]``); ``colors`` is the traceback colour theme (IPython's ``%colors``).
        With ``stdin``, ``input()`` in the code emits an ``input_request`` event and waits for
        :meth:`Job.answer_input`; without, it raises ``StdinNotImplementedError``.
        ``origin`` says where the code comes from (notebook path, cell id, the page and kernel:
        :func:`remotemagic.notebook.current_origin`); it is kept with the job on both ends.

        ``retries``: if the job ends because its worker died (a signal such as the
        out-of-memory killer's SIGKILL, or its machine went away), run it again -- up to
        ``retries`` more times -- in a fresh worker that first restores the session's last
        checkpoint (see :mod:`remotemagic.retry`). The returned :class:`Job` is the last
        attempt's. Not for background jobs; never when the cell itself raises. On a spot instance
        that AWS reclaims, the next attempt first waits (up to ``reclaim_wait_minutes``) for AWS to
        start the instance again and reconnects (see :mod:`remotemagic.reclaim`).
        """
        session = protocol.check_name("session", session or self.session)
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        retries = retry.check_retries(retries)
        if retries and background:
            raise ValueError("retries apply to foreground jobs only (background=False)")
        pull = list(pull or [])
        for name in pull:
            if not name.isidentifier():
                raise ValueError(f"cannot pull {name!r}: not a Python identifier")
        extra: dict[str, Any] = {"timeout": timeout, "execution_count": execution_count, "colors": colors,
                                 "stdin": bool(stdin and not background)}
        if origin:
            extra["origin"] = dict(origin)
        job = self._attempt(code, push, pull, background, session, on_event, extra, retries)
        if not background:
            retry.tell_memory(job, self)
        for n in range(2, retries + 2):
            why = retry.why_retry(job.status)
            if why is None:
                break
            if job.reclaimed_under:
                why = "spot reclaim (the instance was stopped under the job)"
            if reclaim.reclaimed(job.status) and not job.reclaimed_under and reclaim.can_wait(self):
                if not reclaim.wait_for_return(self, on_event, why, since=job.status.get("finished")):
                    break  # a notice said why; the reclaimed attempt's error stands
            job = self._attempt(code, push, pull, background, session, on_event,
                                {**extra, "attempt": {"n": n, "of": retries + 1, "why": why}}, retries)
            retry.tell_memory(job, self)
        return job

    def _attempt(self, code: str, push: dict[str, Any] | None, pull: list[str], background: bool, session: str,
                 on_event: EventHandler | None, extra: dict[str, Any], retries: int) -> Job:
        """One attempt (:meth:`_run_once`). With ``retries``, a link lost because AWS stopped the
        spot instance under the job is waited through: once the instance runs again, the job is
        followed to its end (failed: its worker went with the machine) for the next attempt."""
        try:
            return self._run_once(code, push, pull, background, session, on_event, extra)
        except errors.ConnectionLostError:
            job = self.last_job
            if not retries or background or job is None or not reclaim.can_wait(self) \
                    or not reclaim.machine_down(self):
                raise
            if not reclaim.wait_for_return(self, on_event, "the link was lost as AWS stopped the instance"):
                raise
        job.reclaimed_under = True
        try:
            job.follow(on_event)
        except errors.UnknownJobError:  # it never reached the target: this attempt again
            return self._run_once(code, push, pull, background, session, on_event, extra)
        return job

    def wait_through_reclaim(self, job: Job, timeout: float | None = None,
                             on_event: EventHandler | None = None) -> str:
        """:meth:`Job.wait`, through a spot reclaim: if the job's spot instance is reclaimed while it
        runs (the reclaim notice ends the job, or the link is lost as AWS stops the instance), wait
        (up to ``reclaim_wait_minutes``) until AWS starts it again, reconnect, follow the job to its
        end and restore the session's checkpoint -- taken at the reclaim notice -- into the fresh
        worker. Returns the job's final state (the reclaimed job stays ``interrupted``/``failed``:
        only ``run(..., retries=N)`` runs it again)."""
        ended = job.meta.get("state") in protocol.TERMINAL or job.status.get("state") in protocol.TERMINAL
        try:
            job.wait(timeout, on_event)
        except errors.ConnectionLostError:
            if ended or not reclaim.can_wait(self) or not reclaim.machine_down(self):
                raise
            if not reclaim.wait_for_return(self, on_event, "the link was lost as AWS stopped the instance"):
                raise
            job.follow(on_event)
            self._restore_after_reclaim(job, on_event)
            return job.state
        if not ended and reclaim.reclaimed(job.status) and reclaim.can_wait(self):
            why = retry.why_retry(job.status) or "spot reclaim"
            if reclaim.wait_for_return(self, on_event, why, since=job.status.get("finished")):
                self._restore_after_reclaim(job, on_event)
        return job.state

    def _restore_after_reclaim(self, job: Job, on_event: EventHandler | None) -> None:
        """After the instance came back: the job's session starts from its last checkpoint."""
        session = job.meta.get("session") or self.session
        if any(s["name"] == session and s.get("alive") for s in self.sessions()):
            return  # its worker lived through (not a machine stop): its namespace is whole
        try:  # (auto_restore: the agent leaves the "namespace lost" notice to this restore)
            self._internal_job("restore_checkpoint", [], session, on_event, auto_restore=True)
        except errors.RemoteError as exc:
            notices.notify(f"session '{session}' was not restored after the reclaim ({exc.ename}: {exc.evalue}); "
                           "it starts from a fresh namespace", logger=log)

    def _run_once(self, code: str, push: dict[str, Any] | None, pull: list[str], background: bool, session: str,
                  on_event: EventHandler | None, extra: dict[str, Any]) -> Job:
        """Submit one attempt of a cell; ``extra`` goes into its spec (``timeout``, ``attempt``...)."""
        for attempt_push in (1, 2):
            inputs = self._push(dict(push or {}), code)
            spec = {"id": state.new_job_id(), "session": session, "kind": "cell", "code": code, "inputs": inputs,
                    "outputs": pull, "cwd": self.cwd, "checkpoint_limit": self.checkpoint_limit,
                    "worker_idle_hours": self.worker_idle_hours, **extra}
            if self.auto_restore:
                spec["auto_restore"] = True
            spec["modules"] = values.local_module_sources(code)
            try:
                return self._submit(spec, background, on_event)
            except errors.RemoteRequestError as exc:
                if exc.kind != "MissingObject" or attempt_push == 2:
                    raise
                self._known.difference_update(inputs.values())  # evicted meanwhile: send again
        raise AssertionError("unreachable")

    def _submit(self, spec: dict[str, Any], background: bool, on_event: EventHandler | None) -> Job:
        job = Job(self, spec["id"])
        self.last_job = job
        job.submit(spec, background, on_event)
        return job

    def job(self, job_id: str) -> Job:
        """A job by id (or unique suffix/prefix), from the local index or the target."""
        return Job(self, self.resolve_job(job_id))

    def resolve_job(self, ref: str) -> str:
        ref = ref.strip()
        if protocol.JOB_RE.match(ref):
            if not state.JobRecord(self.state_root, ref).exists:
                info = self.request(protocol.OP_STATUS, job=ref)  # raises UnknownJobError
                self._adopt(ref, info["spec"], info["status"])
            return ref
        if not re.match(r"^[0-9a-f-]{2,}$", ref):
            raise errors.UnknownJobError(f"no job {ref!r}: give a job id, or a unique end of one")
        known = {j["id"] for j in state.list_jobs(self.state_root)}
        try:
            known |= {j["id"] for j in self.request(protocol.OP_JOBS, limit=1000)["jobs"]}
        except errors.ConnectionLostError:
            pass
        hits = sorted(j for j in known if j.endswith(ref) or j.startswith(ref))
        if len(hits) != 1:
            what = "no job" if not hits else f"{len(hits)} jobs"
            raise errors.UnknownJobError(f"{what} matching {ref!r} on {self.target}")
        return self.resolve_job(hits[0])

    def _adopt(self, job_id: str, spec: dict[str, Any], status: dict[str, Any]) -> None:
        """Index a job that another kernel submitted, so it can be waited on and mirrored here."""
        state.JobRecord(self.state_root, job_id).create(
            target=self.target, session=spec.get("session"), kind=spec.get("kind", "cell"),
            code=spec.get("code", ""), outputs=spec.get("outputs", []), submitted=spec.get("submitted"),
            state=status.get("state"), origin=spec.get("origin") or {}, reconnect=self.connect_args,
        )

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Jobs on the target (all sessions), newest last; the local index if it is unreachable."""
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive number of jobs, not {limit!r}")
        try:
            return self.request(protocol.OP_JOBS, limit=limit)["jobs"]
        except errors.ConnectionLostError:
            return state.list_jobs(self.state_root, self.target)[-limit:]

    def sessions(self) -> list[dict[str, Any]]:
        return self.request(protocol.OP_SESSIONS)["sessions"]

    def stop_session(self, session: str | None = None, grace: float = STOP_GRACE) -> bool:
        """Stop a session's worker (its namespace is dropped); False if none was running.
        See :meth:`stop_worker`."""
        return bool(self.stop_worker(session, grace)["stopped"])

    def stop_worker(self, session: str | None = None, grace: float = STOP_GRACE) -> dict[str, Any]:
        """Stop a session's worker for good and return when it is gone: its queued jobs fail,
        the running one is interrupted, then its process group gets SIGTERM, then SIGKILL
        (``grace`` seconds apart); every job it held or queued is failed with the reason.
        Returns ``{"stopped": bool, "how": "exit"|"SIGINT"|"SIGTERM"|"SIGKILL", "failed": [job ids]}``."""
        if not grace >= 0:
            raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")
        return self.request(protocol.OP_STOP_SESSION, session=protocol.check_name("session", session or self.session),
                            grace=float(grace))

    def status(self) -> dict[str, Any]:
        """The target, its sessions and recent jobs; on a provider's machine (EC2) also every
        machine of ours (``provider.status()``: every instance in the region with its hourly
        price and cost so far)."""
        recent = self.request(protocol.OP_JOBS, limit=20, active=True)
        out = {"target": self.target, "agent": self.info, "sessions": self.sessions(), "jobs": recent["jobs"],
               "active": recent["active"]}
        if self.provider is not None:
            out["instances"] = self.provider.status()
        return out

    # -- the machine (targets a provider starts and stops: EC2) --------------------------------------
    def _need_instance(self) -> Any:
        if self.provider is None or self.instance is None:
            raise ValueError(f"{self.target} is not an EC2 instance (nor another machine a provider starts and stops)")
        return self.provider

    def _machine_id(self) -> str:
        """How the provider names the machine: its id where it has one (EC2), else its name."""
        return str(getattr(self.instance, "instance_id", None) or self.instance.name)

    def stop_instance(self, wait: bool = True) -> Any:
        """Stop the instance (its disk, sessions' checkpoints and job logs stay); closes the link."""
        provider = self._need_instance()
        self.close()
        self.instance = provider.stop(self._machine_id(), wait=wait, progress=self.show_progress)
        return self.instance

    def terminate_instance(self, wait: bool = True) -> str:
        """Terminate the instance (its disk and everything on it are gone); return its id."""
        provider = self._need_instance()
        self.close()
        return provider.terminate(self._machine_id(), wait=wait, progress=self.show_progress)

    # -- tunnels and the remote environment -------------------------------------------------------
    def tunnel(self, remote_port: int, local_port: int = 0) -> Forward:
        """Forward ``127.0.0.1:local_port`` here to ``remote_port`` on the target (an SSH or EC2
        target; the local backend's ports are already here: ValueError)."""
        t = self.transport.open_forward(remote_port, local_port)
        self.tunnels[t.local_port] = t
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._closing.clear()
            self._heartbeat = threading.Thread(target=self._tunnel_heartbeat, name="remotemagic-heartbeat", daemon=True)
            self._heartbeat.start()
        return t

    def _tunnel_heartbeat(self) -> None:
        """While a tunnel is open, tell the agent every minute that the target is in use (an
        instance's idle auto-stop counts from the agent's last request, and a tunnel's traffic
        does not go through the agent)."""
        while not self._closing.wait(HEARTBEAT_EVERY):
            if not self.tunnels:
                return
            try:
                self.request(protocol.OP_PING)
            except Exception as exc:  # the link is down: the next request reconnects
                log.debug("heartbeat to %s failed: %s", self.target, exc)

    def close_tunnel(self, local_port: int) -> None:
        """Close the tunnel whose local end is ``local_port`` (KeyError: there is none)."""
        t = self.tunnels.pop(local_port, None)
        if t is None:
            raise KeyError(f"no tunnel on local port {local_port}")
        t.close()

    def pip_install(self, *packages: str) -> Iterator[str]:
        """``pip install`` into the target's Python environment; yields pip's output lines."""
        if not packages:
            raise ValueError("name at least one package")
        try:
            yield from self.transport.pip_install([p for p in packages if not p.startswith("-")],
                                                  *[p for p in packages if p.startswith("-")])
        finally:
            envsync.invalidate(self.transport)

    def sync_packages(self, dists: Iterable[str] | None = None, *, all: bool = False, code: str = "",
                      dry_run: bool = False) -> list[Any]:
        """Install local distributions on the target at their local versions (with their
        requirements): the ones ``code`` imports, the named ``dists``, or ``all=True`` every one.
        Returns the plan's rows (``.action``: installed, there, skew, skip, or install if dry_run)."""
        return envsync.sync_rows(self, dists, all=all, code=code, dry_run=dry_run)

    # -- files ---------------------------------------------------------------------------------
    def push(self, local: str | os.PathLike[str], dest: str | None = None) -> dict[str, Any]:
        """Copy a file or folder to the target (relative ``dest`` is under the session's folder).
        Resumes an interrupted file; for a folder sends only files that are missing or differ."""
        return transfer.push(self._endpoint(), local, dest)

    def pull(self, path: str, local: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Copy a file or folder from the target; resumes and skips like :meth:`push`."""
        return transfer.pull(self._endpoint(), path, local)

    def _endpoint(self) -> transfer.Endpoint:
        return transfer.Endpoint(self.connection(), cwd=self.cwd, codec=self.codec, show_progress=self.show_progress,
                                 same_machine=self.transport.is_local)

    # -- the store -----------------------------------------------------------------------------
    def store_put(self, name: str, value: Any) -> dict[str, Any]:
        """Store ``value`` under ``name`` on the target (like ``%store``, but remote)."""
        if not name.isidentifier():
            raise ValueError(f"cannot store {name!r}: not a Python identifier")
        digest = self._push({name: value})[name]
        meta = {"type": files.type_name(value), "preview": files.preview(value),
                "by": f"{os.uname().nodename} pid {os.getpid()}", "modules": self._pushed_modules.get(name, [])}
        try:
            return self.request(protocol.OP_STORE_PUT, name=name, hash=digest, meta=meta)
        except errors.RemoteRequestError as exc:
            if exc.kind != "MissingObject":
                raise
            self._known.discard(digest)  # evicted meanwhile: send again
            digest = self._push({name: value})[name]
            return self.request(protocol.OP_STORE_PUT, name=name, hash=digest, meta=meta)

    def store_get(self, name: str) -> Any:
        """Load a stored value (``KeyError`` if there is none)."""
        return read_streamed_object(self.connection().start_object(protocol.OP_STORE_GET, name=name, z=self.codec))

    def store_list(self) -> list[dict[str, Any]]:
        """Stored names with type, size in bytes and a short preview."""
        return self.request(protocol.OP_STORE_LIST)["values"]

    def store_delete(self, *names: str) -> list[str]:
        return self.request(protocol.OP_STORE_DELETE, names=list(names))["deleted"]

    def store_clear(self) -> list[str]:
        return self.request(protocol.OP_STORE_DELETE, names=None)["deleted"]

    def store_from_session(self, names: Iterable[str], session: str | None = None,
                           on_event: EventHandler | None = None) -> dict[str, Any]:
        """Store values that exist only in a remote session's namespace (they never travel here)."""
        job = self._internal_job("store", list(names), session, on_event)
        return job.status

    def restore_to_session(self, names: Iterable[str], session: str | None = None) -> dict[str, Any]:
        """Load stored values straight into a remote session's namespace."""
        names = list(names)
        wanted = set(names)
        modules = {m for v in self.store_list() if v.get("name") in wanted for m in v.get("modules") or ()}
        if modules:
            envsync.before_upload(self, extra=modules)
        job = self._internal_job("restore", list(names), session, None)
        return job.status

    def checkpoint(self, session: str | None = None, limit: int = 0,
                   on_event: EventHandler | None = None) -> dict[str, Any]:
        """Save the session's picklable variables (each at most ``limit`` bytes; 0: any size) on
        the target, so they can be restored after the worker dies. Returns the checkpoint index."""
        job = self._internal_job("checkpoint", [], session, on_event, limit=limit)
        return job.status.get("checkpoint", {})

    def restore_checkpoint(self, session: str | None = None, on_event: EventHandler | None = None) -> list[str]:
        """Load the session's last checkpoint into its (new) worker; return the names restored."""
        job = self._internal_job("restore_checkpoint", [], session, on_event)
        return job.status.get("restored", [])

    def _internal_job(self, kind: str, names: list[str], session: str | None, on_event: EventHandler | None,
                      **extra: Any) -> Job:
        for name in names:
            if not name.isidentifier():
                raise ValueError(f"{name!r} is not a Python identifier")
        session = protocol.check_name("session", session or self.session)
        spec = {"id": state.new_job_id(), "session": session, "kind": kind, "names": names, "cwd": self.cwd,
                "worker_idle_hours": self.worker_idle_hours, **extra}
        job = self._submit(spec, False, on_event)
        exc = job.error()
        if exc is not None:
            raise exc
        return job


# connecting to a target lives in remotemagic.connecting (the kinds in remotemagic.providers.registry)
from .connecting import connect, connect_ec2, default_local_root, default_session  # noqa: E402,F401
