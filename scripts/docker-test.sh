#!/usr/bin/env bash
# The Docker path, end to end, in containers: start, weights, a disabled analyzer, the
# distributor SIGKILLed while emitting, an analyzer cut off from the compose network while
# emitting, and a clean removal. Prints a SKIP line (and exits 0) when no Docker engine answers.
#
# Usage: scripts/docker-test.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "SKIP: Docker tests: no Docker engine answers (docker info failed)"
  exit 0
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  echo "SKIP: Docker tests: neither 'docker compose' nor 'docker-compose' is installed"
  exit 0
fi
for tool in curl; do command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 2; }; done

export LOGDIST_RUN_DIR="$ROOT/.run/docker-test"
rm -rf "$LOGDIST_RUN_DIR"
step() { printf '\n--> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
cleanup() { ./docker.sh stop --volumes >/dev/null 2>&1 || true; }
trap cleanup EXIT

if ss -ltn 2>/dev/null | grep -qE '127.0.0.1:(8080|8081|8082|8083|8084)\b|\*:(8080|8081|8082|8083|8084)\b'; then
  echo "error: ports 8080-8084 are in use; run ./docker.sh stop first" >&2; exit 2
fi

container() {
  docker ps -aq -f label=com.docker.compose.project=logdist -f "label=com.docker.compose.service=$1"
}
processed() { curl -fsS "http://127.0.0.1:$1/processed" | grep -oE '"processed":[0-9]+' | cut -d: -f2; }
drain() { # wait (at most 90 s) until the distributor's WAL holds nothing
  local deadline=$((SECONDS + 90))
  until curl -fsS http://127.0.0.1:8081/queue 2>/dev/null | grep -q '"size":0'; do
    (( SECONDS < deadline )) || fail "the WAL did not drain in 90 s: $(curl -s http://127.0.0.1:8081/queue)"
    sleep 0.5
  done
}
emit_for() { # continuous generation for $1 seconds at 2,000 messages/s, running $2 meanwhile
  curl -fsS -X POST http://127.0.0.1:8080/start -H 'content-type: application/json' -d '{"rate": 2000}' >/dev/null
  sleep 1
  "${@:2}"
  sleep "$1"
  curl -fsS -X POST http://127.0.0.1:8080/stop >/dev/null
}

step "start in containers"
started=$SECONDS
./docker.sh start --docker
echo "start to healthy: $((SECONDS - started)) s"
[[ $(docker ps -q -f label=com.docker.compose.project=logdist -f health=healthy | wc -l) -eq 5 ]] ||
  fail "expected 5 healthy containers"
docker images logdist:local --format 'image {{.Repository}}:{{.Tag}} {{.Size}}'

step "40 batches, then the weights within 1 percentage point"
./docker.sh generate 40 >/dev/null
drain
./docker.sh verify-weights --tolerance 1

step "analyzer-2 disabled: it gets nothing new"
curl -fsS -X POST http://127.0.0.1:8083/disable >/dev/null
before=$(processed 8083)
./docker.sh generate 8 >/dev/null
drain
after=$(processed 8083)
[[ "$before" == "$after" ]] || fail "disabled analyzer-2 processed $((after - before)) new messages"
echo "analyzer-2 processed $before before and $after after: nothing new"
curl -fsS -X POST http://127.0.0.1:8083/enable >/dev/null

step "SIGKILL the distributor container while emitting, start it again"
kill_distributor() {
  docker kill -s KILL "$(container distributor)" >/dev/null
  echo "distributor killed"
  sleep 1
  ./docker.sh restart distributor
}
emit_for 3 kill_distributor
drain
./docker.sh verify-delivery

step "disconnect analyzer-3 from the compose network while emitting, then reconnect it"
network=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(container analyzer-3)")
cut_analyzer_3() {
  docker network disconnect "$network" "$(container analyzer-3)"
  echo "analyzer-3 disconnected from $network"
  sleep 4
  docker network connect --alias analyzer-3 "$network" "$(container analyzer-3)"
  echo "analyzer-3 reconnected"
}
emit_for 2 cut_analyzer_3
drain
./docker.sh verify-delivery

step "stop and remove containers, network and volume"
./docker.sh stop --volumes
trap - EXIT
left=$(docker ps -aq -f label=com.docker.compose.project=logdist | wc -l)
vols=$(docker volume ls -q -f label=com.docker.compose.project=logdist | wc -l)
nets=$(docker network ls -q -f label=com.docker.compose.project=logdist | wc -l)
[[ "$left$vols$nets" == "000" ]] || fail "left behind: $left containers, $vols volumes, $nets networks"
echo "docker tests: passed"
