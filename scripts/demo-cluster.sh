#!/usr/bin/env bash
# make demo-cluster: two kvstrata daemons sharing a 3-node Redis Cluster as their
# remote tier. A prefill through daemon A is decoded through daemon B from the
# cluster; `kvstrata route` picks the node holding the prefix; with one Redis node
# killed, a third daemon still decodes (misses are recomputed, never errors).
# Needs redis-server and redis-cli (make deps installs them) and the default model
# (fetched on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="${KVSTRATA_BIN:-$TARGET_DIR/debug/kvstrata}"
[ -x "$BIN" ] || { echo "error: $BIN not built (run make build)" >&2; exit 1; }
for tool in redis-server redis-cli python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (make deps installs redis)" >&2; exit 1; }
done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A free port whose cluster-bus port (+10000) is free too.
free_port() {
  python3 - <<'PY'
import socket
for _ in range(200):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p > 55000: continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 10000)); b.close(); print(p); break
    except OSError:
        b.close()
PY
}

step "starting a 3-node Redis Cluster on loopback"
PORTS=()
REDIS_PIDS=()
for i in 0 1 2; do
  port=$(free_port); PORTS+=("$port"); mkdir -p "$WORK/redis-$port"
  redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout 1000 --cluster-require-full-coverage no --appendonly no --save "" \
    --maxmemory 256mb --maxmemory-policy allkeys-lru --dir "$WORK/redis-$port" >/dev/null 2>&1 &
  PIDS+=($!); REDIS_PIDS+=($!)
done
for port in "${PORTS[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
for port in "${PORTS[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$port" cluster info | grep -q cluster_state:ok && break; sleep 0.1; done
done
echo "masters on ports ${PORTS[*]}"
SEEDS=$(printf 'redis://127.0.0.1:%s,' "${PORTS[@]}"); SEEDS=${SEEDS%,}

start_daemon() { # name
  local n=$1
  mkdir -p "$WORK/$n"
  "$BIN" serve --tcp-addr 127.0.0.1:0 --uds-path "$WORK/$n.sock" --metrics-addr "" \
    --host-capacity 512MiB --disk-path "$WORK/$n/slots.kvs=512MiB" \
    --remote-node "$SEEDS" --remote-write-through true \
    --ready-file "$WORK/$n.ready" --log-level warn &
  PIDS+=($!)
  for _ in $(seq 100); do [ -s "$WORK/$n.ready" ] && break; sleep 0.1; done
  [ -s "$WORK/$n.ready" ] || { echo "error: daemon $n did not start" >&2; exit 1; }
  echo "daemon $n: unix://$WORK/$n.sock"
}

step "starting daemons A and B (host + disk tiers, the cluster as remote tier, write-through)"
start_daemon a
start_daemon b

# A RAG-style prompt: one document of the demo corpus, then a question (~700 tokens).
{ cat engine/data/rag/02-larkspur-fare-rules.txt; echo; echo "Question: how much does a weekly pass cost, and who gets a discount?"; } > "$WORK/prompt.txt"
step "prefill through A (computes the prompt's KV, stores it on A and, written through, on the cluster)"
"$BIN" --addr "unix://$WORK/a.sock" prefill --handoff "$WORK/handoff.json" --prompt-file "$WORK/prompt.txt"

show_decode() { # json file
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["text"].strip())
print(f'-- {len(d["tokens"])} tokens; prompt KV: {d["loaded_tokens"]} tokens loaded from kvstrata, {d["recomputed_tokens"]} recomputed')
PY
}

step "decode through B, which never saw this prompt: its blocks come from the cluster"
"$BIN" --addr "unix://$WORK/b.sock" --json decode --handoff "$WORK/handoff.json" --max-tokens 24 > "$WORK/b.json"
show_decode "$WORK/b.json"
"$BIN" --addr "unix://$WORK/b.sock" stats | grep -E "^remote"

NS=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["namespace_id"])' "$WORK/handoff.json")
TOKENS=$(python3 -c 'import json,sys;h=json.load(open(sys.argv[1]));d=json.load(open(sys.argv[2]));print(",".join(map(str,h["tokens"]+d["tokens"])))' "$WORK/handoff.json" "$WORK/b.json")
step "kvstrata route: where should the next turn (prompt + answer) go? B holds the answer's blocks"
"$BIN" route --node "a=unix://$WORK/a.sock" --node "b=unix://$WORK/b.sock" --namespace "$NS" --tokens "$TOKENS"

step "kill one Redis node, then decode through a fresh daemon C"
kill -KILL "${REDIS_PIDS[0]}"; wait "${REDIS_PIDS[0]}" 2>/dev/null || true
start_daemon c
"$BIN" --addr "unix://$WORK/c.sock" --json decode --handoff "$WORK/handoff.json" --max-tokens 24 > "$WORK/c.json"
show_decode "$WORK/c.json"
"$BIN" --addr "unix://$WORK/c.sock" stats | grep -E "^remote"
python3 - "$WORK/b.json" "$WORK/c.json" <<'PY'
import json, sys
b, c = (json.load(open(p))["tokens"] for p in sys.argv[1:])
print("same tokens as B's decode:", "yes" if b == c else "NO")
sys.exit(0 if b == c else 1)
PY
echo "Blocks after the first one on the dead node were recomputed: a slower answer, never a wrong one."
