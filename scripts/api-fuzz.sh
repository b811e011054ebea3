#!/usr/bin/env bash
# Schemathesis against a running `tally serve`: every check (`--checks all`,
# including that valid requests are accepted and invalid ones refused), in
# positive and negative mode, from the server's own /openapi.json, with an
# admin token, against a small lake that has data (gen -> ingest -> batch run).
# Called by scripts/test.sh after the cargo tests, which build the debug binary.
#
#   scripts/api-fuzz.sh                 # the bounded run of CI (well under 2 minutes)
#   API_FUZZ_EXAMPLES=2000 API_FUZZ_SEED=$RANDOM scripts/api-fuzz.sh   # a longer hunt
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally/target}"
TALLY="${TALLY_BIN:-$CARGO_TARGET_DIR/debug/tally}"
VENV="${TALLY_VENV:-$HOME/.cache/tally/venv}"
EXAMPLES="${API_FUZZ_EXAMPLES:-500}"
SEED="${API_FUZZ_SEED:-20261130}"

if [ ! -x "$TALLY" ]; then
  echo "api-fuzz: no tally binary at $TALLY: run \`cargo build\` (or the cargo tests) first" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/schemathesis" ]; then
  echo "api-fuzz: no schemathesis in $VENV: run scripts/install-services.sh" >&2
  exit 1
fi

work="$(mktemp -d)"
server=""
cleanup() {
  if [ -n "$server" ]; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# the embedded defaults: a local lake, the in-process speed view
export TALLY_LAKE="$work/lake"
unset TALLY_REDIS_URL TALLY_JWKS TALLY_KINESIS_STREAM
export RUST_LOG="${RUST_LOG:-warn}"
secret="api-fuzz-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

echo "api-fuzz: a small lake at $TALLY_LAKE"
"$TALLY" gen --seed 7 --events 20000 --merchants 20 --days 3 --output "$work/events.ndjson" 2>/dev/null
"$TALLY" ingest "$work/events.ndjson" >/dev/null 2>"$work/ingest.log" || { cat "$work/ingest.log" >&2; exit 1; }
"$TALLY" batch run >/dev/null 2>"$work/batch.log" || { cat "$work/batch.log" >&2; exit 1; }

port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TALLY_JWT_SECRET="$secret" "$TALLY" serve --addr "127.0.0.1:$port" 2>"$work/serve.log" &
server=$!
for _ in $(seq 1 100); do
  if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=1)" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

# an admin token (HS256), valid for an hour
token="$(SECRET="$secret" "$VENV/bin/python" - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"role": "admin", "exp": int(time.time()) + 3600}).encode())
sig = hmac.new(os.environ["SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
PY
)"

echo "api-fuzz: schemathesis $("$VENV/bin/schemathesis" --version | awk '{print $NF}') against http://127.0.0.1:$port (seed $SEED, $EXAMPLES examples per operation)"
started=$(date +%s)
status=0
# run from the scratch directory: schemathesis keeps a cache in its working directory
hooks_dir="$PWD/scripts"
(cd "$work" && PYTHONDONTWRITEBYTECODE=1 SCHEMATHESIS_HOOKS=api_fuzz_hooks PYTHONPATH="$hooks_dir${PYTHONPATH:+:$PYTHONPATH}" \
  "$VENV/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  --checks all \
  --mode all \
  --max-examples "$EXAMPLES" \
  --seed "$SEED" \
  --generation-database none \
  --header "Authorization: Bearer $token" \
  --request-timeout 10 \
  --no-color) \
  || status=$?
echo "api-fuzz: schemathesis took $(( $(date +%s) - started )) s"
if [ "$status" -ne 0 ]; then
  echo "api-fuzz: failed; the server's log:" >&2
  tail -n 50 "$work/serve.log" >&2
fi
exit "$status"
