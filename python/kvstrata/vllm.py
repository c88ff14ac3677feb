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
axis is 0 or 1, e.g. vLLM 0.32's `[num_blocks, kv_heads, block_size, 2*head_size]` views
or the classic `(2, num_blocks, block_size, kv_heads, head_size)`). Two data paths:

- **KV region** (`region_socket` set and the caches on a CUDA device): the buffer behind
  the layers is registered once as a CUDA-IPC `KvRegion` (`kvstrata.layouts.
  vllm_region_geometry` reads its strides), and loads and saves name page ids: the daemon
  scatters / gathers the pages on the GPU itself, with no copy in this process. A save is
  handed to a background thread once the step's forward has finished on the GPU (a CUDA
  event); vLLM keeps the request's blocks until it is stored (`request_finished` answers
  True, `get_finished` reports the request when its saves are done).
- **Staging** (otherwise, e.g. vLLM's CPU backend): `start_load_kv` reads the blocks into
  a staging `SharedPool` (one `BatchGet` per batch, no payload in the message) and copies
  each into vLLM's pages (one copy); `wait_for_save` copies the saved blocks into the
  staging pool (one copy) and hands the `BatchPut` to a background thread.

Either way the engine never waits for the daemon on a save (write-behind), and a block
that is missing or cannot be read goes to `get_block_ids_with_load_errors`: vLLM
recomputes it and everything after it (use `kv_load_failure_policy: "recompute"`), never
wrong KV. A block's bytes are, layer after layer, the layer's page in vLLM's memory order
(both paths write the same bytes).

Keys: vLLM's own block hashes (`request.block_hashes`, chained over the prefix and
covering the request's `cache_salt`, LoRA adapter and multimodal inputs), each hashed with
the namespace id of TP rank 0 (every rank stores the same keys in its own namespace), when
they are the same in every process: vLLM's default `sha256` (and `sha256_cbor`) derive
them from a fixed seed unless `PYTHONHASHSEED` is set (then from it: engines sharing KV
must set the same value), but `xxhash` / `xxhash_cbor` draw a random seed per process
when `PYTHONHASHSEED` is unset. Then, or with `"keys": "tokens"`, the keys are the
canonical chain of docs/hashing.md over the prompt's token ids, mixed with the request's
identity beyond its tokens (`cache_salt`, LoRA, multimodal input hashes). The namespace
names the model (and a fingerprint of its config.json), KV dtype, block size, layer
layout and TP rank; it is layer-major (`[layer][K|V][page bytes]`) on the KV-region path
and opaque otherwise.

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
from .layouts import memory_order, vllm_region_geometry
from .pool import SharedPool
from .region import KvRegion
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
    saving: bool = False  # saves were planned: on the KV-region path vLLM holds the blocks


#: What a kvstrata key of a vLLM block hash is made of: the chain start, this tag, the hash.
BLOCK_HASH_TAG = b"kvstrata-vllm-block-hash-v1"


def vllm_hashes_are_stable(hash_algo: str, env: Optional[dict[str, str]] = None) -> bool:
    """Whether vLLM's block hashes are the same in every process (see the module docs):
    sha256 / sha256_cbor always (a fixed seed, or PYTHONHASHSEED), xxhash / xxhash_cbor
    only with PYTHONHASHSEED set (else vLLM draws a random seed per process)."""
    env = os.environ if env is None else env
    if hash_algo in ("sha256", "sha256_cbor"):
        return True
    return env.get("PYTHONHASHSEED") is not None


def block_hash_keys(start: bytes, block_hashes: list[bytes]) -> list[bytes]:
    """kvstrata keys of vLLM block hashes under a chain start (`chain_start`)."""
    return [hashing.xxh3_128_le(start + BLOCK_HASH_TAG + bytes(h)) for h in block_hashes]


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
    default: KVSTRATA_ADDR or the default socket), `mempool_socket` (the staging path),
    `region_socket` (the daemon's KV-region socket: the zero-copy path for CUDA caches),
    `timeout_ms` (default 1000), `staging_mb` (default 256), `namespace` (model id;
    default: vLLM's model name), `keys` ("auto", "vllm" or "tokens"), `token`,
    `token_file`, `tls_ca`."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        get = cfg.get_from_extra_config
        self.addr = get("addr", None) or default_target()
        self.mempool_socket = get("mempool_socket", None)
        self.region_socket = get("region_socket", None)
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
        self.kv_heads = int(getattr(spec, "num_kv_heads", 0) or 0)
        self.head_size = int(getattr(spec, "head_size", 0) or 0)
        dtype_bytes = torch.empty((), dtype=self.kv_dtype).element_size() if isinstance(self.kv_dtype, torch.dtype) else 1
        # The KV-region path: the daemon gathers whole (layer, K|V, page) chunks into
        # layer-major blocks, so the namespace is layer-major and its blocks are exactly the
        # layers' pages (no padding, K and V of the same size). Decided from the
        # configuration alone: the scheduler and the workers must agree on it.
        self.region_path = bool(self.region_socket) and self.kv_heads > 0 and self.head_size > 0 and (
            int(getattr(spec, "head_size_v", self.head_size) or self.head_size) == self.head_size
            and self.layer_block_bytes == 2 * self.block_size * self.kv_heads * self.head_size * dtype_bytes)
        if self.region_socket and not self.region_path:
            logger.warning("kvstrata: region_socket set, but the KV spec (%s) does not split into whole K and V "
                           "chunks; using the staging path", spec)
        # vLLM keeps a saved request's blocks until its saves are done (KV-region path)
        self.hold_blocks = self.region_path
        self.fingerprint = self._model_fingerprint(vllm_config)
        self.layout_tag = "kv-layout:" + str(getattr(kv_cache_config, "kv_cache_layout", None) or "default")
        keys = str(get("keys", "auto"))
        algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256"))
        self.hash_keys = keys == "vllm" or (keys == "auto" and vllm_hashes_are_stable(algo))
        self.hash_block_size = int(getattr(kv_cache_config, "hash_block_size", None)
                                   or getattr(vllm_config.cache_config, "hash_block_size", None) or self.block_size)
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
        self._stale = False  # set after a failed staging call: replace the pools (worker thread only)
        # the KV-region path
        self._region: Optional[KvRegion] = None
        self._region_base: Optional[torch.Tensor] = None
        self._region_mode = False  # loads and saves name pages of the registered KV buffer
        self._region_saves = 0  # region save jobs queued or running
        self._region_geometry: Any = None
        self._region_lock = threading.Lock()
        self._save_jobs: dict[str, int] = {}  # request id -> save jobs not finished yet
        self._save_seen: set[str] = set()  # requests whose saves the scheduler planned
        self._finished_waiting: set[str] = set()  # finished requests waiting for their saves

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
        if self.region_path:
            return NamespaceSpec(model_id=model_id[:256], num_layers=len(self.layer_names),
                                 num_kv_heads=self.kv_heads, head_dim=self.head_size,
                                 dtype=_DTYPE_CODES.get(self.kv_dtype, 6), block_tokens=self.block_size,
                                 tp_rank=tp_rank, tp_size=self.tp_size, model_fingerprint=self.fingerprint)
        return NamespaceSpec.opaque(model_id[:256], self.block_bytes, dtype=_DTYPE_CODES.get(self.kv_dtype, 6),
                                    block_tokens=self.block_size, tp_rank=tp_rank, tp_size=self.tp_size,
                                    model_fingerprint=self.fingerprint)

    def namespace_id(self, tp_rank: int) -> bytes:
        if tp_rank not in self._ns_ids:
            self._ns_ids[tp_rank] = self.spec(tp_rank).namespace_id()
        return self._ns_ids[tp_rank]

    def request_keys(self, request: Any, tokens: Optional[list[int]] = None) -> list[bytes]:
        """The request's block keys (see the module docs): from vLLM's block hashes when
        they are stable across processes, else the chain over the token ids. Either starts
        from the namespace id of TP rank 0 for every rank (each rank stores them in its own
        namespace), so the scheduler computes one key list for all ranks."""
        tokens = list(request.prompt_token_ids or []) if tokens is None else tokens
        h0 = chain_start(self.namespace_id(0), request_identity(request))
        if self.hash_keys:
            hashes = self._block_hashes(request)
            if hashes is not None:
                return block_hash_keys(h0, hashes[:len(tokens) // self.block_size])
        return hashing.chain_keys(h0, tokens, self.block_size)

    def _block_hashes(self, request: Any) -> Optional[list[bytes]]:
        """vLLM's hash of each full block of the request (the last of the block's
        `hash_block_size` hashes: each covers the whole prefix), or None when vLLM has not
        hashed the request at a granularity that divides the block size."""
        hashes = getattr(request, "block_hashes", None)
        if not hashes or self.block_size % self.hash_block_size:
            return None
        per = self.block_size // self.hash_block_size
        return [bytes(h) for h in list(hashes)[per - 1::per]]

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
        usable_blocks = min(usable_blocks, len(keys))
        if usable_blocks == 0:
            return 0, False

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
            st.saving = True

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        st = self._reqs.pop(request.request_id, None)
        # On the KV-region path the daemon gathers the pages after the step: vLLM must not
        # reuse them until the workers report the request's saves done (get_finished).
        return bool(self.hold_blocks and st is not None and st.saving), None

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
        if self.region_path:
            try:
                tensors = [t for t, _ in layers]
                self._region_geometry = vllm_region_geometry(
                    tensors, num_blocks=num_blocks, block_size=self.block_size, kv_heads=self.kv_heads,
                    head_size=self.head_size)
                self._region_base = tensors[0]
                self._region_mode = self._region_capable(tensors[0])
                if not self._region_mode:
                    logger.info("kvstrata: the KV caches are on %s, not a CUDA device: using the staging path",
                                tensors[0].device)
            except Exception as e:  # noqa: BLE001 - a layout the daemon cannot gather: staging
                logger.warning("kvstrata: vLLM's KV buffer cannot be a KV region (%s); using the staging path", e)
        if self._region_mode:
            try:
                self._live_region(force=True)
            except Exception as e:  # noqa: BLE001 - the daemon may come later
                logger.warning("kvstrata: cannot register the KV region yet (%s); will retry on first use", e)
            self._save_thread = threading.Thread(target=self._save_loop, name="kvstrata-save", daemon=True)
            self._save_thread.start()
            self._worker_ok = True
            logger.info("kvstrata: KV region path (%s), %d layers, %d bytes per block, tp rank %d, daemon %s",
                        self._region_geometry, len(layers), self.block_bytes, self._tp_rank, self.addr)
            return
        try:
            per_batch = max(self.block_bytes, self.staging_bytes // 2)
            self._load_pool = SharedPool.create(self.mempool_socket, f"vllm-load-{os.getpid()}-{self._tp_rank}",
                                                per_batch, timeout=self.timeout)
            self._save_pool = SharedPool.create(self.mempool_socket, f"vllm-save-{os.getpid()}-{self._tp_rank}",
                                                per_batch, timeout=self.timeout)
        except Exception as e:  # noqa: BLE001
            logger.warning("kvstrata: cannot register staging pools (%s); will retry on first use", e)
        self._save_thread = threading.Thread(target=self._save_loop, name="kvstrata-save", daemon=True)
        self._save_thread.start()
        self._worker_ok = True
        logger.info("kvstrata: %d layers, %d bytes per block, tp rank %d, daemon %s", len(layers),
                    self.block_bytes, self._tp_rank, self.addr)

    def _pools(self) -> tuple[SharedPool, SharedPool]:
        """The staging pools, registered again after a daemon restart, and replaced by new
        memory after a load or save that failed or timed out (`_stale`): the daemon may
        still execute that request late (after a stall, or one it had already started), so
        it must find memory that nothing reads or writes any more, never the next batch's
        blocks (the old pool is unregistered, so a late request usually just fails)."""
        if (self._stale or self._load_pool is None or self._save_pool is None
                or not self._load_pool.is_registered() or not self._save_pool.is_registered()):
            self._stale = False
            # (a restarted daemon refuses the old pool ids: they are unique to a daemon run)
            self._registered.clear()
            for p in (self._load_pool, self._save_pool):
                if p is not None and not p.closed:
                    p.close()
            per_batch = max(self.block_bytes, self.staging_bytes // 2)
            self._load_pool = SharedPool.create(self.mempool_socket, f"vllm-load-{os.getpid()}-{self._tp_rank}",
                                                per_batch, timeout=self.timeout)
            self._save_pool = SharedPool.create(self.mempool_socket, f"vllm-save-{os.getpid()}-{self._tp_rank}",
                                                per_batch, timeout=self.timeout)
        return self._load_pool, self._save_pool

    def _reset_pools(self) -> None:
        for p in (self._load_pool, self._save_pool):
            if p is not None and not p.closed:
                p.close()
        self._load_pool = self._save_pool = None

    # --- the KV-region path ---------------------------------------------------------------

    def _region_capable(self, base: torch.Tensor) -> bool:
        """Whether the buffer can be registered (CUDA memory; tests stand a memfd in)."""
        return bool(base.is_cuda)

    def _open_region(self, base: torch.Tensor, geometry: Any, name: str) -> KvRegion:
        """Registers the KV buffer through CUDA IPC (tests stand a memfd region in)."""
        return KvRegion.from_cuda_tensor(self.region_socket, base, geometry, name)

    def _live_region(self, force: bool = False) -> KvRegion:
        """The registered region, registered (again) when there is none, its connection
        closed (the daemon died or restarted: its region ids are unique to a run), or
        `force`."""
        with self._region_lock:
            r = self._region
            if r is not None and not force and r.is_registered():
                return r
            if r is not None:
                r.close()
                self._region = None
            self._region = self._open_region(self._region_base, self._region_geometry,
                                             f"vllm-{os.getpid()}-{self._tp_rank}")
            return self._region

    def _drop_region(self) -> None:
        """Unregisters the region after a call that failed or timed out: a request the
        daemon has not resolved yet then names no region and moves no page (one it is
        already executing still does; see docs/vllm.md). The next call registers again."""
        with self._region_lock:
            if self._region is not None:
                self._region.close()
                self._region = None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before each step's forward: the previous steps' saves must have gathered their
        pages before this forward may write into pages vLLM has reused. Usually done long
        before; a save still queued after `timeout_ms` loses its region (it then stores
        nothing) rather than gather reused pages."""
        super().bind_connector_metadata(connector_metadata)
        if not self._region_mode:
            return
        deadline = time.monotonic() + self.timeout
        with self._pending_lock:
            while self._region_saves and time.monotonic() < deadline:
                self._pending_lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            late = self._region_saves
        if late:
            logger.warning("kvstrata: %d saves still running after %.1f s; unregistering the KV region", late,
                           self.timeout)
            self._drop_region()

    def _load_region(self, load: BlockTransfer) -> int:
        """One BatchGet scattering the found blocks into their pages (the daemon does it);
        returns how many leading blocks were loaded. A block after a miss may be written
        too: it is reported with the miss, and vLLM recomputes it."""
        self._ensure_ns(self._tp_rank)
        ns = self.namespace_id(self._tp_rank)
        for attempt in range(2):
            region = self._live_region(force=attempt > 0)
            try:
                res = self.client.batch_get_results(ns, load.keys,
                                                    pages=region.page_batch(load.block_ids))
            except Exception:
                self._drop_region()  # a late scatter must find no region: vLLM recomputes these pages
                raise
            if not any(r.region_error for r in res):
                break  # else the daemon restarted and forgot the region: register it again, once
        loaded = 0
        for r in res:
            if not r.found:
                break
            loaded += 1
        return loaded

    def _save_region(self, save: BlockTransfer) -> int:
        """One BatchPut gathering the blocks from their pages (the daemon does it)."""
        self._ensure_ns(self._tp_rank)
        ns = self.namespace_id(self._tp_rank)
        for attempt in range(2):
            region = self._live_region(force=attempt > 0)
            try:
                resp = self.client.batch_put_pages(ns, save.keys, region.page_batch(save.block_ids),
                                                   parents="chain", first_parent=save.parent or None)
            except Exception:
                self._drop_region()  # a late gather must find no region: the pages may be reused
                raise
            if pb.PUT_STATUS_BAD_REGION not in resp.results:
                break
        return resp.stored

    # --- the staging path -------------------------------------------------------------------

    def _block_views(self, staging: SharedPool, slot: int) -> list[torch.Tensor]:
        """Per-layer views of one staged block (layer after layer), each shaped like the
        layer's page in memory order (`_page`): the block holds the page's bytes as they lie
        in vLLM's memory, as the daemon's gather from a KV region does."""
        base = slot * self.block_bytes
        views = []
        for l, (t, dim) in enumerate(self._layers):
            page = self._page(t, dim, 0)
            v = staging.tensor(torch.uint8, offset=base + l * self.layer_block_bytes,
                               nbytes=self.layer_block_bytes).view(t.dtype).view(page.shape)
            views.append(v)
        return views

    @staticmethod
    def _page(t: torch.Tensor, dim: int, block: int) -> torch.Tensor:
        """Block `block` of a layer tensor, its axes in memory order."""
        return memory_order(t.select(dim, block))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvstrataConnectorMetadata) or not meta.loads:
            return
        for load in meta.loads:
            if not self._worker_ok:
                self._load_errors.update(load.block_ids)
                continue
            load_fn = self._load_region if self._region_mode else self._load
            done = self._guarded("load", lambda: load_fn(load), 0)
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
            ranges = [pool.range(i * self.block_bytes, self.block_bytes) for i in range(len(keys))]
            try:
                res = self.client.batch_get_results(ns, keys, ranges=ranges)
            except Exception:
                # The daemon may still execute this get once it runs again (a stall, a
                # deadline): its writes must land in memory nothing reads any more.
                self._stale = True
                raise
            if any(r.region_error for r in res) and not retried:
                retried = True  # the daemon restarted and forgot our pool
                self._reset_pools()
                continue
            for i, r in enumerate(res):
                if not r.found:
                    return loaded
                bid = load.block_ids[loaded]
                for (t, dim), v in zip(self._layers, self._block_views(pool, i)):
                    self._page(t, dim, bid).copy_(v)  # the one copy: staging pool -> vLLM's page
                loaded += 1
        return loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # every layer is saved at once in wait_for_save, after the forward

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvstrataConnectorMetadata) or not meta.saves:
            return
        if self.hold_blocks:
            with self._pending_lock:  # get_finished reports these once their saves are done
                self._save_seen.update(s.req_id for s in meta.saves)
        if not self._worker_ok:
            return
        if not self.breaker.allow():
            self.stats["save_dropped"] += sum(len(s.keys) for s in meta.saves)
            return
        if self._region_mode:
            # The daemon gathers the pages once this step's forward has written them: a CUDA
            # event on the current stream, waited for by the save thread, not by the engine.
            event = None
            if self._region_base is not None and self._region_base.is_cuda:
                event = torch.cuda.Event()
                event.record()
            with self._pending_lock:
                for save in meta.saves:
                    self._save_jobs[save.req_id] = self._save_jobs.get(save.req_id, 0) + 1
                self._region_saves += len(meta.saves)
            for save in meta.saves:
                self._saves.put(("region", save, event))
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
                        v.copy_(self._page(t, dim, bid))  # the one copy: vLLM's page -> staging pool
            except Exception as e:  # noqa: BLE001 - never into the engine
                self._save_done()
                self.stats["save_dropped"] += len(keys)
                logger.warning("kvstrata: staging a save failed (%s); dropped", e)
                continue
            with self._pending_lock:
                self._save_jobs[save.req_id] = self._save_jobs.get(save.req_id, 0) + 1
            self._saves.put(("staged", save.req_id, keys, save.parent, pool))

    def _save_done(self) -> None:
        with self._pending_lock:
            self._pending_saves = 0
            self._pending_lock.notify_all()

    def _save_loop(self) -> None:
        while True:
            job = self._saves.get()
            if job is None:
                return
            if job[0] == "region":
                _, save, event = job
                stored = 0
                try:
                    if event is not None:
                        event.synchronize()  # the step's KV is written
                    stored = self._guarded("save", lambda: self._save_region(save), 0)
                except Exception as e:  # noqa: BLE001 - the save thread must live on
                    logger.warning("kvstrata: a save failed (%s); dropped", e)
                finally:
                    self.stats["saved_blocks"] += stored
                    self.stats["save_failed"] += len(save.keys) - stored
                    with self._pending_lock:
                        self._region_saves -= 1
                    self._job_done(save.req_id)
                continue
            _, req_id, keys, parent, pool = job

            def put() -> int:
                self._ensure_ns(self._tp_rank)
                ranges = [pool.range(i * self.block_bytes, self.block_bytes) for i in range(len(keys))]
                try:
                    resp = self.client.batch_put_ranges(self.namespace_id(self._tp_rank), keys, ranges,
                                                         parents="chain", first_parent=parent or None)
                except Exception:
                    # A put the daemon executes late must read these bytes, not the next
                    # save's: the worker thread replaces the pool before it stages again.
                    self._stale = True
                    raise
                if pb.PUT_STATUS_BAD_REGION in resp.results:
                    self._stale = True  # the worker thread registers the pools again
                return resp.stored

            stored = self._guarded("save", put, 0)
            self.stats["saved_blocks"] += stored
            self.stats["save_failed"] += len(keys) - stored
            self._save_done()
            self._job_done(req_id)

    def _job_done(self, req_id: str) -> None:
        with self._pending_lock:
            left = self._save_jobs.get(req_id, 0) - 1
            if left > 0:
                self._save_jobs[req_id] = left
            else:
                self._save_jobs.pop(req_id, None)
            self._pending_lock.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until the write-behind queue is empty (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            while self._pending_saves or self._save_jobs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._pending_lock.wait(timeout=left)
        return True

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        """On the KV-region path: the finished requests whose blocks vLLM held for their saves
        (`request_finished` answered True for exactly those: the scheduler planned saves for
        them, and every save planned reached this worker in the step's metadata), once every
        save job of theirs is done (stored, failed or dropped)."""
        if not self.hold_blocks:
            return None, None
        with self._pending_lock:
            self._finished_waiting.update(r for r in finished_req_ids if r in self._save_seen)
            done = {r for r in self._finished_waiting if not self._save_jobs.get(r)}
            self._finished_waiting -= done
            self._save_seen -= done
        return (done or None), None

    def reset_cache(self) -> Optional[bool]:
        return None  # vLLM's prefix-cache reset never drops kvstrata's blocks

    def shutdown(self) -> None:
        self.flush(timeout=5.0)
        self._saves.put(None)
        with self._region_lock:
            if self._region is not None:
                self._region.close()
                self._region = None
        for p in (self._load_pool, self._save_pool):
            if p is not None and not p.closed:
                p.close()
        if self._client is not None:
            self._client.close()
