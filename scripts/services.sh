#!/usr/bin/env bash
# Makes sure every service the test suite talks to is running on 127.0.0.1,
# starting the ones that have stopped. Safe to run repeatedly.
#
#   PostgreSQL  127.0.0.1:5432  (started by this machine kind; restarted here if down)
#   NATS        127.0.0.1:4222  with JetStream (likewise)
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local name=$1 port=$2 i
    for i in $(seq 1 60); do
        port_open "$port" && return 0
        sleep 1
    done
    log "$name did not come up on 127.0.0.1:$port"
    return 1
}

# PostgreSQL
if ! port_open 5432; then
    log "PostgreSQL is down; starting it"
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
    wait_port PostgreSQL 5432
fi
log "PostgreSQL up on 127.0.0.1:5432"

# NATS with JetStream
if ! port_open 4222; then
    log "NATS is down; starting it"
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
    wait_port NATS 4222
fi
log "NATS up on 127.0.0.1:4222"
