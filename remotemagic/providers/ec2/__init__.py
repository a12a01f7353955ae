"""EC2 lifecycle: find, launch, start, stop, resize and terminate remotemagic's instances, with
secure defaults, idle auto-stop arranged on the instance, cost reporting and host-key learning.

This layer is plain Python and knows nothing of SSH; it hands the SSH transport a host, a login
user and verified host keys. AWS credentials and region come from boto3's normal chain (the
``profile`` and ``region`` options, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, ``~/.aws/config``).

Every instance it launches is tagged ``created-by=remotemagic`` and ``remotemagic:name=<name>``;
it never stops, resizes or terminates an instance without those tags.

The package's modules, one job each: :mod:`.errors` (errors, botocore translation),
:mod:`.model` (tags, :class:`InstanceInfo`), :mod:`.userdata` (idle auto-stop; the check itself
is ``idle_check.sh``), :mod:`.hostkeys` (console host keys, known_hosts), :mod:`.client` (boto3
clients, lookups, waits), :mod:`.pricing`, :mod:`.network` (security group), :mod:`.launch`,
:mod:`.comeback` (a reclaimed spot instance coming back), :mod:`.provider` (:class:`Ec2Provider`)
and :mod:`.kind` (the ``ec2`` target kind of the magics).
Every public name stays importable from here.
"""

from __future__ import annotations

from .errors import (
    CREDENTIALS_HELP,
    REGION_HELP,
    SPOT_UNAVAILABLE,
    AmbiguousInstanceError,
    AmiNotFoundError,
    AwsCredentialsError,
    AwsError,
    AwsPermissionError,
    AwsRegionError,
    HostKeyError,
    IncompatibleAmiError,
    InstanceNotFoundError,
    InstanceStateError,
    NotOursError,
    PublicIpError,
    UnknownInstanceTypeError,
    WaitTimeoutError,
)
from .hostkeys import host_keys_from_console, record_known_hosts
from .launch import login_user_for_image
from .model import (
    AL2023_SSM,
    AMI_ALIASES,
    CHECKIP_URL,
    CREATED_BY,
    CREATED_BY_VALUE,
    DEFAULT_DISK_GB,
    LIVE_STATES,
    NAME_TAG,
    UBUNTU_SSM,
    USER_TAG,
    InstanceInfo,
)
from .network import public_ip_from_checkip
from .pricing import on_demand_hourly_usd, packaged_prices
from .provider import Ec2Provider
from .userdata import idle_check_script, idle_stop_user_data

__all__ = [
    "AL2023_SSM", "AMI_ALIASES", "CHECKIP_URL", "CREATED_BY", "CREATED_BY_VALUE", "CREDENTIALS_HELP",
    "DEFAULT_DISK_GB", "LIVE_STATES", "NAME_TAG", "REGION_HELP", "SPOT_UNAVAILABLE", "UBUNTU_SSM", "USER_TAG",
    "AmbiguousInstanceError", "AmiNotFoundError", "AwsCredentialsError", "AwsError", "AwsPermissionError",
    "AwsRegionError", "Ec2Provider", "HostKeyError", "IncompatibleAmiError", "InstanceInfo",
    "InstanceNotFoundError", "InstanceStateError", "NotOursError", "PublicIpError", "UnknownInstanceTypeError",
    "WaitTimeoutError", "host_keys_from_console", "idle_check_script", "idle_stop_user_data",
    "login_user_for_image", "on_demand_hourly_usd", "packaged_prices", "public_ip_from_checkip",
    "record_known_hosts",
]
