"""The SSH transport: the agent runs on any host reachable with OpenSSH-style configuration.

The package, by seam:

* :mod:`.config` -- resolving a target through the OpenSSH config (``HostConfig``, ``resolve``);
* :mod:`.known_hosts` -- reading, verifying and writing known_hosts files (the one implementation);
* :mod:`.auth` -- keys (identity files, ssh-agent) and public key authentication;
* :mod:`.link` -- connecting (TCP, ProxyCommand, ProxyJump), handshake, keepalive, the link pool;
* :mod:`.bootstrap` -- the agent script and its safety checks, venv and agent installation;
* :mod:`.transport` -- :class:`SSHTransport` and the agent's channel as a stream;
* :mod:`.tunnel` -- port forwards over the link;
* :mod:`.errors` -- what goes wrong, each error saying what to do.

Security: host keys are checked against known_hosts (``HostKeyAlias`` and ``[host]:port`` as
OpenSSH does); unknown hosts are refused unless ``trust_on_first_use=True``; a changed key is
always refused. Private keys readable by others are refused. Remote folders are 0700, files 0600.
"""

from .bootstrap import MIN_IPYTHON, sftp_replace, venv_marker
from .config import HostConfig, load_config, resolve
from .known_hosts import KnownHosts, KnownKey, add_known_host, replace_host_keys, verify_host_key
from .link import Link, open_link
from .transport import ChannelStream, SSHTransport

__all__ = [
    "MIN_IPYTHON",
    "ChannelStream",
    "HostConfig",
    "KnownHosts",
    "KnownKey",
    "Link",
    "SSHTransport",
    "add_known_host",
    "load_config",
    "open_link",
    "replace_host_keys",
    "resolve",
    "sftp_replace",
    "venv_marker",
    "verify_host_key",
]
