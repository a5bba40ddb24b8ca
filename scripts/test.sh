#!/usr/bin/env bash
# The project's test command (README): does all set-up on a fresh machine, then runs
# every check of the workspace. Extra arguments go to `cargo nextest run`.
#   SKIP_LINT=1            skip rustfmt and clippy
#   BROKER_TEST_BACKENDS   which backends' tests run (default memory,kafka,rabbitmq)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
step() { printf '\n==> %s (at %ss)\n' "$*" "$((SECONDS - started))"; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
if [[ -z ${SKIP_LINT:-} ]]; then
  for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
      command -v rustup >/dev/null && rustup component add "$component"
    fi
  done
fi

step "brokers"
bash scripts/ensure-rabbitmq.sh
tansu_was_running=0
bash scripts/ensure-tansu.sh status >/dev/null 2>&1 && tansu_was_running=1
bash scripts/ensure-tansu.sh start
# Stop tansu at the end only if this run started it: a developer's own stays up.
if [[ $tansu_was_running == 0 ]]; then trap 'bash scripts/ensure-tansu.sh stop' EXIT; fi

export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:${TANSU_PORT:-9092}}
export RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export BROKER_TEST_BACKENDS=${BROKER_TEST_BACKENDS:-memory,kafka,rabbitmq}

if [[ -z ${SKIP_LINT:-} ]]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy"
  cargo clippy --workspace --all-targets --all-features -- -D warnings
fi

# Chaos tests restart the broker, which would disturb every other test on it:
# they run afterwards, on their own.
step "tests (nextest)"
cargo nextest run --workspace --all-features --no-fail-fast -E 'not test(/_chaos/)' "$@"
step "chaos tests (broker restarts, one at a time)"
cargo nextest run --workspace --all-features --no-fail-fast --no-tests=pass --test-threads 1 -E 'test(/_chaos/)' "$@"

step "doctests"
cargo test --workspace --all-features --doc

step "quickstart example"
cargo run --quiet --example quickstart

step "all passed in $((SECONDS - started))s"
