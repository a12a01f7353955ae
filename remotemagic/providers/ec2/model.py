"""What remotemagic knows about one of its instances, and how it recognises them (tags)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from typing import Any

CREATED_BY = "created-by"
CREATED_BY_VALUE = "remotemagic"
NAME_TAG = "remotemagic:name"
USER_TAG = "remotemagic:user"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
DEFAULT_DISK_GB = 30
CHECKIP_URL = "https://checkip.amazonaws.com"


UBUNTU_SSM = {
    "x86_64": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "arm64": "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id",
}
AL2023_SSM = {
    "x86_64": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
    "arm64": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
}
AMI_ALIASES: dict[str, dict[str, str]] = {"ubuntu": UBUNTU_SSM, "ubuntu24.04": UBUNTU_SSM, "al2023": AL2023_SSM}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")



def _tags(desc: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in desc.get("Tags") or []}


def _is_ours(tags: dict[str, str]) -> bool:
    return tags.get(CREATED_BY) == CREATED_BY_VALUE and bool(tags.get(NAME_TAG))


@dataclasses.dataclass
class InstanceInfo:
    """What the rest of remotemagic needs to know about one of our instances."""

    instance_id: str
    name: str
    state: str
    instance_type: str
    lifecycle: str  # "spot" or "on-demand"
    user: str
    public_ip: str | None = None
    public_dns: str | None = None
    private_ip: str | None = None
    availability_zone: str | None = None
    launch_time: _dt.datetime | None = None
    image_id: str | None = None
    key_name: str | None = None
    owner: str | None = None
    architecture: str | None = None
    security_group_ids: list[str] = dataclasses.field(default_factory=list)
    spot_request_id: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def host(self) -> str | None:
        """The address to SSH to: public IP, else public DNS, else private IP."""
        return self.public_ip or self.public_dns or self.private_ip

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> InstanceInfo:
        tags = _tags(d)
        return cls(
            instance_id=d["InstanceId"],
            name=tags.get(NAME_TAG) or tags.get("Name") or d["InstanceId"],
            state=d.get("State", {}).get("Name", "unknown"),
            instance_type=d.get("InstanceType", "?"),
            lifecycle="spot" if d.get("InstanceLifecycle") == "spot" else "on-demand",
            user=tags.get(USER_TAG) or "ubuntu",
            public_ip=d.get("PublicIpAddress") or None,
            public_dns=d.get("PublicDnsName") or None,
            private_ip=d.get("PrivateIpAddress") or None,
            availability_zone=(d.get("Placement") or {}).get("AvailabilityZone"),
            launch_time=d.get("LaunchTime"),
            image_id=d.get("ImageId"),
            key_name=d.get("KeyName"),
            owner=tags.get("owner"),
            architecture=d.get("Architecture"),
            security_group_ids=[g["GroupId"] for g in d.get("SecurityGroups") or []],
            spot_request_id=d.get("SpotInstanceRequestId") or None,
            tags=tags,
        )
