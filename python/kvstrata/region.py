"""`KvRegion`: an engine's paged KV memory registered on the daemon's region socket, so
that puts and gets name page ids and the daemon gathers / scatters the pages itself
(docs/protocol.md, "CUDA IPC regions").

The daemon understands two page layouts (`PagedGeometry.layout`):

- "per_layer": one tensor per layer, by default `[num_pages, 2, page_tokens, kv_heads,
  head_dim]`, the layers `layer_stride` bytes apart (0: packed). `page_stride` and
  `kv_stride` (bytes between two pages, and from a page's K chunk to its V chunk; 0: the
  defaults `2 * chunk` and `chunk`) describe other per-layer layouts: vLLM's
  `(2, num_blocks, block_size, kv_heads, head_size)` tensors are `page_stride = chunk`,
  `kv_stride = num_blocks * chunk` (`kvstrata.layouts.vllm_region_geometry` works them
  out from the tensors);
- "cross_layer": `[num_pages, layers, 2, page_tokens, kv_heads, head_dim]`.

A chunk (the `page_tokens * kv_heads * head_dim * dtype_bytes` bytes of one layer's K or V
of one page) is copied as it is: the daemon's blocks are `[layer][K|V][page of the
block][chunk bytes]`.

CUDA tensors are shared through CUDA IPC (`KvRegion.from_cuda_tensor`): the daemon maps
the engine's device memory and moves pages with its own kernels, no copy in Python. CPU
memory must live in a memfd the daemon can map: `KvRegion.create_memfd` allocates one and
hands out numpy / torch views of it.

Engines whose layout is none of these (SGLang's host-pool layouts, whose pages are not
whole chunks) use `kvstrata.layouts` instead: one gather or scatter copy per batch
between their memory and a `SharedPool`.

Registration preamble (144 bytes, little-endian, then the name): magic `KVSREGN\\0`,
version 3, kind (1 CUDA IPC, 2 memfd), device, region bytes, the 64-byte IPC handle,
layout, layers, page_tokens, kv_heads, head_dim, dtype_bytes, num_pages, name length,
layer_stride, page_stride, kv_stride (the daemon also accepts version 2: 128 bytes,
without the last two). Answer: status, 4 zero bytes, message length, message, and on success the
u64 region id. Region ids are unique to one run of the daemon (a random base per run): an
id kept across a daemon restart is refused per block, never another engine's pages.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union, overload

import numpy as np

from . import _wire
from .errors import RegionError
from .pool import _recv_exact, check_name, connection_open
from .region_calls import RegionCallChannel
from .target import unix_socket_path
from .v1 import kvstrata_pb2 as pb

REGION_MAGIC = b"KVSREGN\0"
REGION_VERSION = 3
HEADER_BYTES = 144
#: The largest region a geometry may describe (the daemon's limit): 256 TiB.
MAX_REGION_BYTES = 1 << 48
KIND_CUDA_IPC = 1
KIND_MEMFD = 2
REGISTER_TIMEOUT = 10.0
LAYOUT_CODES = {"per_layer": 1, "cross_layer": 2}
#: The daemon's refusal codes, by status.
REFUSAL_REASONS = {1: "preamble", 2: "geometry", 3: "limit", 4: "map", 5: "no_gpu", 6: "uid"}


@dataclass(frozen=True)
class PagedGeometry:
    """Geometry of a KV region in one of the daemon's layouts (see the module docs). Checked
    like the daemon checks it: dimensions of at least 1, strides only for "per_layer", and
    no two chunks overlapping (a `RegionError` naming the field)."""

    layout: str
    layers: int
    page_tokens: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    num_pages: int
    layer_stride: int = 0
    page_stride: int = 0
    kv_stride: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_CODES:
            raise RegionError(f"layout: {self.layout!r} is not one of {sorted(LAYOUT_CODES)}")
        for name in ("layers", "page_tokens", "kv_heads", "head_dim", "dtype_bytes", "num_pages"):
            if getattr(self, name) < 1:
                raise RegionError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("layer_stride", "page_stride", "kv_stride"):
            v = getattr(self, name)
            if v < 0 or v > MAX_REGION_BYTES:
                raise RegionError(f"{name}: {v} bytes is not between 0 and 256 TiB")
            if self.layout == "cross_layer" and v:
                raise RegionError(f"{name}: must be 0 for the cross_layer layout (its pages are packed)")
        if self.layout == "per_layer":
            dims = sorted([("kv_stride", self.effective_kv_stride, 2),
                           ("page_stride", self.effective_page_stride, self.num_pages),
                           ("layer_stride", self.effective_layer_stride, self.layers)], key=lambda d: d[1])
            span = self.chunk_bytes
            for name, stride, count in dims:
                if count < 2:
                    continue
                if stride < span:
                    raise RegionError(f"{name}: {stride} bytes is less than the {span} bytes its inner "
                                      f"dimensions span (chunks of {self.chunk_bytes} bytes): chunks would overlap")
                span += (count - 1) * stride
        if self.end_bytes > MAX_REGION_BYTES:
            raise RegionError(f"num_pages: the region would be {self.end_bytes} bytes, more than 256 TiB")

    @property
    def chunk_bytes(self) -> int:
        """The K (or V) rows of one page of one layer."""
        return self.page_tokens * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def effective_page_stride(self) -> int:
        """Bytes between two pages of one layer."""
        if self.layout == "cross_layer":
            return 2 * self.chunk_bytes * self.layers
        return self.page_stride or 2 * self.chunk_bytes

    @property
    def effective_kv_stride(self) -> int:
        """Bytes from a page's K chunk to its V chunk."""
        return (self.kv_stride or self.chunk_bytes) if self.layout == "per_layer" else self.chunk_bytes

    @property
    def effective_layer_stride(self) -> int:
        if self.layout == "cross_layer":
            return 2 * self.chunk_bytes
        return self.layer_stride or ((self.num_pages - 1) * self.effective_page_stride
                                     + self.effective_kv_stride + self.chunk_bytes)

    @property
    def end_bytes(self) -> int:
        """Bytes the region must span (the end of the last chunk)."""
        return ((self.layers - 1) * self.effective_layer_stride
                + (self.num_pages - 1) * self.effective_page_stride + self.effective_kv_stride + self.chunk_bytes)

    def engine_offset(self, layer: int, kv: int, page: int) -> int:
        """Byte offset in the region of the (layer, K|V, page) chunk."""
        return layer * self.effective_layer_stride + page * self.effective_page_stride + kv * self.effective_kv_stride

    def block_bytes(self, pages_per_block: int = 1) -> int:
        """Bytes of one daemon block of `pages_per_block` pages."""
        return self.layers * 2 * pages_per_block * self.chunk_bytes

    @property
    def packed(self) -> bool:
        """Whether the region is exactly `shape()` (default strides)."""
        return not (self.layer_stride or self.page_stride or self.kv_stride)

    def shape(self) -> tuple[int, ...]:
        """Element shape of the whole region for a packed layout."""
        if self.layout == "cross_layer":
            return (self.num_pages, self.layers, 2, self.page_tokens, self.kv_heads, self.head_dim)
        return (self.layers, self.num_pages, 2, self.page_tokens, self.kv_heads, self.head_dim)


def encode_preamble(kind: int, device: int, region_bytes: int, handle: bytes,
                    geometry: PagedGeometry, name: str) -> bytes:
    """The registration preamble, version 3 (exposed so that tests can corrupt it)."""
    raw = name.encode("utf-8")
    if len(handle) != 64:
        raise RegionError(f"handle: a CUDA IPC handle is 64 bytes, got {len(handle)}")
    head = (REGION_MAGIC + struct.pack("<HHIQ", REGION_VERSION, kind, device, region_bytes) + handle
            + struct.pack("<IIIIIIII", LAYOUT_CODES[geometry.layout], geometry.layers,
                          geometry.page_tokens, geometry.kv_heads, geometry.head_dim,
                          geometry.dtype_bytes, geometry.num_pages, len(raw))
            + struct.pack("<QQQ", geometry.layer_stride, geometry.page_stride, geometry.kv_stride))
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
        #: Page requests on this region's own connection (`kvstrata.region_calls`).
        self.calls = RegionCallChannel(conn)
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
        """Registers the CUDA memory of `tensor` through CUDA IPC: the region starts at the
        tensor's first element (its byte 0) and runs to the end of the tensor's storage,
        which must hold the geometry's pages (`geometry.end_bytes`). The tensor may be a
        strided view (e.g. layer 0 of an engine's per-layer views of one buffer), but its
        first element must be the first byte of its `cudaMalloc` allocation: CUDA IPC
        shares whole allocations. torch's caching allocator gives large tensors their own
        segment, so allocate the KV buffer once, up front."""
        check_name(name, "region")
        device_type = getattr(getattr(tensor, "device", None), "type", None)
        if device_type != "cuda":
            raise RegionError(f"tensor: on device {device_type!r}; KvRegion.from_cuda_tensor needs a CUDA tensor "
                              "(CPU memory: KvRegion.create_memfd, or kvstrata.layouts with a SharedPool)")
        storage = tensor.untyped_storage()
        start = tensor.storage_offset() * tensor.element_size()
        nbytes = storage.nbytes() - start
        if nbytes < geometry.end_bytes:
            raise RegionError(f"bytes: the tensor's storage holds {nbytes} bytes from its first element, but the "
                              f"geometry's pages end at byte {geometry.end_bytes}")
        shared = storage._share_cuda_()
        device, handle, storage_offset = shared[0], shared[1], shared[3]
        offset = storage_offset + start
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

    def page_batch(self, page_ids: Any) -> "PageBatch":
        """The pages of a batch of blocks, for `Client.batch_put_pages` / `batch_get_pages`
        in place of a list of `pages()`: one page id per block (a 1-D sequence or array), or
        one row of pages_per_block ids per block (2-D). The request is then built from the
        array, not from one message per block (docs/python.md, "KV regions"). The batch
        carries the CUDA device of a CUDA IPC region (None for a memfd region): page gets into
        it may be answered before the daemon's copies complete (`Client.answer_when_queued`)."""
        return PageBatch(self.id, page_ids, device=self.device if self.kind == KIND_CUDA_IPC else None,
                         calls=self.calls)

    def array(self, dtype: Any = np.uint8) -> np.ndarray:
        """numpy view of a memfd region (no copy), in `geometry.shape()` when packed."""
        if self._mmap is None:
            raise RegionError(f"region {self.name!r}: no host mapping (CUDA IPC region, or closed)")
        a = np.frombuffer(self._mmap, dtype=np.uint8)
        dt = np.dtype(dtype)
        if dt.itemsize == self.geometry.dtype_bytes and self.geometry.packed:
            return a.view(dt).reshape(self.geometry.shape())
        return a.view(dt)

    def tensor(self, dtype: Any) -> Any:
        """torch view of a memfd region (no copy), shaped like `geometry.shape()`."""
        import torch
        if self._mmap is None:
            raise RegionError(f"region {self.name!r}: no host mapping (CUDA IPC region, or closed)")
        t = torch.frombuffer(self._mmap, dtype=torch.uint8).view(dtype)
        return t.reshape(self.geometry.shape()) if self.geometry.packed else t

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


class PageBatch(Sequence[pb.KvPages]):
    """The pages of a batch of blocks in one KV region (`KvRegion.page_batch`): an (n,
    pages_per_block) array of page ids. A sequence of `KvPages` (item i is block i's
    message), so it goes wherever a list of `KvRegion.pages()` goes; the page requests
    of `Client` encode it straight from the array (`kvstrata._wire`). `device`: the CUDA
    device index of the region's memory (a CUDA IPC region), None for memory the daemon
    writes from the CPU (a memfd region); slices keep it. `calls`: the region's
    `RegionCallChannel` (from `KvRegion.page_batch`): `Client` then sends a one-part page
    request on the region's own connection, when the daemon serves region calls."""

    def __init__(self, region_id: int, page_ids: Any, device: Optional[int] = None,
                 calls: Optional[RegionCallChannel] = None) -> None:
        ids = np.asarray(page_ids)
        if ids.ndim == 1:
            ids = ids.reshape(-1, 1)
        if ids.ndim != 2:
            raise ValueError(f"page_ids: one page id per block (1-D) or one row of page ids per block (2-D), "
                             f"not an array of shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"page_ids: integers, not {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > _wire.U32_MAX):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"page_ids: page id {bad} is not a 32-bit unsigned integer")
        if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
            raise ValueError(f"device: a CUDA device index (an int >= 0) or None, not {device!r}")
        self.region_id = region_id
        self.device: Optional[int] = device
        self.calls = calls
        self.page_ids: np.ndarray = ids.astype(np.uint32)
        self.page_ids.flags.writeable = False

    def __len__(self) -> int:
        return self.page_ids.shape[0]

    @overload
    def __getitem__(self, i: int) -> pb.KvPages: ...

    @overload
    def __getitem__(self, i: slice) -> "PageBatch": ...

    def __getitem__(self, i: Union[int, slice]) -> Union[pb.KvPages, "PageBatch"]:
        if isinstance(i, slice):
            return PageBatch(self.region_id, self.page_ids[i], device=self.device, calls=self.calls)
        return pb.KvPages(region_id=self.region_id, page_ids=self.page_ids[i].tolist())

    def __iter__(self) -> Iterator[pb.KvPages]:
        for row in self.page_ids.tolist():
            yield pb.KvPages(region_id=self.region_id, page_ids=row)

    def wire_rows(self) -> _wire.PagesRows:
        """The blocks' `KvPages`, for `kvstrata._wire`'s request builders."""
        return _wire.PagesRows.from_ids(self.region_id, self.page_ids)

    def __repr__(self) -> str:
        device = "" if self.device is None else f", device=cuda:{self.device}"
        return (f"PageBatch(region_id={self.region_id}, blocks={len(self)}, "
                f"pages_per_block={self.page_ids.shape[1]}{device})")
