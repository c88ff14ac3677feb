"""`KvstrataStorage`: kvstrata as SGLang HiCache's L3 storage, through SGLang's
`dynamic` storage backend (docs/sglang.md).

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "kvstrata",
        "module_path": "kvstrata.sglang", "class_name": "KvstrataStorage",
        "interface_v1": 1, "allocator": "shm",
        "addr": "unix:///run/kvstrata/kvstrata.sock",
        "mempool_socket": "/run/kvstrata/mempool.sock"}'

SGLang builds the class as `cls(storage_config, {})` and then calls
`register_mem_pool_host(host_pool)`. Pages are moved in the ranges SGLang's own host pool
reports (`get_page_buffer_meta`: per page a K and a V range for the page-first layouts,
K and V per layer for `layer_first`, one range for MLA); each range is one kvstrata block,
keyed by the page's SGLang hash (already chained over the prefix) and the range's index.

Data paths, best first:

- `"allocator": "shm"` and a `mempool_socket`: the host pool is a memfd; it is
  registered with the daemon once and requests name page offsets in it — no copy in Python;
- a `mempool_socket` only: one copy per range between the host pool and a staging
  `SharedPool` (`staging_mb`, default 64 MiB);
- neither: payloads travel inline in gRPC messages.

Namespaces are opaque, one per model, layout, MLA or not, and TP (MLA: shared by every
TP rank), PP and CP rank (from `HiCacheStorageConfig`), so ranks never read each other's
pages. Every method catches every failure: a daemon that is down, slow or restarted gives
misses and failed writes (never an exception, which would kill SGLang's prefetch thread),
behind a circuit breaker so a dead daemon costs one deadline (`timeout_ms`, default 2000)
per backoff period rather than one per call. After a daemon restart the namespaces and
pools are registered again on the next call.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from . import hashing
from .breaker import CircuitBreaker
from .client import Client, Namespace, NamespaceSpec
from .errors import KvstrataError
from .pool import SharedPool
from .target import default_target
from .v1 import kvstrata_pb2 as pb

logger = logging.getLogger(__name__)

FLAT_SUFFIX = b"\xff\xff"  # key suffix of whole pages stored by the legacy (non-v1) calls
_TORCH_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.int8: 6, torch.uint8: 6}
for _name, _code in (("float8_e4m3fn", 4), ("float8_e5m2", 5)):
    if hasattr(torch, _name):
        _TORCH_DTYPE_CODES[getattr(torch, _name)] = _code


def _mmap_base(mm: Any) -> Optional[int]:
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(mm))
    except (TypeError, ValueError, BufferError):
        return None


def page_key(hash_str: str) -> bytes:
    """The key bytes of an SGLang page hash (hex sha256 → its 32 bytes; else xxh3-128)."""
    if len(hash_str) == 64:
        try:
            return bytes.fromhex(hash_str)
        except ValueError:
            pass
    return hashing.xxh3_128_le(hash_str.encode("utf-8"))


class KvstrataStorage(HiCacheStorage):
    """See the module docs. `extra_config` keys: `addr` (daemon target; default: the
    daemon's default socket or `KVSTRATA_ADDR`), `mempool_socket`, `allocator` ("shm"),
    `interface_v1`, `timeout_ms`, `namespace` (model id; default: SGLang's model name),
    `staging_mb`, `write_through`, `token`, `token_file`, `tls_ca`."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.extra = extra
        self.addr = extra.get("addr") or default_target()
        self.mempool_socket: Optional[str] = extra.get("mempool_socket") or None
        self.timeout = float(extra.get("timeout_ms", 2000)) / 1000.0
        self.interface_v1 = bool(extra.get("interface_v1", 0))
        self.write_through = extra.get("write_through")
        self.staging_bytes = int(float(extra.get("staging_mb", 64)) * (1 << 20))
        self.model = str(extra.get("namespace") or storage_config.model_name or "sglang")
        self.client = Client(self.addr, timeout=self.timeout, token=extra.get("token"),
                             token_file=extra.get("token_file"), tls_ca=extra.get("tls_ca"))
        self.breaker = CircuitBreaker(base_backoff_s=float(extra.get("backoff_ms", 500)) / 1000.0)
        self.mem_pool_host: Any = None
        self._lock = threading.RLock()
        self._ready = False
        self._ns: Optional[Namespace] = None  # page ranges (v1)
        self._flat_ns: Optional[Namespace] = None  # whole pages (legacy calls)
        self._host_pool: Optional[SharedPool] = None
        self._staging: Optional[SharedPool] = None
        self._host_mm: list[tuple[int, int, int]] = []  # (base address, size, fd) of the host memfds
        self.ranges_per_page = 0
        self.range_bytes = 0
        self.flat_page_bytes = 0
        self.mode = "inline"
        self.counters = {"get_pages": 0, "get_hits": 0, "set_pages": 0, "set_stored": 0, "errors": 0,
                         "lookups": 0}
        self._metrics = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}

    # --- set-up --------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Reads the host pool's geometry (SGLang's own page ranges). Never raises on a
        daemon failure: the daemon is contacted on first use."""
        super().register_mem_pool_host(mem_pool_host)
        host = mem_pool_host
        page = host.page_size
        ptrs, sizes = host.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
        if not ptrs or len(set(sizes)) != 1:
            raise ValueError(f"kvstrata: host pool page ranges of unequal sizes {sorted(set(sizes))}")
        self.ranges_per_page = len(ptrs)
        self.range_bytes = int(sizes[0])
        self.flat_page_bytes = int(host.get_size_per_token()) * page
        allocator = getattr(host, "allocator", None)
        fds, mms = list(getattr(allocator, "fds", []) or []), list(getattr(allocator, "mms", []) or [])
        self._host_mm = []
        for fd, mm in zip(fds, mms):
            base = _mmap_base(mm)
            if base is not None and fd is not None:
                self._host_mm.append((base, len(mm), fd))
        if self._host_mm and self.mempool_socket:
            self.mode = "shm"
        elif self.mempool_socket:
            self.mode = "staged"
        else:
            self.mode = "inline"
        logger.info("kvstrata: %s pages of %d tokens, %d ranges of %d bytes each, data path %s, daemon %s",
                    host.layout, page, self.ranges_per_page, self.range_bytes, self.mode, self.addr)

    def _spec(self, block_bytes: int, part: str) -> NamespaceSpec:
        c = self.storage_config
        host = self.mem_pool_host
        mla = bool(c.is_mla_model)
        model_id = (f"sglang/{self.model}/{host.layout}/{'mla' if mla else 'mha'}/pp{c.pp_rank}of{c.pp_size}"
                    f"/cp{c.attn_cp_rank}of{c.attn_cp_size}/dcp{c.dcp_rank}of{c.dcp_size}/{part}")
        return NamespaceSpec.opaque(model_id[:256], block_bytes,
                                    dtype=_TORCH_DTYPE_CODES.get(host.dtype, 6),
                                    block_tokens=host.page_size,
                                    tp_rank=0 if mla else c.tp_rank, tp_size=1 if mla else c.tp_size)

    def _ensure(self) -> None:
        """Registers the namespaces and pools (again after a daemon restart: the restarted
        daemon refuses the old pool ids, which are unique to a daemon run; a closed
        registration connection is how the restart shows)."""
        if self._ready:
            pools = [p for p in (self._host_pool, self._staging) if p is not None]
            if all(p.is_registered() for p in pools):
                return
            self._ready = False
        if self.mem_pool_host is None:
            raise KvstrataError("register_mem_pool_host was not called")
        wt = None if self.write_through is None else bool(self.write_through)
        self._ns = self.client.register_namespace(self._spec(self.range_bytes, "ranges"), write_through=wt)
        self._flat_ns = self.client.register_namespace(self._spec(self.flat_page_bytes, "pages"), write_through=wt)
        for p in (self._host_pool, self._staging):
            if p is not None:
                p.close()
        self._host_pool = self._staging = None
        if self.mode == "shm":
            base, size, fd = self._host_mm[0]
            self._host_pool = SharedPool.register(self.mempool_socket, fd, f"sglang-host-{self.storage_config.tp_rank}")
        if self.mode == "staged":
            size = max(self.staging_bytes, self.range_bytes + 64)
            self._staging = SharedPool.create(self.mempool_socket, f"sglang-staging-{self.storage_config.tp_rank}", size)
        self._ready = True

    def _run(self, what: str, fn: Any, miss: Any) -> Any:
        """Calls fn() behind the breaker; any failure answers `miss` (never raises)."""
        if not self.breaker.allow():
            return miss
        try:
            with self._lock:
                self._ensure()
                result = fn()
            self.breaker.success()
            return result
        except Exception as e:  # noqa: BLE001 - SGLang's threads must never see an exception
            self.counters["errors"] += 1
            self._ready = False
            self.breaker.failure()
            logger.warning("kvstrata: %s failed (%s); answering a miss", what, e)
            return miss

    # --- keys and ranges -------------------------------------------------------------

    def _range_keys(self, keys: List[str]) -> list[bytes]:
        r = self.ranges_per_page
        out = []
        for h in keys:
            kb = page_key(h)
            out.extend(kb + j.to_bytes(2, "little") for j in range(r))
        return out

    def _ptrs(self, n_pages: int, host_indices: torch.Tensor) -> tuple[list[int], list[int]]:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices[: n_pages * self.mem_pool_host.page_size])
        if len(ptrs) != n_pages * self.ranges_per_page:
            raise KvstrataError(f"host pool gave {len(ptrs)} ranges for {n_pages} pages")
        return ptrs, sizes

    def _offset(self, ptr: int, size: int) -> int:
        base, total, _ = self._host_mm[0]
        if not (base <= ptr and ptr + size <= base + total):
            raise KvstrataError(f"page range at {ptr:#x} lies outside the registered host memfd")
        return ptr - base

    def _pages_ok(self, flags: list[bool], n_pages: int) -> list[bool]:
        r = self.ranges_per_page
        return [all(flags[i * r:(i + 1) * r]) for i in range(n_pages)]

    # --- SGLang's page calls (interface_v1) ---------------------------------------------

    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """Pages of `keys` (from the first) that are stored: one Lookup per 4096 ranges."""
        if not keys:
            return 0

        def lookup() -> int:
            rkeys = self._range_keys(keys) if self.interface_v1 else [page_key(k) + FLAT_SUFFIX for k in keys]
            ns = self._ns if self.interface_v1 else self._flat_ns
            matched = 0
            step = self.client.max_batch
            for start in range(0, len(rkeys), step):
                chunk = rkeys[start:start + step]
                m = self.client.lookup(ns, chunk).matched
                self.counters["lookups"] += 1
                matched += m
                if m < len(chunk):
                    break
            return matched // (self.ranges_per_page if self.interface_v1 else 1)

        return self._run("batch_exists", lookup, 0)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        n = len(keys)
        if n == 0:
            return []
        t0 = time.monotonic()

        def put() -> List[bool]:
            ptrs, sizes = self._ptrs(n, host_indices)
            rkeys = self._range_keys(keys)
            first_parent = None
            if extra_info is not None and getattr(extra_info, "prefix_keys", None):
                first_parent = self._range_keys(extra_info.prefix_keys[-1:])[-1]
            statuses: list[bool] = []
            retried = False
            start = 0
            while start < len(rkeys):
                end = min(start + self._chunk_ranges(), len(rkeys))
                res = self._put_ranges(rkeys[start:end], ptrs[start:end], sizes[start:end],
                                       rkeys[start - 1] if start else first_parent)
                if pb.PUT_STATUS_BAD_REGION in res and not retried:
                    # the daemon forgot the pool (restarted): register again, once
                    retried = True
                    self._ready = False
                    self._ensure()
                    continue
                statuses.extend(s == pb.PUT_STATUS_STORED for s in res)
                start = end
            return self._pages_ok(statuses, n)

        ok = self._run("batch_set_v1", put, [False] * n)
        self.counters["set_pages"] += n
        self.counters["set_stored"] += sum(ok)
        self._record("backup", sum(ok), t0)
        return ok

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        n = len(keys)
        if n == 0:
            return []
        t0 = time.monotonic()

        def get() -> List[bool]:
            ptrs, sizes = self._ptrs(n, host_indices)
            rkeys = self._range_keys(keys)
            found: list[bool] = []
            retried = False
            start = 0
            while start < len(rkeys):
                end = min(start + self._chunk_ranges(), len(rkeys))
                f, region_errors = self._get_ranges(rkeys[start:end], ptrs[start:end], sizes[start:end])
                if region_errors and not retried:
                    retried = True
                    self._ready = False
                    self._ensure()
                    continue
                found.extend(f)
                start = end
                if not all(f):
                    break  # SGLang uses the pages up to the first miss
            found.extend([False] * (len(rkeys) - len(found)))
            return self._pages_ok(found, n)

        ok = self._run("batch_get_v1", get, [False] * n)
        self.counters["get_pages"] += n
        self.counters["get_hits"] += sum(ok)
        self._record("prefetch", sum(ok), t0)
        return ok

    def _chunk_ranges(self) -> int:
        if self.mode == "staged":
            assert self._staging is not None
            per = (self.range_bytes + 63) // 64 * 64
            return max(1, min(self.client.max_batch, self._staging.size // per))
        if self.mode == "inline":
            return max(1, min(self.client.max_batch, (256 << 20) // max(1, self.range_bytes)))
        return self.client.max_batch

    def _put_ranges(self, rkeys: list[bytes], ptrs: list[int], sizes: list[int], first_parent: Optional[bytes]) -> list[int]:
        assert self._ns is not None
        if self.mode == "shm":
            assert self._host_pool is not None
            ranges = [self._host_pool.range(self._offset(p, s), s) for p, s in zip(ptrs, sizes)]
            resp = self.client.batch_put_ranges(self._ns, rkeys, ranges, parents="chain", first_parent=first_parent)
        elif self.mode == "staged":
            st = self._staging
            assert st is not None
            base = _mmap_base(st.buffer)
            assert base is not None
            per = (self.range_bytes + 63) // 64 * 64
            ranges = []
            for i, (p, s) in enumerate(zip(ptrs, sizes)):
                ctypes.memmove(base + i * per, p, s)  # the one copy: host pool -> staging pool
                ranges.append(st.range(i * per, s))
            resp = self.client.batch_put_ranges(self._ns, rkeys, ranges, parents="chain", first_parent=first_parent)
        else:
            payloads = [ctypes.string_at(p, s) for p, s in zip(ptrs, sizes)]
            resp = self.client.batch_put(self._ns, rkeys, payloads, parents="chain", first_parent=first_parent)
        return list(resp.results)

    def _get_ranges(self, rkeys: list[bytes], ptrs: list[int], sizes: list[int]) -> tuple[list[bool], bool]:
        assert self._ns is not None
        if self.mode == "shm":
            assert self._host_pool is not None
            ranges = [self._host_pool.range(self._offset(p, s), s) for p, s in zip(ptrs, sizes)]
            res = self.client.batch_get_results(self._ns, rkeys, ranges=ranges)
            return [r.found for r in res], any(r.region_error for r in res)
        if self.mode == "staged":
            st = self._staging
            assert st is not None
            base = _mmap_base(st.buffer)
            assert base is not None
            per = (self.range_bytes + 63) // 64 * 64
            ranges = [st.range(i * per, s) for i, s in enumerate(sizes)]
            res = self.client.batch_get_results(self._ns, rkeys, ranges=ranges)
            for i, (r, p, s) in enumerate(zip(res, ptrs, sizes)):
                if r.found:
                    ctypes.memmove(p, base + i * per, s)  # the one copy: staging pool -> host pool
            return [r.found for r in res], any(r.region_error for r in res)
        res = self.client.batch_get_results(self._ns, rkeys)
        for r, p, s in zip(res, ptrs, sizes):
            if r.found and len(r.payload) == s:
                ctypes.memmove(p, r.payload, s)
        return [r.found and len(r.payload) == s for r, s in zip(res, sizes)], False

    # --- the legacy whole-page calls ----------------------------------------------------

    def _flat_bytes(self, value: Any) -> bytes:
        t = value.detach().contiguous().view(-1)
        return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if not keys or values is None:
            return False

        def put() -> bool:
            payloads = [self._flat_bytes(v) for v in values]
            resp = self.client.batch_put(self._flat_ns, [page_key(k) + FLAT_SUFFIX for k in keys], payloads,
                                         parents="chain")
            return resp.stored == len(keys)

        return self._run("batch_set", put, False)

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None) -> Any:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[Any]:
        if not keys:
            return []
        dtype = self.mem_pool_host.dtype if self.mem_pool_host is not None else torch.uint8

        def get() -> List[Any]:
            payloads = self.client.batch_get(self._flat_ns, [page_key(k) + FLAT_SUFFIX for k in keys])
            out: List[Any] = []
            for i, p in enumerate(payloads):
                if p is None:
                    out.append(None)
                    continue
                t = torch.frombuffer(bytearray(p), dtype=torch.uint8).view(dtype)
                if target_locations is not None and target_locations[i] is not None:
                    dst = target_locations[i]
                    if dst.numel() * dst.element_size() != len(p):
                        out.append(None)
                        continue
                    dst.view(-1).copy_(t)
                    t = dst
                out.append(t)
            return out

        return self._run("batch_get", get, [None] * len(keys))

    # --- housekeeping ---------------------------------------------------------------

    def clear(self) -> None:
        def clear_all() -> None:
            for ns in (self._ns, self._flat_ns):
                keys = [bytes(b.key) for b in self.client.list_blocks(ns)]
                self.client.delete(ns, keys)

        self._run("clear", clear_all, None)

    def _record(self, kind: str, pages: int, t0: float) -> None:
        if pages <= 0:
            return
        dt = max(time.monotonic() - t0, 1e-9)
        self._metrics[f"{kind}_pgs"].append(pages)
        self._metrics[f"{kind}_bandwidth"].append(pages * self.flat_page_bytes / dt / 1e9)

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics (pages and GB/s of prefetches and backups since the last
        call); None where SGLang's metrics module is missing."""
        m, self._metrics = self._metrics, {k: [] for k in self._metrics}
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # noqa: BLE001
            return None
        s = StorageMetrics()
        for k, v in m.items():
            setattr(s, k, v)
        return s

    def close(self) -> None:
        with self._lock:
            for p in (self._host_pool, self._staging):
                if p is not None:
                    p.close()
            self._host_pool = self._staging = None
            self._ready = False
            self.client.close()
