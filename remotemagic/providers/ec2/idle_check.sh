#!/bin/bash
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
# shellcheck source=/dev/null  # the settings file is written by the user-data (IDLE_MINUTES, RM_USER)
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
