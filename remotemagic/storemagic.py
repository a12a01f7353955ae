"""``%ec2_store``: IPython's ``%store``, with the values kept on the target.

The magic method on :class:`remotemagic.magics.Ec2Magics` parses nothing itself: it hands the
line, the way to the current target and this kernel's namespace to :func:`ec2_store`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from . import api, errors, magic_parsers, tables
from .agent import files
from .render import Renderer


def ec2_store(line: str, get_remote: Callable[[], api.Remote], ns: dict[str, Any]) -> None:
    """Run one ``%ec2_store`` line against the target ``get_remote()`` and the namespace ``ns``."""
    args = magic_parsers.parse_store(line)
    if args is None:  # -h: the help is printed
        return
    remote = get_remote()
    if args.z:
        deleted = remote.store_clear()
        print(f"Deleted {len(deleted)} stored value(s)")
    elif args.d:
        _delete(remote, args.d)
    elif args.remote:
        _remote_namespace(remote, args)
    elif args.r:
        _restore(remote, args.names, ns)
    elif not args.names:
        print(tables.stored_values(remote.target, remote.store_list()))
    else:
        _store(remote, args.names, ns)


def _delete(remote: api.Remote, names: list[str]) -> None:
    for name in names:
        try:
            remote.store_delete(name)
        except KeyError:
            raise UsageError(f"Can't delete variable '{name}': it is not stored") from None


def _restore(remote: api.Remote, names: list[str], ns: dict[str, Any]) -> None:
    for name in names or [v["name"] for v in remote.store_list()]:
        try:
            ns[name] = remote.store_get(name)
        except KeyError:
            raise UsageError(f"no stored variable {name!r} (%ec2_store lists them)") from None
        print(f"Restored '{name}' ({files.type_name(ns[name])})")


def _store(remote: api.Remote, names: list[str], ns: dict[str, Any]) -> None:
    for name in names:
        if name not in ns:
            raise UsageError(f"Unknown variable '{name}'")
    for name in names:
        try:
            meta = remote.store_put(name, ns[name])
        except errors.UnpicklableValueError as exc:
            raise UsageError(str(exc)) from None
        print(f"Stored '{name}' ({meta.get('type', files.type_name(ns[name]))})")


def _remote_namespace(remote: api.Remote, args: argparse.Namespace) -> None:
    """``--remote``: store from, or restore into, the remote session's namespace."""
    if not args.names:
        raise UsageError("--remote needs the names of the remote variables")
    if args.r:
        st = remote.restore_to_session(args.names, args.session)
        for name in st.get("restored", []):
            print(f"Restored '{name}' into the remote session")
        if st.get("missing"):
            raise UsageError("not stored: " + ", ".join(st["missing"]))
        return
    st = remote.store_from_session(args.names, args.session, on_event=Renderer())
    if st.get("missing"):
        raise UsageError("Unknown variable in the remote session: " + ", ".join(st["missing"]))
