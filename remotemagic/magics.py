"""The IPython magics: ``%ec2`` / ``%%ec2`` and ``%ec2_store``, a thin layer over :mod:`remotemagic.api`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, observe, validate

from . import api, envsync, errors, interrupts, magic_parsers, notebook, notices, state, storemagic, tables
from .agent import protocol
from .formatting import transfer_summary
from .providers import registry
from .providers.base import ProviderError
from .render import Renderer

log = logging.getLogger(__name__)


def _showing_notices(method: Any) -> Any:
    """Run a magic with every user notice raised meanwhile rendered in the cell's output
    (see :mod:`remotemagic.notices`)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with notices.collect(_show_notice):
            return method(self, *args, **kwargs)

    return wrapper


def _show_notice(notice: Any) -> None:
    Renderer()(notice)  # (made when a notice comes: most cells raise none)


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
    inline_limit = Int(api.INLINE_LIMIT,
                       help="Outputs up to this size come back with the job's status.").tag(config=True)
    object_cache_limit = Int(api.OBJECT_CACHE_LIMIT,
                             help="Bytes of pushed values the target keeps (LRU).").tag(config=True)
    checkpoint_max_bytes = Int(api.CHECKPOINT_LIMIT, help="After each cell, checkpoint the session's variables "
                               "whose pickle is at most this size (0: no automatic checkpoints).").tag(config=True)
    retries = Int(0, help="Default --retry for %%ec2 run: run a cell again (up to this many more times) when its "
                  "worker dies under it (SIGKILL, out of memory, its machine went away), first restoring the "
                  "checkpoint taken before it. Never when the cell itself raises (0: no retries).").tag(config=True)
    reclaim_wait_minutes = Float(api.RECLAIM_WAIT_MINUTES, help="EC2 spot: when AWS reclaims the instance, "
                                 "%%ec2 run --retry and %ec2 wait wait this many minutes for AWS to start it again "
                                 "(a waiting line in the cell), then reconnect and resume (0: do not wait)."
                                 ).tag(config=True)
    auto_restore = Bool(False, help="After a session's worker died (or its machine restarted), the next cell first "
                        "restores the last checkpoint and says which values came back.").tag(config=True)
    show_progress = Bool(True, help="Progress bars for transfers above 16 MiB.").tag(config=True)
    ssh_config = Unicode("~/.ssh/config", help="OpenSSH config file used to resolve SSH hosts.").tag(config=True)
    known_hosts = Unicode("", help="known_hosts file (default: UserKnownHostsFile from the SSH config, "
                          "else ~/.ssh/known_hosts).").tag(config=True)
    trust_on_first_use = Bool(False, help="Accept and record the key of an SSH host never seen before "
                              "(a changed key is always refused).").tag(config=True)
    remote_python = Unicode("python3",
                            help="Interpreter on SSH hosts that the remote venv is built from.").tag(config=True)
    remote_root = Unicode("", help="The agent's folder on SSH hosts (default ~/.remotemagic).").tag(config=True)
    interrupt_grace = Float(1.0, help="Seconds between Ctrl-C and interrupting the remote job. Jupyter "
                            "interrupts a kernel before every restart or shutdown; if the kernel is shut "
                            "down within this time, the remote job is left running.").tag(config=True)
    worker_idle_hours = Float(api.WORKER_IDLE_HOURS,
                              help="A session's worker exits after this many hours without a "
                              "job, checkpointing its namespace first (%ec2 checkpoint --restore brings it back; "
                              "0: never).").tag(config=True)
    stop_grace = Float(api.STOP_GRACE, help="Seconds %ec2 restart and %ec2 cancel give a job at each step (interrupt, "
                       "then SIGTERM, then SIGKILL of the worker's process group) before the next.").tag(config=True)
    instance_name = Unicode("remotemagic",
                            help="EC2: name of the instance %ec2 start/use ec2 work on.").tag(config=True)
    instance_type = Unicode("t3.large", help="EC2: instance type for new instances.").tag(config=True)
    region = Unicode("", help="EC2: AWS region (default: boto3's chain, e.g. AWS_DEFAULT_REGION).").tag(config=True)
    profile = Unicode("", help="EC2: AWS profile (default: boto3's chain).").tag(config=True)
    ssh_cidrs = List(Unicode(), help="EC2: CIDRs allowed to reach SSH (default: this machine's public "
                     "address /32).").tag(config=True)
    idle_stop_minutes = Int(60, help="EC2: the instance stops itself after this many idle minutes "
                            "(no job, no connection); 0 disables.").tag(config=True)
    key_name = Unicode("",
                       help="EC2: key pair for new instances (default: none, EC2 Instance Connect).").tag(config=True)
    key_file = Unicode("", help="EC2: private key of key_name (default: the SSH config's IdentityFile, "
                       "else ssh-agent).").tag(config=True)
    ami = Unicode("", help="EC2: AMI id or alias (ubuntu, al2023) for new instances.").tag(config=True)
    ec2_user = Unicode("", help="EC2: login user (default: from the AMI, ubuntu or ec2-user).").tag(config=True)
    fleets = Dict(help="SSH fleets by name: {'lab': ['gpu1', 'me@10.0.0.5:2222']} (also read from "
                  "<state dir>/fleets.json); %ec2 start|use|stop fleet NAME.").tag(config=True)
    compression = Unicode("auto", help="Compress values and files on the wire: auto (on links with a round "
                          "trip over 5 ms), zstd, zlib or none. Incompressible data is always sent "
                          "raw.").tag(config=True)
    package_sync = Enum(list(envsync.MODES), default_value="auto",
                        help="Before a cell runs on an SSH/EC2 target, install there the packages it "
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

    @validate("reclaim_wait_minutes")
    def _check_reclaim_wait(self, proposal: Any) -> float:
        if not proposal["value"] >= 0:
            raise TraitError(f"reclaim_wait_minutes must be >= 0 (0: do not wait), not {proposal['value']!r}")
        return float(proposal["value"])

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

    @property
    def ip(self) -> InteractiveShell:
        """The shell these magics are registered in."""
        assert self.shell is not None, "Ec2Magics used without a shell"
        return self.shell

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
        """Connect to a target of ``kind`` (see :mod:`remotemagic.providers.registry`): the kind
        builds its options from this object's settings."""
        opts: dict[str, Any] = dict(
            reconnect_timeout=self.reconnect_timeout, inline_limit=self.inline_limit,
            object_cache_limit=self.object_cache_limit, show_progress=self.show_progress,
            checkpoint_limit=self.checkpoint_max_bytes, compression=self.compression,
            worker_idle_hours=self.worker_idle_hours, package_sync=self.package_sync,
            offline_install=self.offline_install, auto_restore=self.auto_restore)
        session = session or self.session or None
        if workdir:
            opts["cwd"] = workdir
        with self._provider_errors():
            return registry.get(kind).connect(self, host, root=root, session=session, options=opts, python=python,
                                              trust=trust, ssh_config=ssh_config, start=start, launch=launch)

    @staticmethod
    @contextlib.contextmanager
    def _provider_errors() -> Any:
        """Bad input (ValueError) and a provider's refusals (ProviderError: AWS said no, a fleet
        is down...) become one-line usage errors: what and why, no traceback."""
        try:
            yield
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except ProviderError as exc:
            raise UsageError(f"{type(exc).__name__}: {exc}") from None

    # -- %ec2 ----------------------------------------------------------------------------------
    @line_cell_magic
    @_showing_notices
    def ec2(self, line: str, cell: str | None = None) -> Any:
        command = magic_parsers.parse_ec2(line, is_cell=cell is not None)
        if command is None:  # -h: the help is printed
            return None
        if command.verb == "run":
            assert cell is not None
            return self._run(command.args, cell)
        return getattr(self, "_cmd_" + command.verb)(command.args)

    ec2.__doc__ = magic_parsers.ec2_doc()  # what %ec2? shows

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
        ns = self.ip.user_ns
        push_names, pull = args.push, args.pull
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
        remote.reclaim_wait_minutes = self.reclaim_wait_minutes
        origin = notebook.current_origin(self.ip)
        watch = notebook.FrontendWatch(origin, root=remote.state_root)
        remote.watching = not args.bg  # the job's final write marks it watched (jobs.Job._finish)
        try:
            with watch:
                job = remote.run(cell, push={n: ns[n] for n in push_names}, pull=pull, background=args.bg,
                                 session=args.session, timeout=timeout, on_event=render, origin=origin,
                                 execution_count=self._cell_number(), colors=str(self.ip.colors),
                                 stdin=not args.bg, retries=0 if args.bg else retries)
        except (errors.UnpicklableValueError, envsync.PackageSyncError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            submitted = remote.last_job
            if submitted is None:
                raise
            job = submitted
            if watch.fired and job.meta.get("state") in protocol.TERMINAL:
                pass  # the page went away just as the job ended: nothing to let go of
            elif not interrupts.interrupt(job, render, self.ip, self.interrupt_grace, origin, watch.fired):
                return
        finally:
            remote.watching = False
        if args.bg:
            session = args.session or remote.session
            print(f"Job {job.id} runs in the background (session '{session}').\n"
                  f"  %ec2 wait {job.id[-4:]}    stream its output, then pull -o values\n"
                  f"  %ec2 output {job.id[-4:]}  show its output so far")
            return
        if not job.marked_watched:  # (usually written with its final state: one write fewer per cell)
            job.record.update(watched=True)
        self._pull_into_namespace(job)

    def _cell_number(self) -> int:
        """The number of the cell running now (IPython 9 counts it before running, 8 after)."""
        count = getattr(self.ip.displayhook, "prompt_count", None)
        return count if isinstance(count, int) else self.ip.execution_count

    def _pull_into_namespace(self, job: api.Job) -> None:
        """The job's ``-o`` values into the notebook's namespace -- the only place they stay:
        ``del y`` in the notebook frees a pulled ``y`` (the job, kept as ``last_job``, lets go)."""
        try:
            got = job.result()
        except errors.MissingOutputError as exc:
            self.ip.user_ns.update(exc.values)
            raise
        except errors.RemoteError as exc:
            if exc.ename == "UsageError":  # shown as one "UsageError: ..." line, like a local one
                raise UsageError(exc.evalue) from None
            raise
        finally:
            job.release_values()
        self.ip.user_ns.update(got)

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
        if job.record.meta.get("state") in protocol.TERMINAL:
            job.record.update(watched=True)
        else:
            print(f"[job {job.id} is still {job.record.meta.get('state', 'running')}: "
                  f"%ec2 wait {job.id[-4:]} follows it]")

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
        remote = self.get_remote()
        render = Renderer(remote=remote)
        for event in job.events():
            render(event)
        remote.reclaim_wait_minutes = self.reclaim_wait_minutes
        try:
            remote.wait_through_reclaim(job, timeout=args.timeout, on_event=render)
        except TimeoutError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            sys.stderr.write(f"\nStopped waiting; job {job.id} keeps running. %ec2 wait {job.id[-4:]} to reattach.\n")
            return
        if not job.marked_watched:  # (usually written with its final state: one write fewer per cell)
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
            sys.stderr.write(f"Job {job.id} still runs {self.stop_grace:g} s after the interrupt "
                             "(Ec2Magics.stop_grace): killing its worker\n")
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
        print(tables.jobs_table(rows))

    def _cmd_status(self, args: argparse.Namespace) -> None:
        remote = self.get_remote()
        st = remote.status()
        info = st["agent"]
        print(f"Target:   {remote.target}\n"
              f"Python:   {info.get('python')} ({info.get('executable')}) on {info.get('platform')}, "
              f"{info.get('cpus')} CPUs\nSession:  {remote.session} (this kernel's default)")
        print(tables.status_sessions(st["sessions"]))
        kind = registry.get(self.where["kind"]) if self.where and self.where.get("kind") in registry.names() else None
        for line in kind.status_lines(remote) if kind is not None else []:
            print(line)
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

    # -- machines: start, stop, terminate, resize (EC2 instances, fleets) ---------------------
    def _cmd_start(self, args: argparse.Namespace) -> None:
        self.close()
        # no kind: an EC2 instance (--name, else Ec2Magics.instance_name), as before kinds existed
        kind, name = self._machine("start", args.kind or registry.DEFAULT_MACHINE_KIND, args.name or args.machine)
        launch = {k: getattr(args, k) for k in ("instance_type", "ami", "disk_gb", "key_name", "spot", "fallback")
                  if getattr(args, k)}
        with self._provider_errors():
            kind.check_launch(launch)
        default = kind.name == registry.DEFAULT_MACHINE_KIND
        what = f"%ec2 start --name {name}" if default else f"%ec2 start {kind.name} {name}"
        remote = self._choosing(what, lambda: self._connect(kind.name, name, None, None, start=True, launch=launch))
        self._switch(dict(kind=kind.name, host=kind.machine_name(remote) or name, root=None, session=None), remote)
        print(kind.started(remote, self))

    def _machine(self, verb: str, kind_name: str | None, name: str | None) -> tuple[registry.TargetKind, str]:
        """The kind and machine a start/stop/terminate/resize is about: the kind and name given,
        a ``--name`` alone (an EC2 instance), else the current target."""
        if kind_name or name:
            with self._provider_errors():
                kind = registry.get(kind_name or registry.DEFAULT_MACHINE_KIND)
                if verb not in kind.verbs:
                    raise kind.unsupported(verb)
                return kind, name or kind.default_name(self)
        if self.where is not None:
            current, host = self.where["kind"], self.where.get("host")
        else:
            words = (self.target or "").split()
            current, host = (words[0] if words else ""), (words[1] if len(words) > 1 else None)
        now = registry.get(current) if current in registry.names() else None
        if now is not None and verb in now.verbs:
            with self._provider_errors():
                return now, now.machine_name(self.remote) or host or now.default_name(self)
        if now is not None and now.verbs:  # a machine, but not one this verb applies to
            raise UsageError(str(now.unsupported(verb)))
        target = self.remote.target if self.remote is not None else " ".join(
            str(w) for w in ((self.where or {}).get("kind"), (self.where or {}).get("host")) if w) or self.target
        nouns = " or ".join(k.noun for k in registry.with_verb(verb))
        raise UsageError(f"{target} is not {nouns}: %ec2 use or %ec2 start one first, or give --name")

    def _drop_connection_to(self, kind: registry.TargetKind, name: str) -> None:
        """Close the current connection if it is to the machine ``name`` of ``kind``."""
        if self.remote is not None and kind.machine_name(self.remote) == name:
            self.close()
        elif self.where is not None and self.where["kind"] == kind.name and self.where.get("host") == name:
            self.close()

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        kind, name = self._machine("stop", args.kind, args.name or args.machine)
        current = self.remote
        self._drop_connection_to(kind, name)
        with self._provider_errors():
            print(kind.stop(self, name, current))

    def _cmd_terminate(self, args: argparse.Namespace) -> None:
        kind, name = self._machine("terminate", args.kind, args.name or args.machine)
        if not args.yes:
            try:
                answer = input(f"Terminate {name}? Its disk and everything on it are deleted. [y/N] ")
            except Exception:  # no stdin (e.g. a notebook run headless)
                raise UsageError("confirmation needed: %ec2 terminate -y") from None
            if answer.strip().lower() not in ("y", "yes"):
                print("Not terminated.")
                return
        current = self.remote
        self._drop_connection_to(kind, name)
        with self._provider_errors():
            print(kind.terminate(self, name, current))

    def _cmd_resize(self, args: argparse.Namespace) -> None:
        kind, name = self._machine("resize", None, args.name)
        session = self.remote.session if self.remote is not None else (self.where or {}).get("session")
        current = self.remote
        self._drop_connection_to(kind, name)
        with self._provider_errors():
            said = kind.resize(self, name, args.instance_type, current)
        same = self.where is not None and self.where["kind"] == kind.name and self.where["host"] in (None, name)
        where = {**(self.where if same and self.where else {"root": None}), "kind": kind.name, "host": name,
                 "session": session}
        self._switch(where, self._connect(**where, start=True))
        print(f"{said}; reattached")

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

    def _cmd_pip(self, args: argparse.Namespace) -> None:
        words = args.words
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
            for cell in self.ip.user_ns.get("In", []) or []:
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
        print(transfer_summary("Pushed", done))

    def _cmd_pull(self, args: argparse.Namespace) -> None:
        if not args.path.strip():
            raise UsageError("%ec2 pull: name the file or folder on the target (use . for the whole session folder)")
        remote = self.get_remote()
        with _transfer_errors("pull", args.path):
            done = remote.pull(args.path, args.local)
        print(transfer_summary("Pulled", done))

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

        display(tables.InstanceTable(rows))

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
        print(tables.sessions_table(rows))

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
        storemagic.ec2_store(line, self.get_remote, self.ip.user_ns)

    ec2_store.__doc__ = magic_parsers.store_doc()  # what %ec2_store? shows


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
    if "remotemagic.providers.fleet.provider" in sys.modules:  # fleets brought up by %ec2 start fleet
        sys.modules["remotemagic.providers.fleet.provider"].close_all()
    table = ip.magics_manager.magics
    for kind, name in (("line", "ec2"), ("cell", "ec2"), ("line", "ec2_store")):
        table[kind].pop(name, None)
    if magics in ip.configurables:
        ip.configurables.remove(magics)
