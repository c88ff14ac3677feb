"""kvstrata.sglang.KvstrataStorage loaded through SGLang's own `dynamic` backend factory
(released sglang 0.5.23) and driven with SGLang's own host pool class
(MHATokenToKVPoolHost, on the CPU), against the real daemon.

Runs in the engines venv (tests/python/engines_venv.sh)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from sglang.srt.mem_cache.device_pool_info import KVBuffers, KVBufferLayout, MHABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str

import kvstrata
from kvstrata.sglang import KvstrataStorage
from kvdaemon import Daemon, workdir

L, H, D, PS, DEVICE_TOKENS = 3, 2, 8, 4, 64
LAYOUTS = ["layer_first", "page_first", "page_first_direct"]


def host_pool(layout: str, allocator: str) -> MHATokenToKVPoolHost:
    """SGLang's own MHA host pool, on the CPU, over CPU 'device' buffers."""
    k = tuple(torch.zeros(DEVICE_TOKENS, H, D, dtype=torch.bfloat16) for _ in range(L))
    v = tuple(torch.zeros(DEVICE_TOKENS, H, D, dtype=torch.bfloat16) for _ in range(L))
    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=torch.tensor([t.data_ptr() for t in k], dtype=torch.uint64),
                          v_data_ptrs=torch.tensor([t.data_ptr() for t in v], dtype=torch.uint64),
                          layout=KVBufferLayout.NHD),
        page_size=PS, head_num=H, head_dim=D, v_head_dim=D, dtype=torch.bfloat16, device=torch.device("cpu"))
    return MHATokenToKVPoolHost(info, 2.0, 0, PS, layout, pin_memory=False, device="cpu",
                                allocator_type=allocator, device_capacity_tokens=DEVICE_TOKENS,
                                start_layer=0, end_layer=L)


def storage_config(extra: dict, model: str = "pytest-model", tp_rank: int = 0, tp_size: int = 1) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                is_page_first_layout=False, model_name=model, extra_config=extra)


def make_storage(daemon: Daemon, host: MHATokenToKVPoolHost, *, mempool: bool = True, shm: bool = True,
                 timeout_ms: int = 2000, model: str = "pytest-model", **more) -> KvstrataStorage:
    """Exactly what SGLang does for `--hicache-storage-backend dynamic`."""
    extra = {"backend_name": "kvstrata", "module_path": "kvstrata.sglang", "class_name": "KvstrataStorage",
             "interface_v1": 1, "addr": daemon.uds_target, "timeout_ms": timeout_ms, "backoff_ms": 200, **more}
    if shm:
        extra["allocator"] = "shm"
    if mempool:
        extra["mempool_socket"] = daemon.mempool_path
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra, model), host)
    backend.register_mem_pool_host(host)
    assert isinstance(backend, KvstrataStorage)
    return backend


def fill(host: MHATokenToKVPoolHost, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    raw = host.kv_buffer.view(torch.int16)
    raw.copy_(torch.randint(-32768, 32767, raw.shape, generator=g, dtype=torch.int16))


def page_bytes(host: MHATokenToKVPoolHost, page: int) -> bytes:
    return host.get_data_page(page * PS, flat=True).contiguous().view(torch.uint8).numpy().tobytes()


def indices(pages) -> torch.Tensor:
    return torch.cat([torch.arange(p * PS, (p + 1) * PS, dtype=torch.int64) for p in pages])


def chain(tokens, prior=None):
    return get_hash_str(tokens, prior, page_size=PS)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["shm", "staged", "inline"])
def test_pages_round_trip_byte_exact(daemon, layout, path, rng):
    allocator = "shm" if path == "shm" else "default"
    host = host_pool(layout, allocator)
    fill(host, rng.randrange(1 << 30))
    st = make_storage(daemon, host, mempool=path != "inline", shm=path == "shm",
                      model=f"pytest-{layout}-{path}")
    assert st.mode == path
    tokens = [rng.randrange(50000) for _ in range(3 * PS)]
    keys = chain(tokens)
    assert len(keys) == 3
    src, dst = [1, 3, 5], [7, 8, 9]
    want = [page_bytes(host, p) for p in src]
    before = kvstrata.Client(daemon.uds_target).stats()
    assert st.batch_set_v1(keys, indices(src)) == [True, True, True]
    assert st.batch_exists(keys) == 3
    assert st.batch_exists(keys[:2]) == 2
    other = chain([rng.randrange(50000) for _ in range(PS)])
    assert st.batch_exists(keys + other) == 3
    assert st.batch_exists(other + keys) == 0
    # a later prefix: the third page's key exists only after the first two
    assert st.batch_exists(keys[2:]) == 1
    untouched = page_bytes(host, 10)
    for p in dst:
        host.set_from_flat_data_page(p * PS, torch.zeros(2 * L * PS * H * D, dtype=torch.bfloat16))
    assert st.batch_get_v1(keys, indices(dst)) == [True, True, True]
    assert [page_bytes(host, p) for p in dst] == want
    assert page_bytes(host, 10) == untouched
    # a miss answers False and leaves the pages alone
    host.set_from_flat_data_page(11 * PS, torch.zeros(2 * L * PS * H * D, dtype=torch.bfloat16))
    zero = page_bytes(host, 11)
    assert st.batch_get_v1(other, indices([11])) == [False]
    assert page_bytes(host, 11) == zero
    after = kvstrata.Client(daemon.uds_target).stats()
    hits = lambda s: sum(t.hits for t in s.tiers)  # noqa: E731
    assert hits(after) - hits(before) == 3 * st.ranges_per_page
    if path == "shm":  # the host pool itself is registered: no staging pool
        assert st._host_pool is not None and st._staging is None
    st.close()


def test_prefix_keys_chain_parents_and_legacy_calls(daemon, rng):
    host = host_pool("page_first", "shm")
    fill(host, 7)
    st = make_storage(daemon, host, model="pytest-legacy")
    tokens = [rng.randrange(50000) for _ in range(4 * PS)]
    keys = chain(tokens)
    assert st.batch_set_v1(keys[:2], indices([0, 1])) == [True, True]
    extra = HiCacheStorageExtraInfo(prefix_keys=keys[:2])
    assert st.batch_set_v1(keys[2:], indices([2, 3]), extra) == [True, True]
    c = kvstrata.Client(daemon.uds_target)
    blocks = {bytes(b.key): b for b in c.list_blocks(st._ns)}
    k2 = bytes.fromhex(keys[2]) + (0).to_bytes(2, "little")
    last_of_1 = bytes.fromhex(keys[1]) + (st.ranges_per_page - 1).to_bytes(2, "little")
    assert bytes(blocks[k2].parent) == last_of_1  # the chain continues across calls
    assert st.exists(keys[3]) and not st.exists(chain([1] * PS)[0])
    # the legacy whole-page calls (without interface_v1)
    legacy = make_storage(daemon, host, model="pytest-legacy", interface_v1=0)
    pages = [host.get_data_page(p * PS, flat=True).clone() for p in (4, 5)]
    lkeys = chain([rng.randrange(50000) for _ in range(2 * PS)])
    assert legacy.batch_set(lkeys, pages) is True
    assert legacy.batch_exists(lkeys) == 2 and legacy.exists(lkeys[1])
    dummies = [host.get_dummy_flat_data_page() for _ in lkeys]
    got = legacy.batch_get(lkeys, dummies)
    assert all(torch.equal(g.view(torch.int16), p.view(torch.int16)) for g, p in zip(got, pages))
    assert got[0].data_ptr() == dummies[0].data_ptr()  # written into the target
    assert legacy.get(lkeys[0]).view(torch.int16).equal(pages[0].view(torch.int16))
    assert legacy.get("00" * 32) is None
    assert legacy.set(lkeys[0], pages[1]) is True
    legacy.clear()
    assert legacy.batch_exists(lkeys) == 0
    st.close()
    legacy.close()


def test_namespaces_per_model_rank_and_layout(daemon):
    c = kvstrata.Client(daemon.uds_target)
    hosts = {lay: host_pool(lay, "default") for lay in ("page_first", "layer_first")}
    ids = set()
    for lay, host in hosts.items():
        for rank in (0, 1):
            extra = {"backend_name": "kvstrata", "module_path": "kvstrata.sglang",
                     "class_name": "KvstrataStorage", "interface_v1": 1, "addr": daemon.uds_target}
            st = StorageBackendFactory.create_backend("dynamic", storage_config(extra, "m", rank, 2), host)
            st.register_mem_pool_host(host)
            assert st.batch_exists(chain([1] * PS)) == 0  # registers its namespaces
            ids.add(st._ns.id)
            st.close()
    assert len(ids) == 4
    specs = [n.spec for n in c.list_namespaces() if bytes(n.namespace_id) in ids]
    assert sorted((s.tp_rank, s.tp_size) for s in specs) == [(0, 2), (0, 2), (1, 2), (1, 2)]


def test_dead_stopped_and_restarted_daemon_never_raise(rng):
    d = workdir("sgl-chaos-")
    daemon = Daemon(d)
    try:
        host = host_pool("page_first", "shm")
        fill(host, 11)
        st = make_storage(daemon, host, timeout_ms=500, model="pytest-chaos")
        keys = chain([rng.randrange(50000) for _ in range(2 * PS)])
        assert st.batch_set_v1(keys, indices([0, 1])) == [True, True]
        want = [page_bytes(host, p) for p in (0, 1)]

        daemon.kill()
        t0 = time.monotonic()
        assert st.batch_exists(keys) == 0
        assert st.batch_get_v1(keys, indices([5, 6])) == [False, False]
        assert st.batch_set_v1(keys, indices([0, 1])) == [False, False]
        assert st.exists(keys[0]) is False and st.get(keys[0]) is None
        st.clear()
        st.get_stats()  # no exception either
        assert time.monotonic() - t0 < 3, "a dead daemon must cost at most a deadline per backoff"
        assert st.breaker.failures >= 1

        daemon.start()  # no disk tier: empty, forgot namespaces and pools
        time.sleep(0.5)  # past the breaker's backoff
        ok = None
        for _ in range(60):
            ok = st.batch_set_v1(keys, indices([0, 1]))
            if ok == [True, True]:
                break
            time.sleep(0.2)
        assert ok == [True, True], "registers again after the restart"
        for p in (5, 6):
            host.set_from_flat_data_page(p * PS, torch.zeros(2 * L * PS * H * D, dtype=torch.bfloat16))
        assert st.batch_get_v1(keys, indices([5, 6])) == [True, True]
        assert [page_bytes(host, p) for p in (5, 6)] == want

        daemon.pause()  # SIGSTOP: calls hit their deadline, answer misses
        t0 = time.monotonic()
        assert st.batch_exists(keys) == 0
        assert st.batch_get_v1(keys, indices([5, 6])) == [False, False]
        assert time.monotonic() - t0 < 2.5
        daemon.resume()
        ok = 0
        for _ in range(60):
            ok = st.batch_exists(keys)
            if ok == 2:
                break
            time.sleep(0.2)
        assert ok == 2, "serves again after SIGCONT"
        st.close()
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_restart_with_disk_tier_serves_pages(rng):
    d = workdir("sgl-disk-")
    disk = ["--disk-path", os.path.join(d, "slots.kvs") + "=64MiB", "--disk-index-dir", os.path.join(d, "index")]
    daemon = Daemon(d, extra=disk)
    try:
        host = host_pool("page_first_direct", "shm")
        fill(host, 13)
        st = make_storage(daemon, host, model="pytest-disk", write_through=True)
        keys = chain([rng.randrange(50000) for _ in range(3 * PS)])
        assert st.batch_set_v1(keys, indices([0, 1, 2])) == [True] * 3
        want = [page_bytes(host, p) for p in (0, 1, 2)]
        c = kvstrata.Client(daemon.uds_target)
        n = 3 * st.ranges_per_page
        deadline = time.monotonic() + 20
        while True:
            m = c.stats().movement
            if m.demoted >= n and m.demote_queued_bytes == 0:
                break
            assert time.monotonic() < deadline, f"write-through copies on disk: {m}"
            time.sleep(0.1)
        daemon.kill()  # SIGKILL
        daemon.start()
        ok = 0
        for _ in range(60):
            ok = st.batch_exists(keys)
            if ok == 3:
                break
            time.sleep(0.2)
        assert ok == 3, "the restarted daemon serves the disk tier"
        for p in (8, 9, 10):
            host.set_from_flat_data_page(p * PS, torch.zeros(2 * L * PS * H * D, dtype=torch.bfloat16))
        assert st.batch_get_v1(keys, indices([8, 9, 10])) == [True] * 3
        assert [page_bytes(host, p) for p in (8, 9, 10)] == want
        disk_tier = [t for t in kvstrata.Client(daemon.uds_target).stats().tiers if t.tier == kvstrata.pb.TIER_DISK][0]
        assert disk_tier.hits >= n
        st.close()
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)
