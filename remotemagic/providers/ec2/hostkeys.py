"""SSH host keys: reading them from an instance's console output, recording them in known_hosts."""

from __future__ import annotations

import base64
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


def record_known_hosts(path: str | os.PathLike[str], address: str | Iterable[str], keys: Iterable[str],
                       port: int = 22) -> str:
    """Make ``keys`` the known host keys of ``address`` in the known_hosts file at ``path``.

    ``address`` may be several names (e.g. the public IP and the instance id, the latter for use
    as an OpenSSH ``HostKeyAlias``). Earlier entries for those names (plain or hashed) are
    dropped, since an EC2 address is reused by other machines; every other entry is kept
    (:func:`remotemagic.transport.ssh.known_hosts.replace_host_keys`: written atomically, 0600).
    Returns the path written.
    """
    from ...transport.ssh.known_hosts import replace_host_keys

    names = [address] if isinstance(address, str) else list(address)
    keys = [k.strip() for k in keys if k and k.strip()]
    if not keys:
        raise HostKeyError(f"no host keys to record for {', '.join(names)}")
    return replace_host_keys(os.path.expanduser(path), names, keys, port)
