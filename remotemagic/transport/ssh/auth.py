"""Logging in to one SSH hop with keys: identity files, then ssh-agent, as OpenSSH orders them.

Private key files readable by group or others are refused (an error when the key was asked for
explicitly, a notice otherwise), passphrase-protected ones are left to ssh-agent, and
``IdentitiesOnly`` limits the agent to the configured keys. Passwords and keyboard-interactive
logins are not attempted.
"""

from __future__ import annotations

import base64
import logging
import os

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency

from ... import notices
from .config import HostConfig
from .errors import AuthenticationError, KeyPermissionError

log = logging.getLogger(__name__)


def _public_blob(path: str) -> bytes | None:
    """The public half of a key file from its ``.pub`` beside it (None: no readable one)."""
    try:
        with open(path + ".pub") as f:
            fields = f.read().split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError):
        return None


def load_keys(hop: HostConfig) -> tuple[list[tuple[str, paramiko.PKey]], list[str]]:
    """The keys to offer, in order (identity files, then ssh-agent), and notes on skipped ones."""
    keys: list[tuple[str, paramiko.PKey]] = []
    notes: list[str] = []
    wanted_blobs: set[bytes] = set()
    for path in hop.identity_files:
        if not os.path.exists(path):
            if hop.identities_explicit:
                notes.append(f"{path} does not exist")
            continue
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            message = (
                f"private key {path} is readable by group or others (mode {mode:o}): it is refused, as "
                f"OpenSSH refuses it. Fix it with:  chmod 600 {path}"
            )
            if hop.identities_explicit:
                raise KeyPermissionError(message)
            notices.notify(message, logger=log)
            notes.append(f"{path} skipped: readable by others (chmod 600 {path})")
            continue
        blob = _public_blob(path)
        try:
            key = paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            notes.append(f"{path} is passphrase-protected: load it into ssh-agent (ssh-add {path})")
            if blob:
                wanted_blobs.add(blob)
            continue
        except Exception as exc:
            notes.append(f"{path} could not be loaded ({exc})")
            continue
        wanted_blobs.add(key.asbytes())
        keys.append((f"{path} ({key.get_name()} {key.fingerprint})", key))
    if hop.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent_keys = paramiko.Agent().get_keys()
        except Exception as exc:
            notes.append(f"ssh-agent unavailable ({exc})")
            agent_keys = ()
        have = {k.asbytes() for _, k in keys}
        for akey in agent_keys:
            blob = akey.asbytes()
            if blob in have or (hop.identities_only and blob not in wanted_blobs):
                continue
            comment = getattr(akey, "comment", "") or ""
            keys.append((f"ssh-agent key {akey.get_name()} {akey.fingerprint} {comment}".rstrip(), akey))
    return keys, notes


def authenticate(t: paramiko.Transport, hop: HostConfig) -> None:
    """Offer the keys of :func:`load_keys` in turn; raise AuthenticationError saying what was tried."""
    keys, notes = load_keys(hop)
    tried: list[str] = []
    for label, key in keys:
        try:
            remaining = t.auth_publickey(hop.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise AuthenticationError(
                f"{hop.describe()} does not accept public keys for user {hop.user!r} (it allows: "
                f"{', '.join(exc.allowed_types) or 'nothing'}); remotemagic logs in with keys only"
            ) from None
        except paramiko.AuthenticationException:
            tried.append(label)
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            tried.append(label)
            notes.append(f"the server closed the connection ({exc}); too many keys offered? set IdentitiesOnly yes")
            break
        if remaining:
            raise AuthenticationError(
                f"{hop.describe()} accepted {label} for {hop.user!r} but requires more authentication "
                f"({', '.join(remaining)}), which remotemagic does not do"
            )
        log.debug("authenticated to %s with %s", hop.describe(), label)
        return
    where = f"User in {hop.config_path}" if hop.config_path else "a User entry in ~/.ssh/config"
    raise AuthenticationError(
        f"authentication to {hop.describe()} failed for user {hop.user!r}. Keys tried: "
        + ("; ".join(tried) if tried else "none (no usable key found)")
        + (". Notes: " + "; ".join(notes) if notes else "")
        + ". Check the user name: cloud images log in as a default user -- 'ubuntu' on Ubuntu, "
        f"'ec2-user' on Amazon Linux, 'admin' on Debian -- not 'root' (give it as ssh://USER@host or {where}); "
        "and check that the key's public half is in that user's ~/.ssh/authorized_keys on the host"
    )
