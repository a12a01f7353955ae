"""The EC2 provider's errors, and the translation of botocore's exceptions into them.

Every error here is an :class:`AwsError`, itself a :class:`~remotemagic.providers.base.ProviderError`:
the magics show it as one line (its class name and message), without a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ..base import ProviderError


class AwsError(ProviderError):
    """Something about AWS (credentials, region, a request EC2 refused)."""


class AwsCredentialsError(AwsError):
    """No usable AWS credentials in boto3's chain."""


class AwsRegionError(AwsError):
    """No AWS region configured."""


class AwsPermissionError(AwsError, PermissionError):
    """The AWS identity may not perform the request (IAM)."""


class UnknownInstanceTypeError(AwsError, ValueError):
    """The instance type does not exist in the region; ``suggestions`` holds close matches."""

    def __init__(self, message: str, suggestions: list[str] | None = None):
        super().__init__(message)
        self.suggestions = suggestions or []


class AmiNotFoundError(AwsError, LookupError):
    """The AMI (id, alias or SSM parameter) does not resolve to an image in the region."""


class IncompatibleAmiError(AwsError, ValueError):
    """The AMI's architecture does not match the instance type's."""


class NotOursError(AwsError, PermissionError):
    """The instance (or security group) exists but was not created by remotemagic."""


class AmbiguousInstanceError(AwsError, LookupError):
    """More than one live remotemagic instance carries the name."""


class InstanceNotFoundError(AwsError, LookupError):
    """No live remotemagic instance with that name or id."""


class PublicIpError(AwsError):
    """The caller's public IP could not be found, so SSH cannot be opened to it alone."""


class WaitTimeoutError(AwsError, TimeoutError):
    """An instance, a port or the console output did not get ready in time."""


class InstanceStateError(AwsError):
    """The instance went into a state that cannot lead where we wait (e.g. terminated)."""


class HostKeyError(AwsError):
    """The instance's SSH host keys could not be learnt from its console output."""


# ---------------------------------------------------------------------------------------------
# translation of botocore's exceptions into ours

_F = TypeVar("_F", bound=Callable[..., Any])

_CREDENTIAL_CODES = {
    "AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidToken",
}
_PERMISSION_CODES = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"}

CREDENTIALS_HELP = (
    "Run `aws configure` (or `aws sso login --profile NAME`), set AWS_PROFILE to a configured "
    "profile, or pass profile=... to the EC2 provider (%config Ec2Magics.profile = ...)."
)
REGION_HELP = (
    "Pass the `region` option (e.g. region='eu-west-1', or %config Ec2Magics.region = ...), set "
    "AWS_DEFAULT_REGION, or add `region = ...` to your AWS profile with `aws configure`."
)


def _translate(exc: BaseException, region: str | None = None) -> BaseException:
    """The remotemagic error for a botocore exception, or ``exc`` itself when not one of those."""
    from botocore import exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return AwsCredentialsError(f"No usable AWS credentials found ({exc}). {CREDENTIALS_HELP}")
    if isinstance(exc, bx.ProfileNotFound):
        return AwsCredentialsError(f"{exc}. Create it with `aws configure --profile NAME` or fix the `profile` option.")
    if isinstance(exc, (bx.SSOTokenLoadError, bx.TokenRetrievalError, bx.UnauthorizedSSOTokenError)):
        return AwsCredentialsError(f"AWS SSO login expired or missing ({exc}). Run `aws sso login`.")
    if isinstance(exc, bx.NoRegionError):
        return AwsRegionError(f"No AWS region is configured. {REGION_HELP}")
    if isinstance(exc, bx.EndpointConnectionError):
        return AwsError(f"Cannot reach AWS ({exc}). Check the network, the region name and any proxy settings.")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code, msg = str(err.get("Code", "")), str(err.get("Message", ""))
        op = getattr(exc, "operation_name", "request")
        if code in _CREDENTIAL_CODES:
            return AwsCredentialsError(f"AWS refused the credentials ({code}: {msg}). {CREDENTIALS_HELP}")
        if code in _PERMISSION_CODES:
            return AwsPermissionError(
                f"Your AWS identity is not allowed to call {op} ({code}: {msg}). Ask for the IAM permission "
                f"or use another profile."
            )
        if code == "OptInRequired":
            return AwsError(f"AWS {op} failed: the account is not opted in to this region or service ({msg}).")
        if code.startswith("InvalidAMIID"):
            return AmiNotFoundError(f"{msg or code} (region {region or '?'})")
        return AwsError(f"AWS {op} failed: {code}: {msg}")
    if isinstance(exc, bx.BotoCoreError):
        return AwsError(f"AWS request failed: {exc}")
    return exc


def _aws_errors(fn: _F) -> _F:
    """Decorate a public method so botocore's exceptions surface as remotemagic errors."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore import exceptions as bx

        try:
            return fn(self, *args, **kwargs)
        except (bx.BotoCoreError, bx.ClientError) as exc:
            region = self._region_if_known()
            raise _translate(exc, region) from exc

    return wrapper  # type: ignore[return-value]


#: RunInstances errors that mean "no spot instance for you now" (``start(spot=True, fallback=True)``).
SPOT_UNAVAILABLE = {"InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "InsufficientCapacity",
                    "MaxSpotInstanceCountExceeded"}


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))
