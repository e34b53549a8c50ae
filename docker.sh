#!/usr/bin/env bash
# logdist control script: runs the emitter, the distributor and three analyzers, and checks them.
# Run `./docker.sh help` for the verbs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${LOGDIST_RUN_DIR:-$ROOT/.run}"
BIN="$ROOT/target/release"

EMITTER_URL="http://127.0.0.1:8080"
DISTRIBUTOR_URL="http://127.0.0.1:8081"
ANALYZERS=(analyzer-1 analyzer-2 analyzer-3)
SERVICES=(analyzer-1 analyzer-2 analyzer-3 distributor emitter)

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not installed"
  done
}

usage() {
  cat <<'EOF'
Usage: ./docker.sh VERB [ARGS]

  start [--local|--docker]   start everything (says which mode it uses)
  stop                       stop everything (SIGTERM, then SIGKILL after 30 s)
  restart [SERVICE]          restart one service (or all); a killed distributor comes
                             back on the same WAL
  status                     each service: pid, running, health
  logs [SERVICE] [-f]        last lines of the logs (or follow one)
  generate [N]               N batches of 250 messages (5 emitters x 50), default 1
  queue                      the distributor's GET /queue
  enable|disable analyzer-N  switch an analyzer on or off (it answers 503 while off)
  verify-weights [--tolerance PP]
                             processed share per analyzer against its weight; exit 1
                             beyond the tolerance (default 1 percentage point)
  verify-delivery            acknowledged vs processed, message by message; exit 1 if
                             anything acknowledged was lost

Services: analyzer-1 analyzer-2 analyzer-3 distributor emitter
Ports: emitter 8080, distributor 8081, analyzers 8082-8084 (see config/*.toml).
Native mode keeps pids, logs and the WAL under .run/.
EOF
}

# ---------------------------------------------------------------- native mode

pid_file() { echo "$RUN/$1.pid"; }
log_file() { echo "$RUN/logs/$1.log"; }

port_of() {
  case "$1" in
    emitter) echo 8080 ;;
    distributor) echo 8081 ;;
    analyzer-*) echo $((8081 + ${1#analyzer-})) ;;
    *) die "unknown service '$1' (one of: ${SERVICES[*]})" ;;
  esac
}

running_pid() {
  local f
  f="$(pid_file "$1")"
  [[ -f "$f" ]] || return 1
  local pid
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

build() {
  if ! command -v cargo >/dev/null 2>&1; then
    [[ -x "$BIN/distributor" && -x "$BIN/analyzer" && -x "$BIN/emitter" ]] ||
      die "cargo is not installed and $BIN has no binaries (install Rust: https://rustup.rs)"
    return 0
  fi
  # A no-op when the binaries are up to date.
  (cd "$ROOT" && cargo build --release --quiet -p distributor -p analyzer -p emitter)
}

wait_healthy() {
  local service=$1 url=$2 deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null "$url/health" 2>/dev/null; do
    if ! running_pid "$service" >/dev/null; then
      echo "--- last lines of $(log_file "$service") ---" >&2
      tail -n 20 "$(log_file "$service")" >&2 || true
      die "$service exited during start"
    fi
    (( SECONDS < deadline )) || die "$service not healthy after 30 s (see ./docker.sh logs $service)"
    sleep 0.2
  done
}

start_service() {
  local service=$1 port
  port="$(port_of "$service")"
  if pid="$(running_pid "$service")"; then
    say "$service already running (pid $pid)"
    return 0
  fi
  mkdir -p "$RUN/logs"
  local -a cmd
  case "$service" in
    analyzer-*) cmd=("$BIN/analyzer" --config "$ROOT/config/analyzer.toml" --id "$service" --port "$port") ;;
    distributor) cmd=("$BIN/distributor" --config "$ROOT/config/distributor.toml" --data-dir "$RUN/distributor/data") ;;
    emitter) cmd=("$BIN/emitter" serve --config "$ROOT/config/emitter.toml" --port "$port" --distributor-url "$DISTRIBUTOR_URL") ;;
  esac
  (cd "$ROOT" && exec "${cmd[@]}" >>"$(log_file "$service")" 2>&1) &
  echo $! >"$(pid_file "$service")"
  wait_healthy "$service" "http://127.0.0.1:$port"
  say "$service up on :$port (pid $(cat "$(pid_file "$service")"))"
}

stop_service() {
  local service=$1 pid
  if ! pid="$(running_pid "$service")"; then
    rm -f "$(pid_file "$service")"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      say "$service did not stop in 30 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$(pid_file "$service")"
  say "$service stopped"
}

native_start() {
  need curl
  build
  for s in "${SERVICES[@]}"; do start_service "$s"; done
  say "all services up. Try: ./docker.sh generate 40 && ./docker.sh verify-weights"
}

# ---------------------------------------------------------------- verbs

docker_answers() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

cmd_start() {
  local mode=auto
  for arg in "$@"; do
    case "$arg" in
      --local) mode=local ;;
      --docker) mode=docker ;;
      *) die "start: unknown option '$arg'" ;;
    esac
  done
  case "$mode" in
    docker) die "Docker mode is not built yet; use ./docker.sh start --local" ;;
    local) say "mode: native processes (--local)" ;;
    auto)
      if docker_answers; then
        say "mode: native processes (a Docker engine answers, but the Docker mode is not built yet)"
      else
        say "mode: native processes (no Docker engine answers)"
      fi ;;
  esac
  native_start
}

cmd_stop() {
  for s in emitter distributor analyzer-1 analyzer-2 analyzer-3; do stop_service "$s"; done
}

cmd_restart() {
  if [[ $# -eq 0 ]]; then
    cmd_stop
    native_start
    return
  fi
  port_of "$1" >/dev/null
  build
  stop_service "$1"
  start_service "$1"
}

cmd_status() {
  printf '%-12s %-8s %-8s %s\n' SERVICE PID RUNNING HEALTH
  for s in "${SERVICES[@]}"; do
    local pid="-" up="no" health="-"
    if pid="$(running_pid "$s")"; then up="yes"; else pid="-"; fi
    health="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(port_of "$s")/health" 2>/dev/null || true)"
    [[ "$health" == "000" || -z "$health" ]] && health="unreachable"
    printf '%-12s %-8s %-8s %s\n' "$s" "$pid" "$up" "$health"
  done
}

cmd_logs() {
  local follow=0 service=""
  for arg in "$@"; do
    case "$arg" in
      -f|--follow) follow=1 ;;
      *) port_of "$arg" >/dev/null; service=$arg ;;
    esac
  done
  if [[ -n "$service" ]]; then
    if (( follow )); then exec tail -n 50 -f "$(log_file "$service")"; fi
    tail -n 100 "$(log_file "$service")"
  else
    for s in "${SERVICES[@]}"; do
      echo "----- $s -----"
      tail -n 20 "$(log_file "$s")" 2>/dev/null || echo "(no log)"
    done
  fi
}

pretty() { if command -v python3 >/dev/null 2>&1; then python3 -m json.tool; else cat; fi; }

cmd_generate() {
  local n=${1:-1}
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 ]] || die "generate: N must be a positive integer"
  say "generating $n batch(es) of 250 messages"
  curl -fsS -X POST "$EMITTER_URL/generate" -H 'content-type: application/json' \
    -d "{\"batches\": $n}" | pretty
}

cmd_switch() {
  local verb=$1 analyzer=${2:-}
  [[ "$analyzer" =~ ^analyzer-[0-9]+$ ]] || die "$verb: name an analyzer, e.g. ./docker.sh $verb analyzer-2"
  curl -fsS -X POST "http://127.0.0.1:$(port_of "$analyzer")/$verb"
  echo
}

cmd_verify_weights() {
  build
  "$BIN/emitter" verify-weights --distributor "$DISTRIBUTOR_URL" "$@"
}

cmd_verify_delivery() {
  build
  "$BIN/emitter" verify-delivery --emitter "$EMITTER_URL" --distributor "$DISTRIBUTOR_URL" "$@"
}

verb=${1:-help}
shift || true
case "$verb" in
  start) cmd_start "$@" ;;
  stop) cmd_stop ;;
  restart) cmd_restart "$@" ;;
  status) cmd_status ;;
  logs) cmd_logs "$@" ;;
  generate) cmd_generate "$@" ;;
  queue) need curl; curl -fsS "$DISTRIBUTOR_URL/queue" | pretty ;;
  enable|disable) need curl; cmd_switch "$verb" "$@" ;;
  verify-weights) cmd_verify_weights "$@" ;;
  verify-delivery) cmd_verify_delivery "$@" ;;
  help|-h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
