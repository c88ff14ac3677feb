#!/usr/bin/env bash
# make demo: start a daemon with defaults (ephemeral ports, a temp socket), put and
# get a few blocks through the CLI, show lookup/ls/inspect/stats, then stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="${KVSTRATA_BIN:-$TARGET_DIR/debug/kvstrata}"
[ -x "$BIN" ] || { echo "error: $BIN not built (run make build)" >&2; exit 1; }

WORK=$(mktemp -d)
DAEMON_PID=""
cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "starting kvstrata serve (host tier 256 MiB)"
"$BIN" serve --tcp-addr 127.0.0.1:0 --uds-path "$WORK/kvstrata.sock" --metrics-addr 127.0.0.1:0 \
  --host-capacity 256MiB --ready-file "$WORK/ready.json" --log-level warn &
DAEMON_PID=$!
for _ in $(seq 100); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
[ -s "$WORK/ready.json" ] || { echo "error: daemon did not start" >&2; exit 1; }
cat "$WORK/ready.json"; echo
export KVSTRATA_ADDR="unix://$WORK/kvstrata.sock"
METRICS=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["metrics"])' "$WORK/ready.json")

step "register the SmolLM2-135M geometry (30 layers, 3 KV heads, dim 64, f16, 16-token blocks)"
"$BIN" ns register --model SmolLM2-135M-Instruct --layers 30 --kv-heads 3 --head-dim 64 --dtype f16 --block-tokens 16

step "put a chain of 3 blocks (368,640 bytes each) and a block from a file"
"$BIN" put --ns SmolLM2-135M-Instruct turn1-blk0 --fill-seed 1
"$BIN" put --ns SmolLM2-135M-Instruct turn1-blk1 --parent turn1-blk0 --fill-seed 2
"$BIN" put --ns SmolLM2-135M-Instruct turn1-blk2 --parent turn1-blk1 --fill-seed 3
head -c 368640 /dev/urandom > "$WORK/block.bin"
"$BIN" put --ns SmolLM2-135M-Instruct from-file --file "$WORK/block.bin"

step "get it back and compare byte for byte"
"$BIN" get --ns SmolLM2-135M-Instruct from-file --out "$WORK/back.bin"
cmp "$WORK/block.bin" "$WORK/back.bin" && echo "identical: $(wc -c < "$WORK/back.bin") bytes"

step "longest cached prefix of a 4-block chain"
"$BIN" lookup --ns SmolLM2-135M-Instruct turn1-blk0 turn1-blk1 turn1-blk2 turn1-blk3

step "ls and inspect"
"$BIN" ls
"$BIN" inspect --ns SmolLM2-135M-Instruct turn1-blk1

step "bad input is refused with one line and a non-zero exit"
if "$BIN" put --ns SmolLM2-135M-Instruct short --file /etc/hostname; then echo "unexpected success"; exit 1; fi

step "stats"
"$BIN" stats
step "a few Prometheus metrics (http://$METRICS/metrics)"
python3 - "$METRICS" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in body.splitlines():
    if line.startswith(("kvstrata_tier_used_bytes", "kvstrata_tier_blocks", "kvstrata_requests_total")):
        print(line)
PY
step "stopping (SIGTERM)"
kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID"; DAEMON_PID=""
echo "demo done"
