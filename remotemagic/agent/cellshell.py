"""What makes the worker's headless shell behave like the notebook's own kernel.

* the pager (``obj?``, ``%magic``, ``%prun`` ...) becomes a ``page`` event: the client hands it
  to its own pager (Jupyter's pager payload) instead of printing it into the cell;
* each cell runs under the notebook's cell number (``Cell In[7]``, ``Out[7]``, ``_7``, ``In[7]``)
  and with the notebook's traceback colour theme, both sent in the job's spec;
* ``input()``, ``getpass()`` and debugger prompts are asked through the client (:mod:`.stdin`);
* tracebacks stop at the user's code: the worker's own frames (a KeyboardInterrupt raised by
  its SIGINT handler) are cut off;
* ``%store`` is available (IPython's storemagic extension).

:func:`make_shell` builds the shell: its display publisher, display hook and traceback hook turn
outputs into events (:mod:`.protocol`), written to the job's log by the worker.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any, Callable

from . import stdin
from .events import diagnose

_AGENT_DIR = os.path.dirname(os.path.abspath(__file__))


def setup(shell: Any, emit: Callable[[dict[str, Any]], None]) -> None:
    """Once per worker: the pager hook and the %store magic."""

    def show_in_pager(self: Any, data: Any, start: int = 0, screen_lines: int = 0) -> None:
        if not isinstance(data, dict):
            data = {"text/plain": str(data)}
        emit({"type": "page", "data": data, "start": max(0, int(start or 0))})

    shell.set_hook("show_in_pager", show_in_pager, 99)
    try:
        shell.extension_manager.load_extension("storemagic")
    except Exception as exc:  # an IPython without it: %store stays missing, the worker runs on
        diagnose(f"cannot load storemagic: {exc}")


def trim_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Cut the traceback's innermost entries that are the agent's own code (its SIGINT handler)."""
    entries = []
    cur = tb
    while cur is not None:
        entries.append(cur)
        cur = cur.tb_next
    keep = len(entries)
    while keep > 1 and os.path.dirname(os.path.abspath(entries[keep - 1].tb_frame.f_code.co_filename)) == _AGENT_DIR:
        keep -= 1
    if keep < len(entries):
        entries[keep - 1].tb_next = None  # in place: the exception's __traceback__ is the same chain
    return tb


def set_colors(shell: Any, theme: str) -> None:
    """Use the notebook's traceback colour theme (IPython 9 names; IPython 8 accepts them too)."""
    theme = theme.strip().lower()  # IPython 9 spells them in lower case; IPython 8 ignores case
    if not theme or str(shell.colors).lower() == theme.lower():
        return
    try:
        shell.colors = theme
    except Exception:  # a theme this IPython does not know: keep ours
        return
    for tb in ("InteractiveTB", "SyntaxTB"):  # IPython 8 does not follow shell.colors itself
        handler = getattr(shell, tb, None)
        if handler is not None and hasattr(handler, "set_colors") and not hasattr(handler, "set_theme_name"):
            try:
                handler.set_colors(theme)
            except Exception:
                pass


def set_execution_count(shell: Any, count: int) -> None:
    """Run the next cell as ``In[count]``: prompts, ``Out``, ``_N`` and ``In`` line up with the
    notebook (cells that ran only locally leave empty ``In`` entries)."""
    hm = shell.history_manager
    for hist in (hm.input_hist_parsed, hm.input_hist_raw):
        while len(hist) < count:
            hist.append("")
    shell.execution_count = count


def prepare(shell: Any, spec: dict[str, Any], jdir: str, emit: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Before a cell: apply what the spec says about the notebook; returns the undo."""
    count = spec.get("execution_count")
    if isinstance(count, int) and count > 0:
        set_execution_count(shell, count)
    if isinstance(spec.get("colors"), str):
        set_colors(shell, spec["colors"])
    forward = stdin.Forwarder(emit, jdir, spec.get("id", ""), allowed=bool(spec.get("stdin")))
    return forward.install()


def make_shell(emit: Callable[[dict[str, Any]], None]) -> Any:
    """The worker's headless IPython shell: its outputs become Jupyter-shaped events, given to ``emit``."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            emit(
                {
                    "type": "update_display_data" if update else "display_data",
                    "data": data,
                    "metadata": metadata or {},
                    "transient": transient or {},
                }
            )

        def clear_output(self, wait=False):
            emit({"type": "clear_output", "wait": bool(wait)})

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            emit(
                {
                    "type": "execute_result",
                    "data": format_dict,
                    "metadata": md_dict or {},
                    "execution_count": self.prompt_count,
                }
            )

    class Shell(InteractiveShell):
        display_pub_class = Publisher
        displayhook_class = Hook

        def _showtraceback(self, etype, evalue, stb):
            name = etype.__name__ if isinstance(etype, type) else str(etype)
            emit(
                {
                    "type": "error",
                    "ename": name,
                    "evalue": str(evalue),
                    "emodule": getattr(etype, "__module__", None),  # the client re-raises the same type
                    "traceback": stb if isinstance(stb, list) else [stb],
                }
            )

        def _get_exc_info(self, exc_tuple=None):
            etype, value, tb = super()._get_exc_info(exc_tuple)
            return etype, value, trim_traceback(tb)

        def show_usage_error(self, exc):  # one error event, shown once by the client
            emit({"type": "error", "ename": "UsageError", "evalue": str(exc),
                         "emodule": "IPython.core.error", "traceback": []})

        def enable_gui(self, gui=None):  # no event loop here; 'inline' needs none
            pass

    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    shell = Shell.instance(colors="Linux")
    if shell.history_manager is not None:
        shell.history_manager.enabled = False
    setup(shell, emit)
    return shell
