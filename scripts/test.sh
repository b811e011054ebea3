#!/usr/bin/env bash
# The README's test command: installs what the tests need when missing, then
# checks formatting, lints with warnings denied, runs every test of the
# workspace against real services, fuzzes the running API from its own OpenAPI
# document (scripts/api-fuzz.sh), and checks the infrastructure code.
set -euo pipefail
cd "$(dirname "$0")/.."

# One target directory outside the clone, so CI runs after the first reuse the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export TALLY_VENV="${TALLY_VENV:-$HOME/.cache/tally/venv}"

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "services"
bash scripts/install-services.sh
export PATH="$TALLY_VENV/bin:$PATH"

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
cargo test --workspace --locked

step "api fuzzing (schemathesis against tally serve)"
bash scripts/api-fuzz.sh

if [ -x scripts/check-infra.sh ]; then
  step "infrastructure"
  bash scripts/check-infra.sh
fi
step "done"
