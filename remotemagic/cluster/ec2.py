"""``%ec2 cluster start -n N``: the cluster's worker instances on EC2, and their security group.

The scheduler runs on the current target, one of our on-demand instances (never spot: losing
it loses the cluster). The N worker instances are launched through the EC2 provider's public
methods (``Ec2Provider.start``: tagged ours, SSH only from the owner's address, the idle
auto-stop in their user-data -- and nothing of the cluster's TLS material, which goes over SSH
through our agent) and then tagged with ``remotemagic:cluster=<id>``. One more security group,
``remotemagic-<id>-dask``, lets members reach each other on TCP with a rule that references
only the group itself; nothing new is opened to any address range. ``stop`` terminates exactly
the instances tagged ours *and* with this cluster's tag, then deletes that group.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .core import Cluster, ClusterError, Member, new_cluster_id

log = logging.getLogger(__name__)

CLUSTER_TAG = "remotemagic:cluster"
DELETE_GROUP_TIMEOUT = 120.0


def group_name(cluster_id: str) -> str:
    return f"remotemagic-{cluster_id}-dask"


def _ours(tags: list[dict[str, str]]) -> dict[str, str]:
    from ..providers.ec2 import CREATED_BY, CREATED_BY_VALUE

    t = {x["Key"]: x["Value"] for x in tags or []}
    return t if t.get(CREATED_BY) == CREATED_BY_VALUE else {}


def ensure_cluster_group(provider: Any, cluster_id: str, vpc_id: str) -> str:
    """The cluster's security group: all TCP between its members, from nowhere else."""
    from ..providers.ec2 import CREATED_BY, CREATED_BY_VALUE, NAME_TAG

    ec2 = provider.ec2
    name = group_name(cluster_id)
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}]).get("SecurityGroups", [])
    if found:
        if not _ours(found[0].get("Tags", [])):
            raise ClusterError(f"security group {name} exists but is not ours: not touching it")
        return str(found[0]["GroupId"])
    tags = [{"Key": CREATED_BY, "Value": CREATED_BY_VALUE}, {"Key": NAME_TAG, "Value": cluster_id},
            {"Key": CLUSTER_TAG, "Value": cluster_id}, {"Key": "Name", "Value": name}]
    gid = str(ec2.create_security_group(
        GroupName=name, VpcId=vpc_id, Description=f"remotemagic Dask cluster {cluster_id}: members only",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])["GroupId"])
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
        "UserIdGroupPairs": [{"GroupId": gid, "Description": "Dask: members of this cluster only"}]}])
    # a new group allows all egress; members need only each other and package indexes (HTTPS):
    # egress is left as AWS makes it, ingress is the part that must stay closed
    log.info("created security group %s (%s) for cluster %s", name, gid, cluster_id)
    return gid


def _describe(provider: Any, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for r in provider.ec2.describe_instances(InstanceIds=ids)["Reservations"]:
        out.extend(r["Instances"])
    return out


def _add_group(provider: Any, instance: dict[str, Any], gid: str) -> None:
    groups = [g["GroupId"] for g in instance.get("SecurityGroups") or []]
    if gid not in groups:
        provider.ec2.modify_instance_attribute(InstanceId=instance["InstanceId"], Groups=[*groups, gid])


def launch_workers(provider: Any, cluster_id: str, n: int, *, instance_type: str | None = None, spot: bool = False,
                   primary_id: str | None = None, progress: bool = False) -> list[Any]:
    """Launch ``n`` worker instances for the cluster, tag them, put them (and the primary) in
    the cluster's group. Returns their ``InstanceInfo`` (running)."""
    if n < 1:
        raise ValueError(f"-n: at least one worker instance, not {n}")
    names = [f"{cluster_id}-w{i}" for i in range(n)]
    launched: list[Any] = []
    try:
        for name in names:
            launched.append(provider.start(name, instance_type=instance_type, spot=spot, wait=False, progress=progress))
        ids = [i.instance_id for i in launched]
        provider.ec2.create_tags(Resources=ids, Tags=[{"Key": CLUSTER_TAG, "Value": cluster_id}])
        running = [provider.wait_running(iid, progress=progress) for iid in ids]
        described = _describe(provider, ids + ([primary_id] if primary_id else []))
        gid = ensure_cluster_group(provider, cluster_id, described[0]["VpcId"])
        for d in described:
            _add_group(provider, d, gid)
        return running
    except BaseException:
        for info in launched:
            try:
                provider.terminate(info.instance_id, wait=False, progress=False)
            except Exception as exc:
                log.warning("could not terminate %s after a failed launch: %s", info.instance_id, exc)
        raise


def cluster_instances(provider: Any, cluster_id: str) -> list[dict[str, Any]]:
    """Live instances tagged ours *and* with this cluster's tag (nothing else is ever touched)."""
    from ..providers.ec2 import CREATED_BY, CREATED_BY_VALUE

    out = []
    pages = provider.ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster_id]},
        {"Name": f"tag:{CREATED_BY}", "Values": [CREATED_BY_VALUE]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    for page in pages:
        for r in page["Reservations"]:
            out += [d for d in r["Instances"] if _ours(d.get("Tags", []))]
    return out


def terminate_workers(provider: Any, cluster_id: str, primary_id: str | None = None, wait: bool = True) -> list[str]:
    """Terminate the cluster's worker instances (ours and tagged with it), take the primary out
    of the cluster's group and delete the group. Returns the terminated ids."""
    ids = [d["InstanceId"] for d in cluster_instances(provider, cluster_id)]
    if ids:
        with ThreadPoolExecutor(max_workers=min(8, len(ids))) as pool:
            list(pool.map(lambda iid: provider.terminate(iid, wait=wait, progress=False), ids))
    ec2 = provider.ec2
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [group_name(cluster_id)]}])
    for g in groups.get("SecurityGroups", []):
        if not _ours(g.get("Tags", [])):
            continue
        if primary_id:
            for d in _describe(provider, [primary_id]):
                keep = [x["GroupId"] for x in d.get("SecurityGroups") or [] if x["GroupId"] != g["GroupId"]]
                if keep and len(keep) < len(d.get("SecurityGroups") or []):
                    ec2.modify_instance_attribute(InstanceId=primary_id, Groups=keep)
        if wait:
            try:
                ec2.delete_security_group(GroupId=g["GroupId"])
            except Exception as exc:  # an interface may linger after termination
                log.warning("could not delete security group %s: %s", g["GroupId"], exc)
    return ids


class Ec2Workers:
    """What :meth:`Cluster.stop` calls to end the instances it launched."""

    def __init__(self, provider: Any, cluster_id: str, primary_id: str | None):
        self.provider = provider
        self.cluster_id = cluster_id
        self.primary_id = primary_id

    def terminate_workers(self, cluster: Cluster) -> list[str]:
        return terminate_workers(self.provider, self.cluster_id, self.primary_id)


def start_ec2(magics: Any, n: int, *, instance_type: str | None = None, spot: bool = False, nthreads: int = 1,
              idle_stop_minutes: float = 0) -> Cluster:
    """``%ec2 cluster start -n N``: scheduler on the current (on-demand) instance, one worker
    (nanny) on each of ``n`` new instances."""
    primary = magics.get_remote()
    if primary.instance is None or primary.provider is None:
        raise ClusterError("-n N: the scheduler runs on the current target, which must be one of our EC2 instances "
                           "(%ec2 start, on-demand) -- or use --local N / --hosts A,B,C")
    if primary.instance.lifecycle == "spot":
        raise ClusterError(f"the scheduler must not run on a spot instance ({primary.instance.name} is one): "
                           "%ec2 start an on-demand instance for it (--spot applies to the workers)")
    provider = primary.provider
    cid = new_cluster_id()
    infos = launch_workers(provider, cid, n, instance_type=instance_type, spot=spot,
                           primary_id=primary.instance.instance_id, progress=magics.show_progress)
    workers = Ec2Workers(provider, cid, primary.instance.instance_id)
    remotes: list[Any] = []
    c: Cluster | None = None
    try:
        for info in infos:
            remotes.append(magics._connect("ec2", info.name, None, None))
        price = {i.instance_id: provider.hourly_price(i.instance_type, i.lifecycle)[0] for i in infos}
        members = [Member(r, i.private_ip or i.host, price[i.instance_id], i.instance_id)
                   for r, i in zip(remotes, infos, strict=True)]
        head = Member(primary, primary.instance.private_ip or primary.instance.host,
                      provider.hourly_price(primary.instance.instance_type)[0])
        c = Cluster(cid, "ec2", head, members, nthreads=nthreads, idle_stop_minutes=idle_stop_minutes)
        c.ec2 = workers
        c.start(n)
        c.bind_primary_session()
        return c
    except BaseException:
        if c is not None:
            c.stop()  # its processes, then (c.ec2) the instances
        else:
            workers.terminate_workers(None)  # type: ignore[arg-type]
        for r in remotes:
            r.close()
        raise
