"""A submitted cell: :class:`Job` -- its status, its event stream mirrored locally, its outputs.

A job talks to its target through a :class:`JobHost` (a :class:`remotemagic.api.Remote` is
one): the open agent connection and the few settings a job needs. This module never imports
``api``; ``Remote`` creates jobs and calls their public methods (:meth:`Job.submit`,
:meth:`Job.follow`...), and neither writes the other's private fields.

Streaming a job: the ``run`` (or ``events``) call's data frames are byte ranges of the job's
``events.jsonl`` on the target; each is appended to the local mirror (:mod:`remotemagic.state`)
and the new events are handed to ``on_event``. A dropped link is resumed from the mirror's
size. An ``-o`` value too big to come inline with the final status starts streaming as soon
as its ``output`` event arrives (:class:`OutputPrefetch`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from . import errors, notices, progress, state, values
from .agent import protocol
from .connection import AgentConnection, Call, read_streamed_object

log = logging.getLogger(__name__)

EventHandler = Callable[[dict[str, Any]], None]


class JobHost(Protocol):
    """What a job needs from the target it runs on (:class:`remotemagic.api.Remote`)."""

    target: str
    state_root: Path
    #: outputs up to this many bytes come back with the job's final status
    inline_limit: int
    #: the compression codec agreed with the agent (None: none)
    codec: str | None
    show_progress: bool
    #: stream a big ``-o`` value while the target still writes it
    prefetch_outputs: bool
    #: how another process can reach this target again (kept in each job's local record)
    connect_args: dict[str, Any] | None
    #: the notices shown to the user outside a job that renders them
    notices: list[dict[str, Any]]

    def connection(self) -> AgentConnection: ...

    def request(self, op: str, **args: Any) -> Any: ...


def parse_events(data: bytes) -> Iterator[dict[str, Any]]:
    """The events in a chunk of ``events.jsonl`` (whole lines)."""
    for line in data.splitlines():
        if line:
            yield json.loads(line)


def read_output(host: JobHost, job_id: str, name: str, size: int) -> Any:
    """Download and unpickle the finished ``-o`` value ``name`` of a job (a progress bar if it is big)."""
    update, close = progress.bar(size, f"pull {name}", host.show_progress)
    try:
        call = host.connection().start_object(protocol.OP_READ_OUTPUT, job=job_id, name=name, z=host.codec)
        return read_streamed_object(call, update)
    finally:
        close()


def agent_notice(host: JobHost, answer: dict[str, Any]) -> None:
    """Show (and keep in ``host.notices``) a notice the agent sent outside a job's log."""
    if answer.get("notice"):
        host.notices.append(notices.notify(answer["notice"], logger=log))


class OutputPrefetch:
    """One ``-o`` value streamed while the target is still writing it to disk.

    Started by the job's ``output`` event (its name and size): the worker's write (and fsync)
    and the transfer overlap instead of running one after the other. The value is only used
    if the job's final status lists the output with the same size; on any failure
    :meth:`Job.result` reads the finished file the usual way."""

    def __init__(self, host: JobHost, job_id: str, name: str, size: int):
        self.host, self.job_id, self.name, self.size = host, job_id, name, size
        self.received = 0
        self.value: Any = None
        self.error: BaseException | None = None
        self.call: Call | None = None
        self.cancelled = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"remotemagic-prefetch-{name}", daemon=True)
        self.thread.start()

    def _count(self, n: int) -> None:
        self.received += n

    def cancel(self) -> None:
        """Nobody will take the value (Ctrl-C, the job failed): stop the transfer, free the memory."""
        with self.lock:
            self.cancelled = True
            call = self.call
        if call is not None:
            call.close()

    def _run(self) -> None:
        try:
            call = self.host.connection().start_object(protocol.OP_READ_OUTPUT, job=self.job_id, name=self.name,
                                                       follow=True, size=self.size, z=self.host.codec)
            with self.lock:
                self.call = call
                if self.cancelled:
                    call.close()
            self.value = read_streamed_object(call, self._count)
        except BaseException as exc:  # reported by take(); the caller falls back to a plain read
            self.error = exc

    def take(self) -> Any:
        """Wait for the rest (with a progress bar for what is left); the value, or raise."""
        if self.thread.is_alive():
            update, close = progress.bar(self.size, f"pull {self.name}", self.host.show_progress)
            try:
                shown = self.received
                update(shown)
                while self.thread.is_alive():
                    self.thread.join(0.1)
                    update(self.received - shown)
                    shown = self.received
            finally:
                close()
        if self.error is not None:
            raise self.error
        return self.value


def _expire(call: Call) -> None:
    """Wake the consumer of ``call`` with a marker frame: the wait timeout has passed."""
    try:
        call.queue.put_nowait(({"more": True, "expired": True}, b""))
    except Exception:
        pass


class Job:
    """A cell submitted to a target. Its log is mirrored locally as it streams."""

    def __init__(self, remote: JobHost, job_id: str):
        self.remote = remote
        self.id = job_id
        self.record = state.JobRecord(remote.state_root, job_id)
        self._values: dict[str, Any] = {}
        self._status: dict[str, Any] | None = None
        self._prefetch: dict[str, OutputPrefetch] = {}
        self._following = False  # this process mirrors the job's log now (``_stream``)
        self.marked_watched = False  # its record says ``watched`` (written by ``_finish``)
        #: set by ``Remote.run`` when its machine was stopped under this job (a spot reclaim that
        #: cut the link) and came back: the job's end is put down to the reclaim
        self.reclaimed_under = False

    def __repr__(self) -> str:
        return f"<Job {self.id} on {self.remote.target} [{self.state}]>"

    # -- status --------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return self.record.meta

    @property
    def status(self) -> dict[str, Any]:
        """The job's status as last heard from the target (its final one once it ended; ``{}``
        before any): ``state``, ``error``, ``outputs``, ``missing``..., and what internal jobs
        return (``checkpoint``, ``restored``)."""
        return self._status or {}

    @property
    def state(self) -> str:
        """queued, running, done, error, interrupted, timeout, cancelled or failed."""
        if self._status and self._status.get("state") in protocol.TERMINAL:
            return self._status["state"]
        meta = self.meta
        if meta.get("state") in protocol.TERMINAL:
            return meta["state"]
        try:
            self._status = self.remote.request(protocol.OP_STATUS, job=self.id)["status"]
            return self.status.get("state", "unknown")
        except errors.ConnectionLostError:
            return meta.get("state", "unknown")

    @property
    def done(self) -> bool:
        return self.state in protocol.TERMINAL

    # -- submitting and streaming ----------------------------------------------------------------
    def submit(self, spec: dict[str, Any], background: bool, on_event: EventHandler | None) -> None:
        """Index the job locally and send it (``spec["id"]`` is this job's id). In the foreground,
        stream its events to ``on_event`` until it ends; with ``background``, return at once."""
        # in the foreground this process mirrors it from the start (see ``_stream``): one write, not two
        following = {} if background else {"follower": os.getpid()}
        record = dict(target=self.remote.target, session=spec["session"], kind=spec["kind"],
                      code=spec.get("code", ""), outputs=spec.get("outputs", []), submitted=time.time(),
                      state="queued", origin=spec.get("origin") or {}, reconnect=self.remote.connect_args,
                      **following)
        if background:
            self.record.create(**record)
            agent_notice(self.remote, self.remote.request(protocol.OP_RUN, spec=spec, follow=False))
            return
        self._stream(spec, on_event, None, record)

    def follow(self, on_event: EventHandler | None = None, timeout: float | None = None) -> str:
        """Stream events after the mirror's end until the job ends; return its final state."""
        return self._stream(None, on_event, timeout)

    def _stream(self, spec: dict[str, Any] | None, on_event: EventHandler | None, timeout: float | None,
                record: dict[str, Any] | None = None) -> str:
        """Submit (if ``spec``; ``record``: its local record, written once it is sent) and/or
        stream the job's log into the mirror until it ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if spec is None:  # (a new job's record names its follower from the start: ``submit``)
            self.record.update(follower=os.getpid())  # someone mirrors it: the Jupyter extension need not
        self._following = True  # ``_finish`` lets go in the same write as the final state
        try:
            return self._stream_until_done(spec, on_event, deadline, record)
        except BaseException:  # Ctrl-C, a wait timeout: nobody takes streamed outputs now
            self._cancel_prefetch()
            raise
        finally:
            if self._following:
                self._following = False
                if self.record.exists:  # (not if it failed before it was sent)
                    self.record.update(os.getpid())

    def _stream_until_done(self, spec: dict[str, Any] | None, on_event: EventHandler | None,
                           deadline: float | None, record: dict[str, Any] | None = None) -> str:
        host = self.remote
        while True:
            conn = host.connection()
            try:
                if spec is not None:
                    call = conn.start(protocol.OP_RUN, spec=spec, follow=True, inline=host.inline_limit, z=host.codec)
                else:
                    call = conn.start(protocol.OP_EVENTS, job=self.id, offset=self.record.offset, follow=True,
                                      inline=host.inline_limit, z=host.codec)
                if record is not None:  # written while the target starts the job (~0.4 ms off each cell)
                    self.record.create(**record)
                    record = None
                self._consume(call, on_event, deadline)
                return self.state
            except errors.ConnectionLostError as exc:
                log.warning("connection to %s lost while following job %s (%s); resuming", host.target, self.id, exc)
                if spec is not None:
                    try:
                        host.connection().request(protocol.OP_STATUS, job=self.id)
                        spec = None  # it was submitted; just resume the log
                    except errors.UnknownJobError:
                        pass  # never arrived: submit again
            except errors.UnknownJobError:
                raise errors.UnknownJobError(
                    f"job {self.id} is not on {host.target} (was its folder removed?)") from None

    def _consume(self, call: Call, on_event: EventHandler | None, deadline: float | None) -> None:
        timer = None
        if deadline is not None:
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), _expire, args=(call,))
            timer.daemon = True
            timer.start()
        try:
            for header, payload in call:
                if header.get("expired"):
                    call.abandon()
                    raise TimeoutError(f"job {self.id} still running after the wait timeout")
                if "notice" in header:
                    agent_notice(self.remote, header)
                    continue
                new = self.record.append(header["offset"], payload)
                for event in parse_events(new) if new else ():
                    if event.get("type") == "output" and self.remote.prefetch_outputs:
                        self._prefetch_output(event)
                    if on_event is not None:
                        on_event(event)
                    elif notices.is_notice(event):  # nobody renders this job: still tell the user
                        self.remote.notices.append(event)
                        notices.deliver(event)
        finally:
            if timer is not None:
                timer.cancel()
        result = call.result or {}
        if not result.get("detached"):
            self._finish(result.get("status") or {}, result.get("inline") or {}, call.payload)

    def _finish(self, status: dict[str, Any], inline: dict[str, int], payload: bytes) -> None:
        """The job ended with ``status``; ``payload`` holds the inline outputs (name -> size, in order)."""
        self._status = status
        if status.get("state") != "done":
            self._cancel_prefetch()  # result() raises the job's error: streamed outputs go unused
        offset = 0
        for name, size in inline.items():
            self._values[name] = values.decode(memoryview(payload)[offset : offset + size])
            offset += size
        release = os.getpid() if self._following else None  # the job ended: we mirror it no more (one write)
        self._following = False
        # a cell that showed this job to its end marks it watched in the same write (``Remote.watching``)
        seen = {"watched": True} if getattr(self.remote, "watching", False) else {}
        self.marked_watched = self.marked_watched or bool(seen)
        self.record.update(release, state=status.get("state"), finished=status.get("finished"), status=status, **seen)

    def wait(self, timeout: float | None = None, on_event: EventHandler | None = None) -> str:
        """Block until the job ends (``TimeoutError`` after ``timeout`` s); return its state."""
        if self._status is None:  # (a job followed to its end here has it: no read of the index)
            meta = self.meta
            if meta.get("state") in protocol.TERMINAL:
                self._status = meta.get("status")
        if self._status and self._status.get("state") in protocol.TERMINAL:
            return self._status["state"]
        return self.follow(on_event, timeout)

    def sync(self) -> None:
        """Fetch whatever the target has logged beyond the mirror, without waiting for more."""
        call = self.remote.connection().start(protocol.OP_EVENTS, job=self.id, offset=self.record.offset, follow=False)
        for header, payload in call:
            self.record.append(header["offset"], payload)
        status = (call.result or {}).get("status") or {}
        if status.get("state") in protocol.TERMINAL:
            self._status = status
            self.record.update(state=status["state"], finished=status.get("finished"), status=status)

    # -- events --------------------------------------------------------------------------------
    def events(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """Every event mirrored so far, from byte ``start`` (no network)."""
        return self.record.events(start)

    # -- interacting with the running job ----------------------------------------------------------
    def cancel(self, kill: bool = False, reason: str | None = None) -> str:
        """Interrupt the job if running (KeyboardInterrupt on the target), drop it if queued.

        ``kill=True``: kill the worker running it (its whole process group) at once -- for code
        that ignores KeyboardInterrupt. The job ends ``cancelled``; the session's namespace is
        lost (a notice says so); ``reason`` is recorded as the job's error."""
        ans = self.remote.request(protocol.OP_CANCEL, job=self.id, kill=bool(kill),
                                  **({"reason": reason} if reason else {}))
        agent_notice(self.remote, ans)
        return ans["state"]

    def answer_input(self, seq: int, value: str | None = None, error: BaseException | None = None) -> bool:
        """Answer the job's ``input_request`` number ``seq`` with ``value`` (or make the remote
        ``input()`` raise ``error``'s type and message). False if it no longer waits for it."""
        answer: dict[str, Any] = ({"error": {"ename": type(error).__name__, "evalue": str(error)}}
                                  if error is not None else {"value": str(value or "")})
        return bool(self.remote.request(protocol.OP_STDIN, job=self.id, seq=int(seq), answer=answer).get("waiting"))

    def input_pending(self, seq: int) -> bool:
        """Whether the job still waits for the answer to its ``input_request`` number ``seq``."""
        return bool(self.remote.request(protocol.OP_STDIN, job=self.id, seq=int(seq)).get("waiting"))

    # -- results -------------------------------------------------------------------------------
    def error(self) -> errors.RemoteError | None:
        """The job's failure as an exception (with the remote traceback), or None."""
        st = self._status or self.meta.get("status") or {}
        stt = st.get("state")
        if stt in (None, "done"):
            return None
        err = dict(st.get("error") or {})
        tb: list[str] = []
        for ev in self.events():
            if ev.get("type") == "error":
                tb = ev.get("traceback") or []
                if not err:
                    err = ev
                if ev.get("ename") == err.get("ename") and ev.get("emodule"):
                    err.setdefault("emodule", ev["emodule"])  # where the type lives: re-raised as that type
        return errors.remote_error(self.id, stt, err.get("ename", stt), err.get("evalue", ""), tb, err.get("emodule"))

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait, then return the pulled ``-o`` values by name.

        Raises :class:`RemoteError` if the code failed, :class:`MissingOutputError` (carrying
        the values that did arrive) if some names were not defined, could not be pickled or saved.
        """
        self.wait(timeout)
        exc = self.error()
        if exc is not None:
            raise exc
        st = self.status
        got: dict[str, Any] = {}
        for name, meta in (st.get("outputs") or {}).items():
            if name not in self._values:
                self._values[name] = self._take_prefetched(name, meta.get("size", 0))
            got[name] = self._values[name]
        self._cancel_prefetch()  # streams of values the status does not list (not saved): stopped
        problems = []
        if st.get("missing"):
            problems.append("not defined by the cell: " + ", ".join(st["missing"]))
        for name, why in (st.get("unpicklable") or {}).items():
            problems.append(f"{name!r} {why}")
        if problems:
            raise errors.MissingOutputError(
                f"job {self.id}: some outputs did not arrive -- " + "; ".join(problems), got)
        return got

    def release_values(self) -> None:
        """Forget the pulled values this job holds: whoever took them from :meth:`result` now
        holds the only reference, so deleting them frees their memory. A later
        :meth:`result` reads them from the target again."""
        self._values.clear()

    def _prefetch_output(self, event: dict[str, Any]) -> None:
        """An ``output`` event: start streaming that value if it is too big to come inline."""
        name, size = event.get("name"), event.get("size")
        if (isinstance(name, str) and isinstance(size, int) and size > self.remote.inline_limit
                and name not in self._prefetch and name not in self._values):
            self._prefetch[name] = OutputPrefetch(self.remote, self.id, name, size)

    def _cancel_prefetch(self) -> None:
        for pf in self._prefetch.values():
            pf.cancel()
        self._prefetch.clear()

    def _take_prefetched(self, name: str, size: int) -> Any:
        pf = self._prefetch.pop(name, None)
        if pf is not None and pf.size == size:
            try:
                return pf.take()
            except Exception as exc:
                log.debug("streaming %s of job %s while it was written failed (%s); reading it again",
                          name, self.id, exc)
        elif pf is not None:
            pf.cancel()  # another size than announced: that stream is not this value
        return read_output(self.remote, self.id, name, size)
