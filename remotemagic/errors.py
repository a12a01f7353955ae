"""Exceptions raised by remotemagic. Every one says what happened and what to do."""

from __future__ import annotations

from typing import Any


class RemoteMagicError(Exception):
    """Base class of remotemagic's errors."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows this one line instead of a traceback through remotemagic's code."""
        return [f"{type(self).__name__}: {self}"]


class ConnectionLostError(RemoteMagicError, ConnectionError):
    """The link to the target dropped and could not be re-established in time."""


class RemoteRequestError(RemoteMagicError):
    """The agent on the target refused or failed a request."""

    def __init__(self, message: str, kind: str = "RemoteRequestError", detail: str = ""):
        super().__init__(message)
        self.kind = kind
        self.detail = detail


class UnknownJobError(RemoteMagicError, KeyError):
    """No job with that id, neither on the target nor in the local index."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown job"


class RemoteDiskError(RemoteRequestError, OSError):
    """Writing on the target failed (typically: its disk is full)."""


class UnpicklableValueError(RemoteMagicError, ValueError):
    """A value to push could not be pickled; names the variable and the reason."""


class UnsafeRootError(RemoteMagicError, PermissionError):
    """A target's root folder (or the agent, venv, store... in it) belongs to another user or is
    writable by others: nothing from it is run or unpickled. The message says what to fix."""


class RootFolderError(RemoteMagicError, OSError):
    """The target's root folder cannot be created or written (a permission problem, a file in
    the way): the message names the folder and what to do."""


class VersionMismatchError(RemoteMagicError):
    """Local and remote Python differ in a way that breaks pickles."""


class MissingOutputError(RemoteMagicError, KeyError):
    """Some ``-o`` names were not defined (or not picklable) by the job; the others arrived."""

    def __init__(self, message: str, values: dict[str, Any]):
        super().__init__(message)
        self.values = values

    def __str__(self) -> str:
        return str(self.args[0])


class RemoteError(RemoteMagicError):
    """The job's code raised on the target; carries the remote traceback."""

    def __init__(self, job_id: str, state: str, ename: str, evalue: str, traceback: list[str]):
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.job_id = job_id
        self.state = state
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a local traceback: the remote one, with a header."""
        head = f"Remote {self.ename} in job {self.job_id} ({self.state}):"
        body = self.traceback or [f"{self.ename}: {self.evalue}"]
        return [head, *body]


class UnsafeObjectError(RemoteRequestError, PermissionError):
    """The target refused to serve a stored value or output: its file (a pickle, i.e. code) or
    folder belongs to another user or is writable by others. Nothing was unpickled."""


_KINDS: dict[str, type[Exception]] = {
    "UnsafeObject": UnsafeObjectError,
    "UnsafeRoot": UnsafeRootError,
    "UnknownJob": UnknownJobError,
    "RemoteDiskError": RemoteDiskError,
    "KeyError": KeyError,
    "FileNotFoundError": FileNotFoundError,
    "ValueError": ValueError,
}


def from_agent(error: dict[str, Any]) -> Exception:
    """Turn an agent's error answer into the matching local exception."""
    kind = error.get("type", "RemoteRequestError")
    message = error.get("message", "request failed")
    cls = _KINDS.get(kind)
    if cls is RemoteDiskError:
        return RemoteDiskError(message, kind, error.get("detail", ""))
    if cls is not None:
        return cls(message)
    detail = error.get("detail") or ""
    text = f"{message}\n{detail}".rstrip() if detail and kind not in ("RemoteRequestError",) else message
    return RemoteRequestError(text, kind, detail)
