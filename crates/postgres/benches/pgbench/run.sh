#!/usr/bin/env bash
# Server-side comparison of the single-event append statement with a raw
# single-row INSERT (and with the previous version-row statement), through
# pgbench -M prepared: no Rust client in the way, so a shared machine's
# client-side load does not enter the ratio. Interleaved runs; prints tx/s.
#
#   crates/postgres/benches/pgbench/run.sh [clients=32] [seconds=10] [rounds=4] [script...]
#
# Scripts default to "raw new old" (ExpectedVersion::Any); "raw_exact
# new_exact probe_exact" compare at an exact expectation, as the Rust bench
# appends (each run gets its own streams: -D run=N, and :v starts at 0).
#
# Needs psql and pgbench; PGHOST etc. or the default postgres@127.0.0.1:5432.
# Creates and drops the database vextrus_pgbench.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
clients="${1:-32}"; secs="${2:-10}"; rounds="${3:-4}"
shift $(( $# < 3 ? $# : 3 ))
scripts=("$@"); [ ${#scripts[@]} -gt 0 ] || scripts=(raw new old)
export PGHOST="${PGHOST:-127.0.0.1}" PGUSER="${PGUSER:-postgres}"
db=vextrus_pgbench
psql -qX -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
trap 'psql -qX -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
for f in "$here"/../../migrations/0001_event_store.sql "$here"/../../migrations/0005_event_store_versions.sql "$here"/setup.sql; do
  psql -qX -v ON_ERROR_STOP=1 -d "$db" -f "$f" >/dev/null
done
n=0
for r in $(seq "$rounds"); do
  for s in "${scripts[@]}"; do
    n=$((n + 1))
    tps=$(pgbench -n -M prepared -c "$clients" -j 2 -T "$secs" -D run="$n" -D v=0 \
          -f "$here/$s.sql" "$db" 2>/dev/null | awk '/^tps/ {print int($3)}' || true)
    echo "round $r $s $tps $(cut -d' ' -f1 /proc/loadavg)"
  done
done
