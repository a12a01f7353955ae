"""The IPython magics: ``%ec2`` / ``%%ec2`` and ``%ec2_store``, a thin layer over :mod:`remotemagic.api`."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import logging
import math
import os
import shlex
import sys
import time
import unicodedata
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Bool, Enum, Float, Int, List, Unicode, observe

from . import api, envsync, errors, notebook, notices, state
from .agent import files
from .render import Renderer

log = logging.getLogger("remotemagic")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            raise UsageError(message)
        raise UsageError(self.format_help())


def _names(text: str | None) -> list[str]:
    # NFKC: what Python itself does to identifiers (``ℌ = 1`` binds ``H``)
    names = [unicodedata.normalize("NFKC", n.strip()) for n in (text or "").split(",") if n.strip()]
    for n in names:
        if not n.isidentifier():
            raise UsageError(f"{n!r} is not a variable name")
    return names


def _showing_notices(method: Any) -> Any:
    """Run a magic with every user notice raised meanwhile rendered in the cell's output
    (see :mod:`remotemagic.notices`)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with notices.collect(Renderer()):
            return method(self, *args, **kwargs)

    return wrapper


def _split(line: str, magic: str) -> list[str]:
    """The words of a magic line, or a UsageError saying what is wrong with its quoting."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise UsageError(f"{magic}: cannot read the line ({exc}): close the quote, or escape it with \\") from None


def _session_name(text: str) -> str:
    try:
        return files.check_name("session", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
    return value


def _parsers() -> dict[str, _Parser]:
    p: dict[str, _Parser] = {}
    use = p["use"] = _Parser(prog="%ec2 use", add_help=False)
    use.add_argument("kind", choices=["local", "ssh", "ec2"], help="where cells run")
    use.add_argument("host", nargs="?", help="ssh: an ~/.ssh/config alias or user@host[:port]; ec2: the instance name")
    use.add_argument("--root", help="the agent's folder on the target")
    use.add_argument("--session", type=_session_name, help="session (remote namespace) to use")
    use.add_argument("--python", help="ssh: the remote interpreter to build the environment from")
    use.add_argument("--workdir", help="folder on the target that cells run in and relative paths start from "
                     "(default: the home folder; for local, this kernel's folder)")
    use.add_argument("--ssh-config", help="ssh: OpenSSH config file (default: Ec2Magics.ssh_config)")
    use.add_argument("--trust-new-host", action="store_true",
                     help="ssh: accept and record the host key of a host never seen before")
    tun = p["tunnel"] = _Parser(prog="%ec2 tunnel", add_help=False)
    tun.add_argument("remote_port", nargs="?", type=int, help="port on the target")
    tun.add_argument("local_port", nargs="?", type=int, default=0, help="port here (default: a free one)")
    tun.add_argument("--close", type=int, metavar="LOCAL_PORT", help="close the tunnel on this local port")
    p["pip"] = _Parser(prog="%ec2 pip", add_help=False)
    start = p["start"] = _Parser(prog="%ec2 start", add_help=False)
    start.add_argument("--name", help="instance name (default: Ec2Magics.instance_name)")
    start.add_argument("--type", dest="instance_type", help="instance type, e.g. c7i.4xlarge")
    start.add_argument("--spot", action="store_true", help="a spot instance (stops, not terminates, when reclaimed)")
    start.add_argument("--fallback", action="store_true", help="with --spot: launch on-demand if there is no spot "
                       "capacity (a notice says so, with the price difference)")
    start.add_argument("--ami", help="AMI id or alias (ubuntu, al2023); default: current Ubuntu LTS")
    start.add_argument("--disk", type=int, dest="disk_gb", help="root volume size in GB")
    start.add_argument("--key", dest="key_name", help="EC2 key pair name (default: EC2 Instance Connect)")
    for name in ("stop", "terminate"):
        q = p[name] = _Parser(prog=f"%ec2 {name}", add_help=False)
        q.add_argument("--name", help="instance name (default: the current target)")
        if name == "terminate":
            q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    resize = p["resize"] = _Parser(prog="%ec2 resize", add_help=False)
    resize.add_argument("instance_type", help="the new instance type")
    resize.add_argument("--name", help="instance name (default: the current target)")
    run = p["run"] = _Parser(prog="%%ec2 run", add_help=False)
    run.add_argument("-i", "--push", default="", help="comma-separated local variables to send")
    run.add_argument("-o", "--pull", default="", help="comma-separated variables to bring back")
    run.add_argument("--bg", action="store_true", help="return at once; the job runs on")
    run.add_argument("--session", type=_session_name, help="session (remote namespace) to run in")
    run.add_argument("--timeout", type=_seconds, help="interrupt the job after this many seconds")
    run.add_argument("--retry", type=int, metavar="N", help="if the worker dies under the job, run it again up to N "
                     "times on a fresh worker restored from the last checkpoint (default: Ec2Magics.retries)")
    for name in ("output", "wait", "cancel"):
        q = p[name] = _Parser(prog=f"%ec2 {name}", add_help=False)
        q.add_argument("job", nargs="?" if name != "cancel" else None, help="job id or its unique end")
        if name == "wait":
            q.add_argument("--timeout", type=_seconds)
        if name == "cancel":
            q.add_argument("--kill", action="store_true", help="kill the job's worker at once (the namespace is lost)")
    push = p["push"] = _Parser(prog="%ec2 push", add_help=False)
    push.add_argument("local", help="file or folder here")
    push.add_argument("dest", nargs="?", help="where on the target (default: same name, in the session's folder)")
    pull = p["pull"] = _Parser(prog="%ec2 pull", add_help=False)
    pull.add_argument("path", help="file or folder on the target")
    pull.add_argument("local", nargs="?", help="where here (default: same name, in the current folder)")
    jobs = p["jobs"] = _Parser(prog="%ec2 jobs", add_help=False)
    jobs.add_argument("-n", type=_count, default=20, help="how many (newest last)")
    p["status"] = _Parser(prog="%ec2 status", add_help=False)
    sync = p["sync"] = _Parser(prog="%ec2 sync", add_help=False)
    sync.add_argument("packages", nargs="*", help="local distributions to sync (default: what the notebook imports)")
    sync.add_argument("--all", action="store_true", help="every distribution of this kernel's environment")
    sync.add_argument("--dry-run", action="store_true", help="show what would be installed; install nothing")
    ck = p["checkpoint"] = _Parser(prog="%ec2 checkpoint", add_help=False)
    ck.add_argument("--restore", action="store_true", help="load the last checkpoint into the session")
    ck.add_argument("--session", type=_session_name)
    ck.add_argument("--max-bytes", type=int, default=0, help="skip values whose pickle is larger (0: none)")
    restart = p["restart"] = _Parser(prog="%ec2 restart", add_help=False)
    restart.add_argument("--session", type=_session_name)
    restart.add_argument("--all", action="store_true", help="stop the workers of every session on the target")
    p["sessions"] = _Parser(prog="%ec2 sessions", add_help=False)
    # -- %ec2 cluster (issue 14): the parser lives in remotemagic/cluster/magic.py --
    from .cluster import magic as cluster_magic

    cluster_magic.add_parser(p, _Parser, _count)
    store = p["store"] = _Parser(prog="%ec2_store", add_help=False)
    store.add_argument("names", nargs="*")
    store.add_argument("-r", action="store_true", help="restore (all, or the names given)")
    store.add_argument("-d", metavar="NAME", action="append", help="delete a stored value")
    store.add_argument("-z", action="store_true", help="delete every stored value")
    store.add_argument("--remote", action="store_true",
                       help="act on the remote session's namespace instead of this kernel's")
    store.add_argument("--session", type=_session_name, help="with --remote: which session")
    return p


PARSERS = _parsers()


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    secs = (end or time.time()) - start
    return f"{secs:.1f}s" if secs < 120 else f"{secs / 60:.1f}m"


def _size(n: int | None) -> str:
    n = int(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _transfer_summary(verb: str, done: dict[str, Any]) -> str:
    text = f"{verb} {_size(done.get('bytes'))}"
    if "files" in done:
        text += f" in {done['files']} file(s)"
    if done.get("skipped"):
        text += f", {done['skipped']} unchanged file(s) skipped"
    if done.get("resumed_from"):
        text += f", resumed after {_size(done['resumed_from'])}"
    return text + f" -> {done.get('path')}"


@contextlib.contextmanager
def _transfer_errors(verb: str, path: str) -> Any:
    """A push or pull that fails on a path (missing, not allowed, a file in the way) is a
    one-line error naming it; a lost connection stays what it is."""
    try:
        yield
    except errors.ConnectionLostError:
        raise
    except (OSError, ValueError, errors.RemoteRequestError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"%ec2 {verb} {path}: {text}") from None


@magics_class
class Ec2Magics(Magics):
    """Run cells on a bigger machine. Configure with ``%config Ec2Magics.<name> = value``."""

    target = Unicode("local", help="Target used when none was chosen with %ec2 use: 'local'.").tag(config=True)
    session = Unicode("", help="Remote namespace; default: the notebook's name, else 'default'.").tag(config=True)
    local_root = Unicode("", help="Folder of the local backend (default: <state dir>/local-target).").tag(config=True)
    timeout = Float(0.0, help="Default --timeout for %%ec2 run, in seconds (0: none).").tag(config=True)
    reconnect_timeout = Float(60.0, help="How long to keep reconnecting after the link drops, in s.").tag(config=True)
    inline_limit = Int(api.INLINE_LIMIT, help="Outputs up to this size come back with the job's status.").tag(config=True)
    object_cache_limit = Int(api.OBJECT_CACHE_LIMIT, help="Bytes of pushed values the target keeps (LRU).").tag(config=True)
    checkpoint_max_bytes = Int(api.CHECKPOINT_LIMIT, help="After each cell, checkpoint the session's variables "
                               "whose pickle is at most this size (0: no automatic checkpoints).").tag(config=True)
    retries = Int(0, help="Default --retry for %%ec2 run: run a cell again (up to this many more times) when its "
                  "worker dies under it (SIGKILL, out of memory, its machine went away), first restoring the "
                  "checkpoint taken before it. Never when the cell itself raises (0: no retries).").tag(config=True)
    auto_restore = Bool(False, help="After a session's worker died (or its machine restarted), the next cell first "
                        "restores the last checkpoint and says which values came back.").tag(config=True)
    show_progress = Bool(True, help="Progress bars for transfers above 16 MiB.").tag(config=True)
    ssh_config = Unicode("~/.ssh/config", help="OpenSSH config file used to resolve SSH hosts.").tag(config=True)
    known_hosts = Unicode("", help="known_hosts file (default: UserKnownHostsFile from the SSH config, "
                          "else ~/.ssh/known_hosts).").tag(config=True)
    trust_on_first_use = Bool(False, help="Accept and record the key of an SSH host never seen before "
                              "(a changed key is always refused).").tag(config=True)
    remote_python = Unicode("python3", help="Interpreter on SSH hosts that the remote venv is built from.").tag(config=True)
    remote_root = Unicode("", help="The agent's folder on SSH hosts (default ~/.remotemagic).").tag(config=True)
    interrupt_grace = Float(1.0, help="Seconds between Ctrl-C and interrupting the remote job. Jupyter "
                            "interrupts a kernel before every restart or shutdown; if the kernel is shut "
                            "down within this time, the remote job is left running.").tag(config=True)
    worker_idle_hours = Float(api.WORKER_IDLE_HOURS, help="A session's worker exits after this many hours without a "
                              "job, checkpointing its namespace first (%ec2 checkpoint --restore brings it back; "
                              "0: never).").tag(config=True)
    stop_grace = Float(api.STOP_GRACE, help="Seconds %ec2 restart and %ec2 cancel give a job at each step (interrupt, "
                       "then SIGTERM, then SIGKILL of the worker's process group) before the next.").tag(config=True)
    instance_name = Unicode("remotemagic", help="EC2: name of the instance %ec2 start/use ec2 work on.").tag(config=True)
    instance_type = Unicode("t3.large", help="EC2: instance type for new instances.").tag(config=True)
    region = Unicode("", help="EC2: AWS region (default: boto3's chain, e.g. AWS_DEFAULT_REGION).").tag(config=True)
    profile = Unicode("", help="EC2: AWS profile (default: boto3's chain).").tag(config=True)
    ssh_cidrs = List(Unicode(), help="EC2: CIDRs allowed to reach SSH (default: this machine's public "
                     "address /32).").tag(config=True)
    idle_stop_minutes = Int(60, help="EC2: the instance stops itself after this many idle minutes "
                            "(no job, no connection); 0 disables.").tag(config=True)
    key_name = Unicode("", help="EC2: key pair for new instances (default: none, EC2 Instance Connect).").tag(config=True)
    key_file = Unicode("", help="EC2: private key of key_name (default: the SSH config's IdentityFile, "
                       "else ssh-agent).").tag(config=True)
    ami = Unicode("", help="EC2: AMI id or alias (ubuntu, al2023) for new instances.").tag(config=True)
    ec2_user = Unicode("", help="EC2: login user (default: from the AMI, ubuntu or ec2-user).").tag(config=True)
    compression = Unicode("auto", help="Compress values and files on the wire: auto (on links with a round "
                          "trip over 5 ms), zstd, zlib or none. Incompressible data is always sent raw.").tag(config=True)
    package_sync = Enum(list(envsync.MODES), default_value="auto", help="Before a cell runs on an SSH/EC2 target, install there the packages it "
                           "imports and its -i values need, at this kernel's versions: auto (keeps a different version "
                           "already there, with a warning), exact (replaces it) or off.").tag(config=True)
    offline_install = Bool(False, help="Ship wheels from here instead of letting the target use a package index "
                           "(hosts without internet are detected by themselves).").tag(config=True)

    remote: api.Remote | None = None

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self.remote = None
        #: Where cells run now: the ``_connect`` arguments of the last successful ``%ec2 use`` /
        #: ``start`` / ``resize`` (None: the configured ``target``). ``remote`` is its open
        #: connection (None until needed, or after it was closed); :meth:`_switch` sets both.
        self.where: dict[str, Any] | None = None
        #: Why the last ``%ec2 use``/``start`` failed: cells refuse to run anywhere until one succeeds.
        self.use_error: str | None = None
        self._said_default = False
        self._told: set[str] = set()  # jobs already named in the "ran while nobody watched" line

    @observe("target", "local_root")
    def _target_changed(self, change: Any) -> None:
        """Configuring another target (or local root) is choosing it: drop the current one."""
        self.close()
        self.where = None
        self.use_error = None

    @observe("worker_idle_hours")
    def _idle_changed(self, change: Any) -> None:
        if self.remote is not None:  # sent with every job: the session's worker takes it from the next one
            self.remote.worker_idle_hours = change["new"]

    @observe("auto_restore", "checkpoint_max_bytes")
    def _recovery_changed(self, change: Any) -> None:
        if self.remote is not None:  # sent with every job
            setattr(self.remote, "auto_restore" if change["name"] == "auto_restore" else "checkpoint_limit",
                    change["new"])

    @observe("package_sync", "offline_install")
    def _sync_changed(self, change: Any) -> None:
        if self.remote is not None:
            setattr(self.remote, change["name"], change["new"])

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    # -- connection ----------------------------------------------------------------------------
    def _switch(self, where: dict[str, Any] | None, remote: api.Remote | None) -> None:
        """The one place that changes where cells run (and keeps the connection just made)."""
        if self.remote is not None and self.remote is not remote:
            self.remote.close()
        self.where, self.remote, self.use_error = where, remote, None

    def _choosing(self, what: str, connect: Any) -> api.Remote:
        """Connect for ``%ec2 use``/``start``: on failure, remember why, so that cells fail with
        that reason instead of running somewhere else."""
        self.close()
        try:
            return connect()
        except BaseException as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.where, self.use_error = None, f"{what} failed ({reason})"
            raise

    def get_remote(self) -> api.Remote:
        if self.use_error is not None:
            raise UsageError(f"{self.use_error}: cells do not run anywhere else until a %ec2 use (or %ec2 start) "
                             "succeeds")
        if self.remote is None:
            if self.where is not None:
                self.remote = self._connect(**self.where)
            else:
                words = (self.target or "local").split()
                self.remote = self._connect(words[0], words[1] if len(words) > 1 else None, None, None)
                if not self._said_default:
                    self._said_default = True
                    notices.notify(f"no %ec2 use in this kernel: cells run on {self.remote.target} "
                                   f"(session '{self.remote.session}', Ec2Magics.target = {self.target!r}); "
                                   "%ec2 use picks another target", level="info", logger=log)
        return self.remote

    def _connect(self, kind: str, host: str | None, root: str | None, session: str | None,
                 python: str | None = None, trust: bool = False, ssh_config: str | None = None,
                 workdir: str | None = None, start: bool = False, launch: dict[str, Any] | None = None) -> api.Remote:
        opts: dict[str, Any] = dict(
            reconnect_timeout=self.reconnect_timeout, inline_limit=self.inline_limit,
            object_cache_limit=self.object_cache_limit, show_progress=self.show_progress,
            checkpoint_limit=self.checkpoint_max_bytes, compression=self.compression,
            worker_idle_hours=self.worker_idle_hours, package_sync=self.package_sync,
            offline_install=self.offline_install, auto_restore=self.auto_restore)
        session = session or self.session or None
        if workdir:
            opts["cwd"] = workdir
        try:
            if kind == "local":
                return api.connect("local", session=session, root=root or self.local_root or None, **opts)
            if kind == "ssh":
                if not host:
                    raise UsageError("%ec2 use ssh HOST: name the host (an ~/.ssh/config alias or user@host[:port])")
                opts.update(ssh_config=os.path.expanduser(ssh_config or self.ssh_config), python=python or self.remote_python,
                            trust_on_first_use=trust or self.trust_on_first_use)
                if self.known_hosts:
                    opts["known_hosts"] = os.path.expanduser(self.known_hosts)
                return api.connect("ssh", host=host, session=session, root=root or self.remote_root or None, **opts)
            if kind == "ec2":
                opts.update(self._ec2_options(python))
                if workdir:
                    opts["cwd"] = workdir
                opts.update(launch or {})  # --type, --ami ... of %ec2 start win over the configured defaults
                return api.connect_ec2(host or self.instance_name, session=session,
                                       root=root or self.remote_root or None, start=start, **opts)
            raise UsageError(f"unknown target kind {kind!r}: use local, ssh HOST or ec2 [NAME]")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except errors.RemoteMagicError as exc:
            if type(exc).__module__.endswith("providers.ec2"):  # AWS said no: say what and why, no traceback
                raise UsageError(f"{type(exc).__name__}: {exc}") from None
            raise

    def _ec2_options(self, python: str | None) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ssh_config": os.path.expanduser(self.ssh_config), "python": python or self.remote_python,
            "idle_stop_minutes": self.idle_stop_minutes, "instance_type": self.instance_type,
            "region": self.region or None, "profile": self.profile or None, "ssh_cidrs": list(self.ssh_cidrs) or None,
            "key_name": self.key_name or None, "key_file": os.path.expanduser(self.key_file) if self.key_file else None,
            "user": self.ec2_user or None, "ami": self.ami or None,
        }
        if self.known_hosts:
            opts["known_hosts"] = os.path.expanduser(self.known_hosts)
        return opts

    # -- %ec2 ----------------------------------------------------------------------------------
    @line_cell_magic
    @_showing_notices
    def ec2(self, line: str, cell: str | None = None) -> Any:
        """Run code on a bigger machine, keep every output.

        %ec2 use local [--root PATH] [--session S]   pick the target: the embedded local worker,
        %ec2 use ssh HOST [--python P] [--trust-new-host]   or any SSH host (~/.ssh/config alias
                             or user@host[:port]; ProxyJump, keys and known_hosts honoured)
        %%ec2 run [-i a,b] [-o c,d] [--bg] [--session S] [--timeout T]
            <code>           runs on the target; -i sends local variables, -o brings results back
        %ec2 use ec2 [NAME]  or one of our EC2 instances (running)
        %ec2 start [--name N] [--type T] [--spot] [--ami A] [--disk GB] [--key K]
                             launch (or start, or attach to) an EC2 instance and use it
        %ec2 stop | terminate [-y] | resize TYPE   the current EC2 instance
        %ec2 jobs [-n N]     jobs on the target, newest last
        %ec2 output [JOB]    show a job's complete output again (works after a kernel restart)
        %ec2 wait [JOB]      stream the rest of a job's output, then pull its -o values
        %ec2 cancel [--kill] JOB   interrupt a running job (KeyboardInterrupt there); if it still runs
                             after Ec2Magics.stop_grace s, or with --kill, kill its worker
        %ec2 status          target, sessions and recent jobs
        %ec2 tunnel [REMOTE_PORT [LOCAL_PORT]] [--close LOCAL_PORT]   forward a port (127.0.0.1 only)
        %ec2 pip install PKG ...     install into the target's Python environment
        %ec2 sync [PKG ...] [--all] [--dry-run]   put this kernel's packages (what the notebook
                             imports, the ones named, or --all) on the target at the local versions
        %ec2 push LOCAL [DEST]   copy a file or folder to the target (resumes; skips unchanged files)
        %ec2 pull PATH [LOCAL]   copy a file or folder from the target
        %ec2 restart [--session S | --all]   stop a session's worker (interrupt, SIGTERM, SIGKILL;
                             its jobs fail), or every session's: the next cell starts fresh
        %ec2 sessions        sessions on the target: worker pid, memory, idle time
        %ec2 checkpoint [--max-bytes N]   save the session's variables on the target now
        %ec2 checkpoint --restore    after a worker died: load its last checkpoint
        %ec2 cluster start --local N | --hosts A,B,C | -n N [--type T] [--spot] [--client NAME]
                             a Dask cluster (TLS) with a distributed.Client bound to NAME;
        %ec2 cluster status | scale N | stop | logs [scheduler|w0...]

        JOB is a job id or a unique end of one (its last 4 characters usually do); without
        JOB, the last job this kernel started, else this notebook's newest job. Output streams
        live and is also kept on the target and in a local mirror: close the browser, restart
        the kernel, and ``%ec2 output`` still shows all of it.
        """
        words = _split(line, "%ec2")
        if not words:
            raise UsageError(self.ec2.__doc__ or "")
        cmd, rest = words[0], words[1:]
        if cmd == "pip" and cell is None:
            return self._cmd_pip(rest)
        if cmd == "run":
            if cell is None:
                raise UsageError("%ec2 run is a cell magic: start the cell with %%ec2 run")
            return self._run(PARSERS["run"].parse_args(rest), cell)
        if cell is not None:
            raise UsageError(f"%%ec2 {cmd} is not a cell command; did you mean %%ec2 run?")
        if cmd not in PARSERS or cmd == "store":
            raise UsageError(f"unknown command %ec2 {cmd}\n{self.ec2.__doc__}")
        args = PARSERS[cmd].parse_args(rest)
        return getattr(self, "_cmd_" + cmd)(args)

    def _cmd_use(self, args: argparse.Namespace) -> None:
        where = dict(kind=args.kind, host=args.host, root=args.root, session=args.session, python=args.python,
                     trust=args.trust_new_host, ssh_config=args.ssh_config, workdir=args.workdir)
        what = f"%ec2 use {args.kind}" + (f" {args.host}" if args.host else "")
        self._switch(where, self._choosing(what, lambda: self._connect(**where)))
        assert self.remote is not None
        print(f"Using {self.remote.target} (session '{self.remote.session}', "
              f"Python {self.remote.info.get('python')} on the target)")
        if args.workdir:
            self._workdir_notice(self.remote)
        self.tell_unwatched()

    @staticmethod
    def _workdir_notice(remote: api.Remote) -> None:
        """--workdir takes effect when a session's worker starts: say so if it already runs elsewhere."""
        want = remote.workdir
        for s in remote.sessions():
            if s["name"] == remote.session and s.get("alive") and s.get("cwd") and want and s["cwd"] != want:
                print(f"Note: session '{remote.session}' is already running in {s['cwd']}; --workdir {want} "
                      f"applies when it starts again (%ec2 restart), or use another --session")

    def tell_unwatched(self) -> None:
        """Say in one line when this notebook has jobs that ran while nobody watched."""
        try:
            line = notebook.unwatched_notice(self._state_root(), self._told)
        except Exception as exc:  # the index is a convenience here: never fail the load over it
            log.debug("could not read the job index: %s", exc)
            return
        if line:
            print(line)

    def _run(self, args: argparse.Namespace, cell: str) -> None:
        ns = self.shell.user_ns
        push_names, pull = _names(args.push), _names(args.pull)
        missing = [n for n in push_names if n not in ns]
        if missing:
            raise UsageError("-i: no variable named " + ", ".join(repr(n) for n in missing) + " in this namespace")
        remote = self.get_remote()
        timeout = args.timeout if args.timeout is not None else (self.timeout or None)
        retries = args.retry if args.retry is not None else self.retries
        if retries < 0:
            raise UsageError(f"--retry: a number of retries >= 0, not {retries}")
        if args.bg and args.retry:
            raise UsageError("--retry applies to jobs in the foreground, not with --bg")
        render = Renderer(remote=remote)
        remote.last_job = None
        origin = notebook.current_origin(self.shell)
        watch = notebook.FrontendWatch(origin, root=remote.state_root)
        try:
            with watch:
                job = remote.run(cell, push={n: ns[n] for n in push_names}, pull=pull, background=args.bg,
                                 session=args.session, timeout=timeout, on_event=render, origin=origin,
                                 execution_count=self._cell_number(), colors=str(self.shell.colors),
                                 stdin=not args.bg, retries=0 if args.bg else retries)
        except (errors.UnpicklableValueError, envsync.PackageSyncError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            job = remote.last_job
            if job is None:
                raise
            if watch.fired and job.meta.get("state") in files.TERMINAL:
                pass  # the page went away just as the job ended: nothing to let go of
            elif not self._interrupt(job, render, origin, watch.fired):
                return
        if args.bg:
            print(f"Job {job.id} runs in the background (session '{remote.session if not args.session else args.session}').\n"
                  f"  %ec2 wait {job.id[-4:]}    stream its output, then pull -o values\n"
                  f"  %ec2 output {job.id[-4:]}  show its output so far")
            return
        job.record.update(watched=True)
        self._pull_into_namespace(job)

    def _cell_number(self) -> int:
        """The number of the cell running now (IPython 9 counts it before running, 8 after)."""
        count = getattr(self.shell.displayhook, "prompt_count", None)
        return count if isinstance(count, int) else self.shell.execution_count

    def _kernel_shutting_down(self) -> bool:
        """Whether Jupyter is shutting this kernel down (ipykernel records the shutdown request)."""
        kernel = getattr(self.shell, "kernel", None)
        return getattr(kernel, "_shutdown_message", None) is not None

    def _interrupt(self, job: api.Job, render: Renderer, origin: dict[str, Any] | None = None,
                   page_gone: bool = False) -> bool:
        """First Ctrl-C: interrupt the remote code. Second: detach. True if the job ended.

        Jupyter interrupts a kernel before it restarts or shuts it down; a restart must not
        kill the remote job, so the interrupt waits ``interrupt_grace`` seconds first.
        When the page that started the cell is gone (``page_gone``: it was closed or reloaded),
        or another page is connected too, the interrupt may come from someone who only came
        back to look: the cell detaches and the job runs on."""
        origin = origin or {}
        if page_gone or notebook.starter_gone(origin, job.remote.state_root):
            return self._detach(job, "the page that ran this cell was closed or reloaded")
        if notebook.others_connected(origin, job.remote.state_root):
            return self._detach(job, "interrupted from a page that did not start it")
        deadline = time.monotonic() + self.interrupt_grace
        try:
            while time.monotonic() < deadline:
                if self._kernel_shutting_down():
                    log.warning("kernel shutting down: job %s keeps running on the target", job.id)
                    return False
                time.sleep(0.05)
        except KeyboardInterrupt:
            return self._detach(job)
        if self._kernel_shutting_down():
            return False
        for _ in range(20):
            try:
                job.cancel()
                break
            except errors.UnknownJobError:  # the submission is still on its way
                time.sleep(0.05)
        sys.stderr.write(f"\nInterrupting job {job.id} on the target (Ctrl-C again to detach and leave it running)\n")
        try:
            job.follow(render)
            return True
        except KeyboardInterrupt:
            return self._detach(job)

    def _detach(self, job: api.Job, why: str = "") -> bool:
        job.record.update(detached=True)  # the Jupyter extension may fill the cell from now on
        sys.stderr.write(f"\nDetached from job {job.id}{f' ({why})' if why else ''}; it keeps running on the target.\n"
                         f"  %ec2 wait {job.id[-4:]} to reattach, %ec2 cancel {job.id[-4:]} to stop it.\n")
        return False

    def _pull_into_namespace(self, job: api.Job) -> None:
        try:
            got = job.result()
        except errors.MissingOutputError as exc:
            self.shell.user_ns.update(exc.values)
            raise
        except errors.RemoteError as exc:
            if exc.ename == "UsageError":  # shown as one "UsageError: ..." line, like a local one
                raise UsageError(exc.evalue) from None
            raise
        self.shell.user_ns.update(got)

    def _job(self, ref: str | None) -> api.Job:
        remote = self.get_remote()
        if not ref:
            if remote.last_job is not None:
                return remote.last_job
            mine = notebook.notebook_jobs(remote.state_root, target=remote.target)
            if not mine:
                where = f"this notebook ({notebook.notebook_path()})" if notebook.notebook_path() else "this kernel"
                raise UsageError(f"no job started from {where} on {remote.target} yet: give a job id (see %ec2 jobs)")
            return api.Job(remote, mine[-1]["id"])
        try:
            return remote.job(ref)
        except errors.UnknownJobError as exc:
            raise UsageError(str(exc)) from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _cmd_output(self, args: argparse.Namespace) -> None:
        job = self._offline_job(args.job)
        try:
            job.sync()
        except (errors.RemoteMagicError, OSError) as exc:
            log.info("showing the local mirror of %s only: %s", job.id, exc)
        render = Renderer(replay=True)
        for event in job.events():
            render(event)
        if job.record.meta.get("state") in files.TERMINAL:
            job.record.update(watched=True)
        else:
            print(f"[job {job.id} is still {job.record.meta.get('state', 'running')}: %ec2 wait {job.id[-4:]} follows it]")

    def _offline_job(self, ref: str | None) -> api.Job:
        """Resolve a job from the local index first, so output works with the target gone."""
        if not ref and (self.remote is None or self.remote.last_job is None):
            mine = notebook.notebook_jobs(self._state_root())
            ref = mine[-1]["id"] if mine else None
        if ref:
            local = [j["id"] for j in state.list_jobs(self._state_root())
                     if j["id"] == ref or j["id"].endswith(ref) or j["id"].startswith(ref)]
            if len(local) == 1:
                if self.remote is None:
                    try:
                        self.get_remote()
                    except Exception as exc:  # target unreachable: the mirror is enough
                        log.info("target unreachable (%s)", exc)
                        return _MirrorOnlyJob(self._state_root(), local[0])  # type: ignore[return-value]
                return api.Job(self.get_remote(), local[0])
        return self._job(ref)

    def _state_root(self) -> Any:
        return self.remote.state_root if self.remote else state.state_dir()

    def _cmd_wait(self, args: argparse.Namespace) -> None:
        job = self._job(args.job)
        render = Renderer(remote=job.remote)
        for event in job.events():
            render(event)
        try:
            job.wait(timeout=args.timeout, on_event=render)
        except TimeoutError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            sys.stderr.write(f"\nStopped waiting; job {job.id} keeps running. %ec2 wait {job.id[-4:]} to reattach.\n")
            return
        job.record.update(watched=True)
        self._pull_into_namespace(job)

    def _cmd_cancel(self, args: argparse.Namespace) -> None:
        job = self._job(args.job)
        if args.kill:
            print(f"Job {job.id}: {job.cancel(kill=True)}")
            return
        state = job.cancel()
        print(f"Job {job.id}: {state}", flush=True)
        if state != "interrupting":
            return
        try:
            job.wait(timeout=self.stop_grace)
        except TimeoutError:
            sys.stderr.write(f"Job {job.id} still runs {self.stop_grace:g} s after the interrupt (Ec2Magics.stop_grace): "
                             "killing its worker\n")
            why = f"killed by %ec2 cancel: still running {self.stop_grace:g} s after the interrupt"
            print(f"Job {job.id}: {job.cancel(kill=True, reason=why)}")
            return
        print(f"Job {job.id}: {job.state}")

    def _cmd_jobs(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        rows = remote.jobs(args.n)
        if not rows:
            print(f"No jobs on {remote.target} yet.")
            return
        width = max(7, *(len(str(j.get("session"))) for j in rows))
        print(f"{'job':27} {'session':{width}} {'state':11} {'started':8} {'took':>7}  {'notebook / cell':30} code")
        for j in rows:
            code = (j.get("code") or f"[{j.get('kind')}]").strip().splitlines()
            origin = j.get("origin") or {}
            where = "/".join(filter(None, (origin.get("notebook"), (origin.get("cell_id") or "")[:8]))) or "-"
            print(f"{j['id']:27} {str(j.get('session')):{width}} {str(j.get('state')):11} "
                  f"{_ago(j.get('started')):8} {_duration(j.get('started'), j.get('finished')):>7}  "
                  f"{where:30} {(code[0] if code else '')[:40]}")

    def _cmd_status(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        st = remote.status()
        info = st["agent"]
        print(f"Target:   {remote.target}\n"
              f"Python:   {info.get('python')} ({info.get('executable')}) on {info.get('platform')}, "
              f"{info.get('cpus')} CPUs\nSession:  {remote.session} (this kernel's default)")
        print("Sessions:")
        for s in st["sessions"]:
            what = f"worker pid {s['pid']}, up {_duration(s['started'], None)}" if s["alive"] else "no worker"
            busy = f", running {s['current']}" if s.get("current") else ""
            ck = s.get("checkpoint") or {}
            saved = f", checkpoint {_ago(ck.get('time'))} ({len(ck.get('names', []))} values)" if ck.get("time") else ""
            print(f"  {s['name']:20} {what}{busy}{saved}")
            notice = s.get("spot_notice") or {}
            if notice and (not s.get("started") or notice.get("received", 0) >= s["started"]):
                ck = notice.get("checkpoint") or {}
                print(f"    spot reclaim notice ({notice.get('action')} at {notice.get('time')}): "
                      + (f"checkpointed {len(ck.get('names', []))} value(s); after the instance is started "
                         "again, %ec2 checkpoint --restore" if ck else "checkpoint not taken yet"))
        if "instances" in st:
            self._print_instances(st["instances"])
        print(f"Jobs:     {len(st['jobs'])} recent, {len(st['active'])} queued or running (%ec2 jobs lists them)")
        if envsync.supported(remote.transport):
            try:
                record = envsync.installed_record(remote)
            except Exception as exc:  # the venv cannot be asked: say so, the rest of the status stands
                print(f"Packages: cannot list the target's venv ({exc})")
                return
            print(f"Packages: {len(record)} installed by remotemagic in the target's venv"
                  + (": " + ", ".join(f"{n} {v.get('version')} ({v.get('via')}, {v.get('source')})"
                                      for n, v in sorted(record.items())) if record else ""))

    # -- EC2 ------------------------------------------------------------------------------------
    def _cmd_start(self, args: argparse.Namespace) -> None:
        self.close()
        launch = {k: getattr(args, k) for k in ("instance_type", "ami", "disk_gb", "key_name") if getattr(args, k)}
        if args.spot:
            launch["spot"] = True
        if args.fallback:
            if not args.spot:
                raise UsageError("%ec2 start --fallback goes with --spot (on-demand when there is no spot capacity)")
            launch["fallback"] = True
        name = args.name or self.instance_name
        remote = self._choosing(f"%ec2 start --name {name}", lambda: self._connect(
            "ec2", name, None, None, start=True, launch=launch))
        inst = remote.instance
        self._switch(dict(kind="ec2", host=inst.name, root=None, session=None), remote)
        print(f"Using {inst.name} ({inst.instance_id}, {inst.instance_type}, {inst.lifecycle}) at {inst.host}; "
              f"it stops itself after {self.idle_stop_minutes} idle minutes" if self.idle_stop_minutes else
              f"Using {inst.name} ({inst.instance_id}, {inst.instance_type}, {inst.lifecycle}) at {inst.host}")

    def _instance_name(self, name: str | None) -> str:
        """The instance a stop/terminate/resize is about: --name, else the current EC2 target."""
        if name:
            return name
        if self.remote is not None and self.remote.instance is not None:
            return self.remote.instance.name
        if self.where is not None:
            if self.where["kind"] == "ec2":
                return self.where["host"] or self.instance_name
        else:
            words = (self.target or "").split()
            if words and words[0] == "ec2":
                return words[1] if len(words) > 1 else self.instance_name
        target = self.remote.target if self.remote is not None else " ".join(
            str(w) for w in ((self.where or {}).get("kind"), (self.where or {}).get("host")) if w) or self.target
        raise UsageError(f"{target} is not an EC2 instance: %ec2 use ec2 NAME or %ec2 start first, or give --name")

    def _provider(self) -> Any:
        if self.remote is not None and self.remote.provider is not None:
            return self.remote.provider
        from .providers.ec2 import Ec2Provider

        opts = self._ec2_options(None)
        return Ec2Provider(**{k: opts[k] for k in api.EC2_OPTIONS if opts.get(k) is not None})

    def _ec2_call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except errors.RemoteMagicError as exc:
            if type(exc).__module__.endswith("providers.ec2"):
                raise UsageError(f"{type(exc).__name__}: {exc}") from None
            raise

    def _drop_connection_to(self, name: str) -> None:
        if self.remote is not None and self.remote.instance is not None and self.remote.instance.name == name:
            self.close()

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        name = self._instance_name(args.name)
        provider = self._provider()
        self._drop_connection_to(name)
        info = self._ec2_call(provider.stop, name, wait=True, progress=self.show_progress)
        print(f"Stopped {info.name} ({info.instance_id}). Its disk, job logs and checkpoints stay; "
              f"%ec2 start --name {info.name} brings it back.")

    def _cmd_terminate(self, args: argparse.Namespace) -> None:
        name = self._instance_name(args.name)
        provider = self._provider()
        if not args.yes:
            try:
                answer = input(f"Terminate {name}? Its disk and everything on it are deleted. [y/N] ")
            except Exception:  # no stdin (e.g. a notebook run headless)
                raise UsageError("confirmation needed: %ec2 terminate -y") from None
            if answer.strip().lower() not in ("y", "yes"):
                print("Not terminated.")
                return
        self._drop_connection_to(name)
        instance_id = self._ec2_call(provider.terminate, name, wait=True, progress=self.show_progress)
        print(f"Terminated {name} ({instance_id}).")

    def _cmd_resize(self, args: argparse.Namespace) -> None:
        name = self._instance_name(args.name)
        provider = self._provider()
        session = self.remote.session if self.remote is not None else (self.where or {}).get("session")
        self._drop_connection_to(name)
        self._ec2_call(provider.resize, name, args.instance_type, progress=self.show_progress)
        same = self.where is not None and self.where["kind"] == "ec2" and self.where["host"] in (None, name)
        where = {**(self.where if same else {"root": None}), "kind": "ec2", "host": name, "session": session}
        self._switch(where, self._connect(**where, start=True))
        assert self.remote is not None
        print(f"{name} is now a {self.remote.instance.instance_type}; reattached")

    def _cmd_tunnel(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        if args.close is not None:
            try:
                remote.close_tunnel(args.close)
            except KeyError as exc:
                raise UsageError(str(exc.args[0])) from None
            print(f"Closed the tunnel on 127.0.0.1:{args.close}")
            return
        if args.remote_port is None:
            if not remote.tunnels:
                print("No open tunnels. %ec2 tunnel REMOTE_PORT [LOCAL_PORT] opens one.")
            for t in remote.tunnels.values():
                print(f"127.0.0.1:{t.local_port} -> port {t.remote_port} on {remote.target} "
                      f"({'open' if t.active else 'closed'})")
            return
        try:
            t = remote.tunnel(args.remote_port, args.local_port)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        print(f"Tunnel open: {t.url} -> port {t.remote_port} on {remote.target} (bound to 127.0.0.1 only)")

    def _cmd_pip(self, words: list[str]) -> None:
        if not words or words[0] != "install" or len(words) < 2:
            raise UsageError("%ec2 pip install PACKAGE [PACKAGE ...]")
        try:
            for line in self.get_remote().pip_install(*words[1:]):
                print(line, flush=True)
        except Exception as exc:  # pip's own failure text is the useful part
            raise UsageError(str(exc)) from None

    def _cmd_sync(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        code = ""
        if not args.all and not args.packages:
            from IPython.core.inputtransformer2 import TransformerManager

            tm = TransformerManager()
            cells = []
            for cell in self.shell.user_ns.get("In", []) or []:
                try:
                    cells.append(tm.transform_cell(cell))
                except Exception:
                    continue
            code = "\n".join(c for c in cells if "import" in c and envsync.needs.code_modules(c))
        try:
            rows = remote.sync_packages(args.packages, all=args.all, code=code, dry_run=args.dry_run)
        except (ValueError, envsync.PackageSyncError) as exc:
            raise UsageError(str(exc)) from None
        if args.dry_run:
            print(f"Dry run on {remote.target}: nothing installed")
        print(envsync.format_rows(rows))

    def _cmd_push(self, args: argparse.Namespace) -> None:
        if not args.local.strip():
            raise UsageError("%ec2 push: name the file or folder to send (an empty name is refused: "
                             "it would send the whole current folder; use . for that)")
        remote = self.get_remote()
        with _transfer_errors("push", args.local):
            done = remote.push(args.local, args.dest)
        print(_transfer_summary("Pushed", done))

    def _cmd_pull(self, args: argparse.Namespace) -> None:
        if not args.path.strip():
            raise UsageError("%ec2 pull: name the file or folder on the target (use . for the whole session folder)")
        remote = self.get_remote()
        with _transfer_errors("pull", args.path):
            done = remote.pull(args.path, args.local)
        print(_transfer_summary("Pulled", done))

    def _cmd_checkpoint(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        try:
            if args.restore:
                remote.restore_checkpoint(args.session, on_event=Renderer())
            else:
                remote.checkpoint(args.session, args.max_bytes, on_event=Renderer())
        except errors.RemoteError as exc:
            raise UsageError(f"{exc.ename}: {exc.evalue}") from None

    def _print_instances(self, rows: list[dict[str, Any]]) -> None:
        from IPython.display import display

        display(InstanceTable(rows))

    def _cmd_cluster(self, args: argparse.Namespace) -> None:
        """%ec2 cluster ...: a Dask cluster (remotemagic/cluster/magic.py does the work)."""
        from .cluster import magic as cluster_magic

        cluster_magic.handle(self, args)

    def _cmd_sessions(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        rows = remote.sessions()
        if not rows:
            print(f"No sessions on {remote.target} yet.")
            return
        print(f"Sessions on {remote.target} (workers exit after {remote.worker_idle_hours:g} idle hours; "
              "%ec2 restart --all stops them):")
        print(f"  {'session':20} {'worker':>8} {'memory':>9} {'idle':>7}  state")
        for s in rows:
            if not s["alive"]:
                print(f"  {s['name']:20} {'-':>8} {'-':>9} {'-':>7}  no worker")
                continue
            idle = _duration(s["idle_since"], None) if s.get("idle_since") else "-"
            what = f"running {s['current']}" if s.get("current") else "idle"
            print(f"  {s['name']:20} {s['pid']:>8} {_size(s.get('rss')) if s.get('rss') else '?':>9} {idle:>7}  {what}")

    def _cmd_restart(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        if args.all:
            if args.session:
                raise UsageError("%ec2 restart: give --session S or --all, not both")
            alive = [s["name"] for s in remote.sessions() if s["alive"]]
            if not alive:
                print(f"No worker runs on {remote.target}")
            for name in alive:
                self._restart_one(remote, name)
            return
        self._restart_one(remote, args.session or remote.session)

    def _restart_one(self, remote: api.Remote, session: str) -> None:
        try:
            st = remote.stop_worker(session, grace=self.stop_grace)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not st["stopped"]:
            print(f"Session '{session}': no worker was running")
            return
        how = {"exit": "", "SIGINT": " (its job interrupted)", "SIGTERM": " (with SIGTERM)",
               "SIGKILL": " (with SIGKILL)"}.get(st.get("how", ""), "")
        failed = st.get("failed") or []
        jobs = f"; {len(failed)} job(s) it held or queued failed: {', '.join(failed)}" if failed else ""
        print(f"Session '{session}': worker stopped{how}{jobs}; the next cell starts with a fresh namespace")

    # -- %ec2_store ----------------------------------------------------------------------------
    @line_magic
    @_showing_notices
    def ec2_store(self, line: str) -> None:
        """Like %store, but the values live on the target: any kernel or process using the
        same target can restore them.

        %ec2_store              list stored names with type, size and a preview
        %ec2_store a b          store local variables a and b          ("Stored 'a' (int)")
        %ec2_store -r [a b]     restore all stored values, or the names given, into this kernel
        %ec2_store -d a         delete a stored value
        %ec2_store -z           delete all stored values
        %ec2_store --remote a   store 'a' from the remote session's namespace (it never travels here)
        %ec2_store -r --remote a   restore 'a' straight into the remote session's namespace
        """
        args = PARSERS["store"].parse_args(_split(line, "%ec2_store"))
        remote = self.get_remote()
        ns = self.shell.user_ns
        if args.z:
            deleted = remote.store_clear()
            print(f"Deleted {len(deleted)} stored value(s)")
            return
        if args.d:
            for name in args.d:
                try:
                    remote.store_delete(name)
                except KeyError:
                    raise UsageError(f"Can't delete variable '{name}': it is not stored") from None
            return
        if args.remote:
            self._store_remote(remote, args)
            return
        if args.r:
            names = args.names or [v["name"] for v in remote.store_list()]
            for name in names:
                try:
                    ns[name] = remote.store_get(name)
                except KeyError:
                    raise UsageError(f"no stored variable {name!r} (%ec2_store lists them)") from None
                print(f"Restored '{name}' ({files.type_name(ns[name])})")
            return
        if not args.names:
            self._store_list(remote)
            return
        for name in args.names:
            if name not in ns:
                raise UsageError(f"Unknown variable '{name}'")
        for name in args.names:
            try:
                meta = remote.store_put(name, ns[name])
            except errors.UnpicklableValueError as exc:
                raise UsageError(str(exc)) from None
            print(f"Stored '{name}' ({meta.get('type', files.type_name(ns[name]))})")

    def _store_remote(self, remote: api.Remote, args: argparse.Namespace) -> None:
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

    def _store_list(self, remote: api.Remote) -> None:
        values = remote.store_list()
        if not values:
            print(f"No values stored on {remote.target}")
            return
        width = max(len(v["name"]) for v in values)
        print(f"Stored values on {remote.target}:")
        for v in values:
            print(f"{v['name']:{width}} {_size(v.get('size')):>9}  {v.get('type', '?'):14} -> {v.get('preview', '')}")


class InstanceTable:
    """Our EC2 instances with their cost: an HTML table in a notebook, text in a terminal."""

    COLUMNS = ("name", "id", "type", "state", "lifecycle", "uptime", "$/h", "so far", "price from")

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = [self._cells(r) for r in rows]
        self.total = sum(r.get("cost_so_far") or 0.0 for r in rows)

    @staticmethod
    def _cells(r: dict[str, Any]) -> list[str]:
        up = r.get("uptime")
        uptime = "-" if up is None else f"{int(up.total_seconds() // 3600)}h{int(up.total_seconds() % 3600 // 60):02d}m"
        price = r.get("hourly_price")
        cost = r.get("cost_so_far")
        return [str(r.get("name", "?")), str(r.get("id", "?")), str(r.get("type", "?")), str(r.get("state", "?")),
                str(r.get("lifecycle", "?")), uptime, "?" if price is None else f"{price:.4f}",
                "-" if cost is None else f"{cost:.2f}", str(r.get("price_source") or "-")]

    def __repr__(self) -> str:
        if not self.rows:
            return "Instances: none of ours in this region"
        widths = [max(len(c), *(len(row[i]) for row in self.rows)) for i, c in enumerate(self.COLUMNS)]
        lines = ["Instances (tagged as ours, this region):",
                 "  " + "  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths, strict=True))]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in self.rows]
        lines.append(f"  compute cost so far: ${self.total:.2f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        return (f"<table><caption>Instances tagged as ours (compute so far: ${self.total:.2f})</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


class _MirrorOnlyJob:
    """A job seen through the local mirror alone (its target unreachable)."""

    def __init__(self, root: Any, job_id: str):
        self.id = job_id
        self.record = state.JobRecord(root, job_id)

    def sync(self) -> None:
        pass

    def events(self) -> Any:
        return self.record.events()


_loaded: dict[int, Ec2Magics] = {}


def load(ip: Any) -> None:
    if id(ip) in _loaded:
        return
    magics = Ec2Magics(shell=ip, parent=ip)
    ip.register_magics(magics)
    ip.configurables.append(magics)
    _loaded[id(ip)] = magics
    magics.tell_unwatched()


def unload(ip: Any) -> None:
    magics = _loaded.pop(id(ip), None)
    if magics is None:
        return
    magics.close()
    table = ip.magics_manager.magics
    for kind, name in (("line", "ec2"), ("cell", "ec2"), ("line", "ec2_store")):
        table[kind].pop(name, None)
    if magics in ip.configurables:
        ip.configurables.remove(magics)
