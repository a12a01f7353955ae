"""The fleet provider: the configured fleets by name, and the ones brought up in this process.

It has the :class:`~remotemagic.providers.base.Provider` verbs that mean something for machines
that are not ours: ``start`` (connect, bootstrap) and ``stop`` (our workers, not the machines);
``terminate`` and ``resize`` raise :class:`~.fleet.FleetError`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from .config import find_fleet, load_fleets
from .fleet import Fleet, FleetError, HostResult

#: Fleets brought up in this process, by name (the magics find them again for stop, status...).
_live: dict[str, Fleet] = {}
_live_lock = threading.Lock()


class FleetProvider:
    """Fleets named in ``configured`` (e.g. ``Ec2Magics.fleets``) or in ``<state dir>/fleets.json``.

    ``options`` (SSH and Remote options, ``session``, ``root``) are the defaults for every fleet's
    hosts; a fleet's own options in the configuration win over them.
    """

    def __init__(self, configured: Mapping[str, Any] | None = None, state_dir: str | os.PathLike[str] | None = None,
                 **options: Any):
        self.configured = dict(configured or {})
        self.state_dir = state_dir
        self.options = options

    def names(self) -> list[str]:
        """The configured fleets' names."""
        return sorted(load_fleets(self.configured, self.state_dir))

    def fleet(self, name: str) -> Fleet:
        """The fleet ``name``: the live one if its hosts are still those configured, else a new one."""
        hosts, shared = find_fleet(name, self.configured, self.state_dir)
        with _live_lock:
            live = _live.get(name)
            if live is not None and live.hosts == hosts:
                return live
        fleet = Fleet(name, hosts, **{**self.options, **shared})
        with _live_lock:
            old, _live[name] = _live.get(name), fleet
        if old is not None:
            old.close()
        return fleet

    def find(self, name: str) -> Fleet | None:
        """The fleet ``name`` if it was brought up in this process."""
        with _live_lock:
            return _live.get(name)

    def start(self, name: str, **options: Any) -> Fleet:
        """Bring every host of ``name`` up (see :meth:`Fleet.start`); the fleet is returned."""
        fleet = self.fleet(name)
        fleet.start(**options)
        return fleet

    def stop(self, name: str, **options: Any) -> list[HostResult]:
        """Stop our workers on every host of ``name`` (see :meth:`Fleet.stop`)."""
        return self.fleet(name).stop(**options)

    def terminate(self, name: str, **options: Any) -> Any:
        raise FleetError(f"fleet {name!r}: its hosts are not remotemagic's to terminate (%ec2 stop fleet {name} "
                         "stops our workers on them)")

    def resize(self, name: str, new_type: str, **options: Any) -> Any:
        raise FleetError(f"fleet {name!r}: SSH hosts cannot be resized by remotemagic")

    def status(self) -> list[dict[str, Any]]:
        """One row per host of every fleet brought up in this process (``fleet`` names it)."""
        with _live_lock:
            fleets = list(_live.values())
        return [{"fleet": f.name, **row} for f in fleets for row in f.status()]

    def hourly_price(self, machine_type: str, lifecycle: str = "on-demand",
                     availability_zone: str | None = None) -> tuple[float | None, str]:
        return None, "unknown (SSH hosts)"


def live_fleet_of(remote: Any) -> Fleet | None:
    """The live fleet one of whose connections is ``remote``."""
    with _live_lock:
        fleets = list(_live.values())
    for f in fleets:
        if any(r is remote for r in f.remotes):
            return f
    return None


def close_all() -> None:
    """Close every live fleet's connections (their workers keep running)."""
    with _live_lock:
        fleets = list(_live.values())
        _live.clear()
    for f in fleets:
        f.close()
