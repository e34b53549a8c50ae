#!/usr/bin/env bash
# logdist control script: runs the emitter, the distributor and three analyzers, and checks them.
# Run `./docker.sh help` for the verbs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${LOGDIST_RUN_DIR:-$ROOT/.run}"
BIN="$ROOT/target/release"

EMITTER_URL="http://127.0.0.1:8080"
DISTRIBUTOR_URL="http://127.0.0.1:8081"
MODE="$(cat "$RUN/mode" 2>/dev/null || echo native)"
ANALYZER_COUNT="$(cat "$RUN/docker/analyzers" 2>/dev/null || echo 3)"
[[ "$MODE" == docker ]] || ANALYZER_COUNT=3
set_services() {
  SERVICES=()
  local i
  for ((i = 1; i <= ANALYZER_COUNT; i++)); do SERVICES+=("analyzer-$i"); done
  SERVICES+=(distributor emitter)
}
set_services

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

  start [--local|--docker] [--analyzers N]
                             start everything: in containers when a Docker engine
                             answers, else as native processes (it says which);
                             --analyzers N (Docker mode) runs N analyzers
  stop [--volumes]           stop everything (SIGTERM, then SIGKILL after the grace
                             period); --volumes also deletes the Docker WAL volume
  restart [SERVICE]          restart one service (or all); a killed distributor comes
                             back on the same WAL
  status                     each service: pid, running, health
  logs [SERVICE] [-f]        last lines of the logs (or follow one)
  generate [N]               N batches of 250 messages (5 emitters x 50), default 1
  queue                      the distributor's GET /queue
  enable|disable analyzer-N  switch an analyzer on or off (it answers 503 while off)
  weights ID=W [ID=W ...]    change weights at runtime (PUT /admin/weights), e.g.
                             ./docker.sh weights analyzer-1=0.6 analyzer-2=0.2 analyzer-3=0.2;
                             stored with the WAL, so they survive restarts
  dashboard                  print the dashboard's URL (and check that it answers)
  verify-weights [--tolerance PP]
                             processed share per analyzer against its weight; exit 1
                             beyond the tolerance (default 1 percentage point)
  verify-delivery            acknowledged vs processed, message by message; exit 1 if
                             anything acknowledged was lost
  crash-test [--long] [--cycles N] [--scenario NAME|all] [--fault-secs S] [--seed N]
                             fault-injection suite on native processes of its own
                             (ports picked free, files under .run/crash-test): kills,
                             SIGTERM, flapping, slow and failing analyzers, all down,
                             disk full, torn WAL, bad input; prints a table, exit 1 if
                             an acknowledged message was lost. --long: 100 SIGKILL
                             cycles, 20 s faults, then the property tests and the WAL
                             crash test with long settings
  build-image                build the logdist:local image only
  render-compose [N]         print the compose file for N analyzers (docker/ holds N=3)
  render-config [N]          print the distributor's settings for N analyzers in compose

Services: analyzer-1..N distributor emitter
Ports on 127.0.0.1: emitter 8080, distributor 8081, analyzer-N 8081+N.
Native mode keeps pids, logs and the WAL under .run/; Docker mode keeps the WAL in
the volume logdist_wal. Docker mode needs cargo on the host: the image is made from
the host's release binaries (no base image is pulled).
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

# ---------------------------------------------------------------- docker mode

DOCKER_DIR="$RUN/docker"
IMAGE="logdist:local"
PROJECT="logdist"

compose() {
  local file="$DOCKER_DIR/docker-compose.yml"
  if docker compose version >/dev/null 2>&1; then
    docker compose -p "$PROJECT" -f "$file" "$@"
  elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose -p "$PROJECT" -f "$file" "$@"
  else
    die "neither 'docker compose' nor 'docker-compose' is installed"
  fi
}

weight_of() { # weight of analyzer N: LOGDIST_WEIGHTS (comma list) or 0.5,0.3,0.2, then 0.2
  local n=$1 list
  IFS=',' read -r -a list <<<"${LOGDIST_WEIGHTS:-0.5,0.3,0.2}"
  if (( n <= ${#list[@]} )); then echo "${list[n-1]}"; else echo 0.2; fi
}

render_distributor_toml() {
  local n=$1 i
  cat <<EOF
# Generated by ./docker.sh for $n analyzers: the distributor's settings inside compose.
host = "0.0.0.0"
port = 8081
data_dir = "/data"
EOF
  for ((i = 1; i <= n; i++)); do
    printf '\n[[analyzers]]\nid = "analyzer-%d"\nweight = %s\nendpoint = "http://analyzer-%d:%d"\n' \
      "$i" "$(weight_of "$i")" "$i" $((8081 + i))
  done
}

render_compose() {
  local n=$1 i port
  cat <<EOF
# Generated by ./docker.sh for $n analyzers (./docker.sh start --docker --analyzers N).
# Ports are published on 127.0.0.1 only; services reach each other by name on their own network.
version: "2.4"
services:
EOF
  for ((i = 1; i <= n; i++)); do
    port=$((8081 + i))
    cat <<EOF
  analyzer-$i:
    image: $IMAGE
    command: ["analyzer", "--id", "analyzer-$i", "--host", "0.0.0.0", "--port", "$port"]
    ports: ["127.0.0.1:$port:$port"]
    healthcheck:
      test: ["CMD", "analyzer", "--probe", "http://127.0.0.1:$port/status"]
      interval: 2s
      timeout: 3s
      retries: 30
EOF
  done
  cat <<EOF
  distributor:
    image: $IMAGE
    command: ["distributor", "--config", "/etc/logdist/distributor.toml"]
    ports: ["127.0.0.1:8081:8081"]
    volumes: ["wal:/data"]
    stop_grace_period: 40s
    healthcheck:
      test: ["CMD", "distributor", "--probe", "http://127.0.0.1:8081/health"]
      interval: 2s
      timeout: 3s
      retries: 30
    depends_on:
EOF
  for ((i = 1; i <= n; i++)); do
    printf '      analyzer-%d:\n        condition: service_healthy\n' "$i"
  done
  cat <<EOF
  emitter:
    image: $IMAGE
    command: ["emitter", "serve", "--host", "0.0.0.0", "--port", "8080", "--distributor-url", "http://distributor:8081"]
    ports: ["127.0.0.1:8080:8080"]
    healthcheck:
      test: ["CMD", "emitter", "probe", "http://127.0.0.1:8080/health"]
      interval: 2s
      timeout: 3s
      retries: 30
    depends_on:
      distributor:
        condition: service_healthy
volumes:
  wal: {}
EOF
}

docker_build() {
  build
  local ctx="$DOCKER_DIR/context" bin lib
  rm -rf "$ctx"
  mkdir -p "$ctx/usr/local/bin" "$ctx/etc/logdist" "$ctx/data" "$ctx/tmp"
  for bin in distributor analyzer emitter; do
    cp "$BIN/$bin" "$ctx/usr/local/bin/"
    # Keep the image small: the release profile keeps line tables for the host's backtraces.
    command -v strip >/dev/null 2>&1 && strip "$ctx/usr/local/bin/$bin"
    for lib in $(ldd "$BIN/$bin" | grep -oE '/[^ ]+' | sort -u); do
      mkdir -p "$ctx$(dirname "$lib")"
      cp -L "$lib" "$ctx$lib"
    done
  done
  render_distributor_toml "$ANALYZER_COUNT" >"$ctx/etc/logdist/distributor.toml"
  say "building image $IMAGE from the host's release binaries (no base image)"
  docker build -q -f "$ROOT/docker/Dockerfile" -t "$IMAGE" "$ctx" >/dev/null
}

docker_start() {
  need curl
  docker_answers || die "no Docker engine answers (docker info failed); use ./docker.sh start --local"
  mkdir -p "$DOCKER_DIR"
  echo "$ANALYZER_COUNT" >"$DOCKER_DIR/analyzers"
  docker_build
  render_compose "$ANALYZER_COUNT" >"$DOCKER_DIR/docker-compose.yml"
  echo docker >"$RUN/mode"
  say "starting $((ANALYZER_COUNT + 2)) containers (compose project '$PROJECT')"
  local started=$SECONDS s
  compose up -d --remove-orphans
  for s in "${SERVICES[@]}"; do docker_wait_healthy "$s"; done
  say "all containers healthy $((SECONDS - started)) s after 'up'. Try: ./docker.sh generate 40 && ./docker.sh verify-weights"
}

# ---------------------------------------------------------------- verbs

docker_answers() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

cmd_start() {
  local mode=auto count=3
  while (($#)); do
    case "$1" in
      --local) mode=local ;;
      --docker) mode=docker ;;
      --analyzers)
        count=${2:-}
        [[ "$count" =~ ^[0-9]+$ ]] && ((count >= 1 && count <= 16)) || die "--analyzers takes 1 to 16"
        shift ;;
      *) die "start: unknown option '$1'" ;;
    esac
    shift
  done
  if [[ "$mode" == auto ]]; then
    if docker_answers; then mode=docker; else mode=local; say "no Docker engine answers"; fi
  fi
  if [[ "$mode" == docker ]]; then
    [[ "$(cat "$RUN/mode" 2>/dev/null)" == native ]] && [[ -n "$(ls "$RUN"/*.pid 2>/dev/null)" ]] &&
      die "native processes are running; ./docker.sh stop first"
    say "mode: Docker containers"
    ANALYZER_COUNT=$count
    set_services
    docker_start
  else
    ((count == 3)) || die "--analyzers is for Docker mode; native mode runs config/distributor.toml's analyzers"
    [[ "$(cat "$RUN/mode" 2>/dev/null)" == docker ]] && die "Docker containers are running; ./docker.sh stop first"
    say "mode: native processes"
    mkdir -p "$RUN"
    echo native >"$RUN/mode"
    native_start
  fi
}

cmd_stop() {
  if [[ "$MODE" == docker ]]; then
    if [[ "${1:-}" == --volumes ]]; then compose down -v --remove-orphans; else compose down --remove-orphans; fi
    rm -f "$RUN/mode"
    say "containers stopped${1:+ and the WAL volume removed}"
    return
  fi
  for s in emitter distributor $(for ((i = ANALYZER_COUNT; i >= 1; i--)); do echo "analyzer-$i"; done); do
    stop_service "$s"
  done
  rm -f "$RUN/mode"
}

docker_wait_healthy() {
  local s=$1 deadline=$((SECONDS + 120))
  until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$s")" 2>/dev/null)" == healthy ]]; do
    (( SECONDS < deadline )) || die "$s not healthy after 120 s (see ./docker.sh logs $s)"
    sleep 0.5
  done
  say "$s healthy"
}

cmd_restart() {
  if [[ "$MODE" == docker ]]; then
    if [[ $# -eq 0 ]]; then
      compose restart
      for s in "${SERVICES[@]}"; do docker_wait_healthy "$s"; done
    else
      port_of "$1" >/dev/null
      # A killed container is started again on the same volume; a running one restarted.
      if [[ "$(docker inspect -f '{{.State.Running}}' "$(compose ps -q "$1")" 2>/dev/null)" == true ]]; then
        compose restart "$1"
      else
        compose start "$1"
      fi
      docker_wait_healthy "$1"
    fi
    return
  fi
  if [[ $# -eq 0 ]]; then
    cmd_stop
    echo native >"$RUN/mode"
    native_start
    return
  fi
  port_of "$1" >/dev/null
  build
  stop_service "$1"
  start_service "$1"
}

cmd_status() {
  if [[ "$MODE" == docker ]]; then
    say "mode: Docker containers"
    compose ps
    return
  fi
  say "mode: native processes"
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
  if [[ "$MODE" == docker ]]; then
    if (( follow )); then compose logs -f --tail 50 $service; else compose logs --tail 100 $service; fi
    return
  fi
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

cmd_weights() {
  (($#)) || die "weights: give id=weight pairs, e.g. ./docker.sh weights analyzer-1=0.6 analyzer-2=0.2 analyzer-3=0.2"
  local body="" pair
  for pair in "$@"; do
    [[ "$pair" =~ ^([A-Za-z0-9._-]+)=([0-9]+(\.[0-9]+)?)$ ]] ||
      die "weights: '$pair' is not ID=WEIGHT with a number >= 0 (e.g. analyzer-1=0.6)"
    body+="${body:+, }\"${BASH_REMATCH[1]}\": ${BASH_REMATCH[2]}"
  done
  say "PUT $DISTRIBUTOR_URL/admin/weights {$body}"
  local answer code
  answer=$(curl -sS -X PUT "$DISTRIBUTOR_URL/admin/weights" -H 'content-type: application/json' \
    -d "{$body}" -w '\n%{http_code}') || die "the distributor does not answer at $DISTRIBUTOR_URL"
  code=${answer##*$'\n'}
  printf '%s\n' "${answer%$'\n'*}" | pretty
  [[ "$code" == 200 ]] || { echo "error: the distributor refused the weights (HTTP $code)" >&2; exit 1; }
}

cmd_dashboard() {
  local url="$DISTRIBUTOR_URL/dashboard"
  if curl -fsS -o /dev/null "$url" 2>/dev/null; then
    say "dashboard ($MODE mode): open $url in a browser"
  else
    say "dashboard: $url (the distributor does not answer now: ./docker.sh start)"
  fi
  echo "$url"
}

# Analyzers as the host reaches them (the distributor's /health gives container addresses).
analyzer_flags() {
  local i
  for ((i = 1; i <= ANALYZER_COUNT; i++)); do
    printf -- '--analyzer\nanalyzer-%d=http://127.0.0.1:%d\n' "$i" $((8081 + i))
  done
}

cmd_verify_weights() {
  build
  local -a flags
  mapfile -t flags < <(analyzer_flags)
  "$BIN/emitter" verify-weights --distributor "$DISTRIBUTOR_URL" "${flags[@]}" "$@"
}

cmd_verify_delivery() {
  build
  local -a flags
  mapfile -t flags < <(analyzer_flags)
  "$BIN/emitter" verify-delivery --emitter "$EMITTER_URL" "${flags[@]}" "$@"
}

cmd_crash_test() {
  local long=0
  local -a args=()
  for arg in "$@"; do
    if [[ "$arg" == --long ]]; then long=1; else args+=("$arg"); fi
  done
  build
  if ((long)); then
    # Long-mode defaults, unless given explicitly.
    [[ " ${args[*]} " == *" --cycles "* ]] || args=(--cycles 100 "${args[@]}")
    [[ " ${args[*]} " == *" --fault-secs "* ]] || args=(--fault-secs 20 "${args[@]}")
  fi
  local status=0
  mkdir -p "$RUN/crash-test"
  "$BIN/emitter" crash-test --bin-dir "$BIN" --work-dir "$RUN/crash-test" \
    --table "$RUN/crash-test/table.md" "${args[@]}" || status=$?
  if ((long)); then
    say "property tests, long mode (PROPTEST_CASES=${PROPTEST_CASES:=5000})"
    (cd "$ROOT" && export PROPTEST_CASES &&
      cargo test --release -q -p logdist-proto --test props &&
      cargo test --release -q -p distributor --test wal_props) || status=1
    say "WAL crash test, long mode (LOGDIST_WAL_CRASH_CYCLES=${LOGDIST_WAL_CRASH_CYCLES:=300})"
    (cd "$ROOT" && LOGDIST_WAL_CRASH_CYCLES="$LOGDIST_WAL_CRASH_CYCLES" \
      cargo test --release -q -p distributor --test wal_crash) || status=1
  fi
  return "$status"
}

verb=${1:-help}
shift || true
case "$verb" in
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  restart) cmd_restart "$@" ;;
  status) cmd_status ;;
  logs) cmd_logs "$@" ;;
  generate) cmd_generate "$@" ;;
  queue) need curl; curl -fsS "$DISTRIBUTOR_URL/queue" | pretty ;;
  enable|disable) need curl; cmd_switch "$verb" "$@" ;;
  weights) need curl; cmd_weights "$@" ;;
  dashboard) need curl; cmd_dashboard ;;
  verify-weights) cmd_verify_weights "$@" ;;
  verify-delivery) cmd_verify_delivery "$@" ;;
  crash-test) cmd_crash_test "$@" ;;
  build-image) docker_answers || die "no Docker engine answers"; docker_build ;;
  render-compose) render_compose "${1:-3}" ;;
  render-config) render_distributor_toml "${1:-3}" ;;
  help|-h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
