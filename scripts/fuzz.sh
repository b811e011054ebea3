#!/usr/bin/env bash
# Fuzz the record decoder and the API's request parsing for a bounded time each
# (FUZZ_SECS, default 60), with cargo-fuzz on the nightly toolchain. A crash is
# copied to fuzz/regressions/<target>/, where the unit tests
# (`cargo test -p tally-common fuzz_regressions`) replay it from then on.
# Usage: scripts/fuzz.sh [decode|metrics_query]...
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECS:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/tally/target-fuzz}"
status=0
for t in ${*:-decode metrics_query}; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus" "fuzz/regressions/$t" "fuzz/artifacts/$t"
  cp -n fuzz/regressions/"$t"/* "$corpus"/ 2>/dev/null || true
  echo "== fuzzing $t for ${secs}s"
  if ! cargo +nightly fuzz run "$t" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=4096 \
      -artifact_prefix="fuzz/artifacts/$t/"; then
    status=1
  fi
  for crash in fuzz/artifacts/"$t"/crash-* fuzz/artifacts/"$t"/oom-* fuzz/artifacts/"$t"/timeout-*; do
    [ -e "$crash" ] || continue
    cp "$crash" "fuzz/regressions/$t/"
    echo "kept $crash as a regression input in fuzz/regressions/$t/"
  done
done
exit "$status"
