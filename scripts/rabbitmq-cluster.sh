#!/usr/bin/env bash
# A private three-node RabbitMQ cluster for the cluster tests
# (broker-rabbitmq/tests/cluster.rs; scripts/test.sh starts it and stops it at the end).
# Never touches the shared node on 127.0.0.1:5672 (nor its cookie, nor
# the home folder's .erlang.cookie): own node names, AMQP ports, distribution ports, CLI
# distribution ports, data dirs and Erlang cookie, all under $RMQC_DIR
# (default <repo>/.brokers/rabbitmq-cluster). Management is off (no plugins).
# Ports: AMQP RMQC_BASE_PORT+I (default 5691..5693), distribution RMQC_DIST_BASE+I
# (25791..25793), CLI distribution from RMQC_CTL_DIST_MIN (35791).
#
#   cluster.sh up               wipe, start rmqc1..rmqc3, join rmqc2 and rmqc3 to rmqc1
#   cluster.sh start I          (re)start node I on its existing data; waits for AMQP
#   cluster.sh kill9 I          kill -9 node I's beam process (our PID file only)
#   cluster.sh stop I           stop node I cleanly (rabbitmqctl stop; a rolling restart's step)
#   cluster.sh status-up        exit 0 when all three nodes of ours are running
#   cluster.sh leader QUEUE     print the node name of QUEUE's leader
#   cluster.sh status QUEUE     quorum_status of QUEUE (one line per member)
#   cluster.sh running          print the running cluster members (one per line)
#   cluster.sh url I            print node I's AMQP URL
#   cluster.sh ctl I ARGS...    rabbitmqctl against node I
#   cluster.sh down             stop all three (by node name, then by our PIDs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${RMQC_DIR:-$ROOT/.brokers/rabbitmq-cluster}
BASE_PORT=${RMQC_BASE_PORT:-5690}      # node I: AMQP port BASE_PORT+I (5691..5693)
DIST_BASE=${RMQC_DIST_BASE:-25790}     # node I: distribution port DIST_BASE+I (25791..25793)
CTL_DIST_MIN=${RMQC_CTL_DIST_MIN:-35791}
BIN=/usr/lib/rabbitmq/bin

say() { echo "rmq-cluster: $*" >&2; }
die() { echo "rmq-cluster: $*" >&2; exit 1; }

# The AMQP port in the name: another checkout's cluster on other ports has other names.
node_name() { echo "rmqc$1-$(port_of "$1")@localhost"; }
port_of() { echo $((BASE_PORT + $1)); }
ndir() { echo "$DIR/n$1"; }
beam_pid() { [[ -f $(ndir "$1")/node.pid ]] && cat "$(ndir "$1")/node.pid"; }
# Ours: the PID from our PID file is alive and is the beam of that node name.
is_node() { # is_node PID I: PID is node I's beam, with our data directory
  tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$(node_name "$2")" &&
    tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qx "RABBITMQ_MNESIA_BASE=$(ndir "$2")/mnesia"
}
# The pid listening on node I's AMQP port, if any.
listener_pid() { ss -ltnpH "sport = :$(port_of "$1")" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2; }
ours() {
  local p
  p=$(beam_pid "$1" 2>/dev/null) && [[ -n $p ]] && kill -0 "$p" 2>/dev/null && is_node "$p" "$1" && return 0
  # The pid file can lag behind a node that was just restarted: the
  # listener on the node's port is ours if it is that node with our data.
  p=$(listener_pid "$1") && [[ -n $p ]] && is_node "$p" "$1" && { echo "$p" >"$(ndir "$1")/node.pid"; return 0; }
  return 1
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_env() { # in a subshell: the environment of node $1 (server and CLI)
  local i=$1 d
  d=$(ndir "$i")
  export HOME="$DIR" RABBITMQ_NODENAME=$(node_name "$i") RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$(port_of "$i") RABBITMQ_DIST_PORT=$((DIST_BASE + i)) \
    RABBITMQ_CTL_DIST_PORT_MIN=$CTL_DIST_MIN RABBITMQ_CTL_DIST_PORT_MAX=$((CTL_DIST_MIN + 10)) \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/node.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" ERL_EPMD_ADDRESS=127.0.0.1 \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
  unset RABBITMQ_ERLANG_COOKIE
}

amqp_ready() { # a real AMQP handshake: Connection.Start (class 10, method 10)
  local r port
  port=$(port_of "$1")
  r=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'AMQP\x00\x00\x09\x01' >&3 && head -c 11 <&3" 2>/dev/null | od -An -tx1 | tr -d ' \n') || true
  [[ $r == 010000* && ${r:14:8} == 000a000a ]]
}

ctl() { local i=$1; shift; (node_env "$i"; timeout 60 "$BIN/rabbitmqctl" -n "$(node_name "$i")" "$@"); }

launch() { # start node $1's server in the background (setsid, own log)
  local i=$1 d
  d=$(ndir "$i")
  mkdir -p "$d/log" "$d/mnesia"
  cat >"$d/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$(port_of "$i")
loopback_users = none
cluster_partition_handling = ignore
CONF
  : >"$d/rabbitmq-env.conf"
  echo "[]." >"$d/enabled_plugins"
  rm -f "$d/node.pid"
  (node_env "$i"; setsid nohup "$BIN/rabbitmq-server" >>"$d/server.log" 2>&1 </dev/null & echo $! >"$d/launcher.pid")
}

wait_ready() { # node $1 answers AMQP and has booted (await_startup)
  local i=$1 d
  d=$(ndir "$i")
  for _ in $(seq 1 1200); do
    amqp_ready "$i" && break
    kill -0 "$(<"$d/launcher.pid")" 2>/dev/null || ours "$i" || break
    sleep 0.1
  done
  amqp_ready "$i" || { tail -n 30 "$d/server.log" >&2; die "node $(node_name "$i") did not answer AMQP on $(port_of "$i") within 120 s"; }
  ctl "$i" await_startup >/dev/null 2>&1 || true
}

start_node() {
  local i=$1
  [[ $i =~ ^[123]$ ]] || die "node index must be 1, 2 or 3"
  if ours "$i"; then say "$(node_name "$i") already running (pid $(beam_pid "$i"))"; return 0; fi
  if port_open "$(port_of "$i")"; then
    # A node of ours that is still stopping (its pid file gone, its port not yet
    # closed): wait for it to go.
    for _ in $(seq 1 100); do port_open "$(port_of "$i")" || break; ours "$i" && break; sleep 0.2; done
    if ours "$i"; then say "$(node_name "$i") already running (pid $(beam_pid "$i"))"; return 0; fi
    port_open "$(port_of "$i")" && die "port $(port_of "$i") is taken by another program (listener pid $(listener_pid "$i"), pid file $(beam_pid "$i" 2>/dev/null))"
  fi
  launch "$i"
  wait_ready "$i"
  say "running $(node_name "$i") on 127.0.0.1:$(port_of "$i") (beam pid $(beam_pid "$i"))"
}

up() {
  [[ -x $BIN/rabbitmq-server ]] || die "RabbitMQ is not installed ($BIN/rabbitmq-server)"
  for i in 1 2 3; do
    ours "$i" && die "$(node_name "$i") is already running: run '$0 down' first"
    port_open "$(port_of "$i")" && die "port $(port_of "$i") is taken by another program"
    port_open $((DIST_BASE + i)) && die "distribution port $((DIST_BASE + i)) is taken by another program"
  done
  rm -rf "$DIR"
  mkdir -p "$DIR"
  head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"
  chmod 400 "$DIR/.erlang.cookie"
  for i in 1 2 3; do launch "$i"; done # boot in parallel
  for i in 1 2 3; do wait_ready "$i"; done
  for i in 2 3; do
    ctl "$i" stop_app >/dev/null
    ctl "$i" join_cluster "$(node_name 1)" >/dev/null
    ctl "$i" start_app >/dev/null
  done
  for _ in $(seq 1 60); do
    [[ $(running | wc -l) -eq 3 ]] && break
    sleep 1
  done
  [[ $(running | wc -l) -eq 3 ]] || die "cluster did not form: $(running | tr '\n' ' ')"
  say "cluster of $(running | tr '\n' ' ')up; beam pids $(beam_pid 1) $(beam_pid 2) $(beam_pid 3)"
}

any_running() { # index of a node of ours that is running
  local i
  for i in 1 2 3; do ours "$i" && { echo "$i"; return 0; }; done
  return 1
}

running() {
  local i
  i=$(any_running) || return 0
  ctl "$i" eval 'rabbit_nodes:all_running().' 2>/dev/null | tr -d "[]' \n" | tr ',' '\n' | grep -v '^$' || true
}

leader() {
  local i q=$1
  i=$(any_running) || die "no node running"
  ctl "$i" list_queues -q --no-table-headers name leader 2>/dev/null | awk -v q="$q" '$1 == q { print $2 }'
}

status() {
  local i q=$1
  i=$(any_running) || die "no node running"
  ctl "$i" eval "[{proplists:get_value(<<\"Node Name\">>, M), proplists:get_value(<<\"Raft State\">>, M)} || M <- rabbit_quorum_queue:status(<<\"/\">>, <<\"$q\">>)]." 2>&1 | tr -s ' \n' ' '
  echo
}

kill9() {
  local i=$1 p
  ours "$i" || die "$(node_name "$i") is not running"
  p=$(beam_pid "$i")
  kill -KILL "$p"
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
  say "killed $(node_name "$i") (beam pid $p) with SIGKILL"
}

stop_node() {
  local i=$1 p l
  if ours "$i"; then
    p=$(beam_pid "$i")
    ctl "$i" stop >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null || true; sleep 2; fi
    if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
    for _ in $(seq 1 100); do port_open "$(port_of "$i")" || break; sleep 0.1; done
  fi
  # The launcher shell (rabbitmq-server script) we started, if it outlived the beam.
  l=$(cat "$(ndir "$i")/launcher.pid" 2>/dev/null || true)
  if [[ -n $l ]] && kill -0 "$l" 2>/dev/null && tr '\0' ' ' <"/proc/$l/cmdline" 2>/dev/null | grep -q rabbitmq-server; then
    kill -TERM "$l" 2>/dev/null || true
  fi
}

down() {
  local i
  for i in 3 2 1; do stop_node "$i"; done
  say "stopped"
}

case "${1:-}" in
  up) up ;;
  start) start_node "$2" ;;
  kill9) kill9 "$2" ;;
  stop) stop_node "$2"; say "stopped $(node_name "$2")" ;;
  status-up) for i in 1 2 3; do ours "$i" || exit 1; done ;;
  leader) leader "$2" ;;
  status) status "$2" ;;
  running) running ;;
  url) echo "amqp://guest:guest@127.0.0.1:$(port_of "$2")/%2f" ;;
  ctl) i=$2; shift 2; ctl "$i" "$@" ;;
  down) down ;;
  *) echo "usage: $0 up|start I|kill9 I|stop I|status-up|leader Q|status Q|running|url I|ctl I ARGS|down" >&2; exit 2 ;;
esac
