"""Package sync: the target's venv gets the distributions a job needs, at this kernel's versions.

Per job (``Remote.package_sync``): the modules the cell imports and its pickles name are mapped
to local distributions and their requirements (:mod:`.localenv`), compared with the target's
venv (one query per target and kernel, cached until we install), and the missing ones are
installed at exactly the local version -- before any value is uploaded. ``"auto"`` keeps a
version the target already has (and says so in one line); ``"exact"`` replaces it; ``"off"``
does nothing. Installs run on the target with uv (pip as the fallback), from its package index
when it can reach one, else from wheels fetched here for its platform and shipped over SFTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import notices, progress
from . import MODES, PackageSyncError, localenv, needs, wheels
from .localenv import Dist
from .target import TargetEnv, TargetError

log = logging.getLogger(__name__)


def notify(text: str, warning: bool = False) -> None:
    """Everything package sync tells the user goes through here: a user notice (shown in the
    cell's output; see :mod:`remotemagic.notices`)."""
    notices.notify(text, "warning" if warning else "info", logger=log)


@dataclass
class Row:
    """One distribution in a sync plan."""

    name: str
    local: str
    target: str | None
    action: str  # install | there | skew | skip | installed
    why: str = ""
    dist: Dist | None = None


def _same(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        from packaging.version import Version

        return Version(a) == Version(b)
    except Exception:
        return False


class Syncer:
    """Package sync for one target (shared by every Remote of this kernel to that target)."""

    def __init__(self, transport: Any):
        self.transport = transport
        self.target = TargetEnv(transport)
        self.lock = threading.RLock()
        self.warned: set[tuple] = set()
        self._checked: dict[tuple[str, frozenset[str]], bool] = {}  # (mode, roots) known to be satisfied
        self.uv_failed = False

    def invalidate(self) -> None:
        with self.lock:
            self.target.invalidate()
            self.target.online = None
            self._checked.clear()

    # -- planning ------------------------------------------------------------------------------
    def plan(self, dists: Iterable[Dist], mode: str = "auto") -> list[Row]:
        theirs = self.target.dists
        rows = []
        for d in dists:
            t = theirs.get(d.name)
            if _same(t, d.version):
                rows.append(Row(d.name, d.version, t, "there", dist=d))
            elif t is None:
                why = f"built from {d.local_path}" if d.local_path else ""
                rows.append(Row(d.name, d.version, t, "install", why, d))
            elif mode == "exact":
                rows.append(Row(d.name, d.version, t, "install", f"replaces {t}", d))
            else:
                rows.append(Row(d.name, d.version, t, "skew", f"target keeps {t} (auto does not replace it)", d))
        return rows

    # -- installing ----------------------------------------------------------------------------
    def apply(self, rows: list[Row], offline: bool = False, show_progress: bool = True) -> list[Row]:
        """Install the rows marked ``install``; mark them ``installed`` or ``skip`` (with why)."""
        todo = [r for r in rows if r.action == "install"]
        if not todo:
            return rows
        t0 = time.monotonic()
        n_dep = len(todo)
        notify(f"Installing on {self.transport.name}: " + ", ".join(f"{r.name}=={r.local}" for r in todo[:8])
               + (f" and {n_dep - 8} more" if n_dep > 8 else ""))
        self._ensure_uv()
        local_builds = [r for r in todo if r.dist is not None and r.dist.local_path]
        from_index = [r for r in todo if r not in local_builds]
        tool = "?"
        if from_index and not offline and self.target.reachable():
            try:
                tool = self.target.install({r.name: r.local for r in from_index}, shipped=False)
                for r in from_index:
                    r.action, r.why = "installed", (r.why or f"from the target's index ({tool})")
                from_index = []
            except TargetError as exc:
                log.info("installing from %s's index failed, shipping wheels instead: %s", self.transport.name, exc)
        ship = from_index + local_builds
        if ship:
            tool = self._ship_and_install(ship, show_progress)
        done = [r for r in todo if r.action == "installed"]
        if done:
            notify(f"Installed {len(done)} package(s) on {self.transport.name} with {tool} "
                   f"in {time.monotonic() - t0:.1f} s")
        replaced = [r for r in done if r.target is not None]
        if replaced:
            notify("Replaced " + ", ".join(f"{r.name} {r.target} -> {r.local}" for r in replaced)
                   + ": a session that already imported it keeps the old one until %ec2 restart", warning=True)
        return rows

    def _ensure_uv(self) -> None:
        """uv first: a target without uv gets it from here (once; pip stays the fallback)."""
        if self.target.query().get("uv") or self.uv_failed:
            return
        try:
            exe = wheels.uv_binary(self.target.platform())
            self.target.ship_uv(exe)
        except (wheels.NoWheelError, TargetError, OSError) as exc:
            self.uv_failed = True
            log.info("%s: no uv (%s); installing with pip", self.transport.name, exc)

    def _ship_and_install(self, rows: list[Row], show_progress: bool) -> str:
        plat = self.target.platform()
        paths: dict[str, Any] = {}
        for r in rows:
            if r.dist is not None and r.dist.local_path:
                try:
                    paths[f"{r.name}=={r.local}"] = wheels.build_local(r.dist.local_path)
                except wheels.NoWheelError as exc:
                    r.action, r.why = "skip", str(exc)
        pins = [f"{r.name}=={r.local}" for r in rows if r.action == "install" and not (r.dist and r.dist.local_path)]
        try:
            got, failed = wheels.fetch(pins, plat) if pins else ({}, {})
        except wheels.NoWheelError as exc:
            got, failed = {}, {pin: str(exc) for pin in pins}
        paths.update(got)
        for r in rows:
            pin = f"{r.name}=={r.local}"
            if r.action != "install" or pin in paths:
                continue
            why = failed.get(pin, f"no wheel of {pin} for {plat.describe()}")
            if r.dist is not None and r.dist.installer == "conda":
                why = (f"conda-only here and no wheel of {pin} for {plat.describe()}: install it on the "
                       f"target with conda (conda install {r.name}={r.local}) or %ec2 pip install a build of it")
            r.action, r.why = "skip", why
        ok = [r for r in rows if r.action == "install"]
        if not ok:
            return "-"
        files = sorted({paths[f"{r.name}=={r.local}"] for r in ok})
        total = sum(p.stat().st_size for p in files)
        update, close = progress.bar(total, f"ship wheels to {self.transport.host.alias}", show_progress)
        try:
            self.target.ship(files, update)
        finally:
            close()
        tool = self.target.install({r.name: r.local for r in ok}, shipped=True)
        for r in ok:
            r.action, r.why = "installed", (r.why or f"shipped wheel ({tool})")
        return tool

    # -- per job -------------------------------------------------------------------------------
    def ensure(self, code: str, streams: Iterable[Any], mode: str, offline: bool, show_progress: bool,
               extra: Iterable[str] = ()) -> None:
        """Make the target able to run ``code`` and load the pickles in ``streams``."""
        streams = list(streams)
        code_mods = needs.needed_modules(code, (), extra)
        pickle_mods = needs.needed_modules("", streams)
        if not code_mods and not pickle_mods:
            return  # stdlib and local modules only: nothing to look up
        env = localenv.current()
        roots = env.dists_for_modules(code_mods | pickle_mods)
        if not roots:
            return
        key = (mode, frozenset(roots))
        with self.lock:
            if self._checked.get(key) and self.target.facts is not None:
                return  # warm: nothing changed since this set was found complete
            dists = env.closure(roots)
            rows = self.plan(dists, mode)
            self.apply(rows, offline=offline, show_progress=show_progress)
            skipped = [r for r in rows if r.action == "skip"]
            skew = [r for r in rows if r.action == "skew"]
            if skew:
                sig = tuple((r.name, r.local, r.target) for r in skew)
                if sig not in self.warned:
                    self.warned.add(sig)
                    notify("version skew on " + self.transport.name + ": "
                           + ", ".join(f"{r.name} {r.target} there, {r.local} here" for r in skew)
                           + " (package_sync='exact' installs the local versions)", warning=True)
            if skipped:
                pickle_dists = {d.name for d in env.closure(frozenset(env.dists_for_modules(pickle_mods)))}
                fatal = [r for r in skipped if r.name in pickle_dists]
                text = "; ".join(f"{r.name}=={r.local}: {r.why}" for r in skipped)
                if fatal:
                    raise PackageSyncError(
                        f"the values sent need {', '.join(r.name for r in fatal)}, which cannot be installed "
                        f"on {self.transport.name} -- nothing was uploaded. {text}")
                notify(f"not installed on {self.transport.name}: {text}", warning=True)
            else:
                self._checked[key] = True


_SYNCERS: dict[tuple[str, str], Syncer] = {}
_SYNCERS_LOCK = threading.Lock()


def supported(transport: Any) -> bool:
    """Whether package sync applies: every target but the local one (which runs this very interpreter)."""
    return not transport.is_local


def syncer(transport: Any) -> Syncer:
    key = (transport.name, transport.root)
    with _SYNCERS_LOCK:
        s = _SYNCERS.get(key)
        if s is None or s.transport is not transport:
            if s is not None:
                s.transport = transport
                s.target.transport = transport
            else:
                s = _SYNCERS[key] = Syncer(transport)
        return s


def invalidate(transport: Any) -> None:
    s = _SYNCERS.get((transport.name, transport.root))
    if s is not None:
        s.invalidate()


def before_upload(remote: Any, code: str = "", streams: Iterable[Any] = (), extra: Iterable[str] = ()) -> None:
    """The hook that :class:`~remotemagic.api.Remote` calls before it uploads a job's values."""
    mode = getattr(remote, "package_sync", "auto")
    if mode == "off" or not supported(remote.transport):
        return
    if mode not in MODES:
        raise ValueError(f"package_sync must be one of {', '.join(MODES)}, not {mode!r}")
    try:
        syncer(remote.transport).ensure(code, streams, mode, getattr(remote, "offline_install", False),
                                        getattr(remote, "show_progress", True), extra)
    except TargetError as exc:
        raise PackageSyncError(str(exc)) from None


def sync_rows(remote: Any, names: Iterable[str] | None = None, *, all: bool = False, code: str = "",
              dry_run: bool = False) -> list[Row]:
    """``%ec2 sync``: plan (and unless ``dry_run``, apply) a sync of chosen local distributions.
    ``package_sync='exact'`` on the remote also replaces versions that differ."""
    if not supported(remote.transport):
        raise ValueError(f"{remote.target} runs this kernel's own Python environment: nothing to sync")
    env = localenv.current()
    if all:
        roots = {d.name for d in env.all_dists()}
    else:
        roots = env.dists_for_modules(needs.needed_modules(code)) if code else set()
        for n in names or ():
            key = localenv.norm(n)
            if key not in env.dists:
                raise ValueError(f"{n!r} is not installed in this kernel's environment")
            roots.add(key)
    s = syncer(remote.transport)
    mode = "exact" if getattr(remote, "package_sync", "auto") == "exact" else "auto"
    with s.lock:
        s.target.invalidate()  # a fresh look at the target
        rows = s.plan(env.closure(frozenset(roots)), mode)
        if not dry_run:
            try:
                s.apply(rows, offline=getattr(remote, "offline_install", False),
                        show_progress=getattr(remote, "show_progress", True))
            except TargetError as exc:
                raise PackageSyncError(str(exc)) from None
    return rows


LABELS = {"install": "would install", "installed": "installed", "there": "already there",
          "skew": "kept (skew)", "skip": "skipped"}


def format_rows(rows: list[Row]) -> str:
    """``%ec2 sync``'s table: one line per distribution, then a count per result."""
    if not rows:
        return "Nothing to sync."
    w = max(len(r.name) for r in rows)
    lines = [f"{'package':{w}}  {'here':12} {'target':12} {'result':14} note"]
    for r in sorted(rows, key=lambda r: (r.action, r.name)):
        label = LABELS.get(r.action, r.action)
        lines.append(f"{r.name:{w}}  {r.local:12} {r.target or '-':12} {label:14} {r.why}".rstrip())
    counts: dict[str, int] = {}
    for r in rows:
        counts[LABELS.get(r.action, r.action)] = counts.get(LABELS.get(r.action, r.action), 0) + 1
    lines.append(", ".join(f"{n} {label}" for label, n in sorted(counts.items())))
    return "\n".join(lines)


def installed_record(remote: Any) -> dict[str, Any]:
    """What package sync installed into the target's venv (its JSON record), by name."""
    if not supported(remote.transport):
        return {}
    return syncer(remote.transport).target.query().get("record") or {}
