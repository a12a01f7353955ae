"""Progress display (tqdm; a notebook widget where ipywidgets is installed): byte bars for transfers,
one-line status lines for waits (an instance starting, a port opening)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

SHOW_ABOVE = 16 * 1024 * 1024  # bytes: smaller transfers finish before a bar is worth drawing


def _tqdm() -> Any:
    """tqdm's class for here: a notebook widget in a Jupyter kernel with ipywidgets, else text.
    (Without ipywidgets, ``tqdm.auto`` warns "IProgress not found. Please update jupyter and
    ipywidgets" into the user's cell before it falls back to text: our bars fall back quietly.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        from tqdm.auto import tqdm
    return tqdm


def bar(total: int, desc: str, enabled: bool = True) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Return ``(update(nbytes), close())`` for a byte progress bar, or no-ops when small."""
    if not enabled or total < SHOW_ABOVE:
        return (lambda n: None), (lambda: None)
    t: Any = _tqdm()(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    # tqdm.update per 256 KiB frame was ~20 ms of CPU per 256 MiB (~7 % of a loopback push's
    # client CPU): hand it the bytes in steps of 1/200 of the total (at least 1 MiB)
    step = max(total // 200, 1 << 20)
    pending = 0

    def update(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= step:
            t.update(pending)
            pending = 0

    def close() -> None:
        nonlocal pending
        if pending:
            t.update(pending)
            pending = 0
        t.close()

    return update, close


class Status:
    """A one-line tqdm status for waits (what is awaited, a message and the elapsed time);
    silent when disabled. Use through :func:`status`."""

    def __init__(self, desc: str, enabled: bool = True):
        self._bar: Any = None
        if enabled:
            self._bar = _tqdm()(total=None, desc=desc, bar_format="{desc}{postfix} [{elapsed}]", leave=False)
        self._last = ""

    def message(self, text: str) -> None:
        """Show ``text`` (only redraws the elapsed time when it is the same as before)."""
        if self._bar is not None and text != self._last:
            self._bar.set_postfix_str(text, refresh=True)
        elif self._bar is not None:
            self._bar.refresh()
        self._last = text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def status(desc: str, enabled: bool = True) -> Iterator[Status]:
    """``with status("i-123: starting", enabled) as s: ... s.message(state)`` -- closed on exit."""
    s = Status(desc, enabled)
    try:
        yield s
    finally:
        s.close()
