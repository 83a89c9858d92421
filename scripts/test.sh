#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Starts the services the tests need (PostgreSQL and NATS if stopped; a
# Kafka-protocol broker, tansu, built once and started on 127.0.0.1:9092), then checks formatting, lints (warnings
# are errors), docs (warnings are errors), and runs every test and doctest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/kafka.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export VEXTRUS_TEST_PG_URL="${VEXTRUS_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export VEXTRUS_TEST_NATS_URL="${VEXTRUS_TEST_NATS_URL:-nats://127.0.0.1:4222}"
export VEXTRUS_TEST_KAFKA_BROKERS="${VEXTRUS_TEST_KAFKA_BROKERS:-127.0.0.1:9092}"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== cargo test"
cargo test --workspace --locked
