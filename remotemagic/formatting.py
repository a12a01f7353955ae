"""Small text formatters for what the magics print: times, durations, sizes, transfer summaries."""

from __future__ import annotations

import datetime
import time
from typing import Any


def clock(ts: float | None) -> str:
    """A timestamp as the local time of day (``14:02:37``), or ``-``."""
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def duration(start: float | None, end: float | None) -> str:
    """From ``start`` to ``end`` (None: now) in seconds, or minutes from two minutes on; ``-``
    without a start."""
    if not start:
        return "-"
    secs = (end or time.time()) - start
    return f"{secs:.1f}s" if secs < 120 else f"{secs / 60:.1f}m"


def size(n: int | None) -> str:
    """A byte count in B, KB, MB or GB (powers of 1024)."""
    value = float(n or 0)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def transfer_summary(verb: str, done: dict[str, Any]) -> str:
    """One line about a finished push or pull (``Pushed 1.2 MB in 3 file(s) -> data``)."""
    text = f"{verb} {size(done.get('bytes'))}"
    if "files" in done:
        text += f" in {done['files']} file(s)"
    if done.get("skipped"):
        text += f", {done['skipped']} unchanged file(s) skipped"
    if done.get("resumed_from"):
        text += f", resumed after {size(done['resumed_from'])}"
    return text + f" -> {done.get('path')}"
