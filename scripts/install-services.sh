#!/usr/bin/env bash
# Install what tally's tests need when it is missing: Debian's redis-server, and a
# Python venv (default ~/.cache/tally/venv, override with TALLY_VENV) holding
# moto's server (the S3 + Kinesis emulator) and the reference readers used by
# tests and benchmarks (deltalake, duckdb, pyarrow), and schemathesis (the
# schema-driven API fuzzer of scripts/api-fuzz.sh). Safe to rerun: it only
# installs what is absent.
set -euo pipefail

VENV="${TALLY_VENV:-$HOME/.cache/tally/venv}"
# tzdata: the IANA database for Python's zoneinfo where the system has none
# (the calendar tests compare tally's buckets with zoneinfo's)
PY_PACKAGES=("moto[server]>=5.2.5,<5.3" "deltalake>=1.1,<2" "duckdb>=1.1" "pyarrow" "schemathesis>=4.3,<5" "tzdata" "aws-kinesis-agg>=1.2,<2" "datasketches>=5.2,<6")

if ! command -v redis-server >/dev/null 2>&1; then
  echo "install-services: installing redis-server (apt-get)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version | head -1

# headless Chromium renders the dashboard in a test
if ! command -v chromium >/dev/null 2>&1; then
  echo "install-services: installing chromium (apt-get)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
chromium --version 2>/dev/null | head -1 || true

# bench tools: wrk drives the serving benchmark (serving-layer/benches/serve.rs)
if ! command -v wrk >/dev/null 2>&1; then
  echo "install-services: installing wrk (apt-get)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi
wrk --version 2>&1 | head -1 || true

if [ ! -x "$VENV/bin/python" ]; then
  echo "install-services: creating venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import moto, deltalake, duckdb, pyarrow, flask_cors, schemathesis, tzdata, aws_kinesis_agg; assert moto.__version__.startswith("5.2.")' >/dev/null 2>&1; then
  echo "install-services: installing ${PY_PACKAGES[*]} into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi
"$VENV/bin/python" -c 'import moto, deltalake, duckdb; print("moto", moto.__version__, "| deltalake", deltalake.__version__, "| duckdb", duckdb.__version__)'
"$VENV/bin/schemathesis" --version
