"""SharedPool, KvRegion and the engine layouts against the real daemon: byte-exact round
trips with no payload in the messages, and bad input refused clearly."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

import kvstrata
from kvstrata import layouts, pb
from kvstrata.region import KIND_MEMFD, PagedGeometry, encode_preamble, register_raw
from kvdaemon import Daemon, workdir

# The CPU backend stands in for a GPU, so KV regions take the daemon's direct path (its
# gather / scatter kernels' CPU twins), as a CUDA IPC region would on a GPU.
DAEMON_EXTRA = ("--gpu", "cpu")

STORED = pb.PUT_STATUS_STORED
BAD_REGION = pb.PUT_STATUS_BAD_REGION

# A small paged geometry: 3 layers, 4-token pages, 2 KV heads of 8 dims, 2-byte elements.
L, PT, H, D, E = 3, 4, 2, 8, 2
PAGES = 16


def spec(block_tokens, model="pytest-paged"):
    return kvstrata.NamespaceSpec(model_id=model, num_layers=L, num_kv_heads=H, head_dim=D,
                                  dtype="bf16", block_tokens=block_tokens)


def test_shared_pool_round_trip_without_payloads(client, daemon, rng):
    ns = client.register_namespace(kvstrata.NamespaceSpec.opaque("pytest-pool", 4096))
    before = client.stats().pools
    with kvstrata.SharedPool.create(daemon.mempool_path, "pytest-pool", 1 << 20) as pool:
        assert pool.id >= 1 and client.stats().pools == before + 1
        src = [pool.alloc(4096) for _ in range(8)]
        dst = [pool.alloc(4096) for _ in range(8)]
        data = [rng.randbytes(4096) for _ in range(8)]
        for s, d in zip(src, data):
            s.array()[:] = np.frombuffer(d, dtype=np.uint8)  # written through the numpy view
        put = client.batch_put_ranges(ns, [b"p%d" % i for i in range(8)], [s.range() for s in src])
        assert list(put.results) == [STORED] * 8
        for d in dst:
            d.array()[:] = 0xAA
        found = client.batch_get_into(ns, [b"p%d" % i for i in range(8)] + [b"miss"],
                                      [d.range() for d in dst] + [dst[0].range()])
        assert found == [True] * 8 + [False]
        assert [d.array().tobytes() for d in dst] == data
        assert client.batch_get(ns, [b"p3"]) == [data[3]]  # the same block, inline
        # the views are the pool's memory: writes through one show in the other
        view = pool.array(np.uint32, offset=src[0].offset, nbytes=4096)
        view[0] = 0xDEADBEEF
        assert bytes(pool.buffer[src[0].offset:src[0].offset + 4]) == (0xDEADBEEF).to_bytes(4, "little")
        # ranges of the wrong length fail the request, naming the field
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_ranges(ns, [b"x"], [pool.range(0, 100)])
        assert e.value.field.startswith("items[0].range")
        # outside the pool: refused for that block only
        r = client.batch_put_ranges(ns, [b"x", b"y"], [pool.range((1 << 20) - 64, 4096), src[1].range()])
        assert list(r.results) == [BAD_REGION, STORED]
        for s in src + dst:
            s.free()
        assert pool.alloc(1 << 20).length == 1 << 20  # freed ranges coalesced
        old = pool.range(0, 4096)
    # closed: the daemon unregisters it (as soon as it sees the connection close); later
    # requests naming it are refused per block
    deadline = time.monotonic() + 5
    while client.stats().pools != before:
        assert time.monotonic() < deadline, "the daemon did not unregister the closed pool"
        time.sleep(0.02)
    r = client.batch_put_ranges(ns, [b"z"], [old])
    assert list(r.results) == [BAD_REGION]


def test_shared_pool_bad_registrations(daemon, tmp_path):
    with pytest.raises(kvstrata.PoolError, match="name"):
        kvstrata.SharedPool.create(daemon.mempool_path, "", 4096)
    with pytest.raises(kvstrata.PoolError, match="mempool socket"):
        kvstrata.SharedPool.create(str(tmp_path / "no.sock"), "p", 4096)
    with pytest.raises(kvstrata.TargetError):
        kvstrata.SharedPool.create("127.0.0.1:1", "p", 4096)
    # a read-only fd cannot be mapped read-write: the daemon closes without an answer
    path = tmp_path / "ro"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(kvstrata.PoolError, match="refused"):
            kvstrata.SharedPool.register(daemon.mempool_path, fd, "read-only")
    finally:
        os.close(fd)


def fill_random(arr, rng):
    flat = arr.reshape(-1).view(np.uint8)
    flat[:] = np.frombuffer(rng.randbytes(flat.size), dtype=np.uint8)


def test_kv_region_memfd_pages(client, daemon, rng):
    geo = PagedGeometry("per_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E,
                        num_pages=PAGES)
    ns = client.register_namespace(spec(2 * PT))  # 2 pages per block
    with kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "pytest-region") as region:
        arr = region.array(np.uint16)
        assert arr.shape == (L, PAGES, 2, PT, H, D)
        fill_random(arr, rng)
        stats = {r.region_id: r for r in client.stats().kv_regions}
        assert stats[region.id].num_pages == PAGES and stats[region.id].kind == "memfd"
        blocks = [[3, 7], [0, 15], [9, 9]]
        keys = [b"r0", b"r1", b"r2"]
        put = client.batch_put_pages(ns, keys, [region.pages(b) for b in blocks], parents="chain")
        assert list(put.results) == [STORED] * 3
        # the daemon's gather equals this package's reading of its layout
        ref = layouts.DaemonPerLayerLayout(arr)
        inline = client.batch_get(ns, keys)
        for b, got in zip(blocks, inline):
            want = np.empty(ns.block_bytes, dtype=np.uint8)
            ref.gather(b, want)
            assert got == want.tobytes()
        # scatter into other pages, byte-exact, and nothing else touched
        snapshot = arr.copy()
        targets = [[1, 2], [4, 5], [6, 8]]
        found = client.batch_get_pages(ns, keys + [b"miss"], [region.pages(t) for t in targets] + [region.pages([10, 11])])
        assert found == [True, True, True, False]
        for src, dst in zip(blocks, targets):
            for s, d in zip(src, dst):
                assert np.array_equal(arr[:, d], snapshot[:, s])
        untouched = [p for p in range(PAGES) if p not in {1, 2, 4, 5, 6, 8}]
        assert np.array_equal(arr[:, untouched], snapshot[:, untouched])
        # page ids out of range, wrong page counts: refused whole, naming the field
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_pages(ns, [b"bad"], [region.pages([0, PAGES])])
        assert e.value.field == "items[0].pages.page_ids[1]"
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_pages(ns, [b"bad"], [region.pages([0])])
        assert e.value.field.startswith("items[0].pages")
        # a namespace whose geometry the region cannot make
        other = client.register_namespace(kvstrata.NamespaceSpec(model_id="pytest-other", num_layers=L + 1,
                                                                  num_kv_heads=H, head_dim=D, dtype="bf16",
                                                                  block_tokens=PT))
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_pages(other, [b"bad"], [region.pages([0])])
        assert e.value.field == "items[0].pages.region_id"
        rid = region.id
    deadline = time.monotonic() + 5
    while any(r.region_id == rid for r in client.stats().kv_regions):
        assert time.monotonic() < deadline, "the daemon did not unregister the closed region"
        time.sleep(0.02)
    put = client.batch_put_pages(ns, [b"gone"], [pb.KvPages(region_id=rid, page_ids=[0, 1])])
    assert list(put.results) == [BAD_REGION]


def layer_views(flat_u16, geo, shape, byte_strides):
    """Per-layer numpy views of a region's memory (u16 elements), `layer_stride` apart."""
    return [np.lib.stride_tricks.as_strided(flat_u16[l * geo.effective_layer_stride // 2:], shape=shape,
                                            strides=byte_strides) for l in range(geo.layers)]


def test_kv_region_in_vllm_layouts_by_strides(client, daemon, rng):
    """vLLM's KV tensors registered as they lie, with no copy: the classic `(2, num_blocks,
    block_size, heads, dim)` layout (K of every page, then V: the K/V stride; padded
    layers) and vLLM 0.32's `[num_blocks, heads, block_size, 2 * dim]` views stored
    token-major (LBNHC). `layouts.vllm_region_geometry` reads the strides; the daemon's
    gather equals this package's reading of the layout, and its scatter writes exactly the
    named pages."""
    chunk = PT * H * D * E
    ns = client.register_namespace(spec(2 * PT, model="pytest-vllm-strides"))  # 2 pages per block
    # classic: per layer (2, PAGES, PT, H, D), layers 2 * PAGES chunks + 64 bytes apart
    classic = PagedGeometry("per_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E,
                            num_pages=PAGES, layer_stride=2 * PAGES * chunk + 64, page_stride=chunk,
                            kv_stride=PAGES * chunk)
    assert classic.end_bytes == (L - 1) * (2 * PAGES * chunk + 64) + 2 * PAGES * chunk
    # 0.32: per layer [PAGES, H, PT, 2D] views whose memory is [PAGES][PT][H][2D]
    v032 = PagedGeometry("per_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E,
                         num_pages=PAGES, layer_stride=2 * PAGES * chunk, page_stride=2 * chunk, kv_stride=chunk)
    cases = [
        ("classic", classic, (2, PAGES, PT, H, D), (PAGES * chunk, chunk, H * D * E, D * E, E)),
        ("v032", v032, (PAGES, H, PT, 2 * D), (2 * chunk, 2 * D * E, H * 2 * D * E, E)),
    ]
    for name, geo, shape, strides in cases:
        with kvstrata.KvRegion.create_memfd(daemon.region_path, geo, f"pytest-{name}") as region:
            flat = region.array(np.uint16)
            assert flat.ndim == 1  # not the packed layout: a flat view
            fill_random(flat, rng)
            views = layer_views(flat, geo, shape, strides)
            got = layouts.vllm_region_geometry(views, num_blocks=PAGES, block_size=PT, kv_heads=H, head_size=D)
            assert got == geo, name
            blocks = [[3, 7], [0, 15], [9, 9]]
            keys = [b"%s-%d" % (name.encode(), i) for i in range(3)]
            put = client.batch_put_pages(ns, keys, [region.pages(b) for b in blocks], parents="chain")
            assert list(put.results) == [STORED] * 3, name
            inline = client.batch_get(ns, keys)
            raw = flat.view(np.uint8)
            for b, payload in zip(blocks, inline):
                if name == "classic":
                    # the daemon's block format is what VllmLayout gathers from these tensors
                    want = np.empty(ns.block_bytes, dtype=np.uint8)
                    layouts.VllmLayout(views).gather(b, want)
                    want = want.tobytes()
                else:
                    # layer after layer, K half then V half of each page: the pages' bytes as
                    # they lie in memory (a block of 2 pages: [layer][half][page][bytes])
                    want = b"".join(
                        raw[geo.engine_offset(l, kv, p):geo.engine_offset(l, kv, p) + chunk].tobytes()
                        for l in range(L) for kv in range(2) for p in b)
                assert payload == want, name
            snapshot = raw.copy()
            targets = [[1, 2], [4, 5], [6, 8]]
            found = client.batch_get_pages(ns, keys, [region.pages(t) for t in targets])
            assert found == [True] * 3, name
            want = snapshot.copy()
            for src, dst in zip(blocks, targets):
                for s_page, d_page in zip(src, dst):
                    for l in range(L):
                        for kv in range(2):
                            a, b = geo.engine_offset(l, kv, s_page), geo.engine_offset(l, kv, d_page)
                            want[b:b + chunk] = snapshot[a:a + chunk]
            assert np.array_equal(raw, want), f"{name}: the scatter wrote other bytes than the named pages"
    # layouts the daemon cannot gather are refused with the tensor named
    flat = np.zeros(classic.end_bytes // 2, dtype=np.uint16)
    views = layer_views(flat, classic, (2, PAGES, PT, H, D), (PAGES * chunk, chunk, H * D * E, D * E, E))
    with pytest.raises(kvstrata.RegionError, match=r"kv_caches\[2\]"):
        layouts.vllm_region_geometry(views[:2] + [views[1]], num_blocks=PAGES, block_size=PT, kv_heads=H, head_size=D)
    gappy = [np.lib.stride_tricks.as_strided(flat, shape=(2, PAGES, PT, H, D),
                                             strides=(PAGES * chunk, chunk, H * D * E, D * E * 2, E))]
    with pytest.raises(kvstrata.RegionError, match="contiguous"):
        layouts.vllm_region_geometry(gappy, num_blocks=PAGES, block_size=PT, kv_heads=H, head_size=D)
    with pytest.raises(kvstrata.RegionError, match="leading axes"):
        layouts.vllm_region_geometry(views, num_blocks=PAGES + 1, block_size=PT, kv_heads=H, head_size=D)
    # overlapping strides: refused here, and by the daemon when a client sends them anyway
    with pytest.raises(kvstrata.RegionError, match="kv_stride"):
        PagedGeometry("per_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E,
                      num_pages=PAGES, page_stride=chunk, kv_stride=(PAGES - 1) * chunk)
    fd = os.memfd_create("overlap")
    os.ftruncate(fd, classic.end_bytes)
    try:
        preamble = bytearray(encode_preamble(KIND_MEMFD, 0, classic.end_bytes, bytes(64), classic, "overlap"))
        preamble[136:144] = ((PAGES - 1) * chunk).to_bytes(8, "little")  # kv_stride
        with pytest.raises(kvstrata.RegionError) as e:
            register_raw(daemon.region_path, bytes(preamble), fd, "overlap")
        assert e.value.reason == "geometry" and e.value.message.startswith("kv_stride"), e.value.message
    finally:
        os.close(fd)


def test_kv_region_refusals(daemon, tmp_path):
    geo = PagedGeometry("cross_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E, num_pages=4)
    fd = os.memfd_create("short")
    os.ftruncate(fd, 64)
    try:
        # announced bytes below the geometry's end
        with pytest.raises(kvstrata.RegionError) as e:
            register_raw(daemon.region_path, encode_preamble(KIND_MEMFD, 0, 64, bytes(64), geo, "short"), fd, "short")
        assert e.value.status == 2 and e.value.reason == "geometry" and "bytes" in e.value.message
        # an fd smaller than the region
        with pytest.raises(kvstrata.RegionError) as e:
            register_raw(daemon.region_path, encode_preamble(KIND_MEMFD, 0, geo.end_bytes, bytes(64), geo, "small"),
                         fd, "small")
        assert e.value.status == 4 and e.value.reason == "map"
        # a CUDA IPC region on a daemon without a GPU (the CPU backend is not a CUDA device)
        with pytest.raises(kvstrata.RegionError) as e:
            register_raw(daemon.region_path,
                         encode_preamble(1, 0, geo.end_bytes, b"\1" * 64, geo, "ipc"), None, "ipc")
        assert e.value.status in (4, 5)
    finally:
        os.close(fd)
    with pytest.raises(kvstrata.RegionError, match="head_dim"):
        PagedGeometry("per_layer", layers=1, page_tokens=1, kv_heads=1, head_dim=0, dtype_bytes=2, num_pages=1)
    with pytest.raises(kvstrata.RegionError, match="layout"):
        PagedGeometry("diagonal", layers=1, page_tokens=1, kv_heads=1, head_dim=1, dtype_bytes=2, num_pages=1)


# --- engine layouts ----------------------------------------------------------------------


def logical_kv(rng, tokens):
    """Random KV of `tokens` tokens: [layer][K|V][token][head][dim] (u16 = bf16 bits)."""
    kv = np.empty((L, 2, tokens, H, D), dtype=np.uint16)
    fill_random(kv, rng)
    return kv


def engine_layouts(kv, page_ids):
    """Each engine layout holding the pages `page_ids` with the logical KV (token order),
    as (name, descriptor, buffer) — buffers random elsewhere."""
    n_pages = PAGES
    tok = lambda i: slice(i * PT, (i + 1) * PT)  # noqa: E731
    out = []
    for hnd in (False, True):
        layers = []
        for l in range(L):
            t = np.full((2, n_pages, H, PT, D) if hnd else (2, n_pages, PT, H, D), 0x5A5A, dtype=np.uint16)
            for j, p in enumerate(page_ids):
                page = kv[l, :, tok(j)]  # (2, PT, H, D)
                t[:, p] = page.transpose(0, 2, 1, 3) if hnd else page
            layers.append(t)
        out.append((f"vllm-{'hnd' if hnd else 'nhd'}", layouts.VllmLayout(layers, hnd=hnd), layers))
    lf = np.full((2, L, n_pages * PT, H, D), 0x5A5A, dtype=np.uint16)
    pf = np.full((2, n_pages * PT, L, H, D), 0x5A5A, dtype=np.uint16)
    pfd = np.full((2, n_pages, L, PT, H, D), 0x5A5A, dtype=np.uint16)
    for j, p in enumerate(page_ids):
        page = kv[:, :, tok(j)]  # (L, 2, PT, H, D)
        lf[:, :, p * PT:(p + 1) * PT] = page.transpose(1, 0, 2, 3, 4)
        pf[:, p * PT:(p + 1) * PT] = page.transpose(1, 2, 0, 3, 4)
        pfd[:, p] = page.transpose(1, 0, 2, 3, 4)
    for name, buf in (("layer_first", lf), ("page_first", pf), ("page_first_direct", pfd)):
        out.append((f"sglang-{name}", layouts.SglangHostLayout(buf, name, page_size=PT, layers=L), buf))
    return out


def test_engine_layouts_round_trip_through_a_pool(client, daemon, rng):
    """Every engine layout gathers the same block bytes (the daemon's layer-major format),
    stores them through a pool with no payload in the message, and scatters them back
    byte-exact into other pages."""
    ns = client.register_namespace(spec(2 * PT, model="pytest-layouts"))
    kv = logical_kv(rng, 2 * PT)
    want = kv.tobytes()
    assert len(want) == ns.block_bytes
    with kvstrata.SharedPool.create(daemon.mempool_path, "pytest-layouts", 1 << 20) as pool:
        for name, layout, bufs in engine_layouts(kv, [5, 2]):
            slot = pool.alloc(ns.block_bytes)
            layout.gather([5, 2], slot.array())
            assert slot.array().tobytes() == want, name
            key = name.encode()
            assert list(client.batch_put_ranges(ns, [key], [slot.range()]).results) == [STORED], name
            slot.array()[:] = 0
            assert client.batch_get_into(ns, [key], [slot.range()]) == [True]
            before = [np.array(b, copy=True) for b in (bufs if isinstance(bufs, list) else [bufs])]
            layout.scatter([9, 12], slot.array())
            check = np.empty(ns.block_bytes, dtype=np.uint8)
            layout.gather([9, 12], check)
            assert check.tobytes() == want, name
            layout.gather([5, 2], check)  # the source pages are unchanged
            assert check.tobytes() == want, name
            after = bufs if isinstance(bufs, list) else [bufs]
            changed = sum(int(np.count_nonzero(a != b)) for a, b in zip(after, before))
            assert 0 < changed <= kv.size, name  # only the two target pages were written
            slot.free()


def test_layouts_refuse_bad_input():
    with pytest.raises(kvstrata.RegionError, match="vLLM"):
        layouts.VllmLayout([np.zeros((3, 4, 4, 2, 8), dtype=np.uint16)])
    with pytest.raises(kvstrata.RegionError, match=r"kv_caches\[1\]"):
        layouts.VllmLayout([np.zeros((2, 4, 4, 2, 8), dtype=np.uint16), np.zeros((2, 5, 4, 2, 8), dtype=np.uint16)])
    lay = layouts.VllmLayout([np.zeros((2, 4, 4, 2, 8), dtype=np.uint16)])
    out = np.empty(lay.block_bytes(1), dtype=np.uint8)
    with pytest.raises(kvstrata.RegionError, match=r"page_ids\[0\]: page 4"):
        lay.gather([4], out)
    with pytest.raises(kvstrata.RegionError, match="out"):
        lay.gather([0], np.empty(3, dtype=np.uint8))
    with pytest.raises(kvstrata.RegionError, match="layout"):
        layouts.SglangHostLayout(np.zeros((2, 2, 8, 2, 8), dtype=np.uint16), "token_first", page_size=4, layers=2)
    with pytest.raises(kvstrata.RegionError, match="layers"):
        layouts.SglangHostLayout(np.zeros((2, 2, 8, 2, 8), dtype=np.uint16), "layer_first", page_size=4, layers=3)


def test_pools_and_regions_see_the_daemon_go_away():
    """A client notices that the daemon dropped its registrations (it died or restarted):
    is_registered() turns False, and it registers again before naming the memory."""
    d = workdir("gone-")
    daemon = Daemon(d)
    try:
        pool = kvstrata.SharedPool.create(daemon.mempool_path, "gone", 4096)
        geo = PagedGeometry("per_layer", layers=1, page_tokens=1, kv_heads=1, head_dim=8, dtype_bytes=2, num_pages=2)
        region = kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "gone")
        assert pool.is_registered() and region.is_registered()
        daemon.kill()
        deadline = time.monotonic() + 5
        while pool.is_registered() or region.is_registered():
            assert time.monotonic() < deadline, "a dead daemon's registrations still look open"
            time.sleep(0.02)
        pool.close()
        region.close()
        assert not pool.is_registered() and not region.is_registered()
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_ids_from_before_a_restart_reach_no_new_memory(rng):
    """Pool and region ids are unique to a daemon run: a client that kept its ids across a
    restart is refused per block (BAD_REGION, region_error), and the pool and region another
    client registered with the new daemon stay byte for byte as they were."""
    d = workdir("ids-")
    daemon = Daemon(d)
    geo = PagedGeometry("cross_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E,
                        num_pages=4)
    try:
        stale_pool = kvstrata.SharedPool.create(daemon.mempool_path, "worker", 64 * 1024)
        stale_region = kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "engine")
        assert stale_pool.id >= kvstrata.pool.MIN_WIDE_POOL_ID and stale_region.id > 0
        old_slice = stale_pool.range(0, 4096)
        old_pages = stale_region.pages([1])
        daemon.restart()  # the same socket paths; the stale client does not register again
        with kvstrata.Client(daemon.uds_target, timeout=20) as client, \
                kvstrata.SharedPool.create(daemon.mempool_path, "worker", 64 * 1024) as pool, \
                kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "engine") as region:
            fill_random(pool.array(), rng)
            fill_random(region.array(np.uint8), rng)
            pool_before, region_before = pool.array().copy(), region.array(np.uint8).copy()
            flat = client.register_namespace(kvstrata.NamespaceSpec.opaque("pytest-ids", 4096))
            paged = client.register_namespace(spec(PT, model="pytest-ids-paged"))
            client.batch_put(flat, [b"k"], [rng.randbytes(4096)])
            client.batch_put(paged, [b"k"], [rng.randbytes(paged.block_bytes)])
            got = client.batch_get_results(flat, [b"k"], ranges=[old_slice])
            assert not got[0].found and f"pool {stale_pool.id} is not registered" in got[0].region_error
            got = client.batch_get_results(paged, [b"k"], pages=[old_pages])
            assert not got[0].found and f"KV region {stale_region.id} is not registered" in got[0].region_error
            assert list(client.batch_put_ranges(flat, [b"s"], [old_slice]).results) == [BAD_REGION]
            assert list(client.batch_put_pages(paged, [b"s"], [old_pages]).results) == [BAD_REGION]
            assert client.batch_get(flat, [b"s"]) == [None] and client.batch_get(paged, [b"s"]) == [None]
            assert np.array_equal(pool.array(), pool_before), "another client's pool changed"
            assert np.array_equal(region.array(np.uint8), region_before), "another client's region changed"
            # the new registrations' own ids work
            assert client.batch_get_into(flat, [b"k"], [pool.range(0, 4096)]) == [True]
            assert client.batch_get_pages(paged, [b"k"], [region.pages([1])]) == [True]
        stale_pool.close()
        stale_region.close()
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)
