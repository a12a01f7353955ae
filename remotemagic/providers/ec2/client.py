"""The AWS side every part of the EC2 provider shares: boto3 clients, the region, describing
instances and instance types, and waiting for an instance state."""

from __future__ import annotations

import difflib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ... import progress as _progress
from .errors import (
    AwsError,
    InstanceNotFoundError,
    InstanceStateError,
    UnknownInstanceTypeError,
    WaitTimeoutError,
    _aws_errors,
    _code,
    _translate,
)
from .model import _NAME_RE, CREATED_BY, CREATED_BY_VALUE, LIVE_STATES, NAME_TAG, InstanceInfo

log = logging.getLogger(__name__)


class Ec2Client:
    """boto3 clients for one account and region, and the lookups the provider's parts share.

    The attributes are set by :class:`~remotemagic.providers.ec2.Ec2Provider`'s constructor.
    """

    region_option: str | None
    profile: str | None
    ssh_cidrs: list[str] | None
    idle_stop_minutes: int
    key_name: str | None
    instance_type: str
    public_ip_lookup: Callable[[], str]
    ami_ssm_parameter: dict[str, str]
    poll_interval: float
    reclaim_poll_interval: float
    console_poll_interval: float
    pricing_timeout: float
    _session: Any
    _clients: dict[tuple[str, str | None], Any]
    _type_info: dict[str, dict[str, Any]]
    _all_types: list[str] | None
    _price_cache: dict[tuple[str, str], float | None]
    _pricing_unavailable: bool
    _owner: str | None

    def _boto_session(self) -> Any:
        if self._session is None:
            import boto3

            self._session = boto3.Session(profile_name=self.profile, region_name=self.region_option)
        return self._session

    def _client(self, service: str, region: str | None = None, config: Any = None) -> Any:
        key = (service, region)
        if key not in self._clients:
            from botocore.config import Config

            cfg = config or Config(
                retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60,
                user_agent_extra="remotemagic",
            )
            self._clients[key] = self._boto_session().client(
                service, region_name=region or self.region_option, config=cfg
            )
        return self._clients[key]

    @property
    def ec2(self) -> Any:
        return self._client("ec2")

    @property
    def region(self) -> str:
        """The region in use (resolved through boto3's chain)."""
        from botocore import exceptions as bx

        try:
            return self.ec2.meta.region_name
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise _translate(exc) from exc

    def _region_if_known(self) -> str | None:
        try:
            return self.region
        except AwsError:
            return self.region_option

    # -- lookups --------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"invalid instance name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        return name

    def _describe(self, filters: list[dict[str, Any]] | None = None, ids: list[str] | None = None) -> list[dict]:
        kwargs: dict[str, Any] = {}
        if filters:
            kwargs["Filters"] = filters
        if ids:
            kwargs["InstanceIds"] = ids
        out = []
        for page in self.ec2.get_paginator("describe_instances").paginate(**kwargs):
            for res in page.get("Reservations", []):
                out.extend(res.get("Instances", []))
        return out

    def _describe_one(self, instance_id: str) -> dict[str, Any]:
        found = self._describe(ids=[instance_id])
        if not found:
            raise InstanceNotFoundError(f"instance {instance_id} not found in region {self.region}")
        return found[0]

    def _ours_by_name(self, name: str) -> list[dict[str, Any]]:
        return self._describe(filters=[
            {"Name": f"tag:{CREATED_BY}", "Values": [CREATED_BY_VALUE]},
            {"Name": f"tag:{NAME_TAG}", "Values": [name]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ])

    @_aws_errors
    def instance_type_info(self, instance_type: str) -> dict[str, Any]:
        """DescribeInstanceTypes for one type; :class:`UnknownInstanceTypeError` with close matches."""
        if instance_type in self._type_info:
            return self._type_info[instance_type]
        from botocore.exceptions import ClientError

        try:
            types = self.ec2.describe_instance_types(InstanceTypes=[instance_type]).get("InstanceTypes", [])
        except ClientError as exc:
            if _code(exc) not in ("InvalidInstanceType", "InvalidParameterValue"):
                raise
            types = []
        if not types:
            close = difflib.get_close_matches(instance_type, self._instance_type_names(), n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UnknownInstanceTypeError(
                f"instance type {instance_type!r} does not exist in region {self.region}.{hint}", close
            )
        self._type_info[instance_type] = types[0]
        return types[0]

    def _instance_type_names(self) -> list[str]:
        if self._all_types is None:
            names: list[str] = []
            for page in self.ec2.get_paginator("describe_instance_types").paginate():
                names.extend(t["InstanceType"] for t in page.get("InstanceTypes", []))
            self._all_types = sorted(names)
        return self._all_types

    @_aws_errors
    def architecture(self, instance_type: str) -> str:
        """``arm64`` for Graviton types, else ``x86_64``."""
        archs = self.instance_type_info(instance_type).get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        return "x86_64" if "x86_64" in archs or not archs else archs[0]

    # -- waiting ------------------------------------------------------------------------------

    def _wait_state(self, instance_id: str, want: set[str], timeout: float, progress: bool, desc: str) -> dict:
        deadline = time.monotonic() + timeout
        seen_up = False
        with _progress.status(desc, progress) as bar:
            while True:
                d = self._describe_one(instance_id)
                state = d["State"]["Name"]
                bar.message(state)
                if state in want:
                    return d
                seen_up = seen_up or state in ("pending", "running")
                gone = state in ("terminated", "shutting-down") and not want & {"terminated", "shutting-down"}
                down = "running" in want and seen_up and state in ("stopping", "stopped")
                if gone or down:
                    reason = (d.get("StateReason") or {}).get("Message") or d.get("StateTransitionReason") or ""
                    raise InstanceStateError(
                        f"{instance_id} went to {state} while waiting for {'/'.join(sorted(want))}"
                        + (f": {reason}" if reason else "")
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(
                        f"{instance_id} is still {state} after {timeout:.0f} s (waiting for {'/'.join(sorted(want))})"
                    )
                time.sleep(min(self.poll_interval, left))

    @_aws_errors
    def wait_running(self, instance_id: str, timeout: float = 600, progress: bool = True) -> InstanceInfo:
        """Wait until the instance is running (tqdm status line); returns its fresh description."""
        d = self._wait_state(instance_id, {"running"}, timeout, progress, f"{instance_id}: starting")
        return InstanceInfo.from_description(d)

    def wait_ssh(self, host: str, port: int = 22, timeout: float = 300, progress: bool = True) -> None:
        """Wait until a TCP connection to ``host:port`` succeeds (sshd is up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with _progress.status(f"waiting for SSH on {host}:{port}", progress) as bar:
            while True:
                left = deadline - time.monotonic()
                try:
                    with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                        return
                except OSError as exc:
                    last = exc
                    bar.message(type(exc).__name__)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(f"SSH port {host}:{port} did not open within {timeout:.0f} s ({last})")
                time.sleep(min(max(0.05, self.poll_interval / 3), left))
