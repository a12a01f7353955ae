"""Fleets in configuration: ``Ec2Magics.fleets`` and ``<state dir>/fleets.json``.

Both map a fleet's name to its hosts, either as a list or as a dict with shared options::

    {"lab": ["gpu1", "me@10.0.0.5:2222"],
     "big": {"hosts": ["big1", {"host": "big2", "python": "/opt/py311/bin/python3"}],
             "root": "/scratch/remotemagic"}}

A host is an ``~/.ssh/config`` alias, ``user@host[:port]`` or ``ssh://user@host[:port]``, or a
dict with ``host`` and its own options (``python``, ``root``, ``user``, ``port``,
``identity_file``, ``connect_timeout``...). A fleet's shared options apply to every host that
does not set its own. A fleet in ``Ec2Magics.fleets`` replaces one of the same name in the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import ProviderError

FILE_NAME = "fleets.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: options a host (or a whole fleet) may set in the configuration
HOST_OPTIONS = ("python", "root", "user", "port", "identity_file", "connect_timeout", "keepalive",
                "ssh_config", "known_hosts")


class FleetConfigError(ProviderError, ValueError):
    """A fleet's configuration is missing or malformed (the message says where and what)."""


@dataclass(frozen=True)
class FleetHost:
    """One host of a fleet: how to reach it (``address``) and its own connect options."""

    address: str
    options: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def parse(entry: str | Mapping[str, Any], where: str = "fleet") -> FleetHost:
        """A host from a configuration entry (a string, or a dict with ``host``)."""
        if isinstance(entry, str):
            address, options = entry.strip(), {}
        elif isinstance(entry, Mapping):
            address = str(entry.get("host") or "").strip()
            options = {k: v for k, v in entry.items() if k != "host"}
            unknown = sorted(set(options) - set(HOST_OPTIONS))
            if unknown:
                raise FleetConfigError(f"{where}: host {address or entry!r}: unknown option(s) {', '.join(unknown)} "
                                       f"(known: {', '.join(HOST_OPTIONS)})")
        else:
            raise FleetConfigError(f"{where}: a host is a string or a dict with 'host', not {entry!r}")
        if not address or any(c.isspace() for c in address):
            raise FleetConfigError(f"{where}: invalid host {address!r} (an ~/.ssh/config alias or user@host[:port])")
        return FleetHost(address, options)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FleetConfigError(f"invalid fleet name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return name


def parse_fleet(name: str, value: Any, where: str = "fleet") -> tuple[list[FleetHost], dict[str, Any]]:
    """``(hosts, shared options)`` of one fleet's configuration value (a list, or a dict with ``hosts``)."""
    where = f"{where} {name!r}"
    shared: dict[str, Any] = {}
    if isinstance(value, Mapping):
        shared = {k: v for k, v in value.items() if k != "hosts"}
        unknown = sorted(set(shared) - set(HOST_OPTIONS))
        if unknown:
            raise FleetConfigError(f"{where}: unknown option(s) {', '.join(unknown)} (known: hosts, "
                                   f"{', '.join(HOST_OPTIONS)})")
        value = value.get("hosts")
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise FleetConfigError(f"{where}: give a non-empty list of hosts, e.g. [\"gpu1\", \"me@10.0.0.5:2222\"]")
    hosts = [FleetHost.parse(h, where) for h in value]
    seen: set[str] = set()
    for h in hosts:
        if h.address in seen:
            raise FleetConfigError(f"{where}: host {h.address!r} is listed twice")
        seen.add(h.address)
    return hosts, shared


def fleet_file(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where fleets are kept outside the notebook: ``<state dir>/fleets.json``."""
    from ... import state

    return (Path(state_dir) if state_dir else state.state_dir()) / FILE_NAME


def load_fleets(configured: Mapping[str, Any] | None = None,
                state_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Every fleet's raw configuration: the file's, then ``configured`` (e.g. ``Ec2Magics.fleets``) over it."""
    path = fleet_file(state_dir)
    fleets: dict[str, Any] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    if text.strip():
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise FleetConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise FleetConfigError(f"{path}: expected an object mapping fleet names to hosts")
        fleets.update(loaded)
    fleets.update(dict(configured or {}))
    return fleets


def find_fleet(name: str, configured: Mapping[str, Any] | None = None,
               state_dir: str | os.PathLike[str] | None = None) -> tuple[list[FleetHost], dict[str, Any]]:
    """The hosts and shared options of the fleet ``name`` (:class:`FleetConfigError` naming the known ones)."""
    check_name(name)
    fleets = load_fleets(configured, state_dir)
    if name not in fleets:
        known = ", ".join(sorted(fleets)) or "none"
        raise FleetConfigError(
            f"no fleet named {name!r} (configured: {known}). Define it with %config Ec2Magics.fleets = "
            f"{{{name!r}: ['host1', 'user@host2:2222']}} or in {fleet_file(state_dir)}"
        )
    return parse_fleet(name, fleets[name])
