#!/usr/bin/env bash
# The serving layer as a new user meets it: `tally demo` (2,000 merchants, 3
# days, embedded speed view and serving store), then wrk -t2 -c32 for 30 s per
# query shape against random merchants: 24-hour hourly ranges (23 batch hours
# and the live one), 24 batch hours only, the live hour alone, and 30 local
# days in Asia/Kathmandu (+05:45) with totals.
#
# Usage: scripts/demo-bench.sh [TALLY_BINARY]   (default: the release build)
# Knobs: DEMO_DIR (default /tmp/tally-demo-bench, removed first), DEMO_SECS (30).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/tally/target-release}/release/tally}
dir=${DEMO_DIR:-/tmp/tally-demo-bench}
secs=${DEMO_SECS:-30}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$dir"
mkdir -p "$dir"
unset TALLY_REDIS_URL
"$bin" demo --dir "$dir/data" --addr "127.0.0.1:$port" >"$dir/demo.out" 2>"$dir/demo.err" &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "is ready" "$dir/demo.out" 2>/dev/null && break
  sleep 1
done
grep "is ready" "$dir/demo.out"
admin=$(grep -A1 "admin token" "$dir/demo.out" | tail -1 | sed 's/.*ADMIN=//')
# wait for the embedded serving store's first load
sleep 10
read -r w now_h k_from k_to < <(python3 - <<'PY'
import datetime as dt
from zoneinfo import ZoneInfo
now = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
k = ZoneInfo("Asia/Kathmandu")
local = dt.datetime.now(k)
end = dt.datetime(local.year, local.month, local.day, tzinfo=k).astimezone(dt.timezone.utc)
start = end - dt.timedelta(days=30)
f = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")
print(f(now - dt.timedelta(hours=2)), f(now), f(start), f(end))
PY
)
wm=$(curl -s -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/merchants/m_1/metrics?from=$now_h&to=$(date -u -d "$now_h + 1 hour" +%Y-%m-%dT%H:%M:%SZ)" | python3 -c 'import json,sys; print(json.load(sys.stdin)["batch_watermark"])')
echo "watermark: $wm"
run() {
  local name=$1 query=$2
  cat >"$dir/wrk.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $admin"
local n = 0
function setup(thread) thread:set("seed", n); n = n + 1 end
function init(args) math.randomseed(os.time() * 1000 + seed * 7919) end
function request()
  return wrk.format("GET", "/v1/merchants/m_" .. math.random(1, 2000) .. "/metrics?$query")
end
LUA
  local out
  out=$(wrk -t2 -c32 -d"${secs}s" --latency -s "$dir/wrk.lua" "http://127.0.0.1:$port")
  local rps p50 p99 non2xx
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}"
}
h24_from=$(date -u -d "$now_h - 23 hours" +%Y-%m-%dT%H:%M:%SZ)
h24_to=$(date -u -d "$now_h + 1 hour" +%Y-%m-%dT%H:%M:%SZ)
b_from=$(date -u -d "$wm - 24 hours" +%Y-%m-%dT%H:%M:%SZ)
echo "| query (wrk -t2 -c32, ${secs} s, random merchants) | requests/s | p50 | p99 | non-2xx |"
echo "|---|---|---|---|---|"
run "24 hours by hour (batch + live hour)" "from=$h24_from&to=$h24_to&granularity=hour"
run "24 batch hours" "from=$b_from&to=$wm&granularity=hour"
run "the live hour" "from=$now_h&to=$h24_to&granularity=hour"
run "30 days in Asia/Kathmandu, with totals" "from=$k_from&to=$k_to&granularity=day&tz=Asia/Kathmandu"
