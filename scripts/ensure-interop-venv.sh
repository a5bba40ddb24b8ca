#!/usr/bin/env bash
# The Python venv of the interop tests (tests/tests/interop_*.rs run tests/interop/*.py
# in it): independent clients that produce and read raw records and messages.
#   pika             RabbitMQ (AMQP 0-9-1)
#   confluent-kafka  Kafka; its manylinux wheel bundles librdkafka (no system library)
# Idempotent: when the venv exists with these pins it only prints the path (well under
# a second). Creates it at <repo>/target/interop-venv otherwise (INTEROP_VENV overrides).
#
#   bash scripts/ensure-interop-venv.sh    prints INTEROP_PYTHON=<venv python>
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${INTEROP_VENV:-$ROOT/target/interop-venv}
PY=$VENV/bin/python
PINS=(pika==1.3.2 confluent-kafka==2.12.1)
STAMP=$VENV/.interop-pins

say() { echo "interop-venv: $*" >&2; }
die() { echo "interop-venv: $*" >&2; exit 1; }

if [[ -x $PY && -f $STAMP && $(<"$STAMP") == "${PINS[*]}" ]] && "$PY" -c 'import pika, confluent_kafka' 2>/dev/null; then
  echo "INTEROP_PYTHON=$PY"
  exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (apt-get install python3)"
# Debian splits venv/ensurepip into python3-venv.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  say "python3's venv module is missing: apt-get install python3-venv"
  sudo_=""
  ((EUID == 0)) || sudo_=sudo
  $sudo_ apt-get update -qq
  ver=$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq python3-venv ||
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "python$ver-venv" ||
    die "could not install python3-venv"
fi

if [[ ! -x $PY ]]; then
  say "creating $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
fi
say "installing ${PINS[*]}"
"$PY" -m pip install --quiet --disable-pip-version-check --only-binary confluent-kafka "${PINS[@]}" ||
  die "pip install ${PINS[*]} failed (is PyPI reachable?)"
"$PY" -c 'import pika, confluent_kafka' || die "the venv cannot import pika and confluent_kafka"
echo "${PINS[*]}" >"$STAMP"
echo "INTEROP_PYTHON=$PY"
