"""The ``ssh`` target kind: any host OpenSSH can reach (no provider: the machine is already there)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .registry import TargetKind

if TYPE_CHECKING:  # pragma: no cover
    from ..api import Remote

#: The options of ``connect("ssh...")`` that go to the SSH transport (the rest go to the Remote).
SSH_OPTIONS = ("ssh_config", "known_hosts", "trust_on_first_use", "python", "connect_timeout",
               "user", "port", "identity_file", "keepalive")


def connect_ssh(host: str, *, session: str, root: str | None = None, **options: Any) -> Remote:
    """Connect to one SSH host (``user@host[:port]``, ``ssh://...``, an ``~/.ssh/config`` alias)."""
    from ..api import Remote
    from ..transport.ssh import SSHTransport

    ssh_options = {k: options.pop(k) for k in SSH_OPTIONS if k in options}
    transport = SSHTransport(host, root=root, **ssh_options)
    try:
        remote = Remote(transport, session=session, cwd=options.pop("cwd", None), **options)
    except BaseException:
        transport.close()
        raise
    remote.connect_args = {"target": "ssh", "host": host, "root": root, "cwd": remote.cwd,
                           **{k: v for k, v in ssh_options.items()
                              if k != "trust_on_first_use" and isinstance(v, (str, int, float))}}
    return remote


def ssh_options_from(config: Any, python: str | None = None, trust: bool = False,
                     ssh_config: str | None = None) -> dict[str, Any]:
    """The SSH options of the ``Ec2Magics`` settings (``%ec2 use`` flags win)."""
    opts: dict[str, Any] = dict(ssh_config=os.path.expanduser(ssh_config or config.ssh_config),
                                python=python or config.remote_python,
                                trust_on_first_use=trust or config.trust_on_first_use)
    if config.known_hosts:
        opts["known_hosts"] = os.path.expanduser(config.known_hosts)
    return opts


class SshKind(TargetKind):
    name = "ssh"
    usage = "ssh HOST"
    noun = "an SSH host"
    target_forms = ("'ssh://user@host[:port]'",)

    def open(self, target: str, *, session: str, root: str | None = None, **options: Any) -> Remote:
        # "ssh://user@host:port", "ssh:alias" (from ~/.ssh/config), "ssh HOST", or "ssh" + host=...
        host = options.pop("host", None)
        spec = target[4:].strip() if target.startswith("ssh ") else target
        if target == "ssh":
            if not host:
                raise ValueError("connect('ssh', host=...) needs a host: an ssh_config alias or user@host[:port]")
            spec = host
        return connect_ssh(spec, session=session, root=root, **options)

    def connect(self, config: Any, address: str | None, *, root: str | None, session: str | None,
                options: dict[str, Any], python: str | None = None, trust: bool = False,
                ssh_config: str | None = None, start: bool = False,
                launch: dict[str, Any] | None = None) -> Remote:
        from ..connecting import connect

        if not address:
            raise ValueError("%ec2 use ssh HOST: name the host (an ~/.ssh/config alias or user@host[:port])")
        opts = {**options, **ssh_options_from(config, python, trust, ssh_config)}
        return connect("ssh", host=address, session=session, root=root or config.remote_root or None, **opts)


KIND = SshKind()
