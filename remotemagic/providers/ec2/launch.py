"""Launching a new instance: its image, disk, tags, user-data, and spot with an on-demand fallback."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ... import notices
from .errors import (
    _CREDENTIAL_CODES,
    SPOT_UNAVAILABLE,
    AmiNotFoundError,
    AwsError,
    IncompatibleAmiError,
    _aws_errors,
    _code,
)
from .model import (
    _USER_RE,
    AMI_ALIASES,
    CREATED_BY,
    CREATED_BY_VALUE,
    DEFAULT_DISK_GB,
    NAME_TAG,
    USER_TAG,
    InstanceInfo,
)
from .network import Network
from .pricing import Pricing
from .userdata import idle_stop_user_data

log = logging.getLogger(__name__)


def login_user_for_image(image: dict[str, Any]) -> str:
    """The default login user of an AMI, guessed from its name and description."""
    text = " ".join(str(image.get(k) or "") for k in ("Name", "Description", "ImageLocation")).lower()
    if "ubuntu" in text:
        return "ubuntu"
    if "amazon linux" in text or "amzn" in text or "al2023" in text:
        return "ec2-user"
    if "debian" in text:
        return "admin"
    return "ubuntu"



class Launcher(Network, Pricing):
    """Resolve an image and launch a tagged, encrypted, idle-stopping instance (a part of the provider)."""

    def _ssm_image_id(self, parameter: str) -> str:
        from botocore.exceptions import ClientError

        try:
            return self._client("ssm").get_parameter(Name=parameter)["Parameter"]["Value"]
        except ClientError as exc:
            if _code(exc) in ("ParameterNotFound", "ValidationException"):
                raise AmiNotFoundError(
                    f"public SSM parameter {parameter} does not exist in region {self.region}; pass ami='ami-...'"
                ) from None
            raise

    @_aws_errors
    def resolve_ami(self, ami: str | None, arch: str) -> dict[str, Any]:
        """The DescribeImages entry for ``ami`` (id, alias, SSM path or None for the default)."""
        if ami is None:
            param = self.ami_ssm_parameter.get(arch)
            if not param:
                raise AmiNotFoundError(f"no default AMI configured for {arch} (ami_ssm_parameter); pass ami='ami-...'")
            image_id = self._ssm_image_id(param)
        elif ami.lower() in AMI_ALIASES:
            image_id = self._ssm_image_id(AMI_ALIASES[ami.lower()][arch])
        elif ami.startswith("/") or ami.startswith("ssm:"):
            image_id = self._ssm_image_id(ami[4:] if ami.startswith("ssm:") else ami)
        elif ami.startswith("ami-"):
            image_id = ami
        else:
            raise AmiNotFoundError(
                f"unknown AMI {ami!r}: give an id (ami-...), an SSM parameter path, or one of the aliases "
                f"{', '.join(sorted(AMI_ALIASES))}"
            )
        from botocore.exceptions import ClientError

        try:
            images = self.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
        except ClientError as exc:
            if not _code(exc).startswith("InvalidAMIID"):
                raise
            images = []
        if not images:
            raise AmiNotFoundError(f"AMI {image_id} does not exist in region {self.region}")
        image = images[0]
        if image.get("State", "available") != "available":
            raise AmiNotFoundError(f"AMI {image_id} is {image.get('State')}, not available, in region {self.region}")
        img_arch = image.get("Architecture")
        if img_arch and img_arch != arch:
            raise IncompatibleAmiError(
                f"AMI {image_id} ({image.get('Name', '')}) is built for {img_arch} but the instance type needs {arch}"
            )
        return image

    @_aws_errors
    def owner(self) -> str:
        """The caller's identity ARN (the ``owner`` tag)."""
        if self._owner is None:
            from botocore.exceptions import ClientError

            try:
                self._owner = self._client("sts").get_caller_identity().get("Arn", "unknown")
            except ClientError as exc:
                if _code(exc) in _CREDENTIAL_CODES:
                    raise
                log.warning("cannot read the caller's identity for the owner tag: %s", exc)
                self._owner = "unknown"
        return self._owner

    def _launch(self, name: str, *, instance_type: str, spot: bool, ami: str | None, disk_gb: int | None,
                key_name: str | None, user: str | None, wait: bool, progress: bool, timeout: float,
                fallback: bool = False) -> InstanceInfo:
        arch = self.architecture(instance_type)
        image = self.resolve_ami(ami, arch)
        login = user or login_user_for_image(image)
        if not _USER_RE.match(login):
            raise ValueError(f"invalid login user {login!r}")
        root_device = image.get("RootDeviceName") or "/dev/sda1"
        snap_gb = 0
        for m in image.get("BlockDeviceMappings") or []:
            if m.get("DeviceName") == root_device:
                snap_gb = int((m.get("Ebs") or {}).get("VolumeSize") or 0)
        size = disk_gb if disk_gb is not None else max(DEFAULT_DISK_GB, snap_gb)
        if isinstance(size, bool) or not isinstance(size, int) or size < max(1, snap_gb):
            raise ValueError(f"disk_gb must be a whole number of GiB >= {max(1, snap_gb)} (the AMI's root snapshot), "
                             f"not {size!r}")
        if key_name:
            from botocore.exceptions import ClientError

            try:
                self.ec2.describe_key_pairs(KeyNames=[key_name])
            except ClientError as exc:
                if _code(exc).startswith("InvalidKeyPair"):
                    raise AwsError(f"key pair {key_name!r} does not exist in region {self.region}") from None
                raise
        group_id = self.ensure_security_group(name)
        owner = self.owner()
        tags = [
            {"Key": CREATED_BY, "Value": CREATED_BY_VALUE}, {"Key": NAME_TAG, "Value": name},
            {"Key": "Name", "Value": name}, {"Key": "owner", "Value": owner}, {"Key": USER_TAG, "Value": login},
        ]
        params: dict[str, Any] = {
            "ImageId": image["ImageId"],
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "SecurityGroupIds": [group_id],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [{
                "DeviceName": root_device,
                "Ebs": {"VolumeSize": size, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True},
            }],
            "InstanceInitiatedShutdownBehavior": "stop",
            "UserData": idle_stop_user_data(self.idle_stop_minutes, login),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            "ClientToken": f"remotemagic-{uuid.uuid4().hex}",
        }
        if key_name:
            params["KeyName"] = key_name
        if spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
            }
        log.info("launching %s: %s%s, %s (%s), %d GiB encrypted, user %s", name, instance_type,
                 " spot" if spot else "", image["ImageId"], image.get("Name", ""), size, login)
        from botocore.exceptions import ClientError

        try:
            d = self.ec2.run_instances(**params)["Instances"][0]
        except ClientError as exc:
            if not (spot and fallback and _code(exc) in SPOT_UNAVAILABLE):
                raise
            d = self._launch_on_demand_instead(name, instance_type, params, _code(exc))
        iid = d["InstanceId"]
        log.info("launched %s as %s", name, iid)
        if wait:
            info = self.wait_running(iid, timeout=timeout, progress=progress)
        else:
            info = InstanceInfo.from_description(d)
        info.user = login
        return info

    def _launch_on_demand_instead(self, name: str, instance_type: str, params: dict[str, Any],
                                  code: str) -> dict[str, Any]:
        """``--spot --fallback`` and no spot capacity: the same launch, on-demand, with a notice."""
        params = {k: v for k, v in params.items() if k != "InstanceMarketOptions"}
        params["ClientToken"] = f"remotemagic-{uuid.uuid4().hex}"
        d = self.ec2.run_instances(**params)["Instances"][0]
        on_demand, _ = self.hourly_price(instance_type)
        spot = self._spot_price(instance_type, None)
        if on_demand is not None and spot:  # (a price of 0: unknown)
            cost = f"at ${on_demand:.4f}/h, ${on_demand - spot:.4f}/h more than spot (${spot:.4f}/h)"
        elif on_demand is not None:
            cost = f"at ${on_demand:.4f}/h (the spot price is unknown)"
        else:
            cost = "(its price is unknown)"
        notices.notify(f"no spot capacity for {instance_type} ({code}): {name} ({d['InstanceId']}) was launched "
                       f"on-demand instead {cost}", logger=log)
        return d
