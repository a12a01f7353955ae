"""EC2 lifecycle: find, launch, start, stop, resize and terminate remotemagic's instances, with
secure defaults, idle auto-stop arranged on the instance, cost reporting and host-key learning.

This layer is plain Python and knows nothing of SSH; it hands the SSH transport a host, a login
user and verified host keys. AWS credentials and region come from boto3's normal chain (the
``profile`` and ``region`` options, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, ``~/.aws/config``).

Every instance it launches is tagged ``created-by=remotemagic`` and ``remotemagic:name=<name>``;
it never stops, resizes or terminates an instance without those tags.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import difflib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

from .. import notices
from ..errors import RemoteMagicError

log = logging.getLogger("remotemagic")

CREATED_BY = "created-by"
CREATED_BY_VALUE = "remotemagic"
NAME_TAG = "remotemagic:name"
USER_TAG = "remotemagic:user"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
DEFAULT_DISK_GB = 30
CHECKIP_URL = "https://checkip.amazonaws.com"

UBUNTU_SSM = {
    "x86_64": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "arm64": "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id",
}
AL2023_SSM = {
    "x86_64": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
    "arm64": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
}
AMI_ALIASES: dict[str, dict[str, str]] = {"ubuntu": UBUNTU_SSM, "ubuntu24.04": UBUNTU_SSM, "al2023": AL2023_SSM}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


# ---------------------------------------------------------------------------------------------
# errors


class AwsError(RemoteMagicError):
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
    def wrapper(self: Ec2Provider, *args: Any, **kwargs: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------
# pure helpers: user-data, console host keys, known_hosts


_IDLE_CHECK = r"""#!/bin/bash
# remotemagic idle check, run every minute by remotemagic-idle.timer (or cron).
# Busy = a remotemagic job runs (a sessions/*/current file written since this boot)
#        or someone is logged in on a terminal (who).
# Idle time counts from the later of: when the machine was first seen idle, and the last time
# a remotemagic client used it ($RM_ROOT/activity: the agent touches it on every request, and
# every minute while the client has a tunnel open). An open but unused connection -- a laptop
# whose notebook stays open overnight -- does not keep the instance running.
# After IDLE_MINUTES without being busy the machine shuts down; the instance was launched with
# InstanceInitiatedShutdownBehavior=stop, so it stops (its disk is kept), it is not terminated.
# Settings live in /etc/remotemagic/idle.conf (IDLE_MINUTES=0 disables); the idle clock is in
# /run, so it restarts on every boot.
set -u
IDLE_MINUTES=60
RM_USER=ubuntu
CONF="${REMOTEMAGIC_IDLE_CONF:-/etc/remotemagic/idle.conf}"
if [ -r "$CONF" ]; then . "$CONF"; fi
if [ -z "${RM_ROOT:-}" ]; then
    home="$(getent passwd "$RM_USER" 2>/dev/null | cut -d: -f6)"
    RM_ROOT="${home:-/home/$RM_USER}/.remotemagic"
fi
STATE_FILE="${STATE_FILE:-/run/remotemagic-idle-since}"
NOW="${NOW:-$(date +%s)}"
BOOT_TIME="${BOOT_TIME:-$(awk '/^btime/ {print $2}' /proc/stat 2>/dev/null)}"
BOOT_TIME="${BOOT_TIME:-0}"
WHO_CMD="${WHO_CMD:-who}"
CHECK_LOGINS="${CHECK_LOGINS:-1}"
SHUTDOWN_CMD="${SHUTDOWN_CMD:-shutdown -h now}"

job_running() {
    local f m
    for f in "$RM_ROOT"/sessions/*/current; do
        [ -e "$f" ] || continue
        m="$(stat -c %Y "$f" 2>/dev/null || echo 0)"
        # a file left from before a reboot is stale: its worker is gone
        if [ "$m" -ge "$BOOT_TIME" ]; then return 0; fi
    done
    return 1
}

logged_in() {
    [ "$CHECK_LOGINS" = 1 ] || return 1
    command -v "$WHO_CMD" >/dev/null 2>&1 || return 1
    [ -n "$("$WHO_CMD" 2>/dev/null)" ]
}

case "$IDLE_MINUTES" in ''|*[!0-9]*) echo "remotemagic-idle: bad IDLE_MINUTES=$IDLE_MINUTES" >&2; exit 2;; esac
if [ "$IDLE_MINUTES" -eq 0 ]; then
    rm -f "$STATE_FILE"
    echo "disabled"
    exit 0
fi
if job_running || logged_in; then
    rm -f "$STATE_FILE"
    echo "busy"
    exit 0
fi
since="$(cat "$STATE_FILE" 2>/dev/null || true)"
case "$since" in
    ''|*[!0-9]*) echo "$NOW" > "$STATE_FILE"; since="$NOW";;
esac
used="$(stat -c %Y "$RM_ROOT/activity" 2>/dev/null || echo 0)"
if [ "$used" -ge "$BOOT_TIME" ] && [ "$used" -gt "$since" ]; then since="$used"; fi
if [ "$since" -ge "$NOW" ]; then echo "idle since $NOW"; exit 0; fi
idle=$(( NOW - since ))
if [ "$idle" -ge $(( IDLE_MINUTES * 60 )) ]; then
    echo "idle for $(( idle / 60 )) minutes: shutting down"
    logger -t remotemagic "idle for $(( idle / 60 )) minutes (limit $IDLE_MINUTES): shutting down" 2>/dev/null || true
    $SHUTDOWN_CMD
    exit 0
fi
echo "idle for $(( idle / 60 )) of $IDLE_MINUTES minutes"
"""


def idle_check_script() -> str:
    """The shell script the instance runs every minute to decide whether to shut itself down.

    Its defaults can be overridden by environment variables (``RM_ROOT``, ``STATE_FILE``, ``NOW``,
    ``BOOT_TIME``, ``WHO_CMD``, ``CHECK_LOGINS``, ``SHUTDOWN_CMD``, ``REMOTEMAGIC_IDLE_CONF``) so its
    logic can be exercised outside an instance; systemd and cron run it with none of them set.
    """
    return _IDLE_CHECK


def idle_stop_user_data(minutes: int, user: str) -> str:
    """Cloud-init user-data (a root shell script, run once at first boot) arranging idle auto-stop.

    It installs ``/usr/local/sbin/remotemagic-idle-check`` (see :func:`idle_check_script`), its
    settings ``/etc/remotemagic/idle.conf`` (``IDLE_MINUTES``, ``RM_USER``) and a systemd timer
    running it every minute (cron where there is no systemd). ``minutes=0`` installs it disabled, so
    it can be switched on later by rewriting the settings file.
    """
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 0:
        raise ValueError(f"idle_stop_minutes must be a whole number >= 0 (0 disables), not {minutes!r}")
    if not _USER_RE.match(user or ""):
        raise ValueError(f"invalid login user name {user!r}")
    script = idle_check_script()
    if "REMOTEMAGIC_IDLE_CHECK_EOF" in script:  # pragma: no cover - guards the heredoc below
        raise AssertionError("heredoc marker inside the script")
    state = f"after {minutes} idle minutes" if minutes else "disabled (IDLE_MINUTES=0)"
    return f"""#!/bin/bash
# remotemagic: idle auto-stop, {state}.
# Written by remotemagic; cloud-init runs it once, as root, on the first boot.
set -eu
umask 022
install -d -m 0755 /usr/local/sbin /etc/remotemagic
cat > /usr/local/sbin/remotemagic-idle-check <<'REMOTEMAGIC_IDLE_CHECK_EOF'
{script}REMOTEMAGIC_IDLE_CHECK_EOF
chmod 0755 /usr/local/sbin/remotemagic-idle-check
cat > /etc/remotemagic/idle.conf <<'REMOTEMAGIC_IDLE_CONF_EOF'
# remotemagic idle auto-stop: minutes without jobs, client requests or logins before shutdown (0: never)
IDLE_MINUTES={minutes}
RM_USER={user}
REMOTEMAGIC_IDLE_CONF_EOF
chmod 0644 /etc/remotemagic/idle.conf
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    cat > /etc/systemd/system/remotemagic-idle.service <<'REMOTEMAGIC_UNIT_EOF'
[Unit]
Description=remotemagic: stop this instance when it has been idle

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/remotemagic-idle-check
REMOTEMAGIC_UNIT_EOF
    cat > /etc/systemd/system/remotemagic-idle.timer <<'REMOTEMAGIC_UNIT_EOF'
[Unit]
Description=remotemagic: check every minute whether this instance is idle

[Timer]
OnBootSec=1min
OnUnitActiveSec=1min
AccuracySec=10s

[Install]
WantedBy=timers.target
REMOTEMAGIC_UNIT_EOF
    systemctl daemon-reload
    systemctl enable --now remotemagic-idle.timer
else
    echo '* * * * * root /usr/local/sbin/remotemagic-idle-check >/dev/null 2>&1' > /etc/cron.d/remotemagic-idle
    chmod 0644 /etc/cron.d/remotemagic-idle
fi
"""


_KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY_RE = re.compile(r"(?<![\w@.-])(" + "|".join(re.escape(t) for t in _KEY_TYPES) + r")\s+([A-Za-z0-9+/]+={0,2})")
_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
_END = "-----END SSH HOST KEY KEYS-----"


def _key_blob_ok(key_type: str, b64: str) -> bool:
    """The base64 blob decodes and names the same key type inside (as every SSH public key does)."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        return False
    if len(raw) < 4:
        return False
    n = int.from_bytes(raw[:4], "big")
    return raw[4:4 + n] == key_type.encode()


def host_keys_from_console(text: str) -> list[str]:
    """SSH host public keys (``"type base64"``) that cloud-init printed on the serial console.

    Reads the last complete ``-----BEGIN SSH HOST KEY KEYS-----`` ... ``-----END ...-----`` block
    (a later boot prints a newer one). Lines may carry prefixes (``ec2:``, a kernel timestamp) or
    be interleaved with kernel messages; only well-formed keys whose blob matches their type are
    kept. Returns ``[]`` when the console holds no complete block yet.
    """
    if not text:
        return []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    end = text.rfind(_END)
    if end < 0:
        return []
    begin = text.rfind(_BEGIN, 0, end)
    if begin < 0:
        return []
    block = text[begin + len(_BEGIN):end]
    keys: list[str] = []
    for line in block.split("\n"):
        for m in _KEY_RE.finditer(line):
            key = f"{m.group(1)} {m.group(2)}"
            if _key_blob_ok(m.group(1), m.group(2)) and key not in keys:
                keys.append(key)
    return keys


def _host_pattern(address: str, port: int = 22) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def _hashed_host_matches(field: str, host: str) -> bool:
    # OpenSSH HashKnownHosts format: |1|base64(salt)|base64(HMAC-SHA1(salt, host))
    try:
        _, magic, salt64, mac64 = field.split("|")
        if magic != "1":
            return False
        salt, mac = base64.b64decode(salt64), base64.b64decode(mac64)
    except ValueError:
        return False
    return hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), mac)


def _without_hosts(line: str, patterns: set[str]) -> str | None:
    """``line`` with the host names in ``patterns`` removed; None when no host name is left."""
    fields = line.split()
    if not fields or line.lstrip().startswith("#"):
        return line
    at = 1 if fields[0].startswith("@") and len(fields) > 1 else 0  # @cert-authority / @revoked
    hosts = fields[at]
    if hosts.startswith("|1|"):
        return None if any(_hashed_host_matches(hosts, p) for p in patterns) else line
    names = hosts.split(",")
    left = [n for n in names if n not in patterns]
    if len(left) == len(names):
        return line
    if not left:
        return None
    fields[at] = ",".join(left)
    return " ".join(fields)


def record_known_hosts(path: str | os.PathLike[str], address: str | Iterable[str], keys: Iterable[str],
                       port: int = 22) -> str:
    """Make ``keys`` the known host keys of ``address`` in the known_hosts file at ``path``.

    ``address`` may be several names (e.g. the public IP and the instance id, the latter for use
    as an OpenSSH ``HostKeyAlias``). Earlier entries for those names (plain or hashed) are
    dropped, since an EC2 address is reused by other machines; every other entry is kept. The
    file is replaced atomically (temporary file, fsync, rename) with mode 0600. Returns the path.
    """
    from ..agent.files import atomic_write, private_dir

    names = [address] if isinstance(address, str) else list(address)
    keys = [k.strip() for k in keys if k and k.strip()]
    if not keys:
        raise HostKeyError(f"no host keys to record for {', '.join(names)}")
    if not names or any(not n or any(c.isspace() or c == "," for c in n) for n in names):
        raise ValueError(f"invalid host name(s) for known_hosts: {names!r}")
    path = os.fspath(os.path.expanduser(path))
    patterns = [_host_pattern(n, port) for n in names]
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read().splitlines()
    except FileNotFoundError:
        old = []
    kept = [x for x in (_without_hosts(line, set(patterns)) for line in old) if x is not None]
    lines = kept + [f"{p} {k}" for p in patterns for k in keys]
    private_dir(os.path.dirname(os.path.abspath(path)))
    atomic_write(path, [("\n".join(lines) + "\n").encode()])
    os.chmod(path, 0o600)
    return path


def login_user_for_image(image: dict[str, Any]) -> str:
    """The default login user of an AMI, guessed from its name and description."""
    text = " ".join(str(image.get(k) or "") for k in ("Name", "Description", "ImageLocation")).lower()
    if "ubuntu" in text:
        return "ubuntu"
    if "amazon linux" in text or "amzn" in text or "al2023" in text:
        return "ec2-user"
    if "debian" in text:
        return "admin"
    return "ubuntu"


def public_ip_from_checkip(timeout: float = 3.0) -> str:
    """This machine's public IPv4 address as AWS sees it (https://checkip.amazonaws.com)."""
    with urllib.request.urlopen(CHECKIP_URL, timeout=timeout) as resp:  # noqa: S310 - fixed https URL
        return resp.read(64).decode("ascii", "replace").strip()


def on_demand_hourly_usd(price_list: Iterable[str | dict[str, Any]]) -> float | None:
    """The on-demand USD per hour in a Pricing API ``GetProducts`` ``PriceList`` (JSON strings).

    Prefers the plain ``RunInstances`` operation (no licensed software) when several products
    match; None when no positive hourly price is there.
    """
    found: list[tuple[int, float]] = []
    for item in price_list:
        try:
            product = json.loads(item) if isinstance(item, str) else item
        except ValueError:
            continue
        attrs = (product.get("product") or {}).get("attributes") or {}
        rank = 0 if attrs.get("operation", "RunInstances") == "RunInstances" else 1
        for term in ((product.get("terms") or {}).get("OnDemand") or {}).values():
            for dim in (term.get("priceDimensions") or {}).values():
                if str(dim.get("unit", "Hrs")).lower() not in ("hrs", "hours", "hour"):
                    continue
                try:
                    usd = float((dim.get("pricePerUnit") or {}).get("USD", "0"))
                except ValueError:
                    continue
                if usd > 0:
                    found.append((rank, usd))
    return min(found)[1] if found else None


@functools.lru_cache(maxsize=1)
def packaged_prices() -> dict[str, Any]:
    """The packaged fallback price table (``ec2_prices.json``): source, date and $/h per type."""
    text = resources.files(__package__).joinpath("ec2_prices.json").read_text(encoding="utf-8")
    return json.loads(text)


# ---------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A one-line tqdm status (elapsed time and a message) for waits; silent when disabled."""

    def __init__(self, desc: str, enabled: bool):
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, desc=desc, bar_format="{desc}{postfix} [{elapsed}]", leave=False)
        self._last = ""

    def message(self, text: str) -> None:
        if self._bar is not None and text != self._last:
            self._bar.set_postfix_str(text, refresh=True)
        elif self._bar is not None:
            self._bar.refresh()
        self._last = text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def _progress(desc: str, enabled: bool) -> Iterator[_Progress]:
    p = _Progress(desc, enabled)
    try:
        yield p
    finally:
        p.close()


# ---------------------------------------------------------------------------------------------
# the provider


def _tags(desc: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in desc.get("Tags") or []}


def _is_ours(tags: dict[str, str]) -> bool:
    return tags.get(CREATED_BY) == CREATED_BY_VALUE and bool(tags.get(NAME_TAG))


@dataclasses.dataclass
class InstanceInfo:
    """What the rest of remotemagic needs to know about one of our instances."""

    instance_id: str
    name: str
    state: str
    instance_type: str
    lifecycle: str  # "spot" or "on-demand"
    user: str
    public_ip: str | None = None
    public_dns: str | None = None
    private_ip: str | None = None
    availability_zone: str | None = None
    launch_time: _dt.datetime | None = None
    image_id: str | None = None
    key_name: str | None = None
    owner: str | None = None
    architecture: str | None = None
    security_group_ids: list[str] = dataclasses.field(default_factory=list)
    spot_request_id: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def host(self) -> str | None:
        """The address to SSH to: public IP, else public DNS, else private IP."""
        return self.public_ip or self.public_dns or self.private_ip

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> InstanceInfo:
        tags = _tags(d)
        return cls(
            instance_id=d["InstanceId"],
            name=tags.get(NAME_TAG) or tags.get("Name") or d["InstanceId"],
            state=d.get("State", {}).get("Name", "unknown"),
            instance_type=d.get("InstanceType", "?"),
            lifecycle="spot" if d.get("InstanceLifecycle") == "spot" else "on-demand",
            user=tags.get(USER_TAG) or "ubuntu",
            public_ip=d.get("PublicIpAddress") or None,
            public_dns=d.get("PublicDnsName") or None,
            private_ip=d.get("PrivateIpAddress") or None,
            availability_zone=(d.get("Placement") or {}).get("AvailabilityZone"),
            launch_time=d.get("LaunchTime"),
            image_id=d.get("ImageId"),
            key_name=d.get("KeyName"),
            owner=tags.get("owner"),
            architecture=d.get("Architecture"),
            security_group_ids=[g["GroupId"] for g in d.get("SecurityGroups") or []],
            spot_request_id=d.get("SpotInstanceRequestId") or None,
            tags=tags,
        )


class Ec2Provider:
    """Launch, attach to, stop, resize and terminate remotemagic's EC2 instances in one region.

    ``region``/``profile`` (or ``session``, a ``boto3.Session``) pick the AWS account and region
    through boto3's normal chain. ``ssh_cidrs`` replaces the default SSH rule (the caller's public
    IP /32, looked up at https://checkip.amazonaws.com). ``idle_stop_minutes`` is how long the
    instance may sit without jobs or SSH connections before it stops itself (0: never).

    Attributes worth overriding: ``ami_ssm_parameter`` (architecture -> public SSM parameter of
    the default AMI), ``public_ip_lookup`` (callable returning this machine's public IP),
    ``poll_interval`` (seconds between state polls).
    """

    def __init__(
        self,
        region: str | None = None,
        profile: str | None = None,
        *,
        ssh_cidrs: Iterable[str] | None = None,
        idle_stop_minutes: int = 60,
        key_name: str | None = None,
        instance_type: str = "t3.large",
        session: Any = None,
        public_ip_lookup: Callable[[], str] | None = None,
        ami_ssm_parameter: dict[str, str] | None = None,
    ):
        if isinstance(idle_stop_minutes, bool) or not isinstance(idle_stop_minutes, int) or idle_stop_minutes < 0:
            raise ValueError(f"idle_stop_minutes must be a whole number >= 0 (0 disables), not {idle_stop_minutes!r}")
        self.region_option = region
        self.profile = profile
        self.ssh_cidrs = [self._check_cidr(c) for c in ssh_cidrs] if ssh_cidrs else None
        self.idle_stop_minutes = idle_stop_minutes
        self.key_name = key_name
        self.instance_type = instance_type
        self.public_ip_lookup: Callable[[], str] = public_ip_lookup or public_ip_from_checkip
        self.ami_ssm_parameter: dict[str, str] = dict(ami_ssm_parameter or UBUNTU_SSM)
        self.poll_interval = 3.0
        self.console_poll_interval = 10.0
        self.pricing_timeout = 3.0
        self._session = session
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._type_info: dict[str, dict[str, Any]] = {}
        self._all_types: list[str] | None = None
        self._price_cache: dict[tuple[str, str], float | None] = {}
        self._pricing_unavailable = False
        self._owner: str | None = None

    # -- clients ------------------------------------------------------------------------------

    def _boto_session(self) -> Any:
        if self._session is None:
            import boto3

            self._session = boto3.Session(profile_name=self.profile, region_name=self.region_option)
        return self._session

    def _client(self, service: str, region: str | None = None, config: Any = None) -> Any:
        key = (service, region)
        if key not in self._clients:
            from botocore.config import Config

            cfg = config or Config(
                retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60,
                user_agent_extra="remotemagic",
            )
            self._clients[key] = self._boto_session().client(
                service, region_name=region or self.region_option, config=cfg
            )
        return self._clients[key]

    @property
    def ec2(self) -> Any:
        return self._client("ec2")

    @property
    def region(self) -> str:
        """The region in use (resolved through boto3's chain)."""
        from botocore import exceptions as bx

        try:
            return self.ec2.meta.region_name
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise _translate(exc) from exc

    def _region_if_known(self) -> str | None:
        try:
            return self.region
        except AwsError:
            return self.region_option

    # -- lookups --------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"invalid instance name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        return name

    @staticmethod
    def _check_cidr(cidr: str) -> str:
        try:
            net = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"invalid ssh_cidrs entry {cidr!r}: {exc}") from None
        if net.prefixlen == 0:
            notices.notify(f"ssh_cidrs contains {net}: SSH will be open to the whole internet", logger=log)
        return str(net)

    def _describe(self, filters: list[dict[str, Any]] | None = None, ids: list[str] | None = None) -> list[dict]:
        kwargs: dict[str, Any] = {}
        if filters:
            kwargs["Filters"] = filters
        if ids:
            kwargs["InstanceIds"] = ids
        out = []
        for page in self.ec2.get_paginator("describe_instances").paginate(**kwargs):
            for res in page.get("Reservations", []):
                out.extend(res.get("Instances", []))
        return out

    def _describe_one(self, instance_id: str) -> dict[str, Any]:
        found = self._describe(ids=[instance_id])
        if not found:
            raise InstanceNotFoundError(f"instance {instance_id} not found in region {self.region}")
        return found[0]

    def _ours_by_name(self, name: str) -> list[dict[str, Any]]:
        return self._describe(filters=[
            {"Name": f"tag:{CREATED_BY}", "Values": [CREATED_BY_VALUE]},
            {"Name": f"tag:{NAME_TAG}", "Values": [name]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ])

    @_aws_errors
    def find(self, name: str) -> InstanceInfo | None:
        """Our live (not terminated) instance called ``name``, or None.

        Raises :class:`AmbiguousInstanceError` when several carry the name.
        """
        self._check_name(name)
        found = self._ours_by_name(name)
        if len(found) > 1:
            ids = ", ".join(f"{d['InstanceId']} ({d['State']['Name']})" for d in found)
            raise AmbiguousInstanceError(
                f"{len(found)} remotemagic instances are named {name!r} in {self.region}: {ids}. "
                f"Terminate the extra ones by id (terminate('i-...')) or rename one with its "
                f"'{NAME_TAG}' tag."
            )
        return InstanceInfo.from_description(found[0]) if found else None

    def _resolve_ours(self, name_or_id: str, action: str) -> dict[str, Any]:
        """Our live instance by name or id; refuses anything not tagged as ours."""
        if _INSTANCE_ID_RE.match(name_or_id or ""):
            d = self._describe_one(name_or_id)
            if not _is_ours(_tags(d)):
                raise NotOursError(
                    f"refusing to {action} {name_or_id}: it was not created by remotemagic (no tag "
                    f"{CREATED_BY}={CREATED_BY_VALUE}). Manage it with the AWS console or CLI."
                )
            if d["State"]["Name"] not in LIVE_STATES:
                raise InstanceNotFoundError(f"instance {name_or_id} is {d['State']['Name']}")
            return d
        self._check_name(name_or_id)
        found = self._ours_by_name(name_or_id)
        if len(found) > 1:
            self.find(name_or_id)  # raises the ambiguity error
        if found:
            return found[0]
        foreign = [
            d for d in self._describe(filters=[
                {"Name": "tag:Name", "Values": [name_or_id]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ])
            if not _is_ours(_tags(d))
        ]
        if foreign:
            ids = ", ".join(d["InstanceId"] for d in foreign)
            raise NotOursError(
                f"refusing to {action} {name_or_id!r} ({ids}): it was not created by remotemagic (no tag "
                f"{CREATED_BY}={CREATED_BY_VALUE}). Manage it with the AWS console or CLI."
            )
        raise InstanceNotFoundError(f"no remotemagic instance named {name_or_id!r} in {self.region}")

    @_aws_errors
    def instance_type_info(self, instance_type: str) -> dict[str, Any]:
        """DescribeInstanceTypes for one type; :class:`UnknownInstanceTypeError` with close matches."""
        if instance_type in self._type_info:
            return self._type_info[instance_type]
        from botocore.exceptions import ClientError

        try:
            types = self.ec2.describe_instance_types(InstanceTypes=[instance_type]).get("InstanceTypes", [])
        except ClientError as exc:
            if _code(exc) not in ("InvalidInstanceType", "InvalidParameterValue"):
                raise
            types = []
        if not types:
            close = difflib.get_close_matches(instance_type, self._instance_type_names(), n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UnknownInstanceTypeError(
                f"instance type {instance_type!r} does not exist in region {self.region}.{hint}", close
            )
        self._type_info[instance_type] = types[0]
        return types[0]

    def _instance_type_names(self) -> list[str]:
        if self._all_types is None:
            names: list[str] = []
            for page in self.ec2.get_paginator("describe_instance_types").paginate():
                names.extend(t["InstanceType"] for t in page.get("InstanceTypes", []))
            self._all_types = sorted(names)
        return self._all_types

    @_aws_errors
    def architecture(self, instance_type: str) -> str:
        """``arm64`` for Graviton types, else ``x86_64``."""
        archs = self.instance_type_info(instance_type).get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        return "x86_64" if "x86_64" in archs or not archs else archs[0]

    def _ssm_image_id(self, parameter: str) -> str:
        from botocore.exceptions import ClientError

        try:
            return self._client("ssm").get_parameter(Name=parameter)["Parameter"]["Value"]
        except ClientError as exc:
            if _code(exc) in ("ParameterNotFound", "ValidationException"):
                raise AmiNotFoundError(
                    f"public SSM parameter {parameter} does not exist in region {self.region}; pass ami='ami-...'"
                ) from None
            raise

    @_aws_errors
    def resolve_ami(self, ami: str | None, arch: str) -> dict[str, Any]:
        """The DescribeImages entry for ``ami`` (id, alias, SSM path or None for the default)."""
        if ami is None:
            param = self.ami_ssm_parameter.get(arch)
            if not param:
                raise AmiNotFoundError(f"no default AMI configured for {arch} (ami_ssm_parameter); pass ami='ami-...'")
            image_id = self._ssm_image_id(param)
        elif ami.lower() in AMI_ALIASES:
            image_id = self._ssm_image_id(AMI_ALIASES[ami.lower()][arch])
        elif ami.startswith("/") or ami.startswith("ssm:"):
            image_id = self._ssm_image_id(ami[4:] if ami.startswith("ssm:") else ami)
        elif ami.startswith("ami-"):
            image_id = ami
        else:
            raise AmiNotFoundError(
                f"unknown AMI {ami!r}: give an id (ami-...), an SSM parameter path, or one of the aliases "
                f"{', '.join(sorted(AMI_ALIASES))}"
            )
        from botocore.exceptions import ClientError

        try:
            images = self.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
        except ClientError as exc:
            if not _code(exc).startswith("InvalidAMIID"):
                raise
            images = []
        if not images:
            raise AmiNotFoundError(f"AMI {image_id} does not exist in region {self.region}")
        image = images[0]
        if image.get("State", "available") != "available":
            raise AmiNotFoundError(f"AMI {image_id} is {image.get('State')}, not available, in region {self.region}")
        img_arch = image.get("Architecture")
        if img_arch and img_arch != arch:
            raise IncompatibleAmiError(
                f"AMI {image_id} ({image.get('Name', '')}) is built for {img_arch} but the instance type needs {arch}"
            )
        return image

    @_aws_errors
    def owner(self) -> str:
        """The caller's identity ARN (the ``owner`` tag)."""
        if self._owner is None:
            from botocore.exceptions import ClientError

            try:
                self._owner = self._client("sts").get_caller_identity().get("Arn", "unknown")
            except ClientError as exc:
                if _code(exc) in _CREDENTIAL_CODES:
                    raise
                log.warning("cannot read the caller's identity for the owner tag: %s", exc)
                self._owner = "unknown"
        return self._owner

    # -- security group -----------------------------------------------------------------------

    def ssh_source_cidrs(self) -> list[str]:
        """The CIDRs SSH is opened to: ``ssh_cidrs``, else the caller's public IP as /32."""
        if self.ssh_cidrs:
            return list(self.ssh_cidrs)
        try:
            text = self.public_ip_lookup()
            ip = ipaddress.ip_address(str(text).strip())
        except (OSError, ValueError) as exc:
            raise PublicIpError(
                f"cannot find this machine's public IP address ({CHECKIP_URL}: {exc}), so the security group "
                f"cannot open SSH to it alone. Set the `ssh_cidrs` option (e.g. ssh_cidrs=['203.0.113.7/32'], "
                f"or %config Ec2Magics.ssh_cidrs) to the addresses you connect from."
            ) from None
        return [f"{ip}/{ip.max_prefixlen}"]

    def _default_vpc(self) -> str:
        vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}]).get("Vpcs", [])
        if not vpcs:
            raise AwsError(
                f"region {self.region} has no default VPC; create one with `aws ec2 create-default-vpc` "
                f"(custom VPCs and subnets are not supported yet)"
            )
        return vpcs[0]["VpcId"]

    @_aws_errors
    def ensure_security_group(self, name: str, vpc_id: str | None = None) -> str:
        """Create or fix ``remotemagic-<name>`` so it allows exactly TCP 22 from the SSH CIDRs."""
        group_name = f"remotemagic-{self._check_name(name)}"
        cidrs = self.ssh_source_cidrs()
        vpc_id = vpc_id or self._default_vpc()
        groups = self.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [group_name]}, {"Name": "vpc-id", "Values": [vpc_id]},
        ]).get("SecurityGroups", [])
        if groups:
            group = groups[0]
            if _tags(group).get(CREATED_BY) != CREATED_BY_VALUE:
                raise NotOursError(
                    f"security group {group_name} ({group['GroupId']}) exists but was not created by remotemagic; "
                    f"delete or rename it, or choose another instance name"
                )
            group_id = group["GroupId"]
        else:
            tags = [{"Key": CREATED_BY, "Value": CREATED_BY_VALUE}, {"Key": NAME_TAG, "Value": name},
                    {"Key": "Name", "Value": group_name}]
            group_id = self.ec2.create_security_group(
                GroupName=group_name, VpcId=vpc_id,
                Description=f"remotemagic {name}: SSH from the owner's address only",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
            )["GroupId"]
            group = {"GroupId": group_id, "IpPermissions": []}
            log.info("created security group %s (%s)", group_name, group_id)
        self._sync_ingress(group, cidrs)
        return group_id

    def _sync_ingress(self, group: dict[str, Any], cidrs: list[str]) -> None:
        want = set(cidrs)
        have: set[str] = set()
        revoke: list[dict[str, Any]] = []
        for perm in group.get("IpPermissions", []):
            is_ssh = perm.get("IpProtocol") == "tcp" and perm.get("FromPort") == 22 and perm.get("ToPort") == 22
            base = {k: perm[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in perm}
            for r in perm.get("IpRanges", []):
                if is_ssh and r.get("CidrIp") in want:
                    have.add(r["CidrIp"])
                else:
                    revoke.append({**base, "IpRanges": [{"CidrIp": r["CidrIp"]}]})
            for r in perm.get("Ipv6Ranges", []):
                if is_ssh and r.get("CidrIpv6") in want:
                    have.add(r["CidrIpv6"])
                else:
                    revoke.append({**base, "Ipv6Ranges": [{"CidrIpv6": r["CidrIpv6"]}]})
            for key in ("UserIdGroupPairs", "PrefixListIds"):
                for r in perm.get(key, []):
                    revoke.append({**base, key: [r]})
        if revoke:
            log.info("security group %s: revoking %d rule(s) other than SSH from %s", group["GroupId"], len(revoke),
                     ", ".join(cidrs))
            self.ec2.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=revoke)
        add = [c for c in cidrs if c not in have]
        if add:
            v4 = [{"CidrIp": c, "Description": "remotemagic SSH"} for c in add if ":" not in c]
            v6 = [{"CidrIpv6": c, "Description": "remotemagic SSH"} for c in add if ":" in c]
            perm: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
            if v4:
                perm["IpRanges"] = v4
            if v6:
                perm["Ipv6Ranges"] = v6
            self.ec2.authorize_security_group_ingress(GroupId=group["GroupId"], IpPermissions=[perm])
            log.info("security group %s: SSH allowed from %s", group["GroupId"], ", ".join(add))

    def _refresh_group_of(self, d: dict[str, Any], name: str) -> None:
        group_name = f"remotemagic-{name}"
        for g in d.get("SecurityGroups") or []:
            if g.get("GroupName") == group_name:
                group = self.ec2.describe_security_groups(GroupIds=[g["GroupId"]])["SecurityGroups"][0]
                if _tags(group).get(CREATED_BY) == CREATED_BY_VALUE:
                    self._sync_ingress(group, self.ssh_source_cidrs())
                return

    # -- lifecycle ----------------------------------------------------------------------------

    @_aws_errors
    def start(
        self,
        name: str,
        *,
        instance_type: str | None = None,
        spot: bool = False,
        ami: str | None = None,
        disk_gb: int | None = None,
        key_name: str | None = None,
        user: str | None = None,
        wait: bool = True,
        progress: bool = True,
        timeout: float = 600,
        fallback: bool = False,
    ) -> InstanceInfo:
        """Attach to our instance ``name`` (starting it if stopped), else launch a new one.

        On attach, the security group is brought up to date with the caller's current address;
        ``instance_type``/``spot``/``ami``/``disk_gb`` only apply to a launch (use :meth:`resize`).
        ``fallback`` (with ``spot``): when AWS has no spot capacity for the type
        (``InsufficientInstanceCapacity``, ``SpotMaxPriceTooLow``...), launch on-demand instead and
        say so (a notice) with the price difference.
        """
        self._check_name(name)
        found = self._ours_by_name(name)
        if len(found) > 1:
            self.find(name)
        if found:
            return self._attach(found[0], name, instance_type=instance_type, spot=spot, ami=ami, user=user,
                                wait=wait, progress=progress, timeout=timeout)
        return self._launch(name, instance_type=instance_type or self.instance_type, spot=spot, ami=ami,
                            disk_gb=disk_gb, key_name=key_name or self.key_name, user=user, wait=wait,
                            progress=progress, timeout=timeout, fallback=fallback)

    def _attach(self, d: dict[str, Any], name: str, *, instance_type: str | None, spot: bool, ami: str | None,
                user: str | None, wait: bool, progress: bool, timeout: float) -> InstanceInfo:
        iid, state = d["InstanceId"], d["State"]["Name"]
        info = InstanceInfo.from_description(d)
        if instance_type and instance_type != info.instance_type:
            notices.notify(f"{name} ({iid}) already exists as {info.instance_type}; --type {instance_type} "
                           f"applies to new launches only (%ec2 resize {instance_type} changes it)", logger=log)
        if spot and info.lifecycle != "spot":
            notices.notify(f"{name} ({iid}) already exists as an on-demand instance; --spot applies to new "
                           "launches only", logger=log)
        if ami:
            notices.notify(f"{name} ({iid}) already exists (AMI {info.image_id}); --ami {ami} applies to new "
                           "launches only", logger=log)
        try:
            self._refresh_group_of(d, name)
        except PublicIpError as exc:
            notices.notify(f"{name}: security group left as it is: {exc}", logger=log)
        if state == "stopping":
            log.info("%s (%s) is stopping; waiting for it to stop before starting it again", name, iid)
            self._wait_state(iid, {"stopped"}, timeout, progress, f"{name}: stopping")
            state = "stopped"
        if state == "stopped":
            log.info("starting %s (%s)", name, iid)
            self.ec2.start_instances(InstanceIds=[iid])
        else:
            log.info("attaching to %s (%s, %s)", name, iid, state)
        if wait:
            info = self.wait_running(iid, timeout=timeout, progress=progress)
        else:
            info = InstanceInfo.from_description(self._describe_one(iid))
        if user:
            info.user = user
        return info

    def _launch(self, name: str, *, instance_type: str, spot: bool, ami: str | None, disk_gb: int | None,
                key_name: str | None, user: str | None, wait: bool, progress: bool, timeout: float,
                fallback: bool = False) -> InstanceInfo:
        arch = self.architecture(instance_type)
        image = self.resolve_ami(ami, arch)
        login = user or login_user_for_image(image)
        if not _USER_RE.match(login):
            raise ValueError(f"invalid login user {login!r}")
        root_device = image.get("RootDeviceName") or "/dev/sda1"
        snap_gb = 0
        for m in image.get("BlockDeviceMappings") or []:
            if m.get("DeviceName") == root_device:
                snap_gb = int((m.get("Ebs") or {}).get("VolumeSize") or 0)
        size = disk_gb if disk_gb is not None else max(DEFAULT_DISK_GB, snap_gb)
        if isinstance(size, bool) or not isinstance(size, int) or size < max(1, snap_gb):
            raise ValueError(f"disk_gb must be a whole number of GiB >= {max(1, snap_gb)} (the AMI's root snapshot), not {size!r}")
        if key_name:
            from botocore.exceptions import ClientError

            try:
                self.ec2.describe_key_pairs(KeyNames=[key_name])
            except ClientError as exc:
                if _code(exc).startswith("InvalidKeyPair"):
                    raise AwsError(f"key pair {key_name!r} does not exist in region {self.region}") from None
                raise
        group_id = self.ensure_security_group(name)
        owner = self.owner()
        tags = [
            {"Key": CREATED_BY, "Value": CREATED_BY_VALUE}, {"Key": NAME_TAG, "Value": name},
            {"Key": "Name", "Value": name}, {"Key": "owner", "Value": owner}, {"Key": USER_TAG, "Value": login},
        ]
        params: dict[str, Any] = {
            "ImageId": image["ImageId"],
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "SecurityGroupIds": [group_id],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [{
                "DeviceName": root_device,
                "Ebs": {"VolumeSize": size, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True},
            }],
            "InstanceInitiatedShutdownBehavior": "stop",
            "UserData": idle_stop_user_data(self.idle_stop_minutes, login),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            "ClientToken": f"remotemagic-{uuid.uuid4().hex}",
        }
        if key_name:
            params["KeyName"] = key_name
        if spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
            }
        log.info("launching %s: %s%s, %s (%s), %d GiB encrypted, user %s", name, instance_type,
                 " spot" if spot else "", image["ImageId"], image.get("Name", ""), size, login)
        from botocore.exceptions import ClientError

        try:
            d = self.ec2.run_instances(**params)["Instances"][0]
        except ClientError as exc:
            if not (spot and fallback and _code(exc) in SPOT_UNAVAILABLE):
                raise
            d = self._launch_on_demand_instead(name, instance_type, params, _code(exc))
        iid = d["InstanceId"]
        log.info("launched %s as %s", name, iid)
        if wait:
            info = self.wait_running(iid, timeout=timeout, progress=progress)
        else:
            info = InstanceInfo.from_description(d)
        info.user = login
        return info

    def _launch_on_demand_instead(self, name: str, instance_type: str, params: dict[str, Any],
                                  code: str) -> dict[str, Any]:
        """``--spot --fallback`` and no spot capacity: the same launch, on-demand, with a notice."""
        params = {k: v for k, v in params.items() if k != "InstanceMarketOptions"}
        params["ClientToken"] = f"remotemagic-{uuid.uuid4().hex}"
        d = self.ec2.run_instances(**params)["Instances"][0]
        on_demand, _ = self.hourly_price(instance_type)
        spot = self._spot_price(instance_type, None)
        if on_demand is not None and spot:  # (a price of 0: unknown)
            cost = f"at ${on_demand:.4f}/h, ${on_demand - spot:.4f}/h more than spot (${spot:.4f}/h)"
        elif on_demand is not None:
            cost = f"at ${on_demand:.4f}/h (the spot price is unknown)"
        else:
            cost = "(its price is unknown)"
        notices.notify(f"no spot capacity for {instance_type} ({code}): {name} ({d['InstanceId']}) was launched "
                       f"on-demand instead {cost}", logger=log)
        return d

    @_aws_errors
    def stop(self, name: str, *, wait: bool = False, progress: bool = True, timeout: float = 600) -> InstanceInfo:
        """Stop our instance (by name or id); its disk is kept. Refuses instances not ours."""
        d = self._resolve_ours(name, "stop")
        iid, state = d["InstanceId"], d["State"]["Name"]
        if state in ("stopped", "stopping"):
            log.info("%s (%s) is already %s", name, iid, state)
        else:
            self.ec2.stop_instances(InstanceIds=[iid])
            log.info("stopping %s (%s)", name, iid)
        if wait:
            d = self._wait_state(iid, {"stopped"}, timeout, progress, f"{name}: stopping")
        else:
            d = self._describe_one(iid)
        return InstanceInfo.from_description(d)

    @_aws_errors
    def terminate(self, name: str, *, wait: bool = False, progress: bool = True, timeout: float = 600) -> str:
        """Terminate our instance (by name or id); its disk is deleted. Refuses instances not ours.

        A persistent spot request is cancelled first (else AWS would launch a replacement). With
        ``wait``, waits until terminated and deletes the instance's security group. Returns the id.
        """
        d = self._resolve_ours(name, "terminate")
        iid = d["InstanceId"]
        if d.get("SpotInstanceRequestId"):
            self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[d["SpotInstanceRequestId"]])
            log.info("cancelled spot request %s of %s", d["SpotInstanceRequestId"], iid)
        self.ec2.terminate_instances(InstanceIds=[iid])
        log.info("terminating %s (%s)", name, iid)
        if wait:
            self._wait_state(iid, {"terminated"}, timeout, progress, f"{name}: terminating")
            self._delete_group_of(d)
        return iid

    def _delete_group_of(self, d: dict[str, Any]) -> None:
        from botocore.exceptions import ClientError

        tag_name = _tags(d).get(NAME_TAG, "")
        for g in d.get("SecurityGroups") or []:
            if g.get("GroupName") != f"remotemagic-{tag_name}":
                continue
            if self._ours_by_name(tag_name):
                return  # another instance of that name still uses it
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.ec2.delete_security_group(GroupId=g["GroupId"])
                    log.info("deleted security group %s", g["GroupId"])
                    break
                except ClientError as exc:
                    # the network interface lingers a little after termination
                    if _code(exc) == "DependencyViolation" and time.monotonic() < deadline:
                        time.sleep(max(self.poll_interval, 0.05))
                        continue
                    log.warning("could not delete security group %s: %s", g["GroupId"], exc)
                    break

    @_aws_errors
    def larger_memory_type(self, instance_type: str, peak_bytes: int) -> dict[str, Any] | None:
        """The cheapest type of the packaged price table with the same architecture and at least
        twice the memory of ``instance_type`` (and 1.5x ``peak_bytes``): ``{"type", "memory_gib",
        "price", "current_price"}`` (on-demand $/h), or None if there is none. For the advice
        after a worker was killed near the machine's memory (see :mod:`remotemagic.retry`)."""
        current = self.instance_type_info(instance_type)
        cur_mib = int((current.get("MemoryInfo") or {}).get("SizeInMiB") or 0)
        arch = self.architecture(instance_type)
        need = max(2 * cur_mib, int(1.5 * peak_bytes / 1024**2))
        best: tuple[float, str, int] | None = None
        for name in sorted(packaged_prices()["prices"]):
            try:
                info = self.instance_type_info(name)
            except UnknownInstanceTypeError:
                continue
            mib = int((info.get("MemoryInfo") or {}).get("SizeInMiB") or 0)
            if mib < need or self.architecture(name) != arch:
                continue
            price, _ = self.hourly_price(name)
            if price is not None and (best is None or price < best[0]):
                best = (price, name, mib)
        if best is None:
            return None
        current_price, _ = self.hourly_price(instance_type)
        return {"type": best[1], "memory_gib": best[2] / 1024, "price": best[0], "current_price": current_price}

    @_aws_errors
    def resize(self, name: str, new_type: str, *, wait: bool = True, progress: bool = True,
               timeout: float = 900) -> InstanceInfo:
        """Change the instance type: stop, wait, modify, start (and wait). Refuses instances not ours."""
        d = self._resolve_ours(name, "resize")
        iid = d["InstanceId"]
        if d.get("InstanceLifecycle") == "spot":
            raise AwsError(
                f"{name} ({iid}) is a spot instance; AWS does not let a spot instance change type. "
                f"Terminate it and start a new one with the type you want."
            )
        new_arch = self.architecture(new_type)
        old_arch = d.get("Architecture") or self.architecture(d["InstanceType"])
        if new_arch != old_arch:
            raise IncompatibleAmiError(
                f"cannot resize {name} from {d['InstanceType']} ({old_arch}) to {new_type} ({new_arch}): its disk "
                f"holds an {old_arch} system. Launch a new instance for {new_arch}."
            )
        if d["InstanceType"] == new_type:
            log.info("%s (%s) is already %s", name, iid, new_type)
            return InstanceInfo.from_description(d)
        if d["State"]["Name"] == "pending":
            self._wait_state(iid, {"running"}, timeout, progress, f"{name}: starting")
        if d["State"]["Name"] != "stopped":
            self.ec2.stop_instances(InstanceIds=[iid])
            log.info("stopping %s (%s) to resize it", name, iid)
            self._wait_state(iid, {"stopped"}, timeout, progress, f"{name}: stopping")
        self.ec2.modify_instance_attribute(InstanceId=iid, InstanceType={"Value": new_type})
        log.info("%s (%s): %s -> %s; starting", name, iid, d["InstanceType"], new_type)
        self.ec2.start_instances(InstanceIds=[iid])
        if wait:
            return self.wait_running(iid, timeout=timeout, progress=progress)
        return InstanceInfo.from_description(self._describe_one(iid))

    # -- waiting ------------------------------------------------------------------------------

    def _wait_state(self, instance_id: str, want: set[str], timeout: float, progress: bool, desc: str) -> dict:
        deadline = time.monotonic() + timeout
        seen_up = False
        with _progress(desc, progress) as bar:
            while True:
                d = self._describe_one(instance_id)
                state = d["State"]["Name"]
                bar.message(state)
                if state in want:
                    return d
                seen_up = seen_up or state in ("pending", "running")
                gone = state in ("terminated", "shutting-down") and not want & {"terminated", "shutting-down"}
                down = "running" in want and seen_up and state in ("stopping", "stopped")
                if gone or down:
                    reason = (d.get("StateReason") or {}).get("Message") or d.get("StateTransitionReason") or ""
                    raise InstanceStateError(
                        f"{instance_id} went to {state} while waiting for {'/'.join(sorted(want))}"
                        + (f": {reason}" if reason else "")
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(
                        f"{instance_id} is still {state} after {timeout:.0f} s (waiting for {'/'.join(sorted(want))})"
                    )
                time.sleep(min(self.poll_interval, left))

    @_aws_errors
    def wait_running(self, instance_id: str, timeout: float = 600, progress: bool = True) -> InstanceInfo:
        """Wait until the instance is running (tqdm status line); returns its fresh description."""
        d = self._wait_state(instance_id, {"running"}, timeout, progress, f"{instance_id}: starting")
        return InstanceInfo.from_description(d)

    def wait_ssh(self, host: str, port: int = 22, timeout: float = 300, progress: bool = True) -> None:
        """Wait until a TCP connection to ``host:port`` succeeds (sshd is up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with _progress(f"waiting for SSH on {host}:{port}", progress) as bar:
            while True:
                left = deadline - time.monotonic()
                try:
                    with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                        return
                except OSError as exc:
                    last = exc
                    bar.message(type(exc).__name__)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(f"SSH port {host}:{port} did not open within {timeout:.0f} s ({last})")
                time.sleep(min(max(0.05, self.poll_interval / 3), left))

    # -- host keys and instance connect -------------------------------------------------------

    @_aws_errors
    def learn_host_key(self, instance_id: str, known_hosts_path: str | os.PathLike[str], address: str,
                       timeout: float = 600, progress: bool = True, port: int = 22,
                       alias: bool = True) -> list[str]:
        """Read the instance's SSH host keys from its console output and record them for ``address``.

        With ``alias`` the keys are also recorded under the instance id, so a client using it as
        ``HostKeyAlias`` still verifies the host after a stop/start (new public IP; cloud-init
        prints the keys on the first boot only). The console output reaches AWS's API a few
        minutes after boot; until then this polls. :class:`HostKeyError` when no keys show within
        ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with _progress(f"{instance_id}: reading host keys from the console", progress) as bar:
            while True:
                out = self.ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
                keys = host_keys_from_console(out)
                if keys:
                    record_known_hosts(known_hosts_path, [address, instance_id] if alias else [address], keys, port)
                    log.info("recorded %d host key(s) of %s (%s) in %s", len(keys), instance_id, address,
                             known_hosts_path)
                    return keys
                bar.message("console output empty so far" if not out.strip() else "no host keys in console yet")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostKeyError(
                        f"no SSH host keys in the console output of {instance_id} after {timeout:.0f} s"
                        + (" (the console output is still empty; AWS publishes it a few minutes after boot)"
                           if not out.strip() else " (this AMI may not print them; cloud-init images do)")
                    )
                time.sleep(min(max(self.console_poll_interval, 0.05), left))

    @_aws_errors
    def send_ephemeral_key(self, instance_id: str, user: str, public_key: str, az: str) -> bool:
        """Push a public key for ``user`` via EC2 Instance Connect (valid for 60 s)."""
        resp = self._client("ec2-instance-connect").send_ssh_public_key(
            InstanceId=instance_id, InstanceOSUser=user, SSHPublicKey=public_key, AvailabilityZone=az,
        )
        return bool(resp.get("Success", False))

    # -- cost ---------------------------------------------------------------------------------

    def _pricing_client(self) -> Any:
        from botocore.config import Config

        cfg = Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=self.pricing_timeout,
                     read_timeout=self.pricing_timeout, user_agent_extra="remotemagic")
        return self._client("pricing", region="us-east-1", config=cfg)

    def _pricing_api_price(self, instance_type: str, region: str) -> float | None:
        """On-demand Linux $/h from the AWS Pricing API, or None when it does not answer."""
        if self._pricing_unavailable:
            return None
        from botocore import exceptions as bx

        filters = [
            ("instanceType", instance_type), ("regionCode", region), ("operatingSystem", "Linux"),
            ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"),
        ]
        try:
            resp = self._pricing_client().get_products(
                ServiceCode="AmazonEC2", MaxResults=10,
                Filters=[{"Type": "TERM_MATCH", "Field": f, "Value": v} for f, v in filters],
            )
        except (bx.BotoCoreError, bx.ClientError) as exc:
            self._pricing_unavailable = True
            log.debug("AWS Pricing API unavailable, using the packaged price table: %s", exc)
            return None
        return on_demand_hourly_usd(resp.get("PriceList", []))

    def _spot_price(self, instance_type: str, az: str | None) -> float | None:
        from botocore import exceptions as bx

        kwargs: dict[str, Any] = {
            "InstanceTypes": [instance_type], "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            "StartTime": _dt.datetime.now(_dt.timezone.utc), "MaxResults": 10,
        }
        if az:
            kwargs["AvailabilityZone"] = az
        try:
            hist = self.ec2.describe_spot_price_history(**kwargs).get("SpotPriceHistory", [])
        except (bx.BotoCoreError, bx.ClientError) as exc:
            log.debug("spot price history unavailable: %s", exc)
            return None
        prices = [float(h["SpotPrice"]) for h in hist if h.get("SpotPrice")]
        return max(prices) if prices else None

    @_aws_errors
    def hourly_price(self, instance_type: str, lifecycle: str = "on-demand",
                     availability_zone: str | None = None) -> tuple[float | None, str]:
        """``(USD per hour, source)`` for the type: spot history, Pricing API, else the packaged table."""
        if lifecycle == "spot":
            p = self._spot_price(instance_type, availability_zone)
            if p is not None:
                return p, "spot price history"
        region = self._region_if_known() or "us-east-1"
        key = (region, instance_type)
        if key not in self._price_cache:
            self._price_cache[key] = self._pricing_api_price(instance_type, region)
        if self._price_cache[key] is not None:
            return self._price_cache[key], "AWS Pricing API (on-demand)"
        table = packaged_prices()
        p = table["prices"].get(instance_type)
        if p is None:
            return None, "unknown"
        src = f"packaged table ({table['date']}, us-east-1 on-demand)"
        if region != "us-east-1":
            src += f", approximate for {region}"
        if lifecycle == "spot":
            src += ", on-demand price as spot upper bound"
        return float(p), src

    @_aws_errors
    def status(self) -> list[dict[str, Any]]:
        """Every live instance tagged as ours in the region, with uptime and cost.

        ``uptime`` and ``cost_so_far`` count from the last start (EC2's LaunchTime) for running
        instances (None otherwise) and cover compute only, not EBS storage.
        """
        rows = []
        now = _dt.datetime.now(_dt.timezone.utc)
        ds = self._describe(filters=[
            {"Name": f"tag:{CREATED_BY}", "Values": [CREATED_BY_VALUE]},
            {"Name": "instance-state-name", "Values": [*LIVE_STATES, "shutting-down"]},
        ])
        for d in sorted(ds, key=lambda x: (_tags(x).get(NAME_TAG, ""), x["InstanceId"])):
            info = InstanceInfo.from_description(d)
            price, source = self.hourly_price(info.instance_type, info.lifecycle, info.availability_zone)
            uptime = None
            cost = None
            if info.state == "running" and info.launch_time is not None:
                launched = info.launch_time
                if launched.tzinfo is None:
                    launched = launched.replace(tzinfo=_dt.timezone.utc)
                uptime = max(now - launched, _dt.timedelta(0))
                if price is not None:
                    billed = max(uptime.total_seconds(), 60.0)  # per-second billing, one minute minimum
                    cost = round(price * billed / 3600.0, 4)
            rows.append({
                "id": info.instance_id, "name": info.name, "type": info.instance_type, "state": info.state,
                "lifecycle": info.lifecycle, "launch_time": info.launch_time, "uptime": uptime,
                "hourly_price": price, "price_source": source, "cost_so_far": cost,
                "public_ip": info.public_ip, "availability_zone": info.availability_zone,
                "owner": info.owner, "user": info.user,
            })
        return rows
