"""Errors of the SSH transport. Each message says what happened, where, and what to do.

Errors that a retry can cure (the host is unreachable right now, the link broke during the
handshake) subclass ``ConnectionError`` so that a reconnect loop keeps trying; errors that a
retry cannot cure (host keys, authentication, key permissions, bootstrap) do not.
"""

from __future__ import annotations

from ...errors import RemoteMagicError


class SSHError(RemoteMagicError):
    """Base class of the SSH transport's errors."""


class SSHConfigError(SSHError, ValueError):
    """The target or an OpenSSH config entry could not be understood."""


class HostNotFoundError(SSHError):
    """A host name did not resolve (DNS)."""


class UnreachableError(SSHError, ConnectionError):
    """A hop could not be reached (refused, timed out, no SSH server answering)."""


class HostKeyError(SSHError):
    """Base class of host key verification failures."""


class UnknownHostKeyError(HostKeyError):
    """The host is not in known_hosts (and trust on first use is off)."""


class HostKeyChangedError(HostKeyError):
    """The host presented a key that differs from the one in known_hosts."""


class AuthenticationError(SSHError):
    """No key was accepted for the user."""


class KeyPermissionError(AuthenticationError):
    """A private key file is readable by group or others (``chmod 600`` it)."""


class BootstrapError(SSHError):
    """The remote environment (interpreter, venv, packages, agent) could not be set up."""


class RemoteCommandError(SSHError):
    """A command run on the target (e.g. ``pip install``) exited with an error."""

    def __init__(self, message: str, status: int, output: str = ""):
        super().__init__(message)
        self.status = status
        self.output = output


__all__ = [
    "AuthenticationError",
    "BootstrapError",
    "HostKeyChangedError",
    "HostKeyError",
    "HostNotFoundError",
    "KeyPermissionError",
    "RemoteCommandError",
    "SSHConfigError",
    "SSHError",
    "UnknownHostKeyError",
    "UnreachableError",
]
