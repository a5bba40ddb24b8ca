#!/usr/bin/env bash
# The project's test command (named in the README; .ci/run calls it). On a fresh machine
# it does all set-up (cargo-nextest, rustfmt/clippy, RabbitMQ, the tansu Kafka test
# broker), then runs every check of the workspace, stopping at the first failure:
#   cargo fmt --check, clippy -D warnings, the facade's feature combinations, nextest (all
#   tests), doctests, examples build.
#
#   bash scripts/test.sh [NEXTEST ARGS...]   extra arguments go to `cargo nextest run`
#                                            (e.g. `bash scripts/test.sh memory`)
# Environment:
#   SKIP_LINT=1            skip rustfmt and clippy (quick local runs)
#   BROKER_TEST_BACKENDS   backends whose tests run (default memory,kafka,rabbitmq);
#                          brokers of backends not listed are not set up
#   KAFKA_BROKERS          default 127.0.0.1:$TANSU_PORT (tansu, started here); when set
#                          to anything else, tansu is not started
#   TANSU_PORT             default 9092
#   OUTBOX_DATABASE_URL    PostgreSQL for the outbox tests; default a private cluster on
#                          127.0.0.1:55432 (scripts/ensure-postgres.sh, PGTEST_PORT)
#   RABBITMQ_URL           default amqp://guest:guest@127.0.0.1:5672/%2f; RabbitMQ is
#                          installed/started here only when it points at this machine; then a
#                          second local node with a TLS listener is started too
#                          (scripts/ensure-rabbitmq-tls.sh; RABBITMQ_TLS_PORT, default 5671),
#                          and a private three-node cluster for the cluster tests
#                          (scripts/rabbitmq-cluster.sh; AMQP ports 5691-5693)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# One build from scratch per run: incremental caches only cost disk here (gigabytes per
# feature combination).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

T0=$SECONDS
banner() { printf '\n==> %s   [%ss elapsed]\n' "$*" "$((SECONDS - T0))"; }

# step NAME CMD...: run one step with a banner; report its time; stop on failure.
step() {
  local name=$1 t=$SECONDS rc=0
  shift
  banner "$name"
  "$@" || rc=$?
  if ((rc != 0)); then
    printf '\n==> FAILED: %s (exit %s) after %ss   [%ss elapsed]\n' "$name" "$rc" "$((SECONDS - t))" "$((SECONDS - T0))" >&2
    exit "$rc"
  fi
  printf '==> ok: %s in %ss\n' "$name" "$((SECONDS - t))"
}

# --- toolchain -----------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }

banner "toolchain"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest missing: cargo install cargo-nextest --locked"
  cargo install cargo-nextest --locked
fi
if [[ -z ${SKIP_LINT:-} ]]; then
  for tool in fmt clippy; do
    component=$tool
    [[ $tool == fmt ]] && component=rustfmt
    if ! cargo "$tool" --version >/dev/null 2>&1; then
      echo "$component missing: rustup component add $component"
      if command -v rustup >/dev/null 2>&1; then rustup component add "$component" || true; fi
      cargo "$tool" --version >/dev/null 2>&1 ||
        { echo "test.sh: 'cargo $tool' unavailable; install the $component component (or SKIP_LINT=1)" >&2; exit 1; }
    fi
  done
fi
echo "$(cargo --version); $(cargo nextest --version 2>/dev/null | head -n 1)"
# rdkafka's `ssl` feature (TLS and SASL for Kafka) links the system OpenSSL.
if ! pkg-config --exists openssl 2>/dev/null; then
  echo "OpenSSL headers missing: apt-get install libssl-dev pkg-config"
  sudo_=""
  ((EUID == 0)) || sudo_=sudo
  $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq libssl-dev pkg-config
fi

# --- brokers -------------------------------------------------------------------------
export BROKER_TEST_BACKENDS=${BROKER_TEST_BACKENDS:-memory,kafka,rabbitmq}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Another checkout's tansu (or any program) on 9092 must not stop a run: without an
# explicit TANSU_PORT, this checkout's tansu takes the first free port from 19092.
if [[ -z ${TANSU_PORT:-} && -z ${KAFKA_BROKERS:-} ]] && ! bash scripts/ensure-tansu.sh status >/dev/null 2>&1 && port_open 9092; then
  for p in $(seq 19092 19191); do port_open "$p" || { export TANSU_PORT=$p; break; }; done
  echo "port 9092 is taken by another program; tansu for this run uses ${TANSU_PORT:?no free port}"
fi
export TANSU_PORT=${TANSU_PORT:-9092}
tansu_addr=127.0.0.1:$TANSU_PORT
export KAFKA_BROKERS=${KAFKA_BROKERS:-$tansu_addr}
export RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
# Queues the tests cannot delete themselves (a test that failed midway) expire after 2 min.
export RABBITMQ_QUEUE_EXPIRY_MS=${RABBITMQ_QUEUE_EXPIRY_MS:-120000}
wants() { [[ ",${BROKER_TEST_BACKENDS// /}," == *",$1,"* ]]; }

# Brokers this run started are stopped when it ends, however it ends.
on_exit=()
cleanup() { for c in "${on_exit[@]}"; do $c || true; done; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

banner "brokers (backends: $BROKER_TEST_BACKENDS)"
if wants rabbitmq; then
  if [[ $RABBITMQ_URL =~ @(127\.0\.0\.1|localhost)(:5672)?(/|$) ]]; then
    bash scripts/ensure-rabbitmq.sh
    # A second local node with a TLS listener for the amqps:// tests (a free port when
    # 5671 is taken by another checkout's node); stopped at the end if started here.
    if [[ -z ${RABBITMQ_TLS_PORT:-} ]] && ! bash scripts/ensure-rabbitmq-tls.sh status && port_open 5671; then
      for p in $(seq 15671 15770); do port_open "$p" || { export RABBITMQ_TLS_PORT=$p; break; }; done
    fi
    bash scripts/ensure-rabbitmq-tls.sh status || on_exit+=("bash scripts/ensure-rabbitmq-tls.sh stop")
    tls_env=$(bash scripts/ensure-rabbitmq-tls.sh start)
    echo "$tls_env"
    RABBITMQ_TLS_URL=$(sed -n 's/^RABBITMQ_TLS_URL=//p' <<<"$tls_env")
    RABBITMQ_TLS_CA=$(sed -n 's/^RABBITMQ_TLS_CA=//p' <<<"$tls_env")
    export RABBITMQ_TLS_URL RABBITMQ_TLS_CA
    # A third node with max_message_size 4 MiB for the refusal tests (broker-rabbitmq/tests/faults.rs),
    # on a free port when 5682 is taken by another checkout's node.
    if [[ -z ${RABBITMQ_LIMITS_PORT:-} ]] && ! bash scripts/ensure-rabbitmq-limits.sh status && port_open 5682; then
      for p in $(seq 15682 15781); do port_open "$p" || { export RABBITMQ_LIMITS_PORT=$p; break; }; done
    fi
    bash scripts/ensure-rabbitmq-limits.sh status || on_exit+=("bash scripts/ensure-rabbitmq-limits.sh stop")
    RABBITMQ_LIMITS_URL=$(bash scripts/ensure-rabbitmq-limits.sh start | sed -n 's/^RABBITMQ_LIMITS_URL=//p')
    export RABBITMQ_LIMITS_URL
    # A private three-node cluster for the cluster tests (broker-rabbitmq/tests/cluster.rs),
    # booted in the background while the lint steps run (about a minute); the tests
    # wait for it (cluster_ready below). Stopped at the end if started here.
    # Ports: 5691-5693 (distribution 25791-25793), or the first free set above them
    # when another checkout's cluster holds those.
    if [[ -z ${RMQC_BASE_PORT:-} ]] && ! bash scripts/rabbitmq-cluster.sh status-up; then
      for k in $(seq 0 30); do
        b=$((5690 + 10 * k)) d=$((25790 + 10 * k)) c=$((35791 + 20 * k)) free=1
        for p in $((b + 1)) $((b + 2)) $((b + 3)) $((d + 1)) $((d + 2)) $((d + 3)) $c; do
          port_open "$p" && { free=""; break; }
        done
        [[ -n $free ]] && { export RMQC_BASE_PORT=$b RMQC_DIST_BASE=$d RMQC_CTL_DIST_MIN=$c; break; }
      done
    fi
    mkdir -p target
    if bash scripts/rabbitmq-cluster.sh status-up; then
      echo "rabbitmq cluster: already running"
      cluster_boot=""
    else
      on_exit+=("bash scripts/rabbitmq-cluster.sh down")
      bash scripts/rabbitmq-cluster.sh up >target/rabbitmq-cluster-up.log 2>&1 &
      cluster_boot=$!
    fi
    RABBITMQ_CLUSTER_URLS=$(for i in 1 2 3; do bash scripts/rabbitmq-cluster.sh url "$i"; done | paste -sd,)
    export RABBITMQ_CLUSTER_URLS
  else
    echo "rabbitmq: using RABBITMQ_URL as given (not set up here)"
  fi
fi
if wants kafka; then
  if [[ $KAFKA_BROKERS == "$tansu_addr" ]]; then
    # Stop tansu on exit only if this run started it: a developer's running tansu stays up.
    if ! bash scripts/ensure-tansu.sh status >/dev/null 2>&1; then
      on_exit+=("bash scripts/ensure-tansu.sh stop")
    fi
    bash scripts/ensure-tansu.sh start
  else
    echo "kafka: using KAFKA_BROKERS=$KAFKA_BROKERS (tansu not started)"
  fi
fi
# Independent Python clients (pika, confluent-kafka) for the interop tests.
if wants kafka || wants rabbitmq; then
  interop_env=$(bash scripts/ensure-interop-venv.sh)
  echo "$interop_env"
  INTEROP_PYTHON=$(sed -n 's/^INTEROP_PYTHON=//p' <<<"$interop_env")
  export INTEROP_PYTHON
fi
# A private PostgreSQL cluster (own port and data directory) for the outbox tests;
# installed from Debian's packages when absent, stopped at the end if started here.
if [[ -z ${OUTBOX_DATABASE_URL:-} ]]; then
  bash scripts/ensure-postgres.sh status >/dev/null 2>&1 || on_exit+=("bash scripts/ensure-postgres.sh stop")
  OUTBOX_DATABASE_URL=$(bash scripts/ensure-postgres.sh start | tail -n 1)
  export OUTBOX_DATABASE_URL
  echo "postgres: $OUTBOX_DATABASE_URL"
fi

# --- checks --------------------------------------------------------------------------
if [[ -z ${SKIP_LINT:-} ]]; then
  step "cargo fmt --check" cargo fmt --all -- --check
  step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --all-features -- -D warnings
else
  banner "SKIP_LINT set: skipping fmt and clippy"
fi
# The facade's feature combinations (README "Start here"): each backend and TLS choice
# compiles alone, the wiring tests run where a left-out feature changes what they check,
# and a RabbitMQ-only build has no rdkafka. (kafka-tls-vendored builds OpenSSL from
# source, minutes: FACADE_VENDORED=1 checks it too.)
facade_features() {
  local f combos=("" kafka rabbitmq kafka,rabbitmq kafka-tls rabbitmq-rustls rabbitmq-rustls-ring rabbitmq-native-tls rabbitmq,outbox app rabbitmq,app cli otel prometheus rabbitmq,otel,prometheus)
  [[ -n ${FACADE_VENDORED:-} ]] && combos+=(kafka-tls-vendored)
  for f in "${combos[@]}"; do
    echo "-- cargo check -p broker --no-default-features --features '$f'"
    cargo check -q -p broker --all-targets --no-default-features --features "$f" || return
  done
  for f in "" kafka rabbitmq; do
    cargo test -q -p broker --no-default-features --features "$f" --test wiring || return
  done
  if cargo tree -p broker --no-default-features --features rabbitmq-rustls -e normal | grep rdkafka; then
    echo "rdkafka in a RabbitMQ-only build of the facade" >&2
    return 1
  fi
  # Observability crates only with `otel` / `metrics` / `prometheus`.
  if cargo tree -p broker -e normal | grep -E "opentelemetry|metrics"; then
    echo "observability crates in a default build of the facade" >&2
    return 1
  fi
}
step "facade feature combinations" facade_features
# .config/nextest.toml runs the broker-restarting rabbitmq_chaos tests last and alone.
# The cluster booting in the background (see "brokers") must be up before the tests.
cluster_ready() {
  [[ -z ${cluster_boot:-} ]] && return 0
  wait "$cluster_boot" || { cat target/rabbitmq-cluster-up.log >&2; return 1; }
  cat target/rabbitmq-cluster-up.log
}
step "rabbitmq cluster up" cluster_ready
step "tests (cargo nextest)" cargo nextest run --workspace --all-features --no-fail-fast "$@"
step "doctests" cargo test --workspace --all-features --doc
step "examples build" cargo build --workspace --examples
# The benchmark's smoke preset, in the debug build the tests already made: it checks that
# every scenario runs; figures come from `cargo run --release -p bench` (README).
if wants kafka && wants rabbitmq; then
  step "benchmark smoke" cargo run -q -p bench -- --preset smoke --out target/bench-smoke.md
fi
# The quickstart runs on the embedded memory backend: no broker flags.
step "quickstart" env -u KAFKA_ENABLED -u RABBITMQ_ENABLED cargo run -q -p examples --example quickstart

banner "all checks passed"
