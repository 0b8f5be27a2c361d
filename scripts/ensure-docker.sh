#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine; start one if it does not.
#
# 1. If `docker info` answers (or the socket answers a ping), use that engine.
# 2. Otherwise, on Debian as root: install docker.io (apt-get update first when the
#    package is unknown), start dockerd in the background (log /var/log/rumi-dockerd.log,
#    pidfile /var/run/rumi-dockerd.pid) and wait up to RUMI_DOCKER_WAIT seconds (60).
# 3. Otherwise print what to do and exit non-zero.
# Idempotent: a second run finds the engine answering and does nothing.
set -euo pipefail

WAIT_SECONDS="${RUMI_DOCKER_WAIT:-60}"
LOG_FILE="${RUMI_DOCKERD_LOG:-/var/log/rumi-dockerd.log}"
PID_FILE="${RUMI_DOCKERD_PIDFILE:-/var/run/rumi-dockerd.pid}"
SOCKET="/var/run/docker.sock"

say() { printf 'ensure-docker: %s\n' "$*"; }
fail() { printf 'ensure-docker: error: %s\n' "$*" >&2; exit 1; }

engine_answers() {
    # A DOCKER_HOST set by the user is honoured by the CLI; the socket ping covers a missing CLI.
    if command -v docker >/dev/null 2>&1; then
        timeout 10 docker info >/dev/null 2>&1 && return 0
    fi
    if [ -S "$SOCKET" ] && command -v curl >/dev/null 2>&1; then
        [ "$(timeout 5 curl -s --unix-socket "$SOCKET" http://localhost/_ping 2>/dev/null)" = "OK" ] && return 0
    fi
    return 1
}

# Debian's docker-compose 1.29 (the seed's workflow, tested) and iptables (the host guard).
ensure_tools() {
    local missing=()
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != "0" ] || [ ! -r /etc/debian_version ]; then
        say "note: ${missing[*]} not installed (needed for the Compose workflow / host guard)"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
        say "apt-get update"
        apt-get -y -o DPkg::Lock::Timeout=300 update -qq
    fi
    say "installing ${missing[*]} with apt-get"
    apt-get -y -o DPkg::Lock::Timeout=300 install -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed: run 'apt-get update && apt-get install -y ${missing[*]}'"
}

ensure_tools

if engine_answers; then
    say "a Docker engine answers; using it"
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    fail "no Docker engine answers and this is not root: start Docker (e.g. 'sudo systemctl start docker') or run this script as root"
fi
if [ ! -r /etc/debian_version ]; then
    fail "no Docker engine answers and this is not Debian: install and start Docker Engine (https://docs.docker.com/engine/install/), then rerun"
fi

if ! command -v dockerd >/dev/null 2>&1; then
    # Another apt run (e.g. an unattended one) holds the lock: wait for it rather than fail.
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -o DPkg::Lock::Timeout=300)
    if ! apt-cache show docker.io >/dev/null 2>&1; then
        say "apt-get update (docker.io unknown to apt)"
        apt-get "${apt_opts[@]}" update -qq
    fi
    say "installing docker.io and iptables with apt-get"
    apt-get "${apt_opts[@]}" install -qq --no-install-recommends docker.io iptables >/dev/null \
        || fail "apt-get install docker.io failed: run 'apt-get update && apt-get install -y docker.io' and read its error"
fi

# A dockerd already starting (ours from an earlier run, or anyone's): wait for it, never start a second.
if pid="$(pgrep -x dockerd | head -n1)" && [ -n "$pid" ]; then
    say "dockerd (pid $pid) is already running; waiting for it to answer"
else
    say "starting dockerd in the background (log $LOG_FILE, pidfile $PID_FILE)"
    # setsid: the engine must outlive this shell and the session that ran it.
    setsid /usr/sbin/dockerd --pidfile "$PID_FILE" >>"$LOG_FILE" 2>&1 < /dev/null &
fi

for ((i = 0; i < WAIT_SECONDS; i++)); do
    if engine_answers; then
        say "Docker engine answers after ${i}s"
        exit 0
    fi
    sleep 1
done

fail "dockerd did not answer within ${WAIT_SECONDS}s: read $LOG_FILE (last lines below), fix the cause, then rerun
$(tail -n 15 "$LOG_FILE" 2>/dev/null || true)"
