#!/usr/bin/env bash
# kvstrata remote tier vs. the same Redis Cluster used directly.
#
# Starts a Redis Cluster of 3 masters (no replicas, no persistence) on free
# loopback ports in a temporary directory, then against that one cluster:
#
# 1. `kvstrata bench-remote --markdown`: per block size, the remote tier
#    writes BLOCKS blocks with put_many and reads them back with get_many,
#    CONCURRENCY blocks per call, every block checked byte for byte; then the
#    redis crate's cluster connection does SET / GET of the same payloads in
#    the same batches (CONCURRENCY commands in flight, wait, next batch).
#    ROUNDS rounds per size, alternating which path goes first; the table
#    sums them and has the kvstrata / raw ratios of GB/s and p99, and the
#    client CPU time per GB of each path.
# 2. `redis-benchmark --cluster -t set,get -d SIZE -n REQUESTS -c CONCURRENCY
#    -P 1` per block size: Redis's own client as a second reference
#    (CONCURRENCY connections with one request each in flight, continuously,
#    not in batches; latency per request, not per batch).
#
# Prints the bench-remote table, the redis-benchmark table (with kvstrata's
# GB/s of the same run divided by redis-benchmark's) and the raw
# redis-benchmark output on stdout; progress goes to stderr. The nodes are
# stopped and the directory removed at exit.
#
# Usage (from anywhere; paths are relative to the repository root):
#   cargo build --workspace && benches/remote.sh
#
# Environment:
#   KVSTRATA_BIN  kvstrata binary          (${CARGO_TARGET_DIR:-target}/debug/kvstrata)
#   BLOCK_SIZES   block sizes              ("256KiB 1MiB")
#   BLOCKS        blocks per size, path and round (512)
#   ROUNDS        rounds per size           (6)
#   CONCURRENCY   commands in flight       (16)
#   REQUESTS      redis-benchmark requests per test and size (10000)
#   KEEP_WORKDIR=1  keep the work directory (node logs, outputs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BIN=${KVSTRATA_BIN:-${CARGO_TARGET_DIR:-target}/debug/kvstrata}
BLOCK_SIZES=${BLOCK_SIZES:-"256KiB 1MiB"}
BLOCKS=${BLOCKS:-512}
ROUNDS=${ROUNDS:-6}
CONCURRENCY=${CONCURRENCY:-16}
REQUESTS=${REQUESTS:-10000}
NODES=3

LOG_TAG=remote
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvstrata-remote.XXXXXX")
bench_traps

# ------------------------------------------------------------ prerequisites
need_cmds redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools jq:jq
[[ -x $BIN ]] || die "no $BIN: build it with 'cargo build --workspace' or set KVSTRATA_BIN"

# A port whose cluster-bus port (+10000) is free too.
cluster_port() {
    local p
    for _ in $(seq 1 100); do
        p=$(free_port) || return 1
        if ((p < 55000)) && ! tcp_open "$((p + 10000))" 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# ------------------------------------------------------------------ cluster
PORTS=()
for i in $(seq 1 "$NODES"); do
    p=$(cluster_port) || die "no free port pair"
    while [[ " ${PORTS[*]} " == *" $p "* ]]; do p=$(cluster_port) || die "no free port pair"; done
    PORTS+=("$p")
    mkdir -p "$WORK/$p"
    start_bg "$WORK/redis-$p.log" redis-server --port "$p" --bind 127.0.0.1 \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
        --appendonly no --save "" --protected-mode no --daemonize no --dir "$WORK/$p"
    # shellcheck disable=SC2329 # called through wait_for
    node_ready() { redis-cli -h 127.0.0.1 -p "$1" ping | grep -q PONG; }
    wait_for "$BG_PID" "$WORK/redis-$p.log" node_ready "$p" || die "redis-server on $p did not start"
    log "node $i: redis-server on 127.0.0.1:$p"
done

ADDRS=()
URLS=()
for p in "${PORTS[@]}"; do
    ADDRS+=("127.0.0.1:$p")
    URLS+=("redis://127.0.0.1:$p")
done
redis-cli --cluster create "${ADDRS[@]}" --cluster-replicas 0 --cluster-yes >"$WORK/create.log" 2>&1 ||
    die "redis-cli --cluster create failed: $(cat "$WORK/create.log")"
# shellcheck disable=SC2329 # called through wait_for
cluster_ok() {
    local p
    for p in "${PORTS[@]}"; do
        redis-cli -h 127.0.0.1 -p "$p" cluster info | grep -q 'cluster_state:ok' || return 1
    done
}
wait_for "${PIDS[0]}" "$WORK/redis-${PORTS[0]}.log" cluster_ok || die "the cluster did not reach cluster_state:ok"
VERSION=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')
log "cluster of $NODES masters (redis-server $VERSION) ok: ${ADDRS[*]}"

# Size label as bench-remote prints it: "256 KiB", "1 MiB", "1000 B".
size_label() {
    local b=$1
    if ((b >= 1048576 && b % 1048576 == 0)); then
        echo "$((b / 1048576)) MiB"
    elif ((b >= 1024 && b % 1024 == 0)); then
        echo "$((b / 1024)) KiB"
    else
        echo "$b B"
    fi
}

# -------------------------------------------------------------- bench-remote
SIZES_CSV=$(tr ' ' ',' <<<"$BLOCK_SIZES")
NODES_CSV=$(
    IFS=,
    echo "${URLS[*]}"
)
log "kvstrata bench-remote: sizes $SIZES_CSV, $BLOCKS blocks x $ROUNDS rounds, $CONCURRENCY in flight"
run_to "$WORK/bench-remote.md" "$BIN" bench-remote --node "$NODES_CSV" --block-size "$SIZES_CSV" \
    --blocks "$BLOCKS" --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --markdown ||
    die "kvstrata bench-remote failed (see above)"

# kvstrata GB/s of SIZE_LABEL and OP (write/read) from the bench-remote table.
kv_gbps() {
    awk -F'|' -v s="$1" -v op="$2" '
        { for (i = 1; i <= NF; i++) gsub(/^ +| +$/, "", $i) }
        $2 == s && $3 == op { print $5; exit }' "$WORK/bench-remote.md"
}

# ---------------------------------------------------------- redis-benchmark
ROWS=()
for bs in $BLOCK_SIZES; do
    bytes=$(to_bytes "$bs")
    label=$(size_label "$bytes")
    log "redis-benchmark --cluster -t set,get -d $bytes -n $REQUESTS -c $CONCURRENCY -P 1"
    out=$WORK/redis-benchmark-$bytes.csv
    run_to "$out" redis-benchmark --cluster -h 127.0.0.1 -p "${PORTS[0]}" -t set,get -d "$bytes" \
        -n "$REQUESTS" -c "$CONCURRENCY" -P 1 --csv ||
        die "redis-benchmark failed: $(cat "$out")"
    redis-cli --cluster call "127.0.0.1:${PORTS[0]}" FLUSHALL >/dev/null 2>&1 || true
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    for t in SET GET; do
        line=$(grep "^\"$t\"," "$out" | tr -d '"') || die "no $t line in redis-benchmark output: $(cat "$out")"
        IFS=, read -r _ rps _ _ p50 _ p99 _ <<<"$line"
        gbps=$(awk -v r="$rps" -v b="$bytes" 'BEGIN { printf "%.3f", r * b / 1e9 }')
        if [[ $t == SET ]]; then op="write"; else op="read"; fi
        kv=$(kv_gbps "$label" "$op")
        ROWS+=("| $label | $t | $(fmt0 "$rps") | $gbps | $p50 / $p99 | ${kv:--} | $(ratio "$kv" "$gbps") |")
    done
done

# ----------------------------------------------------------------- output
echo "Redis Cluster: $NODES masters, redis-server $VERSION, loopback (${ADDRS[*]}), no replicas, no persistence."
echo
cat "$WORK/bench-remote.md"
echo
echo "redis-benchmark --cluster -t set,get -d SIZE -n $REQUESTS -c $CONCURRENCY -P 1 (per-request latency):"
echo
echo "| block size | test | requests/s | GB/s | p50 / p99 (ms) | kvstrata GB/s (bench-remote above) | kvstrata / redis-benchmark |"
echo "|---|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "redis-benchmark output (CSV):"
for bs in $BLOCK_SIZES; do
    bytes=$(to_bytes "$bs")
    echo "# -d $bytes"
    cat "$WORK/redis-benchmark-$bytes.csv"
done
