#!/usr/bin/env bash
# Loads into an engine's GPU pages with and without answers before the copies
# complete, alternated in one run on a GPU machine (docs/gpu.md, "Switches for
# measuring"; docs/protocol.md, "Answers before the copies complete"):
#
#   KVSTRATA_BIN=path/to/kvstrata scripts/gpu-load-ab.sh [OUT_DIR]
#
# Per round, for KVSTRATA_ANSWER_WHEN_QUEUED=1 then 0 and each of PIPES
# (requests in flight per HBM-tier load, default "1 4"):
#   `kvstrata bench ttft --device cuda --synthetic llama3-8b --contexts 8192
#   --cached 0,100 --no-disk --markdown` with the daemon's `page get` /
#   `direct get` debug lines and the engine's per-request lines;
# then, when python3 imports torch and the kvstrata package (PYTHONPATH),
#   `tests/python/gpu_kv_region.py 256 5` (FRESH_DAEMON=1) both ways.
# ROUNDS (default "1 2 3") and PYROUNDS (default "1 2") set the rounds. Writes
# ttft.txt (the benchmark tables), engine.txt and daemon.txt (the debug lines,
# "== tag" before each run's), py.txt and env.txt into OUT_DIR (default: a
# temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${KVSTRATA_BIN:-${CARGO_TARGET_DIR:-target}/release/kvstrata}"
[ -x "$bin" ] || { echo "gpu-load-ab: no kvstrata binary at $bin (set KVSTRATA_BIN)" >&2; exit 2; }
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1
  nproc
  uptime
} > "$out/env.txt"
strip_colours() { sed 's/\x1b\[[0-9;]*m//g'; }
ttft() { # when_queued pipeline tag
  local logs="$out/logs-$3"
  mkdir -p "$logs"
  KVSTRATA_ANSWER_WHEN_QUEUED=$1 KVSTRATA_LOAD_PIPELINE=$2 KVSTRATA_DAEMON_LOG_KEEP="$logs" \
  KVSTRATA_DAEMON_LOG_LEVEL=kvstrata_server::region=debug,kvstrata_server::service::kv_pages=debug,info \
  RUST_LOG=kvstrata_engine::cuda::region=debug,info \
    timeout 300 "$bin" bench ttft --device cuda --synthetic llama3-8b --contexts 8192 \
    --cached 0,100 --no-disk --markdown > "$logs/ttft.out" 2>&1
  echo "== $3 rc=$?" >> "$out/ttft.txt"
  strip_colours < "$logs/ttft.out" | grep -v DEBUG >> "$out/ttft.txt"
  echo "== $3" >> "$out/engine.txt"
  strip_colours < "$logs/ttft.out" | grep "KV region load" >> "$out/engine.txt"
  echo "== $3" >> "$out/daemon.txt"
  cat "$logs"/*.log 2>/dev/null | strip_colours | grep -E "page get|direct get" >> "$out/daemon.txt"
}
for r in ${ROUNDS:-1 2 3}; do
  for w in 1 0; do
    for p in ${PIPES:-1 4}; do ttft "$w" "$p" "w$w-p$p-r$r"; done
  done
done
if python3 -c "import torch, kvstrata" 2>/dev/null; then
  for r in ${PYROUNDS:-1 2}; do
    for w in 1 0; do
      echo "== py w$w r$r" >> "$out/py.txt"
      KVSTRATA_ANSWER_WHEN_QUEUED=$w KVSTRATA_BIN="$bin" FRESH_DAEMON=1 IN_FLIGHT=1 \
        timeout 300 python3 tests/python/gpu_kv_region.py 256 5 >> "$out/py.txt" 2>&1
      echo "rc=$?" >> "$out/py.txt"
    done
  done
else
  echo "gpu-load-ab: python3 does not import torch and kvstrata: the Python rows are skipped" | tee -a "$out/py.txt"
fi
echo "gpu-load-ab: results in $out"
