#!/usr/bin/env bash
# kvstrata vs. redis on one machine, loopback only.
#
# Starts the release `kvstrata` daemon (TCP on 127.0.0.1 and a Unix socket),
# runs `kvstrata bench` for each block size over TCP and over UDS (100 % reads
# after population, then a 50/50 get/put mix), then starts `redis-server` on a
# Unix socket and runs `redis-benchmark -t get,set` with values of the same
# sizes. Prints one markdown table on stdout; progress goes to stderr.
#
# Usage (from anywhere; paths are relative to the repository root):
#   cargo build --release -p kvstrata-cli && benches/loopback.sh
#
# Environment:
#   KVSTRATA_BIN         kvstrata binary            (target/release/kvstrata; built if missing)
#   KVSTRATA_SERVE_ARGS  extra `kvstrata serve` flags (none)
#   SIZES                block sizes                 ("256KiB 1MiB")
#   DURATION / WARMUP    per kvstrata run            (10s / 2s)
#   CONCURRENCY / BATCH  client tasks / blocks per RPC (4 / 4)
#   REDIS_BYTES          bytes each redis-benchmark test moves at least (5000000000)
#   KEEP_WORKDIR=1       keep the temporary directory (logs, JSON reports)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BIN=${KVSTRATA_BIN:-target/release/kvstrata}
read -r -a SERVE_EXTRA <<<"${KVSTRATA_SERVE_ARGS:-}"
SIZES=${SIZES:-"256KiB 1MiB"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-4}
BATCH=${BATCH:-4}
REDIS_BYTES=${REDIS_BYTES:-5000000000}
WORKING_SET_BYTES=$((1 << 30)) # the bench's default working set; redis gets the same

LOG_TAG=loopback
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvstrata-loopback.XXXXXX")
bench_traps

# ------------------------------------------------------------ prerequisites
need_cmds jq:jq redis-server:redis-server redis-benchmark:redis-tools

if [[ ! -x $BIN ]]; then
    [[ -z ${KVSTRATA_BIN:-} ]] || die "KVSTRATA_BIN=$BIN is not an executable"
    log "building $BIN"
    cargo build --release -p kvstrata-cli --bin kvstrata >&2
fi
[[ -x $BIN ]] || die "no $BIN"

# ------------------------------------------------------------------ kvstrata
PORT=$(free_port) || die "no free TCP port"
SOCK=$WORK/kv.sock
log "starting kvstrata daemon (tcp 127.0.0.1:$PORT, uds $SOCK)"
start_bg "$WORK/kvstrata.log" "$BIN" serve --tcp-addr "127.0.0.1:$PORT" --uds-path "$SOCK" \
    --metrics-addr 127.0.0.1:0 --host-capacity 4GiB "${SERVE_EXTRA[@]}"
KV_PID=$BG_PID
# shellcheck disable=SC2329 # called through wait_for
kv_ready() { [[ -S $SOCK ]] && tcp_open "$PORT"; }
wait_for "$KV_PID" "$WORK/kvstrata.log" kv_ready || die "kvstrata daemon did not start"

declare -A ADDR=([tcp]="http://127.0.0.1:$PORT" [uds]="unix://$SOCK")
ROWS=()  # "kind|transport|size|gbps|p50|p99" ; ratios are filled in at the end
NOTES=()
FAILED=0

for size in $SIZES; do
    for transport in tcp uds; do
        for ratio in 1.0 0.5; do
            out=$WORK/bench-$transport-$size-$ratio.json
            log "kvstrata bench: $transport, $size, read ratio $ratio, $DURATION"
            rc=0
            run_to "$out" "$BIN" bench --mode grpc --addr "${ADDR[$transport]}" --block-size "$size" \
                --batch "$BATCH" --concurrency "$CONCURRENCY" --read-ratio "$ratio" \
                --duration "$DURATION" --warmup "$WARMUP" --json || rc=$?
            if ! jq -e '.get' "$out" >/dev/null 2>&1; then
                log "kvstrata bench failed (exit $rc), no report"
                NOTES+=("kvstrata $transport $size read $ratio: FAILED (exit $rc), see the daemon log")
                FAILED=1
                continue
            fi
            if ((rc != 0)); then
                FAILED=1
            fi
            vf=$(jq -r '.verify_failures' "$out")
            if [[ $vf != 0 ]]; then
                NOTES+=("kvstrata $transport $size read $ratio: **$vf VERIFY FAILURES**: $(jq -r '.first_failure' "$out")")
                FAILED=1
            fi
            misses=$(jq -r '.get.misses' "$out")
            if [[ $misses != 0 ]]; then
                NOTES+=("kvstrata $transport $size read $ratio: $misses of $(jq -r '.get.blocks' "$out") gets missed")
            fi
            if [[ $ratio == 1.0 ]]; then
                ROWS+=("kvstrata get (read 1.0)|$transport|$size|$(jq -r '.get.gb_per_s' "$out")|$(fmt0 "$(jq -r '.get.p50_us' "$out")")|$(fmt0 "$(jq -r '.get.p99_us' "$out")")")
            else
                ROWS+=("kvstrata get+put (read 0.5)|$transport|$size|$(jq -r '.total_gb_per_s' "$out")|$(fmt0 "$(jq -r '.get.p50_us' "$out")") / $(fmt0 "$(jq -r '.put.p50_us' "$out")")|$(fmt0 "$(jq -r '.get.p99_us' "$out")") / $(fmt0 "$(jq -r '.put.p99_us' "$out")")")
            fi
        done
    done
done

stop_pid "$KV_PID"

# --------------------------------------------------------------------- redis
RSOCK=$WORK/redis.sock
start_redis_uds "$RSOCK"

declare -A REDIS_GET_GBPS=()
for size in $SIZES; do
    bytes=$(to_bytes "$size")
    keys=$((WORKING_SET_BYTES / bytes))
    ((keys >= 1)) || keys=1
    # Enough requests to move REDIS_BYTES, and at least 10 per key so that
    # (nearly) every GET finds a value the SET test stored.
    n=$((REDIS_BYTES / bytes))
    ((n >= 10 * keys)) || n=$((10 * keys))
    redis-cli -s "$RSOCK" flushall >/dev/null
    log "redis-benchmark: -d $bytes -c $CONCURRENCY -n $n -r $keys"
    csv=$WORK/redis-$size.csv
    run_to "$csv" redis-benchmark -s "$RSOCK" -t set,get -d "$bytes" -c "$CONCURRENCY" \
        -n "$n" -r "$keys" --csv || die "redis-benchmark failed: $(cat "$csv")"
    for test in SET GET; do
        # Redis 7 columns: test, rps, avg, min, p50, p95, p99, max (latencies in ms).
        line=$(awk -F, -v t="\"$test\"" '$1 == t { gsub(/"/, ""); print; exit }' "$csv")
        [[ -n $line ]] || die "no $test line in redis-benchmark output: $(cat "$csv")"
        IFS=, read -r _ rps _ _ p50 _ p99 _ <<<"$line"
        gbps=$(awk -v r="$rps" -v b="$bytes" 'BEGIN { printf "%.6f", r * b / 1e9 }')
        ROWS+=("redis $test|uds|$size|$gbps|$(ms_to_us "${p50:-}")|$(ms_to_us "${p99:-}")")
        if [[ $test == GET ]]; then
            REDIS_GET_GBPS[$size]=$gbps
        fi
    done
done

# ---------------------------------------------------------------------- table
echo
echo "| mode | transport | block size | GB/s | p50 (µs) | p99 (µs) | kvstrata/redis GET |"
echo "|---|---|---|---:|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r kind transport size gbps p50 p99 <<<"$row"
    ratio="-"
    if [[ $kind == "kvstrata get (read 1.0)" && -n ${REDIS_GET_GBPS[$size]:-} ]]; then
        ratio=$(awk -v a="$gbps" -v b="${REDIS_GET_GBPS[$size]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    fi
    echo "| $kind | $transport | $size | $(fmt2 "$gbps") | $p50 | $p99 | $ratio |"
done
echo
echo "kvstrata: $CONCURRENCY client tasks, one connection each, $BATCH blocks per RPC, $DURATION measured after $WARMUP warm-up, 1 GiB working set, every read verified; latencies are per RPC (get / put for the mix), GB/s counts payload bytes (decimal)."
echo "redis: redis-benchmark, $CONCURRENCY clients, one value per request, 1 GiB keyspace; GB/s = requests/s × value size."
for note in "${NOTES[@]}"; do
    echo "- $note"
done
exit "$FAILED"
