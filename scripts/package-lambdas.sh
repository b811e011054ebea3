#!/usr/bin/env bash
# Build `tally` for AWS Lambda's custom runtime (provided.al2023) and zip it as
# `bootstrap` into one package, where infra/terraform expects it:
#
#   dist/lambda/tally.zip
#
# All four functions run this one package: Lambda sets _HANDLER from each
# function's handler setting (speed, archiver, batch, api) and the binary runs
# that part. The zip (~60 MB) is over the 50 MB Lambda takes in a direct
# upload, so infra/terraform uploads it once to its artifacts bucket and the
# four functions load their code from there (s3_bucket/s3_key/
# s3_object_version); through S3 the limit is 250 MB unzipped, which this
# script checks.
#
# Environment:
#   TARGET    Rust target triple (default aarch64-unknown-linux-gnu, Graviton;
#             x86_64-unknown-linux-gnu for lambda_architecture = "x86_64").
#   DIST_DIR  where tally.zip goes (default <repo>/dist/lambda; Terraform's
#             lambda_dist_dir).
#   BINARY    package this already built binary instead of building (for a CI
#             artifact); it must be for TARGET's architecture.
#   STRIP     1 (default): strip the packaged copy's debug info and symbols
#             (a release binary with its line tables is ~1 GB, over Lambda's
#             250 MB unzipped limit); 0: keep them (only for a local look).
#   NO_CARGO_LAMBDA  1: do not use cargo-lambda even when it is installed.
#
# Building: with cargo-lambda installed (`cargo install cargo-lambda`, which
# cross-compiles through Zig and targets an old enough glibc), this runs
# `cargo lambda build --release --arm64` (or --x86-64). Without it, it runs
# `cargo build --release --target $TARGET`, which needs
#   - the target's standard library: `rustup target add $TARGET`;
#   - for a cross build, a linker and C compiler for the target (C code in
#     the dependency tree, e.g. the TLS and compression crates), on Debian:
#     `apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross`; this
#     script then sets CARGO_TARGET_<TRIPLE>_LINKER and CC_<triple> for you.
# Either way the binary must not need a glibc newer than Amazon Linux 2023's
# (2.34); the script checks the ELF's version needs and stops if it does
# (then use cargo-lambda, build on AL2023, or TARGET=aarch64-unknown-linux-musl).
set -euo pipefail

readonly FUNCTIONS=(speed archiver batch api)
readonly AL2023_GLIBC="2.34"
# Lambda's limit on a zip uploaded directly (CreateFunction/UpdateFunctionCode
# with ZipFile, `aws lambda update-function-code --zip-file`): 50 MB. Only
# reported: infra/terraform does not upload directly, it stages the zip in S3.
readonly LAMBDA_DIRECT_UPLOAD_LIMIT=$((50 * 1024 * 1024))
# Lambda's limit on a function's unzipped code (with its layers): 250 MB,
# whichever way the zip arrives.
readonly LAMBDA_UNZIPPED_LIMIT=$((250 * 1024 * 1024))

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${TARGET:-aarch64-unknown-linux-gnu}"
dist_dir="${DIST_DIR:-${root}/dist/lambda}"
strip_binary="${STRIP:-1}"

log() { printf 'package-lambdas: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

case "${target}" in
  aarch64-*) lambda_arch="arm64" ;;
  x86_64-*) lambda_arch="x86_64" ;;
  *) die "TARGET ${target}: Lambda runs aarch64 (arm64) or x86_64 only" ;;
esac

# --- build ---------------------------------------------------------------------

build_with_cargo_lambda() {
  local arch_flag="--arm64"
  [[ "${lambda_arch}" == "x86_64" ]] && arch_flag="--x86-64"
  log "cargo lambda build --release ${arch_flag} --bin tally"
  (cd "${root}" && cargo lambda build --release "${arch_flag}" --bin tally)
  binary_path="${root}/target/lambda/tally/bootstrap"
}

build_with_cargo() {
  local sysroot_lib
  sysroot_lib="$(rustc --print target-libdir --target "${target}" 2>/dev/null || true)"
  if [[ -z "${sysroot_lib}" || ! -d "${sysroot_lib}" ]] || ! compgen -G "${sysroot_lib}/libstd-*" >/dev/null; then
    die "the Rust standard library for ${target} is not installed: rustup target add ${target}"
  fi

  local host
  host="$(rustc -vV | sed -n 's/^host: //p')"
  if [[ "${host}" != "${target}" ]]; then
    # A cross build: point cargo and the cc crate at the target's GCC unless
    # the caller already did.
    local triple_upper triple_lower gnu_prefix
    triple_upper="$(printf '%s' "${target}" | tr '[:lower:]-' '[:upper:]_')"
    triple_lower="$(printf '%s' "${target}" | tr '-' '_')"
    gnu_prefix="${target%%-*}-linux-gnu"
    local linker_var="CARGO_TARGET_${triple_upper}_LINKER"
    local cc_var="CC_${triple_lower}"
    if [[ -z "${!linker_var:-}" ]]; then
      command -v "${gnu_prefix}-gcc" >/dev/null 2>&1 \
        || die "no linker for ${target}: install gcc-${gnu_prefix} (Debian, for aarch64: gcc-aarch64-linux-gnu libc6-dev-arm64-cross), set ${linker_var}, or install cargo-lambda"
      export "${linker_var}=${gnu_prefix}-gcc"
    fi
    if [[ -z "${!cc_var:-}" ]] && command -v "${gnu_prefix}-gcc" >/dev/null 2>&1; then
      export "${cc_var}=${gnu_prefix}-gcc"
    fi
    local ar_var="AR_${triple_lower}"
    if [[ -z "${!ar_var:-}" ]] && command -v "${gnu_prefix}-ar" >/dev/null 2>&1; then
      export "${ar_var}=${gnu_prefix}-ar"
    fi
  fi

  log "cargo build --release --target ${target} --bin tally"
  (cd "${root}" && cargo build --release --locked --target "${target}" --bin tally)
  binary_path="${root}/target/${target}/release/tally"
}

binary_path=""
if [[ -n "${BINARY:-}" ]]; then
  binary_path="${BINARY}"
  log "packaging prebuilt ${binary_path} (TARGET ${target})"
elif [[ "${NO_CARGO_LAMBDA:-0}" != "1" ]] && command -v cargo-lambda >/dev/null 2>&1; then
  build_with_cargo_lambda
else
  build_with_cargo
fi
[[ -f "${binary_path}" ]] || die "no binary at ${binary_path}"

# --- checks on the binary -------------------------------------------------------------

stage="$(mktemp -d)"
trap 'rm -rf "${stage}"' EXIT
cp "${binary_path}" "${stage}/bootstrap"
chmod 0755 "${stage}/bootstrap"

if command -v readelf >/dev/null 2>&1; then
  machine="$(readelf -h "${stage}/bootstrap" | sed -n 's/^ *Machine: *//p')"
  case "${lambda_arch}:${machine}" in
    arm64:*AArch64*) ;;
    x86_64:*X86-64*) ;;
    *) die "${binary_path} is for '${machine}', not ${lambda_arch}" ;;
  esac

  # Highest GLIBC_x.y version the binary needs (none for a static musl build).
  need="$(readelf -V -W "${stage}/bootstrap" 2>/dev/null \
    | grep -o 'Name: GLIBC_[0-9][0-9.]*' | sed 's/Name: GLIBC_//' \
    | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1 || true)"
  if [[ -n "${need}" ]]; then
    newest="$(printf '%s\n%s\n' "${need}" "${AL2023_GLIBC}" | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)"
    if [[ "${newest}" != "${AL2023_GLIBC}" ]]; then
      die "the binary needs glibc ${need}; provided.al2023 has ${AL2023_GLIBC}. Build with cargo-lambda, on AL2023, or for a musl target."
    fi
    log "glibc needed: ${need} (provided.al2023 has ${AL2023_GLIBC})"
  fi
else
  log "warning: readelf not found; architecture and glibc version not checked"
fi

if [[ "${strip_binary}" == "1" ]]; then
  strip_tool=""
  for candidate in "${target%%-*}-linux-gnu-strip" llvm-strip; do
    if command -v "${candidate}" >/dev/null 2>&1; then
      strip_tool="${candidate}"
      break
    fi
  done
  host_machine="$(uname -m)"
  if [[ -z "${strip_tool}" && "${host_machine}" == "${target%%-*}" ]]; then
    strip_tool="strip"
  fi
  [[ -n "${strip_tool}" ]] || die "no strip tool for ${target} (install binutils-${target%%-*}-linux-gnu or llvm), or STRIP=0 for a local look"
  before="$(wc -c <"${stage}/bootstrap" | tr -d ' ')"
  "${strip_tool}" --strip-all "${stage}/bootstrap"
  log "stripped ${before} -> $(wc -c <"${stage}/bootstrap" | tr -d ' ') bytes"
fi

unzipped="$(wc -c <"${stage}/bootstrap" | tr -d ' ')"
if ((unzipped > LAMBDA_UNZIPPED_LIMIT)); then
  die "bootstrap is ${unzipped} bytes unzipped; Lambda takes at most ${LAMBDA_UNZIPPED_LIMIT} (250 MB). Leave STRIP at 1."
fi

# A fixed timestamp makes the zip a function of the binary alone, so an
# unchanged binary gives an unchanged hash: Terraform uploads nothing and
# publishes no new version.
touch -t 198001010000 "${stage}/bootstrap"

# --- zip -----------------------------------------------------------------------------

mkdir -p "${dist_dir}"
make_zip() {
  local out="$1"
  rm -f "${out}"
  if command -v zip >/dev/null 2>&1; then
    (cd "${stage}" && zip -q -X -9 "${out}" bootstrap)
  else
    python3 - "${stage}/bootstrap" "${out}" <<'PY'
import sys
import zipfile

src, out = sys.argv[1], sys.argv[2]
info = zipfile.ZipInfo("bootstrap", date_time=(1980, 1, 1, 0, 0, 0))
info.external_attr = (0o100755 & 0xFFFF) << 16
info.compress_type = zipfile.ZIP_DEFLATED
with open(src, "rb") as fh, zipfile.ZipFile(out, "w") as zf:
    zf.writestr(info, fh.read(), compresslevel=9)
PY
  fi
}

package="${dist_dir}/tally.zip"
make_zip "${package}"

# Earlier versions of this script wrote one copy per function; Terraform no
# longer reads them, and left behind they would hold an old binary.
for fn in "${FUNCTIONS[@]}"; do
  if [[ -f "${dist_dir}/${fn}.zip" ]]; then
    rm -f "${dist_dir}/${fn}.zip"
    log "removed ${dist_dir}/${fn}.zip (per-function copies are gone: all four functions use tally.zip)"
  fi
done

size="$(wc -c <"${package}" | tr -d ' ')"
log "wrote ${package} (${size} bytes; handlers ${FUNCTIONS[*]})"
log "bootstrap unzipped: ${unzipped} bytes (Lambda's limit: ${LAMBDA_UNZIPPED_LIMIT})"
if ((size > LAMBDA_DIRECT_UPLOAD_LIMIT)); then
  log "${size} bytes zipped is over the ${LAMBDA_DIRECT_UPLOAD_LIMIT} (50 MB) that Lambda takes in a direct upload; that is fine: infra/terraform uploads it to the artifacts bucket and the functions load it from S3"
else
  log "infra/terraform uploads it to the artifacts bucket and the functions load it from S3"
fi
log "set lambda_architecture = \"${lambda_arch}\" in Terraform to match TARGET ${target}"
