"""Which top-level modules a job needs: the cell's imports and the modules its pickles name.

A pickle (protocol 4/5) names a class or function as two short strings and ``STACK_GLOBAL``
(``numpy._core.numeric`` ``_frombuffer``); cloudpickle names a module a function uses by
reference as the argument of ``subimport`` (a short string then ``TUPLE1``). Both are found
with one regular expression over the pickle stream (the out-of-band buffers, i.e. the bulk of
an array, are not scanned): ~1 ms per MB of pickle stream, nothing for a big array.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

from .. import values

STDLIB = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {"__main__", "builtins"}

# SHORT_BINUNICODE <len> <dotted name> [MEMOIZE] then SHORT_BINUNICODE <qualname> [MEMOIZE]
# STACK_GLOBAL, or TUPLE1 (cloudpickle's subimport("name")).
_GLOBAL = re.compile(
    rb"\x8c(.)([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\x94?"
    rb"(?:\x8c(.)[^\x93]*?\x94?\x93|\x85)",
    re.S,
)


def pickle_modules(stream: bytes | bytearray | memoryview) -> set[str]:
    """Top-level module names that a pickle stream refers to."""
    data = bytes(stream)
    out: set[str] = set()
    for m in _GLOBAL.finditer(data):
        name = m.group(2)
        if m.group(1)[0] != len(name):
            continue
        if m.group(3) is not None:  # a qualname: its declared length must end right before MEMOIZE/STACK_GLOBAL
            rest = data[m.end(2):m.end()]
            start = rest.index(b"\x8c") + 2
            tail = rest[start:].rstrip(b"\x93").rstrip(b"\x94")
            if len(tail) != m.group(3)[0]:
                continue
        out.add(name.split(b".")[0].decode("ascii"))
    return out


def code_modules(code: str) -> set[str]:
    """Top-level modules a cell imports (IPython syntax such as ``!cmd`` is transformed first)."""
    names = values.imported_names(code)
    if not names and ("import" in code):
        try:
            from IPython.core.inputtransformer2 import TransformerManager

            names = values.imported_names(TransformerManager().transform_cell(code))
        except Exception:
            names = set()
    return names


def is_local_module(name: str) -> bool:
    """A module beside the notebook (it travels by value or as source, not as a package)."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if not path:
        return False
    real = os.path.realpath(path)
    return not real.startswith(values._INSTALLED) and "site-packages" not in real


def needed_modules(code: str = "", streams: Iterable[bytes | bytearray | memoryview] = (),
                   extra: Iterable[str] = ()) -> set[str]:
    """Non-stdlib, non-local top-level modules that a job needs."""
    names = set(code_modules(code)) if code else set()
    for s in streams:
        names |= pickle_modules(s)
    names.update(extra)
    return {n for n in names if n not in STDLIB and not n.startswith("_") and not is_local_module(n)}
