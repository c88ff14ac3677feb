#!/usr/bin/env bash
# kvstrata disk tier vs. fio on the same filesystem, block size and queue depth.
#
# For each block size: fio writes a fresh file of SIZE bytes sequentially
# (--rw=write) and then reads it back in random order (--rw=randread), both
# --direct=1 --ioengine=io_uring --iodepth=QD, one job; then
# `kvstrata bench-disk` does the same with the disk tier: it creates a fresh
# (fallocated) slot file, writes SIZE bytes of distinct blocks and reads them
# all back in a shuffled order, checking every byte. It runs once per entry
# of CALLERS: with C callers, each put_many / get_many call carries QD/C
# blocks, so at most QD transfers are in flight, as in fio (C=1: one caller,
# QD blocks per call; each call starts with an empty queue and ends with its
# slowest transfer). The CALLERS entry "s" is one streaming caller instead:
# `bench-disk --stream`, one put_stream / get_stream call over the whole
# working set that keeps up to QD transfers in flight and starts the next
# as each completes (like fio's iodepth; never more than QD). Both write to freshly allocated space (fio's
# default fallocate=native and the tier's fallocate both leave unwritten
# extents, so both pay the conversion on first write); neither overwrites.
# Prints one markdown table on stdout; progress goes to stderr.
#
# Usage (from anywhere; paths are relative to the repository root):
#   cargo build --release --workspace && benches/disk.sh
# On a machine without Rust, jq or network, with copied binaries:
#   FIO=/path/to/fio KVSTRATA=/path/to/kvstrata DIR=/mnt/nvme/x benches/disk.sh
# (needs only bash, coreutils and awk; fio must have the io_uring engine).
#
# Environment:
#   KVSTRATA      kvstrata binary                    (target/release/kvstrata)
#   FIO           fio binary                         (fio from PATH; installed
#                 with apt-get when missing and FIO is not set)
#   DIR           directory on the filesystem under test; a fresh subdirectory
#                 is made there and removed at the end (target/; not /tmp,
#                 which may be tmpfs and refuse O_DIRECT)
#   BLOCK_SIZES   block sizes, fio syntax            ("256K 1M")
#   QD            queue depth / blocks per call      (16)
#   SIZE          bytes written and read per run     (4G)
#   CALLERS       kvstrata caller counts, each run with QD/C blocks per call,
#                 or "s": one caller streaming with QD in flight
#                 (fio always runs one job at iodepth QD)   ("1 2")
#   REPEAT        runs per block size, alternating fio and kvstrata; with more
#                 than one, a median row per block size follows     (3)
#   KVSTRATA_ARGS extra flags for every bench-disk run, e.g. "--fixed-buffers false"
#                 (with KVSTRATA_XXH3_SIMD=0 in the environment as well, the tier
#                 runs its data path as before fixed buffers and the AVX2 xxh3)
#   KEEP_WORKDIR=1  keep the work directory's JSON reports (data files are removed)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BIN=${KVSTRATA:-target/release/kvstrata}
FIO_BIN=${FIO:-}
read -r -a KV_ARGS <<<"${KVSTRATA_ARGS:-}"
BLOCK_SIZES=${BLOCK_SIZES:-"256K 1M"}
QD=${QD:-16}
SIZE=${SIZE:-4G}
CALLERS=${CALLERS:-"1 2"}
REPEAT=${REPEAT:-3}
BASE=${DIR:-$ROOT/target}

LOG_TAG=disk
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

mkdir -p "$BASE"
WORK=$(mktemp -d "$BASE/kvstrata-disk.XXXXXX")
# Data files go even when KEEP_WORKDIR=1 keeps the reports.
# shellcheck disable=SC2329 # called by bench_cleanup
bench_cleanup_hook() { rm -f "$WORK"/*.dat; }
bench_traps

# ------------------------------------------------------------ prerequisites
if [[ -z $FIO_BIN ]]; then
    need_cmds fio:fio
    FIO_BIN=$(command -v fio)
fi
[[ -x $FIO_BIN ]] || die "FIO=$FIO_BIN is not an executable file"
[[ -x $BIN ]] || die "no $BIN: build it with 'cargo build --release --workspace' or set KVSTRATA"
FIO_VERSION=$("$FIO_BIN" --version 2>/dev/null || echo "fio ?")

# fio_run NAME RW BS OUT: one fio job on $WORK/fio.dat; JSON report in OUT.
fio_run() {
    local name=$1 rw=$2 bs=$3 out=$4
    run_to "$out" "$FIO_BIN" --name="$name" --filename="$WORK/fio.dat" --size="$SIZE" \
        --rw="$rw" --bs="$bs" --iodepth="$QD" --direct=1 --ioengine=io_uring \
        --numjobs=1 --output-format=json ||
        die "fio $rw failed: $(cat "$out")"
}

# The reports are read with awk (no jq needed): fio's and kvstrata's JSON
# are pretty-printed, one key per line.

# fio_gbps OUT DIR: decimal GB/s of the job's read or write side (the first
# io_bytes and runtime after the "read" / "write" key: that object's own).
fio_gbps() {
    awk -v d="$2" '
        index($0, "\"" d "\" : {") { s = 1 }
        s && !b && $1 == "\"io_bytes\"" { b = $3 + 0 }
        s && !r && $1 == "\"runtime\"" { r = $3 + 0 }
        END { if (r > 0) printf "%.6f\n", b / (r / 1000) / 1e9; else print "0" }' "$1"
}

# kv_get OUT SECTION KEY: a value of kvstrata's JSON report, at the top level
# (SECTION "") or inside the top-level object SECTION ("write", "read").
kv_get() {
    awk -v sec="$2" -v key="$3" '
        sec != "" && index($0, "  \"" sec "\": {") == 1 { ins = 1; next }
        ins && /^  }/ { ins = 0 }
        (sec == "" || ins) && index($0, "\"" key "\": ") {
            v = $0; sub(/^[^:]*: */, "", v); sub(/,$/, "", v); gsub(/"/, "", v)
            print v; exit
        }' "$1"
}

# ---------------------------------------------------------------------- runs
for c in $CALLERS; do
    [[ $c == s ]] && continue
    if ! [[ $c =~ ^[0-9]+$ ]] || ((c < 1 || QD % c != 0)); then
        die "CALLERS entry $c: a caller count that divides QD=$QD, or s"
    fi
done
# shape C: how a CALLERS entry's row is labelled.
shape() {
    if [[ $1 == s ]]; then
        echo "1 streaming, $QD in flight"
    else
        echo "$1 × $((QD / $1))"
    fi
}
ROWS=() # "size|callers|per_call|fio_w|kv_w|fio_r|kv_r|w_p50|w_p99|r_p50|r_p99"
FAILED=0
engine="?"
fixed="?"
hash="?"
FS=$(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')
log "work directory $WORK ($FS); $FIO_VERSION ($FIO_BIN); $BIN"
for rep in $(seq 1 "$REPEAT"); do
    for bs in $BLOCK_SIZES; do
        tag=$bs-$rep
        rm -f "$WORK/fio.dat"
        log "fio: write then randread, bs $bs, QD $QD, $SIZE (run $rep)"
        fio_run write write "$bs" "$WORK/fio-write-$tag.json"
        fio_run randread randread "$bs" "$WORK/fio-read-$tag.json"
        rm -f "$WORK/fio.dat"
        fw=$(fio_gbps "$WORK/fio-write-$tag.json" write)
        fr=$(fio_gbps "$WORK/fio-read-$tag.json" read)

        for c in $CALLERS; do
            if [[ $c == s ]]; then
                per=$QD
                mode=(--threads 1 --stream)
                log "kvstrata bench-disk: block $bs, 1 caller streaming with $QD in flight, $SIZE (run $rep)"
            else
                per=$((QD / c))
                mode=(--threads "$c")
                log "kvstrata bench-disk: block $bs, $c caller(s) x $per per call, $SIZE (run $rep)"
            fi
            out=$WORK/kvstrata-$tag-$c.json
            rc=0
            run_to "$out" "$BIN" bench-disk --dir "$WORK" --block-size "$bs" --total "$SIZE" \
                --queue-depth "$per" "${mode[@]}" "${KV_ARGS[@]}" --json || rc=$?
            if ! grep -q '^  "read": {' "$out"; then
                die "kvstrata bench-disk failed (exit $rc), no report"
            fi
            if ((rc != 0)); then
                log "kvstrata bench-disk: exit $rc (verification failed?)"
                FAILED=1
            fi
            engine=$(kv_get "$out" "" engine)
            fixed=$(kv_get "$out" "" fixed_buffers)
            hash=$(kv_get "$out" "" checksum)
            ms() { awk -v x="$(kv_get "$out" "$1" "$2")" 'BEGIN { print x / 1000 }'; }
            ROWS+=("$bs|$c|$per|$fw|$(kv_get "$out" write gb_per_s)|$fr|$(kv_get "$out" read gb_per_s)|$(ms write p50_us)|$(ms write p99_us)|$(ms read p50_us)|$(ms read p99_us)")
        done
    done
done

# ---------------------------------------------------------------------- table
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo
echo "| block size | kvstrata callers × blocks per call, or streaming | run | fio write GB/s | kvstrata write GB/s | write ratio | fio read GB/s | kvstrata read GB/s | read ratio | kvstrata p50 / p99 per call, write (ms) | read (ms) |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
declare -A COL=()
declare -A RUN=()
for row in "${ROWS[@]}"; do
    IFS='|' read -r bs c per fw kw fr kr w50 w99 r50 r99 <<<"$row"
    k=$bs,$c
    RUN[$k]=$((${RUN[$k]:-0} + 1))
    if [[ $c == s ]]; then
        lat="– (one call) | –"
    else
        lat="$(fmt2 "$w50") / $(fmt2 "$w99") | $(fmt2 "$r50") / $(fmt2 "$r99")"
    fi
    echo "| $bs | $(shape "$c") | ${RUN[$k]} | $(fmt2 "$fw") | $(fmt2 "$kw") | $(ratio "$kw" "$fw") | $(fmt2 "$fr") | $(fmt2 "$kr") | $(ratio "$kr" "$fr") | $lat |"
    COL[$k,fw]+=" $fw"
    COL[$k,kw]+=" $kw"
    COL[$k,fr]+=" $fr"
    COL[$k,kr]+=" $kr"
    COL[$k,wr]+=" $(ratio "$kw" "$fw")"
    COL[$k,rr]+=" $(ratio "$kr" "$fr")"
done
if ((REPEAT > 1)); then
    for bs in $BLOCK_SIZES; do
        for c in $CALLERS; do
            k=$bs,$c
            m() { median <<<"${COL[$k,$1]}"; }
            echo "| $bs | $(shape "$c") | **median** | $(fmt2 "$(m fw)") | $(fmt2 "$(m kw)") | **$(fmt2 "$(m wr)")** | $(fmt2 "$(m fr)") | $(fmt2 "$(m kr)") | **$(fmt2 "$(m rr)")** | | |"
        done
    done
fi
echo
echo "machine: $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), load average $(cut -d' ' -f1-3 /proc/loadavg); filesystem $FS."
echo "fio: $FIO_VERSION, --direct=1 --ioengine=io_uring --iodepth=$QD --numjobs=1 --size=$SIZE, --rw=write on a fresh file, then --rw=randread of it."
echo "kvstrata: bench-disk ${KVSTRATA_ARGS:+$KVSTRATA_ARGS }(engine $engine, fixed buffers ${fixed:-n/a}, checksum ${hash:-n/a}), C callers × $QD/C blocks per put_many / get_many call (at most $QD transfers in flight, as fio; each call drains the queue), or (\"1 streaming\") one caller whose single put_stream / get_stream call keeps up to $QD transfers in flight, starting the next as each completes (as fio's iodepth, never more), $SIZE of distinct blocks into a fresh slot file, then every block read once in shuffled order and checked byte for byte."
echo "GB/s: payload bytes per second, decimal (the tier also moves a 4 KiB header per block). Each run is one fio pair, then kvstrata per caller count; ratios are kvstrata / fio of the same run; median rows take the median of each column (ratios: of the per-run ratios)."
exit "$FAILED"
