# Shared by the scripts that run a private, throwaway RabbitMQ node for tests
# (ensure-rabbitmq-tls.sh, ensure-rabbitmq-limits.sh): sourced after they set
# LABEL (log prefix), DIR (data, config, cookie), PORT, DIST_PORT and NODE. The node
# never touches the main one: its own node name, ports, data and Erlang cookie.

BIN=/usr/lib/rabbitmq/bin

say() { echo "$LABEL: $*"; }
die() { echo "$LABEL: $*" >&2; exit 1; }
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

# Refuses a port another program holds; true when the node must be launched
# (after the caller wrote $DIR/rabbitmq.conf, call launch_node).
needs_launch() {
  [[ -x $BIN/rabbitmq-server ]] || die "RabbitMQ is not installed (bash scripts/ensure-rabbitmq.sh installs it)"
  if port_open && ! ours; then
    die "port $PORT is taken by another program (another checkout's node?); choose another port"
  fi
  if port_open; then
    say "already listening on 127.0.0.1:$PORT"
    return 1
  fi
  mkdir -p "$DIR/log" "$DIR/mnesia"
}

# Starts the node with $DIR/rabbitmq.conf and waits (60 s at most) for its port.
launch_node() {
  : >"$DIR/rabbitmq-env.conf"
  echo "[]." >"$DIR/enabled_plugins"
  [[ -f $DIR/.erlang.cookie ]] || { head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"; chmod 400 "$DIR/.erlang.cookie"; }
  (node_env; setsid nohup "$BIN/rabbitmq-server" >"$DIR/server.log" 2>&1 </dev/null & echo $! >"$DIR/launcher.pid")
  for _ in $(seq 1 600); do
    port_open && break
    kill -0 "$(<"$DIR/launcher.pid")" 2>/dev/null || break # it gave up: say why below
    sleep 0.1
  done
  port_open || { tail -n 30 "$DIR/server.log" >&2; die "the node did not listen on 127.0.0.1:$PORT within 60 s"; }
}

stop() {
  if ! ours; then say "not running"; return 0; fi
  (node_env; timeout 30 "$BIN/rabbitmqctl" -n "$NODE" stop >/dev/null 2>&1) || true
  for _ in $(seq 1 100); do port_open || break; sleep 0.1; done
  if port_open && ours; then
    kill -TERM "$(<"$DIR/node.pid")" 2>/dev/null || true
    for _ in $(seq 1 100); do port_open || break; sleep 0.1; done
  fi
  port_open && die "still listening on $PORT"
  say "stopped"
}

# start|stop|status, with the caller's start().
dispatch() {
  case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) ours && port_open ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
  esac
}
