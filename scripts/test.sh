#!/usr/bin/env bash
# The whole test suite: format and lint checks, every crate's unit and integration tests
# (real processes on 127.0.0.1), then a smoke run of ./docker.sh in native mode that
# checks weights and delivery message by message.
#
# Usage: scripts/test.sh [--quick]    (--quick skips the docker.sh smoke run)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

step() { printf '\n==> %s\n' "$*"; }

# ---- tools: install what is missing (Debian packages), never assume a developer's machine
step "checking tools"
command -v cargo >/dev/null || { echo "error: cargo is required (https://rustup.rs)" >&2; exit 2; }
missing=()
for tool in curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
# promtool (Debian's prometheus package) validates every service's GET /metrics.
command -v promtool >/dev/null || missing+=(prometheus)
# Headless Chromium drives the dashboard (scripts/dashboard-test.py); python3 runs that script.
command -v chromium >/dev/null || missing+=(chromium)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: please install: ${missing[*]}" >&2; exit 2
  fi
fi
cargo --version
# With promtool present, the metrics tests must use it rather than skip.
export LOGDIST_REQUIRE_PROMTOOL=1

# ---- static checks
if cargo fmt --version >/dev/null 2>&1; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
else
  echo "SKIP: rustfmt is not installed for this toolchain"
fi
if cargo clippy --version >/dev/null 2>&1; then
  step "cargo clippy --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
else
  echo "SKIP: clippy is not installed for this toolchain"
fi

# ---- unit and integration tests
step "cargo test --workspace"
cargo test --workspace 2>&1 | tee "${TMPDIR:-/tmp}/logdist-test.log"
passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^passed/) n += $i } END { print n + 0 }' "${TMPDIR:-/tmp}/logdist-test.log")

# ---- the system as a user runs it
if ((QUICK == 0)); then
  step "docker.sh smoke run (native processes, isolated .run directory)"
  export LOGDIST_RUN_DIR="$ROOT/.run/ci-smoke"
  rm -rf "$LOGDIST_RUN_DIR"
  cleanup() { ./docker.sh stop >/dev/null 2>&1 || true; }
  trap cleanup EXIT
  if ss -ltn 2>/dev/null | grep -qE ':(8080|8081|8082|8083|8084)\b'; then
    echo "error: ports 8080-8084 are in use; run ./docker.sh stop first" >&2; exit 2
  fi
  ./docker.sh start --local
  ./docker.sh generate 40 >/dev/null
  ./docker.sh verify-weights
  for port in 8080 8081 8082 8083 8084; do
    echo "promtool check metrics: http://127.0.0.1:$port/metrics"
    curl -fsS "http://127.0.0.1:$port/metrics" | promtool check metrics
  done
  # The dashboard in headless Chromium: weights typed and applied through its controls, an
  # analyzer switched off and on with its button, checked in /health; screenshot kept.
  ./docker.sh dashboard
  python3 scripts/dashboard-test.py --url http://127.0.0.1:8081 \
    --screenshot "$LOGDIST_RUN_DIR/dashboard.png" \
    --weights analyzer-1=0.6,analyzer-2=0.2,analyzer-3=0.2 --toggle analyzer-3
  passed=$((passed + 1))
  # Back to the configured weights, through ./docker.sh this time.
  ./docker.sh weights analyzer-1=0.5 analyzer-2=0.3 analyzer-3=0.2
  ./docker.sh disable analyzer-2
  ./docker.sh generate 4 >/dev/null
  kill -9 "$(cat "$LOGDIST_RUN_DIR/distributor.pid")"
  ./docker.sh restart distributor
  ./docker.sh generate 4 >/dev/null
  ./docker.sh enable analyzer-2
  # Wait (bounded) for the WAL to drain before comparing message by message.
  for _ in $(seq 1 100); do
    curl -fsS http://127.0.0.1:8081/queue | grep -q '"size":0' && break
    sleep 0.2
  done
  ./docker.sh verify-delivery
  ./docker.sh stop
  trap - EXIT

  step "the committed compose files match what ./docker.sh generates"
  diff <(./docker.sh render-compose 3) docker/docker-compose.yml
  diff <(./docker.sh render-config 3) docker/distributor.toml

  step "Docker path (containers)"
  scripts/docker-test.sh

  step "fault-injection suite, short (./docker.sh crash-test)"
  ./docker.sh crash-test --cycles 20 --fault-secs 2
  scenarios=$(grep -c '| PASS |' "$LOGDIST_RUN_DIR/crash-test/table.md" || true)
  if [[ "$(id -u)" == 0 ]] && ((scenarios < 10)); then
    echo "error: only $scenarios of 10 crash-test scenarios passed (as root none may be skipped)" >&2
    exit 1
  fi
  passed=$((passed + scenarios))

  step "benchmark smoke run (scripts/bench.sh --smoke: every scenario, seconds long, no thresholds)"
  scripts/bench.sh --smoke
fi

step "all tests passed (cargo tests, then the docker.sh smoke run)"
echo "summary: ${passed} passed, 0 failed"
