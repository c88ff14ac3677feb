#!/usr/bin/env bash
# Every GPU check and GPU benchmark, on a machine with an NVIDIA GPU. Builds
# nothing: build the release binary where Rust is, carry it here, then
#
#   KVSTRATA_BIN=path/to/kvstrata scripts/gpu-check.sh [OUT_DIR]
#
# (default binary: ${CARGO_TARGET_DIR:-target}/release/kvstrata, then
# .devtools/kvstrata). `kvstrata gpu-check` runs, on device 0:
#   - each kernel (batched copy, gather, scatter; per-layer and cross-layer
#     pages) and the DMA path against its CPU reference on fresh random data,
#     outputs poisoned first;
#   - HBM tier round trips under demotion/promotion pressure;
#   - the two-process CUDA IPC path: a child process plays the engine (its own
#     cuMemAlloc region, exported with cuIpcGetMemHandle), a kvstrata daemon
#     started from the same binary gathers and scatters its pages;
#   - the benchmarks: pinned and device copy ceilings, batched block copies,
#     gather/scatter, HBM tier demotion/promotion, each with its ratio.
# Prints a pass/fail table and a benchmark table; writes gpu-check.json and
# gpu-check.txt into OUT_DIR (default: a temporary directory). Exit status 1
# when a check fails. docs/gpu.md explains the checks, docs/benchmarks.md
# records the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${KVSTRATA_BIN:-}"
if [ -z "$bin" ]; then
  for c in "${CARGO_TARGET_DIR:-target}/release/kvstrata" .devtools/kvstrata; do
    if [ -x "$c" ]; then bin="$c"; break; fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "gpu-check: no kvstrata binary (set KVSTRATA_BIN or build target/release/kvstrata)" >&2
  exit 2
fi
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv,noheader | tee "$out/nvidia-smi.txt"
else
  echo "gpu-check: nvidia-smi not found; kvstrata gpu-check says what it finds" >&2
fi
set +e
# shellcheck disable=SC2086 # GPU_CHECK_ARGS: extra flags, word-split on purpose
"$bin" gpu-check --json-out "$out/gpu-check.json" ${GPU_CHECK_ARGS:-} 2>"$out/gpu-check.log" | tee "$out/gpu-check.txt"
rc=${PIPESTATUS[0]}
set -e
echo "results in $out (exit status $rc)"
exit "$rc"
