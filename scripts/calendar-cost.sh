#!/usr/bin/env bash
# The cost of merchants' calendars (issue 16): the 15-minute table and the
# distinct-customer sketches, as lake bytes per merchant-day and batch run time,
# one `tally` binary against another on the same events, in the same run.
#
# Usage: scripts/calendar-cost.sh OLD_TALLY NEW_TALLY
#   OLD_TALLY: a release binary from before (e.g. commit cace9de:
#     git worktree add /tmp/old cace9de && (cd /tmp/old && cargo build --release))
#   NEW_TALLY: this tree's release binary (cargo build --release)
# Knobs: COST_EVENTS (default 2000000), COST_MERCHANTS (5000), COST_DAYS (3),
# COST_DIR (/tmp/tally-calendar-cost, removed first).
set -euo pipefail
old=$1
new=$2
dir=${COST_DIR:-/tmp/tally-calendar-cost}
events=${COST_EVENTS:-2000000}
merchants=${COST_MERCHANTS:-5000}
days=${COST_DAYS:-3}
rm -rf "$dir"
mkdir -p "$dir"
unset TALLY_REDIS_URL
"$new" gen --events "$events" --merchants "$merchants" --days "$days" --seed 7 \
  --output "$dir/events.ndjson" 2>/dev/null
echo "events: $events over $days days, $merchants merchants"
printf '| binary | ingest s | batch run s | batch max RSS MB | merchant-days | metrics_hourly B | metrics_daily B | metrics_quarter_hourly B | customer_hours B | metric tables B per merchant-day |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for which in old new; do
  bin=$old
  [ "$which" = new ] && bin=$new
  export TALLY_LAKE="$dir/$which/lake"
  t0=$(date +%s.%N)
  "$bin" ingest "$dir/events.ndjson" >/dev/null 2>&1
  t1=$(date +%s.%N)
  /usr/bin/time -f '%e %M' -o "$dir/$which.time" "$bin" batch run >/dev/null 2>&1
  read -r run_s rss_kb <"$dir/$which.time"
  md=$("$bin" sql "SELECT COUNT(*) AS n FROM metrics_daily" --format csv 2>/dev/null | tail -1)
  size() { if [ -d "$TALLY_LAKE/$1" ]; then du -sb "$TALLY_LAKE/$1" | cut -f1; else echo 0; fi; }
  h=$(size metrics_hourly)
  d=$(size metrics_daily)
  q=$(size metrics_quarter_hourly)
  c=$(size customer_hours)
  per=$(( (h + d + q) / md ))
  printf '| %s | %.1f | %s | %d | %s | %s | %s | %s | %s | %s |\n' "$which" \
    "$(echo "$t1 - $t0" | bc)" "$run_s" $((rss_kb / 1024)) "$md" "$h" "$d" "$q" "$c" "$per"
done
