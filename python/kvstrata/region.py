"""`KvRegion`: an engine's paged KV memory registered on the daemon's region socket, so
that puts and gets name page ids and the daemon gathers / scatters the pages itself
(docs/protocol.md, "CUDA IPC regions").

The daemon understands two page layouts (`PagedGeometry.layout`):

- "per_layer": one tensor per layer, `[num_pages, 2, page_tokens, kv_heads, head_dim]`,
  the layers `layer_stride` bytes apart (0: packed);
- "cross_layer": `[num_pages, layers, 2, page_tokens, kv_heads, head_dim]`.

CUDA tensors are shared through CUDA IPC (`KvRegion.from_cuda_tensor`): the daemon maps
the engine's device memory and moves pages with its own kernels, no copy in Python. CPU
memory must live in a memfd the daemon can map: `KvRegion.create_memfd` allocates one and
hands out numpy / torch views of it.

Engines whose layout is none of these (vLLM's `(2, num_blocks, block_size, heads, dim)`,
SGLang's host-pool layouts) use `kvstrata.layouts` instead: one gather or scatter copy
per batch between their memory and a `SharedPool`.

Registration preamble (128 bytes, little-endian, then the name): magic `KVSREGN\\0`,
version 2, kind (1 CUDA IPC, 2 memfd), device, region bytes, the 64-byte IPC handle,
layout, layers, page_tokens, kv_heads, head_dim, dtype_bytes, num_pages, name length,
layer_stride. Answer: status, 4 zero bytes, message length, message, and on success the
u64 region id. Region ids are unique to one run of the daemon (a random base per run): an
id kept across a daemon restart is refused per block, never another engine's pages.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import RegionError
from .pool import _recv_exact, check_name, connection_open
from .target import unix_socket_path
from .v1 import kvstrata_pb2 as pb

REGION_MAGIC = b"KVSREGN\0"
REGION_VERSION = 2
HEADER_BYTES = 128
KIND_CUDA_IPC = 1
KIND_MEMFD = 2
REGISTER_TIMEOUT = 10.0
LAYOUT_CODES = {"per_layer": 1, "cross_layer": 2}
#: The daemon's refusal codes, by status.
REFUSAL_REASONS = {1: "preamble", 2: "geometry", 3: "limit", 4: "map", 5: "no_gpu", 6: "uid"}


@dataclass(frozen=True)
class PagedGeometry:
    """Geometry of a KV region in one of the daemon's layouts (see the module docs)."""

    layout: str
    layers: int
    page_tokens: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    num_pages: int
    layer_stride: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_CODES:
            raise RegionError(f"layout: {self.layout!r} is not one of {sorted(LAYOUT_CODES)}")
        for name in ("layers", "page_tokens", "kv_heads", "head_dim", "dtype_bytes", "num_pages"):
            if getattr(self, name) < 1:
                raise RegionError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.layout == "cross_layer" and self.layer_stride:
            raise RegionError("layer_stride: must be 0 for the cross_layer layout")

    @property
    def chunk_bytes(self) -> int:
        """The K (or V) rows of one page of one layer."""
        return self.page_tokens * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def page_stride(self) -> int:
        return 2 * self.chunk_bytes * (1 if self.layout == "per_layer" else self.layers)

    @property
    def effective_layer_stride(self) -> int:
        if self.layout == "cross_layer":
            return 2 * self.chunk_bytes
        return self.layer_stride or self.num_pages * 2 * self.chunk_bytes

    @property
    def end_bytes(self) -> int:
        """Bytes the region must span (the end of the last chunk)."""
        return ((self.layers - 1) * self.effective_layer_stride
                + (self.num_pages - 1) * self.page_stride + 2 * self.chunk_bytes)

    def shape(self) -> tuple[int, ...]:
        """Element shape of the whole region for a packed layout."""
        if self.layout == "cross_layer":
            return (self.num_pages, self.layers, 2, self.page_tokens, self.kv_heads, self.head_dim)
        return (self.layers, self.num_pages, 2, self.page_tokens, self.kv_heads, self.head_dim)


def encode_preamble(kind: int, device: int, region_bytes: int, handle: bytes,
                    geometry: PagedGeometry, name: str) -> bytes:
    """The registration preamble (exposed so that tests can corrupt it)."""
    raw = name.encode("utf-8")
    if len(handle) != 64:
        raise RegionError(f"handle: a CUDA IPC handle is 64 bytes, got {len(handle)}")
    head = (REGION_MAGIC + struct.pack("<HHIQ", REGION_VERSION, kind, device, region_bytes) + handle
            + struct.pack("<IIIIIIII", LAYOUT_CODES[geometry.layout], geometry.layers,
                          geometry.page_tokens, geometry.kv_heads, geometry.head_dim,
                          geometry.dtype_bytes, geometry.num_pages, len(raw))
            + struct.pack("<Q", geometry.layer_stride))
    assert len(head) == HEADER_BYTES
    return head + raw


def register_raw(socket_target: str, preamble: bytes, fd: Optional[int], name: str,
                 timeout: float = REGISTER_TIMEOUT) -> tuple[int, socket.socket]:
    """Sends a preamble (with `fd` attached, if any) and reads the answer; returns
    (region id, the open registration connection) or raises `RegionError`."""
    path = unix_socket_path(socket_target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        if fd is None:
            sock.sendall(preamble)
        else:
            socket.send_fds(sock, [preamble], [fd])
        head = _recv_exact(sock, 12)
        if len(head) < 12:
            sock.close()
            raise RegionError(f"the region socket {path} closed the registration of {name!r} without an answer",
                              status=6, reason="uid")
        status, _, n = struct.unpack("<III", head)
        message = _recv_exact(sock, min(n, 4096)).decode("utf-8", "replace")
        if status != 0:
            sock.close()
            raise RegionError(message, status=status, reason=REFUSAL_REASONS.get(status, "unknown"))
        tail = _recv_exact(sock, 8)
    except OSError as e:
        sock.close()
        raise RegionError(f"registering KV region {name!r} on {path}: {e}") from e
    region_id = struct.unpack("<Q", tail)[0] if len(tail) == 8 else 0
    if region_id == 0:
        sock.close()
        raise RegionError(f"region_id: the region socket {path} answered no region id for {name!r}")
    return region_id, sock


def _cuda_ipc_handle(shared: bytes) -> bytes:
    """The 64-byte `cudaIpcMemHandle_t` in torch's shared handle: the handle itself, or
    (torch 2.x's caching allocator) a 2-byte header, the second byte b"c" for memory from
    cudaMalloc, then the handle. Anything else (expandable segments) cannot be shared
    with cuIpcOpenMemHandle."""
    if len(shared) == 64:
        return shared
    if len(shared) == 66 and shared[1:2] == b"c":
        return shared[2:]
    raise RegionError(f"tensor: torch shares this memory as a {len(shared)}-byte handle of kind {shared[1:2]!r}, "
                      "not a cudaMalloc allocation (turn off PYTORCH_CUDA_ALLOC_CONF=expandable_segments)")


class KvRegion:
    """A registered KV region (see the module docs). Closing it (or the process's death)
    unregisters it; keep the memory alive while it is registered."""

    def __init__(self, region_id: int, name: str, geometry: PagedGeometry, region_bytes: int,
                 conn: socket.socket, kind: int, device: Optional[int] = None,
                 fd: int = -1, owner: Any = None) -> None:
        self.id = region_id
        self.name = name
        self.geometry = geometry
        self.bytes = region_bytes
        self.kind = kind
        self.device = device
        self._conn = conn
        self._fd = fd
        self._owner = owner  # the tensor whose memory is shared (CUDA): kept alive
        self._mmap: Optional[mmap.mmap] = None
        if kind == KIND_MEMFD:
            self._mmap = mmap.mmap(fd, region_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create_memfd(cls, socket_target: str, geometry: PagedGeometry, name: str) -> "KvRegion":
        """Allocates a memfd of the geometry's size and registers it (the CPU path)."""
        check_name(name, "region")
        size = geometry.end_bytes
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            preamble = encode_preamble(KIND_MEMFD, 0, size, bytes(64), geometry, name)
            region_id, conn = register_raw(socket_target, preamble, fd, name)
        except BaseException:
            os.close(fd)
            raise
        return cls(region_id, name, geometry, size, conn, KIND_MEMFD, fd=fd)

    @classmethod
    def from_cuda_tensor(cls, socket_target: str, tensor: Any, geometry: PagedGeometry, name: str) -> "KvRegion":
        """Registers a CUDA tensor holding the whole region (its first byte is the
        region's byte 0) through CUDA IPC. The tensor must own the start of its
        `cudaMalloc` allocation: torch's caching allocator gives large tensors their own
        segment, so allocate the KV buffer once, up front."""
        check_name(name, "region")
        device_type = getattr(getattr(tensor, "device", None), "type", None)
        if device_type != "cuda":
            raise RegionError(f"tensor: on device {device_type!r}; KvRegion.from_cuda_tensor needs a CUDA tensor "
                              "(CPU memory: KvRegion.create_memfd, or kvstrata.layouts with a SharedPool)")
        if not tensor.is_contiguous():
            raise RegionError("tensor: must be contiguous")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < geometry.end_bytes:
            raise RegionError(f"bytes: the tensor holds {nbytes} bytes, but the geometry's pages end at byte {geometry.end_bytes}")
        storage = tensor.untyped_storage()
        shared = storage._share_cuda_()
        device, handle, storage_offset = shared[0], shared[1], shared[3]
        offset = storage_offset + tensor.storage_offset() * tensor.element_size()
        if offset != 0:
            raise RegionError(f"tensor: starts {offset} bytes into its CUDA allocation; CUDA IPC shares whole "
                              "allocations, so the region must start the allocation (allocate it on its own)")
        handle = _cuda_ipc_handle(bytes(handle))
        preamble = encode_preamble(KIND_CUDA_IPC, int(device), nbytes, handle, geometry, name)
        region_id, conn = register_raw(socket_target, preamble, None, name)
        return cls(region_id, name, geometry, nbytes, conn, KIND_CUDA_IPC, device=int(device), owner=tensor)

    def is_registered(self) -> bool:
        """False once the registration connection is closed (by `close()`, or by the daemon
        dying or restarting: the new daemon refuses the old region id, so register again)."""
        return connection_open(self._conn)

    def pages(self, page_ids: Sequence[int]) -> pb.KvPages:
        """The `KvPages` of one block (pages_per_block ids in token order)."""
        return pb.KvPages(region_id=self.id, page_ids=[int(p) for p in page_ids])

    def array(self, dtype: Any = np.uint8) -> np.ndarray:
        """numpy view of a memfd region (no copy), in `geometry.shape()` when packed."""
        if self._mmap is None:
            raise RegionError(f"region {self.name!r}: no host mapping (CUDA IPC region, or closed)")
        a = np.frombuffer(self._mmap, dtype=np.uint8)
        dt = np.dtype(dtype)
        if dt.itemsize == self.geometry.dtype_bytes and self.geometry.layer_stride == 0:
            return a.view(dt).reshape(self.geometry.shape())
        return a.view(dt)

    def tensor(self, dtype: Any) -> Any:
        """torch view of a memfd region (no copy), shaped like `geometry.shape()`."""
        import torch
        if self._mmap is None:
            raise RegionError(f"region {self.name!r}: no host mapping (CUDA IPC region, or closed)")
        t = torch.frombuffer(self._mmap, dtype=torch.uint8).view(dtype)
        return t.reshape(self.geometry.shape()) if self.geometry.layer_stride == 0 else t

    def close(self) -> None:
        """Unregisters the region."""
        self._conn.close()
        if self._mmap is not None:
            m, self._mmap = self._mmap, None
            try:
                m.close()
            except BufferError:
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._owner = None

    def __enter__(self) -> "KvRegion":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KvRegion(id={self.id}, name={self.name!r}, bytes={self.bytes}, geometry={self.geometry})"
