"""Turning job events (Jupyter-shaped) and user notices back into output: in IPython, or as plain text."""

from __future__ import annotations

import sys
from typing import Any


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


class Renderer:
    """Shows each event where it belongs. Live, errors are left to the exception the cell
    raises at the end (so the traceback shows once); on replay they are printed."""

    def __init__(self, replay: bool = False, rich: bool | None = None):
        self.replay = replay
        self.rich = _in_ipython() if rich is None else rich

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "stream":
            stream = sys.stderr if event.get("name") == "stderr" else sys.stdout
            stream.write(event.get("text", ""))
            stream.flush()
        elif kind in ("display_data", "execute_result", "update_display_data"):
            self.display(event, update=kind == "update_display_data")
        elif kind == "clear_output" and self.rich:
            from IPython.display import clear_output

            clear_output(wait=bool(event.get("wait")))
        elif kind == "notice":  # see remotemagic.notices: stderr-styled, in a terminal and a notebook
            from .notices import format_text

            sys.stderr.write(format_text(event))
            sys.stderr.flush()
        elif kind == "error" and self.replay:
            sys.stderr.write("\n".join(event.get("traceback") or [f"{event.get('ename')}: {event.get('evalue')}"]) + "\n")
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
