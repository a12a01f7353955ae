"""SSH fleets: a named list of SSH hosts brought up together (the ``fleet`` target kind).

* :class:`Fleet` -- the plain-Python API: ``Fleet(name, hosts, **ssh_options)``, ``start()``
  (every host in parallel; one :class:`HostResult` each), ``remotes``, ``primary``, ``stop()``.
* :mod:`.config` -- fleets in ``Ec2Magics.fleets`` and ``<state dir>/fleets.json``.
* :class:`FleetProvider` -- fleets by name (the provider verbs: start, stop).
* :mod:`.kind` -- ``%ec2 start|use|stop fleet NAME`` and ``connect("fleet:NAME")``.
"""

from __future__ import annotations

from .config import FleetConfigError, FleetHost, fleet_file, load_fleets
from .fleet import Fleet, FleetError, HostResult
from .provider import FleetProvider

__all__ = ["Fleet", "FleetConfigError", "FleetError", "FleetHost", "FleetProvider", "HostResult", "fleet_file",
           "load_fleets"]
