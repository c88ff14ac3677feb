#!/usr/bin/env bash
# The engine verbs on the GPU (issue 20), across devices, through one
# `kvstrata serve` daemon on the GPU (blocks by page ids for GPU engines,
# shared memory for CPU engines).
#
# For each test prompt of the real model (SmolLM2-135M GGUF):
#   CPU prefill (--load-policy never, logits)  -> CPU decode, GPU decode
#   GPU prefill (always: on the CPU's blocks, logits)
#   GPU prefill (never, logits)                -> GPU decode, CPU decode
#   CPU prefill (always: on the GPU's blocks, logits)
#   reference: CPU and GPU decode of their own hand-off against a fresh,
#   empty daemon (nothing cached: the decode recomputes the whole prompt).
# And --synthetic llama3-8b: GPU prefill -> GPU decode in another process,
# against the GPU decode with nothing cached; cached vs full logits.
# Order: prompt p1 (chat), synthetic, p2 (chat), p3 (1,000 document tokens);
# an item is skipped once GDEV_BUDGET_S (120) seconds have passed (~3 min).
# Results under $OUT/gdev/ (summary.txt, summary.json, every run's JSON/stderr).
#
# Env: KVSTRATA_BIN (default /root/k/kvstrata), MODEL (/root/k/model.gguf),
# GDEV_GPU (cuda; "cpu" checks the script's plumbing on a machine without a
# GPU), GDEV_DAEMON_GPU (on), GDEV_SYNTHETIC (llama3-8b; "" skips).
set -u
KV="${KVSTRATA_BIN:-/root/k/kvstrata}"
MODEL="${MODEL:-/root/k/model.gguf}"
GPU="${GDEV_GPU:-cuda}"
DAEMON_GPU="${GDEV_DAEMON_GPU:-on}"
SYNTH="${GDEV_SYNTHETIC-llama3-8b}"
R="${OUT:-/tmp/gdev-out}/gdev"
mkdir -p "$R"
W="$(mktemp -d /tmp/gdev.XXXXXX)"
T0=$(date +%s)
NEW=24

log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$R/steps.log"; }

start_daemon() { # name, extra args...
  local name=$1; shift
  local d="$W/$name"; mkdir -p "$d"
  "$KV" serve --tcp-addr "" --metrics-addr "" --uds-path "$d/kv.sock" \
    --mempool-socket "$d/mem.sock" --ready-file "$d/ready.json" --log-level warn \
    "$@" >"$R/daemon-$name.log" 2>&1 &
  echo $! >"$d/pid"
  for _ in $(seq 1 600); do
    [ -s "$d/ready.json" ] && return 0
    kill -0 "$(cat "$d/pid")" 2>/dev/null || break
    sleep 0.1
  done
  log "daemon $name did not start: $(tail -3 "$R/daemon-$name.log")"
  return 1
}

stop_daemon() { local p; p=$(cat "$W/$1/pid" 2>/dev/null) && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; }

# run NAME DAEMON ARGS...: kvstrata --json against DAEMON; JSON to NAME.json.
run() {
  local name=$1 daemon=$2; shift 2
  local t
  t=$(date +%s%N)
  timeout 120 "$KV" --addr "unix://$W/$daemon/kv.sock" --json "$@" >"$R/$name.json" 2>"$R/$name.err"
  local rc=$?
  log "$name: rc=$rc $((($(date +%s%N) - t) / 1000000)) ms $(tail -1 "$R/$name.err" 2>/dev/null | cut -c1-200)"
  echo "$rc" >"$R/$name.rc"
}

cpu() { echo --device cpu --quiet --model "$MODEL" --offline --mempool-socket "$W/$1/mem.sock"; }
gpu() { echo --device "$GPU" --quiet --model "$MODEL" --offline --kv-region-socket "$W/$1/regions.sock" --mempool-socket "$W/$1/mem.sock"; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/nvidia-smi.txt"
"$KV" --version 2>/dev/null | tee "$R/version.txt"

start_daemon main --gpu "$DAEMON_GPU" --gpu-hbm-bytes 4GiB --host-capacity 2GiB \
  --kv-region-socket "$W/main/regions.sock" || exit 1
log "daemon up"

# Nothing cached: a decode against a fresh daemon recomputes the whole prompt
# (one daemon per decode device and prompt: each decode stores its blocks at
# the end, and prompts share the chat template's first block).
fresh_daemons() { stop_daemons_empty; start_daemon empty-cpu --gpu off --host-capacity 1GiB && start_daemon empty-gpu --gpu off --host-capacity 1GiB; }
stop_daemons_empty() { stop_daemon empty-cpu; stop_daemon empty-gpu; rm -rf "$W/empty-cpu" "$W/empty-gpu"; }

cat >"$W/p1.txt" <<'EOF'
Name three colours of the rainbow, say which one has the longest wavelength, and explain in one sentence why the sky looks blue at noon but red at sunset.
EOF
cat >"$W/p2.txt" <<'EOF'
Explain in two sentences why a key-value cache makes the second turn of a conversation faster than the first, and what it stores per token.
EOF
prompt_args() {
  case $1 in
    p3) echo --prompt-tokens 1000 ;;
    *) echo --prompt-file "$W/$1.txt" ;;
  esac
}

real_prompt() { # p
  local p=$1 pa
  pa=$(prompt_args "$p")
  # shellcheck disable=SC2046,SC2086
  {
    run "$p-cpu-prefill" main prefill $(cpu main) $pa --load-policy never --handoff "$W/$p-cpu.json" --logits "$W/$p-cpu-full.f32"
    run "$p-cpu-to-cpu" main decode $(cpu main) --handoff "$W/$p-cpu.json" --max-tokens $NEW
    run "$p-cpu-to-gpu" main decode $(gpu main) --handoff "$W/$p-cpu.json" --max-tokens $NEW
    run "$p-gpu-prefill-on-cpu-kv" main prefill $(gpu main) $pa --load-policy always --logits "$W/$p-gpu-on-cpu-kv.f32"
    run "$p-gpu-prefill" main prefill $(gpu main) $pa --load-policy never --handoff "$W/$p-gpu.json" --logits "$W/$p-gpu-full.f32"
    run "$p-gpu-to-gpu" main decode $(gpu main) --handoff "$W/$p-gpu.json" --max-tokens $NEW
    run "$p-gpu-to-cpu" main decode $(cpu main) --handoff "$W/$p-gpu.json" --max-tokens $NEW
    run "$p-cpu-prefill-on-gpu-kv" main prefill $(cpu main) $pa --load-policy always --logits "$W/$p-cpu-on-gpu-kv.f32"
    fresh_daemons
    run "$p-cpu-recompute" empty-cpu decode --device cpu --quiet --model "$MODEL" --offline --handoff "$W/$p-cpu.json" --max-tokens $NEW
    run "$p-gpu-recompute" empty-gpu decode --device "$GPU" --quiet --model "$MODEL" --offline --handoff "$W/$p-gpu.json" --max-tokens $NEW
  }
}

synthetic() {
  local s="synth-$SYNTH"
  local sa="--device $GPU --quiet --synthetic $SYNTH --kv-region-socket $W/main/regions.sock --mempool-socket $W/main/mem.sock"
  # shellcheck disable=SC2086
  {
    run "$s-prefill" main prefill $sa --prompt-tokens 2000 --load-policy never --handoff "$W/$s.json" --logits "$W/$s-full.f32"
    run "$s-prefill-cached" main prefill $sa --prompt-tokens 2000 --load-policy always --logits "$W/$s-cached.f32"
    run "$s-gpu-to-gpu" main decode $sa --handoff "$W/$s.json" --max-tokens 16
    fresh_daemons
    run "$s-gpu-recompute" empty-gpu decode --device "$GPU" --quiet --synthetic "$SYNTH" --handoff "$W/$s.json" --max-tokens 16
  }
}

# p1 and the synthetic model first; later prompts only while time is left.
DONE=()
for item in p1 synth p2 p3; do
  if [ "$item" != p1 ] && [ $(($(date +%s) - T0)) -gt "${GDEV_BUDGET_S:-120}" ]; then
    log "skipping $item: over ${GDEV_BUDGET_S:-120} s"
    continue
  fi
  case $item in
    synth) [ -n "$SYNTH" ] && synthetic ;;
    *) real_prompt "$item"; DONE+=("$item") ;;
  esac
done
stop_daemon main
stop_daemons_empty
log "runs done"

python3 - "$R" "$W" "${DONE[*]}" "$SYNTH" <<'EOF' | tee "$R/summary.txt"
import array, json, os, sys
R, W, prompts, synth = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4]
out = {"prompts": {}, "failures": []}

def j(name):
    try:
        with open(os.path.join(R, name + ".json")) as f:
            return json.load(f)
    except Exception as e:
        out["failures"].append(f"{name}: {e}")
        return None

def logits(name):
    try:
        a = array.array("f")
        with open(os.path.join(W, name + ".f32"), "rb") as f:
            a.frombytes(f.read())
        return a
    except Exception as e:
        out["failures"].append(f"{name}.f32: {e}")
        return None

def diff(a, b):
    if a is None or b is None or len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b))

def argmax(a):
    return None if a is None else max(range(len(a)), key=lambda i: (a[i], -i))

def common(a, b):
    if a is None or b is None:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

def toks(name):
    v = j(name)
    if v is None:
        return None
    if v.get("loaded_tokens") != 0:
        out["failures"].append(f"{name}: loaded {v.get('loaded_tokens')} tokens, not a recompute")
    return v.get("tokens")

print("gdev: engine verbs across devices (one daemon; GPU engines by page ids)")
for p in prompts:
    pre_c, pre_g = j(f"{p}-cpu-prefill"), j(f"{p}-gpu-prefill")
    on_c, on_g = j(f"{p}-gpu-prefill-on-cpu-kv"), j(f"{p}-cpu-prefill-on-gpu-kv")
    ref_c, ref_g = toks(f"{p}-cpu-recompute"), toks(f"{p}-gpu-recompute")
    runs = {k: j(f"{p}-{k}") for k in ["cpu-to-cpu", "cpu-to-gpu", "gpu-to-gpu", "gpu-to-cpu"]}
    lc, lg = logits(f"{p}-cpu-full"), logits(f"{p}-gpu-full")
    loc, log_ = logits(f"{p}-gpu-on-cpu-kv"), logits(f"{p}-cpu-on-gpu-kv")
    r = {
        "prompt_tokens": pre_c and pre_c["prompt_tokens"],
        "first_token": {"cpu": pre_c and pre_c["handoff"]["first_token"], "gpu": pre_g and pre_g["handoff"]["first_token"]},
        "prefill": {k: v and {f: v.get(f) for f in ["device", "kv_path", "reused_tokens", "ttft_ms", "load_ms", "stored_blocks"]}
                    for k, v in [("cpu", pre_c), ("gpu", pre_g), ("gpu_on_cpu_kv", on_c), ("cpu_on_gpu_kv", on_g)]},
        "logits_max_abs": {
            "gpu_vs_cpu_full_recompute": diff(lg, lc),
            "gpu_on_cpu_kv_vs_gpu_full": diff(loc, lg),
            "cpu_on_gpu_kv_vs_cpu_full": diff(log_, lc),
            "gpu_on_cpu_kv_vs_cpu_full": diff(loc, lc),
        },
        "logits_argmax": {"cpu": argmax(lc), "gpu": argmax(lg), "gpu_on_cpu_kv": argmax(loc), "cpu_on_gpu_kv": argmax(log_)},
        "decode": {},
        "recompute_tokens": {"cpu": ref_c, "gpu": ref_g},
        "cpu_vs_gpu_recompute_common_prefix": common(ref_c, ref_g),
    }
    for k, v in runs.items():
        if v is None:
            continue
        dec = k.split("-to-")[1]
        ref = ref_c if dec == "cpu" else ref_g
        r["decode"][k] = {
            "device": v["device"], "kv_path": v["kv_path"], "loaded_tokens": v["loaded_tokens"],
            "prompt_next_token": v["prompt_next_token"], "tokens": v["tokens"],
            "same_as_decode_device_recompute": v["tokens"] == ref,
            "common_prefix_with_recompute": common(v["tokens"], ref),
            "load_ms": v["load_ms"], "tokens_per_second": v["tokens_per_second"],
        }
    out["prompts"][p] = r
    print(f"\n{p}: {r['prompt_tokens']} prompt tokens; first token cpu {r['first_token']['cpu']} gpu {r['first_token']['gpu']}")
    for k, v in r["prefill"].items():
        if v:
            print(f"  prefill {k:14} {v['device']:7} {v['kv_path']:13} reused {v['reused_tokens']:5} stored {v['stored_blocks']:4} TTFT {v['ttft_ms']:8.1f} ms load {v['load_ms']:6.1f} ms")
    for k, v in r["logits_max_abs"].items():
        print(f"  logits max |diff| {k:28} {v if v is None else round(v, 5)}")
    print(f"  logits argmax {r['logits_argmax']}")
    for k, v in r["decode"].items():
        print(f"  decode {k:10} {v['kv_path']:13} loaded {v['loaded_tokens']:5} next {v['prompt_next_token']:6} "
              f"same as {k.split('-to-')[1]} recompute: {v['same_as_decode_device_recompute']} "
              f"(common {v['common_prefix_with_recompute']}/{len(v['tokens'])}) load {v['load_ms']:.1f} ms {v['tokens_per_second']:.0f} tok/s")
    print(f"  cpu vs gpu recompute: common prefix {r['cpu_vs_gpu_recompute_common_prefix']} of {len(ref_c or [])}")

if synth and os.path.exists(os.path.join(R, f"synth-{synth}-prefill.json")):
    s = f"synth-{synth}"
    pf, pc = j(f"{s}-prefill"), j(f"{s}-prefill-cached")
    d, ref = j(f"{s}-gpu-to-gpu"), toks(f"{s}-gpu-recompute")
    lf, lcached = logits(f"{s}-full"), logits(f"{s}-cached")
    r = {
        "prefill_full": pf and {f: pf.get(f) for f in ["device", "kv_path", "prompt_tokens", "ttft_ms", "store_ms", "stored_blocks"]},
        "prefill_cached": pc and {f: pc.get(f) for f in ["device", "kv_path", "reused_tokens", "ttft_ms", "load_ms", "compute_ms"]},
        "first_token_full_vs_cached": pf and pc and [pf["handoff"]["first_token"], pc["handoff"]["first_token"]],
        "logits_max_abs_cached_vs_full": diff(lcached, lf),
        "decode": d and {f: d.get(f) for f in ["device", "kv_path", "loaded_tokens", "prompt_next_token", "tokens", "load_ms", "tokens_per_second"]},
        "recompute_tokens": ref,
        "same_as_recompute": d is not None and d["tokens"] == ref,
        "common_prefix_with_recompute": common(d and d["tokens"], ref),
    }
    out["synthetic"] = r
    print(f"\n{s}: prefill {json.dumps(r['prefill_full'])}")
    print(f"  cached prefill {json.dumps(r['prefill_cached'])}")
    print(f"  first token full/cached {r['first_token_full_vs_cached']}; logits max |diff| cached vs full {r['logits_max_abs_cached_vs_full']}")
    if d:
        print(f"  decode in another process: {d['kv_path']} loaded {d['loaded_tokens']} next {d['prompt_next_token']} "
              f"load {d['load_ms']:.1f} ms {d['tokens_per_second']:.0f} tok/s; same tokens as the recompute: {r['same_as_recompute']} "
              f"(common {r['common_prefix_with_recompute']}/{len(d['tokens'])})")

bad = [f for f in os.listdir(R) if f.endswith(".rc") and open(os.path.join(R, f)).read().strip() != "0"]
out["failed_runs"] = sorted(b[:-3] for b in bad)
print("\nfailed runs:", out["failed_runs"] or "none", "| parse failures:", out["failures"] or "none")
with open(os.path.join(R, "summary.json"), "w") as f:
    json.dump(out, f, indent=1)
EOF
log "done"
rm -rf "$W"
