"""The target's side of package sync, over SSH: what its venv holds, installing into it
(uv first, pip as the fallback), shipping wheels and uv itself over SFTP.

Everything here is one ``sh`` exec (or one SFTP session) per step; the target needs nothing
but the venv's interpreter. What we installed is recorded in ``<root>/venv/remotemagic-packages.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..transport.ssh import SSHTransport, sftp_replace
from ..transport.ssh.errors import BootstrapError
from .wheels import Platform

log = logging.getLogger(__name__)

RECORD = "remotemagic-packages.json"
MARK = "remotemagic-env "

QUERY_PY = r"""
import json, os, re, sys, platform
from importlib import metadata
root, uv = sys.argv[1], sys.argv[2]
dists = {}
for d in metadata.distributions():
    try:
        n = d.metadata["Name"]
    except Exception:
        continue
    if n:
        dists.setdefault(re.sub(r"[-_.]+", "-", n).lower(), d.version)
wheels = {}
w = os.path.join(root, "wheels")
if os.path.isdir(w):
    for f in os.listdir(w):
        if f.endswith(".whl"):
            wheels[f] = os.path.getsize(os.path.join(w, f))
libc = ""
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError, AttributeError):
    pass
try:
    with open(os.path.join(sys.prefix, "remotemagic-packages.json")) as f:
        rec = json.load(f)
except Exception:
    rec = {}
print("remotemagic-env " + json.dumps({"dists": dists, "wheels": wheels, "uv": uv, "machine": platform.machine(),
      "system": platform.system(), "libc": libc, "python": list(sys.version_info[:2]), "record": rec}))
"""

# Can the target install from a package index? Env and pip.conf as pip/uv read them; a TCP
# connect with a short timeout (a host without internet usually drops packets: never wait long).
REACH_PY = r"""
import configparser, os, socket, sys
from urllib.parse import urlsplit
e = os.environ
def on(v):
    return (v or "").strip().lower() in ("1", "true", "yes", "on")
links = [x for k in ("UV_FIND_LINKS", "PIP_FIND_LINKS") for x in (e.get(k) or "").split()]
links = [x for x in links if os.path.isdir(x[7:] if x.startswith("file://") else x)]
no_index = on(e.get("PIP_NO_INDEX")) or on(e.get("UV_NO_INDEX")) or on(e.get("UV_OFFLINE"))
urls = [e[k] for k in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL") if e.get(k)]
if not urls:
    for path in ("/etc/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"), os.path.expanduser("~/.pip/pip.conf")):
        c = configparser.ConfigParser()
        try:
            c.read(path)
            v = c.get("global", "index-url", fallback=None)
        except Exception:
            v = None
        if v:
            urls.append(v)
urls = urls or ["https://pypi.org/simple"]
ok = bool(links)
if not no_index and not ok:
    for u in urls:
        p = urlsplit(u)
        if p.scheme == "file":
            ok = os.path.isdir(p.path)
        elif p.hostname:
            try:
                port = p.port or (443 if p.scheme == "https" else 80)
                socket.create_connection((p.hostname, port), timeout=float(sys.argv[1])).close()
                ok = True
            except OSError:
                ok = False
        if ok:
            break
print("remotemagic-index " + ("online" if ok else "offline"))
"""

RECORD_PY = r"""
import json, os, sys, time
path = os.path.join(sys.prefix, "remotemagic-packages.json")
try:
    with open(path) as f:
        rec = json.load(f)
except Exception:
    rec = {}
for name, version in json.loads(sys.argv[1]).items():
    rec[name] = {"version": version, "via": sys.argv[2], "source": sys.argv[3], "time": time.time()}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(rec, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
"""


class TargetError(Exception):
    """Installing into the target's venv failed."""


class TargetEnv:
    """What one SSH target's venv holds (queried once, cached until we install)."""

    def __init__(self, transport: SSHTransport):
        self.transport = transport
        self.facts: dict[str, Any] | None = None
        self.online: bool | None = None
        self.queries = 0

    @property
    def root(self) -> str:
        return self.transport.root

    # -- what is there -------------------------------------------------------------------------
    def query(self, force: bool = False) -> dict[str, Any]:
        """One round trip: the venv's distributions, shipped wheels, uv, platform, our record."""
        if self.facts is not None and not force:
            return self.facts
        script = f"""R={self.transport.root_sh()}
P="$R/venv/bin/python"
[ -x "$P" ] || {{ echo "no venv at $R/venv"; exit 3; }}
U=
V=$(cd "$R/venv" 2>/dev/null && cd -P .. && pwd)  # a venv linked from another root: its uv too
for u in "$R/tools/uv/bin/uv" "$V/tools/uv/bin/uv" "$(command -v uv 2>/dev/null)" \
         "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv"; do
  if [ -n "$u" ] && [ -x "$u" ]; then U="$u"; break; fi
done
exec "$P" -c {shlex.quote(QUERY_PY)} "$R" "$U"
"""
        status, out = self.transport.run(script)
        self.queries += 1
        for line in out.splitlines():
            if line.startswith(MARK):
                self.facts = json.loads(line[len(MARK):])
                return self.facts
        raise TargetError(f"cannot list the packages of {self.transport.name} (exit {status}): {out[-1000:]}")

    def invalidate(self) -> None:
        self.facts = None

    @property
    def dists(self) -> dict[str, str]:
        return self.query()["dists"]

    def platform(self) -> Platform:
        f = self.query()
        m = re.match(r"glibc (\d+)\.(\d+)", f.get("libc") or "")
        glibc = (int(m.group(1)), int(m.group(2))) if m else None
        major, minor = f["python"][:2]
        return Platform(f.get("machine") or "?", glibc, (int(major), int(minor)), f.get("system") or "?")

    def reachable(self, timeout: float = 3.0) -> bool:
        """Whether the target can install from an index (or a local find-links folder); cached."""
        if self.online is None:
            script = f'R={self.transport.root_sh()}\n"$R/venv/bin/python" -c {shlex.quote(REACH_PY)} {timeout:g}'
            status, out = self.transport.run(script)
            self.online = "remotemagic-index online" in out
            log.info("%s: package index %s", self.transport.name, "reachable" if self.online else "not reachable")
        return self.online

    # -- installing ----------------------------------------------------------------------------
    def install(self, pins: dict[str, str], shipped: bool, on_line: Callable[[str], None] | None = None) -> str:
        """Install ``{name: version}`` (no dependency resolution: the pins are the whole closure)
        with uv, else pip; from the shipped wheels or from the target's index. Returns the tool used."""
        facts = self.query()
        specs = " ".join(shlex.quote(f"{n}=={v}") for n, v in sorted(pins.items()))
        source = ' --no-index --find-links "$R/wheels"' if shipped else ""
        attempts: list[tuple[str, str]] = []
        if facts.get("uv"):
            # uv reads UV_FIND_LINKS but no "no index" setting from the environment: say it as pip would hear it
            env_sh = "" if shipped else (
                'NI=; for v in "${UV_NO_INDEX:-}" "${PIP_NO_INDEX:-}"; do case "$v" in ""|0|false|False|no|off) ;; '
                '*) NI=--no-index ;; esac; done\nFL=; if [ -z "${UV_FIND_LINKS:-}" ] && [ -n "${PIP_FIND_LINKS:-}" ]; '
                'then FL="--find-links $PIP_FIND_LINKS"; fi\n')
            extra = "" if shipped else " $NI $FL"
            attempts.append(("uv", f'{env_sh}{shlex.quote(facts["uv"])} pip install --python "$P" '
                                   f'--no-deps{source}{extra} {specs}'))
        attempts.append(("pip", '"$P" -m pip --version >/dev/null 2>&1 || '
                                '"$P" -m ensurepip --default-pip >/dev/null 2>&1 || '
                                '{ echo "no pip in the venv"; exit 3; }\n'
                                f'"$P" -m pip install --disable-pip-version-check --no-deps{source} {specs}'))
        errors = []
        for tool, cmd in attempts:
            script = f'umask 077\nR={self.transport.root_sh()}\nP="$R/venv/bin/python"\n{cmd} 2>&1'
            output = self.transport.stream_lines(script)
            for line in output:
                log.info("[%s %s] %s", self.transport.host.alias, tool, line)
                if on_line is not None:
                    on_line(line)
            status = output.status
            if status == 0:
                self._record(pins, tool, "shipped wheels" if shipped else "index")
                if self.facts is not None:  # what is there now, without asking again
                    self.facts["dists"].update(pins)
                    for name, version in pins.items():
                        self.facts.setdefault("record", {})[name] = {"version": version, "via": tool,
                                                                     "source": "shipped wheels" if shipped else "index"}
                return tool
            errors.append(f"{tool} (exit {status}): " + "\n".join(output.tail[-8:]))
        self.invalidate()
        raise TargetError(f"installing {specs} on {self.transport.name} failed:\n" + "\n".join(errors))

    def _record(self, pins: dict[str, str], tool: str, source: str) -> None:
        script = (f'R={self.transport.root_sh()}\n"$R/venv/bin/python" -c {shlex.quote(RECORD_PY)} '
                  f'{shlex.quote(json.dumps(pins))} {tool} {shlex.quote(source)}')
        status, out = self.transport.run(script)
        if status != 0:
            log.warning("%s: could not record the installed packages: %s", self.transport.name, out[-500:])

    # -- shipping ------------------------------------------------------------------------------
    def _sftp(self) -> Any:
        try:
            return self.transport.open_sftp()
        except BootstrapError as exc:  # the sftp subsystem is off
            raise TargetError(str(exc)) from None

    def _abs_root(self, sftp: Any) -> str:
        root = self.root
        if not root.startswith("/"):
            home = sftp.normalize(".")
            root = posixpath.join(home, root[2:] if root.startswith("~/") else root.lstrip("~"))
        return root

    def ship(self, wheels: Iterable[Path], update: Callable[[int], None] | None = None) -> int:
        """Upload the wheels that ``<root>/wheels`` does not hold yet (same name and size); return bytes sent."""
        have = dict(self.query().get("wheels") or {})
        todo = [w for w in wheels if have.get(w.name) != w.stat().st_size]
        if not todo:
            return 0
        sent = 0
        sftp = self._sftp()
        try:
            folder = posixpath.join(self._abs_root(sftp), "wheels")
            _mkdir(sftp, posixpath.dirname(folder))
            _mkdir(sftp, folder)
            for w in todo:
                sent += _put_file(sftp, w, posixpath.join(folder, w.name), update)
                have[w.name] = w.stat().st_size
        finally:
            sftp.close()
        if self.facts is not None:
            self.facts["wheels"] = have
        return sent

    def ship_uv(self, exe: Path) -> str:
        """Upload a uv executable to ``<root>/tools/uv/bin/uv``; return its path there."""
        sftp = self._sftp()
        try:
            root = self._abs_root(sftp)
            path = root
            for part in ("", "tools", "uv", "bin"):
                path = posixpath.join(path, part) if part else path
                _mkdir(sftp, path)
            dest = posixpath.join(path, "uv")
            _put_file(sftp, exe, dest, None, mode=0o700)
        finally:
            sftp.close()
        status, out = self.transport.run(f"{shlex.quote(dest)} --version 2>&1")
        if status != 0:
            with contextlib.suppress(Exception):
                self.transport.run(f"rm -f {shlex.quote(dest)}")
            raise TargetError(f"{self.transport.name}: the uv shipped for it does not run there (exit {status}): "
                              f"{out.strip()[-500:]}")
        self.invalidate()
        return dest


def _mkdir(sftp: Any, path: str) -> None:
    try:
        sftp.stat(path)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            sftp.mkdir(path, 0o700)


def _put_file(sftp: Any, src: Path, dest: str, update: Callable[[int], None] | None, mode: int = 0o600) -> int:
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    n = 0
    t0 = time.monotonic()
    with open(src, "rb") as f, sftp.open(tmp, "wb") as out:
        out.chmod(mode)
        out.set_pipelined(True)
        while block := f.read(256 * 1024):
            out.write(block)
            n += len(block)
            if update is not None:
                update(len(block))
    sftp_replace(sftp, tmp, dest)
    log.info("shipped %s (%d bytes) in %.2f s", src.name, n, time.monotonic() - t0)
    return n
