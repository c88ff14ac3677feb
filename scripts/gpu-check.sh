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
# Then the GPU engine through a daemon (skip them with GPU_CHECK_ENGINE=0):
#   - `kvstrata bench ttft --device cuda --synthetic llama3-8b`: TTFT of a
#     full recompute vs a cached prefix loaded from the daemon's HBM tier, its
#     page-locked host tier and its disk tier, at 2k, 8k and 32k tokens, with
#     the load's GB/s (ttft.md);
#   - `kvstrata bench interference`: decode step time while another engine
#     stores, against the quiet decode (interference.md);
#   - scripts/gpu-engine-verbs.sh when the real model's GGUF is at $MODEL
#     (default /root/k/model.gguf; docs/gpu.md says how to carry it): GPU vs
#     CPU prefill and decode through one daemon, tokens and logits compared;
#   - tests/python/gpu_kv_region.py when python3 imports torch and the
#     kvstrata package: KvRegion over CUDA IPC in vLLM's layouts, against
#     torch's pinned copies.
# Prints a pass/fail table and a benchmark table; writes gpu-check.json,
# gpu-check.txt and the engine rows' files into OUT_DIR (default: a
# temporary directory). Exit status 1 when a check or an engine row fails.
# docs/gpu.md explains the checks, docs/benchmarks.md records the results.
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
if [ "${GPU_CHECK_ENGINE:-1}" != 0 ]; then
  # step NAME COMMAND...: runs one engine row, its output in NAME.md, its log in NAME.log.
  step() {
    local name=$1
    shift
    echo "== $name: $*"
    if "$@" >"$out/$name.md" 2>"$out/$name.log"; then
      cat "$out/$name.md"
    else
      echo "$name FAILED (exit status $?): $(tail -3 "$out/$name.log")"
      rc=1
    fi
  }
  step ttft "$bin" bench ttft --device cuda --synthetic llama3-8b --contexts 2048,8192,32768 \
    --cached 0,100 --markdown --quiet
  step interference "$bin" bench interference --device cuda --synthetic llama3-8b --context 8192 \
    --steps 200 --store-tokens 16384 --gpu-hbm-bytes 8GiB --gpu-host-capacity 4GiB \
    --tiers hbm,host --store-chunk-blocks 32,1024 --markdown --quiet
  model="${MODEL:-/root/k/model.gguf}"
  if [ -f "$model" ]; then
    step engine-verbs env KVSTRATA_BIN="$bin" MODEL="$model" OUT="$out" bash scripts/gpu-engine-verbs.sh
  else
    echo "== engine-verbs: skipped (no GGUF at $model; set MODEL)"
  fi
  if python3 -c 'import torch, kvstrata' 2>/dev/null; then
    step kv-region env KVSTRATA_BIN="$bin" PYTHONPATH="tests/python:${PYTHONPATH:-}" \
      python3 tests/python/gpu_kv_region.py 256 5
  else
    echo "== kv-region: skipped (python3 does not import torch and kvstrata; see docs/gpu.md)"
  fi
fi
set -e
echo "results in $out (exit status $rc)"
exit "$rc"
