"""`KvstrataConnector`: kvstrata as vLLM's KV connector (vLLM v1, `KVConnectorBase_V1`).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvstrataConnector",
        "kv_connector_module_path": "kvstrata.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"addr": "unix:///run/kvstrata/kvstrata.sock",
                                      "mempool_socket": "/run/kvstrata/mempool.sock"}}'

(with `--disable-hybrid-kv-cache-manager`; docs/vllm.md).

Scheduler side: `get_num_new_matched_tokens` makes ONE daemon `Lookup` per tensor-parallel
rank of the request's chained block keys and answers the blocks beyond vLLM's own prefix
cache that every rank holds (the minimum across ranks); `build_connector_meta` tells the
workers which vLLM blocks to load (those) and to save (prompt blocks fully computed this
step that kvstrata does not hold yet).

Worker side: `register_kv_caches` learns vLLM's per-layer tensors (any layout whose block
axis is 0 or 1, e.g. the CPU backend's `[num_blocks, kv_heads, block_size, 2*head_size]`
or the GPU's `(2, num_blocks, block_size, kv_heads, head_size)`); `start_load_kv` reads the
blocks into a staging `SharedPool` (one `BatchGet` per batch, no payload in the message)
and copies each into vLLM's pages (one copy); a block that is missing or cannot be read
goes to `get_block_ids_with_load_errors`, and vLLM recomputes it and everything after it
(use `kv_load_failure_policy: "recompute"`): never wrong KV. `wait_for_save` copies the
saved blocks into the staging pool (one copy) and hands the `BatchPut` to a background
thread: the engine never waits for the daemon (write-behind).

Keys: the canonical chain of docs/hashing.md over the prompt's token ids, started from
the namespace id of TP rank 0 (every rank stores the same keys in its own namespace),
mixed with the request's identity beyond its tokens (vLLM's `cache_salt`, the LoRA
adapter, multimodal input hashes) when it has one, so tenants and adapters never share KV
by accident. The namespace (opaque, one block = one vLLM block of every layer)
names the model (and a fingerprint of its config.json), KV dtype, block size, layer
layout and TP rank.

A daemon that is down or slow costs at most a deadline (`timeout_ms`, default 1000) and
then nothing while a circuit breaker is open: lookups answer 0, loads fail over to
recompute, saves are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import hashing
from .breaker import CircuitBreaker
from .client import Client, NamespaceSpec
from .pool import SharedPool
from .target import default_target
from .v1 import kvstrata_pb2 as pb

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("kvstrata.vllm")

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.int8: 6, torch.uint8: 6}
for _n, _c in (("float8_e4m3fn", 4), ("float8_e5m2", 5)):
    if hasattr(torch, _n):
        _DTYPE_CODES[getattr(torch, _n)] = _c


@dataclass
class BlockTransfer:
    """Blocks of one request: kvstrata keys (chain order) and vLLM block ids."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    parent: bytes = b""


@dataclass
class KvstrataConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class _ReqState:
    prompt: list[int]
    keys: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # blocks [0, saved_upto) are in kvstrata (found or saved)
    load: Optional[tuple[int, int]] = None  # (first block, number of blocks) to load


def request_identity(request: Any) -> bytes:
    """What besides its tokens makes a request's KV differ: cache salt, LoRA, multimodal
    inputs. Empty when none."""
    parts: dict[str, Any] = {}
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts["cache_salt"] = salt
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts["lora"] = [getattr(lora, "lora_name", None), getattr(lora, "lora_int_id", None),
                         getattr(lora, "lora_path", None)]
    mm = [getattr(f, "identifier", None) for f in (getattr(request, "mm_features", None) or [])]
    if mm:
        parts["mm"] = mm
    return json.dumps(parts, sort_keys=True, default=str).encode() if parts else b""


def chain_start(namespace_id: bytes, identity: bytes) -> bytes:
    """h_0 of a request's chain: the namespace id, or a hash of it and the identity."""
    if not identity:
        return namespace_id
    return hashing.xxh3_128_le(namespace_id + b"kvstrata-vllm-identity-v1" + identity)


class KvstrataConnector(KVConnectorBase_V1):
    """See the module docs. `kv_connector_extra_config` keys: `addr` (daemon target;
    default: KVSTRATA_ADDR or the default socket), `mempool_socket` (required),
    `timeout_ms` (default 1000), `staging_mb` (default 256), `namespace` (model id;
    default: vLLM's model name), `token`, `token_file`, `tls_ca`."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        get = cfg.get_from_extra_config
        self.addr = get("addr", None) or default_target()
        self.mempool_socket = get("mempool_socket", None)
        self.timeout = float(get("timeout_ms", 1000)) / 1000.0
        self.staging_bytes = int(float(get("staging_mb", 256)) * (1 << 20))
        self.block_size = vllm_config.cache_config.block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.model_name = str(get("namespace", None) or vllm_config.model_config.model)
        self.breaker = CircuitBreaker(base_backoff_s=float(get("backoff_ms", 500)) / 1000.0)
        self._client: Optional[Client] = None
        self._client_opts = dict(token=get("token", None), token_file=get("token_file", None),
                                 tls_ca=get("tls_ca", None))
        group = kv_cache_config.kv_cache_groups[0]
        self.layer_names = list(group.layer_names)
        spec = group.kv_cache_spec
        self.layer_block_bytes = int(spec.page_size_bytes)
        self.block_bytes = self.layer_block_bytes * len(self.layer_names)
        self.kv_dtype = getattr(spec, "dtype", torch.uint8)
        self.fingerprint = self._model_fingerprint(vllm_config)
        self.layout_tag = "kv-layout:" + str(getattr(kv_cache_config, "kv_cache_layout", None) or "default")
        self._ns_ids: dict[int, bytes] = {}
        self._registered: set[int] = set()
        # scheduler
        self._reqs: dict[str, _ReqState] = {}
        self.stats = {"lookups": 0, "matched_tokens": 0, "loaded_blocks": 0, "load_errors": 0,
                      "saved_blocks": 0, "save_dropped": 0, "save_failed": 0}
        self.last_matched: dict[str, int] = {}
        # worker
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layers: list[tuple[torch.Tensor, int]] = []
        self._load_errors: set[int] = set()
        self._load_pool: Optional[SharedPool] = None
        self._save_pool: Optional[SharedPool] = None
        self._saves: "queue.Queue[Any]" = queue.Queue()
        self._save_thread: Optional[threading.Thread] = None
        self._pending_saves = 0
        self._pending_lock = threading.Condition()
        self._tp_rank = 0
        self._worker_ok = False
        self._stale = False  # set by the save thread: re-register the pools (worker thread only)

    # --- identity ----------------------------------------------------------------------

    @staticmethod
    def _model_fingerprint(vllm_config: "VllmConfig") -> bytes:
        path = os.path.join(str(vllm_config.model_config.model), "config.json")
        try:
            with open(path, "rb") as f:
                return hashing.xxh3_128_le(f.read())
        except OSError:
            return b""

    def spec(self, tp_rank: int) -> NamespaceSpec:
        model_id = f"vllm/{self.model_name}/{self.layout_tag}/layers{len(self.layer_names)}"
        return NamespaceSpec.opaque(model_id[:256], self.block_bytes, dtype=_DTYPE_CODES.get(self.kv_dtype, 6),
                                    block_tokens=self.block_size, tp_rank=tp_rank, tp_size=self.tp_size,
                                    model_fingerprint=self.fingerprint)

    def namespace_id(self, tp_rank: int) -> bytes:
        if tp_rank not in self._ns_ids:
            self._ns_ids[tp_rank] = self.spec(tp_rank).namespace_id()
        return self._ns_ids[tp_rank]

    def request_keys(self, request: Any, tokens: Optional[list[int]] = None) -> list[bytes]:
        """The request's block keys. The chain starts from the namespace id of TP rank 0 for
        every rank (each rank stores them in its own namespace), so the scheduler computes
        one key list for all ranks."""
        tokens = list(request.prompt_token_ids or []) if tokens is None else tokens
        h0 = chain_start(self.namespace_id(0), request_identity(request))
        return hashing.chain_keys(h0, tokens, self.block_size)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.addr, timeout=self.timeout, **self._client_opts)
        return self._client

    def _ensure_ns(self, tp_rank: int) -> None:
        if tp_rank not in self._registered:
            ns = self.client.register_namespace(self.spec(tp_rank))
            if ns.id != self.namespace_id(tp_rank):
                raise RuntimeError("the daemon computed another namespace id")
            self._registered.add(tp_rank)

    def _guarded(self, what: str, fn: Any, miss: Any) -> Any:
        if not self.breaker.allow():
            return miss
        try:
            r = fn()
            self.breaker.success()
            return r
        except Exception as e:  # noqa: BLE001 - the engine must never see a daemon failure
            self._registered.clear()
            self.breaker.failure()
            logger.warning("kvstrata: %s failed (%s); treated as a miss", what, e)
            return miss

    # --- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        prompt = list(request.prompt_token_ids or [])
        # the last prompt token is always computed by vLLM: full blocks of the rest
        usable_blocks = max(0, (len(prompt) - 1) // self.block_size)
        if usable_blocks == 0:
            return 0, False
        keys = self.request_keys(request, prompt)

        def lookup() -> int:
            matched = usable_blocks
            for rank in range(self.tp_size):
                self._ensure_ns(rank)
                m = self.client.lookup(self.namespace_id(rank), keys[:usable_blocks]).matched
                self.stats["lookups"] += 1
                matched = min(matched, m)
                if matched == 0:
                    break
            return matched

        matched = self._guarded("lookup", lookup, 0)
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(prompt=prompt, keys=keys)
        st.saved_upto = max(st.saved_upto, matched)
        local_blocks = num_computed_tokens // self.block_size
        new_tokens = max(0, matched * self.block_size - num_computed_tokens)
        st.load = (local_blocks, matched - local_blocks) if new_tokens > 0 else None
        self.last_matched[request.request_id] = new_tokens
        self.stats["matched_tokens"] += new_tokens
        return new_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is not None and num_external_tokens == 0:
            st.load = None

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvstrataConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            prompt = list(new.prompt_token_ids or [])
            if st is None:
                st = self._reqs[new.req_id] = _ReqState(prompt=prompt, keys=[])
            st.block_ids = list(new.block_ids[0])
            if st.load is not None:
                first, n = st.load
                meta.loads.append(BlockTransfer(new.req_id, st.keys[first:first + n], st.block_ids[first:first + n]))
                st.load = None
            self._plan_save(meta, new.req_id, st, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    st.block_ids = list(new_ids[0])
                else:
                    st.block_ids.extend(new_ids[0])
            self._plan_save(meta, req_id, st, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id])
        return meta

    def _plan_save(self, meta: KvstrataConnectorMetadata, req_id: str, st: _ReqState, computed: int) -> None:
        if not st.keys:
            return
        done = min(computed, len(st.prompt)) // self.block_size
        done = min(done, len(st.keys), len(st.block_ids))
        if done > st.saved_upto:
            first = st.saved_upto
            parent = st.keys[first - 1] if first > 0 else b""
            meta.saves.append(BlockTransfer(req_id, st.keys[first:done], st.block_ids[first:done], parent))
            st.saved_upto = done

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        self._reqs.pop(request.request_id, None)
        return False, None

    # --- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
            self._tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # noqa: BLE001 - no TP group: rank 0
            self._tp_rank = 0
        self._kv_caches = kv_caches
        num_blocks = self._kv_cache_config.num_blocks
        layers = []
        for name in self.layer_names:
            t = kv_caches.get(name)
            if t is None:
                logger.error("kvstrata: no KV tensor for layer %s; connector disabled", name)
                return
            dim = 0 if t.shape[0] == num_blocks else 1 if t.dim() > 1 and t.shape[1] == num_blocks else -1
            if dim < 0:
                logger.error("kvstrata: layer %s has shape %s with no axis of %d blocks; connector disabled",
                             name, tuple(t.shape), num_blocks)
                return
            per = t.select(dim, 0).numel() * t.element_size()
            if per != self.layer_block_bytes:
                logger.error("kvstrata: layer %s holds %d bytes per block, the KV spec says %d; connector disabled",
                             name, per, self.layer_block_bytes)
                return
            layers.append((t, dim))
        self._layers = layers
        try:
            per_batch = max(self.block_bytes, self.staging_bytes // 2)
            self._load_pool = SharedPool.create(self.mempool_socket, f"vllm-load-{os.getpid()}-{self._tp_rank}", per_batch)
            self._save_pool = SharedPool.create(self.mempool_socket, f"vllm-save-{os.getpid()}-{self._tp_rank}", per_batch)
        except Exception as e:  # noqa: BLE001
            logger.warning("kvstrata: cannot register staging pools (%s); will retry on first use", e)
        self._save_thread = threading.Thread(target=self._save_loop, name="kvstrata-save", daemon=True)
        self._save_thread.start()
        self._worker_ok = True
        logger.info("kvstrata: %d layers, %d bytes per block, tp rank %d, daemon %s", len(layers),
                    self.block_bytes, self._tp_rank, self.addr)

    def _pools(self) -> tuple[SharedPool, SharedPool]:
        """The staging pools, registered again after a daemon restart."""
        if (self._stale or self._load_pool is None or self._save_pool is None
                or not self._load_pool.is_registered() or not self._save_pool.is_registered()):
            self._stale = False
            # (a restarted daemon refuses the old pool ids: they are unique to a daemon run)
            self._registered.clear()
            for p in (self._load_pool, self._save_pool):
                if p is not None and not p.closed:
                    p.close()
            per_batch = max(self.block_bytes, self.staging_bytes // 2)
            self._load_pool = SharedPool.create(self.mempool_socket, f"vllm-load-{os.getpid()}-{self._tp_rank}", per_batch)
            self._save_pool = SharedPool.create(self.mempool_socket, f"vllm-save-{os.getpid()}-{self._tp_rank}", per_batch)
        return self._load_pool, self._save_pool

    def _reset_pools(self) -> None:
        for p in (self._load_pool, self._save_pool):
            if p is not None and not p.closed:
                p.close()
        self._load_pool = self._save_pool = None

    def _block_views(self, staging: SharedPool, slot: int) -> list[torch.Tensor]:
        """Per-layer views of one staged block (layer after layer)."""
        base = slot * self.block_bytes
        views = []
        for l, (t, dim) in enumerate(self._layers):
            page = t.select(dim, 0)
            v = staging.tensor(torch.uint8, offset=base + l * self.layer_block_bytes,
                               nbytes=self.layer_block_bytes).view(t.dtype).view(page.shape)
            views.append(v)
        return views

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvstrataConnectorMetadata) or not meta.loads:
            return
        for load in meta.loads:
            if not self._worker_ok:
                self._load_errors.update(load.block_ids)
                continue
            done = self._guarded("load", lambda: self._load(load), 0)
            if done < len(load.block_ids):
                failed = load.block_ids[done:]
                self._load_errors.update(failed)
                self.stats["load_errors"] += len(failed)
            self.stats["loaded_blocks"] += done

    def _load(self, load: BlockTransfer) -> int:
        """Loads the blocks in order; returns how many leading blocks were loaded."""
        self._ensure_ns(self._tp_rank)
        ns = self.namespace_id(self._tp_rank)
        loaded = 0
        retried = False
        while loaded < len(load.keys):
            pool, _ = self._pools()
            per_batch = max(1, pool.size // self.block_bytes)
            keys = load.keys[loaded:loaded + per_batch]
            regions = [pool.region(i * self.block_bytes, self.block_bytes) for i in range(len(keys))]
            res = self.client.batch_get_results(ns, keys, regions=regions)
            if any(r.region_error for r in res) and not retried:
                retried = True  # the daemon restarted and forgot our pool
                self._reset_pools()
                continue
            for i, r in enumerate(res):
                if not r.found:
                    return loaded
                bid = load.block_ids[loaded]
                for (t, dim), v in zip(self._layers, self._block_views(pool, i)):
                    t.select(dim, bid).copy_(v)  # the one copy: staging pool -> vLLM's page
                loaded += 1
        return loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # every layer is saved at once in wait_for_save, after the forward

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvstrataConnectorMetadata) or not meta.saves or not self._worker_ok:
            return
        if not self.breaker.allow():
            self.stats["save_dropped"] += sum(len(s.keys) for s in meta.saves)
            return
        for save in meta.saves:
            with self._pending_lock:
                if self._pending_saves:  # the previous write-behind still uses the staging pool
                    self._pending_lock.wait(timeout=self.timeout)
                if self._pending_saves:
                    self.stats["save_dropped"] += len(save.keys)
                    continue
                self._pending_saves = 1
            try:
                _, pool = self._pools()
            except Exception as e:  # noqa: BLE001 - no daemon: drop the saves
                self._save_done()
                self._registered.clear()
                self.breaker.failure()
                self.stats["save_dropped"] += sum(len(s.keys) for s in meta.saves)
                logger.warning("kvstrata: staging pools unavailable (%s); saves dropped", e)
                return
            per_batch = max(1, pool.size // self.block_bytes)
            keys, ids = save.keys[:per_batch], save.block_ids[:per_batch]
            self.stats["save_dropped"] += len(save.keys) - len(keys)  # beyond one staging pool
            try:
                for i, bid in enumerate(ids):
                    for (t, dim), v in zip(self._layers, self._block_views(pool, i)):
                        v.copy_(t.select(dim, bid))  # the one copy: vLLM's page -> staging pool
            except Exception as e:  # noqa: BLE001 - never into the engine
                self._save_done()
                self.stats["save_dropped"] += len(keys)
                logger.warning("kvstrata: staging a save failed (%s); dropped", e)
                continue
            self._saves.put((keys, save.parent, pool))

    def _save_done(self) -> None:
        with self._pending_lock:
            self._pending_saves = 0
            self._pending_lock.notify_all()

    def _save_loop(self) -> None:
        while True:
            job = self._saves.get()
            if job is None:
                return
            keys, parent, pool = job

            def put() -> int:
                self._ensure_ns(self._tp_rank)
                regions = [pool.region(i * self.block_bytes, self.block_bytes) for i in range(len(keys))]
                resp = self.client.batch_put_regions(self.namespace_id(self._tp_rank), keys, regions,
                                                     parents="chain", first_parent=parent or None)
                if pb.PUT_STATUS_BAD_REGION in resp.results:
                    self._stale = True  # the worker thread registers the pools again
                return resp.stored

            stored = self._guarded("save", put, 0)
            self.stats["saved_blocks"] += stored
            self.stats["save_failed"] += len(keys) - stored
            self._save_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until the write-behind queue is empty (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            while self._pending_saves:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._pending_lock.wait(timeout=left)
        return True

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        return None, None

    def reset_cache(self) -> Optional[bool]:
        return None  # vLLM's prefix-cache reset never drops kvstrata's blocks

    def shutdown(self) -> None:
        self.flush(timeout=5.0)
        self._saves.put(None)
        for p in (self._load_pool, self._save_pool):
            if p is not None and not p.closed:
                p.close()
        if self._client is not None:
            self._client.close()
