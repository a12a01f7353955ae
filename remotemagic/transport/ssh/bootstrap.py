"""Making an SSH host ready for the agent, and the checks run before the agent starts.

The agent script (:func:`agent_script`) is what every connect runs: it refuses a root folder
that is not safely ours (:data:`UNSAFE_SH`), and ``exec``\\ s the agent when this agent version
and a complete venv are installed, or exits with :data:`EXIT_MISSING` naming what is missing.
Only then is the host bootstrapped (:func:`bootstrap`): the root made 0700, the host probed
(:data:`PROBE_PY`), a venv created with uv, venv or virtualenv from an interpreter of this
kernel's minor version (uv brought or shipped when there is none), the agent's packages
installed, and the agent uploaded over SFTP. Everything installed is marked complete last (the
venv marker, the agent's ``.complete``), so a half-finished install is never trusted.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import secrets
import shlex
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import paramiko  # type: ignore[import-untyped]  # types-paramiko is not a dependency

from ... import errors
from ..base import AGENT_PACKAGE, agent_sources, agent_version
from .errors import BootstrapError

if TYPE_CHECKING:
    from .transport import SSHTransport

log = logging.getLogger(__name__)

MARK = "remotemagic-agent-v1"
EXIT_MISSING = 97
EXIT_UNSAFE = 96
#: The oldest IPython the agent works with (the benchmarks check the hosts they make).
MIN_IPYTHON = 8


# -- remote scripts ---------------------------------------------------------------------------------
PROBE_PY = r"""
import sys, json, os, platform
info = {"version": "%d.%d.%d" % tuple(sys.version_info[:3]), "executable": sys.executable,
        "machine": platform.machine(), "system": platform.system()}
try:
    info["libc"] = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError, AttributeError):
    info["libc"] = ""
try:
    import importlib.util as u
    for m in ("venv", "ensurepip", "virtualenv", "pip"):
        info[m] = u.find_spec(m) is not None
    from importlib import metadata
    for d in ("cloudpickle", "ipython"):
        try:
            info[d] = metadata.version(d)
        except Exception:
            info[d] = None
except Exception as e:
    info["error"] = repr(e)
print("probe=" + json.dumps(info))
"""


# Before anything under the root runs: the root and what is directly in it, the agent folder,
# this agent version (all of it) and the venv (down to its site-packages' entries) must belong
# to us and not be writable by group or others (symlinks are judged themselves; -H follows a
# root or venv that is a symlink). Otherwise print the first offender (``ls -ldn``) and stop.
# One exception: uv makes the empty lock file ``venv/.lock`` mode 0666 whatever the umask; it is
# only ever locked, never read or run, and the venv folder holding it is checked.
UNSAFE_SH = r"""U=$(id -u)
rm_unsafe() {
  [ -e "$1" ] || [ -h "$1" ] || return 0
  o=$(find -H "$@" \( ! -user "$U" -o \( ! -type l \( -perm -020 -o -perm -002 \) \) \) -print 2>/dev/null) || {
    echo "!$1"; return 0; }
  printf '%s\n' "$o" | head -n 1
}
B=$(rm_unsafe "$R" -maxdepth 1)
[ -n "$B" ] || B=$(rm_unsafe "$R/agent" -maxdepth 1)
[ -n "$B" ] || B=$(rm_unsafe "$V")
[ -n "$B" ] || B=$(rm_unsafe "$R/venv" -maxdepth 4 ! \( -path "$R/venv/.lock" -type f \))
if [ -n "$B" ]; then
  case "$B" in
    "!"*) B=${B#!}; I="nocheck:-" ;;
    *) I=$(ls -ldn -- "$B" | awk '{print $1 ":" $3}') ;;
  esac
  echo "MARK unsafe $U $I $B"
  exit EXIT_UNSAFE
fi""".replace("MARK", MARK).replace("EXIT_UNSAFE", str(EXIT_UNSAFE))


def local_cloudpickle() -> str:
    """This kernel's cloudpickle version (the target's must be the same)."""
    import cloudpickle  # type: ignore[import-untyped]

    return str(cloudpickle.__version__)


def venv_marker() -> str:
    """The file that says ``<root>/venv`` is complete for this Python minor and cloudpickle."""
    major, minor = sys.version_info[:2]
    return f".remotemagic-ok-py{major}.{minor}-cloudpickle{local_cloudpickle()}"


def sftp_replace(sftp: paramiko.SFTPClient, tmp: str, path: str) -> None:
    """Rename ``tmp`` over ``path`` on the host: atomically where the server has the
    posix-rename extension, else remove then rename (plain SFTP rename refuses to overwrite)."""
    try:
        sftp.posix_rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            sftp.remove(path)
        sftp.rename(tmp, path)


def agent_script(root_sh: str, agent_env: dict[str, str]) -> str:
    """The sh script that starts the agent under the root (``root_sh``: the root as a sh word),
    with ``agent_env`` exported, after :data:`UNSAFE_SH`; it prints a :data:`MARK` line first."""
    env_sh = "".join(f"\n  {k}={shlex.quote(v)}; export {k}" for k, v in sorted(agent_env.items())
                     if k.isidentifier())
    return f"""umask 077
R={root_sh}
V="$R/agent/{agent_version()}"
{UNSAFE_SH}
M=
[ -f "$V/{AGENT_PACKAGE}/.complete" ] || M=agent
{{ [ -f "$R/venv/{venv_marker()}" ] && [ -x "$R/venv/bin/python" ]; }} || M="$M,venv"
if [ -z "$M" ] && cd "$V"; then
  PYTHONPATH="$V"; export PYTHONPATH{env_sh}
  echo "{MARK} ok - $R"
  exec "$R/venv/bin/python" -m {AGENT_PACKAGE}.server "$R" 2>>"$R/agent.log"
fi
echo "{MARK} missing ${{M:-agent}} $R"
exit {EXIT_MISSING}
"""


def unsafe_root_error(name: str, root: str, uid: str, found: str) -> errors.UnsafeRootError:
    """The agent script's report (``uid``, ``"mode:owner path"``) of a path under the root that
    is not safely ours, as the error that says why and what to do."""
    info, _, path = found.partition(" ")
    mode, _, owner = info.partition(":")
    if mode == "nocheck":
        why = ("it could not be checked: `find` failed on it there (is it readable, and does the host's find "
               "support -H and -maxdepth?), and nothing is run from a folder that was not checked")
    elif owner != uid:
        why = (f"it belongs to uid {owner} there, not to you (uid {uid}), so code or pickles another user put "
               "there would run as you. Use a root folder that you own and only you can write (a new one, "
               "or leave --root / remote_root unset for the default ~/.remotemagic)")
    else:
        why = (f"it is writable by group or others ({mode}), so another user could put code there that "
               f"would run as you. Fix it on the host with: chmod go-w {shlex.quote(path)} (or chmod 700), "
               "or use a folder only you can write")
    return errors.UnsafeRootError(f"{name}: refusing to use the root folder {root}: {path} is not "
                                  f"safe: {why}. Nothing from it was run.")


# -- bootstrap --------------------------------------------------------------------------------------
def bootstrap(t: SSHTransport, missing: Iterable[str] = ("venv", "agent")) -> None:
    """Install what is missing under the root: the venv (with its packages) and/or the agent."""
    missing = set(missing)
    t0 = time.monotonic()
    t.bootstraps += 1
    make_root(t)
    if "venv" in missing:
        bootstrap_venv(t)
    if "agent" in missing:
        upload_agent(t)
    log.info("%s: bootstrap done in %.1f s", t.name, time.monotonic() - t0)


def make_root(t: SSHTransport) -> None:
    """Create the root (0700) or say why it cannot be: before any install is attempted, so a
    root we cannot write is reported as that, not as a missing venv module."""
    status, out = t.run(f"""umask 077
R={t.root_sh()}
mkdir -p "$R" 2>&1 && chmod 700 "$R" 2>&1 && test -w "$R" && exit 0
echo "$R is not writable"
exit 1
""")
    if status != 0:
        detail = " ".join(out.strip().splitlines()[-2:])[-500:]
        raise errors.RootFolderError(
            f"{t.name}: cannot create or write the root folder {t.root} on the host ({detail}). "
            "Choose a folder you can write there: --root, or Ec2Magics.remote_root (default ~/.remotemagic)"
        )


def probe(t: SSHTransport) -> dict[str, Any]:
    """What the host has: its home, the root resolved, uv, the interpreter and what it can do."""
    py = shlex.quote(t.python)
    script = f"""R={t.root_sh()}
echo "home=$HOME"
echo "root=$R"
for u in "$(command -v uv 2>/dev/null)" "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv" "$R/tools/uv/bin/uv"; do
  if [ -n "$u" ] && [ -x "$u" ]; then echo "uv=$u"; break; fi
done
P=$(command -v {py} 2>/dev/null) || exit 0
echo "python=$P"
"$P" -c {shlex.quote(PROBE_PY)} 2>&1 || "$P" --version 2>&1 | sed 's/^/pyversion=/'
"""
    status, out = t.run(script)
    facts: dict[str, Any] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("home", "root", "uv", "python", "pyversion", "probe") and key not in facts:
            facts[key] = value
    if "probe" in facts:
        import json

        try:
            facts["probe"] = json.loads(facts["probe"])
        except ValueError:
            facts.pop("probe")
    if status != 0 or "root" not in facts:
        raise BootstrapError(f"probing {t.name} failed (exit {status}): {out[-2000:]}")
    t.root = facts["root"]
    return facts


def install_uv(t: SSHTransport, facts: dict[str, Any]) -> str | None:
    """uv into ``<root>/tools/uv`` with the host's own pip; its path, or None if that failed."""
    info = facts.get("probe") or {}
    if not info.get("pip"):
        return None
    log.info("%s: installing uv with pip into %s/tools/uv", t.name, t.root)
    status, out = t.run(
        f"umask 077\nR={shlex.quote(t.root)}\n"
        f'{shlex.quote(facts["python"])} -m pip install --disable-pip-version-check --retries 1 --timeout 15 '
        '--target "$R/tools/uv" uv && test -x "$R/tools/uv/bin/uv"',
        log_prefix=f"[{t.host.alias} pip] ",
    )
    if status != 0:
        log.warning("%s: could not install uv with pip: %s", t.name, out.strip().splitlines()[-1:] or "")
        return None
    return posixpath.join(t.root, "tools/uv/bin/uv")


def ship_uv(t: SSHTransport, info: dict[str, Any], python: tuple[int, ...], required: bool) -> str | None:
    """Bring uv from here (the wheel for the host's platform, unpacked, sent over SFTP)."""
    from ...envsync import bootstrap as envboot

    try:
        return envboot.ship_uv(t, info, (python[0], python[1]))
    except BootstrapError:
        if required:
            raise
        log.info("%s: could not ship uv", t.name, exc_info=True)
        return None


def uv_python(t: SSHTransport, uv: str) -> str:
    """An interpreter of this kernel's minor version on the host, provisioned by uv if need be."""
    want = "{}.{}".format(*sys.version_info[:2])
    q = shlex.quote(uv)
    status, out = t.run(f"{q} python find {want}")
    if status != 0:
        log.info("%s: provisioning Python %s with uv", t.name, want)
        status, out = t.run(f"{q} python install {want} && {q} python find {want}",
                            log_prefix=f"[{t.host.alias} uv] ")
    path = out.strip().splitlines()[-1] if out.strip() else ""
    if status != 0 or not path.startswith("/"):
        raise BootstrapError(f"{t.name}: uv ({uv}) could not provide Python {want}: {out[-2000:]}")
    return path


def bootstrap_venv(t: SSHTransport) -> None:
    """Create ``<root>/venv`` with the agent's packages, check it, and mark it complete."""
    facts = probe(t)
    want = sys.version_info[:2]
    want_s = "{}.{}".format(*want)
    info = facts.get("probe") or {}
    found = None
    if "python" in facts:
        version = info.get("version") or facts.get("pyversion", "unknown version")
        found = f"{facts['python']} is Python {version}"
    base: str | None = None
    if info.get("version") and tuple(int(x) for x in info["version"].split(".")[:2]) == want:
        base = info.get("executable") or facts["python"]
    uv = facts.get("uv")
    if base is None:
        uv = uv or install_uv(t, facts) or ship_uv(t, info, want, required=False)
        if not uv:
            what = found or f"there is no {t.python!r} on its PATH"
            raise BootstrapError(
                f"{t.name}: {what}, but this kernel runs Python {want_s}, and pickles need the same "
                f"minor version at both ends. Install Python {want_s} there and connect with "
                f"python='python{want_s}' (or its full path), or install uv there "
                "(curl -LsSf https://astral.sh/uv/install.sh | sh, or pip install uv) and connect again: "
                f"remotemagic then provisions Python {want_s} with it"
            )
        base = uv_python(t, uv)
        info = {}
    cp = local_cloudpickle()
    if not uv and info:  # uv first; on a bare host nothing else can make the venv
        bare = not (info.get("venv") and info.get("ensurepip")) and not info.get("virtualenv")
        uv = ship_uv(t, info, want, required=bare)
    log.info("%s: creating %s/venv from %s", t.name, t.root, base)
    # never --system-site-packages: the venv holds what package sync puts there, at the
    # local versions, whatever the host's interpreter happens to carry
    create_venv(t, base, uv, info, want_s)
    from ...envsync import bootstrap as envboot

    envboot.install_agent_packages(t, t.offline_install)
    check = (
        "import sys, cloudpickle, IPython; "
        "print('%d.%d' % sys.version_info[:2], cloudpickle.__version__, IPython.__version__)"
    )
    status, out = t.run(f'R={shlex.quote(t.root)}\n"$R/venv/bin/python" -c {shlex.quote(check)} 2>&1')
    got = out.strip().splitlines()[-1].split() if out.strip() else []
    if status != 0 or got[:2] != [want_s, cp]:
        raise BootstrapError(
            f"{t.name}: the new venv {t.root}/venv does not provide Python {want_s} with "
            f"cloudpickle {cp} and IPython: {out[-2000:]}"
        )
    status, out = t.run(
        f'umask 077\nR={shlex.quote(t.root)}\necho "{" ".join(got)}" > "$R/venv/{venv_marker()}"'
    )
    if status != 0:
        raise BootstrapError(f"{t.name}: cannot write the venv marker: {out}")


def create_venv(t: SSHTransport, base: str, uv: str | None, info: dict[str, Any], want_s: str) -> None:
    """A fresh empty ``<root>/venv`` from ``base``: with uv, else venv, else virtualenv."""
    b = shlex.quote(base)
    attempts = [f'{shlex.quote(uv)} venv -q --python {b} "$R/venv"'] if uv else []  # ~0.1 s, no pip
    attempts.append(f'{b} -m venv "$R/venv"')
    if info.get("virtualenv") or not info:
        attempts.append(f'{b} -m virtualenv -q "$R/venv"')
    outputs = []
    prefix = f'umask 077\nR={shlex.quote(t.root)}\nmkdir -p "$R" && chmod 700 "$R" && rm -rf "$R/venv" || exit 1\n'
    for cmd in attempts:
        status, out = t.run(prefix + cmd + " 2>&1")
        if status == 0:
            t.run(f'chmod 700 {shlex.quote(t.root)}/venv')
            return
        outputs.append(f"$ {cmd}\n{out.strip()[-1500:]}")
    t.run(f'rm -rf {shlex.quote(t.root)}/venv')
    raise BootstrapError(
        f"{t.name}: cannot create a virtual environment with {base}:\n" + "\n".join(outputs)
        + f"\nOn Debian/Ubuntu install the venv module: sudo apt install python3-venv (or python{want_s}-venv); "
        "or install virtualenv or uv on the host, then connect again"
    )


def upload_agent(t: SSHTransport) -> None:
    """Put this agent version into ``<root>/agent/<version>`` over SFTP (.complete last)."""
    sftp = t.open_sftp()
    try:
        if not t.root.startswith("/"):
            home = sftp.normalize(".")
            t.root = posixpath.join(home, t.root[2:] if t.root.startswith("~/") else t.root.lstrip("~"))
        vdir = posixpath.join(t.root, "agent", agent_version())
        pkg = posixpath.join(vdir, AGENT_PACKAGE)
        for folder in (t.root, posixpath.join(t.root, "agent"), vdir, pkg):
            _sftp_mkdir(sftp, folder)
        token = secrets.token_hex(4)
        for name, data in agent_sources().items():
            _sftp_put(sftp, posixpath.join(pkg, name), data, token)
        _sftp_put(sftp, posixpath.join(pkg, ".complete"), agent_version().encode(), token)
        log.info("%s: uploaded agent %s to %s", t.name, agent_version(), vdir)
    except OSError as exc:
        raise BootstrapError(f"{t.name}: uploading the agent to {t.root} failed: {exc}") from exc
    finally:
        sftp.close()


def _sftp_mkdir(sftp: paramiko.SFTPClient, path: str) -> None:
    """``path`` as a folder only we can use (made 0700 if missing)."""
    try:
        sftp.stat(path)
    except FileNotFoundError:
        with contextlib.suppress(OSError):  # a concurrent bootstrap may win the race
            sftp.mkdir(path, 0o700)
    sftp.chmod(path, 0o700)


def _sftp_put(sftp: paramiko.SFTPClient, path: str, data: bytes, token: str) -> None:
    """Write ``path`` (0600) through a temporary file renamed over it."""
    tmp = f"{path}.tmp-{token}"
    with sftp.open(tmp, "wb") as f:
        f.chmod(0o600)
        f.write(data)
    sftp_replace(sftp, tmp, path)
