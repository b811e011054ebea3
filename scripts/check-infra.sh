#!/usr/bin/env bash
# Static checks of the Terraform in infra/terraform, with no Terraform binary:
#   1. every .tf file parses as HCL2 (python-hcl2);
#   2. checkov reports no failed check (a skipped check must carry an inline
#      `#checkov:skip=CKV_...:reason` in the .tf file that it concerns);
#   3. the batch state machine's definition (stepfunctions.tf), evaluated from
#      the HCL, has a consistent shape, passes statelint, and runs its
#      scenarios against a scripted batch function
#      (scripts/check_state_machine.py, with statelint's jsonata-python).
#
# Tools live in a Python venv at ${TALLY_VENV:-$HOME/.cache/tally/venv}, created
# and filled from PyPI on first use. Versions are pinned so that a new checkov
# release (which adds checks) cannot turn a green build red on its own; raise
# the pins on purpose.
#
# Each tool is installed into its own --target directory inside the venv
# (<venv>/opt/<tool>-<version>) and put on PYTHONPATH only while it runs:
#   - checkov pins many common packages exactly (boto3, packaging, ...); the
#     venv is shared with the test services (scripts/install-services.sh:
#     moto, deltalake, duckdb), whose site-packages must not be moved by it;
#   - checkov depends on bc-python-hcl2, a fork that installs the same `hcl2`
#     import package as python-hcl2 (which also ships a top-level `cli`
#     package), so the two cannot share a site-packages either;
#   - statelint (and jsonata-python) sits beside python-hcl2 on PYTHONPATH for
#     step 3, never beside checkov.
set -euo pipefail

readonly CHECKOV_VERSION="3.3.30"
readonly PYTHON_HCL2_VERSION="8.1.4"
readonly STATELINT_VERSION="3.1.0"
readonly JSONATA_PYTHON_VERSION="0.7.1"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tf_dir="${root}/infra/terraform"
venv="${TALLY_VENV:-${HOME}/.cache/tally/venv}"
hcl2_dir="${venv}/opt/python-hcl2-${PYTHON_HCL2_VERSION}"
checkov_dir="${venv}/opt/checkov-${CHECKOV_VERSION}"
statelint_dir="${venv}/opt/statelint-${STATELINT_VERSION}-jsonata-${JSONATA_PYTHON_VERSION}"
python_bin="${PYTHON:-python3}"

log() { printf 'check-infra: %s\n' "$*" >&2; }

if [[ ! -d "${tf_dir}" ]]; then
  log "no ${tf_dir}"
  exit 1
fi

# --- tools -------------------------------------------------------------------
if [[ ! -x "${venv}/bin/python" ]]; then
  log "creating venv ${venv}"
  mkdir -p "$(dirname "${venv}")"
  "${python_bin}" -m venv "${venv}"
fi
vpy="${venv}/bin/python"

install_tool() { # <dir> <requirement>...
  local dir="$1"
  shift
  [[ -f "${dir}/.complete" ]] && return 0
  log "installing $* into ${dir}"
  rm -rf "${dir}"
  "${vpy}" -m pip install --quiet --disable-pip-version-check --target "${dir}" "$@"
  touch "${dir}/.complete"
}
install_tool "${checkov_dir}" "checkov==${CHECKOV_VERSION}"
install_tool "${hcl2_dir}" "python-hcl2==${PYTHON_HCL2_VERSION}"
# python-dateutil below 3, as botocore in the shared venv wants it, keeps pip from
# reporting a conflict that the separate --target directory does not have.
install_tool "${statelint_dir}" "statelint[jsonata]==${STATELINT_VERSION}" "jsonata-python==${JSONATA_PYTHON_VERSION}" "python-dateutil<3"

# --- 1. parse ----------------------------------------------------------------
parsed="$(
  PYTHONPATH="${hcl2_dir}" "${vpy}" - "${tf_dir}" <<'PY'
import pathlib
import sys

import hcl2

root = pathlib.Path(sys.argv[1])
files = sorted(p for p in root.rglob("*.tf") if ".terraform" not in p.parts)
if not files:
    print(f"no .tf files under {root}", file=sys.stderr)
    sys.exit(1)
bad = 0
for path in files:
    try:
        with path.open(encoding="utf-8") as fh:
            hcl2.load(fh)
    except Exception as exc:  # any parser error names the file and fails
        bad += 1
        print(f"parse error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
if bad:
    sys.exit(1)
print(len(files))
PY
)" || { log "HCL parse failed"; exit 1; }

# --- 2. checkov ----------------------------------------------------------------
report_dir="$(mktemp -d)"
trap 'rm -rf "${report_dir}"' EXIT
set +e
PYTHONPATH="${checkov_dir}" "${vpy}" "${checkov_dir}/bin/checkov" -d "${tf_dir}" --framework terraform --quiet --compact \
  --skip-download -o cli -o json --output-file-path "console,${report_dir}/results_json.json"
rc=$?
set -e

# Counts come from checkov's JSON report, not from scraping its console text.
counts="$(
  "${vpy}" - "${report_dir}/results_json.json" <<'PY'
import json
import sys

try:
    with open(sys.argv[1], encoding="utf-8") as fh:
        text = fh.read().strip()
except FileNotFoundError:
    text = ""
data = json.loads(text) if text else {}
reports = data if isinstance(data, list) else [data]
p = f = s = e = 0
for r in reports:
    summary = r.get("summary", {}) if isinstance(r, dict) else {}
    p += summary.get("passed", 0)
    f += summary.get("failed", 0)
    s += summary.get("skipped", 0)
    e += summary.get("parsing_errors", 0)
print(p, f, s, e)
PY
)"
read -r passed failed skipped parse_errors <<<"${counts}"

if [[ ${parse_errors} -ne 0 ]]; then
  log "checkov could not parse ${parse_errors} file(s)"
  exit 1
fi
if [[ ${rc} -ne 0 || ${failed} -ne 0 ]]; then
  log "checkov: ${failed} failed check(s) (exit ${rc})"
  exit 1
fi
if [[ ${passed} -eq 0 ]]; then
  log "checkov ran no check"
  exit 1
fi

# --- 3. the batch state machine ------------------------------------------------
sfn="$(PYTHONPATH="${hcl2_dir}:${statelint_dir}" "${vpy}" "${root}/scripts/check_state_machine.py" "${tf_dir}")" \
  || { log "batch state machine check failed"; exit 1; }

echo "infra: ${parsed} files parsed, checkov: ${passed} passed, 0 failed, ${skipped} skipped; state machine: ${sfn}"
