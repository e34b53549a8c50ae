#!/usr/bin/env bash
# The standard benchmarks, in one run on this machine, printed as one markdown table and written
# to docs/BENCHMARKS.md (with the machine's description and the exact commands).
#
# Usage: scripts/bench.sh [--smoke] [--out FILE]
#   --smoke   every scenario, but seconds long and with small backlogs (what CI runs; no targets
#             are checked: shared machines are noisy). Writes .run/bench/BENCHMARKS.md unless --out.
#
# Scenarios (three analyzers with weights 0.5/0.3/0.2, one distributor, the load generator
# `emitter bench`, all on this machine):
#   1. durable (fsync before every ack), 64 connections, 50-message packets of ~200-byte messages:
#      closed loop for the maximum, then open loop at half that rate for the latency;
#   2. the same with 1-message and 500-message packets;
#   3. the same as 1 with wal.fsync = false (breaks "ack means durable"; measured to price it);
#   4. nginx as a weighted proxy (5/3/2) in front of the same analyzers, fed the same packets;
#   5. a backlog of 10M messages accepted with every analyzer disabled: RSS while filling and
#      after, WAL size on disk, then the drain time once they are enabled;
#   6. restart after SIGKILL with 1M messages pending: time from exec to serving.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
OUT=""
while (($#)); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ((SMOKE)); then
  MAX_SECS=5; RUN_SECS=2; BACKLOG=200000; RESTART_PENDING=100000
  OUT="${OUT:-.run/bench/BENCHMARKS.md}"
else
  MAX_SECS=60; RUN_SECS=20; BACKLOG=10000000; RESTART_PENDING=1000000
  OUT="${OUT:-docs/BENCHMARKS.md}"
fi
WORK="$ROOT/.run/bench"
BIN="$ROOT/target/release"
CONNS=64

say() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# ---- tools
need=()
command -v curl >/dev/null || need+=(curl)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
  if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
    say "installing ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    die "please install: ${need[*]}"
  fi
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
# nginx-light's postinst may start a system nginx on port 80; it is not ours and not in the way.

say "building release binaries"
cargo build --release --quiet -p distributor -p analyzer -p emitter

rm -rf "$WORK"
mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f "$WORK/nginx/nginx.pid" ]] && kill "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# start NAME CMD...: run in the background, wait for "listening on ADDR", set PORT and PID.
start() {
  local name="$1"; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 1 600); do
    if PORT=$(grep -m1 -oE 'listening on [0-9.]+:[0-9]+' "$WORK/$name.out" 2>/dev/null | grep -oE '[0-9]+$'); then
      return 0
    fi
    kill -0 "$PID" 2>/dev/null || { tail -5 "$WORK/$name.log" >&2; die "$name exited during start"; }
    sleep 0.05
  done
  die "$name did not start within 30 s"
}

ANALYZERS=()
for n in 1 2 3; do
  start "analyzer-$n" env RUST_LOG=warn "$BIN/analyzer" --id "analyzer-$n" --host 127.0.0.1 --port 0
  ANALYZERS+=("http://127.0.0.1:$PORT")
done
analyzers_post() { for a in "${ANALYZERS[@]}"; do curl -fsS -X POST "$a/$1" >/dev/null; done; }

# start_distributor NAME [ENV=VALUE...]: a distributor with a fresh WAL; sets DIST, DIST_PID.
start_distributor() {
  local name="$1"; shift
  local dir="$WORK/$name"
  mkdir -p "$dir"
  {
    printf 'host = "127.0.0.1"\nport = 0\ndata_dir = "%s/wal"\n\n[wal]\nmax_pending_messages = %d\n\n' "$dir" $((BACKLOG + 1000000))
    local n=1
    for w in 0.5 0.3 0.2; do
      printf '[[analyzers]]\nid = "analyzer-%d"\nweight = %s\nendpoint = "%s"\n\n' "$n" "$w" "${ANALYZERS[$((n - 1))]}"
      n=$((n + 1))
    done
  } >"$dir/distributor.toml"
  start "$name" env RUST_LOG=warn "$@" "$BIN/distributor" --config "$dir/distributor.toml"
  DIST="http://127.0.0.1:$PORT"
  DIST_PID=$PID
  DIST_DIR="$dir"
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

COMMANDS=()
# bench NAME ARGS...: emitter bench with a JSON report in $WORK/NAME.json.
bench() {
  local name="$1"; shift
  local cmd=("$BIN/emitter" bench --connections "$CONNS" --message-bytes 200 "$@")
  COMMANDS+=("$name: emitter bench --connections $CONNS --message-bytes 200 $*")
  say "$name: ${cmd[*]}"
  RUST_LOG=warn "${cmd[@]}" --json "$WORK/$name.json" >&2
}
field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))' "$WORK/$1.json" "$2"; }

# ---- 1. durable default: the maximum (closed loop), then latency at half of it (open loop)
start_distributor durable
bench s1-max --target "$DIST" --packet-size 50 --duration "${MAX_SECS}s" --watch-pid "$DIST_PID"
half=$(field s1-max 'round(acked_messages_per_second / 2)')
bench s1-half --target "$DIST" --packet-size 50 --duration "${RUN_SECS}s" --rate "$half" --watch-pid "$DIST_PID"

# ---- 2. 1-message and 500-message packets
bench s2-p1 --target "$DIST" --packet-size 1 --duration "${RUN_SECS}s" --watch-pid "$DIST_PID"
bench s2-p500 --target "$DIST" --packet-size 500 --duration "${RUN_SECS}s" --watch-pid "$DIST_PID"
stop_pid "$DIST_PID"

# ---- 3. fsync off
start_distributor nofsync DISTRIBUTOR_WAL__FSYNC=false
bench s3-nofsync --target "$DIST" --packet-size 50 --duration "${RUN_SECS}s" --watch-pid "$DIST_PID"
stop_pid "$DIST_PID"

# ---- 4. nginx as a weighted proxy in front of the same analyzers
mkdir -p "$WORK/nginx"
NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  client_max_body_size 16m;
  client_body_buffer_size 1m;
  upstream analyzers {
    server ${ANALYZERS[0]#http://} weight=5;
    server ${ANALYZERS[1]#http://} weight=3;
    server ${ANALYZERS[2]#http://} weight=2;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://analyzers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx/start.log" || { cat "$WORK/nginx/start.log" >&2; die "nginx did not start"; }
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$NGINX_PORT/health" >/dev/null 2>&1 && break; sleep 0.05; done
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | head -1)
bench s4-nginx --target "http://127.0.0.1:$NGINX_PORT" --proxy --analyzer "${ANALYZERS[0]}" --analyzer "${ANALYZERS[1]}" --analyzer "${ANALYZERS[2]}" --packet-size 50 --duration "${RUN_SECS}s" --watch-pid "$NGINX_WORKER"
kill "$(cat "$WORK/nginx/nginx.pid")"; rm -f "$WORK/nginx/nginx.pid"

# ---- 5. backlog: fill with every analyzer disabled, then drain
start_distributor backlog
analyzers_post disable
bench s5-fill --target "$DIST" --packet-size 50 --messages "$BACKLOG" --duration 900s --drain-timeout 0 --watch-pid "$DIST_PID"
sleep 2  # let sled's background flusher settle before sizing the files
wal_bytes=$(du -sb "$DIST_DIR/wal" | cut -f1)
idle_rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$DIST_PID/status")
analyzers_post enable
bench s5-drain --target "$DIST" --packet-size 50 --messages 0 --duration 1s --drain-timeout 900s --watch-pid "$DIST_PID"
wal_after_bytes=$(du -sb "$DIST_DIR/wal" | cut -f1)
stop_pid "$DIST_PID"

# ---- 6. restart after SIGKILL with RESTART_PENDING messages pending
start_distributor restart
analyzers_post disable
bench s6-fill --target "$DIST" --packet-size 50 --messages "$RESTART_PENDING" --duration 900s --drain-timeout 0 --quiet
kill -9 "$DIST_PID"; wait "$DIST_PID" 2>/dev/null || true
t0=$(date +%s%N)
start restart-2 env RUST_LOG=warn "$BIN/distributor" --config "$DIST_DIR/distributor.toml"
DIST="http://127.0.0.1:$PORT"
until curl -fsS "$DIST/health" >/dev/null 2>&1; do sleep 0.01; done
t1=$(date +%s%N)
restart_ms=$(( (t1 - t0) / 1000000 ))
recovered=$(curl -fsS "$DIST/queue" | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
restart_rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$PID/status")
analyzers_post enable
stop_pid "$PID"

# ---- the table
machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM, $(uname -sr), WAL on $(df -T "$WORK" | awk 'NR==2 { print $2 }'), $(date -u +%Y-%m-%d)"
mkdir -p "$(dirname "$OUT")"
python3 - "$WORK" "$OUT" "$SMOKE" "$machine" "$wal_bytes" "$idle_rss_kib" "$wal_after_bytes" "$restart_ms" "$recovered" "$RESTART_PENDING" "$restart_rss_kib" "$BACKLOG" "${COMMANDS[@]}" <<'PY'
import json, sys, os
work, out, smoke, machine, wal_bytes, idle_rss, wal_after, restart_ms, recovered, restart_pending, restart_rss, backlog, *commands = sys.argv[1:]
smoke = smoke == "1"
r = {n[:-5]: json.load(open(os.path.join(work, n))) for n in os.listdir(work) if n.endswith(".json")}
mib = lambda kib: int(kib) / 1024
def row(label, d, notes=""):
    p = d.get("process") or {}
    l = d["latency_ms"]
    non2xx = ", ".join(f"{k}: {v}" for k, v in d["non_2xx"].items()) or "0"
    if d["transport_errors"]:
        non2xx += f" (+{d['transport_errors']} transport)"
    return (f"| {label} | {d['acked_messages_per_second']:,.0f} | {d['acked_packets_per_second']:,.0f} | "
            f"{d['delivered_messages_per_second']:,.0f} | {l['p50']:.1f} / {l['p99']:.1f} / {l['p999']:.1f} / {l['max']:.0f} | "
            f"{non2xx} | {p.get('cpu_seconds_per_million', 0):.2f} | {p.get('peak_rss_mib', 0):.0f} | {notes} |")
s1, s1h, s3, s4 = r["s1-max"], r["s1-half"], r["s3-nofsync"], r["s4-nginx"]
durable = s1["acked_messages_per_second"]
lines = []
lines.append("| scenario | msgs/s acked | packets/s | msgs/s delivered during load | ack latency ms p50 / p99 / p99.9 / max | non-2xx | distributor CPU s per M msgs | peak RSS MiB | notes |")
lines.append("|---|---:|---:|---:|---|---|---:|---:|---|")
lines.append(row(f"1. durable, 50 × 200 B, closed loop ({s1['elapsed_seconds']:.0f} s)", s1,
                 f"drained {s1['drain_seconds'] or 0:.1f} s after; shares " + "/".join(f"{x['share']*100:.1f}" for x in s1["delivered"]) + " % (weights 50/30/20)"))
lines.append(row(f"1. durable, open loop at {s1h['rate']:,.0f} msg/s (half the max)", s1h))
lines.append(row("2. durable, 1-message packets", r["s2-p1"]))
lines.append(row("2. durable, 500-message packets", r["s2-p500"]))
lines.append(row("3. fsync off (NOT durable)", s3, f"durable/fsync-off = {durable / max(s3['acked_messages_per_second'], 1):.2f}"))
lines.append(row("4. nginx 1.22, weighted proxy 5/3/2 (nothing stored)", s4,
                 f"durable/nginx = {durable / max(s4['acked_messages_per_second'], 1):.2f}; CPU and RSS are nginx's worker; shares " + "/".join(f"{x['share']*100:.1f}" for x in s4["delivered"]) + " %"))
f, d = r["s5-fill"], r["s5-drain"]
lines.append(row(f"5. backlog: {f['acked_messages']:,} msgs accepted, analyzers disabled", f,
                 f"WAL {int(wal_bytes)/2**20:,.0f} MiB on disk; RSS idle after the fill {mib(idle_rss):.0f} MiB"))
dp = d.get("process") or {}
drain_s = d["drain_seconds"]
drain_rate = f["acked_messages"] / drain_s if drain_s else 0
lines.append(f"| 5. backlog: drain once enabled | – | – | {drain_rate:,.0f} | – | – | {dp.get('cpu_seconds', 0) / max(f['acked_messages'] / 1e6, 1e-9):.2f} | {dp.get('peak_rss_mib', 0):.0f} | "
             + (f"drained in {drain_s:.1f} s" if drain_s else f"NOT drained: {d['pending_after']} pending") + f"; WAL {int(wal_after)/2**20:,.0f} MiB on disk after; RSS after {dp.get('end_rss_mib', 0):.0f} MiB |")
lines.append(f"| 6. restart after SIGKILL, {int(recovered):,} msgs pending | – | – | – | – | – | – | {mib(restart_rss):.0f} (when serving) | serving {int(restart_ms)} ms after exec (recovered {int(recovered):,} of {int(restart_pending):,}) |")
table = "\n".join(lines)
print(table)

p99_half = s1h["latency_ms"]["p99"]
targets = [
    ("≥ 300,000 msgs/s durable, sustained 60 s (scenario 1)", f"{durable:,.0f} msgs/s over {s1['elapsed_seconds']:.0f} s", durable >= 300_000 and s1["elapsed_seconds"] >= 59),
    ("p99 ack latency ≤ 20 ms at half the maximum rate", f"{p99_half:.1f} ms at {s1h['rate']:,.0f} msgs/s", p99_half <= 20),
    ("durable ≥ 50 % of fsync off", f"{durable / max(s3['acked_messages_per_second'], 1) * 100:.0f} %", durable >= 0.5 * s3["acked_messages_per_second"]),
    ("durable ≥ 50 % of nginx", f"{durable / max(s4['acked_messages_per_second'], 1) * 100:.0f} %", durable >= 0.5 * s4["acked_messages_per_second"]),
    ("RSS ≤ 200 MB with a 10M backlog", f"peak {f['process']['peak_rss_mib']:.0f} MiB with {f['acked_messages']:,} msgs", f["process"]["peak_rss_mib"] <= 200 * 1e6 / 2**20 and f["acked_messages"] >= 10_000_000),
    ("restart with 1M pending serving in ≤ 2 s", f"{int(restart_ms)} ms with {int(recovered):,} pending", int(restart_ms) <= 2000 and int(recovered) >= 1_000_000),
]
tt = ["| target | measured | holds |", "|---|---|---|"]
tt += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in targets]
print()
print("\n".join(tt))

doc = f"""# Benchmarks

Produced by `scripts/bench.sh`{' --smoke (a short run: figures are NOT representative)' if smoke else ''}; every number below comes from one run of it.

**Machine:** {machine}. The load generator (`emitter bench`), the distributor, three analyzers and
(scenario 4) nginx all share these cores, so absolute figures understate what the distributor does
on a machine of its own; compare the rows with each other (they come from one run), not with other
machines.

**Set-up:** analyzers with weights 0.5 / 0.3 / 0.2 (nginx: 5 / 3 / 2), 64 connections, messages of
~200 bytes. "msgs/s acked" counts messages in requests answered 2xx; for the distributor a 2xx means
the packet was flushed to the WAL (fsync) first, except in scenario 3. "Delivered" counts what the
analyzers processed (their `GET /processed`) during the load. Latency is from when a request was due
(open loop) or sent (closed loop) to its answer. CPU and RSS are the distributor's (scenario 4:
nginx's worker process), read from `/proc` while the scenario ran.

{table}

## Targets

{chr(10).join(tt)}

## Commands

```
{chr(10).join(commands)}
```
Scenario 3 runs the distributor with `DISTRIBUTOR_WAL__FSYNC=false`; scenario 5 disables every analyzer
(`POST /disable`) before the fill and enables them before the drain; scenario 6 fills with analyzers
disabled, sends SIGKILL, and times from `exec` of the new distributor to its first `GET /health` 200.
"""
open(out, "w").write(doc)
print(f"\nwritten to {out}", file=sys.stderr)

# Not performance thresholds (shared machines are noisy): checks that every scenario measured
# something real, so a broken harness cannot print a plausible table.
problems = [f"{name}: nothing acknowledged" for name, d in r.items()
            if d["acked_messages"] == 0 and name != "s5-drain"]
problems += [f"{name}: {sum(d['non_2xx'].values()) + d['transport_errors']} requests refused or failed"
             for name, d in r.items() if sum(d["non_2xx"].values()) + d["transport_errors"] > 0]
if not drain_s:
    problems.append("s5: the backlog did not drain")
if int(recovered) != int(restart_pending):
    problems.append(f"s6: recovered {recovered} pending messages, expected {restart_pending}")
for name in ("s1-max", "s4-nginx"):
    if sum(x["total"] for x in r[name]["delivered"]) < r[name]["acked_messages"]:
        problems.append(f"{name}: analyzers processed fewer messages than were acknowledged")
if problems:
    print("bench: FAILED: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)
PY
