"""A Dask distributed cluster on our own targets: scheduler on the primary, nannies on the members.

:class:`Cluster` starts Dask's own processes as detached services of our agents (they outlive
the SSH link and the kernel), gives the notebook a TLS ``distributed.Client`` (through a tunnel
on 127.0.0.1 when the scheduler is on another machine), and scales, reports, shows logs and
stops what it started. See docs/cluster.md.
"""

from __future__ import annotations

import json
import logging
import posixpath
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import envsync, notices, state, values
from ..agent import protocol
from . import launch
from .tls import ClusterTLS, dask_config, security

log = logging.getLogger(__name__)

#: the packages every member must have at the client's versions (version skew breaks Dask)
CORE_PACKAGES = ("dask", "distributed", "cloudpickle")
#: carried along when installed here (dask.array and dask.dataframe need them)
OPTIONAL_PACKAGES = ("numpy", "pandas", "lz4", "bokeh")
UNBIND_CODE = """import distributed as _rm_distributed
_rm_old = getattr(_rm_distributed, "_remotemagic_client", None)
if _rm_old is not None:
    _rm_distributed._remotemagic_client = None
    _rm_old.close(timeout=5)
del _rm_distributed, _rm_old
"""
SCHEDULER_START_TIMEOUT = 60.0
WORKERS_TIMEOUT = 120.0
#: run once in the primary target's session: Dask's config names the cluster (``Client()`` with no
#: arguments finds it) and a default client is made, held by the ``distributed`` module (Dask keeps
#: default clients only weakly) and outside the namespace (checkpoints must not pickle it)
BIND_CODE = """import dask as _rm_dask, distributed as _rm_distributed
_rm_dask.config.set({conf!r})
_rm_old = getattr(_rm_distributed, "_remotemagic_client", None)
if _rm_old is not None:
    _rm_old.close()
_rm_distributed._remotemagic_client = _rm_distributed.Client(set_as_default=True)
del _rm_dask, _rm_distributed, _rm_old
"""


class ClusterError(Exception):
    """A cluster could not be started, reached or changed; the message says what and why."""


@dataclass
class Member:
    """One target of the cluster: its connection, the address Dask peers reach it at, and the
    paths of the cluster's files there."""

    remote: Any
    address: str
    paths: dict[str, str] = field(default_factory=dict)
    #: what it costs per hour (EC2 instances we launched), None when unknown or free
    hourly: float | None = None
    instance_id: str | None = None

    @property
    def local(self) -> bool:
        return getattr(self.remote.transport, "link", None) is None


def new_cluster_id() -> str:
    return "dask-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def member_address(remote: Any) -> str:
    """The address Dask peers use for a target: 127.0.0.1 for this machine, else the SSH host's
    address (resolved here; for EC2, the caller passes the private address)."""
    host = getattr(getattr(remote.transport, "host", None), "hostname", None)
    if not host:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


class Cluster:
    """A running (or stopped) cluster. Build one with :func:`remotemagic.cluster.start`."""

    def __init__(self, cluster_id: str, kind: str, primary: Member, members: list[Member], *, nthreads: int = 1,
                 idle_stop_minutes: float = 0, memory_limit: str = "auto", state_root: Path | None = None):
        self.id = cluster_id
        self.kind = kind
        self.primary = primary
        #: where workers go, round-robin (the primary too for --local)
        self.members = members
        self.nthreads = nthreads
        self.idle_stop_minutes = idle_stop_minutes
        self.memory_limit = memory_limit
        base = state_root or getattr(primary.remote, "state_root", None) or state.state_dir()
        self.folder = Path(base) / "clusters" / cluster_id
        self.tls: ClusterTLS | None = None
        self.local_paths: dict[str, str] = {}
        #: the scheduler's address as members reach it, and as this kernel reaches it
        self.address = ""
        self.local_address = ""
        self.dashboard: str | None = None
        self.dashboard_port: int | None = None
        self.workers: dict[str, Member] = {}  # service name (w0, w1...) -> where it runs
        self.n = 0
        #: connections this cluster opened itself (re-attached members, a local target of its own):
        #: closed when it stops
        self.owned: list[Any] = []
        self.client: Any = None
        self.tunnels: list[Any] = []
        self.stopped = False
        #: instances we launched for this cluster (EC2): launched and terminated by :meth:`scale`,
        #: replaced when lost (:meth:`status`, a watcher thread), terminated by :meth:`stop`
        self.ec2: Any = None
        #: held while the members or workers change (the EC2 watcher thread changes them too)
        self.lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<Cluster {self.id} {self.kind} workers={self.n} scheduler={self.address or '-'}>"

    # -- start ---------------------------------------------------------------------------------
    def start(self, n: int, packages: tuple[str, ...] = (), code: str = "",
              timeout: float = WORKERS_TIMEOUT) -> Cluster:
        """Make the TLS material, sync packages, start the scheduler and ``n`` workers, connect."""
        self.tls = ClusterTLS.generate(self.id)
        self.local_paths = self.tls.write(self.folder / "tls")
        seen: set[int] = set()
        for m in [self.primary, *self.members]:
            if id(m) in seen:
                continue
            seen.add(id(m))
            self._sync(m, packages, code)
            self._install(m)
        self._start_scheduler()
        self._save()
        self.scale(n, wait=True, timeout=timeout)
        return self

    def _sync(self, m: Member, packages: tuple[str, ...], code: str) -> None:
        """The cluster's packages at this kernel's versions on a remote member (exact: a skewed
        dask or distributed is replaced, not kept)."""
        if not envsync.supported(m.remote.transport):
            return
        from ..envsync import localenv

        have = localenv.current().dists
        names = [p for p in (*CORE_PACKAGES, *OPTIONAL_PACKAGES, *packages) if localenv.norm(p) in have]
        saved = m.remote.package_sync
        m.remote.package_sync = "exact"
        try:
            m.remote.sync_packages(names, code=code)
        finally:
            m.remote.package_sync = saved

    def add_member(self, m: Member, packages: tuple[str, ...] = (), code: str = "") -> None:
        """A new target for workers (a replacement or added EC2 instance): packages synced, the
        cluster's files installed, then it joins :attr:`members`."""
        self._sync(m, packages, code)
        self._install(m)
        self.members.append(m)

    def _install(self, m: Member) -> None:
        assert self.tls is not None
        got = m.remote.request(protocol.OP_SERVICE_FILES, group=self.id,
                               files={**self.tls.target_files(), launch.PRELOAD_FILE: launch.PRELOAD})
        m.paths = dict(got["paths"])
        m.paths[launch.SCHEDULER_FILE] = posixpath.join(got["group_dir"], "files", launch.SCHEDULER_FILE)

    def _start_scheduler(self) -> None:
        p = self.primary
        p.remote.request(protocol.OP_SERVICE_START, group=self.id, name=launch.SCHEDULER,
                         module=launch.SCHEDULER_MODULE,
                         args=launch.scheduler_args(p.paths, p.address, self.idle_stop_minutes),
                         env=launch.environment(), max_restarts=3)
        deadline = time.monotonic() + SCHEDULER_START_TIMEOUT
        info = None
        while info is None:
            text = p.remote.request(protocol.OP_SERVICE_READ, group=self.id, name=launch.SCHEDULER_FILE)["text"]
            if text:
                try:
                    info = json.loads(text)
                    break
                except ValueError:
                    pass  # being written
            st = self._services(p).get(launch.SCHEDULER, {})
            if not st.get("alive") or time.monotonic() > deadline:
                tail = p.remote.request(protocol.OP_SERVICE_LOGS, group=self.id, name=launch.SCHEDULER,
                                        lines=30)["text"]
                raise ClusterError(f"the Dask scheduler did not start on {p.remote.target}:\n{tail}")
            time.sleep(0.1)
        self.address = info["address"]
        # without bokeh the port serves only /health and /metrics: no dashboard to show then
        self.dashboard_port = (info.get("services") or {}).get("dashboard") if _installed("bokeh") else None
        self.open_forwards()

    def open_forwards(self) -> None:
        """How this kernel reaches the scheduler (and dashboard): directly on this machine,
        else through forwards on 127.0.0.1 over the primary's SSH link."""
        p = self.primary
        dash_port = self.dashboard_port
        if p.local:
            self.local_address = self.address
            self.dashboard = f"http://127.0.0.1:{dash_port}/status" if dash_port else None
        else:  # from here only through the SSH link, on 127.0.0.1
            from .forward import LinkForward

            host, port = self.address.rsplit("://", 1)[1].rsplit(":", 1)
            t = LinkForward(p.remote.transport, int(port), host)
            self.tunnels.append(t)
            self.local_address = f"tls://127.0.0.1:{t.local_port}"
            if dash_port:
                d = LinkForward(p.remote.transport, int(dash_port), "127.0.0.1")
                self.tunnels.append(d)
                self.dashboard = f"http://127.0.0.1:{d.local_port}/status"

    # -- the client ----------------------------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> Any:
        """The notebook's ``distributed.Client`` (TLS, this cluster's client certificate); local
        modules of the notebook travel to the workers by value."""
        from distributed import Client

        from . import byvalue

        byvalue.install()
        values.register_local_modules()
        deadline = time.monotonic() + timeout
        if self.tunnels:
            self.primary.remote.connection()  # after a drop: reconnect (with backoff) first
            live_peers = [t.drop_stale() for t in self.tunnels]
            if self.client is not None:  # tunnels[0] leads to the scheduler
                self._await_reconnect(self.client, live_peers[0], deadline)
        if self.client is None or self.client.status in ("closed", "closing"):
            self.client = Client(self.local_address, security=security(self.local_paths, "client"), timeout=timeout)
        while self.client.status == "connecting" and time.monotonic() < deadline:
            time.sleep(0.05)  # reconnecting after a dropped link (the forward reconnects with it)
        return self.client

    @staticmethod
    def _await_reconnect(client: Any, live_peers: set[int], deadline: float) -> None:
        """Wait until ``client`` has left its connection to the scheduler if that connection is
        not one the forward holds open on the live link (by its local port, ``live_peers``):
        it was closed under the client, which learns so when its event loop next reads -- on a
        busy machine that can take seconds, and a task submitted before then is cancelled when
        it does. The client reconnects by itself ("connecting") to the same local address; the
        forward opens the new connection's channel on the live link."""
        batched = client.scheduler_comm
        old = batched.comm if batched is not None else None
        if old is None or int(old.local_address.rsplit(":", 1)[1]) in live_peers:
            return  # reconnecting already, or on a connection that is alive
        while time.monotonic() < deadline and client.status not in ("closed", "closing"):
            batched = client.scheduler_comm
            if batched is None or batched.comm is not old:
                return
            time.sleep(0.02)

    def bind_primary_session(self) -> None:
        """Make ``distributed.get_client()`` work in ``%%ec2 run`` cells on the primary target:
        a small job sets the scheduler address and TLS files in Dask's config of the session."""
        conf = {"scheduler-address": self.address, **dask_config(self.primary.paths, "client")}
        job = self.primary.remote.run(BIND_CODE.format(conf=conf))
        if job.state != "done":
            err = job.error()
            notices.notify(f"cluster {self.id}: could not prepare session '{self.primary.remote.session}' for "
                           f"distributed.get_client() ({err})", logger=log)

    @staticmethod
    def identity(client: Any, timeout: float = 30.0) -> dict[str, Any]:
        """The scheduler's own account of itself and every worker, asked now (``scheduler_info``
        keeps an old answer when the link is down); retried while the scheduler is unreachable,
        e.g. while the SSH link under a forward reconnects."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return dict(client.sync(client.scheduler.identity, n_workers=-1))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def unbind_primary_session(self) -> None:
        """Close the primary session's default client (a background job: never waits for a busy
        session)."""
        try:
            self.primary.remote.run(UNBIND_CODE, background=True)
        except Exception as exc:
            log.info("cluster %s: could not close the client in session %s: %s", self.id,
                     self.primary.remote.session, exc)

    # -- workers -------------------------------------------------------------------------------
    def _services(self, m: Member) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in m.remote.request(protocol.OP_SERVICE_STATUS, group=self.id)["services"]}

    def scale(self, n: int, wait: bool = True, timeout: float = WORKERS_TIMEOUT) -> int:
        """Run ``n`` workers: start the missing ones (round-robin over the members), retire and
        stop the ones above ``n``. Returns ``n``."""
        if n < 0:
            raise ValueError(f"a cluster has 0 or more workers, not {n}")
        if self.stopped:
            raise ClusterError(f"cluster {self.id} is stopped")
        with self.lock:
            if self.ec2 is not None:  # one instance per worker: launch the missing ones
                self.ec2.fit(self, n)
            if not self.members:
                raise ClusterError(f"cluster {self.id} has no targets for workers")
            wanted = [f"w{i}" for i in range(n)]
            extra = sorted((w for w in self.workers if w not in wanted), key=lambda w: int(w[1:]))
            if extra:
                self._retire(extra)
            for i, name in enumerate(wanted):
                self.start_worker(name, self.workers.get(name) or self._place(i))
            self.n = n
            if self.ec2 is not None:  # and terminate the ones left without a worker
                self.ec2.release(self)
            self._save()
        if wait:
            self.wait_for_workers(n, timeout)
        return n

    def _place(self, i: int) -> Member:
        """Where worker ``i`` goes: round-robin over the members; on EC2, an instance of its own
        (the member with the fewest workers)."""
        if self.ec2 is None:
            return self.members[i % len(self.members)]
        load = {id(m): 0 for m in self.members}
        for m in self.workers.values():
            load[id(m)] = load.get(id(m), 0) + 1
        return min(self.members, key=lambda m: load[id(m)])

    def start_worker(self, name: str, m: Member) -> None:
        """Start worker ``name`` (a nanny) on ``m`` (left alone if it runs there already)."""
        self.workers[name] = m
        m.remote.request(protocol.OP_SERVICE_START, group=self.id, name=name, module=launch.WORKER_MODULE,
                         args=launch.worker_args(m.paths, self.address, m.address, self.dask_name(name),
                                                 self.nthreads, self.memory_limit),
                         env=launch.environment(), max_restarts=10,
                         restart_while_reachable=self.address.split("://", 1)[-1], reachable_via=launch.SCHEDULER)

    def forget_workers(self, names: list[str]) -> None:
        """Tell the scheduler that workers ``names`` are gone (their machine vanished: their
        connections may take minutes to time out) so Dask recomputes their work now and a
        replacement can take the same name."""
        if not names or self.client is None:
            return
        dask_names = {self.dask_name(w) for w in names}

        async def remove(dask_scheduler: Any, names: set[str]) -> list[str]:  # runs on the scheduler
            gone = [a for a, ws in list(dask_scheduler.workers.items()) if ws.name in names]
            for address in gone:
                await dask_scheduler.remove_worker(address, stimulus_id="remotemagic-instance-lost", close=False)
            return gone

        try:
            self.client.run_on_scheduler(remove, names=dask_names)
        except Exception as exc:  # the scheduler finds out by itself, later
            log.info("cluster %s: could not remove %s from the scheduler: %s", self.id, sorted(dask_names), exc)

    def dask_name(self, service: str) -> str:
        return f"{self.id}-{service}"

    def _retire(self, names: list[str]) -> None:
        client = self.client
        dask_names = [self.dask_name(w) for w in names]
        if client is not None:
            try:
                client.retire_workers(names=dask_names, close_workers=True)
            except Exception as exc:  # retiring moves their data; stopping them now loses it (Dask recomputes)
                log.info("retire_workers(%s) failed: %s", dask_names, exc)
        by_member: dict[int, tuple[Member, list[str]]] = {}
        for w in names:
            m = self.workers.pop(w)
            by_member.setdefault(id(m), (m, []))[1].append(w)
        for m, ws in by_member.values():
            m.remote.request(protocol.OP_SERVICE_STOP, group=self.id, names=ws)

    def wait_for_workers(self, n: int, timeout: float = WORKERS_TIMEOUT) -> None:
        """Wait until ``n`` workers are connected to the scheduler; an error names dead ones."""
        client = self.connect()
        deadline = time.monotonic() + timeout
        while True:
            have = len(self.identity(client, timeout=max(1.0, deadline - time.monotonic())).get("workers", {}))
            if have >= n:
                return
            if time.monotonic() > deadline:
                dead = []
                for m in {id(m): m for m in self.workers.values()}.values():
                    for name, st in self._services(m).items():
                        if name != launch.SCHEDULER and not st.get("alive") and name in self.workers:
                            dead.append(f"{name} on {m.remote.target}: "
                                        + self.logs(name, lines=8).strip().replace("\n", "\n    "))
                raise ClusterError(f"only {have} of {n} workers joined cluster {self.id} within {timeout:g} s"
                                   + ("".join("\n  " + d for d in dead) if dead else ""))
            time.sleep(0.2)

    # -- looking at it -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Workers (memory, running tasks), the dashboard address, and $/h in total where known."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "scheduler": self.address,
                               "scheduler_here": self.local_address, "dashboard": self.dashboard,
                               "wanted": self.n, "stopped": self.stopped, "workers": []}
        if self.stopped:
            return out
        if self.ec2 is not None:  # lost worker instances: reported, and replaced where they can be
            with self.lock:
                out["instances"] = self.ec2.check(self)
        services: dict[str, dict[str, Any]] = {}
        for m in {id(m): m for m in [self.primary, *self.workers.values()]}.values():
            for name, st in self._services(m).items():
                services[name] = {**st, "target": m.remote.target}
        out["scheduler_alive"] = bool(services.get(launch.SCHEDULER, {}).get("alive"))
        info: dict[str, Any] = {}
        processing: dict[str, Any] = {}
        if out["scheduler_alive"]:
            try:
                client = self.connect()
                info = self.identity(client)
                processing = client.processing()
            except Exception as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
        rows = []
        for addr, w in sorted((info.get("workers") or {}).items(), key=lambda kv: str(kv[1].get("name"))):
            metrics = w.get("metrics") or {}
            rows.append({"name": w.get("name"), "address": addr, "threads": w.get("nthreads"),
                         "memory": metrics.get("memory"), "memory_limit": w.get("memory_limit"),
                         "running": len(processing.get(addr, ())), "executing": metrics.get("executing")})
        out["workers"] = rows
        out["services"] = services
        costs = [m.hourly for m in {id(m): m for m in [self.primary, *self.members]}.values()]
        known = [c for c in costs if c is not None]
        out["hourly"] = sum(known) if known else None
        out["hourly_complete"] = len(known) == len(costs)
        return out

    def logs(self, name: str = launch.SCHEDULER, lines: int = 40) -> str:
        """The last ``lines`` of the scheduler's (``scheduler``) or a worker's (``w0``...) log."""
        if name == launch.SCHEDULER:
            m = self.primary
        elif name in self.workers:
            m = self.workers[name]
        else:
            raise KeyError(f"no process {name!r} in cluster {self.id}: scheduler, "
                           + ", ".join(sorted(self.workers, key=lambda w: int(w[1:]))))
        return str(m.remote.request(protocol.OP_SERVICE_LOGS, group=self.id, name=name, lines=lines)["text"])

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, remove_files: bool = True) -> None:
        """Close the client, stop every process we started (workers first), close the tunnels,
        and (EC2) terminate the worker instances launched for this cluster."""
        if self.ec2 is not None:
            self.ec2.stop_watching()
        if self.client is not None:
            try:
                self.client.close(timeout=5)
            except Exception as exc:
                log.debug("closing the client: %s", exc)
            self.client = None
        if self.address:
            self.unbind_primary_session()
        problems = []
        for m in {id(m): m for m in [*self.members, self.primary]}.values():
            try:
                m.remote.request(protocol.OP_SERVICE_STOP, group=self.id, remove=remove_files)
            except Exception as exc:
                problems.append(f"{m.remote.target}: {exc}")
        for t in self.tunnels:
            t.close()
        self.tunnels = []
        if self.kind != "local":  # connections made for the workers' hosts: not needed any more
            for m in self.members:
                if m.remote is not self.primary.remote:
                    m.remote.close()
        for r in self.owned:
            r.close()
        self.owned = []
        if self.ec2 is not None:
            self.ec2.terminate_workers(self)
        self.stopped = True
        self.workers.clear()
        self.n = 0
        self._save()
        if problems:
            raise ClusterError(f"cluster {self.id}: could not stop everything: " + "; ".join(problems))

    def close(self) -> None:
        """Leave the cluster running; close only this kernel's client and tunnels."""
        if self.client is not None:
            self.client.close()
            self.client = None
        for t in self.tunnels:
            t.close()
        self.tunnels = []

    def _save(self) -> None:
        """The cluster's local record (what runs where), beside its TLS files."""
        from . import records

        records.save(self)


def _installed(dist: str) -> bool:
    try:
        from importlib import metadata

        metadata.version(dist)
        return True
    except Exception:
        return False
