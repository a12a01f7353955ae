"""Detached long-running processes on a target: the Dask scheduler and nannies of ``%ec2 cluster``.

A *service* lives under ``<root>/services/<group>/<name>/`` (a group is one cluster): its
``spec.json`` (module and arguments, run with the target's Python), ``log`` (stdout and stderr),
``state.json`` (pids, restarts, exit code) and ``lock``. Files the group's services share (TLS
certificates and keys, the scheduler file) are in ``<root>/services/<group>/files/``, written
0600 in 0700 folders, never on a command line.

Each service runs under a small *supervisor* -- ``python -m remotemagic_agent.services DIR`` --
started with ``start_new_session`` (its own process group), so it survives the agent, the SSH
link and the notebook's kernel. The supervisor holds ``lock`` (``flock``) for its whole life, so
"alive" is "the lock is taken" (no pid reuse to fool it), runs the service as its child and
starts it again if a signal killed it (SIGKILL, the OOM killer) -- at most ``max_restarts``
times. A clean exit (the scheduler's idle timeout, a nanny told to close) ends the service. A
stop writes ``stopping``, then SIGTERM and after ``grace`` SIGKILL to the whole process group.

Standard library only: this module is shipped with the agent.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

from . import files
from . import protocol as P

STOPPING = "stopping"
START_TIMEOUT = 30.0
KILL_WAIT = 10.0
RESTART_DELAY = 1.0
REACHABLE_WAIT = 30.0  # how long a service with restart_while_reachable waits for that address


def group_dir(root: str, group: str) -> str:
    path = os.path.join(root, "services", files.check_name("service group", group))
    files.private_dir(path)
    files.check_ours(path, "service folder")
    return path


def service_dir(root: str, group: str, name: str) -> str:
    return os.path.join(group_dir(root, group), files.check_name("service", name))


def write_files(root: str, group: str, contents: dict[str, str]) -> dict[str, str]:
    """Write the group's shared files (0600, atomically); return their absolute paths by name."""
    folder = files.private_dir(os.path.join(group_dir(root, group), "files"))
    out = {}
    for name, text in contents.items():
        path = os.path.join(folder, files.check_name("file", name))
        files.atomic_write(path, [text.encode()])
        os.chmod(path, 0o600)
        out[name] = path
    return out


def read_file(root: str, group: str, name: str) -> str | None:
    """A shared file's text (the scheduler file), or None while it does not exist."""
    path = os.path.join(group_dir(root, group), "files", files.check_name("file", name))
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def alive(sdir: str) -> bool:
    """True while the service's supervisor runs (it holds ``lock``)."""
    return files.is_locked(os.path.join(sdir, "lock"))


def start(root: str, agent_dir: str, group: str, name: str, module: str, args: list[str],
          env: dict[str, str] | None = None, max_restarts: int = 5,
          restart_while_reachable: str | None = None, reachable_via: str | None = None) -> dict[str, Any]:
    """Start ``python -m module *args`` as a supervised, detached service; return its state.
    A service of that name that is still alive is left alone (its state is returned).

    ``restart_while_reachable`` (``host:port``): also start it again after a *clean* exit while
    that address accepts connections (a Dask nanny closes itself when its scheduler's connection
    breaks; the scheduler, started again, is back at the same address). ``reachable_via``: the
    service of the same group that serves that address; when it has ended for good on this
    machine (its supervisor is gone: a clean exit, e.g. an idle scheduler), the address is not
    waited for."""
    sdir = service_dir(root, group, name)
    files.private_dir(sdir)
    if alive(sdir):
        return state(sdir, name)
    if not isinstance(module, str) or not module.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"invalid module name {module!r}")
    for name_ in ("state.json", STOPPING):
        files.remove(os.path.join(sdir, name_))
    args = [_fill_ports(str(a)) for a in args]
    spec = {"module": module, "args": args, "env": {str(k): str(v) for k, v in (env or {}).items()},
            "max_restarts": int(max_restarts), "python": sys.executable, "root": root,
            "restart_while_reachable": restart_while_reachable, "reachable_via": reachable_via}
    files.write_json(os.path.join(sdir, "spec.json"), spec)
    penv = dict(os.environ)
    penv["PYTHONPATH"] = agent_dir
    penv["PYTHONUNBUFFERED"] = "1"
    log = open(os.path.join(sdir, "log"), "ab")
    os.chmod(os.path.join(sdir, "log"), 0o600)
    proc = subprocess.Popen([sys.executable, "-m", "remotemagic_agent.services", sdir], cwd=sdir, env=penv,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    log.close()
    import threading

    threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it exits while we run
    deadline = time.monotonic() + START_TIMEOUT
    while not (files.read_json(os.path.join(sdir, "state.json")) or {}).get("child_pid"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"service {group}/{name} did not start:\n{tail(sdir)}")
        time.sleep(0.01)
    return state(sdir, name)


FREE_PORT = "{free_port}"


def _fill_ports(arg: str) -> str:
    """Each ``{free_port}`` in an argument becomes a port that is free now. The service keeps
    it across restarts (the spec holds the number), so a scheduler started again after a crash
    is where its workers and clients look for it."""
    while FREE_PORT in arg:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        arg = arg.replace(FREE_PORT, str(port), 1)
    return arg


def state(sdir: str, name: str | None = None) -> dict[str, Any]:
    st = files.read_json(os.path.join(sdir, "state.json")) or {}
    return {"name": name or os.path.basename(sdir), "alive": alive(sdir), "pid": st.get("supervisor_pid"),
            "child_pid": st.get("child_pid"), "restarts": st.get("restarts", 0), "started": st.get("started"),
            "exit": st.get("exit"), "ended": st.get("ended")}


def status(root: str, group: str) -> list[dict[str, Any]]:
    """Every service of the group, alive or not."""
    gdir = group_dir(root, group)
    return [state(os.path.join(gdir, n), n) for n in sorted(os.listdir(gdir))
            if n != "files" and os.path.isfile(os.path.join(gdir, n, "spec.json"))]


def groups(root: str) -> list[str]:
    top = os.path.join(root, "services")
    return sorted(os.listdir(top)) if os.path.isdir(top) else []


def stop(root: str, group: str, names: list[str] | None = None, grace: float = 5.0,
         remove: bool = False) -> list[str]:
    """Stop the named services of the group (default: all), SIGTERM then SIGKILL after ``grace``
    s; return the names that were running. ``remove``: delete the group's folder afterwards
    (its keys and logs) once nothing of it runs."""
    gdir = group_dir(root, group)
    chosen = names if names is not None else [s["name"] for s in status(root, group)]
    running = []
    for name in chosen:
        sdir = service_dir(root, group, name)
        if not os.path.isdir(sdir):
            continue
        files.atomic_write(os.path.join(sdir, STOPPING), [b""], durable=False)
        st = files.read_json(os.path.join(sdir, "state.json")) or {}
        if alive(sdir) and st.get("supervisor_pid"):
            running.append(name)
            _signal_group(int(st["supervisor_pid"]), signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name in running:
        sdir = service_dir(root, group, name)
        while alive(sdir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(sdir):
            st = files.read_json(os.path.join(sdir, "state.json")) or {}
            _signal_group(int(st["supervisor_pid"]), signal.SIGKILL)
            kill_deadline = time.monotonic() + KILL_WAIT
            while alive(sdir) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
    if remove and not any(alive(os.path.join(gdir, n)) for n in os.listdir(gdir) if n != "files"):
        shutil.rmtree(gdir, ignore_errors=True)
    return running


def tail(sdir: str, lines: int = 40) -> str:
    text = files.tail(os.path.join(sdir, "log"), lines)
    return "" if text is None else text


def logs(root: str, group: str, name: str, lines: int = 40) -> str:
    sdir = service_dir(root, group, name)
    if not os.path.isdir(sdir):
        raise KeyError(f"no service {name!r} in {group}")
    return tail(sdir, lines)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the supervisor leads its own session and process group
    except (ProcessLookupError, PermissionError):
        pass


# -- the supervisor ---------------------------------------------------------------------------
def supervise(sdir: str) -> int:
    """Run the service in ``sdir`` as a child; start it again after a death by signal."""
    lock = open(os.path.join(sdir, "lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("another supervisor runs this service", flush=True)
        return 1
    spec = files.read_json(os.path.join(sdir, "spec.json"))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the agent's folder: not the service's business
    env.update(spec.get("env") or {})
    env["REMOTEMAGIC_ROOT"] = spec["root"]  # the scheduler's preload marks the target busy under it
    argv = [spec["python"], "-m", spec["module"], *spec["args"]]
    child: list[subprocess.Popen] = []
    stopping = [False]

    def on_term(signum: int, frame: Any) -> None:
        stopping[0] = True
        for c in child:
            try:
                c.send_signal(signal.SIGTERM)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    gone = _ended_sibling(sdir, spec.get("reachable_via"))
    info: dict[str, Any] = {"supervisor_pid": os.getpid(), "restarts": 0, "started": time.time()}
    rc = 0
    while True:
        proc = subprocess.Popen(argv, cwd=sdir, env=env, stdin=subprocess.DEVNULL)
        child[:] = [proc]
        info["child_pid"] = proc.pid
        files.write_json(os.path.join(sdir, "state.json"), info)
        rc = proc.wait()
        stopped = stopping[0] or os.path.exists(os.path.join(sdir, STOPPING))
        if stopped or info["restarts"] >= int(spec.get("max_restarts", 0)):
            break
        if rc < 0:
            why = f"died of signal {-rc}"
        elif spec.get("restart_while_reachable") and _reachable(spec["restart_while_reachable"], stopping, gone):
            why = f"exited ({rc}) while {spec['restart_while_reachable']} answers"
        else:
            if spec.get("restart_while_reachable") and gone():
                print(f"[remotemagic] {spec['module']} exited ({rc}); {spec['reachable_via']} has ended here: "
                      f"not waiting for {spec['restart_while_reachable']}", flush=True)
            break
        info["restarts"] += 1
        print(f"[remotemagic] {spec['module']} {why}: starting it again "
              f"({info['restarts']}/{spec.get('max_restarts')})", flush=True)
        time.sleep(RESTART_DELAY)
        if stopping[0] or os.path.exists(os.path.join(sdir, STOPPING)):  # a stop came meanwhile
            break
    info.update(exit=rc, ended=time.time())
    files.write_json(os.path.join(sdir, "state.json"), info)
    return 0


def _ended_sibling(sdir: str, name: str | None) -> Callable[[], bool]:
    """Whether service ``name`` of the same group has ended for good here (its supervisor wrote
    its end and is gone); never, when there is no such service on this machine."""
    sibling = os.path.join(os.path.dirname(sdir), name) if name else None

    def ended() -> bool:
        if sibling is None or not os.path.isfile(os.path.join(sibling, "spec.json")):
            return False
        return bool((files.read_json(os.path.join(sibling, "state.json")) or {}).get("ended")) and not alive(sibling)
    return ended


def _reachable(address: str, stopping: list[bool], gone: Callable[[], bool] = lambda: False,
               wait: float = REACHABLE_WAIT) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``wait`` seconds (tried each second);
    not waited for once ``gone()`` says the service behind it has ended for good."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + wait
    while not stopping[0] and not gone():
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
    return False


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(supervise(sys.argv[1]))


# -- the wire operations (dispatched by server.HANDLERS) -----------------------------------------
def op_files(agent: Any, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return {"paths": write_files(agent.root, req["group"], req.get("files") or {}),
            "group_dir": group_dir(agent.root, req["group"])}


def op_start(agent: Any, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return start(agent.root, agent.agent_dir, req["group"], req["name"], req["module"], list(req.get("args") or []),
                 req.get("env"), int(req.get("max_restarts", 5)), req.get("restart_while_reachable"),
                 req.get("reachable_via"))


def op_status(agent: Any, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    if req.get("group") is None:
        return {"groups": groups(agent.root)}
    return {"services": status(agent.root, req["group"])}


def op_stop(agent: Any, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return {"stopped": stop(agent.root, req["group"], req.get("names"), float(req.get("grace", 5.0)),
                            bool(req.get("remove")))}


def op_logs(agent: Any, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return {"text": logs(agent.root, req["group"], req["name"], int(req.get("lines", 40)))}


def op_read(agent: Any, rid: int, req: dict[str, Any]) -> dict[str, Any]:
    return {"text": read_file(agent.root, req["group"], req["name"])}


HANDLERS = {
    P.OP_SERVICE_FILES: op_files, P.OP_SERVICE_START: op_start, P.OP_SERVICE_STATUS: op_status,
    P.OP_SERVICE_STOP: op_stop, P.OP_SERVICE_LOGS: op_logs, P.OP_SERVICE_READ: op_read,
}
"""The service ops and their handlers (``handler(agent, rid, request)``, as in :mod:`.server`)."""
