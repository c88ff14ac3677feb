#!/usr/bin/env bash
# kvstrata's shared-memory path vs. its gRPC path vs. Redis, on one machine.
#
# Starts the release `kvstrata` daemon (gRPC on a Unix socket, pools on
# --mempool-socket, host tier 4 GiB) and redis-server on a Unix socket, then
# for each block size runs `kvstrata bench` with 100 % reads after populating
# a 1 GiB working set: --mode grpc (inline payloads over the Unix socket),
# --mode shm (pool ranges) and --mode redis (MGET; MSET to populate), all
# with the same keys, batch, concurrency and byte-for-byte verification.
# Then, per block size, a fresh daemon with a 64 MiB host tier and a 4 GiB
# slot file (no promotion on get) serves the working set from disk, for grpc
# and shm. Every run first measures the single-core memcpy ceiling, so the
# shm / memcpy ratio comes from the same run. Prints one markdown table on
# stdout; progress goes to stderr.
#
# Usage (from anywhere; paths are relative to the repository root):
#   cargo build --release --workspace && benches/shm.sh
#
# Environment:
#   KVSTRATA_BIN         kvstrata binary              (target/release/kvstrata; built if missing)
#   SIZES                block sizes                   ("256KiB 1MiB")
#   DURATION / WARMUP    per run                       (10s / 2s)
#   CONCURRENCY / BATCH  client tasks / blocks per RPC (4 / 4)
#   MEMCPY               memcpy ceiling measurement per run (1s)
#   DISK_SLOTS           slot file size of the disk runs   (4GiB)
#   DISK=0               skip the disk-resident runs
#   KEEP_WORKDIR=1       keep the work directory (logs, JSON reports)
# The work directory lies under ${CARGO_TARGET_DIR:-target}/tmp: the disk tier
# opens its slot file with O_DIRECT, which tmpfs refuses.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

LOG_TAG=shm
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

BIN=${KVSTRATA_BIN:-target/release/kvstrata}
SIZES=${SIZES:-"256KiB 1MiB"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-4}
BATCH=${BATCH:-4}
MEMCPY=${MEMCPY:-1s}
DISK_SLOTS=${DISK_SLOTS:-4GiB}
DISK=${DISK:-1}

TMPBASE=${CARGO_TARGET_DIR:-$ROOT/target}/tmp
mkdir -p "$TMPBASE"
WORK=$(mktemp -d "$TMPBASE/kvstrata-shm.XXXXXX")
bench_traps

# ------------------------------------------------------------ prerequisites
need_cmds jq:jq redis-server:redis-server redis-cli:redis-tools
if [[ ! -x $BIN ]]; then
    [[ -z ${KVSTRATA_BIN:-} ]] || die "KVSTRATA_BIN=$BIN is not an executable"
    log "building $BIN"
    cargo build --release --workspace >&2
fi
[[ -x $BIN ]] || die "no $BIN"
"$BIN" serve --help | grep -q -- --mempool-socket ||
    die "$BIN has no --mempool-socket: rebuild it (cargo build --release --workspace)"

# ------------------------------------------------------------------- daemon
SOCK=$WORK/kv.sock
POOLS=$WORK/mempool.sock

# start_daemon LOG ARGS...: a kvstrata daemon on $SOCK and $POOLS; sets KV_PID.
start_daemon() {
    local logf=$1
    shift
    rm -f "$SOCK" "$POOLS"
    start_bg "$logf" "$BIN" serve --tcp-addr "" --uds-path "$SOCK" --mempool-socket "$POOLS" \
        --metrics-addr "" "$@"
    KV_PID=$BG_PID
    # shellcheck disable=SC2329 # called through wait_for
    kv_ready() { [[ -S $SOCK && -S $POOLS ]]; }
    wait_for "$KV_PID" "$logf" kv_ready || die "kvstrata daemon did not start"
}

ROWS=()  # "residency|mode|size|gbps|p50|p99|memcpy"
NOTES=()
FAILED=0
declare -A GBPS=()  # residency,mode,size -> get GB/s

# bench RESIDENCY MODE SIZE ARGS...: one 100 %-read run; adds a row.
bench() {
    local res=$1 mode=$2 size=$3 rc=0
    shift 3
    local out=$WORK/bench-$res-$mode-$size.json
    log "kvstrata bench --mode $mode: $res, $size, $DURATION"
    run_to "$out" "$BIN" bench --mode "$mode" --block-size "$size" --batch "$BATCH" \
        --concurrency "$CONCURRENCY" --read-ratio 1.0 --duration "$DURATION" --warmup "$WARMUP" \
        --memcpy-duration "$MEMCPY" --json "$@" || rc=$?
    if ! jq -e '.get' "$out" >/dev/null 2>&1; then
        log "kvstrata bench --mode $mode failed (exit $rc), no report"
        NOTES+=("$res $mode $size: FAILED (exit $rc), see the logs in $WORK (KEEP_WORKDIR=1)")
        FAILED=1
        return 0
    fi
    ((rc == 0)) || FAILED=1
    local vf misses rejected
    vf=$(jq -r '.verify_failures' "$out")
    if [[ $vf != 0 ]]; then
        NOTES+=("$res $mode $size: **$vf VERIFY FAILURES**: $(jq -r '.first_failure' "$out")")
        FAILED=1
    fi
    misses=$(jq -r '.get.misses' "$out")
    if [[ $misses != 0 ]]; then
        NOTES+=("$res $mode $size: $misses of $(jq -r '.get.blocks' "$out") gets missed")
    fi
    rejected=$(jq -r '.populate.rejected' "$out")
    if [[ $rejected != 0 ]]; then
        NOTES+=("$res $mode $size: $rejected blocks refused (no space) while populating")
    fi
    local gbps
    gbps=$(jq -r '.get.gb_per_s' "$out")
    GBPS[$res,$mode,$size]=$gbps
    ROWS+=("$res|$mode|$size|$gbps|$(fmt0 "$(jq -r '.get.p50_us' "$out")")|$(fmt0 "$(jq -r '.get.p99_us' "$out")")|$(jq -r '.memcpy.gb_per_s // empty' "$out")")
}

# --------------------------------------------------------------- host tier
log "work directory $WORK"
RSOCK=$WORK/redis.sock
start_redis_uds "$RSOCK"
start_daemon "$WORK/kvstrata-host.log" --host-capacity 4GiB

for size in $SIZES; do
    bench host grpc "$size" --addr "unix://$SOCK"
    bench host shm "$size" --addr "unix://$SOCK" --mempool-socket "unix://$POOLS"
    redis-cli -s "$RSOCK" flushall >/dev/null
    bench host redis "$size" --redis-url "unix://$RSOCK"
    redis-cli -s "$RSOCK" flushall >/dev/null
done
stop_pid "$KV_PID"
stop_pid "$REDIS_PID"

# --------------------------------------------------------------- disk tier
if [[ $DISK == 1 ]]; then
    for size in $SIZES; do
        dir=$WORK/disk-$size
        mkdir -p "$dir"
        log "disk-resident: daemon with a 64 MiB host tier and $dir/slots ($DISK_SLOTS)"
        start_daemon "$WORK/kvstrata-disk-$size.log" --host-capacity 64MiB \
            --disk-path "$dir/slots=$DISK_SLOTS" --disk-promote-on-get false
        bench disk grpc "$size" --addr "unix://$SOCK"
        bench disk shm "$size" --addr "unix://$SOCK" --mempool-socket "unix://$POOLS"
        stop_pid "$KV_PID"
        rm -rf "$dir"
    done
fi

# ---------------------------------------------------------------------- table
echo
echo "| residency | mode | block size | GET GB/s | p50 (µs) | p99 (µs) | memcpy GB/s (same run) | ÷ redis GET | ÷ memcpy |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r res mode size gbps p50 p99 memcpy <<<"$row"
    vs_redis="-"
    vs_memcpy="-"
    if [[ $mode != redis ]]; then
        vs_redis=$(ratio "$gbps" "${GBPS[host,redis,$size]:-}")
        vs_memcpy=$(ratio "$gbps" "$memcpy")
    fi
    echo "| $res | $mode | $size | $(fmt2 "$gbps") | $p50 | $p99 | $(fmt2 "${memcpy:-0}") | $vs_redis | $vs_memcpy |"
done
echo
echo "All runs: $CONCURRENCY client tasks, one connection each, $BATCH blocks per request (BatchGet / MGET), 100 % reads for $DURATION after $WARMUP warm-up, 1 GiB working set populated first (BatchPut / MSET), every block read verified byte for byte. Latencies are per request of $BATCH blocks; GB/s counts payload bytes (decimal)."
echo "host: one daemon, --host-capacity 4GiB. disk: a fresh daemon per block size, --host-capacity 64MiB --disk-path DIR/slots=$DISK_SLOTS --disk-promote-on-get false (reads come from the slot file with O_DIRECT). redis: redis-server on a Unix socket, no persistence. ÷ redis GET divides by the host-resident redis row of the same block size."
echo "memcpy: single-core copies of block-size buffers between two working sets larger than the last-level cache, measured for $MEMCPY at the start of each run."
for note in "${NOTES[@]}"; do
    echo "- $note"
done
exit "$FAILED"
