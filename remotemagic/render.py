"""Turning job events (Jupyter-shaped) and user notices back into output: in IPython, or as plain text."""

from __future__ import annotations

import sys
from typing import Any

from . import fidelity


def _in_ipython() -> bool:
    """Whether an IPython shell runs in this process (no shell if IPython was never imported)."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and ipython.get_ipython() is not None


class Renderer:
    """Shows each event where it belongs. Live, errors are left to the exception the cell
    raises at the end (so the traceback shows once); on replay they are printed."""

    def __init__(self, replay: bool = False, rich: bool | None = None, remote: Any = None):
        self.replay = replay
        self.rich = _in_ipython() if rich is None else rich
        self.remote = remote  # answers the job's input requests (live only)
        self.deferred = fidelity.Deferred(self._show)  # displays after the error wait for it
        self.errored = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "error" and not self.replay:
            self.errored = True
        if kind in ("display_data", "update_display_data", "clear_output") and self.errored:
            self.deferred.add(event)  # locally, figures flushed at the end of the cell follow the traceback
            return
        if kind == "input_request":
            if self.remote is not None and not self.replay:
                fidelity.answer_input(self.remote, event)
            return
        self._show(event)

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        live = self.rich and not self.replay
        if kind == "stream":
            stream = sys.stderr if event.get("name") == "stderr" else sys.stdout
            stream.write(event.get("text", ""))
            stream.flush()
        elif kind == "execute_result" and live and fidelity.show_result(event):
            pass  # through this shell's display hook: Out[n], _, Out
        elif kind in ("display_data", "execute_result", "update_display_data"):
            self.display(event, update=kind == "update_display_data")
        elif kind == "page":
            if not (live and fidelity.page(event)):
                sys.stdout.write(fidelity.page_text(event).rstrip("\n") + "\n")
                sys.stdout.flush()
        elif kind == "clear_output" and self.rich:
            from IPython.display import clear_output

            clear_output(wait=bool(event.get("wait")))
        elif kind == "notice":  # see remotemagic.notices: stderr-styled, in a terminal and a notebook
            from .notices import format_text

            sys.stderr.write(format_text(event))
            sys.stderr.flush()
        elif kind == "error" and self.replay:
            lines = event.get("traceback") or [f"{event.get('ename')}: {event.get('evalue')}"]
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    def display(self, event: dict[str, Any], update: bool = False) -> None:
        data = event.get("data") or {}
        if self.rich:
            from IPython.display import publish_display_data

            kwargs: dict[str, Any] = {"metadata": event.get("metadata") or {}}
            transient = event.get("transient") or {}
            if transient:
                kwargs["transient"] = transient
            if update:
                kwargs["update"] = True
            publish_display_data(data, **kwargs)
        elif "text/plain" in data:
            sys.stdout.write(str(data["text/plain"]) + "\n")
            sys.stdout.flush()
