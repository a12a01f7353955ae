"""The EC2 provider: attach to, launch, stop, resize and terminate remotemagic's instances."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from ... import notices
from ... import progress as _progress
from .comeback import Comeback
from .errors import (
    AmbiguousInstanceError,
    AwsError,
    HostKeyError,
    IncompatibleAmiError,
    InstanceNotFoundError,
    NotOursError,
    PublicIpError,
    _aws_errors,
)
from .hostkeys import host_keys_from_console, record_known_hosts
from .launch import Launcher
from .model import (
    _INSTANCE_ID_RE,
    CREATED_BY,
    CREATED_BY_VALUE,
    LIVE_STATES,
    NAME_TAG,
    UBUNTU_SSM,
    InstanceInfo,
    _is_ours,
    _tags,
)
from .network import public_ip_from_checkip

log = logging.getLogger(__name__)


class Ec2Provider(Launcher, Comeback):
    """Launch, attach to, stop, resize and terminate remotemagic's EC2 instances in one region.

    ``region``/``profile`` (or ``session``, a ``boto3.Session``) pick the AWS account and region
    through boto3's normal chain. ``ssh_cidrs`` replaces the default SSH rule (the caller's public
    IP /32, looked up at https://checkip.amazonaws.com). ``idle_stop_minutes`` is how long the
    instance may sit without jobs or SSH connections before it stops itself (0: never).

    Its parts: :class:`~.client.Ec2Client` (clients, lookups, waits), :class:`~.pricing.Pricing`,
    :class:`~.network.Network` (security group), :class:`~.launch.Launcher` and
    :class:`~.comeback.Comeback` (a reclaimed spot instance started again by AWS).

    Attributes worth overriding: ``ami_ssm_parameter`` (architecture -> public SSM parameter of
    the default AMI), ``public_ip_lookup`` (callable returning this machine's public IP),
    ``poll_interval`` (seconds between state polls), ``reclaim_poll_interval`` (the same while a
    reclaimed spot instance is awaited).
    """

    def __init__(
        self,
        region: str | None = None,
        profile: str | None = None,
        *,
        ssh_cidrs: Iterable[str] | None = None,
        idle_stop_minutes: int = 60,
        key_name: str | None = None,
        instance_type: str = "t3.large",
        session: Any = None,
        public_ip_lookup: Callable[[], str] | None = None,
        ami_ssm_parameter: dict[str, str] | None = None,
    ):
        if isinstance(idle_stop_minutes, bool) or not isinstance(idle_stop_minutes, int) or idle_stop_minutes < 0:
            raise ValueError(f"idle_stop_minutes must be a whole number >= 0 (0 disables), not {idle_stop_minutes!r}")
        self.region_option = region
        self.profile = profile
        self.ssh_cidrs = [self._check_cidr(c) for c in ssh_cidrs] if ssh_cidrs else None
        self.idle_stop_minutes = idle_stop_minutes
        self.key_name = key_name
        self.instance_type = instance_type
        self.public_ip_lookup = public_ip_lookup or public_ip_from_checkip
        self.ami_ssm_parameter = dict(ami_ssm_parameter or UBUNTU_SSM)
        self.poll_interval = 3.0
        self.reclaim_poll_interval = 10.0  # a reclaimed spot instance comes back in minutes or hours
        self.console_poll_interval = 10.0
        self.pricing_timeout = 3.0
        self._session = session
        self._clients = {}
        self._type_info = {}
        self._all_types = None
        self._price_cache = {}
        self._pricing_unavailable = False
        self._owner = None

    @_aws_errors
    def find(self, name: str) -> InstanceInfo | None:
        """Our live (not terminated) instance called ``name``, or None.

        Raises :class:`AmbiguousInstanceError` when several carry the name.
        """
        self._check_name(name)
        found = self._ours_by_name(name)
        if len(found) > 1:
            ids = ", ".join(f"{d['InstanceId']} ({d['State']['Name']})" for d in found)
            raise AmbiguousInstanceError(
                f"{len(found)} remotemagic instances are named {name!r} in {self.region}: {ids}. "
                f"Terminate the extra ones by id (terminate('i-...')) or rename one with its "
                f"'{NAME_TAG}' tag."
            )
        return InstanceInfo.from_description(found[0]) if found else None

    def _resolve_ours(self, name_or_id: str, action: str) -> dict[str, Any]:
        """Our live instance by name or id; refuses anything not tagged as ours."""
        if _INSTANCE_ID_RE.match(name_or_id or ""):
            d = self._describe_one(name_or_id)
            if not _is_ours(_tags(d)):
                raise NotOursError(
                    f"refusing to {action} {name_or_id}: it was not created by remotemagic (no tag "
                    f"{CREATED_BY}={CREATED_BY_VALUE}). Manage it with the AWS console or CLI."
                )
            if d["State"]["Name"] not in LIVE_STATES:
                raise InstanceNotFoundError(f"instance {name_or_id} is {d['State']['Name']}")
            return d
        self._check_name(name_or_id)
        found = self._ours_by_name(name_or_id)
        if len(found) > 1:
            self.find(name_or_id)  # raises the ambiguity error
        if found:
            return found[0]
        foreign = [
            d for d in self._describe(filters=[
                {"Name": "tag:Name", "Values": [name_or_id]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ])
            if not _is_ours(_tags(d))
        ]
        if foreign:
            ids = ", ".join(d["InstanceId"] for d in foreign)
            raise NotOursError(
                f"refusing to {action} {name_or_id!r} ({ids}): it was not created by remotemagic (no tag "
                f"{CREATED_BY}={CREATED_BY_VALUE}). Manage it with the AWS console or CLI."
            )
        raise InstanceNotFoundError(f"no remotemagic instance named {name_or_id!r} in {self.region}")

    # -- lifecycle ----------------------------------------------------------------------------

    @_aws_errors
    def start(
        self,
        name: str,
        *,
        instance_type: str | None = None,
        spot: bool = False,
        ami: str | None = None,
        disk_gb: int | None = None,
        key_name: str | None = None,
        user: str | None = None,
        wait: bool = True,
        progress: bool = True,
        timeout: float = 600,
        fallback: bool = False,
    ) -> InstanceInfo:
        """Attach to our instance ``name`` (starting it if stopped), else launch a new one.

        On attach, the security group is brought up to date with the caller's current address;
        ``instance_type``/``spot``/``ami``/``disk_gb`` only apply to a launch (use :meth:`resize`).
        ``fallback`` (with ``spot``): when AWS has no spot capacity for the type
        (``InsufficientInstanceCapacity``, ``SpotMaxPriceTooLow``...), launch on-demand instead and
        say so (a notice) with the price difference.
        """
        self._check_name(name)
        found = self._ours_by_name(name)
        if len(found) > 1:
            self.find(name)
        if found:
            return self._attach(found[0], name, instance_type=instance_type, spot=spot, ami=ami, user=user,
                                wait=wait, progress=progress, timeout=timeout)
        return self._launch(name, instance_type=instance_type or self.instance_type, spot=spot, ami=ami,
                            disk_gb=disk_gb, key_name=key_name or self.key_name, user=user, wait=wait,
                            progress=progress, timeout=timeout, fallback=fallback)

    def _attach(self, d: dict[str, Any], name: str, *, instance_type: str | None, spot: bool, ami: str | None,
                user: str | None, wait: bool, progress: bool, timeout: float) -> InstanceInfo:
        iid, state = d["InstanceId"], d["State"]["Name"]
        info = InstanceInfo.from_description(d)
        if instance_type and instance_type != info.instance_type:
            notices.notify(f"{name} ({iid}) already exists as {info.instance_type}; --type {instance_type} "
                           f"applies to new launches only (%ec2 resize {instance_type} changes it)", logger=log)
        if spot and info.lifecycle != "spot":
            notices.notify(f"{name} ({iid}) already exists as an on-demand instance; --spot applies to new "
                           "launches only", logger=log)
        if ami:
            notices.notify(f"{name} ({iid}) already exists (AMI {info.image_id}); --ami {ami} applies to new "
                           "launches only", logger=log)
        try:
            self._refresh_group_of(d, name)
        except PublicIpError as exc:
            notices.notify(f"{name}: security group left as it is: {exc}", logger=log)
        if state == "stopping":
            log.info("%s (%s) is stopping; waiting for it to stop before starting it again", name, iid)
            self._wait_state(iid, {"stopped"}, timeout, progress, f"{name}: stopping")
            state = "stopped"
        if state == "stopped":
            log.info("starting %s (%s)", name, iid)
            self.ec2.start_instances(InstanceIds=[iid])
        else:
            log.info("attaching to %s (%s, %s)", name, iid, state)
        if wait:
            info = self.wait_running(iid, timeout=timeout, progress=progress)
        else:
            info = InstanceInfo.from_description(self._describe_one(iid))
        if user:
            info.user = user
        return info

    @_aws_errors
    def stop(self, name: str, *, wait: bool = False, progress: bool = True, timeout: float = 600) -> InstanceInfo:
        """Stop our instance (by name or id); its disk is kept. Refuses instances not ours."""
        d = self._resolve_ours(name, "stop")
        iid, state = d["InstanceId"], d["State"]["Name"]
        if state in ("stopped", "stopping"):
            log.info("%s (%s) is already %s", name, iid, state)
        else:
            self.ec2.stop_instances(InstanceIds=[iid])
            log.info("stopping %s (%s)", name, iid)
        if wait:
            d = self._wait_state(iid, {"stopped"}, timeout, progress, f"{name}: stopping")
        else:
            d = self._describe_one(iid)
        return InstanceInfo.from_description(d)

    @_aws_errors
    def terminate(self, name: str, *, wait: bool = False, progress: bool = True, timeout: float = 600) -> str:
        """Terminate our instance (by name or id); its disk is deleted. Refuses instances not ours.

        A persistent spot request is cancelled first (else AWS would launch a replacement). With
        ``wait``, waits until terminated and deletes the instance's security group. Returns the id.
        """
        d = self._resolve_ours(name, "terminate")
        iid = d["InstanceId"]
        if d.get("SpotInstanceRequestId"):
            self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[d["SpotInstanceRequestId"]])
            log.info("cancelled spot request %s of %s", d["SpotInstanceRequestId"], iid)
        self.ec2.terminate_instances(InstanceIds=[iid])
        log.info("terminating %s (%s)", name, iid)
        if wait:
            self._wait_state(iid, {"terminated"}, timeout, progress, f"{name}: terminating")
            self._delete_group_of(d)
        return iid

    @_aws_errors
    def resize(self, name: str, new_type: str, *, wait: bool = True, progress: bool = True,
               timeout: float = 900) -> InstanceInfo:
        """Change the instance type: stop, wait, modify, start (and wait). Refuses instances not ours."""
        d = self._resolve_ours(name, "resize")
        iid = d["InstanceId"]
        if d.get("InstanceLifecycle") == "spot":
            raise AwsError(
                f"{name} ({iid}) is a spot instance; AWS does not let a spot instance change type. "
                f"Terminate it and start a new one with the type you want."
            )
        new_arch = self.architecture(new_type)
        old_arch = d.get("Architecture") or self.architecture(d["InstanceType"])
        if new_arch != old_arch:
            raise IncompatibleAmiError(
                f"cannot resize {name} from {d['InstanceType']} ({old_arch}) to {new_type} ({new_arch}): its disk "
                f"holds an {old_arch} system. Launch a new instance for {new_arch}."
            )
        if d["InstanceType"] == new_type:
            log.info("%s (%s) is already %s", name, iid, new_type)
            return InstanceInfo.from_description(d)
        if d["State"]["Name"] == "pending":
            self._wait_state(iid, {"running"}, timeout, progress, f"{name}: starting")
        if d["State"]["Name"] != "stopped":
            self.ec2.stop_instances(InstanceIds=[iid])
            log.info("stopping %s (%s) to resize it", name, iid)
            self._wait_state(iid, {"stopped"}, timeout, progress, f"{name}: stopping")
        self.ec2.modify_instance_attribute(InstanceId=iid, InstanceType={"Value": new_type})
        log.info("%s (%s): %s -> %s; starting", name, iid, d["InstanceType"], new_type)
        self.ec2.start_instances(InstanceIds=[iid])
        if wait:
            return self.wait_running(iid, timeout=timeout, progress=progress)
        return InstanceInfo.from_description(self._describe_one(iid))

    # -- host keys and instance connect -------------------------------------------------------

    @_aws_errors
    def learn_host_key(self, instance_id: str, known_hosts_path: str | os.PathLike[str], address: str,
                       timeout: float = 600, progress: bool = True, port: int = 22,
                       alias: bool = True) -> list[str]:
        """Read the instance's SSH host keys from its console output and record them for ``address``.

        With ``alias`` the keys are also recorded under the instance id, so a client using it as
        ``HostKeyAlias`` still verifies the host after a stop/start (new public IP; cloud-init
        prints the keys on the first boot only). The console output reaches AWS's API a few
        minutes after boot; until then this polls. :class:`HostKeyError` when no keys show within
        ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with _progress.status(f"{instance_id}: reading host keys from the console", progress) as bar:
            while True:
                out = self.ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
                keys = host_keys_from_console(out)
                if keys:
                    record_known_hosts(known_hosts_path, [address, instance_id] if alias else [address], keys, port)
                    log.info("recorded %d host key(s) of %s (%s) in %s", len(keys), instance_id, address,
                             known_hosts_path)
                    return keys
                bar.message("console output empty so far" if not out.strip() else "no host keys in console yet")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostKeyError(
                        f"no SSH host keys in the console output of {instance_id} after {timeout:.0f} s"
                        + (" (the console output is still empty; AWS publishes it a few minutes after boot)"
                           if not out.strip() else " (this AMI may not print them; cloud-init images do)")
                    )
                time.sleep(min(max(self.console_poll_interval, 0.05), left))

    @_aws_errors
    def send_ephemeral_key(self, instance_id: str, user: str, public_key: str, az: str) -> bool:
        """Push a public key for ``user`` via EC2 Instance Connect (valid for 60 s)."""
        resp = self._client("ec2-instance-connect").send_ssh_public_key(
            InstanceId=instance_id, InstanceOSUser=user, SSHPublicKey=public_key, AvailabilityZone=az,
        )
        return bool(resp.get("Success", False))

    @_aws_errors
    def status(self) -> list[dict[str, Any]]:
        """Every live instance tagged as ours in the region, with uptime and cost.

        ``uptime`` and ``cost_so_far`` count from the last start (EC2's LaunchTime) for running
        instances (None otherwise) and cover compute only, not EBS storage.
        """
        rows = []
        now = _dt.datetime.now(_dt.timezone.utc)
        ds = self._describe(filters=[
            {"Name": f"tag:{CREATED_BY}", "Values": [CREATED_BY_VALUE]},
            {"Name": "instance-state-name", "Values": [*LIVE_STATES, "shutting-down"]},
        ])
        for d in sorted(ds, key=lambda x: (_tags(x).get(NAME_TAG, ""), x["InstanceId"])):
            info = InstanceInfo.from_description(d)
            price, source = self.hourly_price(info.instance_type, info.lifecycle, info.availability_zone)
            uptime = None
            cost = None
            if info.state == "running" and info.launch_time is not None:
                launched = info.launch_time
                if launched.tzinfo is None:
                    launched = launched.replace(tzinfo=_dt.timezone.utc)
                uptime = max(now - launched, _dt.timedelta(0))
                if price is not None:
                    billed = max(uptime.total_seconds(), 60.0)  # per-second billing, one minute minimum
                    cost = round(price * billed / 3600.0, 4)
            rows.append({
                "id": info.instance_id, "name": info.name, "type": info.instance_type, "state": info.state,
                "lifecycle": info.lifecycle, "launch_time": info.launch_time, "uptime": uptime,
                "hourly_price": price, "price_source": source, "cost_so_far": cost,
                "public_ip": info.public_ip, "availability_zone": info.availability_zone,
                "owner": info.owner, "user": info.user,
            })
        return rows
