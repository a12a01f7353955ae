"""How Dask's own processes are started on a target: module, arguments and environment.

The scheduler is ``python -m distributed.cli.dask_scheduler`` and each worker a nanny,
``python -m distributed.cli.dask_worker --nanny``, both run by the target's venv Python as
supervised services of our agent (``remotemagic/agent/services.py``). Arguments name only
*paths* of the TLS files (written 0600 by the agent); encryption is required through Dask's
configuration in the environment. A preload (``remotemagic_preload.py``) makes a target with
running Dask tasks count as busy for the instance's idle auto-stop (``<root>/activity``).
"""

from __future__ import annotations

SCHEDULER_MODULE = "distributed.cli.dask_scheduler"
WORKER_MODULE = "distributed.cli.dask_worker"
SCHEDULER_FILE = "scheduler.json"
PRELOAD_FILE = "remotemagic_preload.py"
SCHEDULER = "scheduler"
#: a nanny whose scheduler is gone for this long exits (its supervisor does not restart a clean exit)
DEATH_TIMEOUT = "120s"

PRELOAD = '''"""remotemagic: while Dask tasks run here, the target counts as busy
(idle auto-stop reads <root>/activity)."""
import os

from tornado.ioloop import PeriodicCallback

EVERY_MS = int(os.environ.get("REMOTEMAGIC_ACTIVITY_EVERY_MS") or 30_000)


def _busy(obj):
    if hasattr(obj, "queued") and hasattr(obj, "workers"):  # the scheduler
        return bool(obj.queued or obj.unrunnable or any(ws.processing for ws in obj.workers.values()))
    state = getattr(obj, "state", None)  # a worker
    return bool(state is not None and (state.executing or state.long_running))


def dask_setup(obj):
    root = os.environ.get("REMOTEMAGIC_ROOT")
    if not root:
        return
    path = os.path.join(root, "activity")

    def touch():
        if not _busy(obj):
            return
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            pass

    callback = PeriodicCallback(touch, EVERY_MS)
    callback.start()
    obj.periodic_callbacks["remotemagic-activity"] = callback
'''


#: how often (ms) the preload marks a busy target as in use (the idle check runs every minute)
ACTIVITY_EVERY_MS = 30_000


def environment() -> dict[str, str]:
    """Dask configuration every member gets: TLS only; and the preload's interval."""
    return {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "True",
            "REMOTEMAGIC_ACTIVITY_EVERY_MS": str(int(ACTIVITY_EVERY_MS))}


def scheduler_args(paths: dict[str, str], host: str, idle_minutes: float) -> list[str]:
    """Arguments of the scheduler: TLS on ``host`` (a free port), dashboard on 127.0.0.1 only."""
    # {free_port}: chosen by the agent once, kept when the supervisor starts the scheduler again
    args = ["--host", host, "--port", "{free_port}", "--protocol", "tls",
            "--tls-ca-file", paths["ca.pem"], "--tls-cert", paths["scheduler.pem"], "--tls-key", paths["scheduler.key"],
            "--scheduler-file", paths[SCHEDULER_FILE], "--preload", paths[PRELOAD_FILE]]
    # the HTTP server (health, metrics; the dashboard itself when bokeh is installed) on 127.0.0.1 only
    args += ["--dashboard-address", "127.0.0.1:{free_port}"]
    if idle_minutes and idle_minutes > 0:
        args += ["--idle-timeout", f"{float(idle_minutes) * 60:g}s"]
    return args


def worker_args(paths: dict[str, str], scheduler: str, host: str, name: str, nthreads: int,
                memory_limit: str = "auto") -> list[str]:
    """Arguments of one nanny with one worker process, reachable (TLS) at ``host``."""
    return [scheduler, "--nanny", "--nworkers", "1", "--nthreads", str(int(nthreads)), "--name", name,
            "--host", host, "--protocol", "tls", "--memory-limit", memory_limit,
            "--dashboard-address", "127.0.0.1:0",  # its HTTP server (health, metrics): loopback only
            "--tls-ca-file", paths["ca.pem"], "--tls-cert", paths["worker.pem"], "--tls-key", paths["worker.key"],
            "--death-timeout", DEATH_TIMEOUT, "--preload", paths[PRELOAD_FILE]]
