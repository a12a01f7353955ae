"""The wire protocol in one place: op names, job states, name rules and the shapes of what travels.

Both ends import this module: the agent as ``remotemagic_agent.protocol``, the local side as
``remotemagic.agent.protocol``. It imports nothing but ``typing`` and ``re`` (it is shipped to
every target with the rest of the agent).

What travels (frames: see :mod:`.wire`):

* a **request** header ``{"id": n, "op": OP_..., ...}`` with the op's fields (``*Request`` below);
* zero or more **data frames** ``{"id": n, "more": true, ...}`` (chunks of a file, a log, a pickle);
* one **answer** ``{"id": n, "ok": true, "result": {...}}`` (``*Answer`` below) or
  ``{"id": n, "ok": false, "error": {"type", "message", "detail"}}`` (:class:`ErrorAnswer`).

On disk under ``<root>/jobs/<id>/`` (and mirrored by the client): ``spec.json`` (:class:`JobSpec`),
``status.json`` (:class:`JobStatus`) and ``events.jsonl``, one :data:`Event` a line.

The TypedDicts are for type checkers and for :func:`check`, which the agent applies to every spec
it is given (an unknown or missing key is a clear error, not a silently ignored option) and the
tests apply to what the agent writes.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping, TypedDict

PROTOCOL = 1

# -- op names ----------------------------------------------------------------------------------
# Stream-level frames, handled in the agent's reader thread, in order.
OP_UPLOAD_BEGIN = "upload_begin"
OP_DATA = "data"
OP_UPLOAD_END = "upload_end"
OP_CANCEL_STREAM = "cancel_stream"
UPLOAD_OPS = (OP_DATA, OP_UPLOAD_BEGIN, OP_UPLOAD_END)

# Requests, each answered once (agent/ops_*.py).
OP_HELLO = "hello"
OP_PING = "ping"
OP_HAS_OBJECTS = "has_objects"
OP_EVICT_OBJECTS = "evict_objects"
OP_RUN = "run"
OP_EVENTS = "events"
OP_STATUS = "status"
OP_JOBS = "jobs"
OP_CANCEL = "cancel"
OP_STDIN = "stdin"
OP_READ_OUTPUT = "read_output"
OP_SESSIONS = "sessions"
OP_STOP_SESSION = "stop_session"
OP_STORE_PUT = "store_put"
OP_STORE_LIST = "store_list"
OP_STORE_GET = "store_get"
OP_STORE_DELETE = "store_delete"
OP_STAT = "stat"
OP_LIST_TREE = "list_tree"
OP_TAR_STREAM = "tar_stream"
OP_HASH_PREFIX = "hash_prefix"
OP_READ_FILE = "read_file"
# detached long-running processes, e.g. the Dask cluster's scheduler and nannies (agent/services.py)
OP_SERVICE_FILES = "service_files"
OP_SERVICE_START = "service_start"
OP_SERVICE_STATUS = "service_status"
OP_SERVICE_STOP = "service_stop"
OP_SERVICE_LOGS = "service_logs"
OP_SERVICE_READ = "service_read"

# -- job states --------------------------------------------------------------------------------
QUEUED = "queued"  # spec written, not claimed by a worker yet
RUNNING = "running"
DONE = "done"  # the cell ran to its end
ERROR = "error"  # the cell raised (or the job could not run: a broken input, a full disk)
INTERRUPTED = "interrupted"  # KeyboardInterrupt: a cancel, a spot reclaim
FAILED = "failed"  # its worker died or was stopped (restart) under it
TIMEOUT = "timeout"  # it ran past its ``timeout``
CANCELLED = "cancelled"  # cancelled before it started, or killed with its worker (cancel --kill)
TERMINAL = (DONE, ERROR, INTERRUPTED, FAILED, TIMEOUT, CANCELLED)
STATES = (QUEUED, RUNNING) + TERMINAL

# -- job kinds ---------------------------------------------------------------------------------
KIND_CELL = "cell"
KIND_STORE = "store"  # save names of the namespace in the store
KIND_RESTORE = "restore"  # load names from the store into the namespace
KIND_CHECKPOINT = "checkpoint"
KIND_RESTORE_CHECKPOINT = "restore_checkpoint"
JOB_KINDS = (KIND_CELL, KIND_STORE, KIND_RESTORE, KIND_CHECKPOINT, KIND_RESTORE_CHECKPOINT)

# -- name rules --------------------------------------------------------------------------------
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
"""Session names (and other folder names a user picks): they become one folder, never a path."""
JOB_RE = re.compile(r"^\d{8}-\d{6}-\d{3}-[0-9a-f]{4}$")
"""Job ids: ``YYYYMMDD-HHMMSS-mmm-xxxx`` (UTC, then 16 random bits): sortable, one folder."""
OBJECT_RE = re.compile(r"^[0-9a-f]{32,64}$")
"""Names of pushed values under ``objects/``: the hex xxh3-128 of the object file (32 digits;
up to 64 are accepted)."""


def check_name(kind: str, name: Any) -> str:
    """Refuse names that could escape their folder (``..``, ``/``, empty, too long)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "not starting with '.' or '-'"
        )
    return name


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not JOB_RE.match(job_id):
        raise ValueError(f"invalid job id {job_id!r} (expected like 20260101-120000-123-ab12)")
    return job_id


def check_identifier(name: Any, what: str = "store") -> str:
    """Store names and ``-o`` output names are Python identifiers (they are variables)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid {what} name {name!r}: must be a Python identifier")
    return name


def check_object_name(digest: Any) -> str:
    if not isinstance(digest, str) or not OBJECT_RE.match(digest):
        raise ValueError(f"invalid object hash {digest!r}")
    return digest


# -- the job: spec, status, events ---------------------------------------------------------------
class Attempt(TypedDict):
    n: int
    of: int
    why: str


class _JobSpecKeys(TypedDict):
    id: str
    session: str
    kind: str  # one of JOB_KINDS


class JobSpec(_JobSpecKeys, total=False):
    """``jobs/<id>/spec.json``: what the client asks for (``submitted`` is added by the agent)."""

    code: str
    inputs: dict[str, str]  # variable name -> object name (pushed values)
    outputs: list[str]  # -o names: saved as outputs/<name>.obj after the cell
    cwd: str
    timeout: float | None
    execution_count: int | None  # run as In[n]
    colors: str | None  # the notebook's traceback colour theme
    stdin: bool  # input() is asked through the client (else it raises at once)
    origin: dict[str, Any]  # notebook, cell, page: remotemagic.notebook.current_origin
    attempt: Attempt  # --retry: this is attempt n of ``of``
    auto_restore: bool
    modules: dict[str, str]  # local modules the cell imports: relative path -> source
    checkpoint_limit: int  # automatic checkpoint after the cell: values up to this many bytes
    worker_idle_hours: float | None
    names: list[str]  # store / restore
    limit: int  # checkpoint
    submitted: float


class JobError(TypedDict, total=False):
    ename: str
    evalue: str
    traceback: list[str]
    emodule: str | None  # the exception's module: the client re-raises the same type
    peak_rss: int  # a dead worker's peak memory and the machine's (bytes)
    mem_total: int
    signal: int


class OutputInfo(TypedDict):
    size: int
    type: str


class _JobStatusKeys(TypedDict):
    state: str  # one of STATES


class JobStatus(_JobStatusKeys, total=False):
    """``jobs/<id>/status.json``, written atomically by the worker (or the agent, its supervisor)."""

    started: float
    finished: float
    pid: int
    error: JobError
    outputs: dict[str, OutputInfo]  # cell: the -o values saved
    missing: list[str]  # cell, store, restore: names that were not there
    unpicklable: dict[str, str]  # cell: -o names that could not be saved, and why
    stored: dict[str, dict[str, Any]]  # store: name -> metadata
    restored: list[str]  # restore, restore_checkpoint
    checkpoint: dict[str, Any]  # checkpoint, restore_checkpoint: the checkpoint's index
    kept: bool  # checkpoint: nothing new saved, the previous checkpoint stays


class _EventBase(TypedDict, total=False):
    time: Any  # when it was written (the worker adds it to every event)


class StreamEvent(_EventBase):
    type: Literal["stream"]
    name: str  # stdout | stderr
    text: str


class DisplayEvent(_EventBase):
    type: Literal["display_data", "update_display_data"]
    data: dict[str, Any]
    metadata: dict[str, Any]
    transient: dict[str, Any]


class ExecuteResultEvent(_EventBase):
    type: Literal["execute_result"]
    data: dict[str, Any]
    metadata: dict[str, Any]
    execution_count: int


class ClearOutputEvent(_EventBase):
    type: Literal["clear_output"]
    wait: bool


class _ErrorEventKeys(_EventBase):
    type: Literal["error"]
    ename: str
    evalue: str
    traceback: list[str]


class ErrorEvent(_ErrorEventKeys, total=False):
    emodule: str | None
    peak_rss: int
    mem_total: int
    signal: int


class NoticeEvent(_EventBase):
    """Something the user must know about this job, shown in the cell (remotemagic.notices)."""

    type: Literal["notice"]
    level: str  # info | warning
    text: str


class OutputEvent(_EventBase):
    """An -o value's file exists (``outputs/<name>.obj.part``): a client may stream it now."""

    type: Literal["output"]
    name: str
    size: int


class InputRequestEvent(_EventBase):
    type: Literal["input_request"]
    job: str
    seq: int
    prompt: str
    password: bool


class PageEvent(_EventBase):
    type: Literal["page"]
    data: dict[str, Any]
    start: int


class _StatusEventKeys(_EventBase):
    type: Literal["status"]
    state: str


class StatusEvent(_StatusEventKeys, total=False):
    status: JobStatus  # a final status event: the job's whole status (what status.json holds)


class SpotNoticeEvent(TypedDict):
    type: Literal["spot_notice"]
    action: str
    time: str  # when the machine goes (not when the event was written)


Event = (StreamEvent | DisplayEvent | ExecuteResultEvent | ClearOutputEvent | ErrorEvent | NoticeEvent | OutputEvent
         | InputRequestEvent | PageEvent | StatusEvent | SpotNoticeEvent)
EVENT_TYPES: dict[str, type] = {
    "stream": StreamEvent,
    "display_data": DisplayEvent,
    "update_display_data": DisplayEvent,
    "execute_result": ExecuteResultEvent,
    "clear_output": ClearOutputEvent,
    "error": ErrorEvent,
    "notice": NoticeEvent,
    "output": OutputEvent,
    "input_request": InputRequestEvent,
    "page": PageEvent,
    "status": StatusEvent,
    "spot_notice": SpotNoticeEvent,
}


# -- request and answer headers ----------------------------------------------------------------
class ErrorAnswer(TypedDict):
    """``"error"`` of a failed answer: ``type`` names the local exception (remotemagic.errors)."""

    type: str
    message: str
    detail: str


class RequestError(Exception):
    """Raised by an op handler: answered as an :class:`ErrorAnswer` with this message as-is
    (``kind`` becomes the local exception class, see ``remotemagic.errors.from_agent``)."""

    def __init__(self, message: str, kind: str = "RemoteRequestError"):
        super().__init__(message)
        self.kind = kind


class HelloAnswer(TypedDict):
    protocol: int
    python: str
    executable: str
    cloudpickle: str
    ipython: str | None
    root: str
    home: str
    pid: int
    platform: str
    cpus: int | None
    codecs: list[str]


class Header(TypedDict):
    """What every request frame's header carries besides the op's own fields."""

    id: int  # answers carry it; any number of requests are in flight at once
    op: str


class _UploadBeginKeys(Header):
    kind: str  # object | file | tar
    size: int


class UploadBeginRequest(_UploadBeginKeys, total=False):
    """``upload_begin``, then ``data`` frames (``z``: compressed), then ``upload_end``."""

    hash: str  # object: its name
    dest: str  # file, tar: where on the target
    cwd: str | None
    offset: int  # file: resume a partial upload from here
    mode: int | None
    mtime: float | None


class HasObjectsRequest(Header, total=False):
    hashes: list[str]  # answer: {"missing": [...]}; the others count as just used


class _EvictObjectsKeys(Header):
    limit: int  # bytes: drop least recently used objects until the cache is under it


class EvictObjectsRequest(_EvictObjectsKeys, total=False):
    keep: list[str]  # answer: {"removed", "total"}


class _RunKeys(Header):
    spec: JobSpec


class RunRequest(_RunKeys, total=False):
    follow: bool  # stream the job's events (the answer is then an EventsAnswer)
    inline: int  # with follow: -o values up to this many bytes come in the final payload
    z: str  # the codec data frames may use (see wire.codecs_available)


class RunAnswer(TypedDict, total=False):
    job: str
    state: str
    notice: str


class _JobRef(Header):
    job: str


class EventsRequest(_JobRef, total=False):
    offset: int  # of events.jsonl: data frames carry {"offset"} and complete lines from there
    follow: bool
    inline: int
    z: str


class EventsAnswer(TypedDict, total=False):
    job: str
    status: JobStatus
    offset: int
    inline: dict[str, int]  # -o name -> size, concatenated in the final payload in this order
    detached: bool  # the client cancelled the stream


class StatusAnswer(TypedDict):
    spec: JobSpec
    status: JobStatus
    log_size: int


class JobsRequest(Header, total=False):
    limit: int
    active: bool  # also every queued or running job id


class CancelRequest(_JobRef, total=False):
    kill: bool  # kill the worker with it (its namespace is lost)
    reason: str


class CancelAnswer(TypedDict, total=False):
    state: str  # a job state, or "interrupting"
    killed: bool
    notice: str | None


class _StdinKeys(_JobRef):
    seq: int


class StdinRequest(_StdinKeys, total=False):
    answer: dict[str, Any]  # {"value"} or {"error": {"ename", "evalue"}}; without: still waiting?


class _ReadOutputKeys(_JobRef):
    name: str


class ReadOutputRequest(_ReadOutputKeys, total=False):
    follow: bool  # stream it while the worker writes it (needs size)
    size: int
    z: str


class _StopSessionKeys(Header):
    session: str


class StopSessionRequest(_StopSessionKeys, total=False):
    reason: str
    grace: float


class StopSessionAnswer(TypedDict, total=False):
    stopped: bool
    how: str  # exit | SIGINT | SIGTERM | SIGKILL
    failed: list[str]
    notice: str


class _StorePutKeys(Header):
    name: str
    hash: str  # an uploaded object


class StorePutRequest(_StorePutKeys, total=False):
    meta: dict[str, Any]


class _StoreGetKeys(Header):
    name: str


class StoreGetRequest(_StoreGetKeys, total=False):
    z: str


class StoreDeleteRequest(Header, total=False):
    names: list[str] | None  # None: every stored value


class _PathKeys(Header):
    """A path on the target: ``~`` expanded, relative to ``cwd`` (default home)."""

    path: str


class StatRequest(_PathKeys, total=False):
    cwd: str | None
    partial: bool  # also the size and sha256 of ``<path>.rmpart``


class ListTreeRequest(_PathKeys, total=False):
    cwd: str | None
    missing_ok: bool


class _TarStreamKeys(_PathKeys):
    files: list[list[Any]]  # entries of list_tree


class TarStreamRequest(_TarStreamKeys, total=False):
    cwd: str | None
    z: str


class _HashPrefixKeys(_PathKeys):
    size: int


class HashPrefixRequest(_HashPrefixKeys, total=False):
    cwd: str | None


class ReadFileRequest(_PathKeys, total=False):
    cwd: str | None
    offset: int
    z: str


class _ServiceGroupKeys(Header):
    group: str  # a name (NAME_RE): the services of one cluster


class ServiceFilesRequest(_ServiceGroupKeys, total=False):
    files: dict[str, str]  # file name -> text, written 0600 into the group's folder


class _ServiceStartKeys(_ServiceGroupKeys):
    name: str
    module: str  # run as ``python -m module args...`` under a supervisor that restarts it


class ServiceStartRequest(_ServiceStartKeys, total=False):
    args: list[str]
    env: dict[str, str] | None
    max_restarts: int
    restart_while_reachable: str | None  # host:port: restart only while it answers
    reachable_via: str | None  # the group's service behind that address: ended here, not waited for


class ServiceStatusRequest(Header, total=False):
    group: str | None  # None: the groups there are


class ServiceStopRequest(_ServiceGroupKeys, total=False):
    names: list[str] | None  # None: every service of the group
    grace: float
    remove: bool  # also delete the group's folder (keys, logs)


class _ServiceNameKeys(_ServiceGroupKeys):
    name: str


class ServiceLogsRequest(_ServiceNameKeys, total=False):
    lines: int


OPS: dict[str, type] = {
    OP_HELLO: Header, OP_PING: Header,
    OP_HAS_OBJECTS: HasObjectsRequest, OP_EVICT_OBJECTS: EvictObjectsRequest,
    OP_RUN: RunRequest, OP_EVENTS: EventsRequest, OP_STATUS: _JobRef, OP_JOBS: JobsRequest,
    OP_CANCEL: CancelRequest, OP_STDIN: StdinRequest, OP_READ_OUTPUT: ReadOutputRequest,
    OP_SESSIONS: Header, OP_STOP_SESSION: StopSessionRequest,
    OP_STORE_PUT: StorePutRequest, OP_STORE_LIST: Header, OP_STORE_GET: StoreGetRequest,
    OP_STORE_DELETE: StoreDeleteRequest,
    OP_STAT: StatRequest, OP_LIST_TREE: ListTreeRequest, OP_TAR_STREAM: TarStreamRequest,
    OP_HASH_PREFIX: HashPrefixRequest, OP_READ_FILE: ReadFileRequest,
    OP_SERVICE_FILES: ServiceFilesRequest, OP_SERVICE_START: ServiceStartRequest,
    OP_SERVICE_STATUS: ServiceStatusRequest, OP_SERVICE_STOP: ServiceStopRequest,
    OP_SERVICE_LOGS: ServiceLogsRequest, OP_SERVICE_READ: _ServiceNameKeys,
}
"""Every request op and the shape of its header: the agent checks each request against it."""


# -- checking ------------------------------------------------------------------------------------
def check(shape: type, data: Any, what: str) -> Any:
    """Raise ValueError (naming ``what`` and the keys) unless ``data`` is a mapping with every
    required key of the TypedDict ``shape`` and no key it does not declare. Returns ``data``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a JSON object, not {type(data).__name__}")
    required: frozenset[str] = getattr(shape, "__required_keys__", frozenset())
    known = required | getattr(shape, "__optional_keys__", frozenset())
    missing = sorted(required - data.keys())
    unknown = sorted(k for k in data if k not in known)
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}" if missing else "",
                 f"unknown {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})" if unknown else ""]
        raise ValueError(f"invalid {what}: " + "; ".join(p for p in parts if p))
    return data


def check_spec(spec: Any) -> JobSpec:
    """A job spec as the agent accepts it: the keys of :class:`JobSpec`, a valid id, session and kind."""
    check(JobSpec, spec, "job spec")
    check_job_id(spec["id"])
    check_name("session", spec["session"])
    if spec["kind"] not in JOB_KINDS:
        raise ValueError(f"invalid job spec: unknown kind {spec['kind']!r} (known: {', '.join(JOB_KINDS)})")
    return spec  # type: ignore[no-any-return]


def check_status(status: Any) -> JobStatus:
    check(JobStatus, status, "job status")
    if status["state"] not in STATES:
        raise ValueError(f"invalid job status: unknown state {status['state']!r}")
    return status  # type: ignore[no-any-return]


def check_event(event: Any) -> Event:
    """An event of a job's log: a known ``type`` with that type's keys."""
    kind = event.get("type") if isinstance(event, Mapping) else None
    shape = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if shape is None:
        raise ValueError(f"invalid event: unknown type {kind!r} (known: {', '.join(sorted(EVENT_TYPES))})")
    return check(shape, event, f"{kind} event")  # type: ignore[no-any-return]
