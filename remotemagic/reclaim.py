"""Waiting through a spot reclaim: the instance stopped by AWS, and started again when capacity returns.

``%ec2 start --spot`` launches a persistent spot request that *stops* the instance when AWS
takes the capacity back, and starts it again (a new public address, the same disk) when the
capacity returns. ``%%ec2 run --retry N`` and ``%ec2 wait`` wait through that instead of
failing: :func:`wait_for_return` shows one line in the cell that updates with the instance's
state (``spot instance demo (i-0abc) reclaimed, waiting for capacity since 10:42 (stopped)``),
keeps the same state in ``Remote.waiting`` for other code to read, and when the instance runs
again reconnects with a new transport (new address; host keys from the console as on a first
connection, see :mod:`remotemagic.transport.ec2`). The wait is bounded by
``Remote.reclaim_wait_minutes`` (``Ec2Magics.reclaim_wait_minutes``; 0: do not wait); at the
bound, or if the instance was terminated, a notice says so and the job's own error stands.

What happens after the wait is the caller's: ``Remote.run`` resubmits the job (the session's
fresh worker restores the checkpoint taken at the reclaim notice), ``Remote.wait_through_reclaim``
follows the job to its end and restores the checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from . import errors, notices
from .providers.base import ProviderError

log = logging.getLogger(__name__)

EventHandler = Callable[[dict[str, Any]], None]

#: how each state reads in the waiting line
STATE_WORDS = {
    "running": "reclaim notice received, AWS has not stopped it yet",
    "stopping": "stopping",
    "stopped": "stopped; AWS starts it again when capacity returns",
    "pending": "starting again",
}


def can_wait(remote: Any) -> bool:
    """Whether ``remote`` is a spot instance whose provider can wait for it to come back."""
    instance = getattr(remote, "instance", None)
    return (getattr(instance, "lifecycle", None) == "spot"
            and callable(getattr(remote.provider, "wait_until_back", None))
            and getattr(remote, "reopen_transport", None) is not None)


def machine_down(remote: Any) -> bool:
    """After the link was lost: is the spot instance down (stopping, stopped, starting again)?"""
    try:
        return remote.provider.instance_state(remote.instance.instance_id) != "running"
    except (ProviderError, OSError) as exc:
        log.info("cannot ask AWS for the state of %s: %s", remote.instance.instance_id, exc)
        return False


def reclaimed(status: dict[str, Any]) -> bool:
    """Whether a job's final status says the spot instance's reclaim notice ended it."""
    return (status.get("error") or {}).get("ename") == "SpotInterruption"


class StatusLine:
    """The waiting state as one output line that updates in place (a display with a
    ``display_id``: a new line per change where displays cannot update, e.g. plain text)."""

    def __init__(self, on_event: EventHandler | None):
        self.on_event = on_event
        self.display_id = f"remotemagic-reclaim-{uuid.uuid4().hex[:12]}"
        self.shown = ""

    def show(self, text: str) -> None:
        if self.on_event is None or text == self.shown:
            return
        kind = "update_display_data" if self.shown else "display_data"
        self.shown = text
        self.on_event({"type": kind, "data": {"text/plain": "[remotemagic] " + text}, "metadata": {},
                       "transient": {"display_id": self.display_id}})


def _say(on_event: EventHandler | None, text: str, level: str = "warning") -> None:
    """A notice in the cell (through the job's renderer, else the active notice collector)."""
    event = notices.make(text, level)
    log.log(notices.LEVELS[level], "%s", text)
    if on_event is not None:
        on_event(event)
    else:
        notices.deliver(event)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M", time.localtime(ts))


def wait_for_return(remote: Any, on_event: EventHandler | None, why: str, since: float | None = None) -> bool:
    """Wait until the reclaimed spot instance of ``remote`` runs again, and reconnect to it.

    ``why`` says what ended the job (``spot reclaim (stop at ...)``, ``connection lost``);
    ``since`` is when the reclaim was noticed (default: now). True once reconnected; False --
    after a notice saying why -- if the wait is off (``reclaim_wait_minutes = 0``), reached its
    bound, or the instance will not come back, or the user pressed Ctrl-C."""
    instance = remote.instance
    name = f"{instance.name} ({instance.instance_id})"
    minutes = float(getattr(remote, "reclaim_wait_minutes", 0) or 0)
    start = time.time()
    since = since or start
    if minutes <= 0:
        _say(on_event, f"spot instance {name} was reclaimed ({why}); not waiting for it to come back "
                       f"(reclaim_wait_minutes = 0): %ec2 start --name {instance.name} starts it again")
        return False
    try:
        return _wait_and_reattach(remote, on_event, name, minutes, since, start)
    finally:
        remote.waiting = None


def _wait_and_reattach(remote: Any, on_event: EventHandler | None, name: str, minutes: float, since: float,
                       start: float) -> bool:
    instance = remote.instance
    head = f"spot instance {name} reclaimed, waiting for capacity since {_clock(since)}"
    line = StatusLine(on_event)
    last = {"state": "running", "down": ""}

    def on_state(state: str) -> None:
        last["state"] = state
        if state != "running":
            last["down"] = state
        words = "running again; reconnecting" if state == "running" and last["down"] else STATE_WORDS.get(state, state)
        text = f"{head} ({words})"
        remote.waiting = {"since": since, "state": state, "text": text, "instance": instance.instance_id}
        line.show(text)

    on_state("running")
    try:
        back = remote.provider.wait_until_back(instance.instance_id, timeout=minutes * 60, since=since,
                                               on_state=on_state)
    except KeyboardInterrupt:  # Ctrl-C: stop waiting, the reclaimed job's end stands
        line.show(f"{head}: stopped waiting (Ctrl-C)")
        _say(on_event, f"stopped waiting for spot instance {name}: nothing is run again. "
                       f"%ec2 start --name {instance.name} starts it again once AWS has capacity")
        return False
    except TimeoutError:
        line.show(f"{head}: gave up after {minutes:g} min")
        _say(on_event, f"spot instance {name} did not come back within {minutes:g} min "
                       f"(Ec2Magics.reclaim_wait_minutes; it is {last['state']}): nothing is run again. "
                       f"%ec2 start --name {instance.name} starts it again, or --spot --fallback on a new instance")
        return False
    except ProviderError as exc:
        line.show(f"{head}: stopped waiting")
        _say(on_event, f"stopped waiting for spot instance {name}: {type(exc).__name__}: {exc}")
        return False
    back.user = instance.user
    remote.waiting = {"since": since, "state": "reconnecting", "text": f"{head} (running again; reconnecting)",
                      "instance": instance.instance_id}
    line.show(remote.waiting["text"])
    try:
        remote.reattach(back, timeout=max(remote.reconnect_timeout, minutes * 60 - (time.time() - start)))
    except (errors.RemoteMagicError, OSError) as exc:
        line.show(f"{head}: running again, but reconnecting failed")
        _say(on_event, f"spot instance {name} runs again but reconnecting to it failed: {exc}")
        return False
    took = (time.time() - since) / 60
    line.show(f"spot instance {name} was reclaimed at {_clock(since)} and is back since {_clock(time.time())} "
              f"({took:.0f} min), at {back.host}")
    return True
