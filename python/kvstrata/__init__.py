"""kvstrata: Python client of the kvstrata KV-cache daemon (docs/python.md).

- `Client`: every RPC of `kvstrata.v1.KvCache`; errors are `RpcError`s with the gRPC
  code and the field the daemon named.
- `block_keys` and friends: the canonical chained block hash of docs/hashing.md.
- `SharedPool`: a memfd registered with the daemon; requests name byte ranges of it.
- `KvRegion`: an engine's paged KV memory registered with the daemon (CUDA IPC or memfd);
  `kvstrata.layouts`: engines' page layouts, gathered / scattered with one copy.
- `kvstrata.sglang.KvstrataStorage`: SGLang HiCache's `dynamic` storage backend.
"""

from .client import (
    Client,
    Dtype,
    EventKind,
    Layout,
    Lease,
    LookupResult,
    Namespace,
    NamespaceSpec,
    PutStatus,
    Tier,
    Watch,
    kv_pages,
    pool_range,
)
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KvstrataError,
    NotFound,
    PermissionDenied,
    PoolError,
    RegionError,
    ResourceExhausted,
    RpcError,
    TargetError,
    Unauthenticated,
    Unavailable,
)
from .hashing import block_keys, chain_keys, next_block_key
from .pool import PoolSlice, SharedPool
from .region import KvRegion, PagedGeometry
from .target import default_target, default_uds_path, parse_target
from .v1 import kvstrata_pb2 as pb

__version__ = "0.1.0"

__all__ = [
    "Client", "Dtype", "EventKind", "Layout", "Lease", "LookupResult", "Namespace",
    "NamespaceSpec", "PutStatus", "Tier", "Watch", "kv_pages", "pool_range",
    "DeadlineExceeded", "FailedPrecondition", "InvalidArgument", "KvstrataError", "NotFound",
    "PermissionDenied", "PoolError", "RegionError", "ResourceExhausted", "RpcError",
    "TargetError", "Unauthenticated", "Unavailable", "block_keys", "chain_keys",
    "next_block_key", "PoolSlice", "SharedPool", "KvRegion", "PagedGeometry",
    "default_target", "default_uds_path", "parse_target", "pb",
]
