"""The ``%ec2 cluster`` command: start, status, scale, stop and logs of the kernel's Dask cluster.

``Ec2Magics._cmd_cluster`` only delegates here (:func:`handle`); the cluster of a kernel is kept
on the magics object (``_dask_cluster``). While one runs, the notebook's local modules are
registered for pickling by value before every cell, so functions from them reach the workers.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from IPython.core.error import UsageError

from . import ClusterError, start_hosts, start_local
from .core import Cluster

log = logging.getLogger(__name__)

ATTR = "_dask_cluster"
USAGE = """%ec2 cluster start --local N | --hosts A,B,C [--workers N] | -n N [--type T] [--spot]
                  [--client NAME] [--threads T]
%ec2 cluster status | scale N | stop | logs [scheduler|w0|w1...] [--lines N]"""


def current(magics: Any) -> Cluster | None:
    c = getattr(magics, ATTR, None)
    return c if c is not None and not c.stopped else None


def handle(magics: Any, args: argparse.Namespace) -> Any:
    try:
        return ACTIONS[args.action](magics, args)
    except (ClusterError, ValueError, KeyError) as exc:
        raise UsageError(f"%ec2 cluster {args.action}: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None


def _need(magics: Any) -> Cluster:
    c = current(magics) or _reattach(magics)
    if c is None:
        raise UsageError("no cluster runs in this kernel: %ec2 cluster start --local N (or --hosts, or -n N)")
    return c


def _reattach(magics: Any) -> Cluster | None:
    """A cluster started by an earlier kernel that still runs: connect to it again (its
    members, forwards and a client bound to ``client``)."""
    from .. import notices, state
    from . import records

    root = state.state_dir()
    for rec in records.running(root):
        try:
            c = records.reattach(rec, root)
        except Exception as exc:
            log.info("cannot re-attach to cluster %s: %s", rec.get("id"), exc)
            continue
        scheduler = c._services(c.primary).get("scheduler", {})
        if not scheduler.get("alive"):  # it stopped itself (idle) or died: clean up what is left
            c.stop()
            continue
        setattr(magics, ATTR, c)
        if "client" not in magics.shell.user_ns:
            magics.shell.user_ns["client"] = c.connect()
        _watch_local_modules(magics.shell, True)
        notices.notify(f"re-attached to cluster {c.id} (started by an earlier kernel; scheduler {c.address})"
                       + ("; 'client' is its distributed.Client" if magics.shell.user_ns.get("client") is c.client
                          else ""), level="info", logger=log)
        return c
    return None


def _start(magics: Any, args: argparse.Namespace) -> None:
    running = current(magics) or _reattach(magics)
    if running is not None:
        raise UsageError(f"cluster {running.id} runs already: %ec2 cluster stop it first")
    kinds = [k for k in ("local", "hosts", "instances") if getattr(args, k)]
    if len(kinds) != 1:
        raise UsageError("%ec2 cluster start: give exactly one of --local N, --hosts A,B,C or -n N\n" + USAGE)
    if not args.client.isidentifier():
        raise UsageError(f"--client {args.client!r} is not a variable name")
    idle = float(getattr(magics, "idle_stop_minutes", 0) or 0)
    if args.local:
        remote = magics.get_remote()
        own = not remote.transport.is_local  # the current target is not this machine: one of the cluster's own
        if own:
            remote = magics._connect("local", None, None, None)
        try:
            c = start_local(args.local, remote=remote, nthreads=args.threads, idle_stop_minutes=idle)
        except BaseException:
            if own:
                remote.close()
            raise
        if own:
            c.owned.append(remote)
    elif args.hosts:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        c = start_hosts(hosts, primary=magics.get_remote(), n=args.workers, nthreads=args.threads,
                        idle_stop_minutes=idle, code=_notebook_code(magics), **_ssh_options(magics))
    else:
        from . import ec2

        c = ec2.start_ec2(magics, args.instances, instance_type=args.instance_type, spot=args.spot,
                          nthreads=args.threads, idle_stop_minutes=idle)
    setattr(magics, ATTR, c)
    magics.shell.user_ns[args.client] = c.connect()
    _watch_local_modules(magics.shell, True)
    print(f"Cluster {c.id}: {c.n} worker(s), scheduler {c.address} (on {c.primary.remote.target}); "
          f"'{args.client}' is its distributed.Client" + (f"; dashboard {c.dashboard}" if c.dashboard else ""))
    if idle:
        print(f"It stops after {idle:g} minutes with no tasks (Ec2Magics.idle_stop_minutes).")


def _ssh_options(magics: Any) -> dict[str, Any]:
    import os

    opts: dict[str, Any] = {"ssh_config": os.path.expanduser(magics.ssh_config), "python": magics.remote_python,
                            "trust_on_first_use": magics.trust_on_first_use}
    if magics.known_hosts:
        opts["known_hosts"] = os.path.expanduser(magics.known_hosts)
    if magics.remote_root:
        opts["root"] = magics.remote_root
    return opts


def _notebook_code(magics: Any) -> str:
    """The notebook's import lines: their packages go to every member too."""
    lines = []
    for cell in magics.shell.user_ns.get("In", []) or []:
        lines += [ln for ln in str(cell).splitlines() if ln.lstrip().startswith(("import ", "from "))]
    return "\n".join(ln.strip() for ln in lines)


def _status(magics: Any, args: argparse.Namespace) -> None:
    print(format_status(_need(magics).status()))


def format_status(st: dict[str, Any]) -> str:
    def gib(n: Any) -> str:
        return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "-"

    head = [f"Cluster {st['id']} ({st['kind']}): {len(st['workers'])} of {st['wanted']} worker(s) connected",
            f"  scheduler  {st['scheduler']}" + (" (not running)" if not st.get("scheduler_alive", True) else "")
            + (f", here {st['scheduler_here']}" if st.get("scheduler_here") not in (None, st["scheduler"]) else ""),
            f"  dashboard  {st['dashboard'] or '- (install bokeh for it)'}"]
    if st.get("hourly") is not None:
        head.append(f"  cost       ${st['hourly']:.3f}/h" + ("" if st.get("hourly_complete") else " (where known)"))
    if st.get("error"):
        head.append(f"  error      {st['error']}")
    head += [f"  instances  {line}" for line in st.get("instances") or []]
    rows = [("worker", "threads", "memory", "limit", "running", "restarts")]
    services = st.get("services") or {}
    for w in st["workers"]:
        svc = services.get(str(w["name"]).rsplit("-", 1)[-1], {})
        rows.append((str(w["name"]).rsplit("-", 1)[-1], str(w["threads"]), gib(w["memory"]), gib(w["memory_limit"]),
                     str(w["running"]), str(svc.get("restarts", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    down = [n for n, s in services.items() if not s.get("alive")]
    tail = [f"  not running: {', '.join(sorted(down))}"] if down else []
    return "\n".join(head + table + tail)


def _scale(magics: Any, args: argparse.Namespace) -> None:
    c = _need(magics)
    try:
        n = int(args.value or "")
    except ValueError:
        raise UsageError("%ec2 cluster scale N: N is the number of workers") from None
    c.scale(n)
    print(f"Cluster {c.id}: {n} worker(s)")


def _stop(magics: Any, args: argparse.Namespace) -> None:
    c = _need(magics)
    c.stop()
    _watch_local_modules(magics.shell, False)
    print(f"Cluster {c.id} stopped" + (" (its worker instances are terminating)" if c.ec2 is not None else ""))


def _logs(magics: Any, args: argparse.Namespace) -> None:
    c = _need(magics)
    print(c.logs(args.value or "scheduler", args.lines))


ACTIONS = {"start": _start, "status": _status, "scale": _scale, "stop": _stop, "logs": _logs}


def _register_local_modules(*_: Any) -> None:
    from .. import values

    values.register_local_modules()


def _watch_local_modules(shell: Any, on: bool) -> None:
    """Before every cell, register the notebook's local modules for pickling by value."""
    events = getattr(shell, "events", None)
    if events is None:
        return
    registered = _register_local_modules in events.callbacks.get("pre_run_cell", [])
    if on and not registered:
        events.register("pre_run_cell", _register_local_modules)
    elif not on and registered:
        events.unregister("pre_run_cell", _register_local_modules)
