"""Values on the wire: cloudpickle protocol 5 with out-of-band buffers, content-addressed.

Modules that live beside the notebook (not installed packages) are pickled *by value*, so a
class or function from your own ``helpers.py`` works on a target that has never seen the file.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import cloudpickle
import xxhash

from .agent import files
from .errors import UnpicklableValueError

_INSTALLED = tuple(
    os.path.realpath(p)
    for p in ({sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
              | {sys.prefix, sys.base_prefix})
    if p
)


def _is_local_module(module: Any) -> bool:
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return False
    real = os.path.realpath(path)
    return (not real.startswith(_INSTALLED) and "site-packages" not in real
            and not module.__name__.startswith("remotemagic"))


def register_local_modules() -> list[str]:
    """Have cloudpickle carry every imported local module by value; return their names."""
    names = []
    for name, module in list(sys.modules.items()):
        if "." in name or module is None or not _is_local_module(module):
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
            names.append(name)
        except (ValueError, TypeError):
            continue
    return names


def encode(name: str, value: Any) -> files.Encoded:
    """Pickle ``value``; an error names the variable and the reason, and nothing is sent.
    Call :func:`register_local_modules` first (once per batch of values)."""
    try:
        # xxh3-128 names the object: ~25 GB/s, so re-pushing an unchanged 1 GiB array costs
        # ~0.05 s of hashing (sha256 would take ~0.6 s); the link itself guards integrity
        return files.encode(value, cloudpickle.dumps, xxhash.xxh3_128)
    except Exception as exc:  # pickling can raise anything a __reduce__ raises
        raise UnpicklableValueError(
            f"cannot send {name!r} ({files.type_name(value)}): it cannot be pickled -- "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def decode(data: bytes | bytearray | memoryview) -> Any:
    return files.read_object(io.BytesIO(data))


MODULE_BYTES_LIMIT = 5 * 1024 * 1024


def imported_names(code: str) -> set[str]:
    """Top-level module names a cell imports (``import a.b`` -> ``a``); empty if it does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def local_module_sources(code: str) -> dict[str, str]:
    """Source of the local modules (files beside the notebook, not installed packages) that
    ``code`` imports, as ``{relative path: text}`` -- so ``import helpers`` works on a target
    that has never seen ``helpers.py``. Packages travel as all their ``.py`` files."""
    out: dict[str, str] = {}
    total = 0
    for name in sorted(imported_names(code)):
        if name in sys.builtin_module_names:
            continue
        spec = None
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            origin = spec.origin if spec is not None else None
        if not origin or not origin.endswith(".py"):
            continue
        real = os.path.realpath(origin)
        if real.startswith(_INSTALLED) or "site-packages" in real or name == "remotemagic":
            continue
        path = Path(real)
        if path.name == "__init__.py":
            root = path.parent
            files = sorted(root.rglob("*.py"))
            rel_base = root.parent
        else:
            files = [path]
            rel_base = path.parent
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            total += len(text)
            if total > MODULE_BYTES_LIMIT:
                return out  # a "local module" this large is not a helper file; leave the rest
            out[str(f.relative_to(rel_base))] = text
    return out
