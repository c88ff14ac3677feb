"""`Client`: every RPC of `kvstrata.v1.KvCache` (docs/protocol.md), synchronous.

A `Client` holds one gRPC channel (thread-safe: share it between threads). Calls take
an optional `timeout` in seconds (default: the client's `timeout`). Every refusal raises
an `RpcError` subclass carrying the gRPC code and the field the daemon named.
Payload-free data paths: `batch_put_ranges` / `batch_get_into` (shared-memory pools,
`kvstrata.SharedPool`) and `batch_put_pages` / `batch_get_pages` (KV regions,
`kvstrata.KvRegion`). Page requests of `WIRE_MIN_BLOCKS` blocks or more are encoded with
numpy (`kvstrata._wire`: the same bytes protobuf would make, without a message per block)
and sent as bytes. A page get into a CUDA IPC region may be answered as soon as the daemon's
copies are queued on the GPU (`Client.answer_when_queued`, on by default); `batch_get_pages`
then waits on the CUDA event the answer names, so it still returns once the pages are written.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union, cast

import grpc

from . import _wire, hashing
from .errors import KvstrataError, RpcError, rpc_error
from .region import PageBatch
from .region_calls import CALL_GET, CALL_PUT
from .target import Target, parse_target
from .v1 import kvstrata_pb2 as pb
from .v1 import kvstrata_pb2_grpc as pb_grpc

MIB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 512 * MIB
NAMESPACE_ID_BYTES = 16
#: Page requests of at least this many blocks are built by `kvstrata._wire` (fewer: as
#: messages, cheaper for a handful of blocks).
WIRE_MIN_BLOCKS = 32
#: Keys per request the daemon takes by default (`server.max_batch`; a longer request is
#: refused RESOURCE_EXHAUSTED): `lookup` and the page requests send longer key lists in
#: requests of at most this many keys.
MAX_BATCH = 4096
#: Values of `KVSTRATA_ANSWER_WHEN_QUEUED` (any case) that turn `Client.answer_when_queued` off.
ANSWER_WHEN_QUEUED_OFF = ("0", "off", "false")
#: Bytes of a `cudaIpcEventHandle_t`, the handle in `BatchGetResponse.pages_ready_event`.
CUDA_IPC_EVENT_BYTES = 64
#: Seconds `batch_get_pages` waits for the daemon's copies after an answer named an event
#: before it raises (copies of a whole request take milliseconds; an event that never
#: completes means a daemon that died with its copies queued).
READY_WAIT_SECONDS = 10.0
#: CUDA events opened from the daemon's handles that one client keeps open (the daemon keeps
#: one event per KV region, so one per region registered; the oldest is closed beyond this).
READY_EVENTS_MAX = 64

#: `kvstrata.v1` enums, re-exported.
Dtype = pb.Dtype
Layout = pb.Layout
Tier = pb.Tier
PutStatus = pb.PutStatus
EventKind = pb.EventKind


@dataclass(frozen=True)
class NamespaceSpec:
    """One KV geometry (`kvstrata.v1.NamespaceSpec`). `dtype` takes a name ("bf16") or
    wire code; `layout` "layer_major" (default) or "opaque" or a code."""

    model_id: str
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: Union[str, int] = "f16"
    block_tokens: int = 0
    layout: Union[str, int] = "layer_major"
    tp_rank: int = 0
    tp_size: int = 1
    opaque_block_bytes: int = 0
    model_fingerprint: bytes = b""

    @staticmethod
    def opaque(model_id: str, block_bytes: int, *, dtype: Union[str, int] = "int8",
               block_tokens: int = 0, tp_rank: int = 0, tp_size: int = 1,
               model_fingerprint: bytes = b"") -> "NamespaceSpec":
        """An opaque namespace: blocks of `block_bytes` bytes the daemon never interprets."""
        return NamespaceSpec(model_id=model_id, dtype=dtype, block_tokens=block_tokens,
                             layout="opaque", tp_rank=tp_rank, tp_size=tp_size,
                             opaque_block_bytes=block_bytes, model_fingerprint=model_fingerprint)

    @property
    def dtype_code(self) -> int:
        if isinstance(self.dtype, str):
            try:
                return hashing.DTYPES[self.dtype.lower()]
            except KeyError:
                raise ValueError(f"spec.dtype: {self.dtype!r} is not one of {sorted(hashing.DTYPES)}") from None
        return int(self.dtype)

    @property
    def layout_code(self) -> int:
        if isinstance(self.layout, str):
            try:
                return hashing.LAYOUTS[self.layout.lower()]
            except KeyError:
                raise ValueError(f"spec.layout: {self.layout!r} is not one of {sorted(hashing.LAYOUTS)}") from None
        return int(self.layout)

    def canonical_encoding(self) -> bytes:
        return hashing.canonical_encoding(
            self.model_id, self.model_fingerprint, self.num_layers, self.num_kv_heads,
            self.head_dim, self.dtype_code, self.block_tokens, self.layout_code,
            self.tp_rank, self.tp_size, self.opaque_block_bytes)

    def namespace_id(self) -> bytes:
        """The 16-byte id the daemon will answer for this spec (docs/hashing.md)."""
        return hashing.namespace_id_of_encoding(self.canonical_encoding())

    def block_bytes(self) -> int:
        """Payload bytes of one block."""
        if self.layout_code == 2:
            return self.opaque_block_bytes
        return (self.num_layers * 2 * self.block_tokens * self.num_kv_heads * self.head_dim
                * hashing.DTYPE_BYTES.get(self.dtype_code, 0))

    def to_proto(self) -> pb.NamespaceSpec:
        return pb.NamespaceSpec(
            model_id=self.model_id, model_fingerprint=self.model_fingerprint,
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=cast(Any, self.dtype_code), block_tokens=self.block_tokens, layout=cast(Any, self.layout_code),
            tp_rank=self.tp_rank, tp_size=self.tp_size, opaque_block_bytes=self.opaque_block_bytes)


@dataclass(frozen=True)
class Namespace:
    """A registered namespace: its `id` (16 bytes), `block_bytes`, and the spec."""

    id: bytes
    block_bytes: int
    spec: Optional[NamespaceSpec] = None
    created: bool = False

    def block_keys(self, tokens: Sequence[int]) -> list[bytes]:
        """Canonical chained keys of every full block of `tokens` (needs the spec's block_tokens)."""
        if self.spec is None or self.spec.block_tokens < 1:
            raise ValueError("block_tokens: this namespace has no block_tokens; use kvstrata.block_keys")
        return hashing.block_keys(self.id, tokens, self.spec.block_tokens)

    @property
    def hex(self) -> str:
        return self.id.hex()


NamespaceRef = Union[Namespace, bytes]


def _ns_id(ns: NamespaceRef) -> bytes:
    return ns.id if isinstance(ns, Namespace) else bytes(ns)


@dataclass(frozen=True)
class LookupResult:
    """`matched` leading keys are cached; `tiers[i]` is where key i lives."""

    matched: int
    tiers: list[int] = field(default_factory=list)


def _parents(keys: Sequence[bytes], parents: Union[None, str, Sequence[Optional[bytes]]],
             first_parent: Optional[bytes]) -> list[bytes]:
    if parents is None:
        return [b""] * len(keys)
    if parents == "chain":
        out: list[bytes] = []
        prev = first_parent or b""
        for k in keys:
            out.append(prev)
            prev = bytes(k)
        return out
    if isinstance(parents, str):
        raise ValueError("parents: None, 'chain' or one parent per key")
    if len(parents) != len(keys):
        raise ValueError(f"parents: {len(parents)} parents for {len(keys)} keys")
    return [bytes(p or b"") for p in parents]


class Lease:
    """A pin's lease, a context manager: `with client.pin(ns, keys): ...` unpins on exit."""

    def __init__(self, client: "Client", lease_id: int, deadline_unix_ms: int) -> None:
        self.client = client
        self.lease_id = lease_id
        self.deadline_unix_ms = deadline_unix_ms
        self.released = False

    def release(self) -> None:
        """Ends the lease (idempotent; an already expired lease is not an error here)."""
        if self.released:
            return
        self.released = True
        try:
            self.client.unpin(self.lease_id)
        except RpcError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Watch:
    """An iterator of `WatchEvent`s; `cancel()` (or leaving a `with` block) ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> pb.WatchEvent:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise rpc_error("Watch", e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _token_from_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                return line.split()[0]
    raise KvstrataError(f"token_file: {path} holds no token line")


class Client:
    """A connection to the daemon. See the module docs.

    target: see `kvstrata.target` (None: `KVSTRATA_ADDR`, the default socket, 127.0.0.1:50051).
    token / token_file: bearer token sent on every call (default: `KVSTRATA_TOKEN`,
    `KVSTRATA_TOKEN_FILE`). tls_ca, tls_cert, tls_key: PEM files for an `https://` target
    (default: `KVSTRATA_TLS_CA`, `KVSTRATA_CLIENT_CERT`, `KVSTRATA_CLIENT_KEY`).
    timeout: seconds each unary call may take (None: no deadline).
    answer_when_queued: whether `batch_get_pages` into a CUDA IPC region lets the daemon answer
    once its copies are queued on the GPU, then waits on the CUDA event the answer names before
    returning (default: on, unless `KVSTRATA_ANSWER_WHEN_QUEUED` is 0, off or false).
    """

    def __init__(self, target: Optional[str] = None, *, token: Optional[str] = None,
                 token_file: Optional[str] = None, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 tls_domain: Optional[str] = None, timeout: Optional[float] = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = (),
                 answer_when_queued: Optional[bool] = None,
                 region_calls: Optional[bool] = None) -> None:
        self.target: Target = parse_target(target)
        self.timeout = timeout
        token = token or os.environ.get("KVSTRATA_TOKEN") or None
        token_file = token_file or os.environ.get("KVSTRATA_TOKEN_FILE") or None
        if token is None and token_file is not None:
            token = _token_from_file(token_file)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.enable_retries", 0),
                # a restarted daemon is found again within seconds, not grpc's 2-minute backoff
                ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000)] + list(options)
        if self.target.kind == "https":
            tls_ca = tls_ca or os.environ.get("KVSTRATA_TLS_CA") or None
            tls_cert = tls_cert or os.environ.get("KVSTRATA_CLIENT_CERT") or None
            tls_key = tls_key or os.environ.get("KVSTRATA_CLIENT_KEY") or None
            if (tls_cert is None) != (tls_key is None):
                raise KvstrataError("tls_cert and tls_key: give both or neither")
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                                 private_key=_read(tls_key),
                                                 certificate_chain=_read(tls_cert))
            if tls_domain:
                opts.append(("grpc.ssl_target_name_override", tls_domain))
            self._channel = grpc.secure_channel(self.target.grpc_target(), creds, options=opts)
        else:
            if tls_ca or tls_cert:
                raise KvstrataError(f"tls_ca / tls_cert given, but target {self.target} is not https://")
            self._channel = grpc.insecure_channel(self.target.grpc_target(), options=opts)
        self.stub = pb_grpc.KvCacheStub(self._channel)
        # BatchPut / BatchGet taking requests already serialized (page requests, `_wire`)
        self._raw = {
            "BatchPut": self._channel.unary_unary("/kvstrata.v1.KvCache/BatchPut", request_serializer=None,
                                                  response_deserializer=pb.BatchPutResponse.FromString,
                                                  _registered_method=True),
            "BatchGet": self._channel.unary_unary("/kvstrata.v1.KvCache/BatchGet", request_serializer=None,
                                                  response_deserializer=pb.BatchGetResponse.FromString,
                                                  _registered_method=True),
        }
        self._lock = threading.Lock()
        #: The most keys one batch request carries: the daemon's `server.max_batch` once a
        #: `register_namespace` answer has given it, else `MAX_BATCH` (its default).
        self.max_batch = MAX_BATCH
        #: Whether the daemon said (at `register_namespace`) that it reads a page get's page
        #: ids as one array (`page_region_id`, `page_ids`); until then one `KvPages` per key.
        self.page_id_arrays = False
        #: Whether the daemon said that it answers a page get compactly on request (each key's
        #: tier, no `GetResult` per key); `batch_get_pages` asks for that with page-id arrays.
        self.compact_answers = False
        #: Whether the daemon said that it reads a page put in the array form (`keys`,
        #: `page_region_id`, `page_ids`): `batch_put_pages` then sends a `PageBatch` so.
        self.page_id_array_puts = False
        #: Whether a page get into a CUDA IPC region (`KvRegion.page_batch` of
        #: `KvRegion.from_cuda_tensor`, sent as a page-id array asking for the compact answer)
        #: lets the daemon answer as soon as its copies into the pages are queued on the GPU
        #: (`BatchGetRequest.answer_when_queued`): the answer's way back overlaps the copies,
        #: and `batch_get_pages` waits on the CUDA event the answer names
        #: (`pages_ready_event`) before it returns, so it still returns once the pages are
        #: written. Memfd regions are always answered after their copies. Default: on, unless
        #: `KVSTRATA_ANSWER_WHEN_QUEUED` is 0, off or false when the client is made.
        self.answer_when_queued = (_answer_when_queued_from_env() if answer_when_queued is None
                                   else bool(answer_when_queued))
        #: Whether one-part page requests with a `KvRegion.page_batch` go on the region's own
        #: connection (`kvstrata.region_calls`) instead of gRPC, once the daemon said (at
        #: `register_namespace`) that it serves them (`daemon_region_calls`): the same
        #: request and answer without grpcio and HTTP/2 around them. Default: on, unless
        #: `KVSTRATA_REGION_CALLS` is 0, off or false when the client is made.
        self.region_calls = (_region_calls_from_env() if region_calls is None else bool(region_calls))
        self.daemon_region_calls = False
        #: Page-get answers that named a CUDA event to wait on (answered before their copies
        #: completed), counted since the client was made.
        self.queued_answers = 0
        #: The CUDA events opened from the daemon's `pages_ready_event` handles, by (device,
        #: handle bytes): the daemon keeps one event per region, so each is opened once.
        self._ready_events: dict[tuple[int, bytes], Any] = {}

    # --- plumbing ---------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({str(self.target)!r})"

    def _call(self, method: str, request: Any, timeout: Optional[float]) -> Any:
        fn: Callable[..., Any] = getattr(self.stub, method)
        try:
            return fn(request, timeout=self.timeout if timeout is None else timeout,
                      metadata=self._metadata)
        except grpc.RpcError as e:
            raise rpc_error(method, e) from None

    def _call_raw(self, method: str, request: bytes, timeout: Optional[float]) -> Any:
        """`method` with a request already serialized (`kvstrata._wire`)."""
        try:
            return self._raw[method](request, timeout=self.timeout if timeout is None else timeout,
                                     metadata=self._metadata)
        except grpc.RpcError as e:
            raise rpc_error(method, e) from None

    def _call_pages(self, method: str, request: bytes, pages: Any, timeout: Optional[float]) -> Any:
        """A serialized page request (`method` BatchPut or BatchGet): on the region's own
        connection when `pages` is a `PageBatch` of a region, the daemon serves region calls
        and no other thread's call holds that connection; otherwise over gRPC."""
        calls = getattr(pages, "calls", None)
        if calls is not None and self.region_calls and self.daemon_region_calls:
            call = CALL_PUT if method == "BatchPut" else CALL_GET
            body = calls.try_call(call, request, self.timeout if timeout is None else timeout)
            if body is not None:
                parse = pb.BatchPutResponse if method == "BatchPut" else pb.BatchGetResponse
                return parse.FromString(body)
        return self._call_raw(method, request, timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel is connected; raises `Unavailable` after `timeout`."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            from .errors import Unavailable
            raise Unavailable("connect", grpc.StatusCode.UNAVAILABLE,
                              f"target: no daemon answered at {self.target} within {timeout} s") from None

    # --- namespaces ---------------------------------------------------------------

    def register_namespace(self, spec: NamespaceSpec, *, write_through: Optional[bool] = None,
                           remote_write_through: Optional[bool] = None,
                           sync_write_through: Optional[bool] = None,
                           timeout: Optional[float] = None) -> Namespace:
        """Registers a geometry (idempotent). Policy fields given replace the policy (those
        not given are off). `sync_write_through`: every put is on disk when it answers; a put
        whose disk write fails answers `PUT_STATUS_DISK_FAILED` and is not stored."""
        req = pb.RegisterNamespaceRequest(spec=spec.to_proto())
        policy = (write_through, remote_write_through, sync_write_through)
        if any(p is not None for p in policy):
            req.policy.CopyFrom(pb.NamespacePolicy(write_through=bool(write_through),
                                                   remote_write_through=bool(remote_write_through),
                                                   sync_write_through=bool(sync_write_through)))
        resp = self._call("RegisterNamespace", req, timeout)
        if resp.max_batch > 0:
            self.max_batch = int(resp.max_batch)
        self.page_id_arrays = bool(resp.page_id_arrays)
        self.compact_answers = bool(resp.compact_answers)
        self.daemon_region_calls = bool(resp.region_calls)
        self.page_id_array_puts = bool(resp.page_id_array_puts)
        return Namespace(id=bytes(resp.namespace_id), block_bytes=resp.block_bytes, spec=spec,
                         created=resp.created)

    def list_namespaces(self, *, timeout: Optional[float] = None) -> list[pb.NamespaceInfo]:
        return list(self._call("ListNamespaces", pb.ListNamespacesRequest(), timeout).namespaces)

    # --- data --------------------------------------------------------------------

    def lookup(self, ns: NamespaceRef, keys: Sequence[bytes], *,
               timeout: Optional[float] = None) -> LookupResult:
        """Longest cached prefix of a chain of keys (no hit counters): one call per
        `max_batch` keys, the next only while every key before it was found."""
        ns_id = _ns_id(ns)
        matched, tiers = 0, []
        step = self.max_batch
        for start in range(0, max(len(keys), 1), step):
            chunk = list(keys[start:start + step])
            resp = self._call("Lookup", pb.LookupRequest(namespace_id=ns_id, keys=chunk), timeout)
            matched += resp.matched
            tiers.extend(resp.tiers)
            if resp.matched < len(chunk):
                break
        return LookupResult(matched=matched, tiers=tiers)

    def batch_put(self, ns: NamespaceRef, keys: Sequence[bytes], payloads: Sequence[Any], *,
                  parents: Union[None, str, Sequence[Optional[bytes]]] = None,
                  first_parent: Optional[bytes] = None,
                  timeout: Optional[float] = None) -> pb.BatchPutResponse:
        """Stores blocks with inline payloads (bytes, bytearray, memoryview or numpy
        arrays). `parents="chain"` makes each key the parent of the next (the first one's
        parent is `first_parent`). Returns the response: `results` (one `PutStatus` per
        key) and `stored`."""
        if len(payloads) != len(keys):
            raise ValueError(f"payloads: {len(payloads)} payloads for {len(keys)} keys")
        ps = _parents(keys, parents, first_parent)
        items = [pb.PutItem(key=bytes(k), parent=p, payload=_as_bytes(v))
                 for k, p, v in zip(keys, ps, payloads)]
        return self._call("BatchPut", pb.BatchPutRequest(namespace_id=_ns_id(ns), items=items), timeout)

    def batch_put_ranges(self, ns: NamespaceRef, keys: Sequence[bytes],
                         ranges: Sequence[pb.PoolRange], *,
                         parents: Union[None, str, Sequence[Optional[bytes]]] = None,
                         first_parent: Optional[bytes] = None,
                         timeout: Optional[float] = None) -> pb.BatchPutResponse:
        """Stores blocks whose bytes lie in shared-memory pool ranges (no payload bytes
        in the message)."""
        if len(ranges) != len(keys):
            raise ValueError(f"ranges: {len(ranges)} ranges for {len(keys)} keys")
        ps = _parents(keys, parents, first_parent)
        items = [pb.PutItem(key=bytes(k), parent=p, range=r) for k, p, r in zip(keys, ps, ranges)]
        return self._call("BatchPut", pb.BatchPutRequest(namespace_id=_ns_id(ns), items=items), timeout)

    def batch_put_pages(self, ns: NamespaceRef, keys: Sequence[bytes], pages: Sequence[pb.KvPages], *,
                        parents: Union[None, str, Sequence[Optional[bytes]]] = None,
                        first_parent: Optional[bytes] = None,
                        timeout: Optional[float] = None, in_flight: int = 1) -> pb.BatchPutResponse:
        """Stores blocks gathered by the daemon from the pages of a registered KV region.
        `pages`: one `KvPages` per key (`KvRegion.pages`), or a `KvRegion.page_batch` of
        them (cheaper for many blocks).

        `in_flight` > 1 (with at least 2 × `WIRE_MIN_BLOCKS` keys): the keys are sent as
        `min(in_flight, len(keys) // WIRE_MIN_BLOCKS)` requests of contiguous, near-equal
        parts, all in flight at once, so one request's fixed cost overlaps another's copies;
        and never more than `max_batch` keys in one request (more parts when needed).
        The answer is that of one request: `results` in key order, `stored` summed; chained
        parents are those one request records. Not atomic across parts: a part the daemon
        refuses (e.g. a bad page id) stores nothing, the other parts are stored as usual.
        Every part has finished when this returns or raises (the first part's error, its
        field naming the index in the whole request)."""
        if len(pages) != len(keys):
            raise ValueError(f"pages: {len(pages)} page lists for {len(keys)} keys")
        bounds = _parts(len(keys), in_flight, self.max_batch)
        if len(bounds) > 1:
            return self._put_pages_parts(ns, keys, pages, parents, first_parent, timeout, bounds)
        if len(keys) >= WIRE_MIN_BLOCKS:
            if parents == "chain":
                wire_parents: Union[str, list[bytes]] = "chain"
            else:
                wire_parents = _parents(keys, parents, first_parent)
            first = bytes(first_parent or b"") if parents == "chain" else b""  # else in wire_parents
            req = self._put_pages_request(_ns_id(ns), keys, wire_parents, pages, first)
            try:
                return self._call_pages("BatchPut", req, pages, timeout)
            except RpcError as e:
                raise _shift_field(e, 0, self._ids_per_key(pages, put=True)) from None
        ps = _parents(keys, parents, first_parent)
        items = [pb.PutItem(key=bytes(k), parent=p, pages=g) for k, p, g in zip(keys, ps, pages)]
        put = pb.BatchPutRequest(namespace_id=_ns_id(ns), items=items)
        if isinstance(pages, PageBatch):
            return self._call_pages("BatchPut", put.SerializeToString(), pages, timeout)
        return self._call("BatchPut", put, timeout)

    def _put_pages_parts(self, ns: NamespaceRef, keys: Sequence[bytes], pages: Sequence[pb.KvPages],
                         parents: Union[None, str, Sequence[Optional[bytes]]], first_parent: Optional[bytes],
                         timeout: Optional[float], bounds: list[tuple[int, int]]) -> pb.BatchPutResponse:
        """`batch_put_pages` as one request per part of `bounds`, all in flight at once."""
        ns_id = _ns_id(ns)
        chain = parents == "chain"
        all_parents: list[bytes] = [] if chain else _parents(keys, parents, first_parent)

        def request(a: int, b: int) -> bytes:
            if chain:
                # part k's first parent: the last key of part k - 1 (the chain one request records)
                first = bytes(first_parent or b"") if a == 0 else bytes(keys[a - 1])
                return self._put_pages_request(ns_id, keys[a:b], "chain", pages[a:b], first)
            return self._put_pages_request(ns_id, keys[a:b], all_parents[a:b], pages[a:b], b"")

        answers = self._call_parts("BatchPut", bounds, request, timeout, self._ids_per_key(pages, put=True))
        out = pb.BatchPutResponse()
        for r in answers:
            out.results.extend(r.results)
            out.stored += r.stored
        return out

    def _put_pages_request(self, ns_id: bytes, keys: Sequence[bytes], parents: Union[str, Sequence[bytes]],
                           pages: Sequence[pb.KvPages], first_parent: bytes) -> bytes:
        """A serialized page put: the array form for a `PageBatch` to a daemon that reads it
        (`page_id_array_puts`: no message per block to build, encode and parse), else one
        `PutItem` per block."""
        if self._ids_per_key(pages, put=True):
            return _wire.batch_put_page_ids_request(ns_id, keys, parents, pages.region_id, pages.page_ids,
                                                    first_parent=first_parent)
        return _wire.batch_put_pages_request(ns_id, keys, parents, _pages_rows(pages), first_parent=first_parent)

    def _call_parts(self, method: str, bounds: list[tuple[int, int]], request: Callable[[int, int], bytes],
                    timeout: Optional[float], ids_per_key: int = 0,
                    settle: Optional[Callable[[list[Any]], None]] = None) -> list[Any]:
        """One raw `method` request per part (`request(start, stop)` serializes it), each
        sent as soon as it is built (the next one is built while the daemon copies), all in
        flight together through grpc's futures. Waits for every call to finish and passes the
        answers that came back to `settle` (a page get answered before its copies completed:
        waits for them), then raises the first failed part's error (its field's leading index
        shifted to the whole request's) or returns the answers in part order."""
        deadline = self.timeout if timeout is None else timeout
        futures: list[Any] = []
        try:
            for a, b in bounds:
                futures.append(self._raw[method].future(request(a, b), timeout=deadline,
                                                        metadata=self._metadata))
        finally:
            # never return (or raise) while a call may still read or write the caller's pages
            errors = [f.exception() for f in futures]
            if settle is not None:
                settle([f.result() for f, err in zip(futures, errors) if err is None])
        for (a, _), err in zip(bounds, errors):
            if err is not None:
                raise _shift_field(rpc_error(method, err), a, ids_per_key) from None
        return [f.result() for f in futures]

    def batch_get_results(self, ns: NamespaceRef, keys: Sequence[bytes], *,
                          ranges: Sequence[pb.PoolRange] = (), pages: Sequence[pb.KvPages] = (),
                          timeout: Optional[float] = None) -> list[pb.GetResult]:
        """`BatchGet` as is: one `GetResult` per key. `pages`: one `KvPages` per key, or a
        `KvRegion.page_batch`."""
        return list(self._batch_get(ns, keys, ranges, pages, timeout))

    def _batch_get(self, ns: NamespaceRef, keys: Sequence[bytes], ranges: Sequence[pb.PoolRange],
                   pages: Sequence[pb.KvPages], timeout: Optional[float]) -> Sequence[pb.GetResult]:
        if pages and not ranges and len(pages) == len(keys) >= WIRE_MIN_BLOCKS:
            ns_id = _ns_id(ns)
            bounds = _parts(len(keys), 1, self.max_batch)
            if len(bounds) > 1:  # more keys than one request takes

                def request(a: int, b: int) -> bytes:
                    return self._get_pages_request(ns_id, keys[a:b], pages[a:b])

                return [r for answer in self._call_parts("BatchGet", bounds, request, timeout,
                                                         self._ids_per_key(pages))
                        for r in answer.results]
            raw = self._get_pages_request(ns_id, keys, pages)
            try:
                return self._call_raw("BatchGet", raw, timeout).results
            except RpcError as e:
                raise _shift_field(e, 0, self._ids_per_key(pages)) from None
        req = pb.BatchGetRequest(namespace_id=_ns_id(ns), keys=list(keys), ranges=list(ranges),
                                 pages=list(pages))
        return self._call("BatchGet", req, timeout).results

    def _get_pages_request(self, ns_id: bytes, keys: Sequence[bytes], pages: Sequence[pb.KvPages],
                           compact: bool = False, when_queued: bool = False) -> bytes:
        """A page get's request bytes: the page-id array form for a `PageBatch` when the daemon
        said at `register_namespace` that it reads it (`compact`: asking for the compact
        answer; `when_queued`: letting the daemon answer once its copies are queued), else one
        `KvPages` per key."""
        if self._ids_per_key(pages):
            assert isinstance(pages, PageBatch)
            return _wire.batch_get_page_ids_request(ns_id, keys, pages.region_id, pages.page_ids,
                                                    compact, when_queued)
        return _wire.batch_get_pages_request(ns_id, keys, _pages_rows(pages))

    def _ids_per_key(self, pages: Sequence[pb.KvPages], put: bool = False) -> int:
        """pages_per_block when a page get (`put`: a page put) of `pages` goes as one
        page-id array, else 0."""
        arrays = self.page_id_array_puts if put else self.page_id_arrays
        if arrays and isinstance(pages, PageBatch) and pages.region_id:
            return int(pages.page_ids.shape[1])
        return 0

    def batch_get(self, ns: NamespaceRef, keys: Sequence[bytes], *,
                  timeout: Optional[float] = None) -> list[Optional[bytes]]:
        """Reads blocks inline: each key's payload, or None for a miss."""
        return [bytes(r.payload) if r.found else None
                for r in self.batch_get_results(ns, keys, timeout=timeout)]

    def batch_get_into(self, ns: NamespaceRef, keys: Sequence[bytes], ranges: Sequence[pb.PoolRange], *,
                       timeout: Optional[float] = None) -> list[bool]:
        """Reads blocks into pool ranges (one per key); True where a block was written."""
        if len(ranges) != len(keys):
            raise ValueError(f"ranges: {len(ranges)} ranges for {len(keys)} keys")
        return [r.found for r in self.batch_get_results(ns, keys, ranges=ranges, timeout=timeout)]

    def batch_get_pages(self, ns: NamespaceRef, keys: Sequence[bytes], pages: Sequence[pb.KvPages], *,
                        timeout: Optional[float] = None, in_flight: int = 1) -> list[bool]:
        """Scatters found blocks into KV-region pages (one page list per key).

        `in_flight` > 1 (with at least 2 × `WIRE_MIN_BLOCKS` keys): sent as
        `min(in_flight, len(keys) // WIRE_MIN_BLOCKS)` requests of contiguous, near-equal
        parts, all in flight at once (see `batch_put_pages`); the answer is in key order.
        Not atomic across parts: when one part fails, the others' found blocks have been
        written into their pages. Every part has finished when this returns or raises.

        A `KvRegion.page_batch` of a CUDA IPC region, sent as a page-id array for the compact
        answer, lets the daemon answer once its copies are queued on the GPU (when
        `answer_when_queued` is on); this then waits on the CUDA event the answers name, so
        the pages hold the blocks' bytes when it returns, as with any other get. An event it
        cannot open or wait on raises `KvstrataError` (the pages' state is unknown: treat
        every key as a miss)."""
        if len(pages) != len(keys):
            raise ValueError(f"pages: {len(pages)} page lists for {len(keys)} keys")
        bounds = _parts(len(keys), in_flight, self.max_batch)
        ids_per_key = self._ids_per_key(pages)
        # Page-id arrays to a daemon that answers compactly: each key's tier, nothing per key.
        compact = self.compact_answers and bool(ids_per_key) and bool(keys)
        # ... into GPU memory: answered once the copies are queued, their event waited on here
        device = self._when_queued_device(pages) if compact else None
        if len(bounds) > 1 or compact:
            ns_id = _ns_id(ns)
            when_queued = device is not None

            def request(a: int, b: int) -> bytes:
                return self._get_pages_request(ns_id, keys[a:b], pages[a:b], compact, when_queued)

            settle = None if device is None else functools.partial(self._wait_pages_ready, device)
            if len(bounds) > 1:
                answers = self._call_parts("BatchGet", bounds, request, timeout, ids_per_key, settle)
            else:
                try:
                    answers = [self._call_pages("BatchGet", request(0, len(keys)), pages, timeout)]
                except RpcError as e:
                    raise _shift_field(e, 0, ids_per_key) from None
                if settle is not None:
                    settle(answers)
            if compact:
                return [f for (a, b), answer in zip(bounds, answers) for f in _found_compact(answer, b - a)]
            return [r.found for answer in answers for r in answer.results]
        return [r.found for r in self._batch_get(ns, keys, (), pages, timeout)]

    def _when_queued_device(self, pages: Sequence[pb.KvPages]) -> Optional[int]:
        """The CUDA device of `pages` when a get into them may be answered before its copies
        complete (`answer_when_queued` on, a `PageBatch` of a CUDA IPC region), else None."""
        if self.answer_when_queued and isinstance(pages, PageBatch):
            return pages.device
        return None

    def _wait_pages_ready(self, device: int, answers: Sequence[Any]) -> None:
        """Returns once the pages that page-get `answers` (into a region on CUDA `device`) say
        were written are: waits on each distinct CUDA event they name in `pages_ready_event`
        (none: written before the answer). The daemon records its region's one event after
        each request's copies, on one stream per region, so a wait after every answer came
        covers all of them. Raises `KvstrataError` naming `pages_ready_event` for a handle that
        is not 64 bytes or an event that cannot be opened or waited on, after waiting on the
        others."""
        handles: dict[bytes, None] = {}
        carried = 0
        for answer in answers:
            handle = answer.pages_ready_event
            if handle:
                carried += 1
                handles[handle] = None
        if not carried:
            return
        with self._lock:
            self.queued_answers += carried
        error: Optional[KvstrataError] = None
        for handle in handles:
            try:
                self._synchronize_event(device, handle)
            except KvstrataError as e:
                error = error or e
        if error is not None:
            raise error

    def _synchronize_event(self, device: int, handle: bytes) -> None:
        """Waits on the CUDA event of one `pages_ready_event` handle (opened once, cached)."""
        if len(handle) != CUDA_IPC_EVENT_BYTES:
            raise KvstrataError(f"pages_ready_event: {len(handle)} bytes, not the {CUDA_IPC_EVENT_BYTES} of a "
                                "cudaIpcEventHandle_t; the daemon's copies into the pages cannot be waited on")
        event = self._ready_event(device, handle)
        # Polled, not synchronized: a wait on an event whose process died could last forever.
        deadline = time.monotonic() + READY_WAIT_SECONDS
        try:
            while not event.query():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete after {READY_WAIT_SECONDS:g} s")
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError (a CUDA error) and others
            with self._lock:
                self._ready_events.pop((device, handle), None)
            raise KvstrataError(f"pages_ready_event: waiting on the daemon's CUDA event on cuda:{device} failed "
                                f"({type(e).__name__}: {e}); the pages' state is unknown") from e

    def _ready_event(self, device: int, handle: bytes) -> Any:
        """The CUDA event of a `pages_ready_event` handle on `device`: opened on first use,
        then kept (the oldest of `READY_EVENTS_MAX` closed)."""
        key = (device, handle)
        with self._lock:
            event = self._ready_events.get(key)
            if event is None:
                event = _open_cuda_event(device, handle)
                if len(self._ready_events) >= READY_EVENTS_MAX:
                    del self._ready_events[next(iter(self._ready_events))]
                self._ready_events[key] = event
        return event

    def put_stream(self, requests: Iterable[pb.BatchPutRequest], *,
                   timeout: Optional[float] = None) -> list[pb.BatchPutResponse]:
        """`PutStream`: one response per request message, in order."""
        try:
            return list(self.stub.PutStream(iter(requests), timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise rpc_error("PutStream", e) from None

    def get_stream(self, ns: NamespaceRef, keys: Sequence[bytes], *,
                   timeout: Optional[float] = None) -> Iterator[pb.GetResult]:
        """`GetStream`: one `GetResult` per key, in order, read a few ahead."""
        call = self.stub.GetStream(pb.BatchGetRequest(namespace_id=_ns_id(ns), keys=list(keys)),
                                   timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise rpc_error("GetStream", e) from None

    def delete(self, ns: NamespaceRef, keys: Sequence[bytes], *, timeout: Optional[float] = None) -> int:
        """Removes blocks from every tier (one call per `max_batch` keys); the count removed."""
        ns_id = _ns_id(ns)
        step = self.max_batch
        return sum(self._call("Delete", pb.DeleteRequest(namespace_id=ns_id, keys=list(keys[i:i + step])),
                              timeout).deleted
                   for i in range(0, max(len(keys), 1), step))

    def evict(self, ns: NamespaceRef, keys: Sequence[bytes] = (), *, all: bool = False,
              timeout: Optional[float] = None) -> pb.EvictResponse:
        """Demotes blocks one tier down (one call per `max_batch` keys; with `all` and no
        keys, the whole namespace); the counts summed."""
        ns_id = _ns_id(ns)
        step = self.max_batch
        out = pb.EvictResponse()
        for i in range(0, max(len(keys), 1), step):
            r = self._call("Evict", pb.EvictRequest(namespace_id=ns_id, keys=list(keys[i:i + step]), all=all), timeout)
            out.evicted += r.evicted
            out.skipped_pinned += r.skipped_pinned
        return out

    def pin(self, ns: NamespaceRef, keys: Sequence[bytes], lease_ms: int = 30_000, *,
            timeout: Optional[float] = None) -> Lease:
        """Pins blocks (all or none) under a lease; use as a context manager."""
        resp = self._call("Pin", pb.PinRequest(namespace_id=_ns_id(ns), keys=list(keys), lease_ms=lease_ms), timeout)
        return Lease(self, resp.lease_id, resp.deadline_unix_ms)

    def unpin(self, lease_id: int, *, timeout: Optional[float] = None) -> None:
        self._call("Unpin", pb.UnpinRequest(lease_id=lease_id), timeout)

    # --- inspection --------------------------------------------------------------

    def stats(self, *, timeout: Optional[float] = None) -> pb.StatsResponse:
        return self._call("Stats", pb.StatsRequest(), timeout)

    def list_blocks(self, ns: Optional[NamespaceRef] = None, *, tier: int = 0, page_size: int = 0,
                    timeout: Optional[float] = None) -> Iterator[pb.BlockInfo]:
        """Every cached block (pages through `ListBlocks`)."""
        token = b""
        while True:
            resp = self._call("ListBlocks", pb.ListBlocksRequest(
                namespace_id=_ns_id(ns) if ns is not None else b"", tier=cast(Any, tier),
                page_size=page_size, page_token=token), timeout)
            yield from resp.blocks
            token = resp.next_page_token
            if not token:
                return

    def inspect(self, ns: NamespaceRef, key: bytes, *, timeout: Optional[float] = None) -> pb.InspectResponse:
        return self._call("Inspect", pb.InspectRequest(namespace_id=_ns_id(ns), key=bytes(key)), timeout)

    def verify(self, drop_corrupt: bool = False, *, timeout: Optional[float] = None) -> pb.VerifyResponse:
        return self._call("Verify", pb.VerifyRequest(drop_corrupt=drop_corrupt), timeout)

    def watch(self, ns: Optional[NamespaceRef] = None) -> Watch:
        """Events from now on (no history), until `cancel()`."""
        call = self.stub.Watch(pb.WatchRequest(namespace_id=_ns_id(ns) if ns is not None else b""),
                               metadata=self._metadata)
        return Watch(call)


def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if hasattr(v, "tobytes"):
        return v.tobytes()
    return bytes(v)


def _parts(n: int, in_flight: int, max_batch: int = MAX_BATCH) -> list[tuple[int, int]]:
    """The (start, stop) of each part of a page request of n blocks sent as `in_flight`
    requests: `min(in_flight, n // WIRE_MIN_BLOCKS)` contiguous parts, and at least enough
    that none has more than `max_batch` blocks; sizes differing by at most one (one part,
    (0, n), when that is under 2). Checks `in_flight`."""
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
        raise ValueError(f"in_flight: an int >= 1 (requests in flight at once), not {in_flight!r}")
    count = max(min(in_flight, n // WIRE_MIN_BLOCKS), -(-n // max(1, max_batch)))
    if count < 2:
        return [(0, n)]
    size, extra = divmod(n, count)
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _region_calls_from_env() -> bool:
    """`KVSTRATA_REGION_CALLS`: on unless set to one of `ANSWER_WHEN_QUEUED_OFF`."""
    return os.environ.get("KVSTRATA_REGION_CALLS", "").strip().lower() not in ANSWER_WHEN_QUEUED_OFF


def _answer_when_queued_from_env() -> bool:
    """`KVSTRATA_ANSWER_WHEN_QUEUED`: on unless set to one of `ANSWER_WHEN_QUEUED_OFF`."""
    return os.environ.get("KVSTRATA_ANSWER_WHEN_QUEUED", "").strip().lower() not in ANSWER_WHEN_QUEUED_OFF


def _open_cuda_event(device: int, handle: bytes) -> Any:
    """The CUDA event of a 64-byte `cudaIpcEventHandle_t` from the daemon, opened on CUDA
    `device` through torch (`cudaIpcOpenEventHandle`); `KvstrataError` if it cannot be."""
    try:
        import torch  # imported wherever a CUDA IPC region exists
        return torch.cuda.Event.from_ipc_handle(torch.device("cuda", device), handle)
    except Exception as e:  # noqa: BLE001 - no torch, no CUDA, a handle the driver refuses
        raise KvstrataError(f"pages_ready_event: opening the daemon's CUDA IPC event on cuda:{device} failed "
                            f"({type(e).__name__}: {e}); the pages' state is unknown") from e


def _found_compact(answer: Any, n: int) -> list[bool]:
    """Per key of a compact answer to a page get of n keys: whether its block was found and
    written (a key in `failed` has no tier)."""
    if len(answer.tiers) != n or len(answer.results):
        raise KvstrataError(f"BatchGet answered {len(answer.tiers)} tiers and {len(answer.results)} "
                            f"results for {n} keys (asked for a compact answer)")
    return [t != 0 for t in answer.tiers]


#: The leading repeated field of a request (`items[3].pages…`, `pages[3]…`, `keys[3]`).
_LEADING_INDEX = re.compile(r"^(items|keys|pages|page_ids|parents)\[(\d+)\]")


def _shift_field(err: RpcError, offset: int, ids_per_key: int = 0) -> RpcError:
    """A part's error with the leading index of its field shifted by the part's `offset`,
    so it names the block in the whole request (same class, code and method). A page get
    sent as one page-id array (`ids_per_key` ids per key) has its `page_ids[k]` named as the
    per-key form would be, `pages[i].page_ids[j]`; a page put in the array form has its
    `page_ids[k]`, `keys[i]`, `parents[i]` and `page_region_id` named as its items would be
    (`items[i].pages.page_ids[j]`, `items[i].key`, `items[i].parent`, `items[0].pages.region_id`)."""
    put = err.method == "BatchPut"
    if put and ids_per_key > 0 and err.message.startswith("page_region_id:"):
        # a page put sent in the array form: named as the per-block form would be
        head, rest = f"items[{offset}].pages.region_id", err.message[len("page_region_id"):]
        return type(err)(err.method, err.code, head + rest)
    m = _LEADING_INDEX.match(err.message)
    if m is None:
        return err
    name, index = m.group(1), int(m.group(2))
    if name == "page_ids":
        if ids_per_key <= 0:
            return err
        block, page = offset + index // ids_per_key, index % ids_per_key
        head = f"items[{block}].pages.page_ids[{page}]" if put else f"pages[{block}].page_ids[{page}]"
    elif put and ids_per_key > 0 and name in ("keys", "parents"):
        head = f"items[{index + offset}].{'key' if name == 'keys' else 'parent'}"
    elif offset == 0:
        return err
    else:
        head = f"{name}[{index + offset}]"
    return type(err)(err.method, err.code, head + err.message[m.end():])


def _pages_rows(pages: Sequence[pb.KvPages]) -> _wire.PagesRows:
    """The blocks' `KvPages` for `kvstrata._wire`: from a `PageBatch`'s array, else each
    message serialized."""
    if isinstance(pages, PageBatch):
        return pages.wire_rows()
    return _wire.PagesRows.from_messages([g.SerializeToString() for g in pages])


def pool_range(pool_id: int, offset: int, length: int) -> pb.PoolRange:
    """A `PoolRange` message."""
    return pb.PoolRange(pool_id=pool_id, offset=offset, length=length)


def kv_pages(region_id: int, page_ids: Sequence[int]) -> pb.KvPages:
    """A `KvPages` message."""
    return pb.KvPages(region_id=region_id, page_ids=list(page_ids))
