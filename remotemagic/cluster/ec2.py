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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import notices
from .core import Cluster, ClusterError, Member, new_cluster_id

log = logging.getLogger(__name__)

CLUSTER_TAG = "remotemagic:cluster"
DELETE_GROUP_TIMEOUT = 120.0
#: seconds between two checks of the worker instances by the watcher thread
WATCH_INTERVAL = 30.0


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
                   primary_id: str | None = None, progress: bool = False, first: int = 0,
                   fallback: bool = False, ami: str | None = None) -> list[Any]:
    """Launch ``n`` worker instances for the cluster (named ``<id>-w<first>``...), tag them, put
    them (and the primary) in the cluster's group. Returns their ``InstanceInfo`` (running).
    ``fallback`` (with ``spot``): on-demand when AWS has no spot capacity (the provider says so)."""
    if n < 1:
        raise ValueError(f"-n: at least one worker instance, not {n}")
    names = [f"{cluster_id}-w{i}" for i in range(first, first + n)]
    launched: list[Any] = []
    try:
        for name in names:
            launched.append(provider.start(name, instance_type=instance_type, spot=spot, wait=False, progress=progress,
                                           fallback=fallback, ami=ami))
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


def instance_address(info: Any) -> str:
    """The address Dask peers reach an instance at: its private address (the members share a VPC)."""
    return str(info.private_ip or info.host)


def _all_states(provider: Any, cluster_id: str) -> dict[str, dict[str, Any]]:
    """Every instance tagged ours *and* with this cluster's tag, whatever its state (terminated
    ones too, while AWS still lists them), by id."""
    from ..providers.ec2 import CREATED_BY, CREATED_BY_VALUE

    out: dict[str, dict[str, Any]] = {}
    pages = provider.ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster_id]},
        {"Name": f"tag:{CREATED_BY}", "Values": [CREATED_BY_VALUE]}])
    for page in pages:
        for r in page["Reservations"]:
            out.update({d["InstanceId"]: d for d in r["Instances"] if _ours(d.get("Tags", []))})
    return out


class Ec2Workers:
    """The worker instances of one cluster: launched (one nanny each), watched, replaced when
    lost, terminated when no longer wanted -- only instances tagged ours and with this cluster's
    tag. :class:`Cluster` calls :meth:`fit` and :meth:`release` from ``scale``, :meth:`check`
    from ``status`` (and the watcher thread every :attr:`interval` seconds), and
    :meth:`terminate_workers` from ``stop``."""

    interval = WATCH_INTERVAL

    def __init__(self, provider: Any, cluster_id: str, primary_id: str | None, *,
                 connect: Callable[[str], Any] | None = None, instance_type: str | None = None, spot: bool = False,
                 ami: str | None = None, progress: bool = False):
        self.provider = provider
        self.cluster_id = cluster_id
        self.primary_id = primary_id
        self.connect = connect
        self.instance_type = instance_type
        self.spot = spot
        self.ami = ami
        self.progress = progress
        self.next_index = 0
        #: spot instances AWS stopped (reclaimed) -> since when (epoch seconds)
        self.waiting: dict[str, float] = {}
        #: what the last check found wrong and did, for ``status``
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- launching -----------------------------------------------------------------------------
    def launch(self, k: int, primary_id: str | None = None) -> list[Member]:
        """``k`` new worker instances, connected; their members (not yet synced nor in the cluster)."""
        if self.connect is None:
            raise ClusterError(f"cluster {self.cluster_id}: this kernel cannot connect to new worker instances")
        first = self.next_index
        self.next_index += k
        infos = launch_workers(self.provider, self.cluster_id, k, instance_type=self.instance_type, spot=self.spot,
                               primary_id=primary_id, progress=self.progress, first=first, fallback=self.spot,
                               ami=self.ami)
        members: list[Member] = []
        try:
            for info in infos:
                price = self.provider.hourly_price(info.instance_type, info.lifecycle)[0]
                members.append(Member(self.connect(info.name), instance_address(info), hourly=price,
                                      instance_id=info.instance_id))
        except BaseException:
            for m in members:
                m.remote.close()
            for info in infos:
                self._terminate(info.instance_id)
            raise
        return members

    def _terminate(self, instance_id: str) -> None:
        try:
            self.provider.terminate(instance_id, wait=False, progress=False)
        except Exception as exc:
            log.warning("could not terminate %s: %s", instance_id, exc)

    def _add(self, cluster: Cluster, k: int) -> list[Member]:
        members = self.launch(k)
        for m in members:
            cluster.add_member(m)
        return members

    # -- scale ---------------------------------------------------------------------------------
    def fit(self, cluster: Cluster, n: int) -> None:
        """Before ``scale n``: one instance per worker, so launch the instances missing."""
        missing = n - len(cluster.members)
        if missing > 0:
            notices.notify(f"cluster {cluster.id}: launching {missing} worker instance(s)", level="info", logger=log)
            added = self._add(cluster, missing)
            notices.notify(f"cluster {cluster.id}: launched " + ", ".join(str(m.instance_id) for m in added),
                           level="info", logger=log)

    def release(self, cluster: Cluster) -> None:
        """After ``scale``: terminate the instances left without a worker."""
        busy = {id(m) for m in cluster.workers.values()}
        idle = [m for m in cluster.members if id(m) not in busy and m.instance_id]
        for m in idle:
            cluster.members.remove(m)  # its workers were retired and stopped; its files go with the instance
            m.remote.close()
            self._terminate(str(m.instance_id))
        if idle:
            notices.notify(f"cluster {cluster.id}: terminating worker instance(s) "
                           + ", ".join(str(m.instance_id) for m in idle), level="info", logger=log)

    # -- lost instances ------------------------------------------------------------------------
    def check(self, cluster: Cluster) -> list[str]:
        """Find this cluster's worker instances that AWS stopped or terminated and bring the
        workers back to ``cluster.n``: a reclaimed spot instance (stopped, persistent request)
        is left to come back, another stopped one is started again -- their workers are started
        again when they run; a terminated one is replaced by a new instance running the same
        workers. Every action is a notice; returns the lines for ``status``."""
        if cluster.stopped:
            return []
        states = _all_states(self.provider, self.cluster_id)
        lines: list[str] = []
        for m in list(cluster.members):
            if not m.instance_id:
                continue
            d = states.get(m.instance_id)
            state = d["State"]["Name"] if d else "terminated"
            names = sorted((w for w, mm in cluster.workers.items() if mm is m), key=lambda w: int(w[1:]))
            label = f"{','.join(names) or '-'} on {m.instance_id}"
            spot = d is not None and d.get("InstanceLifecycle") == "spot"
            if state in ("pending", "running"):
                if m.instance_id in self.waiting and state == "running":
                    self._reconnect(m, d)
                    for w in names:
                        cluster.start_worker(w, m)
                    self.waiting.pop(m.instance_id)  # (kept if that failed: tried again at the next check)
                    notices.notify(f"cluster {cluster.id}: {label} is back: its worker(s) started again",
                                   level="info", logger=log)
                continue
            if state in ("stopping", "stopped"):
                # a spot instance AWS reclaimed comes back by itself (persistent request); one stopped
                # otherwise (its idle auto-stop, by hand) is started again: either way, waited for
                if m.instance_id not in self.waiting:
                    self.waiting[m.instance_id] = time.time()
                    if spot:
                        notices.notify(f"cluster {cluster.id}: {label}: reclaimed by AWS (spot); waiting for "
                                       "capacity to come back (Dask recomputes its work on the others)", logger=log)
                    else:
                        notices.notify(f"cluster {cluster.id}: {label} was stopped: starting it again", logger=log)
                if not spot and state == "stopped":
                    self._start_again(m, d)
                since = time.strftime("%H:%M", time.localtime(self.waiting[m.instance_id]))
                lines.append(f"{label}: " + ("reclaimed, waiting for capacity" if spot else "stopped, starting again")
                             + f" since {since}")
                continue
            # terminated or shutting down: replaced
            notices.notify(f"cluster {cluster.id}: {label} is {state}: launching a replacement", logger=log)
            cluster.members.remove(m)
            for w in names:
                cluster.workers.pop(w, None)
            cluster.forget_workers(names)
            self.waiting.pop(m.instance_id, None)
            m.remote.close()
        lines += self._refill(cluster)
        self.lines = lines
        return lines

    def _name(self, d: dict[str, Any] | None) -> str:
        from ..providers.ec2 import NAME_TAG

        name = _ours((d or {}).get("Tags", [])).get(NAME_TAG)
        if not name:
            raise ClusterError(f"instance {(d or {}).get('InstanceId')} has no {NAME_TAG} tag")
        return name

    def _start_again(self, m: Member, d: dict[str, Any] | None) -> None:
        try:
            self.provider.start(self._name(d), wait=False, progress=False)
        except Exception as exc:  # tried again at the next check
            notices.notify(f"could not start worker instance {m.instance_id} again: {exc}", logger=log)

    def _reconnect(self, m: Member, d: dict[str, Any] | None) -> None:
        """A new connection to an instance that was stopped and runs again (at a new address;
        its disk, with the cluster's files, is the same)."""
        if self.connect is None:
            return
        m.remote.close()
        m.remote = self.connect(self._name(d))

    def _refill(self, cluster: Cluster) -> list[str]:
        """Launch an instance for each worker (below ``cluster.n``) that has none and start it there."""
        want = [f"w{i}" for i in range(cluster.n)]
        waiting_on = {w for w, m in cluster.workers.items() if m.instance_id in self.waiting}
        missing = [w for w in want if w not in cluster.workers and w not in waiting_on]
        if not missing:
            return []
        try:
            added = self._add(cluster, len(missing))
        except Exception as exc:
            text = f"could not launch replacement worker instance(s) for {', '.join(missing)}: {exc}"
            notices.notify(f"cluster {cluster.id}: {text}; retrying at the next check", logger=log)
            return [text]
        for w, m in zip(missing, added, strict=True):
            cluster.start_worker(w, m)
        cluster._save()
        done = ", ".join(f"{w} on {m.instance_id}" for w, m in zip(missing, added, strict=True))
        notices.notify(f"cluster {cluster.id}: replacement running: {done}", level="info", logger=log)
        return [f"replaced: {done}"]

    # -- the watcher ---------------------------------------------------------------------------
    def watch(self, cluster: Cluster) -> None:
        """Check every :attr:`interval` seconds in a background thread, until :meth:`stop_watching`."""
        if self._thread is not None:
            return

        def loop() -> None:
            last_error = ""
            while not self._stop.wait(self.interval):
                try:
                    with cluster.lock:
                        if cluster.stopped:
                            return
                        self.check(cluster)
                    last_error = ""
                except Exception as exc:  # said once, not every interval; retried at the next one
                    if str(exc) != last_error:
                        notices.notify(f"cluster {cluster.id}: checking its worker instances failed: {exc} "
                                       f"(retrying every {self.interval:g} s)", logger=log)
                    last_error = str(exc)
                    log.info("cluster %s: check failed: %s", cluster.id, exc)

        self._thread = threading.Thread(target=loop, name=f"remotemagic-{cluster.id}-watch", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=600)

    def terminate_workers(self, cluster: Cluster) -> list[str]:
        self.stop_watching()
        return terminate_workers(self.provider, self.cluster_id, self.primary_id)


def start_ec2(magics: Any, n: int, *, instance_type: str | None = None, spot: bool = False, nthreads: int = 1,
              idle_stop_minutes: float = 0) -> Cluster:
    """``%ec2 cluster start -n N``: scheduler on the current (on-demand) instance, one worker
    (nanny) on each of ``n`` new instances; lost instances are replaced while it runs."""
    primary = magics.get_remote()
    if primary.instance is None or primary.provider is None:
        raise ClusterError("-n N: the scheduler runs on the current target, which must be one of our EC2 instances "
                           "(%ec2 start, on-demand) -- or use --local N / --hosts A,B,C")
    if primary.instance.lifecycle == "spot":
        raise ClusterError(f"the scheduler must not run on a spot instance ({primary.instance.name} is one): "
                           "%ec2 start an on-demand instance for it (--spot applies to the workers)")
    if n < 1:
        raise ValueError(f"-n: at least one worker instance, not {n}")
    provider = primary.provider
    cid = new_cluster_id()
    workers = Ec2Workers(provider, cid, primary.instance.instance_id,
                         connect=lambda name: magics._connect("ec2", name, None, None),
                         instance_type=instance_type, spot=spot, ami=getattr(magics, "ami", None) or None,
                         progress=magics.show_progress)
    c: Cluster | None = None
    members: list[Member] = []
    try:
        members = workers.launch(n, primary_id=primary.instance.instance_id)
        head = Member(primary, instance_address(primary.instance),
                      provider.hourly_price(primary.instance.instance_type)[0])
        c = Cluster(cid, "ec2", head, members, nthreads=nthreads, idle_stop_minutes=idle_stop_minutes)
        c.ec2 = workers
        c.start(n)
        c.bind_primary_session()
        workers.watch(c)
        return c
    except BaseException:
        if c is not None:
            c.stop()  # its processes, then (c.ec2) the instances
        else:
            workers.terminate_workers(None)  # type: ignore[arg-type]
        for m in members:
            m.remote.close()
        raise
