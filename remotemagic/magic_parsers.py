"""The parser tree of ``%ec2`` / ``%%ec2`` and ``%ec2_store``: the single source of their syntax and help.

Built on IPython's :mod:`IPython.core.magic_arguments` (:class:`MagicArgumentParser` raises
``UsageError`` instead of exiting): one argparse subparser per ``%ec2`` verb. Every verb answers
``-h`` / ``--help`` by printing its help in the cell, and the magics' docstrings (what ``%ec2?``
shows) are generated from these parsers, as ``magic_arguments`` does with
``__doc__ = parser.format_help()``. README's table of magics is checked against this tree by
tests/test_magic_help.py.

Adding a verb: a ``_add_<verb>`` block in :func:`build_ec2_parser`, a ``_cmd_<verb>(args)``
method on :class:`remotemagic.magics.Ec2Magics`, a row in README's "Every magic" table.
"""

from __future__ import annotations

import argparse
import inspect
import math
import shlex
import textwrap
import unicodedata
from typing import Any, NamedTuple

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser, MagicHelpFormatter

from .agent import protocol
from .providers import registry

#: The target kinds ``%ec2 use`` accepts: one per line of the registry.
TARGET_KINDS = tuple(registry.names())

#: Verbs whose code is the cell's body (``%%ec2 run``); every other verb is a line.
CELL_VERBS = ("run",)

EC2_LEAD = """\
Run code on a bigger machine, keep every output.

Pick a target with %ec2 use (or %ec2 start for an EC2 instance), then run cells there with
%%ec2 run. Output streams live and is also kept on the target and in a local mirror: close the
browser, restart the kernel, and %ec2 output still shows all of it. JOB is a job id or a unique
end of one (its last 4 characters usually do); without JOB, the last job this kernel started,
else this notebook's newest job. Every verb answers -h with its options, e.g. %%ec2 run -h."""

STORE_LEAD = """\
Like %store, but the values live on the target: any kernel or process using the same target
can restore them."""

STORE_EXAMPLES = """\
examples:
  %ec2_store                 list stored names with type, size and a preview
  %ec2_store a b             store local variables a and b ("Stored 'a' (int)")
  %ec2_store -r [a b]        restore all stored values, or the names given, into this kernel
  %ec2_store -d a            delete a stored value
  %ec2_store -z              delete all stored values
  %ec2_store --remote a      store 'a' from the remote session's namespace (it never travels here)
  %ec2_store -r --remote a   restore 'a' straight into the remote session's namespace"""


class HelpShown(Exception):
    """``-h`` / ``--help`` printed a parser's help: there is nothing else to do."""


class _HelpFormatter(MagicHelpFormatter):
    """IPython's magic help formatter (dedented descriptions, ``<ARGS>`` placeholders) with a
    plain ``usage:`` prefix (the prog names the magic with its ``%``) and a width that does not
    depend on the terminal the kernel was started from."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 30)
        kwargs.setdefault("width", 100)
        super().__init__(prog, **kwargs)

    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = "usage: ") -> None:
        argparse.RawDescriptionHelpFormatter.add_usage(self, usage, actions, groups, prefix)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures the verbs of a subparsers action at their parent's indent, not at
        # their own (one step deeper): long verb names would then wrap onto a line of their own
        if action.help is not argparse.SUPPRESS:
            for sub in getattr(action, "_get_subactions", list)():
                width = len(self._format_action_invocation(sub)) + self._current_indent + self._indent_increment
                self._action_max_length = max(self._action_max_length, width)


_PARSER_SETTINGS = set(inspect.signature(MagicArgumentParser.__init__).parameters) - {"self", "prog", "add_help"}


class MagicParser(MagicArgumentParser):
    """A :class:`MagicArgumentParser` whose errors name the magic and show its usage, and whose
    ``-h`` prints the help and raises :class:`HelpShown` instead of exiting."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        # newer argparse hands subparsers settings MagicArgumentParser does not take (3.14: color)
        kwargs = {k: v for k, v in kwargs.items() if k in _PARSER_SETTINGS}
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(prog=prog, add_help=False, **kwargs)
        self.add_argument("-h", "--help", action="help", help="show this help (nothing else runs)")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if status == 0 and not message:
            raise HelpShown()
        raise UsageError(message or self.format_usage().strip())

    def parse(self, words: list[str]) -> argparse.Namespace | None:
        """The parsed arguments, or None when ``-h`` printed the help."""
        try:
            return self.parse_args(words)
        except HelpShown:
            return None


# -- argument types ----------------------------------------------------------------------------
def split_line(line: str, magic: str) -> list[str]:
    """The words of a magic line, or a UsageError saying what is wrong with its quoting."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise UsageError(f"{magic}: cannot read the line ({exc}): close the quote, or escape it with \\") from None


def variable_names(text: str | None) -> list[str]:
    """A comma-separated list of Python identifiers (``-i a,b``), NFKC-normalised as Python
    itself does (``ℌ = 1`` binds ``H``)."""
    names = [unicodedata.normalize("NFKC", n.strip()) for n in (text or "").split(",") if n.strip()]
    for n in names:
        if not n.isidentifier():
            raise argparse.ArgumentTypeError(f"{n!r} is not a variable name")
    return names


def session_name(text: str) -> str:
    try:
        return protocol.check_name("session", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
    return value


def byte_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (no limit) or a positive number of bytes")
    return value


# -- the %ec2 tree -----------------------------------------------------------------------------
_JOB_HELP = "job id or its unique end (default: the last job of this kernel, else this notebook's newest)"


def build_ec2_parser() -> tuple[MagicParser, dict[str, MagicParser]]:
    """The ``%ec2`` parser and its subparsers by verb (in the order ``%ec2 -h`` lists them)."""
    top = MagicParser("%ec2", description=EC2_LEAD)
    # (help texts are %-formatted by argparse: a literal % is written %%)
    subs = top.add_subparsers(title="verbs", dest="verb", metavar="VERB", parser_class=MagicParser,
                              help="%%ec2 VERB -h shows a verb's options")
    verbs: dict[str, MagicParser] = {}

    def verb(name: str, summary: str, description: str = "") -> MagicParser:
        prog = f"%%ec2 {name}" if name in CELL_VERBS else f"%ec2 {name}"
        text = textwrap.fill(f"{summary[0].upper()}{summary[1:]}. {description}".strip(), width=96)
        parser: MagicParser = subs.add_parser(name, prog=prog, help=summary, description=text)
        verbs[name] = parser
        return parser

    # where cells run
    use = verb("use", "pick the target cells run on",
               "local: a worker process on this machine; ssh HOST: any SSH host (ProxyJump, keys and "
               "known_hosts honoured); ec2 [NAME]: one of our running EC2 instances; fleet NAME: the first "
               "host of an SSH fleet.")
    use.add_argument("kind", choices=TARGET_KINDS, help="where cells run")
    use.add_argument("host", nargs="?", metavar="HOST",
                     help="ssh: an ~/.ssh/config alias or user@host[:port]; ec2: the instance name; "
                     "fleet: the fleet's name (cells run on its first host)")
    use.add_argument("--root", metavar="PATH", help="the agent's folder on the target")
    use.add_argument("--session", type=session_name, metavar="S", help="session (remote namespace) to use")
    use.add_argument("--python", metavar="P", help="ssh: the remote interpreter to build the environment from")
    use.add_argument("--workdir", metavar="DIR",
                     help="folder on the target that cells run in and relative paths start from "
                     "(default: the home folder; for local, this kernel's folder)")
    use.add_argument("--ssh-config", metavar="FILE", help="ssh: OpenSSH config file (default: Ec2Magics.ssh_config)")
    use.add_argument("--trust-new-host", action="store_true",
                     help="ssh: accept and record the host key of a host never seen before")

    start = verb("start", "start an EC2 instance or an SSH fleet, and use it",
                 "Launches, starts or attaches to. With no KIND: an EC2 instance (--name, else "
                 "Ec2Magics.instance_name). fleet NAME: connect to every host of the fleet in parallel "
                 "(Ec2Magics.fleets) and run cells on the first.")
    start.add_argument("kind", nargs="?", metavar="KIND", help="what to start: ec2 (default) or fleet")
    start.add_argument("machine", nargs="?", metavar="NAME", help="its name (ec2: default Ec2Magics.instance_name)")
    start.add_argument("--name", metavar="N", help="instance name (default: Ec2Magics.instance_name)")
    start.add_argument("--type", dest="instance_type", metavar="T", help="instance type, e.g. c7i.4xlarge")
    start.add_argument("--spot", action="store_true", help="a spot instance (stops, not terminates, when reclaimed)")
    start.add_argument("--fallback", action="store_true", help="with --spot: launch on-demand if there is no spot "
                       "capacity (a notice says so, with the price difference)")
    start.add_argument("--ami", metavar="A", help="AMI id or alias (ubuntu, al2023); default: current Ubuntu LTS")
    start.add_argument("--disk", type=int, dest="disk_gb", metavar="GB", help="root volume size in GB")
    start.add_argument("--key", dest="key_name", metavar="K", help="EC2 key pair name (default: EC2 Instance Connect)")
    stop = verb("stop", "stop the EC2 instance, or our workers on a fleet",
                "An instance's disk, job logs and checkpoints stay; a fleet's machines keep running.")
    stop.add_argument("kind", nargs="?", metavar="KIND", help="ec2 or fleet (default: the current target's kind)")
    stop.add_argument("machine", nargs="?", metavar="NAME", help="its name (default: the current target)")
    stop.add_argument("--name", metavar="N", help="instance name (default: the current target)")
    terminate = verb("terminate", "terminate the EC2 instance", "Its disk and everything on it are deleted.")
    terminate.add_argument("kind", nargs="?", metavar="KIND", help="ec2 (default: the current target's kind)")
    terminate.add_argument("machine", nargs="?", metavar="NAME", help="its name (default: the current target)")
    terminate.add_argument("--name", metavar="N", help="instance name (default: the current target)")
    terminate.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    resize = verb("resize", "change the EC2 instance's type", "Stop, modify, start, reattach.")
    resize.add_argument("instance_type", metavar="TYPE", help="the new instance type")
    resize.add_argument("--name", metavar="N", help="instance name (default: the current target)")

    # jobs
    run = verb("run", "run the cell on the target",
               "-i sends local variables, -o brings variables back when the cell ends.")
    run.add_argument("-i", "--push", type=variable_names, default="", metavar="NAMES",
                     help="comma-separated local variables to send")
    run.add_argument("-o", "--pull", type=variable_names, default="", metavar="NAMES",
                     help="comma-separated variables to bring back")
    run.add_argument("--bg", action="store_true", help="return at once; the job runs on")
    run.add_argument("--session", type=session_name, metavar="S", help="session (remote namespace) to run in")
    run.add_argument("--timeout", type=seconds, metavar="T", help="interrupt the job after this many seconds")
    run.add_argument("--retry", type=int, metavar="N", help="if the worker dies under the job, run it again up to N "
                     "times on a fresh worker restored from the last checkpoint (default: Ec2Magics.retries)")
    jobs = verb("jobs", "jobs on the target (all sessions, all kernels), newest last")
    jobs.add_argument("-n", type=count, default=20, help="how many (newest last)")
    output = verb("output", "show a job's complete output again",
                  "Works after a kernel restart, even with the target gone (from the local mirror).")
    output.add_argument("job", nargs="?", metavar="JOB", help=_JOB_HELP)
    wait = verb("wait", "stream the rest of a job's output, then pull its -o values")
    wait.add_argument("job", nargs="?", metavar="JOB", help=_JOB_HELP)
    wait.add_argument("--timeout", type=seconds, metavar="T", help="stop waiting after this many seconds")
    cancel = verb("cancel", "interrupt a running job (KeyboardInterrupt there) or drop a queued one",
                  "If it still runs Ec2Magics.stop_grace seconds later, or with --kill, its worker is killed.")
    cancel.add_argument("job", metavar="JOB", help="job id or its unique end")
    cancel.add_argument("--kill", action="store_true", help="kill the job's worker at once (the namespace is lost)")
    verb("status", "the target, its Python, sessions and recent jobs")

    # sessions
    verb("sessions", "sessions on the target: worker pid, memory, idle time, running job")
    restart = verb("restart", "stop a session's worker (interrupt, SIGTERM, SIGKILL; its jobs fail)",
                   "The next cell starts with a fresh namespace.")
    restart.add_argument("--session", type=session_name, metavar="S", help="which session (default: this kernel's)")
    restart.add_argument("--all", action="store_true", help="stop the workers of every session on the target")
    ck = verb("checkpoint", "save the session's variables on the target now, or load the last checkpoint")
    ck.add_argument("--restore", action="store_true", help="load the last checkpoint into the session")
    ck.add_argument("--session", type=session_name, metavar="S", help="which session (default: this kernel's)")
    ck.add_argument("--max-bytes", type=byte_count, default=0, metavar="N",
                    help="skip values whose pickle is larger (0: none)")

    # a Dask cluster (remotemagic/cluster/magic.py)
    cl = verb("cluster", "a Dask cluster over TLS: start, status, scale, stop, logs",
              "start --local N (workers on this machine) | --hosts A,B,C (workers on SSH hosts, the scheduler "
              "on the current target) | -n N (N EC2 worker instances of ours); the notebook gets a "
              "distributed.Client bound to --client NAME.")
    cl.add_argument("action", choices=["start", "status", "scale", "stop", "logs"], metavar="ACTION",
                    help="start, status, scale N, stop, or logs [scheduler|w0...]")
    cl.add_argument("value", nargs="?", metavar="VALUE",
                    help="scale: the number of workers; logs: scheduler or a worker (w0...)")
    cl.add_argument("--local", type=count, metavar="N", help="start: N workers on this machine (the local target)")
    cl.add_argument("--hosts", metavar="A,B,C",
                    help="start: workers on these SSH hosts; the scheduler on the current target")
    cl.add_argument("-n", type=count, dest="instances", metavar="N", help="start: N EC2 worker instances of ours")
    cl.add_argument("--type", dest="instance_type", metavar="T", help="-n: instance type of the workers")
    cl.add_argument("--spot", action="store_true", help="-n: spot worker instances (the scheduler stays on-demand)")
    cl.add_argument("--workers", type=count, metavar="N", help="--hosts: how many workers (default: one per host)")
    cl.add_argument("--threads", type=count, default=1, metavar="T", help="threads per worker (default 1)")
    cl.add_argument("--client", default="client", metavar="NAME",
                    help="the notebook variable bound to the Client (default: client)")
    cl.add_argument("--lines", type=count, default=40, metavar="N", help="logs: how many lines (default 40)")

    # files, ports, packages
    push = verb("push", "copy a file or folder to the target", "Resumes; skips unchanged files.")
    push.add_argument("local", metavar="LOCAL", help="file or folder here")
    push.add_argument("dest", nargs="?", metavar="DEST",
                      help="where on the target (default: same name, in the session's folder)")
    pull = verb("pull", "copy a file or folder from the target")
    pull.add_argument("path", metavar="PATH", help="file or folder on the target")
    pull.add_argument("local", nargs="?", metavar="LOCAL",
                      help="where here (default: same name, in the current folder)")
    tunnel = verb("tunnel", "forward a port of the target to 127.0.0.1 here, list tunnels, or close one")
    tunnel.add_argument("remote_port", nargs="?", type=int, metavar="REMOTE_PORT",
                        help="port on the target (none: list the tunnels)")
    tunnel.add_argument("local_port", nargs="?", type=int, default=0, metavar="LOCAL_PORT",
                        help="port here (default: a free one)")
    tunnel.add_argument("--close", type=int, metavar="LOCAL_PORT", help="close the tunnel on this local port")
    pip = verb("pip", "install packages into the target's Python environment")
    pip.add_argument("words", nargs=argparse.REMAINDER, metavar="install PKG ...",
                     help="pip's words: install, then packages and pip options")
    sync = verb("sync", "put this kernel's packages on the target at the local versions",
                "Without names: what the notebook imports.")
    sync.add_argument("packages", nargs="*", metavar="PKG",
                      help="local distributions to sync (default: what the notebook imports)")
    sync.add_argument("--all", action="store_true", help="every distribution of this kernel's environment")
    sync.add_argument("--dry-run", action="store_true", help="show what would be installed; install nothing")
    return top, verbs


def build_store_parser() -> MagicParser:
    """The ``%ec2_store`` parser."""
    store = MagicParser("%ec2_store", description=STORE_LEAD, epilog=STORE_EXAMPLES)
    store.add_argument("names", nargs="*", metavar="NAME", help="variables to store, or with -r to restore")
    store.add_argument("-r", action="store_true", help="restore (all, or the names given)")
    store.add_argument("-d", metavar="NAME", action="append", help="delete a stored value")
    store.add_argument("-z", action="store_true", help="delete every stored value")
    store.add_argument("--remote", action="store_true",
                       help="act on the remote session's namespace instead of this kernel's")
    store.add_argument("--session", type=session_name, metavar="S", help="with --remote: which session")
    return store


EC2_PARSER, VERBS = build_ec2_parser()
STORE_PARSER = build_store_parser()


# -- parsing a magic ---------------------------------------------------------------------------
class Command(NamedTuple):
    """A parsed ``%ec2`` line: its verb and arguments."""

    verb: str
    args: argparse.Namespace


_CELL_LINES: dict[str, Command] = {}  # the valid %%ec2 lines parsed so far (see parse_ec2)


def parse_ec2(line: str, is_cell: bool) -> Command | None:
    """Parse a ``%ec2`` line (``is_cell``: it heads a ``%%ec2`` cell). None when ``-h`` printed
    the help; a UsageError for anything that is not a valid command.

    A ``%%ec2`` cell line is parsed once: its arguments depend on nothing but the line, and a
    notebook repeats the same few lines cell after cell (argparse is a third of the magic's own
    cost per cell). Each call gets its own copy."""
    if is_cell and line in _CELL_LINES:
        kept = _CELL_LINES[line]
        return Command(kept.verb, _copy(kept.args))
    words = split_line(line, "%ec2")
    if not words:
        raise UsageError(EC2_PARSER.format_help())
    verb = words[0]
    if verb in ("-h", "--help"):
        EC2_PARSER.print_help()
        return None
    if verb not in VERBS:
        raise UsageError(f"unknown command %ec2 {verb}: the verbs are {', '.join(VERBS)} (%ec2 -h says what each does)")
    args = VERBS[verb].parse(words[1:])
    if args is None:
        return None
    if verb in CELL_VERBS and not is_cell:
        raise UsageError(f"%ec2 {verb} is a cell magic: start the cell with %%ec2 {verb}")
    if is_cell and verb not in CELL_VERBS:
        raise UsageError(f"%%ec2 {verb} is not a cell command; did you mean %%ec2 run?")
    if is_cell:
        if len(_CELL_LINES) >= 256:
            _CELL_LINES.clear()
        _CELL_LINES[line] = Command(verb, _copy(args))
    return Command(verb, args)


def _copy(args: argparse.Namespace) -> argparse.Namespace:
    """A copy that shares nothing mutable (the lists of names) with ``args``."""
    return argparse.Namespace(**{k: list(v) if isinstance(v, list) else v for k, v in vars(args).items()})


def parse_store(line: str) -> argparse.Namespace | None:
    """Parse a ``%ec2_store`` line; None when ``-h`` printed the help."""
    return STORE_PARSER.parse(split_line(line, "%ec2_store"))


# -- generated docstrings ----------------------------------------------------------------------
def ec2_doc() -> str:
    """What ``%ec2?`` shows: the lead paragraph and verbs list, then every verb's help."""
    parts = [EC2_PARSER.format_help().rstrip()]
    parts += [parser.format_help().rstrip() for parser in VERBS.values()]
    return "\n\n".join(parts) + "\n"


def store_doc() -> str:
    """What ``%ec2_store?`` shows."""
    return STORE_PARSER.format_help()
