"""Reaching one of our EC2 instances: the SSH transport, plus what only EC2 needs.

* **Addressing through the SSH config.** The instance's id, then its name, then its address
  are tried as ``Host`` patterns of the OpenSSH config, so ``Host i-*`` blocks (an SSM
  ``ProxyCommand``, a bastion ``ProxyJump``, a user or key) apply as they do for ``ssh``.
* **Keys.** ``key_file``, else the config's ``IdentityFile`` for the instance, else (for an
  instance launched with a key pair) ssh-agent. With none of those, an ephemeral ed25519 key is made once per instance
  (0600, in the state folder) and pushed with EC2 Instance Connect before every new
  connection: there is no key file to manage.
* **Host keys.** A key already in known_hosts for the address actually connected to is
  trusted as it is. Otherwise the keys that cloud-init prints to the console are read (with a
  progress message until AWS publishes the console) and recorded in the project's known_hosts,
  also under the instance id, so the first connection is verified, never blindly trusted.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

from ..providers.ec2 import Ec2Provider, InstanceInfo
from .ssh import KnownHosts, SSHTransport
from .ssh.config import load_config

log = logging.getLogger("remotemagic")


def _config_alias(candidates: list[str], ssh_config: str | None) -> str | None:
    """The first candidate that a ``Host`` pattern of the config names (``*`` alone does not count)."""
    cfg, _ = load_config(ssh_config)
    patterns = [p for p in cfg.get_hostnames() if p != "*"]
    for name in candidates:
        hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatchcase(name, p)]
        if hits and not any(fnmatch.fnmatchcase(name, p[1:]) for p in patterns if p.startswith("!")):
            return name
    return None


def ephemeral_key(folder: Path) -> tuple[str, str]:
    """An ed25519 key pair for EC2 Instance Connect: (private key path, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "id_ed25519"
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (folder / "id_ed25519.pub").write_bytes(pub + b" remotemagic-instance-connect\n")
    return str(path), (folder / "id_ed25519.pub").read_text().strip()


class Ec2Transport(SSHTransport):
    """The agent on one of our instances, over SSH."""

    def __init__(self, provider: Ec2Provider, info: InstanceInfo, *, state_dir: Path,
                 ssh_config: str | None = None, key_file: str | None = None, user: str | None = None,
                 known_hosts: str | None = None, host_key_timeout: float = 600, progress: bool = True,
                 **ssh_options: Any):
        if not info.host:
            raise ValueError(f"instance {info.instance_id} has no address yet (state: {info.state})")
        self.provider = provider
        self.info = info
        alias = _config_alias([info.instance_id, info.name, info.host], ssh_config)
        self.ephemeral_public_key: str | None = None
        identity = key_file
        configured = bool(alias and load_config(ssh_config)[0].lookup(alias).get("identityfile"))
        if not identity and not info.key_name and not configured:
            keyfolder = state_dir / "ec2-keys" / info.instance_id
            identity, self.ephemeral_public_key = ephemeral_key(keyfolder)
        self.project_known_hosts = str(state_dir / "known_hosts")
        super().__init__(alias or info.host, ssh_config=ssh_config, user=user or (None if alias else info.user),
                         identity_file=identity, known_hosts=known_hosts, **ssh_options)
        self.name = f"ec2://{info.name}/{info.instance_id}"
        self._host_key_timeout = host_key_timeout
        self._progress = progress

    def _ensure_host_key(self) -> None:
        host = self.host
        if host.proxy_command:  # e.g. SSM: the config's own known_hosts rules apply
            return
        names = {host.host_key_name, host.hostname, self.info.instance_id}
        known = KnownHosts(host.known_hosts_files + host.global_known_hosts_files + [self.project_known_hosts])
        if any(known.lookup(n) for n in names):
            if self.project_known_hosts not in host.known_hosts_files:
                host.known_hosts_files.append(self.project_known_hosts)
            return
        log.info("no known host key for %s: reading it from the console of %s", host.hostname, self.info.instance_id)
        self.provider.learn_host_key(self.info.instance_id, self.project_known_hosts, host.hostname,
                                     timeout=self._host_key_timeout, progress=self._progress, port=host.port)
        host.known_hosts_files.append(self.project_known_hosts)

    def _open(self) -> Any:
        self._ensure_host_key()
        if self.ephemeral_public_key:
            ok = self.provider.send_ephemeral_key(self.info.instance_id, self.host.user, self.ephemeral_public_key,
                                                  self.info.availability_zone or "")
            log.info("EC2 Instance Connect key for %s@%s pushed (%s)", self.host.user, self.info.instance_id,
                     "accepted" if ok else "refused")
        return super()._open()
