#!/usr/bin/env python3
"""The fixed cost of a Python page request, by transport and request form: region calls
(the region's own connection) against gRPC, and for puts the array form against one
`PutItem` per block. A memfd region of tiny pages, so the copies are negligible and what is
timed is the request around them. docs/benchmarks.md, "Region calls".

Not a test (pytest does not collect it). Run it against the release daemon:

    KVSTRATA_BIN=$CARGO_TARGET_DIR/release/kvstrata $CARGO_TARGET_DIR/pyenv/bin/python \\
        tests/python/bench_region_calls.py [--blocks 256] [--requests 200] [--runs 8] [--daemon-args "--gpu cpu"]

Every variant runs once per run, back to back (`--runs` alternations); each run's time is
the median of `--requests` requests, and the table gives the median over the runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import kvstrata
from kvstrata.region import PagedGeometry
from kvdaemon import Daemon, workdir

SPEC = dict(model_id="bench-region-calls", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bf16", block_tokens=4)


def timed_requests(client: kvstrata.Client, ns, region: kvstrata.KvRegion, n: int, requests: int, tag: str,
                   array_puts: bool) -> tuple[float, float]:
    """Median microseconds of a chained n-block page put and of a get of the same keys
    into other pages."""
    client.page_id_array_puts = client.page_id_array_puts and array_puts
    src, dst = region.page_batch(list(range(n))), region.page_batch(list(range(n, 2 * n)))
    puts, gets = [], []
    for r in range(requests):
        keys = [b"%s-%d-%d" % (tag.encode(), r, i) for i in range(n)]
        t0 = time.perf_counter()
        stored = client.batch_put_pages(ns, keys, src, parents="chain").stored
        t1 = time.perf_counter()
        found = client.batch_get_pages(ns, keys, dst)
        t2 = time.perf_counter()
        assert stored == n and all(found), f"{tag}: stored {stored}, found {sum(found)} of {n}"
        puts.append(t1 - t0)
        gets.append(t2 - t1)
        if r % 40 == 39:
            client.delete(ns, keys)
    return statistics.median(puts) * 1e6, statistics.median(gets) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--daemon-args", default="--gpu cpu")
    a = p.parse_args()
    d = workdir("bench-calls-")
    daemon = Daemon(d, extra=tuple(a.daemon_args.split()))
    variants = [(calls, arrays) for calls in (True, False) for arrays in (True, False)]
    times: dict = {v: [] for v in variants}
    try:
        geo = PagedGeometry("per_layer", layers=2, page_tokens=4, kv_heads=2, head_dim=16, dtype_bytes=2,
                            num_pages=2 * a.blocks + 8)
        with kvstrata.KvRegion.create_memfd(daemon.region_path, geo, "bench-calls") as region:
            for run in range(a.runs):
                for calls, arrays in variants:
                    with kvstrata.Client(daemon.uds_target, timeout=20, region_calls=calls) as client:
                        ns = client.register_namespace(kvstrata.NamespaceSpec(**SPEC))
                        times[(calls, arrays)].append(
                            timed_requests(client, ns, region, a.blocks, a.requests, f"{run}{calls:d}{arrays:d}",
                                           arrays))
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)
    print(f"{a.blocks}-block page requests, daemon {a.daemon_args!r}, median of {a.runs} runs "
          f"of {a.requests} requests each (µs)")
    print(f"{'transport':12} {'put form':10} {'put':>8} {'get':>8}")
    for (calls, arrays), v in times.items():
        put = statistics.median(x[0] for x in v)
        get = statistics.median(x[1] for x in v)
        print(f"{'region call' if calls else 'gRPC':12} {'array' if arrays else 'items':10} {put:8.0f} {get:8.0f}")


if __name__ == "__main__":
    main()
