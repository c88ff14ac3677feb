# shellcheck shell=bash
# Helpers shared by the benchmark scripts (loopback.sh, disk.sh, shm.sh);
# sourced, not run.
#
# The sourcing script sets LOG_TAG (prefix of its progress lines) and WORK
# (its work directory) and then calls bench_traps. At exit every process in
# PIDS and the running run_to command are stopped, bench_cleanup_hook runs if
# the script defines it, and WORK is removed unless KEEP_WORKDIR=1.

PIDS=()  # background processes stopped at exit
CHILD=   # the foreground command of run_to, if any

log() { printf '[%s] %s\n' "${LOG_TAG:-bench}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- processes
stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in $CHILD "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    if declare -F bench_cleanup_hook >/dev/null; then
        bench_cleanup_hook || true
    fi
    if [[ -n ${WORK:-} && -d $WORK ]]; then
        if [[ ${KEEP_WORKDIR:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

bench_traps() {
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# start_bg LOG CMD...: starts CMD in the background (output to LOG), adds it to
# PIDS (stopped at exit) and sets BG_PID.
start_bg() {
    local logf=$1
    shift
    "$@" >"$logf" 2>&1 &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

# wait_for PID LOG CHECK...: waits up to 30 s until CHECK succeeds; fails if PID dies.
wait_for() {
    local pid=$1 logf=$2
    shift 2
    for _ in $(seq 1 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited; its log:"
            cat "$logf" >&2 || true
            return 1
        fi
        if "$@" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "timed out waiting for: $*; log:"
    cat "$logf" >&2 || true
    return 1
}

# run_to OUT CMD...: runs CMD with stdout to OUT in the background and waits
# for it, so that a signal to the script is handled at once (bash runs traps
# only between foreground commands) and the child is stopped by cleanup.
run_to() {
    local out=$1 rc=0
    shift
    "$@" >"$out" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=
    return "$rc"
}

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1"); }

# start_redis_uds SOCK: redis-server on a Unix socket only (no TCP, no
# persistence), log in $WORK/redis.log; sets REDIS_PID.
start_redis_uds() {
    local sock=$1
    log "starting redis-server (uds $sock)"
    start_bg "$WORK/redis.log" redis-server --port 0 --unixsocket "$sock" --unixsocketperm 700 \
        --save "" --appendonly no --dir "$WORK" --daemonize no --protected-mode no
    REDIS_PID=$BG_PID
    # shellcheck disable=SC2329 # called through wait_for
    redis_ready() { [[ -S $1 ]] && redis-cli -s "$1" ping | grep -q PONG; }
    wait_for "$REDIS_PID" "$WORK/redis.log" redis_ready "$sock" || die "redis-server did not start"
}

# ------------------------------------------------------------------ numbers
# Bytes of a size such as 256KiB, 1MiB, 64KB, 4096.
to_bytes() {
    local s=$1 n u
    if [[ $s =~ ^([0-9]+)[[:space:]]*([A-Za-z]*)$ ]]; then
        n=${BASH_REMATCH[1]}
        u=${BASH_REMATCH[2],,}
    else
        die "cannot read size $s"
    fi
    case $u in
    "" | b) echo "$n" ;;
    k | kb) echo $((n * 1000)) ;;
    ki | kib) echo $((n << 10)) ;;
    m | mb) echo $((n * 1000000)) ;;
    mi | mib) echo $((n << 20)) ;;
    g | gb) echo $((n * 1000000000)) ;;
    gi | gib) echo $((n << 30)) ;;
    *) die "unknown unit in $s" ;;
    esac
}

fmt2() { awk -v x="$1" 'BEGIN { printf "%.2f", x }'; }
fmt0() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }
# a / b with two decimals; "-" when b is 0 or either is missing.
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "-" }'; }
# Milliseconds (as redis-benchmark prints them) to whole microseconds; "-" when absent.
ms_to_us() { if [[ -n $1 ]]; then awk -v x="$1" 'BEGIN { printf "%.0f", x * 1000 }'; else echo "-"; fi; }

# ------------------------------------------------------------- packages
install_pkgs() {
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || die "need root or sudo to install: $*"
        sudo=(sudo)
    fi
    log "installing $* with apt-get"
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >&2
}

# need_cmds CMD:PACKAGE...: installs the Debian packages of missing commands.
need_cmds() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if ((${#missing[@]})); then
        install_pkgs "${missing[@]}"
    fi
}
