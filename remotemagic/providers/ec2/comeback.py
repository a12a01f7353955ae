"""A reclaimed spot instance coming back: wait until AWS starts it again (a part of the provider).

``%ec2 start --spot`` launches a *persistent* spot request whose interruption behaviour is
``stop`` (:mod:`.launch`): when AWS reclaims the capacity it stops the instance (disk, job logs
and checkpoints stay), and starts the same instance again -- with a new public address --
once capacity returns. :meth:`Comeback.wait_until_back` follows that from the reclaim notice
(the instance still running for up to two minutes) through ``stopping``/``stopped`` to
``pending`` and ``running``, telling each state it sees to its caller.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable

from .client import Ec2Client
from .errors import InstanceStateError, WaitTimeoutError, _aws_errors
from .model import InstanceInfo

log = logging.getLogger(__name__)

#: the states of a reclaimed instance on its way back (anything else: it is not coming back)
ON_THE_WAY = ("running", "stopping", "stopped", "pending")


def _started_after(launch_time: object, since: float | None) -> bool:
    """Whether EC2's LaunchTime (the last start) is later than ``since`` (epoch seconds)."""
    if since is None or not isinstance(launch_time, _dt.datetime):
        return False
    if launch_time.tzinfo is None:
        launch_time = launch_time.replace(tzinfo=_dt.timezone.utc)
    return launch_time.timestamp() > since


class Comeback(Ec2Client):
    """Waiting for a reclaimed spot instance to run again."""

    @_aws_errors
    def instance_state(self, instance_id: str) -> str:
        """The instance's state now (``running``, ``stopped``...)."""
        return str(self._describe_one(instance_id)["State"]["Name"])

    @_aws_errors
    def wait_until_back(self, instance_id: str, *, timeout: float, since: float | None = None,
                        on_state: Callable[[str], None] | None = None) -> InstanceInfo:
        """Block until the reclaimed instance has gone down and runs again; its fresh description.

        An instance still ``running`` counts as not yet stopped (a reclaim notice comes up to two
        minutes ahead) unless EC2's LaunchTime shows it was started again after ``since``.
        ``on_state`` gets every state seen (each poll, every ``reclaim_poll_interval`` s).
        :class:`InstanceStateError` if it is
        terminated (a one-time request, or it was terminated meanwhile: it never comes back);
        :class:`WaitTimeoutError` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        seen_down = False
        while True:
            d = self._describe_one(instance_id)
            state = d["State"]["Name"]
            if on_state is not None:
                on_state(state)
            if state not in ON_THE_WAY:
                reason = (d.get("StateReason") or {}).get("Message") or d.get("StateTransitionReason") or ""
                raise InstanceStateError(
                    f"{instance_id} is {state}" + (f" ({reason})" if reason else "")
                    + ": it will not come back; %ec2 start launches a new instance")
            if state == "running" and (seen_down or _started_after(d.get("LaunchTime"), since)):
                log.info("%s runs again", instance_id)
                return InstanceInfo.from_description(d)
            seen_down = seen_down or state != "running"
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(f"{instance_id} is still {state} after {timeout / 60:g} min")
            time.sleep(min(self.reclaim_poll_interval, left))
