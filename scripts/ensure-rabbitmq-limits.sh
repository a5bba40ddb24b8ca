#!/usr/bin/env bash
# A throwaway RabbitMQ node with a small max_message_size (4 MiB), for the tests of final
# refusals (broker-rabbitmq/tests/faults.rs). Modelled on ensure-rabbitmq-tls.sh: it never
# touches the main node (127.0.0.1:5672): its own node name, ports, data, config and Erlang
# cookie, all under <repo>/.brokers/rabbitmq-limits/.
#
#   ensure-rabbitmq-limits.sh start    start the node (idempotent); prints RABBITMQ_LIMITS_URL=...
#   ensure-rabbitmq-limits.sh stop     stop it; no error when not running
#   ensure-rabbitmq-limits.sh status   exit 0 when its port accepts connections
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="$ROOT/.brokers/rabbitmq-limits"
PORT=${RABBITMQ_LIMITS_PORT:-5682}
DIST_PORT=${RABBITMQ_LIMITS_DIST_PORT:-$((PORT + 20000))}
MAX_MESSAGE_SIZE=4194304
NODE=broker-limits-$PORT@localhost
LABEL=rabbitmq-limits
# shellcheck source=scripts/private-rabbitmq.sh
source "$ROOT/scripts/private-rabbitmq.sh"

start() {
  if needs_launch; then
    cat >"$DIR/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$PORT
max_message_size = $MAX_MESSAGE_SIZE
CONF
    launch_node
    say "started $NODE on 127.0.0.1:$PORT (max_message_size $MAX_MESSAGE_SIZE)"
  fi
  echo "RABBITMQ_LIMITS_URL=amqp://guest:guest@127.0.0.1:$PORT/%2f"
}

dispatch "$@"
