"""The page requests built by `kvstrata._wire` (BatchPut / BatchGet naming KV-region pages,
encoded with numpy from `KvRegion.page_batch` arrays or serialized `KvPages`): the bytes
equal protobuf's own serialization of the same message, case after case, and the real
daemon stores and scatters byte-exact through them in both of its region layouts."""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

import grpc
import numpy as np
import pytest

import kvstrata
from kvstrata import _wire, layouts, pb
from kvstrata.client import CUDA_IPC_EVENT_BYTES, WIRE_MIN_BLOCKS
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
            compact, when_queued = rng.random() < 0.5, rng.random() < 0.5
            assert _wire.batch_get_page_ids_request(ns, keys, region_id, ids, compact, when_queued) == \
                pb.BatchGetRequest(namespace_id=ns, keys=[bytes(k) for k in keys], page_region_id=region_id,
                                   page_ids=ids.reshape(-1).tolist(), compact_answer=compact,
                                   answer_when_queued=when_queued).SerializeToString(), \
                f"{what} compact={compact} when_queued={when_queued}"
            parents = [rng.randbytes(rng.choice([0, 16, 130])) for _ in range(n)]
            assert _wire.batch_put_pages_request(ns, keys, parents, rows) == \
                reference_put(ns, keys, parents, messages), what
            first = rng.choice([b"", rng.randbytes(16), rng.randbytes(150)])
            chain = [first] + [bytes(k) for k in keys[:-1]]
            assert _wire.batch_put_pages_request(ns, keys, "chain", rows, first) == \
                reference_put(ns, keys, chain, messages), what
        # the array form of a put
        parents = rng.choice([[b""] * n, [rng.randbytes(rng.choice([0, 16, 130])) for _ in range(n)]])
        first = rng.choice([b"", rng.randbytes(16), rng.randbytes(150)])
        plain = [bytes(k) for k in keys]
        assert _wire.batch_put_page_ids_request(ns, keys, parents, region_id, ids) == pb.BatchPutRequest(
            namespace_id=ns, keys=plain, page_region_id=region_id, page_ids=ids.reshape(-1).tolist(),
            parents=parents if any(parents) else []).SerializeToString(), f"case {case}: array put"
        assert _wire.batch_put_page_ids_request(ns, keys, "chain", region_id, ids, first) == pb.BatchPutRequest(
            namespace_id=ns, keys=plain, page_region_id=region_id, page_ids=ids.reshape(-1).tolist(),
            chain_parents=True, first_parent=first).SerializeToString(), f"case {case}: array put, chain"


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
    # the CUDA device of the region (None: memfd), kept by slices
    assert b.device is None and b[1:].device is None
    cuda = PageBatch(7, [[1, 2], [3, 4], [5, 6]], device=2)
    assert cuda.device == 2 and cuda[1:].device == 2 and cuda[::2].device == 2 and "cuda:2" in repr(cuda)
    assert list(cuda[1:]) == list(cuda)[1:]
    for bad in (-1, True, 1.0, "0"):
        with pytest.raises(ValueError, match="device"):
            PageBatch(7, [1], device=bad)
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
            # a daemon that reads page puts in the array form gets a page batch's puts so
            client.page_id_array_puts = True
            for parents, first, want_parents in ((None, None, {}),
                                                 ("chain", b"f" * 16, {"chain_parents": True,
                                                                       "first_parent": b"f" * 16}),
                                                 ([None, b"p"] * (n // 2), None,
                                                  {"parents": [b"", b"p"] * (n // 2)})):
                assert client.batch_put_pages(ns, keys, pages, parents=parents, first_parent=first).stored == n
                want = (pb.BatchPutRequest(namespace_id=ns, keys=keys, page_region_id=99,
                                           page_ids=ids.reshape(-1).tolist(), **want_parents).SerializeToString()
                        if isinstance(pages, PageBatch) else reference_put(ns, keys, [b""] * n, messages)
                        if parents is None else put.sent[-1])
                assert put.sent[-1] == want
            client.page_id_arrays = client.compact_answers = client.page_id_array_puts = False
        assert len(put.sent) == 14 and len(get.sent) == 7
    finally:
        client.close()


def test_when_queued_request_equals_protobufs():
    """`answer_when_queued` (field 8) is written last, as protobuf writes it, with or without
    the compact answer, keys, a region id and page ids."""
    ids = np.array([[0, 300], [1 << 31, 7]], dtype=np.uint32)
    for ns, keys, region_id, page_ids in ((b"n" * 16, [b"a" * 16, b"b"], 5, ids), (b"", [], 0, ids[:0]),
                                          (b"n", [b"k"], (1 << 64) - 1, ids[:1])):
        for compact in (False, True):
            for when_queued in (False, True):
                want = pb.BatchGetRequest(namespace_id=ns, keys=keys, page_region_id=region_id,
                                          page_ids=page_ids.reshape(-1).tolist(), compact_answer=compact,
                                          answer_when_queued=when_queued).SerializeToString()
                got = _wire.batch_get_page_ids_request(ns, keys, region_id, page_ids, compact, when_queued)
                assert got == want, (ns, keys, region_id, compact, when_queued)
                assert got.endswith(b"\x40\x01") == when_queued


class Done:
    """A finished grpc future: an answer, or an error."""

    def __init__(self, answer: Any = None, error: Optional[BaseException] = None) -> None:
        self.answer, self.error = answer, error

    def exception(self, timeout=None) -> Optional[BaseException]:
        return self.error

    def result(self, timeout=None) -> Any:
        if self.error is not None:
            raise self.error
        return self.answer


class Refused(grpc.RpcError):
    """A daemon's refusal, as grpcio raises it."""

    def __init__(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return self._details


class Daemonless:
    """Stands in for the client's raw BatchGet callable, called or as a future (parts in
    flight): keeps each request parsed and answers `answer(request)` (an answer or a
    `grpc.RpcError` to fail with)."""

    def __init__(self, answer: Callable[[pb.BatchGetRequest], Any]) -> None:
        self.answer = answer
        self.sent: list[pb.BatchGetRequest] = []
        self.raw: list[bytes] = []

    def _answer(self, request: bytes) -> Done:
        msg = pb.BatchGetRequest.FromString(request)
        self.sent.append(msg)
        self.raw.append(request)
        out = self.answer(msg)
        return Done(error=out) if isinstance(out, BaseException) else Done(out)

    def __call__(self, request: bytes, timeout=None, metadata=None) -> Any:
        return self._answer(request).result()

    def future(self, request: bytes, timeout=None, metadata=None) -> Done:
        return self._answer(request)


def compact_answer(event: bytes = b"") -> Callable[[pb.BatchGetRequest], pb.BatchGetResponse]:
    """Every key found (in HBM), the answer naming `event`."""
    return lambda req: pb.BatchGetResponse(tiers=[pb.TIER_HBM] * len(req.keys), pages_ready_event=event)


class FakeEvent:
    """A CUDA event opened from an IPC handle, polled with `query`: not complete at a wait's
    first look, complete at the next; counts its waits. `fail`: each wait raises; `never`:
    it never completes (its process died with the copies queued)."""

    def __init__(self, device: Any, handle: bytes, fail: bool, never: bool = False) -> None:
        self.device, self.handle, self.fail, self.never, self.waits = device, handle, fail, never, 0
        self.looked = False

    def query(self) -> bool:
        if self.fail:
            self.waits += 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.never or not self.looked:
            self.looked = True
            return False
        self.looked = False
        self.waits += 1
        return True


def fake_torch(opened: list, fail_open: bool = False, fail_wait: bool = False, never: bool = False) -> Any:
    """Stands in for torch (`torch.device`, `torch.cuda.Event.from_ipc_handle`), keeping
    every event it opened in `opened`."""

    def from_ipc_handle(device: Any, handle: bytes) -> FakeEvent:
        if fail_open:
            raise RuntimeError("CUDA error: invalid resource handle")
        assert isinstance(handle, bytes) and len(handle) == CUDA_IPC_EVENT_BYTES
        event = FakeEvent(device, handle, fail_wait, never)
        opened.append(event)
        return event

    return types.SimpleNamespace(device=lambda kind, index: f"{kind}:{index}",
                                 cuda=types.SimpleNamespace(Event=types.SimpleNamespace(from_ipc_handle=from_ipc_handle)))


@pytest.fixture
def offline():
    """A client whose BatchGet goes nowhere (`Daemonless`, set by the test), told by a
    daemon that it reads page-id arrays and answers compactly."""
    client = kvstrata.Client("unix:///nonexistent/kvstrata.sock")
    client.page_id_arrays = client.compact_answers = True
    yield client
    client.close()


def when_queued_case(rng, n: int = 4 * WIRE_MIN_BLOCKS + 5):
    return rng.randbytes(16), [rng.randbytes(16) for _ in range(n)], np.array(
        [rng.randrange(1 << 20) for _ in range(n)]).reshape(n, 1)


def test_when_queued_asked_only_into_cuda_pages(offline, monkeypatch, rng):
    """A page batch with a CUDA device asks `answer_when_queued` (one request, and every part
    in flight), byte for byte as protobuf serializes it; a memfd region's batch (no device),
    a list of `KvPages`, `batch_get_results`, and a client with it turned off never ask; an
    answer with no event returns at once (torch is not even imported)."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` would raise
    ns, keys, ids = when_queued_case(rng)
    n = len(keys)
    get = Daemonless(compact_answer())
    offline._raw = {"BatchGet": get}
    assert offline.answer_when_queued
    cuda, memfd = PageBatch(99, ids, device=0), PageBatch(99, ids)
    assert offline.batch_get_pages(ns, keys, cuda) == [True] * n
    assert get.raw[-1] == pb.BatchGetRequest(namespace_id=ns, keys=keys, page_region_id=99,
                                             page_ids=ids.reshape(-1).tolist(), compact_answer=True,
                                             answer_when_queued=True).SerializeToString()
    get.sent.clear()
    assert offline.batch_get_pages(ns, keys, cuda, in_flight=3) == [True] * n
    assert [len(m.keys) for m in get.sent] == [n - 2 * (n // 3), n // 3, n // 3]
    assert all(m.answer_when_queued and m.compact_answer for m in get.sent)
    assert offline.queued_answers == 0 and offline._ready_events == {}
    # a memfd region's batch never asks, in one request or in parts
    get.sent.clear()
    assert offline.batch_get_pages(ns, keys, memfd) == [True] * n
    assert offline.batch_get_pages(ns, keys, memfd, in_flight=2) == [True] * n
    assert len(get.sent) == 3 and not any(m.answer_when_queued for m in get.sent)
    assert get.raw[-3] == pb.BatchGetRequest(namespace_id=ns, keys=keys, page_region_id=99,
                                            page_ids=ids.reshape(-1).tolist(),
                                            compact_answer=True).SerializeToString()
    # one KvPages per key, and batch_get_results (one GetResult per key): never asked
    get.sent.clear()
    get.answer = lambda req: pb.BatchGetResponse(results=[pb.GetResult(key=k, found=True) for k in req.keys])
    assert offline.batch_get_pages(ns, keys, list(cuda)) == [True] * n
    assert [r.found for r in offline.batch_get_results(ns, keys, pages=cuda)] == [True] * n
    assert len(get.sent) == 2 and not any(m.answer_when_queued for m in get.sent)
    # turned off: the request is the one before this feature
    get.answer = compact_answer()
    get.sent.clear()
    offline.answer_when_queued = False
    assert offline.batch_get_pages(ns, keys, cuda) == [True] * n
    assert offline.batch_get_pages(ns, keys, cuda, in_flight=2) == [True] * n
    assert len(get.sent) == 3 and not any(m.answer_when_queued for m in get.sent)


@pytest.mark.parametrize("value,on", [(None, True), ("", True), ("1", True), ("on", True), ("true", True),
                                      ("0", False), ("off", False), ("false", False), ("OFF", False),
                                      (" False ", False)])
def test_answer_when_queued_from_env(monkeypatch, value, on):
    """`KVSTRATA_ANSWER_WHEN_QUEUED` (read when the client is made) turns it off with 0, off
    or false; the constructor's keyword wins over it."""
    if value is None:
        monkeypatch.delenv("KVSTRATA_ANSWER_WHEN_QUEUED", raising=False)
    else:
        monkeypatch.setenv("KVSTRATA_ANSWER_WHEN_QUEUED", value)
    for kw, want in ((None, on), (True, True), (False, False)):
        with kvstrata.Client("unix:///nonexistent/kvstrata.sock", answer_when_queued=kw) as c:
            assert c.answer_when_queued is want, (value, kw)


def test_pages_ready_event_waited_on(offline, monkeypatch, rng):
    """An answer naming an event: the client opens it once on the batch's device (the daemon
    keeps one per region), waits on it before returning, once per get however many parts
    answered with it, and counts the answers; another handle is opened besides it."""
    opened: list = []
    monkeypatch.setitem(sys.modules, "torch", fake_torch(opened))
    ns, keys, ids = when_queued_case(rng)
    n = len(keys)
    event = rng.randbytes(CUDA_IPC_EVENT_BYTES)
    get = Daemonless(compact_answer(event))
    offline._raw = {"BatchGet": get}
    cuda = PageBatch(99, ids, device=3)
    assert offline.batch_get_pages(ns, keys, cuda) == [True] * n
    assert [(e.device, e.handle, e.waits) for e in opened] == [("cuda:3", event, 1)]
    assert offline.batch_get_pages(ns, keys, cuda, in_flight=4) == [True] * n
    assert len(get.sent) == 5 and all(m.answer_when_queued for m in get.sent)
    assert len(opened) == 1 and opened[0].waits == 2  # one wait after the four parts answered
    assert offline.queued_answers == 5
    assert list(offline._ready_events) == [(3, event)]
    # parts answered with and without an event (the daemon answered some after their copies)
    get.answer = lambda req: pb.BatchGetResponse(tiers=[pb.TIER_HOST] * len(req.keys),
                                                 pages_ready_event=event if req.keys[0] == keys[0] else b"")
    assert offline.batch_get_pages(ns, keys, cuda, in_flight=2) == [True] * n
    assert opened[0].waits == 3 and offline.queued_answers == 6
    # a second region's event (another handle): opened once too
    other = rng.randbytes(CUDA_IPC_EVENT_BYTES)
    get.answer = compact_answer(other)
    assert offline.batch_get_pages(ns, keys, PageBatch(100, ids, device=3)) == [True] * n
    assert offline.batch_get_pages(ns, keys, PageBatch(100, ids, device=3)) == [True] * n
    assert [(e.handle, e.waits) for e in opened] == [(event, 3), (other, 2)]
    assert len(offline._ready_events) == 2


def test_bad_pages_ready_event_raises(offline, monkeypatch, rng):
    """A handle that is not 64 bytes, an event that cannot be opened (no torch, or the driver
    refusing it) or waited on: `KvstrataError` naming `pages_ready_event` (the caller treats the
    load as misses). An event that failed a wait is opened afresh next time. A part refused
    while others answered with an event: the event is waited on, then the part's error raised."""
    opened: list = []
    monkeypatch.setitem(sys.modules, "torch", fake_torch(opened))
    ns, keys, ids = when_queued_case(rng)
    n = len(keys)
    cuda = PageBatch(99, ids, device=0)
    event = rng.randbytes(CUDA_IPC_EVENT_BYTES)
    get = Daemonless(compact_answer(event[:63]))
    offline._raw = {"BatchGet": get}
    for in_flight in (1, 3):
        with pytest.raises(kvstrata.KvstrataError, match="pages_ready_event: 63 bytes, not the 64"):
            offline.batch_get_pages(ns, keys, cuda, in_flight=in_flight)
    get.answer = compact_answer(event + b"\0")
    with pytest.raises(kvstrata.KvstrataError, match="pages_ready_event: 65 bytes"):
        offline.batch_get_pages(ns, keys, cuda)
    assert opened == [] and offline._ready_events == {}
    # opening fails: torch refuses the handle, or there is no torch
    get.answer = compact_answer(event)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(opened, fail_open=True))
    with pytest.raises(kvstrata.KvstrataError, match="pages_ready_event: opening .* on cuda:0 failed .*invalid resource"):
        offline.batch_get_pages(ns, keys, cuda)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(kvstrata.KvstrataError, match="pages_ready_event: opening .*import of torch"):
        offline.batch_get_pages(ns, keys, cuda)
    assert offline._ready_events == {}
    # waiting fails: raised, and the event dropped so that the next get opens it again
    monkeypatch.setitem(sys.modules, "torch", fake_torch(opened, fail_wait=True))
    with pytest.raises(kvstrata.KvstrataError, match="pages_ready_event: waiting .* failed .*illegal memory"):
        offline.batch_get_pages(ns, keys, cuda, in_flight=2)
    assert len(opened) == 1 and opened[0].waits == 1 and offline._ready_events == {}
    monkeypatch.setitem(sys.modules, "torch", fake_torch(opened))
    assert offline.batch_get_pages(ns, keys, cuda) == [True] * n
    assert len(opened) == 2 and opened[1].waits == 1
    # the second of three parts refused: the others' event waited on before its error is raised
    bad_key = keys[n // 3 + 1]
    get.answer = lambda req: (Refused("page_ids[4]: page 99999999 is beyond the region") if bad_key in req.keys
                              else compact_answer(event)(req))
    with pytest.raises(kvstrata.InvalidArgument) as e:
        offline.batch_get_pages(ns, keys, cuda, in_flight=3)
    assert e.value.field == f"pages[{n - 2 * (n // 3) + 4}].page_ids[0]"
    assert opened[1].waits == 2
    # an empty event: answered after the copies, nothing to wait on
    get.answer = compact_answer(b"")
    assert offline.batch_get_pages(ns, keys, cuda) == [True] * n
    assert opened[1].waits == 2
    # an event that never completes (its daemon died with the copies queued): no hang, an
    # error once READY_WAIT_SECONDS have passed, and the event dropped
    monkeypatch.setattr(kvstrata.client, "READY_WAIT_SECONDS", 0.05)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(opened, never=True))
    get.answer = compact_answer(rng.randbytes(CUDA_IPC_EVENT_BYTES))
    with pytest.raises(kvstrata.KvstrataError, match="pages_ready_event: waiting .*not complete after 0.05 s"):
        offline.batch_get_pages(ns, keys, cuda)
    assert len(opened) == 3 and opened[2].waits == 0
    assert all(h != opened[2].handle for _, h in offline._ready_events)


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


class Forward:
    """Wraps the client's raw BatchGet callable, forwarding every call to the daemon, and
    keeps each request parsed (in order sent)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[pb.BatchGetRequest] = []

    def __call__(self, request: bytes, **kw: Any) -> Any:
        self.sent.append(pb.BatchGetRequest.FromString(request))
        return self.inner(request, **kw)

    def future(self, request: bytes, **kw: Any) -> Any:
        self.sent.append(pb.BatchGetRequest.FromString(request))
        return self.inner.future(request, **kw)


def test_when_queued_into_memfd_pages(client, daemon, rng):
    """Gets into a memfd region asking `answer_when_queued` (the page-id array with the compact
    answer or one `GetResult` per key, one `KvPages` per key, and through `batch_get_pages` with a
    batch that claims a CUDA device, in one request and in parts): the daemon writes the pages
    before it answers, so every answer is byte-exact and names no event; the misses' pages
    stay untouched. An inline get asking for it is refused, naming the field."""
    n = 2 * WIRE_MIN_BLOCKS + 3
    pages = 6 * n + 8
    geo = geometry("per_layer", pages)
    ns = client.register_namespace(kvstrata.NamespaceSpec(model_id="pytest-wire-when-queued", num_layers=3,
                                                          num_kv_heads=2, head_dim=8, dtype="bf16", block_tokens=4))
    assert client.page_id_arrays and client.compact_answers and client.answer_when_queued
    with kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "pytest-wire-when-queued") as region:
        assert region.page_batch([0]).device is None
        arr = region.array(np.uint16)
        arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(rng.randbytes(arr.nbytes), dtype=np.uint8)
        perm = rng.sample(range(pages), 6 * n)
        src = np.array(perm[:n]).reshape(n, 1)
        keys = [rng.randbytes(16) for _ in range(n)]
        assert client.batch_put_pages(ns, keys, region.page_batch(src)).stored == n
        want = [reference_block(arr, "per_layer", row) for row in src]
        asked = keys[:-1] + [b"miss"]

        def check(dst: np.ndarray, snapshot: np.ndarray, what: str) -> None:
            for i in range(n - 1):
                assert reference_block(arr, "per_layer", dst[i]) == want[i], f"{what}: block {i} (page {dst[i]})"
            assert reference_block(arr, "per_layer", dst[-1]) == reference_block(snapshot, "per_layer", dst[-1]), \
                f"{what}: the miss's page was written"

        def raw_get(request: bytes) -> Any:
            assert pb.BatchGetRequest.FromString(request).answer_when_queued
            return client._call_raw("BatchGet", request, None)

        targets = [np.array(perm[(1 + i) * n:(2 + i) * n]).reshape(n, 1) for i in range(5)]
        # the page-id array, compact answer
        snapshot = arr.copy()
        answer = raw_get(_wire.batch_get_page_ids_request(ns.id, asked, region.id, targets[0], True, True))
        assert answer.pages_ready_event == b""
        assert [t != pb.TIER_UNSPECIFIED for t in answer.tiers] == [True] * (n - 1) + [False]
        check(targets[0], snapshot, "page ids, compact")
        # the page-id array, one GetResult per key
        snapshot = arr.copy()
        answer = raw_get(_wire.batch_get_page_ids_request(ns.id, asked, region.id, targets[1], False, True))
        assert answer.pages_ready_event == b"" and [r.found for r in answer.results] == [True] * (n - 1) + [False]
        check(targets[1], snapshot, "page ids, one result per key")
        # one KvPages per key (field 8 after them, as protobuf writes it)
        snapshot = arr.copy()
        per_key = _wire.batch_get_pages_request(ns.id, asked, region.page_batch(targets[2]).wire_rows())
        request = per_key + bytes((_wire.TAG_GET_WHEN_QUEUED, 1))
        assert request == pb.BatchGetRequest(namespace_id=ns.id, keys=asked, pages=list(region.page_batch(targets[2])),
                                             answer_when_queued=True).SerializeToString()
        answer = raw_get(request)
        assert answer.pages_ready_event == b"" and [r.found for r in answer.results] == [True] * (n - 1) + [False]
        check(targets[2], snapshot, "one KvPages per key")
        # batch_get_pages with a batch claiming CUDA device 0: asked, answered with no event
        spy = Forward(client._raw["BatchGet"])
        client._raw = {**client._raw, "BatchGet": spy}
        for in_flight, dst in ((1, targets[3]), (2, targets[4])):
            snapshot = arr.copy()
            spy.sent.clear()
            found = client.batch_get_pages(ns, asked, PageBatch(region.id, dst, device=0), in_flight=in_flight)
            assert found == [True] * (n - 1) + [False]
            assert len(spy.sent) == in_flight and all(m.answer_when_queued for m in spy.sent)
            check(dst, snapshot, f"batch_get_pages, in_flight={in_flight}")
        assert client.queued_answers == 0 and client._ready_events == {}
        # an inline get cannot be answered before its bytes are in the answer
        with pytest.raises(kvstrata.InvalidArgument) as e:
            client._call("BatchGet", pb.BatchGetRequest(namespace_id=ns.id, keys=keys[:2], answer_when_queued=True),
                         None)
        assert e.value.field == "answer_when_queued"
