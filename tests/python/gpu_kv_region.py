#!/usr/bin/env python3
"""KvRegion over CUDA IPC on a real GPU, in vLLM's own KV layouts (run on the lent GPU
machine, not in `make test`).

vLLM's KV cache of an 8B-class model (32 layers, 8 KV heads of 128, bf16, 16-token pages)
is allocated the way vLLM does it, one CUDA buffer holding every layer, and viewed as
vLLM's per-layer tensors in two layouts:

- "classic": `(2, num_blocks, block_size, kv_heads, head_size)` per layer (K of every page,
  then V: the geometry's K/V stride);
- "v032": vLLM 0.32's `[num_blocks, kv_heads, block_size, 2 * head_size]` views stored
  token-major (LBNHC, K and V of each token and head side by side).

`kvstrata.layouts.vllm_region_geometry` reads the geometry from the views; the buffer is
registered as it is (no copy, no staging) with `KvRegion.from_cuda_tensor`. Blocks of one
page are saved (BatchPut by page ids: the daemon gathers) and loaded into other pages
(BatchGet by page ids: the daemon scatters), byte-compared on the GPU, and timed (median
of ROUNDS rounds) against torch's own pinned-memory `copy_` of the same bytes in the same
run. Two daemons: the host tier only (`--gpu-hbm-bytes 0`: the pages cross PCIe, the
comparison with torch's pinned copies) and the default HBM tier.

Env: KVSTRATA_BIN (the daemon, a release build), KVSTRATA_TEST_TMP. Args: [num_blocks]
(default 256, 2 MiB each) [rounds] (default 5). Prints a table and one JSON line
(`KVSTRATA-GPU {...}`); the daemon's per-request timings (debug log of the region path)
are in the JSON's `log` fields.
"""

import json
import os
import shutil
import statistics
import sys
import time

import torch

import kvstrata
from kvstrata import layouts
from kvdaemon import Daemon, workdir

L, H, D, T, E = 32, 8, 128, 16, 2
CHUNK = T * H * D * E  # one layer's K (or V) of one page: 32 KiB
BLOCK = L * 2 * CHUNK  # one page of every layer: 2 MiB


class DebugDaemon(Daemon):
    """A daemon logging the region path's timings (debug)."""

    def start(self) -> None:
        i = self.cmd.index("--log-level")
        self.cmd[i + 1] = "info,kvstrata_server::region=debug"
        super().start()


def vllm_views(buf: torch.Tensor, pages: int, layout: str) -> list:
    """vLLM's per-layer tensors over one buffer (bf16 as int16: bytes are what move)."""
    e = buf.view(torch.int16)
    layer = 2 * pages * CHUNK // E
    if layout == "classic":
        return [torch.as_strided(e, (2, pages, T, H, D), (pages * CHUNK // E, CHUNK // E, H * D, D, 1), l * layer)
                for l in range(L)]
    # v032: logical [B, H, N, 2D], memory [B][N][H][2D]
    return [torch.as_strided(e, (pages, H, T, 2 * D), (2 * CHUNK // E, 2 * D, H * 2 * D, 1), l * layer)
            for l in range(L)]


def median(xs: list) -> float:
    return statistics.median(xs)


def run_layout(daemon: Daemon, client: kvstrata.Client, n: int, rounds: int, layout: str, tag: str) -> dict:
    pages = 2 * n + 8
    buf = torch.empty(L * 2 * pages * CHUNK, dtype=torch.uint8, device="cuda")
    buf.view(torch.int16).copy_(torch.randint(-32768, 32767, (buf.numel() // 2,), dtype=torch.int16, device="cuda"))
    views = vllm_views(buf, pages, layout)
    geo = layouts.vllm_region_geometry(views, num_blocks=pages, block_size=T, kv_heads=H, head_size=D)
    torch.cuda.synchronize()
    region = kvstrata.KvRegion.from_cuda_tensor(daemon.region_path, views[0], geo, f"gpu-{tag}-{layout}")
    ns = client.register_namespace(kvstrata.NamespaceSpec(model_id=f"gpu-{tag}-{layout}", num_layers=L,
                                                          num_kv_heads=H, head_dim=D, dtype="bf16", block_tokens=T))
    assert ns.block_bytes == BLOCK
    perm = torch.randperm(pages).tolist()
    src, dst = perm[:n], perm[n:2 * n]
    # warm-up (first launches, first touch of the tiers' memory) on other keys
    client.batch_put_pages(ns, [b"w0", b"w1"], [region.pages([src[0]]), region.pages([src[1]])])
    client.batch_get_pages(ns, [b"w0", b"w1"], [region.pages([dst[0]]), region.pages([dst[1]])])
    puts, gets = [], []
    for r in range(rounds):
        keys = [b"%d-%d" % (r, i) for i in range(n)]
        t0 = time.perf_counter()
        put = client.batch_put_pages(ns, keys, [region.pages([p]) for p in src])
        puts.append(time.perf_counter() - t0)
        assert put.stored == n, f"{layout}: stored {put.stored} of {n}: {list(put.results)[:8]}"
        t0 = time.perf_counter()
        found = client.batch_get_pages(ns, keys, [region.pages([p]) for p in dst])
        gets.append(time.perf_counter() - t0)
        assert all(found), f"{layout}: {found.count(False)} of {n} not found"
        torch.cuda.synchronize()
        pick = (lambda v, ids: v[:, ids]) if layout == "classic" else (lambda v, ids: v[ids])
        if not all(torch.equal(pick(v, dst), pick(v, src)) for v in views):
            bad = [i for i in range(n) if not all(torch.equal(pick(v, [dst[i]]), pick(v, [src[i]])) for v in views)]
            raise AssertionError(f"{layout} round {r}: blocks {bad[:8]} differ after the round trip")
        # the target pages get fresh random bytes, so the next round's load must write them again
        for v in views:
            if layout == "classic":
                v[:, dst] = torch.randint(-32768, 32767, v[:, dst].shape, dtype=torch.int16, device="cuda")
            else:
                v[dst] = torch.randint(-32768, 32767, v[dst].shape, dtype=torch.int16, device="cuda")
        torch.cuda.synchronize()
        client.delete(ns, keys)
    region.close()
    total = n * BLOCK
    return {"geometry": str(geo), "blocks": n, "block_bytes": BLOCK, "put_s": puts, "get_s": gets,
            "put_GBps": total / median(puts) / 1e9, "get_GBps": total / median(gets) / 1e9}


def torch_pinned(nbytes: int, rounds: int) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.random_(0, 255)
    for _ in range(2):
        host.copy_(dev)
        dev.copy_(host)
    torch.cuda.synchronize()
    d2h, h2d = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        host.copy_(dev)
        torch.cuda.synchronize()
        d2h.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dev.copy_(host)
        torch.cuda.synchronize()
        h2d.append(time.perf_counter() - t0)
    return {"d2h_GBps": nbytes / median(d2h) / 1e9, "h2d_GBps": nbytes / median(h2d) / 1e9,
            "d2h_s": d2h, "h2d_s": h2d}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    out = {"device": torch.cuda.get_device_name(0), "binary": os.environ.get("KVSTRATA_BIN"), "blocks": n,
           "rounds": rounds}
    out["torch_pinned"] = torch_pinned(n * BLOCK, rounds)
    for tag, extra in (("host-tier", ("--gpu", "on", "--gpu-hbm-bytes", "0")), ("hbm-tier", ("--gpu", "on"))):
        d = workdir(f"gpu-{tag}-")
        daemon = DebugDaemon(d, extra=extra, host_capacity="8GiB")
        try:
            client = kvstrata.Client(daemon.uds_target, timeout=120)
            for layout in ("classic", "v032"):
                out[f"{tag}/{layout}"] = run_layout(daemon, client, n, rounds, layout, tag)
            client.close()
        finally:
            daemon.stop()
            log = daemon.log(200000)
            shutil.rmtree(d, ignore_errors=True)
        out[f"{tag}/log"] = [line for line in log.splitlines() if "KV region: direct" in line][-12:]
    # a second baseline after the daemons: the spread of the ceiling itself
    out["torch_pinned_after"] = torch_pinned(n * BLOCK, rounds)
    ceil = out["torch_pinned"]
    print(f"device {out['device']}, {n} blocks of {BLOCK >> 20} MiB, median of {rounds}")
    print(f"torch pinned copy_: d2h {ceil['d2h_GBps']:.1f} GB/s, h2d {ceil['h2d_GBps']:.1f} GB/s "
          f"(after: {out['torch_pinned_after']['d2h_GBps']:.1f}, {out['torch_pinned_after']['h2d_GBps']:.1f})")
    for tag in ("host-tier", "hbm-tier"):
        for layout in ("classic", "v032"):
            r = out[f"{tag}/{layout}"]
            r["save_vs_torch_d2h"] = r["put_GBps"] / ceil["d2h_GBps"]
            r["load_vs_torch_h2d"] = r["get_GBps"] / ceil["h2d_GBps"]
            print(f"{tag:9} {layout:7} save {r['put_GBps']:6.1f} GB/s ({r['save_vs_torch_d2h']:.2f} of d2h)  "
                  f"load {r['get_GBps']:6.1f} GB/s ({r['load_vs_torch_h2d']:.2f} of h2d)")
    print("KVSTRATA-GPU " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
