"""Cloud-init user-data arranging idle auto-stop on a new instance.

The idle check itself is a real shell script, ``idle_check.sh`` (package data, shellchecked by
the tests): the user-data installs it with its settings file and a systemd timer (or cron).
"""

from __future__ import annotations

import functools
from importlib import resources

from .model import _USER_RE


@functools.lru_cache(maxsize=1)
def idle_check_script() -> str:
    """The shell script the instance runs every minute to decide whether to shut itself down.

    Its defaults can be overridden by environment variables (``RM_ROOT``, ``STATE_FILE``, ``NOW``,
    ``BOOT_TIME``, ``WHO_CMD``, ``CHECK_LOGINS``, ``SHUTDOWN_CMD``, ``REMOTEMAGIC_IDLE_CONF``) so its
    logic can be exercised outside an instance; systemd and cron run it with none of them set.
    """
    return resources.files(__package__).joinpath("idle_check.sh").read_text(encoding="utf-8")


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

