"""Local modules of the notebook travel to Dask's scheduler and workers by value.

``values.register_local_modules()`` registers the notebook's own modules (files beside it, not
installed packages) with cloudpickle's ``register_pickle_by_value``. Dask, though, pickles a
task graph with plain ``pickle`` first and switches to cloudpickle only when the bytes mention
``__main__`` or the *top-level* object's module is registered -- a function of ``helpers.py``
inside a graph would go by reference, and the scheduler (which unpickles graphs) and the workers
have no ``helpers``. :func:`install` wraps Dask's ``dumps`` in this process so that bytes naming
a module registered by value are pickled again with cloudpickle. Nothing changes on the members.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
_installed = False


def _wrap(original: Any) -> Any:
    import cloudpickle  # type: ignore[import-untyped]

    def dumps(x: Any, *, buffer_callback: Any = None, protocol: Any = None) -> bytes:
        buffers: list[Any] = []
        kw: dict[str, Any] = {"protocol": protocol} if protocol else {}
        result = original(x, buffer_callback=buffers.append if buffer_callback is not None else None, **kw)
        registered = cloudpickle.list_registry_pickle_by_value()
        if registered and any(name.encode() in result for name in registered):
            buffers.clear()
            result = cloudpickle.dumps(x, protocol=protocol or 5,
                                       **({"buffer_callback": buffers.append} if buffer_callback is not None else {}))
        if buffer_callback is not None:
            for b in buffers:
                buffer_callback(b)
        return result

    dumps.__wrapped__ = original  # type: ignore[attr-defined]
    return dumps


def install() -> None:
    """Wrap ``distributed``'s pickling in this process (idempotent)."""
    global _installed
    if _installed:
        return
    import distributed.client
    import distributed.protocol.pickle as dpickle

    wrapped = _wrap(dpickle.dumps)
    dpickle.dumps = wrapped
    if getattr(distributed.client, "dumps", None) is not None:
        distributed.client.dumps = wrapped
    _installed = True
    log.debug("distributed pickling: local modules go by value")
