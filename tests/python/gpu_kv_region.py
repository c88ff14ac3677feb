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

Each round saves and loads twice, with the page ids given two ways: "batch"
(`region.page_batch(ids)`: the request encoded from the array, the way to use it) and
"list" (`[region.pages([p]) for p in ids]`: one message per block). Every request is
timed by the client (page ids to answer, what an engine waits for) and by the daemon
itself (`total_us` of its debug line for the request: its direct put or get, from the
slots' reservation or the lookup to the copies' completion), and the difference is what
the request costs outside the daemon's copies: the client, gRPC, the daemon's request
handling around them. That difference is split at the daemon's debug line, stamped (wall
clock, as the client's own stamps) when its direct put or get ends: "before" runs from the
client's call to the start of the daemon's copies (building and sending the request, the
daemon decoding and checking it), "after" from their end to the client's answer (the
daemon's reply, the client reading it). The GB/s lines are the "batch" requests as the
client times them.

Each round also saves and loads with `in_flight=k` for every k > 1 of IN_FLIGHT (page
batches split into k requests in flight at once, `Client.batch_put_pages(in_flight=)`),
byte-checked the same way; the GB/s of each k (client-timed, 1 = the "batch" requests) and
its ratio to torch's pinned copy are printed per tier and layout (the per-request split
into client / daemon / before / after is for the single requests only: a split request's
parts are several daemon lines).

Loads from a page batch ask the daemon to answer once its copies are queued on the GPU
(`Client.answer_when_queued`, on by default): the client then waits on the CUDA event the
answer names before returning, so the byte comparisons check that wait too. Per tier and
layout, the script prints how many get requests asked for it and how many answers carried a
`pages_ready_event` (`Client.queued_answers`); KVSTRATA_ANSWER_WHEN_QUEUED=0 measures without it.

Env: KVSTRATA_BIN (the daemon, a release build), KVSTRATA_TEST_TMP, IN_FLIGHT (comma-separated
requests in flight, default "1,2,4"; 1 is always measured), LAYOUTS (the layouts in the order run,
default "classic,v032": each daemon serves them one after the other), FRESH_DAEMON (1: a daemon
of its own for each layout), EMPTY_CACHE (1: torch's cached GPU memory freed after each layout),
KVSTRATA_ANSWER_WHEN_QUEUED (0, off or false: loads answered after their copies, as before),
DAEMON_DEBUG (0: the daemon at its default log level, without the debug lines the per-request
split needs), DAEMON_ARGS (more daemon flags, split as a shell would, e.g.
`--gpu-move-group-bytes 256MiB`; the daemon does not see KVSTRATA_* variables). Args:
[num_blocks] (default 256, 2 MiB each; 1024 needs 4 GiB of GPU memory and 2 GiB of the host
tier) [rounds] (default 5). Prints a table and one JSON line (`KVSTRATA-GPU {...}`) with every
request's client and daemon times (`requests`) and the daemon's last debug lines (`log`: direct
puts and gets; `put_log`: device puts; `call_log`: region calls); warns when torch's pinned copy
moved more than 10 % between its runs before and after the daemons (`ceiling_spread`): the
machine was not steady and the run's ratios are not comparable.
"""

import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import kvstrata
from kvstrata import layouts
from kvdaemon import Daemon, workdir

L, H, D, T, E = 32, 8, 128, 16, 2
CHUNK = T * H * D * E  # one layer's K (or V) of one page: 32 KiB
BLOCK = L * 2 * CHUNK  # one page of every layer: 2 MiB


class DebugDaemon(Daemon):
    """A daemon logging the region path's timings (debug), unless DAEMON_DEBUG=0: each
    request then writes no lines (three fewer `write`s per save on the request's path),
    as in a daemon at its default level, and the per-request split is not available."""

    def start(self) -> None:
        if os.environ.get("DAEMON_DEBUG", "1") != "0":
            i = self.cmd.index("--log-level")
            self.cmd[i + 1] = ("info,kvstrata_server::region=debug,kvstrata_tiers::cache::device=debug,"
                               "kvstrata_server::service=debug")
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


MODES = ("batch", "list")


def in_flight_values() -> list:
    """IN_FLIGHT's values (ints >= 1), with 1 (the "batch" requests), sorted."""
    raw = os.environ.get("IN_FLIGHT", "1,2,4")
    try:
        values = {int(v) for v in raw.split(",") if v.strip()}
    except ValueError:
        raise SystemExit(f"IN_FLIGHT: comma-separated ints >= 1, not {raw!r}") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"IN_FLIGHT: comma-separated ints >= 1, not {raw!r}")
    return sorted(values | {1})


def layout_order() -> list:
    """LAYOUTS's layouts (both, in the order given; default "classic,v032")."""
    order = [v.strip() for v in os.environ.get("LAYOUTS", "classic,v032").split(",") if v.strip()]
    if sorted(order) != ["classic", "v032"]:
        raise SystemExit(f"LAYOUTS: classic and v032 in some order, not {order!r}")
    return order


def mode_in_flight(mode: str) -> int:
    """The requests in flight of a mode: "batch/4" is a page batch split in 4, else 1."""
    return int(mode.split("/")[1]) if "/" in mode else 1


#: Largest change of torch's pinned copy between its runs before and after the daemons for which
#: a run's ratios are still taken as comparable.
CEILING_SPREAD = 0.10

#: The daemon's debug line of one direct put or get (kvstrata_server::region::io).
DIRECT_LINE = re.compile(r"^(\S+Z) .*KV region: direct (put|get) .*? blocks=(\d+) .*?total_us=(\d+)")


def page_arg(region, ids: list, mode: str):
    """The pages of one block per page id, as the mode gives them."""
    return region.page_batch(ids) if mode.startswith("batch") else [region.pages([p]) for p in ids]


#: The last bytes of a get request asking `answer_when_queued` (field 8, which `kvstrata._wire`
#: writes last).
WHEN_QUEUED_FIELD = bytes((0x40, 1))


class GetCounter:
    """Wraps a client's raw BatchGet callable (called, or as a future for parts in flight),
    counting the get requests sent and those asking `answer_when_queued` (cheap: no parsing,
    the wrapper runs inside the timed calls)."""

    def __init__(self, client: kvstrata.Client) -> None:
        self.inner = client._raw["BatchGet"]
        self.sent = 0
        self.asked = 0
        client._raw = {**client._raw, "BatchGet": self}

    def _count(self, request: bytes) -> None:
        self.sent += 1
        self.asked += request[-2:] == WHEN_QUEUED_FIELD

    def __call__(self, request: bytes, **kw):
        self._count(request)
        return self.inner(request, **kw)

    def future(self, request: bytes, **kw):
        self._count(request)
        return self.inner.future(request, **kw)


def daemon_times(log_path: str, n: int) -> dict:
    """(`total_us` in seconds, wall-clock end) of each direct put and get of n blocks in the
    daemon's log, in log order."""
    out: dict = {"put": [], "get": []}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = DIRECT_LINE.search(line)
            if m and int(m.group(3)) == n:
                end = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
                out[m.group(2)].append((int(m.group(4)) / 1e6, end.timestamp()))
    return out


def run_layout(daemon: Daemon, client: kvstrata.Client, gets: GetCounter, n: int, rounds: int, layout: str,
               tag: str, requests: list, in_flight: list) -> dict:
    """Saves and loads `rounds` times in each mode (MODES, then "batch/k" for each k > 1 of
    `in_flight`); appends (layout, mode, op, client seconds, wall clock at the call and at
    the answer) of every timed request of MODES to `requests`, in the order sent. `gets`
    counts the get requests (`answers_when_queued` of the result: those of this layout)."""
    sent0, asked0, queued0 = gets.sent, gets.asked, client.queued_answers
    modes = list(MODES) + [f"batch/{k}" for k in in_flight if k > 1]
    pages = 2 * n + 8
    buf = torch.empty(L * 2 * pages * CHUNK, dtype=torch.uint8, device="cuda")
    for part in buf.view(torch.int16).split(1 << 28):  # 1024 blocks: over 2^31 elements in all
        part.copy_(torch.randint(-32768, 32767, part.shape, dtype=torch.int16, device="cuda"))
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
    times: dict = {m: {"put": [], "get": []} for m in modes}
    calls0 = region.calls.answered
    for r in range(rounds * len(modes)):
        mode = modes[r % len(modes)]
        k = mode_in_flight(mode)
        keys = [b"%d-%d" % (r, i) for i in range(n)]
        w0, t0 = time.time(), time.perf_counter()
        put = client.batch_put_pages(ns, keys, page_arg(region, src, mode), in_flight=k)
        dt, w1 = time.perf_counter() - t0, time.time()
        times[mode]["put"].append(dt)
        if mode in MODES:
            requests.append((layout, mode, "put", dt, w0, w1))
        assert put.stored == n, f"{layout}: stored {put.stored} of {n}: {list(put.results)[:8]}"
        w0, t0 = time.time(), time.perf_counter()
        found = client.batch_get_pages(ns, keys, page_arg(region, dst, mode), in_flight=k)
        dt, w1 = time.perf_counter() - t0, time.time()
        times[mode]["get"].append(dt)
        if mode in MODES:
            requests.append((layout, mode, "get", dt, w0, w1))
        assert all(found), f"{layout}: {found.count(False)} of {n} not found"
        torch.cuda.synchronize()
        pick = (lambda v, ids: v[:, ids]) if layout == "classic" else (lambda v, ids: v[ids])
        if not all(torch.equal(pick(v, dst), pick(v, src)) for v in views):
            bad = [i for i in range(n) if not all(torch.equal(pick(v, [dst[i]]), pick(v, [src[i]])) for v in views)]
            raise AssertionError(f"{layout} round {r} ({mode}): blocks {bad[:8]} differ after the round trip")
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
    puts = times["batch"]["put"]
    split = {str(k): {"put_s": times[m]["put"], "get_s": times[m]["get"],
                      "put_GBps": total / median(times[m]["put"]) / 1e9,
                      "get_GBps": total / median(times[m]["get"]) / 1e9}
             for k, m in ((k, "batch" if k == 1 else f"batch/{k}") for k in in_flight)}
    queued = {"get_requests": gets.sent - sent0, "asked": gets.asked - asked0,
              "with_event": client.queued_answers - queued0, "region_calls": region.calls.answered - calls0}
    get_s = times["batch"]["get"]
    return {"geometry": str(geo), "blocks": n, "block_bytes": BLOCK, "put_s": puts, "get_s": get_s,
            "put_GBps": total / median(puts) / 1e9, "get_GBps": total / median(get_s) / 1e9,
            "list_put_s": times["list"]["put"], "list_get_s": times["list"]["get"], "in_flight": split,
            "answers_when_queued": queued}


SPLITS = ("client", "daemon", "diff", "before", "after")


def split_times(requests: list, daemon: dict, n: int) -> dict:
    """Per (layout, mode, op), each request's seconds: the client's, the daemon's, their
    difference, and that difference before and after the daemon's copies; and the medians
    (`*_ms`). The daemon's requests are matched to the client's in order."""
    sent = {op: [r for r in requests if r[2] == op] for op in ("put", "get")}
    out: dict = {}
    for op in ("put", "get"):
        if len(daemon[op]) != len(sent[op]):
            out[f"{op}_mismatch"] = f"{len(sent[op])} requests of {n} blocks sent, {len(daemon[op])} in the daemon's log"
            continue
        for (layout, mode, _, client_s, w0, w1), (daemon_s, end) in zip(sent[op], daemon[op]):
            d = out.setdefault(f"{layout}/{mode}/{op}", {f"{k}_s": [] for k in SPLITS})
            for k, v in zip(SPLITS, (client_s, daemon_s, client_s - daemon_s, end - daemon_s - w0, w1 - end)):
                d[f"{k}_s"].append(v)
    for v in out.values():
        if isinstance(v, dict):
            for k in SPLITS:
                v[f"{k}_ms"] = median(v[f"{k}_s"]) * 1e3
    return out


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
    in_flight = in_flight_values()
    out = {"device": torch.cuda.get_device_name(0), "binary": os.environ.get("KVSTRATA_BIN"), "blocks": n,
           "rounds": rounds, "in_flight": in_flight, "answer_when_queued": None}
    out["torch_pinned"] = torch_pinned(n * BLOCK, rounds)
    fresh = os.environ.get("FRESH_DAEMON") == "1"
    more = tuple(shlex.split(os.environ.get("DAEMON_ARGS", "")))
    out["daemon_args"] = list(more)
    tiers = (("host-tier", ("--gpu", "on", "--gpu-hbm-bytes", "0", *more)), ("hbm-tier", ("--gpu", "on", *more)))
    for tag, extra in tiers:
        requests: list = []
        dtimes: dict = {"put": [], "get": []}
        logs: list = []
        # one daemon for both layouts, or (FRESH_DAEMON=1) one per layout
        for group in ([[x] for x in layout_order()] if fresh else [layout_order()]):
            d = workdir(f"gpu-{tag}-")
            daemon = DebugDaemon(d, extra=extra, host_capacity="8GiB")
            try:
                client = kvstrata.Client(daemon.uds_target, timeout=120)
                out["answer_when_queued"] = client.answer_when_queued  # KVSTRATA_ANSWER_WHEN_QUEUED
                out["region_calls"] = client.region_calls  # KVSTRATA_REGION_CALLS
                gets = GetCounter(client)
                for layout in group:
                    out[f"{tag}/{layout}"] = run_layout(daemon, client, gets, n, rounds, layout, tag, requests,
                                                        in_flight)
                    if os.environ.get("EMPTY_CACHE") == "1":
                        torch.cuda.empty_cache()  # the next layout's buffer is not this one's memory
                client.close()
            finally:
                daemon.stop()
                logs.append(daemon.log(200000))
                for op, times in daemon_times(daemon.log_path, n).items():
                    dtimes[op].extend(times)
                shutil.rmtree(d, ignore_errors=True)
        log = "\n".join(logs)
        out[f"{tag}/log"] = [line for line in log.splitlines() if "KV region: direct" in line][-12:]
        out[f"{tag}/put_log"] = [line for line in log.splitlines() if "device put (reserve" in line][-60:]
        out[f"{tag}/call_log"] = [line for line in log.splitlines() if "region call " in line][-60:]
        out[f"{tag}/requests"] = split_times(requests, dtimes, n)
    # a second baseline after the daemons: the spread of the ceiling itself
    out["torch_pinned_after"] = torch_pinned(n * BLOCK, rounds)
    ceil = out["torch_pinned"]
    print(f"device {out['device']}, {n} blocks of {BLOCK >> 20} MiB, median of {rounds} (page_batch requests)")
    print(f"torch pinned copy_: d2h {ceil['d2h_GBps']:.1f} GB/s, h2d {ceil['h2d_GBps']:.1f} GB/s "
          f"(after: {out['torch_pinned_after']['d2h_GBps']:.1f}, {out['torch_pinned_after']['h2d_GBps']:.1f})")
    after = out["torch_pinned_after"]
    spread = max(abs(after[k] - ceil[k]) / max(ceil[k], after[k]) for k in ("d2h_GBps", "h2d_GBps"))
    out["ceiling_spread"] = spread
    if spread > CEILING_SPREAD:
        print(f"WARNING: torch's pinned copy moved {spread:.0%} between the runs before and after the daemons "
              f"(over {CEILING_SPREAD:.0%}): the machine was not steady, so this run's ratios are not comparable")
    for tag in ("host-tier", "hbm-tier"):
        for layout in ("classic", "v032"):
            r = out[f"{tag}/{layout}"]
            r["save_vs_torch_d2h"] = r["put_GBps"] / ceil["d2h_GBps"]
            r["load_vs_torch_h2d"] = r["get_GBps"] / ceil["h2d_GBps"]
            print(f"{tag:9} {layout:7} save {r['put_GBps']:6.1f} GB/s ({r['save_vs_torch_d2h']:.2f} of d2h)  "
                  f"load {r['get_GBps']:6.1f} GB/s ({r['load_vs_torch_h2d']:.2f} of h2d)")
    print(f"requests in flight (in_flight=k: a page batch split in k requests sent at once), median of {rounds}")
    for tag in ("host-tier", "hbm-tier"):
        for layout in ("classic", "v032"):
            for k, v in out[f"{tag}/{layout}"]["in_flight"].items():
                v["save_vs_torch_d2h"] = v["put_GBps"] / ceil["d2h_GBps"]
                v["load_vs_torch_h2d"] = v["get_GBps"] / ceil["h2d_GBps"]
                print(f"{tag:9} {layout:7} in_flight={k:<2} save {v['put_GBps']:6.1f} GB/s "
                      f"({v['save_vs_torch_d2h']:.2f} of d2h)  load {v['get_GBps']:6.1f} GB/s "
                      f"({v['load_vs_torch_h2d']:.2f} of h2d)")
    client_region_calls = out.get("region_calls")
    print(f"gets answered when queued (answer_when_queued={out['answer_when_queued']}; "
          "KVSTRATA_ANSWER_WHEN_QUEUED=0 turns it off): get requests asking for it, answers carrying a "
          "pages_ready_event")
    for tag in ("host-tier", "hbm-tier"):
        for layout in ("classic", "v032"):
            q = out[f"{tag}/{layout}"]["answers_when_queued"]
            print(f"{tag:9} {layout:7} {q['asked']} of {q['get_requests']} gRPC get requests asked, "
                  f"{q['with_event']} answers carried an event; {q['region_calls']} requests were region calls "
                  f"(region_calls={client_region_calls})")
    total = n * BLOCK
    ceiling = {"put": ceil["d2h_GBps"], "get": ceil["h2d_GBps"]}
    print(f"per request, median ms (ratio: GB/s of {total >> 20} MiB over torch's pinned copy): client = page ids "
          "to answer; daemon = its debug total_us; diff = client - daemon = before + after its copies")
    for tag in ("host-tier", "hbm-tier"):
        req = out[f"{tag}/requests"]
        for key in (k for k in req if k.endswith("_mismatch")):
            print(f"{tag:9} {key}: {req[key]}")
        for layout in ("classic", "v032"):
            for mode in MODES:
                cells = []
                for op in ("put", "get"):
                    v = req.get(f"{layout}/{mode}/{op}")
                    if v is None:
                        cells.append(f"{op} -")
                        continue
                    rc = total / (v["client_ms"] / 1e3) / 1e9 / ceiling[op]
                    rd = total / (v["daemon_ms"] / 1e3) / 1e9 / ceiling[op]
                    cells.append(f"{op} client {v['client_ms']:6.2f} ({rc:.2f}) daemon {v['daemon_ms']:6.2f} ({rd:.2f}) "
                                 f"diff {v['diff_ms']:5.2f} = {v['before_ms']:4.2f} + {v['after_ms']:4.2f}")
                print(f"{tag:9} {layout:7} {mode:5} " + " | ".join(cells))
    print("KVSTRATA-GPU " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
