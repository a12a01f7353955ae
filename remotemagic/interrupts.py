"""Ctrl-C during ``%%ec2 run``: interrupt the remote code, or let go of the job and leave it running.

Jupyter interrupts a kernel before it restarts or shuts it down; a restart must not kill the
remote job, so the interrupt waits a grace period first (``Ec2Magics.interrupt_grace``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from . import api, errors, notebook
from .render import Renderer

log = logging.getLogger(__name__)


def kernel_shutting_down(shell: Any) -> bool:
    """Whether Jupyter is shutting this kernel down (ipykernel records the shutdown request)."""
    kernel = getattr(shell, "kernel", None)
    return getattr(kernel, "_shutdown_message", None) is not None


def interrupt(job: api.Job, render: Renderer, shell: Any, grace: float, origin: dict[str, Any] | None = None,
              page_gone: bool = False) -> bool:
    """First Ctrl-C: interrupt the remote code (after ``grace`` seconds). Second: detach.
    True if the job ended.

    When the page that started the cell is gone (``page_gone``: it was closed or reloaded),
    or another page is connected too, the interrupt may come from someone who only came
    back to look: the cell detaches and the job runs on."""
    origin = origin or {}
    if page_gone or notebook.starter_gone(origin, job.remote.state_root):
        return detach(job, "the page that ran this cell was closed or reloaded")
    if notebook.others_connected(origin, job.remote.state_root):
        return detach(job, "interrupted from a page that did not start it")
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline:
            if kernel_shutting_down(shell):
                log.warning("kernel shutting down: job %s keeps running on the target", job.id)
                return False
            time.sleep(0.05)
    except KeyboardInterrupt:
        return detach(job)
    if kernel_shutting_down(shell):
        return False
    for _ in range(20):
        try:
            job.cancel()
            break
        except errors.UnknownJobError:  # the submission is still on its way
            time.sleep(0.05)
    sys.stderr.write(f"\nInterrupting job {job.id} on the target (Ctrl-C again to detach and leave it running)\n")
    try:
        job.follow(render)
        return True
    except KeyboardInterrupt:
        return detach(job)


def detach(job: api.Job, why: str = "") -> bool:
    """Let go of a job that keeps running on the target, and say how to come back to it. False."""
    job.record.update(detached=True)  # the Jupyter extension may fill the cell from now on
    sys.stderr.write(f"\nDetached from job {job.id}{f' ({why})' if why else ''}; it keeps running on the target.\n"
                     f"  %ec2 wait {job.id[-4:]} to reattach, %ec2 cancel {job.id[-4:]} to stop it.\n")
    return False
