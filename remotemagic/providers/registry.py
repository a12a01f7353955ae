"""The registry of target kinds: where cells can run (``local``, ``ssh``, ``ec2``, ``fleet``...).

A :class:`TargetKind` knows everything kind-specific that the API and the magics need:

* :meth:`TargetKind.open` -- ``remotemagic.connect(target, **options)`` for targets of this kind
  (``"ssh://user@host"``, ``"ec2:NAME"``, ``"fleet:NAME"``...): it parses its own target form
  and takes its own options;
* :meth:`TargetKind.connect` -- the same from the magics: ``%ec2 use KIND [NAME]`` /
  ``%ec2 start KIND NAME``, building the options from the ``Ec2Magics`` configuration;
* :attr:`TargetKind.verbs` -- which machine verbs of ``%ec2`` it supports (``start``, ``stop``,
  ``terminate``, ``resize``), and the methods that carry them out, each returning the line the
  cell prints;
* :meth:`TargetKind.machine_name` -- the name of the machine a connection is on (what
  ``%ec2 stop`` without a name is about).

A kind's own failures are :class:`~remotemagic.providers.base.ProviderError`\\ s (shown as one
line, no traceback) or ``ValueError``\\ s (bad input: shown as a usage error).

Adding a target kind is one new package (``remotemagic/providers/<kind>/``, with a ``KIND``
object) plus one line in :data:`KINDS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from ..api import Remote

#: name -> "module:attribute" of its :class:`TargetKind` (imported when first used, so that
#: ``import remotemagic`` does not import boto3). One line per kind.
KINDS: dict[str, str] = {
    "local": "remotemagic.providers.local:KIND",
    "ssh": "remotemagic.providers.ssh:KIND",
    "ec2": "remotemagic.providers.ec2.kind:KIND",
    "fleet": "remotemagic.providers.fleet.kind:KIND",
}

#: The kind that ``%ec2 start/stop/terminate/resize --name NAME`` mean when no kind is named.
DEFAULT_MACHINE_KIND = "ec2"

#: The machine verbs of ``%ec2`` that a kind may support.
MACHINE_VERBS = ("start", "stop", "terminate", "resize")

_loaded: dict[str, TargetKind] = {}
#: ``%ec2 start`` flags by the option they set (for messages)
_LAUNCH_FLAGS = {"instance_type": "--type", "disk_gb": "--disk", "key_name": "--key"}


class UnknownKindError(ValueError):
    """No target kind of that name (the message names the known ones)."""


class TargetKind:
    """One kind of target. Subclasses set the class attributes and implement :meth:`open` and
    :meth:`connect`, plus the methods of the verbs they list in :attr:`verbs`."""

    #: the kind's name: the first word of ``%ec2 use``, the prefix of ``connect("NAME:...")``
    name: ClassVar[str] = ""
    #: how ``%ec2 use`` names one (for help and error messages), e.g. ``"ssh HOST"``
    usage: ClassVar[str] = ""
    #: what one machine of this kind is called in messages, e.g. ``"an EC2 instance"``
    noun: ClassVar[str] = ""
    #: the target forms :func:`remotemagic.connect` accepts, e.g. ``("'ec2:NAME'",)``
    target_forms: ClassVar[tuple[str, ...]] = ()
    #: machine verbs of ``%ec2`` this kind supports (a subset of :data:`MACHINE_VERBS`)
    verbs: ClassVar[frozenset[str]] = frozenset()

    def matches(self, target: str) -> bool:
        """Whether ``connect(target)`` is for this kind: ``NAME``, ``NAME:...`` or ``NAME ...``."""
        return target == self.name or target.startswith((self.name + ":", self.name + " "))

    def open(self, target: str, *, session: str, root: str | None = None, **options: Any) -> Remote:
        """``remotemagic.connect(target, ...)`` for a target of this kind."""
        raise NotImplementedError

    def connect(self, config: Any, address: str | None, *, root: str | None, session: str | None,
                options: dict[str, Any], python: str | None = None, trust: bool = False,
                ssh_config: str | None = None, start: bool = False,
                launch: dict[str, Any] | None = None) -> Remote:
        """Connect for the magics. ``config`` holds the ``Ec2Magics`` settings (its traits),
        ``address`` is what followed the kind in ``%ec2 use KIND ADDRESS``, ``options`` the
        :class:`~remotemagic.api.Remote` options common to every kind, ``start`` is true for
        ``%ec2 start`` (``launch``: its flags that were given)."""
        raise NotImplementedError

    def default_name(self, config: Any) -> str:
        """The machine ``%ec2 start KIND`` means when no name is given."""
        raise ValueError(f"name the {self.name} target: %ec2 use {self.usage}")

    def machine_name(self, remote: Remote | None) -> str | None:
        """The name of the machine ``remote`` is on, if it is one of this kind's (else None)."""
        return None

    def check_launch(self, launch: dict[str, Any]) -> None:
        """Refuse ``%ec2 start`` flags that mean nothing for this kind (``ValueError``)."""
        if launch:
            flags = [_LAUNCH_FLAGS.get(k, "--" + k.replace("_", "-")) for k in sorted(launch)]
            verb = "applies" if len(flags) == 1 else "apply"
            raise ValueError(f"%ec2 start {self.name}: {', '.join(flags)} {verb} to EC2 instances only")

    def started(self, remote: Remote, config: Any) -> str:
        """What ``%ec2 start`` prints after connecting."""
        return f"Using {remote.target}"

    def status_lines(self, remote: Remote) -> list[str]:
        """What ``%ec2 status`` adds about the machine(s) behind ``remote`` (e.g. a fleet's other hosts)."""
        return []

    def stop(self, config: Any, name: str, current: Remote | None) -> str:
        raise self.unsupported("stop")

    def terminate(self, config: Any, name: str, current: Remote | None) -> str:
        raise self.unsupported("terminate")

    def resize(self, config: Any, name: str, new_type: str, current: Remote | None) -> str:
        raise self.unsupported("resize")

    def unsupported(self, verb: str) -> ValueError:
        """The error for a machine verb this kind does not have."""
        has = ", ".join(sorted(self.verbs)) or "none"
        return ValueError(f"%ec2 {verb} does not apply to {self.name} targets ({self.name} supports: {has})")

    def __repr__(self) -> str:
        return f"<target kind {self.name}>"


def names() -> list[str]:
    """The registered kinds' names, in registration order."""
    return list(KINDS)


def get(name: str) -> TargetKind:
    """The kind called ``name``; :class:`UnknownKindError` naming the known ones otherwise."""
    if name not in KINDS:
        raise UnknownKindError(f"unknown target kind {name!r}: use {_usages()}")
    if name not in _loaded:
        module, _, attr = KINDS[name].partition(":")
        kind = getattr(importlib.import_module(module), attr)
        if not isinstance(kind, TargetKind) or kind.name != name:
            raise TypeError(f"{KINDS[name]} is not the TargetKind {name!r}")
        _loaded[name] = kind
    return _loaded[name]


def kinds() -> list[TargetKind]:
    """Every registered kind."""
    return [get(n) for n in KINDS]


def with_verb(verb: str) -> list[TargetKind]:
    """The kinds that support the machine verb ``verb``."""
    return [k for k in kinds() if verb in k.verbs]


def for_target(target: str) -> TargetKind:
    """The kind a :func:`remotemagic.connect` target string is for (``ValueError`` if none)."""
    for kind in kinds():
        if kind.matches(target):
            return kind
    forms = [f for k in kinds() for f in k.target_forms]
    raise UnknownKindError(f"unknown target {target!r}: use {', '.join(forms[:-1])} or {forms[-1]}")


def _usages() -> str:
    usages = [get(n).usage for n in KINDS]
    return ", ".join(usages[:-1]) + " or " + usages[-1]
