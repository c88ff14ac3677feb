#!/usr/bin/env bash
# make pytest: run the Python tests that play an SGLang HiCache worker against the
# debug daemon (tests/python/test_sglang_hicache.py).
#
# - the daemon binary: $KVSTRATA_BIN, else ${CARGO_TARGET_DIR:-target}/debug/kvstrata
#   (built by `cargo build --workspace` or `cargo test --workspace`);
# - a virtual environment with pinned grpcio / grpcio-tools / protobuf at
#   ${CARGO_TARGET_DIR:-target}/pyenv, reused while its pins match;
# - Python stubs generated from the project's own proto/ files into a temp dir.
# Extra arguments go to the test file (unittest), e.g. `-k close` or `-v`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="${KVSTRATA_BIN:-$TARGET_DIR/debug/kvstrata}"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac

die() { echo "error: $*" >&2; exit 1; }

[ -x "$BIN" ] || die "$BIN not found or not executable (build it with: cargo build --workspace)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for tests/python)"

# Pins. protobuf 7.36.2 is what grpcio-tools 1.85.1 accepts and installs as a wheel here.
PINS=(grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2)
VENV="$TARGET_DIR/pyenv"
STAMP="$VENV/.kvstrata-pins"
PY="$VENV/bin/python"

if [ ! -x "$PY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ] || ! "$PY" -c 'import grpc, grpc_tools, google.protobuf' 2>/dev/null; then
  rm -rf "$VENV"
  mkdir -p "$TARGET_DIR"
  LOG="$TARGET_DIR/pyenv-install.log"
  if ! python3 -m venv "$VENV" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -rf "$VENV"
    die "python3 -m venv $VENV failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    rm -rf "$VENV"
    die "pip install ${PINS[*]} failed (full log: $LOG)"
  fi
  echo "${PINS[*]}" >"$STAMP"
fi

GEN="$(mktemp -d "${TMPDIR:-/tmp}/kvstrata-pystubs.XXXXXX")"
trap 'rm -rf "$GEN"' EXIT
"$PY" -m grpc_tools.protoc -I proto --python_out="$GEN" --grpc_python_out="$GEN" \
  proto/kvstrata/v1/kvstrata.proto proto/sglang/runtime/hicache.proto \
  || die "generating Python stubs from proto/ failed"

mkdir -p "$TARGET_DIR/tmp"
KVSTRATA_BIN="$BIN" KVSTRATA_TEST_TMP="$TARGET_DIR/tmp" PYTHONPATH="$GEN" \
  "$PY" tests/python/test_sglang_hicache.py "$@"
