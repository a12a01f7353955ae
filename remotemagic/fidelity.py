"""A remote cell's outputs shown the way the same cell run here would show them.

* the last expression's value goes through this shell's display hook (``Out[n]``, the
  execution count, ``_`` and ``Out`` updated here), as a :class:`RemoteValue` carrying the
  target's MIME bundle;
* pager output goes to this shell's pager (Jupyter's pager payload);
* after an error, the cell's remaining displays (figures flushed at the end of the cell) wait
  until this cell's own ``post_execute``: the traceback comes first, as it does locally;
* ``input()`` / ``getpass()`` / debugger prompts of the remote code are asked here and the
  answer is sent back (the agent's ``stdin`` request).
"""

from __future__ import annotations

import getpass
from typing import Any, Callable

from .jobs import Job


class RemoteValue:
    """The value of a remote cell's last expression, as the target rendered it.

    ``_`` and ``Out[n]`` hold this object: its ``repr`` is the remote ``text/plain``; pull the
    value itself with ``-o``. ``data`` is the MIME bundle, ``metadata`` its metadata."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None):
        self.data = dict(data)
        self.metadata = dict(metadata or {})

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        data = {k: v for k, v in self.data.items() if (not include or k in include) and not (exclude and k in exclude)}
        return data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote value>"))

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def show_result(event: dict[str, Any]) -> bool:
    """Pass a remote ``execute_result`` through this shell's display hook. False if no shell."""
    ip = shell()
    if ip is None:
        return False
    ip.displayhook(RemoteValue(event.get("data") or {}, event.get("metadata") or {}))
    return True


def page(event: dict[str, Any]) -> bool:
    """Hand remote pager output to this shell's pager. False if no shell."""
    if shell() is None:
        return False
    from IPython.core import page as ipage

    ipage.page(event.get("data") or {}, start=int(event.get("start") or 0))
    return True


def page_text(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    return str(data.get("text/plain", "")) if isinstance(data, dict) else str(data)


class Deferred:
    """Displays that arrive after the remote error: shown in this cell's ``post_execute``."""

    def __init__(self, show: Callable[[dict[str, Any]], None]):
        self.show = show
        self.events: list[dict[str, Any]] = []
        self.registered = False

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self.registered:
            return
        ip = shell()
        if ip is None:
            self.flush()
            return
        ip.events.register("post_execute", self.flush)
        self.registered = True

    def flush(self) -> None:
        if self.registered:
            ip = shell()
            try:
                if ip is not None:
                    ip.events.unregister("post_execute", self.flush)
            except ValueError:
                pass
            self.registered = False
        events, self.events = self.events, []
        for event in events:
            self.show(event)


def answer_input(remote: Any, event: dict[str, Any]) -> None:
    """Ask this frontend's user what the remote code asks; send the answer (or the error) back.

    A Ctrl-C while asking propagates: the magic interrupts the remote job, as locally."""
    job_id, seq = event.get("job"), event.get("seq")
    if not job_id or not isinstance(seq, int):
        return
    job = Job(remote, job_id)
    if not job.input_pending(seq):
        return  # answered already (an old request seen again by %ec2 wait)
    prompt = str(event.get("prompt", ""))
    try:
        value = getpass.getpass(prompt) if event.get("password") else input(prompt)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # no frontend that can answer: the remote code gets the same error
        job.answer_input(seq, error=exc)
    else:
        job.answer_input(seq, value)
