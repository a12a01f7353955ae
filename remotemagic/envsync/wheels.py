"""Wheels for a target's platform, fetched here and kept in a local cache.

``pip download --platform ... --python-version ... --only-binary=:all:`` fetches the wheel that
fits the *target* (its CPU, glibc and Python), not this machine. Wheels are kept in
``<cache>/wheels`` (``$REMOTEMAGIC_CACHE_DIR`` or the platform's user cache folder) and looked
up there first, so a laptop without internet uses what it already has. ``$REMOTEMAGIC_WHEELHOUSE``
names a folder to take wheels from instead of any index (pip's ``--no-index --find-links``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .localenv import norm

log = logging.getLogger(__name__)

MIN_GLIBC = 17  # manylinux2014: the oldest glibc that current wheels (numpy, uv...) are built for


class NoWheelError(Exception):
    """No wheel of this distribution/version exists for the target's platform (or cannot be fetched)."""


@dataclass(frozen=True)
class Platform:
    """What decides which wheels a target can install."""

    machine: str  # x86_64, aarch64
    glibc: tuple[int, int] | None  # (2, 35); None: not a glibc system (musl, macOS...)
    python: tuple[int, int]  # (3, 11)
    system: str = "Linux"

    def describe(self) -> str:
        libc = f"glibc {self.glibc[0]}.{self.glibc[1]}" if self.glibc else "no glibc"
        return f"{self.system} {self.machine}, {libc}, Python {self.python[0]}.{self.python[1]}"

    def platform_tags(self) -> list[str]:
        """pip ``--platform`` values, best first."""
        if self.system != "Linux" or self.glibc is None or self.glibc[0] != 2:
            raise NoWheelError(
                f"the target is {self.describe()}: remotemagic fetches wheels for Linux hosts with glibc "
                f">= 2.{MIN_GLIBC} (manylinux); install packages there yourself (%ec2 pip install ...)")
        arch = self.machine
        minor = self.glibc[1]
        tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        for n, name in legacy.items():
            if minor >= n:
                tags.append(f"{name}_{arch}")
        return tags

    def abi_tags(self) -> list[str]:
        cp = f"cp{self.python[0]}{self.python[1]}"
        return [cp, "abi3", "none"]

    def accepts(self, filename: str) -> bool:
        """Whether a wheel file name's tags fit this platform."""
        parts = filename[:-4].split("-")
        if len(parts) < 5:
            return False
        py, abi, plat = parts[-3], parts[-2], parts[-1]
        me = self.python
        pys = {f"cp{me[0]}{me[1]}", f"py{me[0]}", f"py{me[0]}{me[1]}", f"py2.py{me[0]}"}
        ok_py = any(t in pys or (t.startswith(f"cp{me[0]}") and abi == "abi3" and t[2:].isdigit()
                                 and int(t[3:] or 0) <= me[1]) for t in py.split("."))
        ok_abi = any(t in self.abi_tags() for t in abi.split("."))
        if not (ok_py and ok_abi):
            return False
        plats = plat.split(".")
        if "any" in plats:
            return True
        try:
            mine = set(self.platform_tags())
        except NoWheelError:
            return False
        return any(p in mine for p in plats)


def cache_dir() -> Path:
    env = os.environ.get("REMOTEMAGIC_CACHE_DIR")
    path = Path(env) if env else Path(platformdirs.user_cache_dir("remotemagic"))
    path = path / "wheels"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-4].split("-")
    return norm(parts[0]), parts[1]


def cached(name: str, version: str, plat: Platform) -> Path | None:
    """A cached wheel of ``name==version`` that fits ``plat``."""
    want = (norm(name), version)
    for path in sorted(cache_dir().glob("*.whl")):
        if _wheel_name_version(path.name) == want and plat.accepts(path.name):
            return path
    return None


def _pip_download(pins: list[str], plat: Platform, dest: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--dest", dest, "--python-version", f"{plat.python[0]}.{plat.python[1]}",
           "--implementation", "cp"]
    for abi in plat.abi_tags():
        cmd += ["--abi", abi]
    for tag in plat.platform_tags():
        cmd += ["--platform", tag]
    house = os.environ.get("REMOTEMAGIC_WHEELHOUSE")
    if house:
        cmd += ["--no-index", "--find-links", house]
    return subprocess.run([*cmd, *pins], capture_output=True, text=True)


def fetch(pins: list[str], plat: Platform) -> tuple[dict[str, Path], dict[str, str]]:
    """Wheels for ``name==version`` pins that fit ``plat``: from the cache, else downloaded.

    Returns ``({pin: wheel path}, {pin: why it could not be had})``.
    """
    got: dict[str, Path] = {}
    failed: dict[str, str] = {}
    todo = []
    for pin in pins:
        name, _, version = pin.partition("==")
        hit = cached(name, version, plat)
        if hit is not None:
            got[pin] = hit
        else:
            todo.append(pin)
    if not todo:
        return got, failed
    with tempfile.TemporaryDirectory(prefix="remotemagic-wheels-") as tmp:
        batches = [todo] if len(todo) > 1 else []
        result = _pip_download(todo, plat, tmp) if batches else None
        if result is None or result.returncode != 0:  # find which ones fail, one at a time
            for pin in todo:
                one = _pip_download([pin], plat, tmp)
                if one.returncode != 0:
                    lines = [ln for ln in (one.stderr or one.stdout).splitlines()
                             if ln.startswith("ERROR") and "is ignored" not in ln]
                    why = lines[0][7:] if lines else f"pip download failed (exit {one.returncode})"
                    failed[pin] = f"no wheel of {pin} for {plat.describe()} ({why})"
        for f in sorted(Path(tmp).glob("*.whl")):
            dest = cache_dir() / f.name
            if not dest.exists():
                _copy(f, dest)
    for pin in todo:
        if pin in failed:
            continue
        name, _, version = pin.partition("==")
        hit = cached(name, version, plat)
        if hit is None:
            failed[pin] = f"no wheel of {pin} for {plat.describe()}"
        else:
            got[pin] = hit
    return got, failed


def _copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with open(src, "rb") as a, open(tmp, "wb") as b:
        while block := a.read(1 << 20):
            b.write(block)
        b.flush()
        os.fsync(b.fileno())
    os.replace(tmp, dest)


def build_local(path: str) -> Path:
    """Build a wheel of a local project folder (an editable or local-path install) into the cache."""
    with tempfile.TemporaryDirectory(prefix="remotemagic-build-") as tmp:
        house = os.environ.get("REMOTEMAGIC_WHEELHOUSE")
        source = ["--no-index", "--find-links", house] if house else []
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                               *source, "--wheel-dir", tmp, path], capture_output=True, text=True)
        built = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not built:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise NoWheelError(f"building a wheel of {path} failed: {tail}")
        dest = cache_dir() / built[0].name
        _copy(built[0], dest)
        return dest


def uv_binary(plat: Platform, version: str = "") -> Path:
    """The ``uv`` executable for ``plat``, extracted from uv's wheel (cached)."""
    pin = f"uv=={version}" if version else "uv"
    hits = sorted((p for p in cache_dir().glob("uv-*.whl") if plat.accepts(p.name)
                   and (not version or _wheel_name_version(p.name)[1] == version)), key=_version_key)
    if not hits:
        with tempfile.TemporaryDirectory(prefix="remotemagic-uv-") as tmp:
            proc = _pip_download([pin], plat, tmp)
            wheels = sorted(Path(tmp).glob("uv-*.whl"))
            if proc.returncode != 0 or not wheels:
                why = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.startswith("ERROR")]
                reason = why[0][7:] if why else "pip download failed"
                raise NoWheelError(f"no uv build for {plat.describe()} ({reason})")
            _copy(wheels[0], cache_dir() / wheels[0].name)
            hits = [cache_dir() / wheels[0].name]
    wheel = hits[-1]
    exe = cache_dir() / "uv-bin" / wheel.name[:-4] / "uv"
    if not exe.exists():
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if re.fullmatch(r"uv-[^/]+\.data/scripts/uv", n)), None)
            if member is None:
                raise NoWheelError(f"{wheel.name} holds no uv executable")
            exe.parent.mkdir(parents=True, exist_ok=True)
            part = exe.with_name("uv.part")
            part.write_bytes(z.read(member))
            os.chmod(part, 0o755)
            os.replace(part, exe)
    return exe


def _version_key(path: Path) -> tuple:
    v = _wheel_name_version(path.name)[1]
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+-]", v))
