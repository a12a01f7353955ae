"""known_hosts: the one implementation of reading, checking and writing OpenSSH host key files.

* Reading (:class:`KnownHosts`): host fields that are plain names, comma lists, ``[host]:port``,
  wildcards (``*``, ``?``), negations (``!``) and hashed names (``|1|salt|hmac``, OpenSSH's
  HashKnownHosts); ``@revoked`` lines. ``@cert-authority`` lines are skipped: host certificates
  are not supported.
* Verifying (:func:`verify_host_key`): a known key is accepted, a revoked or changed one always
  refused, an unknown one refused unless trust on first use records it.
* Writing: :func:`add_known_host` (one more entry, for trust on first use) and
  :func:`replace_host_keys` (make these keys the only ones recorded for these names: an EC2
  address is reused by other machines). Both rewrite the file atomically (temporary file, fsync,
  rename; 0600, in a folder created 0700) while holding a lock on its folder, and write through a
  symlinked file to the file it points to. Every other line is kept as it was.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency

from ... import notices
from ...agent.files import atomic_write, private_dir
from .config import HostConfig
from .errors import HostKeyChangedError, UnknownHostKeyError

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


# -- host fields -----------------------------------------------------------------------------------
def host_pattern(name: str, port: int = 22) -> str:
    """How OpenSSH files a host in known_hosts: ``name``, or ``[name]:port`` off port 22."""
    return name if port == 22 else f"[{name}]:{port}"


def hashed_host_matches(field: str, name: str) -> bool:
    """Whether a hashed host field ``|1|base64(salt)|base64(HMAC-SHA1(salt, name))`` is ``name``."""
    try:
        _, magic, salt64, mac64 = field.split("|")
        if magic != "1":
            return False
        salt, mac = base64.b64decode(salt64), base64.b64decode(mac64)
    except ValueError:
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), mac)


def _glob_match(pattern: str, name: str) -> bool:
    """OpenSSH host patterns: ``*`` and ``?`` only (``[host]:port`` brackets are literal)."""
    rx = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(rx, name.lower()) is not None


def host_matches(patterns: Iterable[str], name: str) -> bool:
    """Whether the host patterns of one known_hosts line name ``name`` (a ``!`` match vetoes)."""
    hit = False
    for pattern in patterns:
        if pattern.startswith("|"):
            hit = hit or hashed_host_matches(pattern, name)
        elif pattern.startswith("!"):
            if _glob_match(pattern[1:], name):
                return False
        elif _glob_match(pattern, name):
            hit = True
    return hit


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class KnownKey:
    """One key recorded for a host, and where."""

    key: paramiko.PKey
    path: str
    lineno: int
    revoked: bool = False


def _same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


class KnownHosts:
    """The entries of some known_hosts files (missing or unreadable files count as empty)."""

    def __init__(self, paths: Iterable[str]):
        self.paths = list(paths)
        self.entries: list[tuple[list[str], KnownKey]] = []
        for path in self.paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.readlines()
            except OSError:
                continue
            for lineno, raw in enumerate(lines, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                revoked = False
                if line.startswith("@"):
                    marker, _, line = line.partition(" ")
                    if marker != "@revoked":
                        continue  # @cert-authority: host certificates are not supported
                    revoked = True
                try:
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
                except Exception:  # an unknown key type or a damaged line: skipped, as OpenSSH does
                    entry = None
                if entry is None or entry.key is None:
                    continue
                self.entries.append((entry.hostnames, KnownKey(entry.key, path, lineno, revoked)))

    def lookup(self, name: str) -> list[KnownKey]:
        """The keys recorded for ``name`` (revoked ones included, marked)."""
        return [known for patterns, known in self.entries if host_matches(patterns, name)]


# -- writing ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """Serialise rewrites of the files in ``folder`` (flock on the folder itself: no lock file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite(path: str | os.PathLike[str], edit: Callable[[list[str]], list[str]]) -> str:
    """Replace the lines of a known_hosts file by ``edit(lines)``, atomically; return the real path."""
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    folder = os.path.dirname(real)
    private_dir(folder)
    with _folder_lock(folder):
        try:
            with open(real, encoding="utf-8", errors="surrogateescape") as f:
                old = f.read().splitlines()
        except FileNotFoundError:
            old = []
        lines = edit(old)
        atomic_write(real, [("".join(line + "\n" for line in lines)).encode("utf-8", "surrogateescape")])
    os.chmod(real, 0o600)
    return real


def add_known_host(path: str | os.PathLike[str], name: str, key: paramiko.PKey) -> None:
    """Add the entry ``name keytype base64`` to a known_hosts file, keeping every other line."""
    line = f"{name} {key.get_name()} {key.get_base64()}"
    _rewrite(path, lambda old: [*old, line])


def _without_hosts(line: str, names: set[str]) -> str | None:
    """``line`` with the host fields in ``names`` removed; None when no host is left on it."""
    fields = line.split()
    if not fields or line.lstrip().startswith("#"):
        return line
    at = 1 if fields[0].startswith("@") and len(fields) > 1 else 0  # @cert-authority / @revoked
    hosts = fields[at]
    if hosts.startswith("|"):
        return None if any(hashed_host_matches(hosts, n) for n in names) else line
    listed = hosts.split(",")
    left = [h for h in listed if h not in names]
    if len(left) == len(listed):
        return line
    if not left:
        return None
    fields[at] = ",".join(left)
    return " ".join(fields)


def replace_host_keys(path: str | os.PathLike[str], names: str | Iterable[str], keys: Iterable[str],
                      port: int = 22) -> str:
    """Make ``keys`` (``"keytype base64"`` each) the known host keys of ``names`` in a known_hosts file.

    ``names`` may be several (e.g. an address and an instance id that a config uses as
    ``HostKeyAlias``), filed as ``[name]:port`` off port 22. Earlier entries for exactly those
    names, plain or hashed, are dropped (names sharing a line with other hosts are taken off the
    line); every other line is kept. Returns the path written (a symlink resolved).
    """
    wanted = [names] if isinstance(names, str) else list(names)
    records = [k.strip() for k in keys if k and k.strip()]
    if not records:
        raise ValueError(f"no host keys to record for {', '.join(wanted)}")
    if not wanted or any(not n or any(c.isspace() or c == "," for c in n) for n in wanted):
        raise ValueError(f"invalid host name(s) for known_hosts: {wanted!r}")
    patterns = [host_pattern(n, port) for n in wanted]

    def edit(old: list[str]) -> list[str]:
        kept = [x for x in (_without_hosts(line, set(patterns)) for line in old) if x is not None]
        return kept + [f"{p} {k}" for p in patterns for k in records]

    return _rewrite(path, edit)


# -- verifying -------------------------------------------------------------------------------------
def verify_host_key(hop: HostConfig, key: paramiko.PKey, known: KnownHosts, trust_on_first_use: bool) -> None:
    """Accept ``key`` for ``hop`` or raise UnknownHostKeyError / HostKeyChangedError."""
    name = hop.host_key_name
    entries = known.lookup(name)
    fp = f"{key.get_name()} {key.fingerprint}"
    for entry in entries:
        if entry.revoked and _same_key(entry.key, key):
            raise HostKeyChangedError(
                f"the host key of {hop.describe()} ({fp}) is marked @revoked in {entry.path}:{entry.lineno}: "
                "connection refused"
            )
    good = [e for e in entries if not e.revoked]
    if any(_same_key(e.key, key) for e in good):
        return
    if good:
        same_type = [e for e in good if e.key.get_name() == key.get_name()] or good
        old = same_type[0]
        raise HostKeyChangedError(
            f"HOST KEY CHANGED for {hop.describe()}: it presented {fp}, but {old.path}:{old.lineno} records "
            f"{old.key.get_name()} {old.key.fingerprint} for {name!r}. Someone could be intercepting the "
            "connection (or the host was reinstalled): connection refused. If you know the host was "
            f"rebuilt, remove the old key with  ssh-keygen -R '{name}' -f {old.path}  and connect again "
            "(after checking the new fingerprint with the host's owner)."
        )
    record = hop.known_hosts_files[0] if hop.known_hosts_files else os.path.expanduser(DEFAULT_KNOWN_HOSTS)
    if trust_on_first_use or hop.accept_new_host_keys:
        add_known_host(record, name, key)
        notices.notify(f"trusting {hop.describe()} on first use: recorded its host key {fp} as {name!r} in {record}",
                       logger=log)
        return
    searched = ", ".join(known.paths) or "(no known_hosts files)"
    keyscan = f"ssh-keyscan -p {hop.port} {hop.hostname}" if hop.port != 22 else f"ssh-keyscan {hop.hostname}"
    raise UnknownHostKeyError(
        f"the host key of {hop.describe()} is not known: it presented {fp}, and no key is recorded for "
        f"{name!r} in {searched}. Check that fingerprint with the host's owner (on the host: "
        f"ssh-keygen -lf /etc/ssh/ssh_host_{key.get_name().split('-')[-1]}_key.pub), then accept it: connect "
        f"once with trust_on_first_use=True (it is recorded into {record}), or add it yourself with "
        f"`{keyscan} >> {record}`" + (f" (HostKeyAlias: rename the entry to {name})" if hop.host_key_alias else "")
        + "."
    )




__all__ = ["KnownHosts", "KnownKey", "add_known_host", "hashed_host_matches", "host_matches", "host_pattern",
           "replace_host_keys", "verify_host_key"]
