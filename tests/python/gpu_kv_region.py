#!/usr/bin/env python3
"""KvRegion over CUDA IPC on a real GPU (run on the lent GPU machine, not in `make test`):
a torch CUDA tensor holding a paged KV cache in the daemon's per-layer layout is
registered through CUDA IPC; blocks are saved and loaded by page ids (the daemon gathers
and scatters on the device), byte-compared on the GPU, and timed against torch's own
pinned-memory `copy_` in the same run. Prints one JSON line.

Env: KVSTRATA_BIN (the daemon), KVSTRATA_TEST_TMP. Args: [num_blocks] (default 256).
8B-class geometry: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token pages (2 MiB blocks).
"""

import json
import os
import shutil
import sys
import time

import numpy as np
import torch

import kvstrata
from kvstrata import layouts
from kvdaemon import Daemon, workdir

L, H, D, T, E = 32, 8, 128, 16, 2


def run(daemon: Daemon, n: int, tag: str) -> dict:
    pages = 2 * n + 8
    geo = kvstrata.PagedGeometry("per_layer", layers=L, page_tokens=T, kv_heads=H, head_dim=D,
                                 dtype_bytes=E, num_pages=pages)
    buf = torch.empty(geo.end_bytes, dtype=torch.uint8, device="cuda")
    kv = buf.view(torch.int16).view(L, pages, 2, T, H, D)
    kv.copy_(torch.randint(-32768, 32767, kv.shape, dtype=torch.int16, device="cuda"))
    torch.cuda.synchronize()
    region = kvstrata.KvRegion.from_cuda_tensor(daemon.region_path, buf, geo, f"gpu-{tag}")
    client = kvstrata.Client(daemon.uds_target, timeout=120)
    ns = client.register_namespace(kvstrata.NamespaceSpec(model_id=f"gpu-{tag}", num_layers=L, num_kv_heads=H,
                                                          head_dim=D, dtype="bf16", block_tokens=T))
    perm = torch.randperm(pages).tolist()
    src, dst = perm[:n], perm[n:2 * n]
    keys = [b"k%d" % i for i in range(n)]
    # warm-up (kernel compile, first-touch) on other keys
    client.batch_put_pages(ns, [b"w0", b"w1"], [region.pages([src[0]]), region.pages([src[1]])])
    client.batch_get_pages(ns, [b"w0", b"w1"], [region.pages([dst[0]]), region.pages([dst[1]])])
    t0 = time.perf_counter()
    put = client.batch_put_pages(ns, keys, [region.pages([p]) for p in src])
    t_put = time.perf_counter() - t0
    assert put.stored == n, f"stored {put.stored} of {n}: {list(put.results)[:8]}"
    t0 = time.perf_counter()
    found = client.batch_get_pages(ns, keys, [region.pages([p]) for p in dst])
    t_get = time.perf_counter() - t0
    assert all(found), f"{found.count(False)} of {n} not found"
    torch.cuda.synchronize()
    mismatched = [i for i in range(n) if not torch.equal(kv[:, dst[i]], kv[:, src[i]])]
    assert not mismatched, f"blocks {mismatched[:8]} differ after the round trip"
    # the daemon's block format is what kvstrata.layouts reads from the same layout
    one = client.batch_get(ns, [keys[0]])[0]
    want = np.empty(ns.block_bytes, dtype=np.uint8)
    layouts.DaemonPerLayerLayout(kv[:, src[0]:src[0] + 1].cpu().numpy()).gather([0], want)
    assert one == want.tobytes(), "inline block differs from the layout's gather"
    tiers = {kvstrata.pb.Tier.Name(t.tier): t.blocks for t in client.stats().tiers}
    region.close()
    client.close()
    total = n * ns.block_bytes
    return {"tag": tag, "blocks": n, "block_bytes": ns.block_bytes, "put_s": t_put, "get_s": t_get,
            "put_GBps": total / t_put / 1e9, "get_GBps": total / t_get / 1e9, "tiers": tiers}


def torch_pinned(nbytes: int) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        host.copy_(dev)
        dev.copy_(host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host.copy_(dev)
    torch.cuda.synchronize()
    d2h = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev.copy_(host)
    torch.cuda.synchronize()
    h2d = time.perf_counter() - t0
    return {"d2h_GBps": nbytes / d2h / 1e9, "h2d_GBps": nbytes / h2d / 1e9}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    out = {"device": torch.cuda.get_device_name(0), "binary": os.environ.get("KVSTRATA_BIN")}
    for tag, extra in (("host-tier", ("--gpu", "on", "--gpu-hbm-bytes", "0")), ("hbm-tier", ("--gpu", "on"))):
        d = workdir(f"gpu-{tag}-")
        daemon = Daemon(d, extra=extra, host_capacity="8GiB")
        try:
            out[tag] = run(daemon, n, tag)
        finally:
            daemon.stop()
            log = daemon.log(3000)
            shutil.rmtree(d, ignore_errors=True)
        out[tag]["log_tail"] = log[-800:]
    out["torch_pinned"] = torch_pinned(n * L * 2 * T * H * D * E)
    out["put_vs_torch_d2h"] = out["host-tier"]["put_GBps"] / out["torch_pinned"]["d2h_GBps"]
    out["get_vs_torch_h2d"] = out["host-tier"]["get_GBps"] / out["torch_pinned"]["h2d_GBps"]
    print("KVSTRATA-GPU " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
