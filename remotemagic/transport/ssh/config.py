"""Resolve an SSH target the way OpenSSH would, from an OpenSSH client config file.

``resolve("alias")`` reads ``~/.ssh/config`` (or another file) with ``paramiko.SSHConfig`` and
returns a :class:`HostConfig`: the real host name, port, user, identity files, the jump hosts
(``ProxyJump a,b``: each one resolved through the same file), a ``ProxyCommand``, the name to
look the host key up under (``HostKeyAlias``, else ``host`` or ``[host]:port``) and the
known_hosts files to check it against.

Supported keywords: Host/Match (as paramiko supports them), HostName, Port, User, IdentityFile,
IdentitiesOnly, IdentityAgent (``none`` only), ProxyJump, ProxyCommand, HostKeyAlias,
UserKnownHostsFile, GlobalKnownHostsFile, StrictHostKeyChecking (``accept-new``/``no`` mean
trust on first use, never accepting a changed key), ConnectTimeout, ServerAliveInterval,
ServerAliveCountMax.
``Include`` is followed as OpenSSH does it (paramiko does not): globs, ``~``, paths relative to
``~/.ssh``, files in lexical order, missing ones skipped, and an ``Include`` inside a ``Host`` or
``Match`` block applies only to that block.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import shlex
from dataclasses import dataclass, field

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency

from .errors import SSHConfigError

DEFAULT_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
MAX_JUMP_DEPTH = 8

_TARGET_RE = re.compile(
    r"^(?:(?P<user>[^@/\s]+)@)?"  # user@
    r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/@\s\[\]]+))"  # [v6 address] or host
    r"(?::(?P<port>\d+))?/?$"  # :port
)


@dataclass
class HostConfig:
    """One SSH hop, resolved: where to connect, as whom, with which keys, through what."""

    #: What the user wrote (an alias or a host name).
    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)
    #: True when the identity files were configured (IdentityFile, or an explicit key option);
    #: False when they are OpenSSH's default names.
    identities_explicit: bool = False
    identities_only: bool = False
    use_agent: bool = True
    #: Jump hosts, first hop first (``ProxyJump a,b`` -> [a, b]).
    proxy_jump: list["HostConfig"] = field(default_factory=list)
    proxy_command: str | None = None
    host_key_alias: str | None = None
    known_hosts_files: list[str] = field(default_factory=list)
    global_known_hosts_files: list[str] = field(default_factory=list)
    #: StrictHostKeyChecking accept-new/no: record unknown host keys (changed keys stay refused).
    accept_new_host_keys: bool = False
    connect_timeout: float | None = None
    server_alive_interval: int | None = None
    server_alive_count_max: int | None = None
    config_path: str | None = None

    @property
    def host_key_name(self) -> str:
        """The name the host key is filed under in known_hosts (as OpenSSH does it)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def describe(self) -> str:
        """``'alias' (user@host:port)`` or ``user@host:port``."""
        if self.alias and self.alias != self.hostname:
            return f"{self.alias!r} ({self.address})"
        return self.address


def parse_target(target: str) -> tuple[str | None, str, int | None]:
    """Split ``ssh://user@host:port``, ``ssh:alias``, ``user@host:port`` or ``[v6]:port``."""
    text = target.strip()
    if text.startswith("ssh://"):
        text = text[6:]
    elif text.startswith("ssh:"):
        text = text[4:]
    m = _TARGET_RE.match(text)
    if not m:
        raise SSHConfigError(
            f"cannot understand SSH target {target!r}: use ssh://user@host[:port], an alias from "
            "your ~/.ssh/config (ssh:alias), or user@host[:port]"
        )
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise SSHConfigError(f"bad port {port} in SSH target {target!r}")
    return m.group("user"), m.group("v6") or m.group("host"), port


def load_config(path: str | os.PathLike[str] | None = None) -> tuple[paramiko.SSHConfig, str | None]:
    """The parsed config file (an empty one if the file does not exist) and its path."""
    cfg_path = os.path.expanduser(str(path or DEFAULT_CONFIG))
    if not os.path.exists(cfg_path):
        if path is not None:
            raise SSHConfigError(f"SSH config file {cfg_path} does not exist")
        return paramiko.SSHConfig(), None
    text = _read_with_includes(cfg_path)
    try:
        return paramiko.SSHConfig.from_text(text), cfg_path
    except Exception as exc:  # ConfigParseError, bad Match lines, ...
        raise SSHConfigError(f"cannot parse SSH config {cfg_path}: {exc}") from exc


_KEYWORD_RE = re.compile(r"^\s*(\w+)(?:\s*=\s*|\s+)(.*?)\s*$")
MAX_INCLUDE_DEPTH = 16


def _read_with_includes(path: str, depth: int = 0) -> str:
    """The config file's text with every ``Include`` replaced by the files it names.

    After an included file, the enclosing ``Host``/``Match`` line is repeated (``Host *`` at top
    level), so lines after the ``Include`` keep applying to what they applied to before -- the
    included file's own ``Host`` blocks end with it, as in OpenSSH."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise SSHConfigError(f"cannot read SSH config {path}: {exc}") from exc
    out: list[str] = []
    block = "Host *\n"
    for line in lines:
        m = _KEYWORD_RE.match(line)
        keyword = m.group(1).lower() if m else ""
        if keyword in ("host", "match"):
            block = line + "\n"
        if m is None or keyword != "include":
            out.append(line + "\n")
            continue
        if depth >= MAX_INCLUDE_DEPTH:
            raise SSHConfigError(f"SSH config Include nested deeper than {MAX_INCLUDE_DEPTH} at {path} (a loop?)")
        try:
            patterns = shlex.split(m.group(2))
        except ValueError as exc:
            raise SSHConfigError(f"bad Include line in {path}: {line.strip()!r} ({exc})") from exc
        for pattern in patterns:
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.expanduser("~/.ssh"), pattern)
            for included in sorted(glob.glob(pattern)):
                if os.path.isfile(included):
                    out.append(_read_with_includes(included, depth + 1))
        out.append(block)
    return "".join(out)


def _expand_path(path: str, user: str, host: str) -> str:
    home = os.path.expanduser("~")
    path = path.replace("%d", home).replace("%u", getpass.getuser()).replace("%h", host).replace("%r", user)
    return os.path.expanduser(path.replace("%%", "%"))


def _paths(value: str | None, defaults: tuple[str, ...], user: str, host: str) -> list[str]:
    if not value:
        return [os.path.expanduser(p) for p in defaults]
    if value.strip().lower() == "none":
        return []
    return [_expand_path(p, user, host) for p in value.split()]


def resolve(
    target: str,
    *,
    config_path: str | os.PathLike[str] | None = None,
    user: str | None = None,
    port: int | None = None,
    identity_file: str | os.PathLike[str] | list[str] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    _config: tuple[paramiko.SSHConfig, str | None] | None = None,
    _depth: int = 0,
) -> HostConfig:
    """Resolve ``target`` (and its jump hosts) through the OpenSSH config file.

    Explicit arguments win over the target string, which wins over the config file.
    ``known_hosts`` replaces UserKnownHostsFile (TOFU records into it).
    """
    if _depth > MAX_JUMP_DEPTH:
        raise SSHConfigError(f"ProxyJump chain deeper than {MAX_JUMP_DEPTH} hops at {target!r} (a loop?)")
    cfg, cfg_path = _config or load_config(config_path)
    t_user, alias, t_port = parse_target(target)
    try:
        opts = cfg.lookup(alias)
    except Exception as exc:
        raise SSHConfigError(f"cannot look up {alias!r} in {cfg_path}: {exc}") from exc
    hostname = opts.get("hostname") or alias
    the_user = user or t_user or opts.get("user") or getpass.getuser()
    try:
        the_port = int(port or t_port or opts.get("port") or 22)
    except ValueError as exc:
        raise SSHConfigError(f"bad Port for {alias!r} in {cfg_path}: {opts.get('port')!r}") from exc

    if identity_file:
        files = [identity_file] if isinstance(identity_file, (str, os.PathLike)) else list(identity_file)
        identities = [os.path.expanduser(str(p)) for p in files]
        explicit = True
    elif opts.get("identityfile"):
        identities = [_expand_path(p, the_user, hostname) for p in opts["identityfile"]]
        explicit = True
    else:
        identities = [os.path.expanduser(p) for p in DEFAULT_IDENTITIES]
        explicit = False

    if known_hosts:
        user_known = [os.path.expanduser(str(known_hosts))]
    else:
        user_known = _paths(opts.get("userknownhostsfile"), DEFAULT_KNOWN_HOSTS, the_user, hostname)
    global_known = _paths(opts.get("globalknownhostsfile"), DEFAULT_GLOBAL_KNOWN_HOSTS, the_user, hostname)

    def number(key: str) -> float | None:
        value = opts.get(key)
        if value in (None, ""):
            return None
        try:
            return float(value)
        except ValueError as exc:
            raise SSHConfigError(f"bad {key} for {alias!r} in {cfg_path}: {value!r}") from exc

    alive = number("serveraliveinterval")
    alive_max = number("serveralivecountmax")
    host = HostConfig(
        alias=alias,
        hostname=hostname,
        port=the_port,
        user=the_user,
        identity_files=identities,
        identities_explicit=explicit,
        identities_only=str(opts.get("identitiesonly", "no")).lower() == "yes",
        use_agent=str(opts.get("identityagent", "")).lower() != "none",
        proxy_command=opts.get("proxycommand") or None,
        host_key_alias=opts.get("hostkeyalias") or None,
        known_hosts_files=user_known,
        global_known_hosts_files=global_known,
        accept_new_host_keys=str(opts.get("stricthostkeychecking", "")).lower() in ("accept-new", "no", "off"),
        connect_timeout=number("connecttimeout"),
        server_alive_interval=int(alive) if alive is not None else None,
        server_alive_count_max=int(alive_max) if alive_max is not None else None,
        config_path=cfg_path,
    )
    jump = (opts.get("proxyjump") or "").strip()
    if jump and jump.lower() != "none":
        host.proxy_command = None  # ProxyJump wins (OpenSSH: they are mutually exclusive)
        for hop in (h.strip() for h in jump.split(",")):
            if not hop:
                continue
            # a jump host's own ProxyJump is honoured for the first hop only (it is how the
            # chain starts); later hops are reached through the previous one
            resolved = resolve(hop, _config=(cfg, cfg_path), known_hosts=known_hosts, _depth=_depth + 1)
            if host.proxy_jump:
                resolved.proxy_jump = []
                resolved.proxy_command = None
                host.proxy_jump.append(resolved)
            else:
                host.proxy_jump.extend(resolved.proxy_jump)
                resolved.proxy_jump = []
                host.proxy_jump.append(resolved)
    return host
