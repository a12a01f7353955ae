"""Resubmitting a job whose worker died: ``Remote.run(..., retries=N)`` / ``%%ec2 run --retry N``.

A job is retried only when it ended because its worker went away under it -- killed by a
signal (SIGKILL from the out-of-memory killer, a crash in C code) or gone with its machine --
never when the cell's own code raised, timed out or was interrupted, and never when the user
stopped the worker (``%ec2 restart``, ``cancel --kill``). The next attempt is a new job with the
same code and inputs, marked ``attempt`` in its spec: the session's fresh worker first loads the
checkpoint taken after the previous cell (the namespace as it was just before this job
started) and writes one notice in the job's log, e.g. ``attempt 2 of 3: worker died
(SIGKILL); restored a, b from the checkpoint of 10:42:01`` (see
:mod:`remotemagic.agent.recover`). Side effects of the cell (files written, requests made) are
not undone: a cell run with retries should be safe to run again.

A spot reclaim is retried too: the reclaim notice ends the job ``interrupted``
(``SpotInterruption``) after checkpointing the session; on an EC2 spot instance the next
attempt first waits for AWS to start the instance again (:mod:`remotemagic.reclaim`), and its
fresh worker restores that checkpoint -- the namespace as it was at the notice, so the values
the interrupted attempt had already assigned are there too.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from . import errors, notices

log = logging.getLogger(__name__)

#: Error names (the job's ``status.error.ename``) that mean "the worker died under the job" or
#: "its machine is being taken away".
RETRYABLE = {"WorkerDied", "SpotInterruption"}


def check_retries(retries: Any) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number >= 0, not {retries!r}")
    return retries


def why_retry(status: dict[str, Any]) -> str | None:
    """A short reason (``worker died (SIGKILL)``) if the job's end calls for another attempt."""
    if status.get("state") == "done":
        return None
    err = status.get("error") or {}
    if err.get("ename") not in RETRYABLE:
        return None
    return short_cause(str(err.get("evalue") or ""))


def short_cause(evalue: str) -> str:
    m = re.search(r"signal \d+ \((\w+)\)", evalue)
    if m:
        return f"worker died ({m.group(1)})"
    if evalue.startswith("interrupted: "):  # interrupted: spot reclaim (stop at ...)
        return evalue[len("interrupted: "):]
    return evalue.split(" -- ")[0] or "worker died"


def tell_memory(job: Any, remote: Any) -> None:
    """After a job ended: if its worker was killed near the machine's memory, a notice with advice."""
    err = job.status.get("error") or {}
    advice = memory_advice(err, remote.provider, remote.instance)
    if advice:
        notices.notify(advice, logger=log)


def memory_advice(error: dict[str, Any], provider: Any = None, instance: Any = None) -> str | None:
    """For a worker SIGKILLed near the machine's memory: what it reached, and (on EC2) which
    instance type to ``%ec2 resize`` to, with its $/h. None if memory is not the likely cause."""
    peak, total = error.get("peak_rss"), error.get("mem_total")
    if error.get("ename") != "WorkerDied" or error.get("signal") != 9 or not peak or not total:
        return None
    from .agent.recover import size

    if peak < 0.5 * total:
        return None
    text = (f"the worker was killed after reaching {size(peak)} of the machine's {size(total)} of memory: "
            "most likely the out-of-memory killer")
    bigger = None
    pick = getattr(provider, "larger_memory_type", None)
    if pick is not None and instance is not None:
        try:
            bigger = pick(instance.instance_type, peak)
        except errors.RemoteMagicError as exc:  # AWS unreachable: the advice without a type
            bigger = None
            text += f" (no type suggested: {exc})"

    if bigger:
        now = (f", now {instance.instance_type} at ${bigger['current_price']:.4f}/h"
               if bigger.get("current_price") is not None else "")
        text += (f"; %ec2 resize {bigger['type']} gives {bigger['memory_gib']:g} GiB "
                 f"(${bigger['price']:.4f}/h{now})")
    else:
        text += "; a machine with more memory (%ec2 resize TYPE on EC2) or smaller data would avoid it"
    return text


