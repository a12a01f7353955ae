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
        """What IPython shows instead of a local traceback: the remote one (in this notebook's
        colours and cell numbers), then one line naming the job."""
        body = list(self.traceback) or [f"{self.ename}: {self.evalue}" if self.evalue else self.ename]
        return [*body, f"[remotemagic: raised on the target, job {self.job_id} ({self.state})]"]


_NOT_INHERITED = (SyntaxError,)  # IPython shows these from their attributes, not _render_traceback_
_typed: dict[tuple[str, str | None, type | None], type[RemoteError]] = {}


def _local_type(ename: str, module: str | None) -> type[BaseException] | None:
    """The exception class ``module.ename`` if this process has it loaded already (any code
    here that could catch it has imported it), else None."""
    import builtins
    import sys

    if not module or module == "builtins":
        found = getattr(builtins, ename, None)
    else:
        found = sys.modules.get(module)
        for part in ename.split(".") if found is not None else []:
            found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, BaseException) and not issubclass(found, _NOT_INHERITED):
        return found
    return None


def remote_error(job_id: str, state: str, ename: str, evalue: str, traceback: list[str],
                 module: str | None = None) -> RemoteError:
    """The job's failure as an exception of the remote type: a subclass of both that type
    (when it exists here: ``except ValueError`` works) and :class:`RemoteError`, named like it,
    whose ``str()`` is the remote message."""
    base = _local_type(ename, module)  # (a module imported here since the last error changes it)
    key = (ename, module, base)
    cls = _typed.get(key)
    if cls is None:
        bases: tuple[type, ...] = (RemoteError,)
        if base is not None and base is not RemoteError:
            bases = (base, RemoteError)

        def __init__(self: Any, job_id: str, state: str, ename: str, evalue: str, traceback: list[str]) -> None:
            RemoteError.__init__(self, job_id, state, ename, evalue, traceback)
            self.args = (evalue,) if evalue else ()

        def __str__(self: Any) -> str:
            return self.evalue

        ns = {"__init__": __init__, "__str__": __str__, "__module__": module or __name__,
              "__qualname__": ename, "__doc__": f"{ename} raised on the target (see RemoteError)."}
        try:
            cls = type(ename if ename.isidentifier() else "RemoteError", bases, ns)
        except TypeError:  # a type that cannot be subclassed (or mixed with RemoteError)
            cls = type(ename if ename.isidentifier() else "RemoteError", (RemoteError,), ns)
        _typed[key] = cls
    try:
        exc = cls.__new__(cls, evalue)
        cls.__init__(exc, job_id, state, ename, evalue, traceback)
    except Exception:  # a base whose constructor insists on other arguments
        exc = RemoteError(job_id, state, ename, evalue, traceback)
    return exc


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
