"""The package's layers import one way (docs/architecture.md): magics -> api -> jobs / transfer /
connection -> transport -> agent. Nothing below ``api`` imports it (or the magics above it)."""

from __future__ import annotations

import ast
from pathlib import Path

import remotemagic

PKG = Path(remotemagic.__file__).parent

#: modules (dotted, relative to the package) and packages that sit below ``api``
BELOW_API_MODULES = {"jobs", "transfer", "connection", "state", "values", "notices", "render", "retry", "errors",
                     "reclaim", "progress", "cellsync", "notebook", "fidelity"}
BELOW_API_PACKAGES = {"agent", "transport", "providers", "envsync"}
ABOVE = {"api", "magics"}
#: the target kinds build a ``Remote`` (they sit beside ``connecting``, above api): the registry,
#: each kind's module and the SSH fleet (which holds a Remote per host). The providers' machine
#: management (``providers.base``, ``providers.ec2.*``) stays below api.
TARGET_KIND_MODULES = {"providers.registry", "providers.local", "providers.ssh"}
TARGET_KIND_PACKAGES = {"providers.fleet"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, name: str) -> set[str]:
    """The package modules ``path`` (module ``name``) imports, dotted relative to the package."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    got: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "remotemagic":
                mod = node.module.split(".")[1:]
            else:
                continue
            got.add(".".join(mod))
            got.update(".".join([*mod, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            got.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("remotemagic."))
    return got


def _below_api(name: str) -> bool:
    if name in TARGET_KIND_MODULES or name.endswith(".kind") or name.rpartition(".")[0] in TARGET_KIND_PACKAGES \
            or name in TARGET_KIND_PACKAGES:
        return False
    return name in BELOW_API_MODULES or name.split(".")[0] in BELOW_API_PACKAGES


def test_nothing_below_api_imports_it() -> None:
    checked = []
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        if not _below_api(name):
            continue
        checked.append(name)
        upward = {m for m in _imported(path, name) if m in ABOVE or m.split(".")[0] in ABOVE}
        assert not upward, f"remotemagic.{name} imports {sorted(upward)}: the layers import one way"
    assert {"jobs", "transfer", "connection"} <= set(checked)


def test_api_still_exports_what_moved_out() -> None:
    from remotemagic import api, connection, jobs

    assert api.Job is jobs.Job and api.OutputPrefetch is jobs.OutputPrefetch and api.parse_events is jobs.parse_events
    assert api.CallReader is connection.CallReader
    assert remotemagic.Job is jobs.Job and remotemagic.Remote is api.Remote
