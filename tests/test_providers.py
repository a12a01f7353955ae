"""The seam for target kinds: the registry, the Provider protocol, kind errors in the magics, and
the fleets' configuration (no network here: see test_fleet.py for fleets of real sshd)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import remotemagic
from remotemagic import api, connecting
from remotemagic.errors import RemoteMagicError
from remotemagic.providers import registry
from remotemagic.providers.base import Provider, ProviderError
from remotemagic.providers.ec2 import AwsError, Ec2Provider
from remotemagic.providers.fleet import Fleet, FleetConfigError, FleetHost, FleetProvider, fleet_file, load_fleets
from remotemagic.providers.fleet.config import find_fleet
from remotemagic.providers.local import LocalKind

from .conftest import run_ok
from .workers import stop_workers

# -- the registry --------------------------------------------------------------------------------


def test_registry_knows_the_kinds_and_their_verbs() -> None:
    assert registry.names() == ["local", "ssh", "ec2", "fleet"]
    assert [k.name for k in registry.kinds()] == registry.names()
    assert registry.get("ec2").verbs == {"start", "stop", "terminate", "resize"}
    assert registry.get("fleet").verbs == {"start", "stop"}
    assert registry.get("local").verbs == registry.get("ssh").verbs == frozenset()
    assert [k.name for k in registry.with_verb("stop")] == ["ec2", "fleet"]
    assert [k.name for k in registry.with_verb("resize")] == ["ec2"]


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(registry.UnknownKindError, match=r"unknown target kind 'gcp': use local, ssh HOST, "
                                                        r"ec2 \[NAME\] or fleet NAME"):
        registry.get("gcp")
    with pytest.raises(ValueError, match=r"unknown target 'gcp:x': use 'local', 'ssh://user@host\[:port\]', "
                                         r"'ec2:NAME' or 'fleet:NAME'"):
        remotemagic.connect("gcp:x")


def test_targets_find_their_kind() -> None:
    for target, kind in [("local", "local"), ("local:/tmp/x", "local"), ("ssh://me@h:22", "ssh"),
                         ("ssh:alias", "ssh"), ("ssh host", "ssh"), ("ec2", "ec2"), ("ec2:box", "ec2"),
                         ("fleet:lab", "fleet")]:
        assert registry.for_target(target).name == kind, target
    with pytest.raises(ValueError):
        registry.for_target("sshx")  # a prefix is not enough: 'ssh', 'ssh:' or 'ssh '


def test_connect_stays_importable_from_api() -> None:
    assert api.connect is connecting.connect and remotemagic.connect is connecting.connect
    assert api.connect_ec2 is connecting.connect_ec2 and remotemagic.connect_ec2 is connecting.connect_ec2
    assert api.default_session is connecting.default_session


class LoopbackKind(LocalKind):
    """A kind added the documented way: a class with a name, and one line in KINDS."""

    name = "loopback"
    usage = "loopback"
    target_forms = ("'loopback'",)


KIND = LoopbackKind()


def test_a_new_kind_is_one_registry_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.KINDS, "loopback", f"{__name__}:KIND")
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    remote = remotemagic.connect("loopback", root=str(root))
    try:
        assert remote.run("x = 1 + 1", pull=["x"]).result() == {"x": 2}
    finally:
        remote.close()
        stop_workers(root)
    assert "loopback" in str(pytest.raises(ValueError, registry.get, "nope").value)


def test_a_broken_registry_line_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.KINDS, "bad", f"{__name__}:LoopbackKind")  # the class, not an instance
    with pytest.raises(TypeError, match="is not the TargetKind 'bad'"):
        registry.get("bad")


# -- the Provider protocol and its errors ---------------------------------------------------------


def test_providers_follow_the_protocol() -> None:
    assert isinstance(Ec2Provider(region="us-east-1", public_ip_lookup=lambda: "203.0.113.7"), Provider)
    assert isinstance(FleetProvider({}), Provider)
    assert issubclass(AwsError, ProviderError) and issubclass(ProviderError, RemoteMagicError)


def test_fleet_provider_refuses_what_ssh_hosts_cannot_do() -> None:
    p = FleetProvider({"lab": ["h1"]})
    with pytest.raises(ProviderError, match="not remotemagic's to terminate"):
        p.terminate("lab")
    with pytest.raises(ProviderError, match="cannot be resized"):
        p.resize("lab", "big")
    assert p.hourly_price("x") == (None, "unknown (SSH hosts)")


# -- fleets' configuration -------------------------------------------------------------------------


def test_fleet_config_forms(tmp_path: Path) -> None:
    (tmp_path / "fleets.json").write_text(json.dumps({
        "lab": ["gpu1", "me@10.0.0.5:2222"],
        "big": {"hosts": ["b1", {"host": "b2", "python": "/opt/py/bin/python3"}], "root": "/scratch/rm"},
    }))
    assert fleet_file(tmp_path) == tmp_path / "fleets.json"
    assert sorted(load_fleets(None, tmp_path)) == ["big", "lab"]
    hosts, shared = find_fleet("lab", None, tmp_path)
    assert [h.address for h in hosts] == ["gpu1", "me@10.0.0.5:2222"] and shared == {}
    hosts, shared = find_fleet("big", None, tmp_path)
    assert hosts[1] == FleetHost("b2", {"python": "/opt/py/bin/python3"}) and shared == {"root": "/scratch/rm"}
    # Ec2Magics.fleets wins over the file
    hosts, _ = find_fleet("lab", {"lab": ["other"]}, tmp_path)
    assert [h.address for h in hosts] == ["other"]
    # the fleet's own options win over the caller's defaults; a host's own over both
    fleet = FleetProvider(None, tmp_path, root="/default", python="python3").fleet("big")
    assert fleet.root == "/scratch/rm" and fleet.options == {"python": "python3"}


@pytest.mark.parametrize("config, match", [
    ({"lab": []}, "give a non-empty list of hosts"),
    ({"lab": "gpu1"}, "give a non-empty list of hosts"),
    ({"lab": ["gpu1", "gpu1"]}, "host 'gpu1' is listed twice"),
    ({"lab": ["two words"]}, "invalid host 'two words'"),
    ({"lab": [{"host": "h", "pasword": "x"}]}, r"unknown option\(s\) pasword"),
    ({"lab": {"hosts": ["h"], "colour": "red"}}, r"unknown option\(s\) colour"),
    ({"lab": [3]}, "a host is a string or a dict"),
    ({}, r"no fleet named 'lab' \(configured: none\)"),
])
def test_fleet_config_errors_are_specific(tmp_path: Path, config: dict[str, Any], match: str) -> None:
    with pytest.raises(FleetConfigError, match=match):
        find_fleet("lab", config, tmp_path)


def test_bad_fleets_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "fleets.json").write_text("{not json")
    with pytest.raises(FleetConfigError, match="fleets.json is not valid JSON"):
        load_fleets(None, tmp_path)
    with pytest.raises(FleetConfigError, match="invalid fleet name"):
        Fleet("no/slash", ["h"])


# -- kinds in the magics ----------------------------------------------------------------------------


def _error(shell: Any, cell: str) -> str:
    result = shell.run_cell(cell)
    err = result.error_in_exec or result.error_before_exec
    assert err is not None, cell
    return str(err)


def test_magics_kind_errors(fresh_shell: Any) -> None:
    assert "invalid choice: 'gcp'" in _error(fresh_shell, "%ec2 use gcp")
    assert "unknown target kind 'gcp'" in _error(fresh_shell, "%ec2 start gcp x")
    assert "local is not an EC2 instance or a fleet" in _error(fresh_shell, "%ec2 stop")
    assert "%ec2 terminate does not apply to fleet targets (fleet supports: start, stop)" in \
        _error(fresh_shell, "%ec2 terminate fleet lab -y")
    assert "no fleet named 'lab' (configured: none)" in _error(fresh_shell, "%ec2 start fleet lab")
    # the failed start is remembered: cells do not run elsewhere meanwhile
    assert "%ec2 start fleet lab failed (" in _error(fresh_shell, "%%ec2 run\nx = 1")
    assert "name the fleet: %ec2 start fleet NAME (configured: none)" in _error(fresh_shell, "%ec2 start fleet")
    assert "%ec2 start fleet: --type applies to EC2 instances only" in \
        _error(fresh_shell, "%ec2 start fleet lab --type t3.large")
    assert "--disk, --spot apply to EC2" in _error(fresh_shell, "%ec2 start fleet lab --spot --disk 9")
    assert "--fallback goes with --spot" in _error(fresh_shell, "%ec2 start --fallback")
    run_ok(fresh_shell, "%ec2 use local")
