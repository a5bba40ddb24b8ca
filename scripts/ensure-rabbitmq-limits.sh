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
BIN=/usr/lib/rabbitmq/bin

say() { echo "rabbitmq-limits: $*"; }
die() { echo "rabbitmq-limits: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
ours() { [[ -f $DIR/node.pid ]] && kill -0 "$(<"$DIR/node.pid")" 2>/dev/null; }

node_env() {
  export HOME="$DIR" RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_DIST_PORT=$DIST_PORT RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" \
    RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" RABBITMQ_MNESIA_BASE="$DIR/mnesia" \
    RABBITMQ_LOG_BASE="$DIR/log" RABBITMQ_PID_FILE="$DIR/node.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" ERL_EPMD_ADDRESS=127.0.0.1 \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

start() {
  [[ -x $BIN/rabbitmq-server ]] || die "RabbitMQ is not installed (bash scripts/ensure-rabbitmq.sh installs it)"
  if port_open && ! ours; then
    die "port $PORT is taken by another program; choose another with RABBITMQ_LIMITS_PORT"
  fi
  if ! port_open; then
    mkdir -p "$DIR/log" "$DIR/mnesia"
    cat >"$DIR/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$PORT
max_message_size = $MAX_MESSAGE_SIZE
CONF
    : >"$DIR/rabbitmq-env.conf"
    echo "[]." >"$DIR/enabled_plugins"
    [[ -f $DIR/.erlang.cookie ]] || { head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"; chmod 400 "$DIR/.erlang.cookie"; }
    (node_env; setsid nohup "$BIN/rabbitmq-server" >"$DIR/server.log" 2>&1 </dev/null & echo $! >"$DIR/launcher.pid")
    for _ in $(seq 1 600); do
      port_open && break
      kill -0 "$(<"$DIR/launcher.pid")" 2>/dev/null || break
      sleep 0.1
    done
    port_open || { tail -n 30 "$DIR/server.log" >&2; die "the node did not listen on 127.0.0.1:$PORT within 60 s"; }
    say "started $NODE on 127.0.0.1:$PORT (max_message_size $MAX_MESSAGE_SIZE)"
  else
    say "already listening on 127.0.0.1:$PORT"
  fi
  echo "RABBITMQ_LIMITS_URL=amqp://guest:guest@127.0.0.1:$PORT/%2f"
}

stop() {
  if ! ours; then say "not running"; return 0; fi
  (node_env; timeout 30 "$BIN/rabbitmqctl" -n $NODE stop >/dev/null 2>&1) || true
  for _ in $(seq 1 100); do port_open || break; sleep 0.1; done
  if port_open && ours; then
    kill -TERM "$(<"$DIR/node.pid")" 2>/dev/null || true
    for _ in $(seq 1 100); do port_open || break; sleep 0.1; done
  fi
  port_open && die "still listening on $PORT"
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) ours && port_open ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
