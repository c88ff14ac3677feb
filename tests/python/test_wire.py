"""The page requests built by `kvstrata._wire` (BatchPut / BatchGet naming KV-region pages,
encoded with numpy from `KvRegion.page_batch` arrays or serialized `KvPages`): the bytes
equal protobuf's own serialization of the same message, case after case, and the real
daemon stores and scatters byte-exact through them in both of its region layouts."""

from __future__ import annotations

import numpy as np
import pytest

import kvstrata
from kvstrata import _wire, layouts, pb
from kvstrata.client import WIRE_MIN_BLOCKS
from kvstrata.region import PageBatch, PagedGeometry

# The CPU backend stands in for a GPU: memfd regions take the daemon's direct path, the
# one CUDA IPC regions take on a GPU.
DAEMON_EXTRA = ("--gpu", "cpu")

STORED = pb.PUT_STATUS_STORED

#: Values at every varint length boundary.
EDGES = [0, 1, 127, 128, 16383, 16384, (1 << 21) - 1, 1 << 21, (1 << 28) - 1, 1 << 28, (1 << 32) - 1]
REGION_EDGES = EDGES + [1 << 32, (1 << 35) + 3, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def reference_get(ns: bytes, keys, messages) -> bytes:
    return pb.BatchGetRequest(namespace_id=ns, keys=[bytes(k) for k in keys], pages=messages).SerializeToString()


def reference_put(ns: bytes, keys, parents, messages) -> bytes:
    items = [pb.PutItem(key=bytes(k), parent=bytes(p), pages=m) for k, p, m in zip(keys, parents, messages)]
    return pb.BatchPutRequest(namespace_id=ns, items=items).SerializeToString()


def random_case(rng):
    n = rng.choice([1, 2, 3, 15, 16, 17, 64, 300])
    ppb = rng.choice([0, 1, 1, 2, 3, 8, 30, 45])  # 45 ids of 3+ bytes: a packed field over 127 bytes
    region_id = rng.choice(REGION_EDGES + [rng.getrandbits(64)])
    top = rng.choice(EDGES[1:])
    ids = np.array([[rng.choice([rng.randrange(top + 1), rng.choice(EDGES), top]) for _ in range(ppb)]
                    for _ in range(n)], dtype=np.uint64).astype(np.uint32).reshape(n, ppb)
    key_len = rng.choice([None, 0, 1, 16, 32, 127, 128, 300])  # None: lengths mixed per key
    keys = [rng.randbytes(rng.choice([0, 1, 16, 127, 128, 200]) if key_len is None else key_len) for _ in range(n)]
    if rng.random() < 0.2:
        keys = [bytearray(k) if i % 2 else memoryview(k) for i, k in enumerate(keys)]
    ns = rng.choice([b"", rng.randbytes(16)])
    return n, ppb, region_id, ids, keys, ns


def test_page_requests_equal_protobufs_serialization(rng):
    """Thousands of random requests, every varint length of ids, region ids, keys and
    lengths: the hand-built bytes are exactly `SerializeToString()` of the message."""
    for case in range(1500):
        n, ppb, region_id, ids, keys, ns = random_case(rng)
        messages = [pb.KvPages(region_id=region_id, page_ids=row.tolist()) for row in ids]
        for rows in (_wire.PagesRows.from_ids(region_id, ids),
                     _wire.PagesRows.from_messages([m.SerializeToString() for m in messages])):
            what = f"case {case}: n={n} ppb={ppb} region={region_id} keys={[len(bytes(k)) for k in keys][:4]}"
            assert _wire.batch_get_pages_request(ns, keys, rows) == reference_get(ns, keys, messages), what
            assert _wire.batch_get_page_ids_request(ns, keys, region_id, ids) == pb.BatchGetRequest(
                namespace_id=ns, keys=[bytes(k) for k in keys], page_region_id=region_id,
                page_ids=ids.reshape(-1).tolist()).SerializeToString(), what
            parents = [rng.randbytes(rng.choice([0, 16, 130])) for _ in range(n)]
            assert _wire.batch_put_pages_request(ns, keys, parents, rows) == \
                reference_put(ns, keys, parents, messages), what
            first = rng.choice([b"", rng.randbytes(16), rng.randbytes(150)])
            chain = [first] + [bytes(k) for k in keys[:-1]]
            assert _wire.batch_put_pages_request(ns, keys, "chain", rows, first) == \
                reference_put(ns, keys, chain, messages), what


def test_single_messages_equal_protobufs():
    for rid in REGION_EDGES:
        for ids in ([], [0], EDGES, [5, 1 << 31]):
            assert _wire.kv_pages_bytes(rid, ids) == pb.KvPages(region_id=rid, page_ids=ids).SerializeToString()
    for n in (0, 1, 127, 128, 300, 1 << 14, 1 << 21):
        assert _wire.varint(n) == pb.KvPages(region_id=n).SerializeToString()[1:] or n == 0
    assert _wire.batch_get_pages_request(b"ns", [], _wire.PagesRows.from_ids(1, np.zeros((0, 1), np.uint32))) == \
        pb.BatchGetRequest(namespace_id=b"ns").SerializeToString()
    with pytest.raises(ValueError):
        _wire.varint(-1)


def test_page_batch():
    b = PageBatch(7, [3, 200, 70000])
    assert len(b) == 3 and b.page_ids.shape == (3, 1) and b.page_ids.dtype == np.uint32
    assert list(b) == [pb.KvPages(region_id=7, page_ids=[p]) for p in (3, 200, 70000)]
    assert b[1] == pb.KvPages(region_id=7, page_ids=[200])
    assert isinstance(b[1:], PageBatch) and list(b[1:]) == list(b)[1:]
    two = PageBatch(7, np.array([[1, 2], [3, 4]], dtype=np.int64))
    assert list(two) == [pb.KvPages(region_id=7, page_ids=[1, 2]), pb.KvPages(region_id=7, page_ids=[3, 4])]
    assert len(PageBatch(7, [])) == 0
    for bad, match in (([-1], "page id -1"), ([1 << 32], "page id 4294967296"), ([0.5], "integers"),
                       (np.zeros((2, 2, 2), dtype=np.int64), "shape")):
        with pytest.raises(ValueError, match=match):
            PageBatch(7, bad)


class Capture:
    """Stands in for the client's raw BatchPut / BatchGet callables: keeps the bytes."""

    def __init__(self, answer):
        self.sent: list[bytes] = []
        self.answer = answer

    def __call__(self, request, timeout=None, metadata=None):
        self.sent.append(request)
        return self.answer


def test_client_sends_protobufs_bytes(rng):
    """What `Client.batch_put_pages` / `batch_get_pages` send for a page batch or a list
    of `KvPages`, with each kind of `parents`, is the message the generated code makes."""
    client = kvstrata.Client("unix:///nonexistent/kvstrata.sock")
    n = 2 * WIRE_MIN_BLOCKS + 8
    put, get = Capture(pb.BatchPutResponse(stored=n)), Capture(pb.BatchGetResponse(
        results=[pb.GetResult(found=True)] * n))
    client._raw = {"BatchPut": put, "BatchGet": get}
    try:
        ns = rng.randbytes(16)
        keys = [rng.randbytes(16) for _ in range(n)]
        ids = np.array([rng.randrange(1 << 20) for _ in range(2 * n)]).reshape(n, 2)
        messages = [pb.KvPages(region_id=99, page_ids=row.tolist()) for row in ids]
        for pages in (PageBatch(99, ids), messages):
            for parents, first, want in ((None, None, [b""] * n),
                                         ("chain", None, [b""] + keys[:-1]),
                                         ("chain", b"f" * 16, [b"f" * 16] + keys[:-1]),
                                         ([None, b"p"] * (n // 2), None, [b"", b"p"] * (n // 2))):
                assert client.batch_put_pages(ns, keys, pages, parents=parents, first_parent=first).stored == n
                assert put.sent[-1] == reference_put(ns, keys, want, messages)
            assert client.batch_get_pages(ns, keys, pages) == [True] * n
            assert get.sent[-1] == reference_get(ns, keys, messages)
            # a daemon that reads page-id arrays gets a page batch's ids as one array
            client.page_id_arrays = True
            assert client.batch_get_pages(ns, keys, pages) == [True] * n
            want = (pb.BatchGetRequest(namespace_id=ns, keys=keys, page_region_id=99,
                                       page_ids=ids.reshape(-1).tolist()).SerializeToString()
                    if isinstance(pages, PageBatch) else reference_get(ns, keys, messages))
            assert get.sent[-1] == want
            # ... and that answers compactly is asked for each key's tier, not a result per key
            client.compact_answers = True
            if isinstance(pages, PageBatch):
                long_answer = get.answer
                tiers = [pb.TIER_HBM, pb.TIER_UNSPECIFIED, pb.TIER_HOST] * (n // 3) + [pb.TIER_HBM] * (n % 3)
                get.answer = pb.BatchGetResponse(tiers=tiers, failed=[pb.FailedKey(index=1, message="closed")])
                assert client.batch_get_pages(ns, keys, pages) == [t != pb.TIER_UNSPECIFIED for t in tiers]
                assert get.sent[-1] == pb.BatchGetRequest(
                    namespace_id=ns, keys=keys, page_region_id=99, page_ids=ids.reshape(-1).tolist(),
                    compact_answer=True).SerializeToString()
                get.answer = pb.BatchGetResponse(tiers=tiers[1:])  # one short: refused
                with pytest.raises(kvstrata.KvstrataError, match=f"{n - 1} tiers and 0 results for {n} keys"):
                    client.batch_get_pages(ns, keys, pages)
                get.answer = long_answer
            else:  # one KvPages per key: answered one result per key, as before
                assert client.batch_get_pages(ns, keys, pages) == [True] * n
                assert get.sent[-1] == reference_get(ns, keys, messages)
            client.page_id_arrays = client.compact_answers = False
        assert len(put.sent) == 8 and len(get.sent) == 7
    finally:
        client.close()


def geometry(layout: str, pages: int) -> PagedGeometry:
    return PagedGeometry(layout, layers=3, page_tokens=4, kv_heads=2, head_dim=8, dtype_bytes=2, num_pages=pages)


def reference_block(arr: np.ndarray, layout: str, page_ids) -> bytes:
    """The daemon's block of these pages, read from the region in numpy:
    `[layer][K|V][page][chunk]`."""
    if layout == "per_layer":  # (layers, pages, 2, tokens, heads, dim)
        out = np.empty(arr[:, list(page_ids)].nbytes, dtype=np.uint8)
        layouts.DaemonPerLayerLayout(arr).gather(list(page_ids), out)
        return out.tobytes()
    return np.ascontiguousarray(arr[list(page_ids)].transpose(1, 2, 0, 3, 4, 5)).tobytes()


@pytest.mark.parametrize("layout,ppb", [("per_layer", 1), ("per_layer", 2), ("cross_layer", 1), ("cross_layer", 3)])
def test_page_batch_round_trips_byte_exact(client, daemon, rng, layout, ppb):
    """Blocks saved from a region by a page batch (chained parents) hold exactly the pages'
    bytes; loaded into other pages by a page batch and by a list of `KvPages` (both built
    by `_wire`), they write exactly those pages; the daemon names a bad page id's field in
    a hand-built request as in any other."""
    n = 2 * WIRE_MIN_BLOCKS
    pages = 3 * n * ppb + 16  # ids of 1 and 2 varint bytes (the encoding of longer ones: tests above)
    geo = geometry(layout, pages)
    ns = client.register_namespace(kvstrata.NamespaceSpec(model_id=f"pytest-wire-{layout}-{ppb}", num_layers=3,
                                                          num_kv_heads=2, head_dim=8, dtype="bf16",
                                                          block_tokens=4 * ppb))
    with kvstrata.KvRegion.create_memfd(daemon.region_path, geo, f"pytest-wire-{layout}-{ppb}") as region:
        arr = region.array(np.uint16)
        arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(rng.randbytes(arr.nbytes), dtype=np.uint8)
        perm = rng.sample(range(pages), 3 * n * ppb)
        src = np.array(perm[:n * ppb]).reshape(n, ppb)
        dst = [np.array(perm[(1 + i) * n * ppb:(2 + i) * n * ppb]).reshape(n, ppb) for i in range(2)]
        keys = [rng.randbytes(16) for _ in range(n)]
        first = rng.randbytes(16)
        put = client.batch_put_pages(ns, keys, region.page_batch(src), parents="chain", first_parent=first)
        assert list(put.results) == [STORED] * n
        inline = client.batch_get(ns, keys)
        for i in range(n):
            assert inline[i] == reference_block(arr, layout, src[i]), f"block {i} (pages {src[i]})"
        assert client.inspect(ns, keys[0]).block.parent == first
        assert client.inspect(ns, keys[7]).block.parent == keys[6]
        # loads: a page batch, then a list of messages; a miss writes nothing
        for target, pages_arg in ((dst[0], region.page_batch(dst[0])),
                                  (dst[1], [region.pages(row) for row in dst[1]])):
            snapshot = arr.copy()
            found = client.batch_get_pages(ns, keys[:-1] + [b"miss"], pages_arg)
            assert found == [True] * (n - 1) + [False]
            blocks = [reference_block(arr, layout, target[i]) for i in range(n)]
            assert blocks[:-1] == inline[:-1]
            assert blocks[-1] == reference_block(snapshot, layout, target[-1])  # the miss's pages untouched
            written = set(target[:-1].reshape(-1).tolist())
            other = [p for p in range(pages) if p not in written]
            page_axis = 1 if layout == "per_layer" else 0
            assert np.array_equal(np.take(arr, other, axis=page_axis), np.take(snapshot, other, axis=page_axis))
        # a bad page id in a hand-built request: refused whole, the field named
        bad = src.copy()
        bad[20, ppb - 1] = pages
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_pages(ns, [b"b%d" % i for i in range(n)], region.page_batch(bad))
        assert e.value.field == f"items[20].pages.page_ids[{ppb - 1}]"
        assert client.page_id_arrays  # this daemon reads a page batch's ids as one array
        assert client.compact_answers  # ... and answers such gets compactly
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_get_pages(ns, keys, region.page_batch(bad))
        assert e.value.field == f"pages[20].page_ids[{ppb - 1}]"  # named as for one list per key
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_get_pages(ns, keys, [region.pages(row) for row in bad])
        assert e.value.field.startswith("pages[20]")
