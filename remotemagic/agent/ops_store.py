"""Op handlers for values: the pushed-object cache (``objects/``) and the store (``store/``).

``objects/<name>`` holds pushed values by content (object files named by their xxh3-128): the
client asks which it must send (``has_objects``) and keeps the cache bounded (``evict_objects``,
least recently used first). ``store/<name>.obj`` + ``.json`` are ``%ec2 store`` values, written
under ``store/.lock``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

from . import files
from . import protocol as P
from .ops_files import stream_file
from .protocol import RequestError

if TYPE_CHECKING:
    from .server import Agent


def has_objects(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """Which of ``hashes`` are missing (the others count as just used)."""
    missing = []
    for digest in req.get("hashes", []):
        path = agent.path("objects", P.check_object_name(digest))
        if os.path.exists(path):
            os.utime(path)
        else:
            missing.append(digest)
    return {"missing": missing}


EVICTED_PREFIX = ".evicted-"  # an object on its way out: no longer in the cache, its blocks not yet freed


def evict_objects(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """Drop least recently used objects until the cache is under ``limit`` bytes.

    An evicted object is renamed out of the cache at once (``has_objects`` no longer finds it)
    and unlinked by a thread after the answer: freeing a large file's blocks takes time (0.4 s
    for 512 MiB here) that the push waiting for this answer need not spend. That thread also
    unlinks what an agent that died meanwhile left renamed."""
    limit = int(req["limit"])
    odir = agent.path("objects")
    entries = []
    leftovers = False
    for name in os.listdir(odir):
        if name.startswith("."):
            leftovers = leftovers or name.startswith(EVICTED_PREFIX)
            continue
        st = os.stat(os.path.join(odir, name))
        entries.append((st.st_mtime, st.st_size, name))
    entries.sort()
    total = sum(e[1] for e in entries)
    removed = 0
    keep = set(req.get("keep", []))
    for _, size, name in entries:
        if total <= limit:
            break
        if name in keep:
            continue
        # (a name of its own: one evicted before and not unlinked yet is not freed here)
        os.replace(os.path.join(odir, name), os.path.join(odir, f"{EVICTED_PREFIX}{name}.{os.urandom(4).hex()}"))
        total -= size
        removed += 1
    if removed or leftovers:
        threading.Thread(target=_unlink_evicted, args=(odir,), name="evicted-unlink", daemon=True).start()
    return {"removed": removed, "total": total}


def _unlink_evicted(odir: str) -> None:
    for name in os.listdir(odir):
        if name.startswith(EVICTED_PREFIX):
            try:
                os.unlink(os.path.join(odir, name))
            except OSError:
                pass  # (another agent's thread got there first)


def store_put(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """Store an uploaded object under ``name`` (a hard link: no copy)."""
    name = P.check_identifier(req["name"])
    src = agent.path("objects", P.check_object_name(req["hash"]))
    if not os.path.exists(src):
        raise RequestError(f"value for {name!r} was not uploaded", "MissingObject")
    meta = dict(req.get("meta") or {})
    meta.update({"name": name, "stored": time.time(), "size": os.path.getsize(src)})
    with files.store_lock(agent.root):
        files.link_or_copy(src, agent.path("store", name + ".obj"))
        files.write_json(agent.path("store", name + ".json"), meta)
    return meta


def store_list(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    out = []
    sdir = agent.path("store")
    for fname in sorted(os.listdir(sdir)):
        if fname.endswith(".obj") and not fname.startswith("."):
            name = fname[:-4]
            meta = files.read_json(os.path.join(sdir, name + ".json"), {}) or {"name": name}
            meta.setdefault("size", os.path.getsize(os.path.join(sdir, fname)))
            out.append(meta)
    return {"values": out}


def store_get(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    name = P.check_identifier(req["name"])
    path = agent.path("store", name + ".obj")
    if not os.path.exists(path):
        raise RequestError(f"no stored value named {name!r}", "KeyError")
    result = stream_file(agent, rid, path, 0, agent.packer(req), pickle=True)
    result["meta"] = files.read_json(agent.path("store", name + ".json"), {})
    return result


def store_delete(agent: Agent, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    """Delete ``names`` (None: every stored value)."""
    names = req.get("names")
    with files.store_lock(agent.root):
        if names is None:
            names = [f[:-4] for f in os.listdir(agent.path("store")) if f.endswith(".obj") and not f.startswith(".")]
        for name in names:
            P.check_identifier(name)
            path = agent.path("store", name + ".obj")
            if not os.path.exists(path):
                raise RequestError(f"no stored value named {name!r}", "KeyError")
            os.unlink(path)
            files.remove(agent.path("store", name + ".json"))
    return {"deleted": names}


HANDLERS = {
    P.OP_HAS_OBJECTS: has_objects,
    P.OP_EVICT_OBJECTS: evict_objects,
    P.OP_STORE_PUT: store_put,
    P.OP_STORE_LIST: store_list,
    P.OP_STORE_GET: store_get,
    P.OP_STORE_DELETE: store_delete,
}
