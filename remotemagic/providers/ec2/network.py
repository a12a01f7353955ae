"""Who may reach an instance: the caller's public address and the ``remotemagic-<name>`` security group."""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.request
from typing import Any

from ... import notices
from .client import Ec2Client
from .errors import AwsError, NotOursError, PublicIpError, _aws_errors, _code
from .model import CHECKIP_URL, CREATED_BY, CREATED_BY_VALUE, NAME_TAG, _tags

log = logging.getLogger(__name__)


def public_ip_from_checkip(timeout: float = 3.0) -> str:
    """This machine's public IPv4 address as AWS sees it (https://checkip.amazonaws.com)."""
    with urllib.request.urlopen(CHECKIP_URL, timeout=timeout) as resp:  # noqa: S310 - fixed https URL
        return resp.read(64).decode("ascii", "replace").strip()



class Network(Ec2Client):
    """The security group of each instance: SSH only, from the caller only (a part of the provider)."""

    @staticmethod
    def _check_cidr(cidr: str) -> str:
        try:
            net = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"invalid ssh_cidrs entry {cidr!r}: {exc}") from None
        if net.prefixlen == 0:
            notices.notify(f"ssh_cidrs contains {net}: SSH will be open to the whole internet", logger=log)
        return str(net)

    # -- security group -----------------------------------------------------------------------

    def ssh_source_cidrs(self) -> list[str]:
        """The CIDRs SSH is opened to: ``ssh_cidrs``, else the caller's public IP as /32."""
        if self.ssh_cidrs:
            return list(self.ssh_cidrs)
        try:
            text = self.public_ip_lookup()
            ip = ipaddress.ip_address(str(text).strip())
        except (OSError, ValueError) as exc:
            raise PublicIpError(
                f"cannot find this machine's public IP address ({CHECKIP_URL}: {exc}), so the security group "
                f"cannot open SSH to it alone. Set the `ssh_cidrs` option (e.g. ssh_cidrs=['203.0.113.7/32'], "
                f"or %config Ec2Magics.ssh_cidrs) to the addresses you connect from."
            ) from None
        return [f"{ip}/{ip.max_prefixlen}"]

    def _default_vpc(self) -> str:
        vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}]).get("Vpcs", [])
        if not vpcs:
            raise AwsError(
                f"region {self.region} has no default VPC; create one with `aws ec2 create-default-vpc` "
                f"(custom VPCs and subnets are not supported yet)"
            )
        return vpcs[0]["VpcId"]

    @_aws_errors
    def ensure_security_group(self, name: str, vpc_id: str | None = None) -> str:
        """Create or fix ``remotemagic-<name>`` so it allows exactly TCP 22 from the SSH CIDRs."""
        group_name = f"remotemagic-{self._check_name(name)}"
        cidrs = self.ssh_source_cidrs()
        vpc_id = vpc_id or self._default_vpc()
        groups = self.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [group_name]}, {"Name": "vpc-id", "Values": [vpc_id]},
        ]).get("SecurityGroups", [])
        if groups:
            group = groups[0]
            if _tags(group).get(CREATED_BY) != CREATED_BY_VALUE:
                raise NotOursError(
                    f"security group {group_name} ({group['GroupId']}) exists but was not created by remotemagic; "
                    f"delete or rename it, or choose another instance name"
                )
            group_id = group["GroupId"]
        else:
            tags = [{"Key": CREATED_BY, "Value": CREATED_BY_VALUE}, {"Key": NAME_TAG, "Value": name},
                    {"Key": "Name", "Value": group_name}]
            group_id = self.ec2.create_security_group(
                GroupName=group_name, VpcId=vpc_id,
                Description=f"remotemagic {name}: SSH from the owner's address only",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
            )["GroupId"]
            group = {"GroupId": group_id, "IpPermissions": []}
            log.info("created security group %s (%s)", group_name, group_id)
        self._sync_ingress(group, cidrs)
        return group_id

    def _sync_ingress(self, group: dict[str, Any], cidrs: list[str]) -> None:
        want = set(cidrs)
        have: set[str] = set()
        revoke: list[dict[str, Any]] = []
        for perm in group.get("IpPermissions", []):
            is_ssh = perm.get("IpProtocol") == "tcp" and perm.get("FromPort") == 22 and perm.get("ToPort") == 22
            base = {k: perm[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in perm}
            for r in perm.get("IpRanges", []):
                if is_ssh and r.get("CidrIp") in want:
                    have.add(r["CidrIp"])
                else:
                    revoke.append({**base, "IpRanges": [{"CidrIp": r["CidrIp"]}]})
            for r in perm.get("Ipv6Ranges", []):
                if is_ssh and r.get("CidrIpv6") in want:
                    have.add(r["CidrIpv6"])
                else:
                    revoke.append({**base, "Ipv6Ranges": [{"CidrIpv6": r["CidrIpv6"]}]})
            for key in ("UserIdGroupPairs", "PrefixListIds"):
                for r in perm.get(key, []):
                    revoke.append({**base, key: [r]})
        if revoke:
            log.info("security group %s: revoking %d rule(s) other than SSH from %s", group["GroupId"], len(revoke),
                     ", ".join(cidrs))
            self.ec2.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=revoke)
        add = [c for c in cidrs if c not in have]
        if add:
            v4 = [{"CidrIp": c, "Description": "remotemagic SSH"} for c in add if ":" not in c]
            v6 = [{"CidrIpv6": c, "Description": "remotemagic SSH"} for c in add if ":" in c]
            ssh_rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
            if v4:
                ssh_rule["IpRanges"] = v4
            if v6:
                ssh_rule["Ipv6Ranges"] = v6
            self.ec2.authorize_security_group_ingress(GroupId=group["GroupId"], IpPermissions=[ssh_rule])
            log.info("security group %s: SSH allowed from %s", group["GroupId"], ", ".join(add))

    def _refresh_group_of(self, d: dict[str, Any], name: str) -> None:
        group_name = f"remotemagic-{name}"
        for g in d.get("SecurityGroups") or []:
            if g.get("GroupName") == group_name:
                group = self.ec2.describe_security_groups(GroupIds=[g["GroupId"]])["SecurityGroups"][0]
                if _tags(group).get(CREATED_BY) == CREATED_BY_VALUE:
                    self._sync_ingress(group, self.ssh_source_cidrs())
                return

    def _delete_group_of(self, d: dict[str, Any]) -> None:
        from botocore.exceptions import ClientError

        tag_name = _tags(d).get(NAME_TAG, "")
        for g in d.get("SecurityGroups") or []:
            if g.get("GroupName") != f"remotemagic-{tag_name}":
                continue
            if self._ours_by_name(tag_name):
                return  # another instance of that name still uses it
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.ec2.delete_security_group(GroupId=g["GroupId"])
                    log.info("deleted security group %s", g["GroupId"])
                    break
                except ClientError as exc:
                    # the network interface lingers a little after termination
                    if _code(exc) == "DependencyViolation" and time.monotonic() < deadline:
                        time.sleep(max(self.poll_interval, 0.05))
                        continue
                    log.warning("could not delete security group %s: %s", g["GroupId"], exc)
                    break
