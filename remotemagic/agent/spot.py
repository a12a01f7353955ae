"""Watch EC2's instance metadata (IMDSv2) for a spot reclaim notice, on the instance.

Runs as a daemon thread inside each session worker, and only when ``REMOTEMAGIC_SPOT=1`` is
set (the launcher sets it for spot instances): without it nothing here ever contacts the
metadata service. Every ``REMOTEMAGIC_SPOT_POLL`` seconds (default 5) it asks for
``/latest/meta-data/spot/instance-action``: 404 means no notice, 200 carries one, e.g.
``{"action": "stop", "time": "2026-11-22T04:10:00Z"}`` (about two minutes ahead). The first
notice is handed to the callback, once, and the thread ends.

IMDSv2 needs a session token: ``PUT /latest/api/token`` with a TTL header, then the token on
every GET. The token is renewed before it expires and at once when a GET answers 401.
Requests never go through an HTTP proxy (``http_proxy`` must not see metadata traffic) and
time out after 1 s. When the service cannot be reached the watcher says so once on the real
stderr (the worker's ``worker.log``) and keeps trying, more slowly; it never raises.

Standard library only: this module is shipped to targets as source.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

DEFAULT_URL = "http://169.254.169.254"
DEFAULT_POLL = 5.0
TOKEN_TTL = 21600  # seconds, the IMDSv2 maximum
TOKEN_MARGIN = 300.0  # renew this long before the token expires
REQUEST_TIMEOUT = 1.0
SLOW_FACTOR = 12  # unreachable: poll this many times less often ...
SLOW_MAX = 60.0  # ... but at least every minute (or every poll, if that is longer)

Notice = dict[str, Any]


def enabled(env: Any = None) -> bool:
    """True when this host asked for spot watching (``REMOTEMAGIC_SPOT=1``)."""
    return (os.environ if env is None else env).get("REMOTEMAGIC_SPOT", "") == "1"


def _poll_interval(env: Any) -> float:
    try:
        value = float(env.get("REMOTEMAGIC_SPOT_POLL", DEFAULT_POLL))
    except ValueError:
        return DEFAULT_POLL
    return value if value > 0 else DEFAULT_POLL


def _log_stderr(text: str) -> None:
    stream = sys.__stderr__
    if stream is not None:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass


class IMDSError(Exception):
    """The metadata service could not be reached or gave an answer we cannot use."""


class SpotWatcher(threading.Thread):
    """Poll IMDSv2 for a spot instance-action; call ``on_notice(notice)`` once when one appears.

    ``notice`` is the parsed JSON (at least ``action`` and ``time``, ``"unknown"`` when absent).
    The callback runs in this thread and may block (the worker uses it to interrupt the running
    job); an exception from it is logged, not raised.
    """

    def __init__(self, on_notice: Callable[[Notice], None], base_url: str | None = None,
                 interval: float | None = None, log: Callable[[str], None] = _log_stderr):
        super().__init__(name="remotemagic-spot-watcher", daemon=True)
        env = os.environ
        self.on_notice = on_notice
        self.base_url = (base_url or env.get("REMOTEMAGIC_IMDS_URL") or DEFAULT_URL).rstrip("/")
        self.interval = float(interval) if interval is not None else _poll_interval(env)
        self.slow_interval = max(self.interval, min(SLOW_MAX, self.interval * SLOW_FACTOR))
        self.log = log
        self.stopped = threading.Event()
        self.token: str | None = None
        self.token_expires = 0.0  # time.monotonic() after which the token is renewed
        self.failing = False  # the last poll failed (and that was logged)
        self.notice: Notice | None = None
        # No proxy handler: metadata requests must go straight to the link-local address.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def stop(self) -> None:
        self.stopped.set()

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=REQUEST_TIMEOUT) as resp:
                return resp.status, resp.read(64 * 1024)
        except urllib.error.HTTPError as exc:
            try:
                exc.close()
            except Exception:
                pass
            return exc.code, b""
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused, bad URL
            reason = getattr(exc, "reason", exc)
            raise IMDSError(f"{method} {self.base_url}{path}: {reason}") from exc

    def _get_token(self) -> str:
        if self.token is None or time.monotonic() >= self.token_expires:
            self.token = None
            code, body = self._request("PUT", "/latest/api/token",
                                       {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
            if code != 200 or not body.strip():
                raise IMDSError(f"PUT {self.base_url}/latest/api/token answered HTTP {code}")
            self.token = body.decode("ascii", "replace").strip()
            self.token_expires = time.monotonic() + TOKEN_TTL - TOKEN_MARGIN
        return self.token

    def poll_once(self) -> Notice | None:
        """One check: the notice, or None when there is none. Raises :class:`IMDSError`."""
        for _ in range(2):  # a 401 means our token is stale: renew it once and ask again
            token = self._get_token()
            code, body = self._request("GET", "/latest/meta-data/spot/instance-action",
                                       {"X-aws-ec2-metadata-token": token})
            if code == 401:
                self.token = None
                continue
            if code == 404:
                return None
            if code == 200:
                return parse_notice(body)
            raise IMDSError(f"GET {self.base_url}/latest/meta-data/spot/instance-action answered HTTP {code}")
        raise IMDSError("the metadata service refused a fresh token (HTTP 401)")

    # -- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                notice = self.poll_once()
            except Exception as exc:  # IMDSError, or anything unexpected: never end the worker
                if not self.failing:
                    self.failing = True
                    self.log(f"remotemagic worker: spot watcher cannot use the instance metadata service "
                             f"({exc}); retrying every {self.slow_interval:g} s\n")
                self.stopped.wait(self.slow_interval)
                continue
            if self.failing:
                self.failing = False
                self.log("remotemagic worker: spot watcher reached the instance metadata service again\n")
            if notice is not None:
                self.notice = notice
                try:
                    self.on_notice(notice)
                except Exception as exc:
                    self.log(f"remotemagic worker: handling the spot notice failed: {type(exc).__name__}: {exc}\n")
                return
            self.stopped.wait(self.interval)


def parse_notice(body: bytes) -> Notice:
    """The instance-action document; a 200 always means a notice, even if it does not parse."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"raw": body[:200].decode("utf-8", "replace")}
    notice: Notice = dict(data)
    notice["action"] = str(data.get("action") or "unknown")
    notice["time"] = str(data.get("time") or "unknown")
    return notice


def start(on_notice: Callable[[Notice], None], log: Callable[[str], None] = _log_stderr) -> SpotWatcher | None:
    """Start a watcher if ``REMOTEMAGIC_SPOT=1``; else do nothing and return None. ``log`` takes
    its diagnostic lines (the worker's: its own log, never a running job's stderr)."""
    if not enabled():
        return None
    watcher = SpotWatcher(on_notice, log=log)
    watcher.start()
    return watcher
