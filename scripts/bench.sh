#!/usr/bin/env bash
# Reproduce every row of BENCHMARKS.md: each benchmark runs alone (the machine's
# two cores are shared by client and server), in release mode, with its
# reference in the same run. Usage: scripts/bench.sh [decode|speed|archive|batch|serve|e2e|batch-scale]...
# batch-scale is not in the default list: it loads lakes of 20, 40 and 83 M events
# (kept and reused in BENCH_SCALE_DIR, default ~/.cache/tally/bench-scale) and runs
# the release `tally` binary; see batch-layer/benches/batch_scale.rs for its variables.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally/target-release}"
export TALLY_VENV="${TALLY_VENV:-$HOME/.cache/tally/venv}"
export PATH="$TALLY_VENV/bin:$PATH"
bash scripts/install-services.sh >/dev/null

# Name every library package so the feature set (and the release build) is the
# same whichever benchmark runs; `-p tally-common` alone rebuilds datafusion.
PKGS=(-p tally-common -p tally-speed-layer -p tally-batch-layer -p tally-serving-layer)
run() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; shift; "$@"; }
want=("${@:-decode speed archive batch serve e2e}")
for b in ${want[*]}; do
  case "$b" in
    decode)  run "decode (criterion)" cargo bench "${PKGS[@]}" --bench decode -- --noplot ;;
    speed)   run "speed layer vs naive" cargo bench "${PKGS[@]}" --bench speed ;;
    archive) run "archiver" cargo bench "${PKGS[@]}" --bench archive ;;
    batch)   run "batch layer vs DuckDB" cargo bench "${PKGS[@]}" --bench batch ;;
    serve)   run "serving layer under wrk" cargo bench "${PKGS[@]}" --bench serve ;;
    e2e)     run "whole pipeline: rate and freshness" cargo bench -p tally "${PKGS[@]}" --bench e2e ;;
    batch-scale)
             # the bench runs the binary as a child process; --workspace keeps the feature set whole
             run "tally binary" cargo build --release --workspace --bins
             run "batch layer at scale vs DuckDB" cargo bench "${PKGS[@]}" --bench batch_scale ;;
    *) echo "unknown benchmark $b" >&2; exit 2 ;;
  esac
done
