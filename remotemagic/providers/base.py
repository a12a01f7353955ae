"""The seam between remotemagic and where its machines come from: the :class:`Provider` protocol
(what the magics and the API need from a provider of machines) and :class:`ProviderError`.

A *provider* owns a machine's lifecycle (launch or attach, stop, terminate, resize, cost); a
*transport* (``remotemagic.transport``) reaches the agent on it. The target kinds in
:mod:`remotemagic.providers.registry` tie the two to the magics.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..errors import RemoteMagicError


class ProviderError(RemoteMagicError):
    """A provider refused or failed (credentials, quota, a machine not ours, a host down).

    Its message is complete for the user: the magics show ``ClassName: message`` in one line,
    without a traceback. Each provider derives its own errors from it.
    """


@runtime_checkable
class Machine(Protocol):
    """What the rest of remotemagic reads of a provider's machine (EC2: ``InstanceInfo``)."""

    name: str
    state: str

    @property
    def host(self) -> str | None:
        """The address to reach it at (None while it has none)."""


@runtime_checkable
class Provider(Protocol):
    """Machines that remotemagic starts and stops, named by the user.

    ``start`` attaches to the machine called ``name`` -- starting it if it is stopped -- or
    launches one when there is none; ``find`` only looks. ``stop`` keeps the machine's disk,
    ``terminate`` deletes it, ``resize`` changes its size (stop, change, start). ``status`` lists
    every machine of ours with its price and cost so far (``hourly_price`` where meaningful).
    A provider without some verb raises :class:`ProviderError` saying so; the target kind
    lists the verbs its provider supports (:attr:`remotemagic.providers.registry.TargetKind.verbs`).
    """

    def start(self, name: str, **options: Any) -> Any: ...

    def find(self, name: str) -> Any | None: ...

    def stop(self, name: str, **options: Any) -> Any: ...

    def terminate(self, name: str, **options: Any) -> Any: ...

    def resize(self, name: str, new_type: str, **options: Any) -> Any: ...

    def status(self) -> list[dict[str, Any]]: ...

    def hourly_price(self, machine_type: str, lifecycle: str = "on-demand",
                     availability_zone: str | None = None) -> tuple[float | None, str]: ...
