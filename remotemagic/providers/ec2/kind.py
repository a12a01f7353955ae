"""The ``ec2`` target kind: one of our EC2 instances, reached over SSH (:mod:`remotemagic.transport.ec2`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import TargetKind

if TYPE_CHECKING:  # pragma: no cover
    from ...api import Remote
    from .provider import Ec2Provider

#: Options of :func:`connect_ec2` that configure the provider.
EC2_OPTIONS = ("region", "profile", "ssh_cidrs", "idle_stop_minutes", "key_name", "instance_type")
#: Options of :func:`connect_ec2` that only apply when an instance is launched.
LAUNCH_OPTIONS = ("instance_type", "spot", "ami", "disk_gb", "key_name", "fallback")
#: Options of :func:`connect_ec2` that go to the SSH transport.
SSH_OPTIONS = ("ssh_config", "known_hosts", "python", "connect_timeout", "key_file", "user", "keepalive")


def connect_ec2(name: str, *, session: str | None = None, root: str | None = None, start: bool = True,
                provider: Any = None, **options: Any) -> Remote:
    """Attach to our instance ``name`` -- starting it if stopped, launching it if there is none
    (``start=False``: only attach to a running one) -- and connect over SSH.

    Options: ``region``, ``profile``, ``instance_type``, ``spot`` (``fallback``: on-demand when
    there is no spot capacity), ``ami``, ``disk_gb``,
    ``key_name``, ``key_file``, ``user``, ``ssh_cidrs``, ``idle_stop_minutes``, and the SSH
    options of :func:`remotemagic.connect` (``ssh_config``, ``known_hosts``, ``python``...)."""
    from ... import notices, state
    from ...api import Remote
    from ...connecting import default_session
    from ...transport.ec2 import Ec2Transport
    from .errors import InstanceNotFoundError
    from .provider import Ec2Provider

    def take(keys: tuple[str, ...]) -> dict[str, Any]:
        got = {k: options.pop(k) for k in keys if k in options}
        return {k: v for k, v in got.items() if v is not None}

    ec2_opts = take(EC2_OPTIONS)
    launch = {k: v for k, v in {**ec2_opts, **take(LAUNCH_OPTIONS)}.items() if k in LAUNCH_OPTIONS}
    progress = options.get("show_progress", True)
    with notices.collect(propagate=True) as early:  # kept in Remote.notices too
        if provider is None:
            provider = Ec2Provider(**ec2_opts)
        if start:
            info = provider.start(name, user=options.get("user"), progress=progress, **launch)
        else:
            info = provider.find(name)
            if info is None:
                raise InstanceNotFoundError(f"no instance named {name!r} of ours in {provider.region}: "
                                            f"%ec2 start --name {name} launches one")
            if info.state != "running":
                raise InstanceNotFoundError(f"instance {name!r} ({info.instance_id}) is {info.state}: "
                                            "%ec2 start starts it")
    ssh_options = take(SSH_OPTIONS)
    transport = Ec2Transport(provider, info, state_dir=Path(options.get("state_root") or state.state_dir()),
                             root=root, progress=progress, **ssh_options)
    if info.lifecycle == "spot":
        transport.agent_env["REMOTEMAGIC_SPOT"] = "1"  # the agent watches for a reclaim notice
    try:
        remote = Remote(transport, session=session or default_session(), cwd=options.pop("cwd", None), **options)
    except BaseException:
        transport.close()
        raise
    remote.instance = info
    remote.provider = provider
    remote.notices[:0] = early

    def reopen(back: Any) -> Ec2Transport:
        """The transport to the same instance after AWS started it again (a new address)."""
        return Ec2Transport(provider, back, state_dir=Path(options.get("state_root") or state.state_dir()),
                            root=root, progress=progress, **ssh_options)

    remote.reopen_transport = reopen  # a reclaimed spot instance that comes back (remotemagic.reclaim)
    return remote


def ec2_options_from(config: Any, python: str | None = None) -> dict[str, Any]:
    """The options of :func:`connect_ec2` from the ``Ec2Magics`` settings."""
    opts: dict[str, Any] = {
        "ssh_config": os.path.expanduser(config.ssh_config), "python": python or config.remote_python,
        "idle_stop_minutes": config.idle_stop_minutes, "instance_type": config.instance_type,
        "region": config.region or None, "profile": config.profile or None,
        "ssh_cidrs": list(config.ssh_cidrs) or None, "key_name": config.key_name or None,
        "key_file": os.path.expanduser(config.key_file) if config.key_file else None,
        "user": config.ec2_user or None, "ami": config.ami or None,
    }
    if config.known_hosts:
        opts["known_hosts"] = os.path.expanduser(config.known_hosts)
    return opts


class Ec2Kind(TargetKind):
    name = "ec2"
    usage = "ec2 [NAME]"
    noun = "an EC2 instance"
    target_forms = ("'ec2:NAME'",)
    verbs = frozenset({"start", "stop", "terminate", "resize"})

    def open(self, target: str, *, session: str, root: str | None = None, **options: Any) -> Remote:
        name = target[4:] or options.pop("name", None) or "remotemagic"
        return connect_ec2(name, session=session, root=root, **options)

    def connect(self, config: Any, address: str | None, *, root: str | None, session: str | None,
                options: dict[str, Any], python: str | None = None, trust: bool = False,
                ssh_config: str | None = None, start: bool = False,
                launch: dict[str, Any] | None = None) -> Remote:
        opts = {**options, **ec2_options_from(config, python)}
        opts.update(launch or {})  # --type, --ami ... of %ec2 start win over the configured defaults
        return connect_ec2(address or config.instance_name, session=session,
                           root=root or config.remote_root or None, start=start, **opts)

    def default_name(self, config: Any) -> str:
        return str(config.instance_name)

    def machine_name(self, remote: Remote | None) -> str | None:
        instance = getattr(remote, "instance", None)
        return getattr(instance, "name", None) if getattr(remote, "provider", None) is not None else None

    def check_launch(self, launch: dict[str, Any]) -> None:
        if launch.get("fallback") and not launch.get("spot"):
            raise ValueError("%ec2 start --fallback goes with --spot (on-demand when there is no spot capacity)")

    def started(self, remote: Remote, config: Any) -> str:
        inst = remote.instance
        text = f"Using {inst.name} ({inst.instance_id}, {inst.instance_type}, {inst.lifecycle}) at {inst.host}"
        if config.idle_stop_minutes:
            text += f"; it stops itself after {config.idle_stop_minutes} idle minutes"
        return text

    def provider(self, config: Any, current: Remote | None = None) -> Ec2Provider:
        """The provider of the current connection if it has one, else one from the settings."""
        if current is not None and isinstance(current.provider, _provider_class()):
            return current.provider
        opts = ec2_options_from(config)
        return _provider_class()(**{k: opts[k] for k in EC2_OPTIONS if opts.get(k) is not None})

    def stop(self, config: Any, name: str, current: Remote | None) -> str:
        info = self.provider(config, current).stop(name, wait=True, progress=config.show_progress)
        return (f"Stopped {info.name} ({info.instance_id}). Its disk, job logs and checkpoints stay; "
                f"%ec2 start --name {info.name} brings it back.")

    def terminate(self, config: Any, name: str, current: Remote | None) -> str:
        instance_id = self.provider(config, current).terminate(name, wait=True, progress=config.show_progress)
        return f"Terminated {name} ({instance_id})."

    def resize(self, config: Any, name: str, new_type: str, current: Remote | None) -> str:
        self.provider(config, current).resize(name, new_type, progress=config.show_progress)
        return f"{name} is now a {new_type}"


def _provider_class() -> type[Ec2Provider]:
    from .provider import Ec2Provider

    return Ec2Provider


KIND = Ec2Kind()
