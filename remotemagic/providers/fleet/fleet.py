"""A fleet: a named list of SSH hosts, brought up together, one :class:`~remotemagic.api.Remote` each.

Plain Python, for the magics (``%ec2 start fleet NAME``) and for code that puts work on several
machines (e.g. a Dask cluster on the fleet's hosts)::

    from remotemagic.providers.fleet import Fleet

    fleet = Fleet("lab", ["gpu1", "me@10.0.0.5:2222"], python="python3")
    for result in fleet.start():      # every host in parallel: connect, ship the agent, sync
        print(result.line())          # "gpu1: up, Python 3.11.9 on Linux-..., 16 CPUs (2.3 s)"
    fleet.primary.run("print(1)")     # the first host that is up
    [r.target for r in fleet.remotes] # every host that is up, in the fleet's order
    fleet.stop()                      # stop our workers on every host (not the machines)

A host that does not answer is named in its :class:`HostResult` (``ok`` false, ``error``); the
others are up all the same.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ... import notices
from ..base import ProviderError
from .config import FleetHost, check_name

if TYPE_CHECKING:  # pragma: no cover
    from ...api import Remote

#: Hosts connected to at once.
MAX_PARALLEL = 8


class FleetError(ProviderError):
    """No host of the fleet could be reached, or a verb a fleet does not have (the message names each host)."""


@dataclass
class HostResult:
    """What happened on one host: ``ok`` with its ``remote`` and a ``detail``, or the ``error``."""

    host: str
    ok: bool
    detail: str = ""
    remote: Remote | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    notices: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        """One line for the user: ``host: detail (1.2 s)`` or ``host: DOWN -- Error: why``."""
        if self.ok:
            return f"{self.host}: {self.detail} ({self.seconds:.1f} s)"
        text = str(self.error).strip().splitlines()[0] if str(self.error).strip() else ""
        return f"{self.host}: DOWN -- {type(self.error).__name__}" + (f": {text}" if text else "")


class Fleet:
    """The SSH hosts ``hosts`` under the name ``name``.

    ``hosts``: ``~/.ssh/config`` aliases, ``user@host[:port]`` or ``ssh://...`` strings, or
    :class:`~remotemagic.providers.fleet.config.FleetHost` (an address with its own options).
    ``session`` and ``root`` apply on every host (``root``: the agent's folder there, default
    ``~/.remotemagic``); ``options`` are those of ``remotemagic.connect("ssh", ...)`` (SSH
    options such as ``ssh_config``, ``python``, ``known_hosts``, and the Remote's such as
    ``show_progress``), for every host that does not set its own.
    """

    def __init__(self, name: str, hosts: Iterable[str | FleetHost | Mapping[str, Any]], *,
                 session: str | None = None, root: str | None = None, max_parallel: int = MAX_PARALLEL,
                 **options: Any):
        self.name = check_name(name)
        self.hosts = [h if isinstance(h, FleetHost) else FleetHost.parse(h, f"fleet {name!r}") for h in hosts]
        if not self.hosts:
            raise ValueError(f"fleet {name!r} has no hosts")
        if len({h.address for h in self.hosts}) != len(self.hosts):
            raise ValueError(f"fleet {name!r}: a host is listed twice")
        self.session = session
        self.root = root
        self.max_parallel = max(1, int(max_parallel))
        self.options = dict(options)
        #: the outcome of the last start/use/stop on each host
        self.results: dict[str, HostResult] = {}
        self._remotes: dict[str, Remote] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        up = len(self._remotes)
        return f"<Fleet {self.name}: {len(self.hosts)} host(s), {up} connected>"

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the hosts' connections --------------------------------------------------------------
    @property
    def remotes(self) -> list[Remote]:
        """The connection to every host that is up, in the fleet's order."""
        with self._lock:
            return [self._remotes[h.address] for h in self.hosts if h.address in self._remotes]

    @property
    def primary(self) -> Remote | None:
        """The first host (in the fleet's order) that is up: where the magics run cells."""
        remotes = self.remotes
        return remotes[0] if remotes else None

    def remote(self, host: str) -> Remote | None:
        """The connection to ``host`` (its address as configured), if it is up."""
        with self._lock:
            return self._remotes.get(host)

    def _connect(self, host: FleetHost) -> Remote:
        from ...connecting import default_session
        from ..ssh import connect_ssh

        opts = {**self.options, **host.options}
        root = opts.pop("root", None) or self.root
        return connect_ssh(host.address, session=self.session or default_session(), root=root, **opts)

    def _each(self, hosts: list[FleetHost], work: Callable[[FleetHost], tuple[str, Remote | None]]) -> list[HostResult]:
        """Run ``work`` for every host in parallel; each host's notices are told with its name."""

        def one(host: FleetHost) -> HostResult:
            t0 = time.monotonic()
            with notices.collect() as got:
                try:
                    detail, remote = work(host)
                    result = HostResult(host.address, True, detail, remote)
                except Exception as exc:  # one host's failure is its own: the others go on
                    result = HostResult(host.address, False, error=exc)
            result.seconds = time.monotonic() - t0
            result.notices = list(got)
            return result

        if len(hosts) == 1:
            results = [one(hosts[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(hosts)),
                                    thread_name_prefix=f"remotemagic-fleet-{self.name}") as pool:
                results = list(pool.map(one, hosts))
        for r in results:
            for n in r.notices:
                notices.deliver(notices.make(f"{r.host}: {n.get('text', '')}", n.get("level", "warning")))
            self.results[r.host] = r
        return results

    # -- verbs --------------------------------------------------------------------------------
    def start(self, *, sync: Iterable[str] | None = None, code: str = "") -> list[HostResult]:
        """Bring every host up in parallel: connect (shipping and starting the agent, building
        its Python environment the first time), then install there the local packages named in
        ``sync`` and those ``code`` imports (at this kernel's versions; not ``code``'s when the
        Remote's ``package_sync`` is ``off``). A failed sync is told, the host stays up. Hosts
        already up are checked, not reconnected. Returns one :class:`HostResult` per host, in order."""
        names = list(sync or ())

        def up(host: FleetHost) -> tuple[str, Remote | None]:
            remote = self.remote(host.address)
            if remote is not None:
                try:
                    remote.request("ping")
                except Exception:
                    self._forget(host.address)
                    remote = None
            if remote is None:
                remote = self._connect(host)
                with self._lock:
                    self._remotes[host.address] = remote
            info = remote.info
            detail = (f"up, Python {info.get('python', '?')} on {info.get('platform', '?')}, "
                      f"{info.get('cpus', '?')} CPUs")
            if code and getattr(remote, "package_sync", "auto") == "off":
                code_now = ""
            else:
                code_now = code
            if names or code_now:
                try:
                    rows = remote.sync_packages(names, code=code_now)
                except Exception as exc:  # the host is up; its packages are told, and synced again per cell
                    notices.notify(f"package sync failed: {exc}")
                    detail += ", package sync failed"
                else:
                    installed = sum(1 for r in rows if r.action == "installed")
                    detail += f", {installed} package(s) installed" if installed else ""
            return detail, remote

        return self._each(self.hosts, up)

    def use(self) -> Remote:
        """The primary alone: the first host, in order, that answers (no other is connected).
        :class:`FleetError` naming each host when none does."""
        primary = self.primary
        if primary is not None:
            return primary
        failed: list[HostResult] = []
        for host in self.hosts:
            result = self._each([host], lambda h: ("up", self._connect(h)))[0]
            if result.ok and result.remote is not None:
                with self._lock:
                    self._remotes[host.address] = result.remote
                if failed:
                    notices.notify(f"fleet {self.name}: {', '.join(r.host for r in failed)} did not answer; "
                                   f"cells run on {host.address}")
                return result.remote
            failed.append(result)
        raise FleetError(f"no host of fleet {self.name!r} answers:\n" + "\n".join(r.line() for r in failed))

    def stop(self, grace: float = 5.0) -> list[HostResult]:
        """Stop our workers (every session's) on every host, in parallel, and close the
        connections; the machines keep running. A host not connected yet is connected first."""

        def down(host: FleetHost) -> tuple[str, Remote | None]:
            remote = self._forget(host.address) or self._connect(host)
            try:
                stopped = []
                for s in remote.sessions():
                    if s.get("alive"):
                        remote.stop_worker(s["name"], grace=grace)
                        stopped.append(s["name"])
            finally:
                remote.close()
            if not stopped:
                return "no worker was running", None
            return f"stopped {len(stopped)} worker(s): session {', '.join(stopped)}", None

        return self._each(self.hosts, down)

    def status(self) -> list[dict[str, Any]]:
        """One row per host: ``name`` (its address), ``state`` (up, down, not connected), ``target``."""
        rows = []
        for h in self.hosts:
            remote, result = self.remote(h.address), self.results.get(h.address)
            failed = result is not None and not result.ok
            state = "up" if remote is not None else ("down" if failed else "not connected")
            rows.append({"name": h.address, "state": state, "target": remote.target if remote else None,
                         "error": None if result is None or result.ok else result.line()})
        return rows

    def _forget(self, host: str) -> Remote | None:
        with self._lock:
            return self._remotes.pop(host, None)

    def close(self) -> None:
        """Close every connection (the workers keep running: see :meth:`stop`)."""
        with self._lock:
            remotes, self._remotes = list(self._remotes.values()), {}
        for r in remotes:
            try:
                r.close()
            except Exception:  # closing is best effort: the link may be gone already
                pass
