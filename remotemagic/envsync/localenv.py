"""The local environment: which installed distribution provides a module, at which version,
and which distributions it needs (its requirements, markers evaluated here).

``importlib.metadata.packages_distributions()`` costs ~0.3-1.5 s, so the map is built once and
kept in memory and on disk, keyed by the mtimes of the ``sys.path`` folders (installing or
removing a package changes its folder's mtime): a warm lookup costs a few stats.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..agent import files

log = logging.getLogger(__name__)

#: Never synced: the target's venv tooling, and this package (the agent ships itself).
NEVER = frozenset({"pip", "setuptools", "wheel", "remotemagic", "uv", "distribute"})
CACHE_VERSION = 1


def norm(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Dist:
    """One installed distribution."""

    name: str  # normalized
    version: str
    requires: list[str] = field(default_factory=list)  # raw requirement strings
    installer: str = ""  # "pip", "uv", "conda", ...
    editable: bool = False
    local_path: str = ""  # a local folder it was installed from (editable or not)

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def _fingerprint() -> list[list[Any]]:
    out = []
    for p in sys.path:
        try:
            st = os.stat(p or ".")
        except OSError:
            continue
        out.append([p, st.st_mtime_ns])
    return out


def _read_dist(dist: metadata.Distribution) -> Dist | None:
    try:
        name = dist.metadata["Name"]
    except Exception:
        return None
    if not name:
        return None
    installer = (dist.read_text("INSTALLER") or "").strip()
    editable, local_path = False, ""
    raw = dist.read_text("direct_url.json")
    if raw:
        try:
            direct = json.loads(raw)
        except ValueError:
            direct = {}
        url = direct.get("url", "")
        if url.startswith("file://") and ("dir_info" in direct):
            local_path = url[len("file://"):]
            editable = bool(direct["dir_info"].get("editable"))
    return Dist(norm(name), dist.version, list(dist.requires or []), installer, editable, local_path)


class LocalEnv:
    """Module -> distributions and distribution -> :class:`Dist` for this interpreter."""

    def __init__(self, cache_path: str | None = None):
        self.cache_path = cache_path
        self.fingerprint: list[list[Any]] = []
        self.modules: dict[str, list[str]] = {}
        self.dists: dict[str, Dist] = {}
        self._closures: dict[frozenset[str], list[Dist]] = {}
        self._lock = threading.Lock()

    # -- building and caching ------------------------------------------------------------------
    def refresh(self) -> LocalEnv:
        """Rebuild the maps if any ``sys.path`` folder changed since they were built."""
        fp = _fingerprint()
        with self._lock:
            if fp == self.fingerprint:
                return self
            if self._load(fp):
                return self
            self.dists = {}
            for dist in metadata.distributions():
                d = _read_dist(dist)
                if d is not None and d.name not in self.dists:  # the first on sys.path wins, as for imports
                    self.dists[d.name] = d
            self.modules = {mod: sorted({norm(n) for n in names})
                            for mod, names in metadata.packages_distributions().items()}
            self.fingerprint = fp
            self._closures = {}
            self._save()
        return self

    def _load(self, fp: list[list[Any]]) -> bool:
        if not self.cache_path:
            return False
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        if data.get("v") != CACHE_VERSION or data.get("fingerprint") != fp or data.get("prefix") != sys.prefix:
            return False
        self.dists = {k: Dist(**v) for k, v in data["dists"].items()}
        self.modules = data["modules"]
        self.fingerprint = fp
        self._closures = {}
        return True

    def _save(self) -> None:
        if not self.cache_path:
            return
        data = {"v": CACHE_VERSION, "prefix": sys.prefix, "fingerprint": self.fingerprint,
                "modules": self.modules, "dists": {k: vars(v) for k, v in self.dists.items()}}
        try:
            os.makedirs(os.path.dirname(self.cache_path), mode=0o700, exist_ok=True)
            files.atomic_write(self.cache_path, [json.dumps(data).encode()])
        except OSError as exc:
            log.debug("cannot cache the distribution map in %s: %s", self.cache_path, exc)

    # -- queries -------------------------------------------------------------------------------
    def dists_for_modules(self, modules: set[str]) -> set[str]:
        """Distributions that provide these top-level modules (unknown modules are skipped)."""
        out: set[str] = set()
        for mod in modules:
            for name in self.modules.get(mod, ()):
                if name in self.dists and name not in NEVER:
                    out.add(name)
        return out

    def closure(self, roots: set[str] | frozenset[str]) -> list[Dist]:
        """``roots`` and everything they require (installed here), sorted by name."""
        key = frozenset(roots)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        from packaging.requirements import InvalidRequirement, Requirement

        seen: dict[str, Dist] = {}
        todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
        done_extras: dict[str, set[str]] = {}
        while todo:
            name, extras = todo.pop()
            d = self.dists.get(name)
            if d is None or name in NEVER:
                continue
            have = done_extras.setdefault(name, set())
            if name in seen and extras <= have:
                continue
            seen[name] = d
            have.update(extras)
            for raw in d.requires:
                try:
                    req = Requirement(raw)
                except InvalidRequirement:
                    continue
                if req.marker is not None:
                    envs = [{"extra": e} for e in (extras or {""})]
                    if not any(req.marker.evaluate(env) for env in envs):
                        continue
                todo.append((norm(req.name), frozenset(req.extras)))
        out = sorted(seen.values(), key=lambda d: d.name)
        self._closures[key] = out
        return out

    def all_dists(self) -> list[Dist]:
        return sorted((d for d in self.dists.values() if d.name not in NEVER), key=lambda d: d.name)


_CURRENT: LocalEnv | None = None


def current() -> LocalEnv:
    """The (refreshed) map of this interpreter, cached under the state folder."""
    global _CURRENT
    if _CURRENT is None:
        from .. import state

        key = re.sub(r"[^A-Za-z0-9]+", "-", sys.prefix).strip("-")[-80:]
        _CURRENT = LocalEnv(os.path.join(str(state.state_dir()), "envsync", f"dists-{key}.json"))
    return _CURRENT.refresh()
