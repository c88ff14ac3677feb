"""Page requests split into several requests in flight at once (`in_flight=` of
`Client.batch_put_pages` / `batch_get_pages`), against the real daemon on its CPU backend
(memfd regions take the daemon's direct path, the one CUDA IPC regions take on a GPU):
the parts sent are the ones asked for, the pages round trip byte-exact, a chain split in
parts records the parents one request records, misses stay in their part, and a part the
daemon refuses fails the call after every part finished, the others' blocks stored."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kvstrata
from kvstrata import layouts, pb
from kvstrata.client import MAX_BATCH, WIRE_MIN_BLOCKS
from kvstrata.region import PagedGeometry

DAEMON_EXTRA = ("--gpu", "cpu")

STORED = pb.PUT_STATUS_STORED
#: Blocks per request in these tests: parts of unequal sizes for 2, 3 and 4 in flight.
N = 4 * WIRE_MIN_BLOCKS + 5


def part_sizes(n: int, in_flight: int) -> list[int]:
    """What the client should send: min(in_flight, n // WIRE_MIN_BLOCKS) near-equal parts."""
    count = max(1, min(in_flight, n // WIRE_MIN_BLOCKS))
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


class Spy:
    """Wraps the client's raw BatchPut / BatchGet callables, forwarding every call to the
    daemon, and keeps the number of keys of each request sent (in order sent; a put's items,
    or its keys in the array form)."""

    def __init__(self, inner: Any, parse: Any) -> None:
        self.inner = inner
        self.parse = parse
        self.sent: list[int] = []

    def _keep(self, request: bytes) -> None:
        msg = self.parse(request)
        self.sent.append(len(msg.items) or len(msg.keys) if hasattr(msg, "items") else len(msg.keys))

    def __call__(self, request: bytes, **kw: Any) -> Any:
        self._keep(request)
        return self.inner(request, **kw)

    def future(self, request: bytes, **kw: Any) -> Any:
        self._keep(request)
        return self.inner.future(request, **kw)


@pytest.fixture
def spied(client):
    put = Spy(client._raw["BatchPut"], pb.BatchPutRequest.FromString)
    get = Spy(client._raw["BatchGet"], pb.BatchGetRequest.FromString)
    client._raw = {"BatchPut": put, "BatchGet": get}
    # Every request over gRPC, where the spies count it: one-part page requests would
    # otherwise be region calls (test_region_calls.py checks those).
    client.region_calls = False
    return client, put, get


class Region:
    """A memfd region of random bytes, its namespace, and the byte checks."""

    def __init__(self, client, daemon, rng, name: str, layout: str, ppb: int, pages: int) -> None:
        self.layout, self.ppb, self.pages = layout, ppb, pages
        geo = PagedGeometry(layout, layers=3, page_tokens=4, kv_heads=2, head_dim=8, dtype_bytes=2, num_pages=pages)
        self.ns = client.register_namespace(kvstrata.NamespaceSpec(
            model_id=f"pytest-inflight-{name}", num_layers=3, num_kv_heads=2, head_dim=8, dtype="bf16",
            block_tokens=4 * ppb))
        self.region = kvstrata.KvRegion.create_memfd(daemon.region_path, geo, f"pytest-inflight-{name}")
        self.arr = self.region.array(np.uint16)
        self.arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(rng.randbytes(self.arr.nbytes), dtype=np.uint8)
        self.axis = 1 if layout == "per_layer" else 0

    def block(self, page_ids, arr=None) -> bytes:
        """The daemon's block of these pages, read from the region in numpy."""
        arr = self.arr if arr is None else arr
        if self.layout == "per_layer":
            out = np.empty(arr[:, list(page_ids)].nbytes, dtype=np.uint8)
            layouts.DaemonPerLayerLayout(arr).gather(list(page_ids), out)
            return out.tobytes()
        return np.ascontiguousarray(arr[list(page_ids)].transpose(1, 2, 0, 3, 4, 5)).tobytes()

    def take(self, page_ids, arr=None) -> np.ndarray:
        return np.take(self.arr if arr is None else arr, np.asarray(page_ids).reshape(-1), axis=self.axis)

    def refill(self, page_ids, rng) -> None:
        """Fresh random bytes in these pages (so a load must write them again)."""
        idx = [slice(None)] * self.arr.ndim
        idx[self.axis] = np.asarray(page_ids).reshape(-1)
        shape = self.arr[tuple(idx)].shape
        self.arr[tuple(idx)] = np.frombuffer(rng.randbytes(int(np.prod(shape)) * 2), dtype=np.uint16).reshape(shape)

    def close(self) -> None:
        self.region.close()


@pytest.mark.parametrize("layout,ppb", [("per_layer", 2), ("cross_layer", 1)])
def test_round_trips_byte_exact(spied, daemon, rng, layout, ppb):
    """Saved and loaded with 1 to 4 requests in flight (page batches, and lists of
    `KvPages` for 3): the parts sent are the near-equal ones asked for, the blocks hold the
    source pages' bytes, the loaded pages equal the source pages, and no other page changes."""
    client, put, get = spied
    pages = 2 * N * ppb + 8
    r = Region(client, daemon, rng, f"rt-{layout}", layout, ppb, pages)
    try:
        perm = rng.sample(range(pages), 2 * N * ppb)
        src = np.array(perm[:N * ppb]).reshape(N, ppb)
        dst = np.array(perm[N * ppb:]).reshape(N, ppb)
        for in_flight in (1, 2, 3, 4):
            keys = [rng.randbytes(16) for _ in range(N)]

            def arg(ids):
                return [r.region.pages(row) for row in ids] if in_flight == 3 else r.region.page_batch(ids)

            put.sent.clear()
            get.sent.clear()
            resp = client.batch_put_pages(r.ns, keys, arg(src), parents="chain", in_flight=in_flight)
            assert list(resp.results) == [STORED] * N and resp.stored == N, f"in_flight={in_flight}"
            assert put.sent == part_sizes(N, in_flight)
            inline = client.batch_get(r.ns, keys)
            for i in range(N):
                assert inline[i] == r.block(src[i]), f"in_flight={in_flight}: block {i} (pages {src[i]})"
            r.refill(dst, rng)
            before = r.arr.copy()
            found = client.batch_get_pages(r.ns, keys, arg(dst), in_flight=in_flight)
            assert found == [True] * N
            assert get.sent == part_sizes(N, in_flight)
            assert np.array_equal(r.take(dst), r.take(src)), f"in_flight={in_flight}: loaded pages differ"
            other = sorted(set(range(pages)) - set(dst.reshape(-1).tolist()))
            assert np.array_equal(r.take(other), r.take(other, before))
            client.delete(r.ns, keys)
    finally:
        r.close()


def test_split_chain_records_the_same_parents(client, daemon, rng):
    """A chained put in 4 parts records, key for key, the parents and child counts of the
    same put as one request (part k's first parent: the last key of part k - 1); an
    explicit parents list is split alongside the keys."""
    pages = N + 8
    r = Region(client, daemon, rng, "chain", "cross_layer", 1, pages)
    try:
        keys = [rng.randbytes(16) for _ in range(N)]
        first = rng.randbytes(16)
        ids = r.region.page_batch(rng.sample(range(pages), N))
        spec = r.ns.spec
        nss = [client.register_namespace(kvstrata.NamespaceSpec(
            model_id=f"pytest-inflight-chain-{i}", num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim, dtype=spec.dtype, block_tokens=spec.block_tokens)) for i in range(4)]

        def recorded(ns) -> dict:
            return {bytes(b.key): (bytes(b.parent), b.children) for b in client.list_blocks(ns)}

        assert client.batch_put_pages(nss[0], keys, ids, parents="chain", first_parent=first).stored == N
        assert client.batch_put_pages(nss[1], keys, ids, parents="chain", first_parent=first, in_flight=4).stored == N
        one, split = recorded(nss[0]), recorded(nss[1])
        want = {k: (p, 1 if i < N - 1 else 0) for i, (k, p) in enumerate(zip(keys, [first] + keys[:-1]))}
        assert one == want
        assert split == want
        # parents given one per key (some none), split alongside the keys
        explicit = [None if i % 5 == 0 else rng.randbytes(16) for i in range(N)]
        assert client.batch_put_pages(nss[2], keys, ids, parents=explicit).stored == N
        assert client.batch_put_pages(nss[3], keys, ids, parents=explicit, in_flight=3).stored == N
        assert recorded(nss[3]) == recorded(nss[2])
        assert [recorded(nss[3])[k][0] for k in keys] == [p or b"" for p in explicit]
    finally:
        r.close()


def test_misses_in_one_part(spied, daemon, rng):
    """Misses in the third of four parts: found is exact key for key, the misses' pages
    are untouched and every found block's pages are written."""
    client, _, get = spied
    pages = 2 * N + 8
    r = Region(client, daemon, rng, "miss", "per_layer", 1, pages)
    try:
        perm = rng.sample(range(pages), 2 * N)
        src, dst = np.array(perm[:N]).reshape(N, 1), np.array(perm[N:]).reshape(N, 1)
        keys = [rng.randbytes(16) for _ in range(N)]
        assert client.batch_put_pages(r.ns, keys, r.region.page_batch(src)).stored == N
        sizes = part_sizes(N, 4)
        third = range(sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2])
        missing = set(rng.sample(list(third), 5)) | {third[0], third[-1]}
        asked = [b"miss-%d" % i if i in missing else k for i, k in enumerate(keys)]
        r.refill(dst, rng)
        before = r.arr.copy()
        found = client.batch_get_pages(r.ns, asked, r.region.page_batch(dst), in_flight=4)
        assert get.sent == sizes
        assert found == [i not in missing for i in range(N)]
        for i in range(N):
            if i in missing:
                assert np.array_equal(r.take(dst[i]), r.take(dst[i], before)), f"miss {i}: pages written"
            else:
                assert np.array_equal(r.take(dst[i]), r.take(src[i])), f"block {i}: pages differ"
    finally:
        r.close()


def test_bad_page_in_last_part(spied, daemon, rng):
    """A page id beyond the region in the last of three parts: the call raises the
    daemon's InvalidArgument with the field's index in the whole request, after every
    part finished. Not atomic across parts: the put stored the first two parts (byte-exact)
    and nothing of the last; the get wrote the first two parts' pages."""
    client, put, get = spied
    pages = 2 * N + 8
    r = Region(client, daemon, rng, "bad", "per_layer", 1, pages)
    try:
        perm = rng.sample(range(pages), 2 * N)
        src, dst = np.array(perm[:N]).reshape(N, 1), np.array(perm[N:]).reshape(N, 1)
        sizes = part_sizes(N, 3)
        last = sizes[0] + sizes[1]
        bad_at = N - 2
        bad = src.copy()
        bad[bad_at, 0] = pages
        keys = [rng.randbytes(16) for _ in range(N)]
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_pages(r.ns, keys, r.region.page_batch(bad), parents="chain", in_flight=3)
        assert e.value.field == f"items[{bad_at}].pages.page_ids[0]"
        assert put.sent == sizes
        inline = client.batch_get(r.ns, keys)
        assert [b is not None for b in inline] == [i < last for i in range(N)]
        for i in range(last):
            assert inline[i] == r.block(src[i]), f"block {i}"
        assert client.lookup(r.ns, keys).matched == last
        # the whole put again (good pages), then a get with the bad page id in its last part
        assert client.batch_put_pages(r.ns, keys, r.region.page_batch(src), in_flight=3).stored == N
        r.refill(dst, rng)
        before = r.arr.copy()
        bad_dst = dst.copy()
        bad_dst[bad_at, 0] = pages
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_get_pages(r.ns, keys, r.region.page_batch(bad_dst), in_flight=3)
        assert e.value.field is not None and e.value.field.startswith(f"pages[{bad_at}]"), e.value.field
        assert get.sent == sizes
        assert np.array_equal(r.take(dst[:last]), r.take(src[:last]))
        assert np.array_equal(r.take(dst[last:]), r.take(dst[last:], before))
        # the same in the first part: the index needs no shift, the other parts are stored
        keys2 = [rng.randbytes(16) for _ in range(N)]
        bad_first = src.copy()
        bad_first[3, 0] = pages
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client.batch_put_pages(r.ns, keys2, r.region.page_batch(bad_first), in_flight=3)
        assert e.value.field == "items[3].pages.page_ids[0]"
        assert [b is not None for b in client.batch_get(r.ns, keys2)] == [i >= sizes[0] for i in range(N)]
    finally:
        r.close()


def test_in_flight_checked_and_small_requests_not_split(spied, daemon, rng):
    """`in_flight` must be an int >= 1 (ValueError naming it, nothing sent); fewer than
    2 × WIRE_MIN_BLOCKS keys go as one request whatever `in_flight` says."""
    client, put, get = spied
    pages = 2 * N + 8
    r = Region(client, daemon, rng, "check", "cross_layer", 1, pages)
    try:
        keys = [rng.randbytes(16) for _ in range(N)]
        ids = r.region.page_batch(list(range(N)))
        for bad in (0, -1, 1.5, True, "2", None):
            with pytest.raises(ValueError, match="in_flight"):
                client.batch_put_pages(r.ns, keys, ids, in_flight=bad)
            with pytest.raises(ValueError, match="in_flight"):
                client.batch_get_pages(r.ns, keys, ids, in_flight=bad)
        assert put.sent == [] and get.sent == []
        assert client.lookup(r.ns, keys).matched == 0
        for n in (2 * WIRE_MIN_BLOCKS - 1, WIRE_MIN_BLOCKS):
            put.sent.clear()
            get.sent.clear()
            assert client.batch_put_pages(r.ns, keys[:n], ids[:n], in_flight=4).stored == n
            assert client.batch_get_pages(r.ns, keys[:n], ids[:n], in_flight=4) == [True] * n
            assert put.sent == [n] and get.sent == [n]
        # exactly 2 × WIRE_MIN_BLOCKS: two parts even when more are asked for
        n = 2 * WIRE_MIN_BLOCKS
        put.sent.clear()
        assert client.batch_put_pages(r.ns, keys[:n], ids[:n], in_flight=8).stored == n
        assert put.sent == [WIRE_MIN_BLOCKS, WIRE_MIN_BLOCKS]
    finally:
        r.close()


def test_more_keys_than_one_request_takes(spied, daemon, rng):
    """A page request and a lookup of more keys than the daemon takes in one request
    (`MAX_BATCH`, its default `max_batch`; a 128k-token prompt has 8,190 blocks of 16
    tokens): sent as requests of at most `MAX_BATCH` keys, the pages round trip byte-exact,
    and the lookup counts across its requests, stopping at the first key not stored."""
    client, put, get = spied
    n = MAX_BATCH + 50
    pages = 2 * n + 8
    r = Region(client, daemon, rng, "max-batch", "cross_layer", 1, pages)
    try:
        perm = rng.sample(range(pages), 2 * n)
        src, dst = np.array(perm[:n]), np.array(perm[n:])
        keys = [rng.randbytes(16) for _ in range(n)]
        resp = client.batch_put_pages(r.ns, keys, r.region.page_batch(src), parents="chain")
        assert put.sent == [n - n // 2, n // 2]
        assert resp.stored == n and list(resp.results) == [STORED] * n
        r.refill(dst, rng)
        assert client.batch_get_pages(r.ns, keys, r.region.page_batch(dst)) == [True] * n
        assert get.sent == [n - n // 2, n // 2]
        assert np.array_equal(r.take(dst), r.take(src))
        # the same through batch_get_results (the vLLM connector's loads)
        r.refill(dst, rng)
        got = client.batch_get_results(r.ns, keys, pages=r.region.page_batch(dst))
        assert [g.found for g in got] == [True] * n and [bytes(g.key) for g in got] == keys
        assert np.array_equal(r.take(dst), r.take(src))
        # lookup: all, a prefix ending on a request's boundary, and a gap in the second request
        assert client.lookup(r.ns, keys).matched == n
        assert client.lookup(r.ns, keys[:MAX_BATCH]).matched == MAX_BATCH
        gap = MAX_BATCH + 17
        asked = keys[:gap] + [b"not-stored"] + keys[gap + 1:]
        found = client.lookup(r.ns, asked)
        assert found.matched == gap and len(found.tiers) == gap
        assert client.lookup(r.ns, [b"not-stored"] + keys).matched == 0
        assert client.lookup(r.ns, []).matched == 0
    finally:
        r.close()
