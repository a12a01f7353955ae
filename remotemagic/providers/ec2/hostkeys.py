"""SSH host keys: reading them from an instance's console output, recording them in known_hosts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable

from .errors import HostKeyError

_KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY_RE = re.compile(r"(?<![\w@.-])(" + "|".join(re.escape(t) for t in _KEY_TYPES) + r")\s+([A-Za-z0-9+/]+={0,2})")
_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
_END = "-----END SSH HOST KEY KEYS-----"


def _key_blob_ok(key_type: str, b64: str) -> bool:
    """The base64 blob decodes and names the same key type inside (as every SSH public key does)."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        return False
    if len(raw) < 4:
        return False
    n = int.from_bytes(raw[:4], "big")
    return raw[4:4 + n] == key_type.encode()


def host_keys_from_console(text: str) -> list[str]:
    """SSH host public keys (``"type base64"``) that cloud-init printed on the serial console.

    Reads the last complete ``-----BEGIN SSH HOST KEY KEYS-----`` ... ``-----END ...-----`` block
    (a later boot prints a newer one). Lines may carry prefixes (``ec2:``, a kernel timestamp) or
    be interleaved with kernel messages; only well-formed keys whose blob matches their type are
    kept. Returns ``[]`` when the console holds no complete block yet.
    """
    if not text:
        return []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    end = text.rfind(_END)
    if end < 0:
        return []
    begin = text.rfind(_BEGIN, 0, end)
    if begin < 0:
        return []
    block = text[begin + len(_BEGIN):end]
    keys: list[str] = []
    for line in block.split("\n"):
        for m in _KEY_RE.finditer(line):
            key = f"{m.group(1)} {m.group(2)}"
            if _key_blob_ok(m.group(1), m.group(2)) and key not in keys:
                keys.append(key)
    return keys


def _host_pattern(address: str, port: int = 22) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def _hashed_host_matches(field: str, host: str) -> bool:
    # OpenSSH HashKnownHosts format: |1|base64(salt)|base64(HMAC-SHA1(salt, host))
    try:
        _, magic, salt64, mac64 = field.split("|")
        if magic != "1":
            return False
        salt, mac = base64.b64decode(salt64), base64.b64decode(mac64)
    except ValueError:
        return False
    return hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), mac)


def _without_hosts(line: str, patterns: set[str]) -> str | None:
    """``line`` with the host names in ``patterns`` removed; None when no host name is left."""
    fields = line.split()
    if not fields or line.lstrip().startswith("#"):
        return line
    at = 1 if fields[0].startswith("@") and len(fields) > 1 else 0  # @cert-authority / @revoked
    hosts = fields[at]
    if hosts.startswith("|1|"):
        return None if any(_hashed_host_matches(hosts, p) for p in patterns) else line
    names = hosts.split(",")
    left = [n for n in names if n not in patterns]
    if len(left) == len(names):
        return line
    if not left:
        return None
    fields[at] = ",".join(left)
    return " ".join(fields)


def record_known_hosts(path: str | os.PathLike[str], address: str | Iterable[str], keys: Iterable[str],
                       port: int = 22) -> str:
    """Make ``keys`` the known host keys of ``address`` in the known_hosts file at ``path``.

    ``address`` may be several names (e.g. the public IP and the instance id, the latter for use
    as an OpenSSH ``HostKeyAlias``). Earlier entries for those names (plain or hashed) are
    dropped, since an EC2 address is reused by other machines; every other entry is kept. The
    file is replaced atomically (temporary file, fsync, rename) with mode 0600. Returns the path.
    """
    from ...agent.files import atomic_write, private_dir

    names = [address] if isinstance(address, str) else list(address)
    keys = [k.strip() for k in keys if k and k.strip()]
    if not keys:
        raise HostKeyError(f"no host keys to record for {', '.join(names)}")
    if not names or any(not n or any(c.isspace() or c == "," for c in n) for n in names):
        raise ValueError(f"invalid host name(s) for known_hosts: {names!r}")
    path = os.fspath(os.path.expanduser(path))
    patterns = [_host_pattern(n, port) for n in names]
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read().splitlines()
    except FileNotFoundError:
        old = []
    kept = [x for x in (_without_hosts(line, set(patterns)) for line in old) if x is not None]
    lines = kept + [f"{p} {k}" for p in patterns for k in keys]
    private_dir(os.path.dirname(os.path.abspath(path)))
    atomic_write(path, [("\n".join(lines) + "\n").encode()])
    os.chmod(path, 0o600)
    return path
