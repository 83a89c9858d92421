#!/usr/bin/env bash
# Makes a Kafka-protocol broker available on 127.0.0.1:9092 for the tests of
# crates/kafka. Safe to run repeatedly: a broker already listening is reused,
# and an installed `tansu` is never rebuilt.
#
# 1. Debian build dependencies of rdkafka's `cmake-build` (librdkafka is built
#    from source): installed with apt-get only when one is missing.
# 2. `tansu` (an Apache-Kafka-compatible broker written in Rust, see
#    the Kafka paragraph of the design notes): `cargo install tansu --version 0.6.0
#    --features dynostore --locked` when it is not on PATH or in ~/.cargo/bin.
#    The build takes about ten minutes on two cores; it happens once per machine.
# 3. When nothing listens on the port, starts `tansu broker` with in-memory
#    storage in the background (log: $VEXTRUS_KAFKA_LOG, default
#    target/tansu.log) and waits until the port answers.
#
# Environment:
#   VEXTRUS_KAFKA_PORT  port to listen on (default 9092)
#   VEXTRUS_KAFKA_LOG   broker log file (default target/tansu.log)
#   TANSU_VERSION       version to install (default 0.6.0)
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${VEXTRUS_KAFKA_PORT:-9092}"
LOG_FILE="${VEXTRUS_KAFKA_LOG:-$PWD/target/tansu.log}"
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"

log() { printf '[kafka] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# 1. Build dependencies of librdkafka (cmake build).
install_build_deps() {
    local missing=() pkg
    command -v dpkg-query >/dev/null 2>&1 || return 0
    for pkg in cmake libcurl4-openssl-dev libsasl2-dev libssl-dev zlib1g-dev; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} > 0)); then
        log "installing build dependencies: ${missing[*]}"
        local sudo=""
        [[ $(id -u) -ne 0 ]] && sudo="sudo"
        $sudo apt-get update
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

# 2. The broker binary.
find_tansu() {
    if command -v tansu >/dev/null 2>&1; then
        command -v tansu
    elif [[ -x "$HOME/.cargo/bin/tansu" ]]; then
        echo "$HOME/.cargo/bin/tansu"
    else
        return 1
    fi
}

install_build_deps

if port_open "$PORT"; then
    log "a broker already listens on 127.0.0.1:$PORT; reusing it"
    exit 0
fi

if ! TANSU="$(find_tansu)"; then
    log "tansu not found; building it (cargo install tansu $TANSU_VERSION, about ten minutes)"
    cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked
    TANSU="$(find_tansu)"
fi

# 3. Start it unless something already listens (checked again: another run
#    may have started it while tansu was being built).
if port_open "$PORT"; then
    log "a broker already listens on 127.0.0.1:$PORT; reusing it"
    exit 0
fi

mkdir -p "$(dirname "$LOG_FILE")"
log "starting $TANSU on 127.0.0.1:$PORT (log: $LOG_FILE)"
nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine "memory://tansu/" \
    >>"$LOG_FILE" 2>&1 </dev/null &
BROKER_PID=$!
disown "$BROKER_PID" 2>/dev/null || true

for _ in $(seq 1 60); do
    if port_open "$PORT"; then
        log "broker up on 127.0.0.1:$PORT (pid $BROKER_PID)"
        exit 0
    fi
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        log "the broker exited; last lines of $LOG_FILE:"
        tail -n 20 "$LOG_FILE" >&2 || true
        exit 1
    fi
    sleep 1
done
log "the broker did not answer on 127.0.0.1:$PORT within 60 s; last lines of $LOG_FILE:"
tail -n 20 "$LOG_FILE" >&2 || true
exit 1
