"""User notices: what the user must know, shown in the cell's output -- never only logged.

A notice is an event shaped like a job's other events, so the renderer
(:class:`remotemagic.render.Renderer`) shows it like output::

    {"type": "notice", "level": "warning", "text": "the host key of ... was recorded"}

``level`` is ``"warning"`` (something went differently from what was asked, or needs an
action) or ``"info"`` (worth knowing, nothing to do). ``text`` is one self-contained
sentence or two: what happened and, if there is one, what to do.

Where notices go:

* **A notice that belongs to a job** is written into that job's ``events.jsonl`` on the
  target (the agent does this, e.g. "the previous worker died, its namespace was lost"), so
  it streams with the job's output, is mirrored locally and shows again with ``%ec2 output``.
* **Any other notice** (a host key recorded on first use, an SSH rule open to the whole
  internet, ``--type`` ignored for an existing instance, which target a cell picked...) is
  raised on this side with :func:`notify`. It is logged (for diagnostics) and handed to the
  collectors active in the calling context (:func:`collect`); the magics collect every
  notice raised while a magic runs and render it in that cell's output. With no collector
  active (a plain script), the notice is written to ``sys.stderr``, so it is never lost.
  :class:`remotemagic.api.Remote` also keeps the notices raised while connecting in
  ``Remote.notices``.

To tell the user something from any module::

    from . import notices
    notices.notify(f"{name} already exists as {old}; --type applies to new launches only", logger=log)
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from typing import Any, Callable, Iterator

Notice = dict[str, Any]
Sink = Callable[[Notice], None]

LEVELS = {"info": logging.INFO, "warning": logging.WARNING}

_sinks: contextvars.ContextVar[tuple[Sink, ...]] = contextvars.ContextVar("remotemagic_notice_sinks", default=())
_log = logging.getLogger(__name__)


def make(text: str, level: str = "warning") -> Notice:
    """The notice event for ``text`` (``level``: ``"warning"`` or ``"info"``)."""
    if level not in LEVELS:
        raise ValueError(f"notice level must be one of {sorted(LEVELS)}, not {level!r}")
    return {"type": "notice", "level": level, "text": str(text)}


def is_notice(event: dict[str, Any]) -> bool:
    return event.get("type") == "notice"


def format_text(event: Notice) -> str:
    """How a notice reads as plain text (one line per line of its text, ending in a newline)."""
    level = event.get("level", "warning")
    prefix = "[remotemagic] warning: " if level == "warning" else "[remotemagic] "
    return prefix + str(event.get("text", "")).rstrip("\n") + "\n"


def notify(text: str, level: str = "warning", logger: logging.Logger | None = None) -> Notice:
    """Tell the user ``text``: log it, and hand it to the active collectors (else stderr)."""
    event = make(text, level)
    (logger or _log).log(LEVELS[level], "%s", event["text"])
    deliver(event)
    return event


def deliver(event: Notice, _depth: int | None = None) -> None:
    """Hand an already-built notice event to the innermost active collector (else stderr)."""
    sinks = _sinks.get()
    depth = len(sinks) if _depth is None else _depth
    if depth <= 0:
        sys.stderr.write(format_text(event))
        sys.stderr.flush()
        return
    sinks[depth - 1](event)


@contextlib.contextmanager
def collect(sink: Sink | None = None, propagate: bool = False) -> Iterator[list[Notice]]:
    """Collect the notices raised in this context (this thread, or this task) into the list
    yielded, and pass each to ``sink`` as it comes if one is given. Nested collectors: the
    innermost one gets the notices; with ``propagate`` it passes them on outwards too (to the
    enclosing collector, else stderr) -- for code that keeps a record but does not show them."""
    got: list[Notice] = []
    depth = len(_sinks.get())

    def take(event: Notice) -> None:
        got.append(event)
        if sink is not None:
            sink(event)
        if propagate:
            deliver(event, depth)

    token = _sinks.set(_sinks.get() + (take,))
    try:
        yield got
    finally:
        _sinks.reset(token)
