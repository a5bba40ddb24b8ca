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
LABEL=rabbitmq-tls
# shellcheck source=scripts/private-rabbitmq.sh
source "$ROOT/scripts/private-rabbitmq.sh"

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
  certs
  if needs_launch; then
    cat >"$DIR/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$PORT
ssl_options.cacertfile = $DIR/ca.pem
ssl_options.certfile = $DIR/server.pem
ssl_options.keyfile = $DIR/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
    launch_node
    say "started $NODE with TLS on 127.0.0.1:$PORT"
  fi
  echo "RABBITMQ_TLS_URL=amqps://guest:guest@localhost:$PORT/%2f"
  echo "RABBITMQ_TLS_CA=$DIR/ca.pem"
}

dispatch "$@"
