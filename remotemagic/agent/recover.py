"""Bringing a session back after its worker died: restore before a cell, and why it died.

Used by the worker (``run_job``) and its supervisor; stdlib only, like the rest of the agent.

* A cell whose spec has ``attempt`` (``Remote.run(..., retries=N)`` resubmitting a job whose
  worker died) or ``auto_restore`` (``Ec2Magics.auto_restore``) first loads the session's last
  checkpoint -- only into a *fresh* worker (one that has run no job yet), so a namespace that is
  already alive is never overwritten -- and writes one notice into the job's log saying what
  came back and what was too large (or unpicklable) to checkpoint.
* :func:`memory_report` gives the memory a dead worker reached (``ru_maxrss`` of the waited-for
  child) and the machine's memory, for the supervisor's account of a SIGKILL.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

from . import files

Emit = Callable[[dict[str, Any]], None]


def _when(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _names(names: list[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe_restore(index: dict[str, Any], restored: list[str]) -> str:
    """``restored a, b from the checkpoint of 10:42:01; too large to checkpoint: big``."""
    text = (f"restored {_names(restored)} from the checkpoint of {_when(index['time'])}" if restored
            else f"the checkpoint of {_when(index['time'])} held no values")
    skipped = index.get("skipped") or {}
    large = [n for n, why in skipped.items() if why.startswith("larger than")]
    other = [n for n in skipped if n not in large]
    if large:
        text += f"; not restored, too large to checkpoint: {_names(large)} (Ec2Magics.checkpoint_max_bytes)"
    if other:
        text += f"; not restored, could not be pickled: {_names(other)}"
    return text


def restore_before_cell(worker: Any, spec: dict[str, Any], emit: Emit) -> None:
    """If ``spec`` asks for it and ``worker`` is fresh, restore the last checkpoint and say so."""
    attempt = spec.get("attempt")
    if not attempt and not spec.get("auto_restore"):
        return
    sdir = worker.sdir
    held = os.path.exists(os.path.join(sdir, "checkpoint.hold"))  # a dead worker's checkpoint, not restored
    if attempt:
        head = f"attempt {attempt.get('n')} of {attempt.get('of')}: {attempt.get('why') or 'worker died'}"
    else:
        if not worker.fresh or not held:
            return  # nothing died since the namespace was last whole
        died = files.read_json(os.path.join(sdir, "died.prev.json"), {}) or {}
        head = f"the previous worker of session '{worker.session}' stopped ({died.get('cause', 'cause unknown')})"
    if not worker.fresh:
        emit({"type": "notice", "level": "warning",
              "text": f"{head}; the session's new worker has already run other jobs: the cell runs in its "
                      "current namespace (nothing restored)"})
        return
    try:
        result = worker.restore_checkpoint(report=False)
    except FileNotFoundError:
        emit({"type": "notice", "level": "warning",
              "text": f"{head}; no checkpoint to restore: the cell runs in a fresh namespace"})
        return
    except Exception as exc:  # a broken checkpoint: say so, run anyway
        emit({"type": "notice", "level": "warning",
              "text": f"{head}; restoring the checkpoint failed ({type(exc).__name__}: {exc}): the cell runs "
                      "in a fresh namespace"})
        return
    emit({"type": "notice", "level": "warning" if attempt else "info",
          "text": f"{head}; {describe_restore(result['checkpoint'], result['restored'])}"})


def machine_memory() -> int | None:
    """Bytes of memory on this machine (MemTotal), or None."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_report() -> dict[str, int]:
    """After ``waitpid``: the peak resident memory of the (largest) waited-for child, and the
    machine's memory, in bytes. Linux reports ``ru_maxrss`` in KiB (macOS: bytes)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"peak_rss": int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)}
    total = machine_memory()
    if total:
        out["mem_total"] = total
    return out


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
