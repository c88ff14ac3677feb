"""Region calls against the real daemon: one-part page requests of a `KvRegion.page_batch`
go on the region's own registration connection, not over gRPC, with the same bytes, the
same answers and the same refusals; a busy connection falls back to gRPC; a stopped daemon
costs a deadline, a dead one `Unavailable`, never a hang or a wrong page."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

import kvstrata
from kvstrata import layouts, pb
from kvstrata.region import PagedGeometry
from kvdaemon import Daemon, workdir

# The CPU backend stands in for a GPU: memfd regions take the daemon's direct path.
DAEMON_EXTRA = ("--gpu", "cpu")

L, PT, H, D, E = 3, 4, 2, 8, 2
PAGES = 64
N = 12  # blocks per request, over the client's minimum for the array-built requests


def spec(model: str) -> kvstrata.NamespaceSpec:
    return kvstrata.NamespaceSpec(model_id=model, num_layers=L, num_kv_heads=H, head_dim=D,
                                  dtype="bf16", block_tokens=2 * PT)  # 2 pages per block


def geometry() -> PagedGeometry:
    return PagedGeometry("per_layer", layers=L, page_tokens=PT, kv_heads=H, head_dim=D, dtype_bytes=E,
                         num_pages=PAGES)


def fill_random(arr: np.ndarray, rng) -> None:
    flat = arr.reshape(-1).view(np.uint8)
    flat[:] = np.frombuffer(rng.randbytes(flat.size), dtype=np.uint8)


def filled_region(region_path: str, name: str, rng) -> kvstrata.KvRegion:
    """A memfd region of `geometry()` registered as `name`, filled with random bytes."""
    region = kvstrata.KvRegion.create_memfd(region_path, geometry(), name)
    fill_random(region.array(np.uint16), rng)
    return region


def page_rows(rng, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Distinct pages for n blocks to save from and n blocks to load into."""
    ids = rng.sample(range(PAGES), 4 * n)
    rows = [ids[2 * i:2 * i + 2] for i in range(2 * n)]
    return rows[:n], rows[n:]


def test_page_batches_go_on_the_region_connection_byte_for_byte(client, daemon, rng):
    ns = client.register_namespace(spec("pytest-calls"))
    assert client.daemon_region_calls and client.region_calls
    with filled_region(daemon.region_path, "pytest-calls", rng) as region:
        arr = region.array(np.uint16)
        src, dst = page_rows(rng, N)
        keys = [b"c%d" % i for i in range(N)]
        before = region.calls.answered
        put = client.batch_put_pages(ns, keys, region.page_batch(src), parents="chain")
        assert put.stored == N and list(put.results) == [pb.PUT_STATUS_STORED] * N
        assert region.calls.answered == before + 1, "the put did not go on the region's connection"
        # the daemon's gather equals this package's reading of the layout
        ref = layouts.DaemonPerLayerLayout(arr)
        for b, got in zip(src, client.batch_get(ns, keys)):
            want = np.empty(ns.block_bytes, dtype=np.uint8)
            ref.gather(b, want)
            assert got == want.tobytes()
        snapshot = arr.copy()
        found = client.batch_get_pages(ns, keys + [b"missing"], region.page_batch(dst + [src[0]]))
        assert found == [True] * N + [False]
        assert region.calls.answered == before + 2, "the get did not go on the region's connection"
        for s, d in zip(src, dst):
            assert np.array_equal(arr[:, d], snapshot[:, s])
        touched = {p for row in dst for p in row}
        untouched = [p for p in range(PAGES) if p not in touched]
        assert np.array_equal(arr[:, untouched], snapshot[:, untouched]), "a page no key named changed"
        # a small put (a request of messages, not arrays) goes there too
        small = client.batch_put_pages(ns, [b"small"], region.page_batch([src[1]]))
        assert list(small.results) == [pb.PUT_STATUS_STORED]
        assert region.calls.answered == before + 3
        # the same requests over gRPC give the same answers
        with kvstrata.Client(daemon.uds_target, timeout=20, region_calls=False) as grpc_only:
            grpc_only.register_namespace(spec("pytest-calls"))
            for p in touched:
                fill_random(arr[:, p], rng)
            assert grpc_only.batch_get_pages(ns, keys + [b"missing"], region.page_batch(dst + [src[0]])) == \
                [True] * N + [False]
            for s, d in zip(src, dst):
                assert np.array_equal(arr[:, d], snapshot[:, s])
            assert region.calls.answered == before + 3, "region_calls=False still used the connection"


def test_refusals_are_those_of_grpc_and_store_nothing(client, daemon, rng):
    ns = client.register_namespace(spec("pytest-calls-bad"))
    other = client.register_namespace(kvstrata.NamespaceSpec(model_id="pytest-calls-other", num_layers=L + 1,
                                                              num_kv_heads=H, head_dim=D, dtype="bf16",
                                                              block_tokens=PT))
    with filled_region(daemon.region_path, "pytest-calls-bad", rng) as region, \
            kvstrata.Client(daemon.uds_target, timeout=20, region_calls=False) as grpc_only:
        grpc_only.register_namespace(spec("pytest-calls-bad"))
        keys = [b"b%d" % i for i in range(N)]
        src, _ = page_rows(rng, N)
        out_of_range = [row[:] for row in src]
        out_of_range[5][1] = PAGES
        cases = [
            (lambda c: c.batch_put_pages(ns, keys, region.page_batch(out_of_range)), kvstrata.InvalidArgument),
            (lambda c: c.batch_get_pages(ns, keys, region.page_batch(out_of_range)), kvstrata.InvalidArgument),
            (lambda c: c.batch_put_pages(other, keys, region.page_batch([[r[0]] for r in src])),
             kvstrata.InvalidArgument),
            (lambda c: c.batch_put_pages(b"\x01" * 16, keys, region.page_batch(src)), kvstrata.NotFound),
        ]
        for call, kind in cases:
            before = region.calls.answered
            with pytest.raises(kind) as by_call:
                call(client)
            assert region.calls.answered == before + 1
            with pytest.raises(kind) as by_grpc:
                call(grpc_only)
            assert (by_call.value.field, by_call.value.reason) == (by_grpc.value.field, by_grpc.value.reason)
            assert by_call.value.field, by_call.value
        assert client.batch_get(ns, keys) == [None] * N, "a refused request stored something"
        # the connection still serves calls afterwards
        assert client.batch_put_pages(ns, keys, region.page_batch(src)).stored == N
        assert region.calls.usable


def test_a_busy_connection_sends_over_grpc(client, daemon, rng):
    """Calls on one connection run one at a time; a thread that finds it taken does not
    wait: its request goes over gRPC."""
    ns = client.register_namespace(spec("pytest-calls-busy"))
    with filled_region(daemon.region_path, "pytest-calls-busy", rng) as region:
        arr = region.array(np.uint16)
        src, dst = page_rows(rng, N)
        keys = [b"t%d" % i for i in range(N)]
        before = region.calls.answered
        with region.calls._lock:
            assert client.batch_put_pages(ns, keys, region.page_batch(src)).stored == N
            assert client.batch_get_pages(ns, keys, region.page_batch(dst)) == [True] * N
        assert region.calls.answered == before
        for s, d in zip(src, dst):
            assert np.array_equal(arr[:, d], arr[:, s])
        # threads at once: each request by one path or the other, every page right
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                k = [b"w%d-%d" % (t, i) for i in range(N)]
                for _ in range(5):
                    assert client.batch_put_pages(ns, k, region.page_batch(src)).stored == N
                    assert client.batch_get(ns, k[:1]) == client.batch_get(ns, keys[:1])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_a_stopped_daemon_costs_a_deadline_and_a_dead_one_unavailable(rng):
    d = workdir("calls-")
    daemon = Daemon(d, extra=DAEMON_EXTRA)
    try:
        with kvstrata.Client(daemon.uds_target, timeout=20) as client, \
                filled_region(daemon.region_path, "pytest-calls-stop", rng) as region:
            ns = client.register_namespace(spec("pytest-calls-stop"))
            arr = region.array(np.uint16)
            src, dst = page_rows(rng, N)
            keys = [b"s%d" % i for i in range(N)]
            assert client.batch_put_pages(ns, keys, region.page_batch(src)).stored == N
            daemon.pause()
            try:
                with pytest.raises(kvstrata.DeadlineExceeded):
                    client.batch_get_pages(ns, keys, region.page_batch(dst), timeout=0.3)
            finally:
                daemon.resume()
            # the late answer to the call that timed out is skipped; this one's is read
            before = region.calls.answered
            assert client.batch_get_pages(ns, keys, region.page_batch(dst)) == [True] * N
            assert region.calls.answered == before + 1
            for s, t in zip(src, dst):
                assert np.array_equal(arr[:, t], arr[:, s])
            daemon.kill()
            with pytest.raises(kvstrata.Unavailable):
                client.batch_get_pages(ns, keys, region.page_batch(dst), timeout=5)
            assert not region.calls.usable and not region.is_registered()
            # retired: later requests go over gRPC, which finds no daemon either
            with pytest.raises(kvstrata.Unavailable):
                client.batch_put_pages(ns, keys, region.page_batch(src), timeout=2)
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)
