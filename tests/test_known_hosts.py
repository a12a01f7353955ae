"""known_hosts files: reading (hashed, wildcard, negated, revoked), verifying, adding, replacing.

Real keys (generated here) and real files; no server needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import paramiko
import pytest

from remotemagic import notices
from remotemagic.transport.ssh import (
    HostConfig,
    KnownHosts,
    add_known_host,
    replace_host_keys,
    verify_host_key,
)
from remotemagic.transport.ssh.errors import HostKeyChangedError, UnknownHostKeyError


def _hashed(host: str) -> str:
    """A host field as OpenSSH's HashKnownHosts writes it."""
    salt = os.urandom(20)
    mac = hmac.new(salt, host.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"


def _line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


@pytest.fixture(scope="module")
def keys() -> dict[str, paramiko.PKey]:
    return {"ecdsa": paramiko.ECDSAKey.generate(), "ecdsa2": paramiko.ECDSAKey.generate(),
            "rsa": paramiko.RSAKey.generate(1024)}


def _hop(known: Path, name: str = "box.example.com", port: int = 22, accept_new: bool = False) -> HostConfig:
    return HostConfig(alias=name, hostname=name, port=port, user="me", known_hosts_files=[str(known)],
                      accept_new_host_keys=accept_new)


def _leftovers(folder: Path, *expected: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


# -- reading ------------------------------------------------------------------------------------------
def test_lookup_plain_hashed_wildcard_negated_and_ports(tmp_path: Path, keys: dict[str, paramiko.PKey]) -> None:
    ecdsa, rsa = _line(keys["ecdsa"]), _line(keys["rsa"])
    path = tmp_path / "known_hosts"
    path.write_text(
        "# a comment\n\n"
        f"plain.example.com,10.0.0.1 {ecdsa}\n"
        f"{_hashed('hidden.example.com')} {rsa}\n"
        f"*.wild.example.com,!bad.wild.example.com {ecdsa}\n"
        f"[10.0.0.1]:2222 {rsa}\n"
        f"@revoked old.example.com {rsa}\n"
        f"@cert-authority *.example.com {rsa}\n"
        "damaged line\n"
        f"unknown.example.com ssh-nonsense AAAA\n"
    )
    known = KnownHosts([str(path), str(tmp_path / "missing")])

    def names(host: str) -> list[tuple[str, bool]]:
        return [(k.key.get_name(), k.revoked) for k in known.lookup(host)]

    assert (names("plain.example.com") == names("10.0.0.1") == names("PLAIN.example.com")
            == [("ecdsa-sha2-nistp256", False)])
    assert names("hidden.example.com") == [("ssh-rsa", False)]
    assert names("a.wild.example.com") == [("ecdsa-sha2-nistp256", False)]
    assert names("bad.wild.example.com") == []  # negated
    assert names("[10.0.0.1]:2222") == [("ssh-rsa", False)]
    assert names("old.example.com") == [("ssh-rsa", True)]
    assert names("x.example.com") == []  # @cert-authority lines are not host keys
    assert names("unknown.example.com") == []
    hit = known.lookup("plain.example.com")[0]
    assert (hit.path, hit.lineno) == (str(path), 3)


# -- verifying ----------------------------------------------------------------------------------------
def test_verify_known_changed_revoked_unknown(tmp_path: Path, keys: dict[str, paramiko.PKey]) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"box.example.com {_line(keys['ecdsa'])}\n@revoked other.example.com {_line(keys['rsa'])}\n")
    known = KnownHosts([str(path)])
    verify_host_key(_hop(path), keys["ecdsa"], known, trust_on_first_use=False)
    for tofu in (False, True):  # a changed key is refused even with trust on first use
        with pytest.raises(HostKeyChangedError, match="HOST KEY CHANGED"):
            verify_host_key(_hop(path), keys["ecdsa2"], known, trust_on_first_use=tofu)
    with pytest.raises(HostKeyChangedError, match="@revoked"):
        verify_host_key(_hop(path, "other.example.com"), keys["rsa"], known, trust_on_first_use=True)
    with pytest.raises(UnknownHostKeyError, match="ssh-keyscan -p 2222 new.example.com"):
        verify_host_key(_hop(path, "new.example.com", 2222), keys["rsa"], known, trust_on_first_use=False)
    assert "new.example.com" not in path.read_text()


def test_trust_on_first_use_records_and_says_so(tmp_path: Path, keys: dict[str, paramiko.PKey]) -> None:
    path = tmp_path / "ssh" / "known_hosts"
    with notices.collect() as said:
        verify_host_key(_hop(path, "new.example.com", 2222), keys["rsa"], KnownHosts([str(path)]),
                        trust_on_first_use=True)
    assert path.read_text() == f"[new.example.com]:2222 {_line(keys['rsa'])}\n"
    assert any("trusting" in n["text"] and str(path) in n["text"] for n in said)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    verify_host_key(_hop(path, "new.example.com", 2222), keys["rsa"], KnownHosts([str(path)]), trust_on_first_use=False)


# -- writing ------------------------------------------------------------------------------------------
def test_add_known_host_keeps_every_line_and_follows_a_symlink(tmp_path: Path, keys: dict[str, paramiko.PKey]) -> None:
    real = tmp_path / "dotfiles" / "known_hosts"
    real.parent.mkdir()
    real.write_text(f"# mine\nold.example.com {_line(keys['rsa'])}")  # no final newline
    link = tmp_path / "ssh" / "known_hosts"
    link.parent.mkdir()
    link.symlink_to(real)
    add_known_host(str(link), "[new.example.com]:2200", keys["ecdsa"])
    assert link.is_symlink()
    assert real.read_text() == (f"# mine\nold.example.com {_line(keys['rsa'])}\n"
                                f"[new.example.com]:2200 {_line(keys['ecdsa'])}\n")
    assert _leftovers(real.parent, "known_hosts") == []  # no temporary file left behind
    found = KnownHosts([str(link)]).lookup("[new.example.com]:2200")
    assert [k.key.get_name() for k in found] == ["ecdsa-sha2-nistp256"]


def test_replace_host_keys_drops_only_those_names(tmp_path: Path, keys: dict[str, paramiko.PKey]) -> None:
    old, new1, new2 = _line(keys["rsa"]), _line(keys["ecdsa"]), _line(keys["ecdsa2"])
    path = tmp_path / "ssh" / "known_hosts"
    path.parent.mkdir()
    path.write_text(
        f"github.com {old}\n"
        f"54.1.2.3 {old}\n"
        f"{_hashed('54.1.2.3')} {old}\n"
        f"54.1.2.30,other {old}\n"
        f"[54.1.2.3]:2222 {old}\n"
        f"old-name,54.1.2.3 {old}\n"
        f"@revoked 54.1.2.3 {old}\n"
        f"i-0abc {old}\n"
    )
    assert replace_host_keys(path, ["54.1.2.3", "i-0abc"], [new1, f"  {new2}\n", ""]) == str(path)
    assert path.read_text().splitlines() == [
        f"github.com {old}",
        f"54.1.2.30,other {old}",
        f"[54.1.2.3]:2222 {old}",
        f"old-name {old}",
        f"54.1.2.3 {new1}",
        f"54.1.2.3 {new2}",
        f"i-0abc {new1}",
        f"i-0abc {new2}",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _leftovers(path.parent, "known_hosts") == []
    known = KnownHosts([str(path)])  # what is written is what the reader finds
    assert {k.key.get_base64() for k in known.lookup("54.1.2.3")} == {keys["ecdsa"].get_base64(),
                                                                      keys["ecdsa2"].get_base64()}

    fresh = tmp_path / "new" / "known_hosts"
    replace_host_keys(fresh, "10.0.0.5", [new1], port=2222)
    assert fresh.read_text() == f"[10.0.0.5]:2222 {new1}\n"
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    replace_host_keys(fresh, "10.0.0.5", [new2], port=2222)
    assert fresh.read_text() == f"[10.0.0.5]:2222 {new2}\n"
    with pytest.raises(ValueError, match="no host keys"):
        replace_host_keys(fresh, "10.0.0.5", [" "])
    for bad in ("a b", "a,b", ""):
        with pytest.raises(ValueError, match="invalid host name"):
            replace_host_keys(fresh, bad, [new1])
    assert fresh.read_text() == f"[10.0.0.5]:2222 {new2}\n"
