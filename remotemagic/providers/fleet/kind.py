"""The ``fleet`` target kind: ``%ec2 start fleet NAME`` brings every host of a configured SSH
fleet up, ``%ec2 use fleet NAME`` runs cells on its first host, ``%ec2 stop fleet NAME`` stops
our workers on all of them; ``remotemagic.connect("fleet:NAME")`` is the primary host's Remote."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..registry import TargetKind
from ..ssh import ssh_options_from
from .fleet import Fleet, FleetError
from .provider import FleetProvider, live_fleet_of

if TYPE_CHECKING:  # pragma: no cover
    from ...api import Remote


def _notebook_imports(config: Any) -> str:
    """The cells this kernel ran that import something (what a fleet's start syncs)."""
    shell = getattr(config, "shell", None)
    cells = (shell.user_ns.get("In", []) if shell is not None else []) or []
    return "\n".join(c for c in cells if isinstance(c, str) and "import" in c)


class FleetKind(TargetKind):
    name = "fleet"
    usage = "fleet NAME"
    noun = "a fleet"
    target_forms = ("'fleet:NAME'",)
    verbs = frozenset({"start", "stop"})

    def open(self, target: str, *, session: str, root: str | None = None, **options: Any) -> Remote:
        """``connect("fleet:NAME")``: the fleet from ``hosts=[...]`` or the fleets file; with
        ``start=True`` every host is brought up, else only the primary. Returns the primary."""
        name = target[6:].strip() or options.pop("name", None)
        if not name:
            raise ValueError("connect('fleet:NAME'): name the fleet")
        hosts = options.pop("hosts", None)
        start = bool(options.pop("start", False))
        if hosts is not None:
            fleet = Fleet(name, hosts, session=session, root=root, **options)
        else:
            fleet = FleetProvider(session=session, root=root, **options).fleet(name)
        return self._bring_up(fleet, start)

    def connect(self, config: Any, address: str | None, *, root: str | None, session: str | None,
                options: dict[str, Any], python: str | None = None, trust: bool = False,
                ssh_config: str | None = None, start: bool = False,
                launch: dict[str, Any] | None = None) -> Remote:
        name = address or self.default_name(config)
        defaults = {**options, **ssh_options_from(config, python, trust, ssh_config)}
        provider = FleetProvider(getattr(config, "fleets", None), session=session,
                                 root=root or config.remote_root or None, **defaults)
        fleet = provider.fleet(name)
        return self._bring_up(fleet, start, code=_notebook_imports(config) if start else "")

    @staticmethod
    def _bring_up(fleet: Fleet, start: bool, code: str = "") -> Remote:
        if not start:
            return fleet.use()
        results = fleet.start(code=code)
        primary = fleet.primary
        if primary is None:
            raise FleetError(f"no host of fleet {fleet.name!r} came up:\n" + "\n".join(r.line() for r in results))
        return primary

    def default_name(self, config: Any) -> str:
        names = FleetProvider(getattr(config, "fleets", None)).names()
        if len(names) == 1:
            return names[0]
        raise ValueError(f"name the fleet: %ec2 start fleet NAME (configured: {', '.join(names) or 'none'})")

    def machine_name(self, remote: Remote | None) -> str | None:
        fleet = live_fleet_of(remote) if remote is not None else None
        return fleet.name if fleet is not None else None

    def started(self, remote: Remote, config: Any) -> str:
        fleet = live_fleet_of(remote)
        if fleet is None:  # pragma: no cover - the primary is always in its live fleet
            return f"Using {remote.target}"
        results = [fleet.results[h.address] for h in fleet.hosts if h.address in fleet.results]
        down = [r.host for r in results if not r.ok]
        lines = [f"Fleet {fleet.name}: {len(results) - len(down)} of {len(results)} host(s) up"
                 + (f" ({', '.join(down)} down)" if down else "")]
        lines += ["  " + r.line() for r in results]
        lines.append(f"Cells run on {remote.target} (session '{remote.session}'); "
                     f"%ec2 stop fleet {fleet.name} stops our workers on every host")
        return "\n".join(lines)

    def status_lines(self, remote: Remote) -> list[str]:
        fleet = live_fleet_of(remote)
        if fleet is None:
            return []
        rows = fleet.status()
        lines = [f"Fleet:    {fleet.name}, {sum(r['state'] == 'up' for r in rows)} of {len(rows)} host(s) up"]
        for r in rows:
            where = " (cells run here)" if r["target"] == remote.target else ""
            lines.append(f"  {r['error']}" if r["error"] else f"  {r['name']}: {r['state']}{where}")
        return lines

    def stop(self, config: Any, name: str, current: Remote | None) -> str:
        defaults = ssh_options_from(config)
        provider = FleetProvider(getattr(config, "fleets", None), root=config.remote_root or None,
                                 session=config.session or None, show_progress=config.show_progress, **defaults)
        results = provider.stop(name, grace=config.stop_grace)
        down = [r.host for r in results if not r.ok]
        head = f"Fleet {name}: our workers stopped on {len(results) - len(down)} of {len(results)} host(s)"
        head += f" ({', '.join(down)} unreachable)" if down else ""
        return "\n".join([head + "; the machines keep running", *("  " + r.line() for r in results)])


KIND = FleetKind()
