#!/usr/bin/env bash
# A second, throwaway RabbitMQ node with only a TLS listener, for the amqps:// tests.
# It never touches the main node (127.0.0.1:5672): its own node name, ports, data,
# config and Erlang cookie, all under <repo>/.brokers/rabbitmq-tls/. Certificates come
# from a throwaway CA made here with openssl (ca.pem is what the tests trust).
#
#   ensure-rabbitmq-tls.sh start    make certs if needed, start the node (idempotent);
#                                   prints RABBITMQ_TLS_URL=... and RABBITMQ_TLS_CA=...
#   ensure-rabbitmq-tls.sh stop     stop it; no error when not running
#   ensure-rabbitmq-tls.sh status   exit 0 when its TLS port accepts connections
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="$ROOT/.brokers/rabbitmq-tls"
PORT=${RABBITMQ_TLS_PORT:-5671}
DIST_PORT=${RABBITMQ_TLS_DIST_PORT:-$((PORT + 20000))}
# One node name per port: nodes of two checkouts must not clash in epmd.
NODE=broker-tls-$PORT@localhost
BIN=/usr/lib/rabbitmq/bin

say() { echo "rabbitmq-tls: $*"; }
die() { echo "rabbitmq-tls: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
# This checkout's node (its pid file names a live process).
ours() { [[ -f $DIR/node.pid ]] && kill -0 "$(<"$DIR/node.pid")" 2>/dev/null; }

node_env() {
  export HOME="$DIR" RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_DIST_PORT=$DIST_PORT RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" \
    RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" RABBITMQ_MNESIA_BASE="$DIR/mnesia" \
    RABBITMQ_LOG_BASE="$DIR/log" RABBITMQ_PID_FILE="$DIR/node.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" ERL_EPMD_ADDRESS=127.0.0.1 \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

certs() {
  [[ -f $DIR/ca.pem && -f $DIR/server.pem && -f $DIR/server.key ]] && return 0
  command -v openssl >/dev/null || die "openssl is needed (apt-get install openssl)"
  mkdir -p "$DIR"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=broker-test-ca" \
    -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$DIR/server.key" -out "$DIR/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$DIR/server.ext"
  openssl x509 -req -days 30 -in "$DIR/server.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
    -CAcreateserial -extfile "$DIR/server.ext" -out "$DIR/server.pem" 2>/dev/null
  chmod 644 "$DIR"/*.pem "$DIR"/*.key
  say "made a throwaway CA and a certificate for localhost in $DIR"
}

start() {
  [[ -x $BIN/rabbitmq-server ]] || die "RabbitMQ is not installed (bash scripts/ensure-rabbitmq.sh installs it)"
  certs
  if port_open && ! ours; then
    die "port $PORT is taken by another program (another checkout's TLS node?); choose another with RABBITMQ_TLS_PORT"
  fi
  if ! port_open; then
    mkdir -p "$DIR/log" "$DIR/mnesia"
    cat >"$DIR/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$PORT
ssl_options.cacertfile = $DIR/ca.pem
ssl_options.certfile = $DIR/server.pem
ssl_options.keyfile = $DIR/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
    : >"$DIR/rabbitmq-env.conf"
    echo "[]." >"$DIR/enabled_plugins"
    [[ -f $DIR/.erlang.cookie ]] || { head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"; chmod 400 "$DIR/.erlang.cookie"; }
    (node_env; setsid nohup "$BIN/rabbitmq-server" >"$DIR/server.log" 2>&1 </dev/null & echo $! >"$DIR/launcher.pid")
    for _ in $(seq 1 600); do
      port_open && break
      kill -0 "$(<"$DIR/launcher.pid")" 2>/dev/null || break # it gave up: say why below
      sleep 0.1
    done
    port_open || { tail -n 30 "$DIR/server.log" >&2; die "the TLS node did not listen on 127.0.0.1:$PORT within 60 s"; }
    say "started $NODE with TLS on 127.0.0.1:$PORT"
  else
    say "already listening on 127.0.0.1:$PORT"
  fi
  echo "RABBITMQ_TLS_URL=amqps://guest:guest@localhost:$PORT/%2f"
  echo "RABBITMQ_TLS_CA=$DIR/ca.pem"
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
