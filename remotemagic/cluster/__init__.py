"""``%ec2 cluster``: a Dask distributed cluster on our own secured targets (issue 14).

    from remotemagic import cluster
    c = cluster.start_local(4)                       # scheduler + 4 nannies on this machine
    c = cluster.start_hosts(["a", "b"], primary=r)   # nannies on SSH hosts, scheduler on ``r``
    client = c.connect()                             # a TLS distributed.Client
    c.status(); c.scale(6); c.logs("w0"); c.stop()

Modules: ``tls`` (per-cluster CA and certificates), ``launch`` (Dask's processes and their
arguments), ``core`` (the :class:`Cluster`), ``ec2`` (instances, security group), ``magic``
(the ``%ec2 cluster`` handler), ``forward`` (127.0.0.1 forwards that follow the SSH link),
``byvalue`` (local modules by value in Dask's pickling), ``records`` (re-attach from a new
kernel). The agent side is ``remotemagic/agent/services.py``.
"""

from __future__ import annotations

from typing import Any

from .core import Cluster, ClusterError, Member, member_address, new_cluster_id

__all__ = ["Cluster", "ClusterError", "Member", "connect_hosts", "start_hosts", "start_local"]


def start_local(n: int, *, remote: Any = None, root: str | None = None, nthreads: int = 1,
                idle_stop_minutes: float = 0, memory_limit: str = "auto", cluster_id: str | None = None) -> Cluster:
    """A cluster on this machine: scheduler and ``n`` nannies on the embedded local target
    (``remote``, else a new connection to the local target under ``root``)."""
    from .. import api

    if remote is None:
        remote = api.connect("local", root=root)
    primary = Member(remote, "127.0.0.1")
    c = Cluster(cluster_id or new_cluster_id(), "local", primary, [primary], nthreads=nthreads,
                idle_stop_minutes=idle_stop_minutes, memory_limit=memory_limit)
    return _started(c, n)


def connect_hosts(hosts: list[str], **options: Any) -> list[Any]:
    """One connection per SSH host, opened in parallel by the SSH fleet provider
    (:class:`remotemagic.providers.fleet.Fleet`): its agent shipped and started, its Python
    environment built the first time. Every host must answer: otherwise the ones that did are
    closed and :class:`ClusterError` names each host that did not (the fleet's one line per host)."""
    from ..providers.fleet import Fleet

    fleet = Fleet("cluster", hosts, **options)
    results = fleet.start()
    down = [r for r in results if not r.ok]
    if down:
        fleet.close()
        raise ClusterError("--hosts: not every host answers:\n" + "\n".join(r.line() for r in down))
    return fleet.remotes


def start_hosts(hosts: list[str] | list[Any], *, primary: Any, n: int | None = None, nthreads: int = 1,
                idle_stop_minutes: float = 0, memory_limit: str = "auto", packages: tuple[str, ...] = (),
                code: str = "", cluster_id: str | None = None, **connect_options: Any) -> Cluster:
    """A cluster over SSH hosts: the scheduler on ``primary`` (a connected ``Remote``), nannies
    on ``hosts`` (names for :func:`connect_hosts`, or connected ``Remote`` objects), by default
    one per host. Packages are synced at this kernel's versions on every member first."""
    remotes = [h for h in hosts if not isinstance(h, str)]
    names = [h for h in hosts if isinstance(h, str)]
    if names:
        remotes += connect_hosts(names, **connect_options)
    if not remotes:
        raise ValueError("--hosts: name at least one host")
    members = [Member(r, member_address(r)) for r in remotes]
    c = Cluster(cluster_id or new_cluster_id(), "hosts", Member(primary, member_address(primary)), members,
                nthreads=nthreads, idle_stop_minutes=idle_stop_minutes, memory_limit=memory_limit)
    return _started(c, len(members) if n is None else n, packages, code)


def _started(c: Cluster, n: int, packages: tuple[str, ...] = (), code: str = "") -> Cluster:
    """Start ``c``; on failure stop whatever of it did start, then raise."""
    try:
        c.start(n, packages=packages, code=code)
        c.bind_primary_session()
    except BaseException:
        try:
            c.stop()
        except Exception:
            pass
        raise
    return c
