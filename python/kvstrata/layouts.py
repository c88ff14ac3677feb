"""Layout descriptors of engines' paged KV memory, and the one-copy gather / scatter
between that memory and kvstrata's layer-major block format.

A block of a layer-major namespace is `[layer][K|V][token][kv_head][head_dim]`
(docs/protocol.md). Engines keep their pages differently; each descriptor below names
one engine layout, validates the engine's buffers against it at construction (wrong
shape, dtype size, device: a clear `RegionError`), and moves whole batches of pages with
one numpy copy each way: `gather` writes blocks into `out` (e.g. a `SharedPool` view, so
the daemon then reads them with no further copy), `scatter` writes blocks back into the
pages. Page ids out of range are refused before anything is written.

| descriptor | engine memory | shape |
|---|---|---|
| `VllmLayout(hnd=False)` | vLLM, one tensor per layer | `(2, num_blocks, block_size, kv_heads, head_size)` |
| `VllmLayout(hnd=True)` | vLLM's HND variant | `(2, num_blocks, kv_heads, block_size, head_size)` |
| `SglangHostLayout("layer_first")` | SGLang MHA host pool | `(2, layers, tokens, heads, dim)` |
| `SglangHostLayout("page_first")` | SGLang MHA host pool | `(2, tokens, layers, heads, dim)` |
| `SglangHostLayout("page_first_direct")` | SGLang MHA host pool | `(2, pages, layers, page_size, heads, dim)` |
| `DaemonPerLayerLayout` | the daemon's own per-layer KV region | `(layers, pages, 2, page_tokens, heads, dim)` |

MLA pools (one latent vector per token, no separate V) use `kv=1`: blocks are then
`[layer][token][1][dim]`, stored in an opaque namespace.

`vllm_region_geometry` is the zero-copy alternative for vLLM: it reads the strides of
vLLM's per-layer KV tensors (views of one buffer) and returns the daemon's
`PagedGeometry` for them, so the buffer registers as one `KvRegion` (CUDA IPC on a GPU)
and the daemon gathers and scatters pages itself. It takes the classic `(2, num_blocks,
block_size, kv_heads, head_size)` tensors (K of every page, then V: the K/V stride; NHD or
HND), and the `[num_blocks, kv_heads, block_size, 2 * head_size]` views vLLM 0.32 gives
every backend, whose pages (in any of vLLM's physical layouts, layer- or block-outermost)
hold K and V of each token side by side.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .errors import RegionError
from .region import PagedGeometry

SGLANG_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def _uint_view(a: Any) -> np.ndarray:
    """A numpy view of a numpy array or CPU torch tensor, as unsigned ints of its
    element size (bf16 and fp8 have no numpy dtype; bytes are what we move)."""
    if hasattr(a, "device") and hasattr(a, "numpy"):
        if a.device.type != "cpu":
            raise RegionError(f"tensor: on device {a.device.type!r}; layouts move CPU memory "
                              "(CUDA memory: KvRegion.from_cuda_tensor)")
        size = a.element_size()
        import torch
        a = a.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy()
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


class KvLayout:
    """Base: `layers`, `page_tokens`, `kv_heads`, `head_dim`, `dtype_bytes`, `num_pages`, `kv`."""

    layers: int
    page_tokens: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    num_pages: int
    kv: int

    def page_bytes(self) -> int:
        """Bytes of one page in block format (all layers, K and V)."""
        return self.layers * self.kv * self.page_tokens * self.kv_heads * self.head_dim * self.dtype_bytes

    def block_bytes(self, pages_per_block: int) -> int:
        return self.page_bytes() * pages_per_block

    def _ids(self, page_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(page_ids, dtype=np.int64).reshape(-1)
        bad = np.nonzero((ids < 0) | (ids >= self.num_pages))[0]
        if bad.size:
            i = int(bad[0])
            raise RegionError(f"page_ids[{i}]: page {int(ids[i])} is outside the {self.num_pages} pages")
        return ids

    def _out_view(self, out: np.ndarray, n_pages: int) -> np.ndarray:
        """`out` as `[layers, kv, n_pages * page_tokens, heads, dim]` elements; blocks of
        several pages stack in page order, so a batch of blocks gathers in one call only
        when each block's pages are listed block after block."""
        flat = np.asarray(out).reshape(-1).view(np.uint8)
        need = n_pages * self.page_bytes()
        if flat.size != need:
            raise RegionError(f"out: {flat.size} bytes, but {n_pages} pages make {need}")
        dt = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[self.dtype_bytes]
        return flat.view(dt).reshape(self.layers, self.kv, n_pages * self.page_tokens, self.kv_heads, self.head_dim)

    def gather(self, page_ids: Sequence[int], out: np.ndarray) -> None:
        """Writes the pages (one block, token order) into `out` in block format."""
        raise NotImplementedError

    def scatter(self, page_ids: Sequence[int], block: np.ndarray) -> None:
        """Writes a block-format `block` into the pages."""
        raise NotImplementedError


def _check(name: str, got: Sequence[int], want: Sequence[int]) -> None:
    if tuple(got) != tuple(want):
        raise RegionError(f"{name}: shape {tuple(got)}, but the layout needs {tuple(want)}")


class VllmLayout(KvLayout):
    """vLLM's paged KV cache: one tensor per layer, `(2, num_blocks, block_size, kv_heads,
    head_size)` (or `(2, num_blocks, kv_heads, block_size, head_size)` with `hnd=True`)."""

    def __init__(self, layer_tensors: Sequence[Any], *, hnd: bool = False) -> None:
        if not layer_tensors:
            raise RegionError("kv_caches: no layers")
        self.buffers = [_uint_view(t) for t in layer_tensors]
        first = self.buffers[0]
        if first.ndim != 5 or first.shape[0] != 2:
            raise RegionError(f"kv_caches[0]: shape {first.shape}; vLLM's layout is (2, num_blocks, "
                              f"{'kv_heads, block_size' if hnd else 'block_size, kv_heads'}, head_size)")
        self.hnd = hnd
        _, self.num_pages, a, b, self.head_dim = first.shape
        self.page_tokens, self.kv_heads = (b, a) if hnd else (a, b)
        self.layers = len(self.buffers)
        self.dtype_bytes = first.dtype.itemsize
        self.kv = 2
        for i, t in enumerate(self.buffers):
            _check(f"kv_caches[{i}]", t.shape, first.shape)
            if t.dtype != first.dtype:
                raise RegionError(f"kv_caches[{i}]: element size {t.dtype.itemsize}, layer 0 has {self.dtype_bytes}")

    def gather(self, page_ids: Sequence[int], out: np.ndarray) -> None:
        ids = self._ids(page_ids)
        o = self._out_view(out, len(ids))
        for l, t in enumerate(self.buffers):
            src = t[:, ids]  # (2, P, bs, H, D) or (2, P, H, bs, D): the one copy
            if self.hnd:
                src = src.transpose(0, 1, 3, 2, 4)
            o[l] = src.reshape(2, len(ids) * self.page_tokens, self.kv_heads, self.head_dim)

    def scatter(self, page_ids: Sequence[int], block: np.ndarray) -> None:
        ids = self._ids(page_ids)
        o = self._out_view(block, len(ids))
        for l, t in enumerate(self.buffers):
            src = o[l].reshape(2, len(ids), self.page_tokens, self.kv_heads, self.head_dim)
            if self.hnd:
                src = src.transpose(0, 1, 3, 2, 4)
            t[:, ids] = src


class SglangHostLayout(KvLayout):
    """SGLang's host KV pool (`MHATokenToKVPoolHost.kv_buffer`, or the MLA pool's with
    `mla=True`) in one of its layouts: "layer_first", "page_first", "page_first_direct"."""

    def __init__(self, kv_buffer: Any, layout: str, *, page_size: int, layers: int,
                 mla: bool = False) -> None:
        if layout not in SGLANG_LAYOUTS:
            raise RegionError(f"layout: {layout!r} is not one of {SGLANG_LAYOUTS}")
        self.layout = layout
        self.buffer = _uint_view(kv_buffer)
        self.page_tokens = page_size
        self.layers = layers
        self.kv = 1 if mla else 2
        self.dtype_bytes = self.buffer.dtype.itemsize
        b = self.buffer if not mla else self.buffer[None]  # MLA has no leading K|V axis
        self._b = b
        if b.ndim != (6 if layout == "page_first_direct" else 5):
            raise RegionError(f"kv_buffer: shape {self.buffer.shape} does not fit SGLang's {layout} layout")
        if layout == "layer_first":
            _, l, tokens, self.kv_heads, self.head_dim = b.shape
            self.num_pages = tokens // page_size
        elif layout == "page_first":
            _, tokens, l, self.kv_heads, self.head_dim = b.shape
            self.num_pages = tokens // page_size
        else:
            _, self.num_pages, l, ps, self.kv_heads, self.head_dim = b.shape
            if ps != page_size:
                raise RegionError(f"kv_buffer: page size {ps} in the buffer, {page_size} given")
        if l != layers:
            raise RegionError(f"kv_buffer: {l} layers in the buffer, {layers} given")

    def _tokens(self, ids: np.ndarray) -> np.ndarray:
        return (ids[:, None] * self.page_tokens + np.arange(self.page_tokens)).reshape(-1)

    def gather(self, page_ids: Sequence[int], out: np.ndarray) -> None:
        ids = self._ids(page_ids)
        o = self._out_view(out, len(ids))
        b = self._b
        if self.layout == "layer_first":
            o[...] = b[:, :, self._tokens(ids)].transpose(1, 0, 2, 3, 4)
        elif self.layout == "page_first":
            o[...] = b[:, self._tokens(ids)].transpose(2, 0, 1, 3, 4)
        else:
            src = b[:, ids].transpose(2, 0, 1, 3, 4, 5)  # (L, kv, P, ps, H, D)
            o[...] = src.reshape(o.shape)

    def scatter(self, page_ids: Sequence[int], block: np.ndarray) -> None:
        ids = self._ids(page_ids)
        o = self._out_view(block, len(ids))
        b = self._b
        if self.layout == "layer_first":
            b[:, :, self._tokens(ids)] = o.transpose(1, 0, 2, 3, 4)
        elif self.layout == "page_first":
            b[:, self._tokens(ids)] = o.transpose(1, 2, 0, 3, 4)
        else:
            src = o.reshape(self.layers, self.kv, len(ids), self.page_tokens, self.kv_heads, self.head_dim)
            b[:, ids] = src.transpose(1, 2, 0, 3, 4, 5)


class DaemonPerLayerLayout(KvLayout):
    """The daemon's own per-layer KV-region layout, packed:
    `(layers, num_pages, 2, page_tokens, kv_heads, head_dim)`. Used to check that the
    daemon's gather and this module's agree."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = _uint_view(buffer)
        if self.buffer.ndim != 6 or self.buffer.shape[2] != 2:
            raise RegionError(f"buffer: shape {self.buffer.shape} is not (layers, pages, 2, tokens, heads, dim)")
        self.layers, self.num_pages, self.kv, self.page_tokens, self.kv_heads, self.head_dim = self.buffer.shape
        self.dtype_bytes = self.buffer.dtype.itemsize

    def gather(self, page_ids: Sequence[int], out: np.ndarray) -> None:
        ids = self._ids(page_ids)
        o = self._out_view(out, len(ids))
        src = self.buffer[:, ids]  # (L, P, 2, T, H, D)
        o[...] = src.transpose(0, 2, 1, 3, 4, 5).reshape(o.shape)

    def scatter(self, page_ids: Sequence[int], block: np.ndarray) -> None:
        ids = self._ids(page_ids)
        o = self._out_view(block, len(ids))
        src = o.reshape(self.layers, 2, len(ids), self.page_tokens, self.kv_heads, self.head_dim)
        self.buffer[:, ids] = src.transpose(0, 2, 1, 3, 4, 5)


def _strided_meta(t: Any) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(shape, byte strides, element size, address of the first element) of a torch
    tensor or numpy array."""
    if hasattr(t, "data_ptr") and hasattr(t, "element_size"):
        e = int(t.element_size())
        return tuple(int(n) for n in t.shape), tuple(int(x) * e for x in t.stride()), e, int(t.data_ptr())
    a = np.asarray(t)
    return tuple(a.shape), tuple(int(x) for x in a.strides), a.dtype.itemsize, int(a.ctypes.data)


def _dense_bytes(shape: Sequence[int], strides: Sequence[int], e: int) -> Optional[int]:
    """The bytes of a view whose elements fill one contiguous run, in some order of its
    axes (the strides of its axes longer than 1, largest first, each the product of the
    sizes inside it); None when there are gaps or overlaps."""
    dims = sorted(((st, n) for n, st in zip(shape, strides) if n > 1), reverse=True)
    want = e
    for st, n in reversed(dims):
        if st != want:
            return None
        want *= n
    return want


def vllm_region_geometry(layer_tensors: Sequence[Any], *, num_blocks: int, block_size: int, kv_heads: int,
                         head_size: int) -> PagedGeometry:
    """The daemon's per-layer `PagedGeometry` of vLLM's KV tensors, one per layer, in layer
    order, addressed from layer 0's first element (register that tensor with
    `KvRegion.from_cuda_tensor`, or a memfd holding them with `KvRegion.create_memfd`).

    Two shapes are understood (torch tensors or numpy arrays, any strides):

    - `(2, num_blocks, …)`: K of every block, then V (vLLM's classic FlashAttention layout,
      NHD `(2, B, block_size, heads, dim)` or HND `(2, B, heads, block_size, dim)`):
      `kv_stride` is the distance between the halves, `page_stride` between blocks;
    - `(num_blocks, …)` whose block holds K and V together (vLLM 0.32's `[B, heads,
      block_size, 2 * dim]` views in any physical order): a block's bytes are split in two
      halves that the daemon copies as they are.

    Each layer's (K or V) block must be one contiguous run of `block_size * kv_heads *
    head_size * element size` bytes (twice that for the second shape), in whatever order
    of its axes: the daemon copies runs, so the blocks it stores hold the page bytes in
    vLLM's memory order (the namespace must say which layout they came from). The layers
    must lie a constant stride apart, in order. Anything else is a `RegionError` naming the
    tensor."""
    if not layer_tensors:
        raise RegionError("kv_caches: no layers")
    metas = [_strided_meta(t) for t in layer_tensors]
    shape, strides, e, base = metas[0]
    for i, (sh, st, ei, _) in enumerate(metas):
        if (sh, st, ei) != (shape, strides, e):
            raise RegionError(f"kv_caches[{i}]: shape {sh}, byte strides {st}, element size {ei}; layer 0 has "
                              f"{shape}, {strides}, {e}")
    if any(st < 0 for st in strides):
        raise RegionError(f"kv_caches[0]: negative strides {strides}")
    chunk = block_size * kv_heads * head_size * e
    if len(shape) >= 2 and shape[0] == 2 and shape[1] == num_blocks:
        kv_stride, page_stride = strides[0], strides[1]
        inner = (shape[2:], strides[2:])
        inner_bytes = chunk
    elif len(shape) >= 1 and shape[0] == num_blocks:
        page_stride, kv_stride = strides[0], chunk
        inner = (shape[1:], strides[1:])
        inner_bytes = 2 * chunk
    else:
        raise RegionError(f"kv_caches[0]: shape {shape} has neither (2, {num_blocks}, ...) nor ({num_blocks}, ...) "
                          "leading axes (vLLM's KV layouts)")
    dense = _dense_bytes(inner[0], inner[1], e)
    if dense != inner_bytes:
        raise RegionError(f"kv_caches[0]: a block of shape {inner[0]} and byte strides {inner[1]} is not one "
                          f"contiguous run of {inner_bytes} bytes ({block_size} tokens x {kv_heads} heads x "
                          f"{head_size} dims x {e} bytes{', K and V' if inner_bytes == 2 * chunk else ''})")
    layer_stride = 0
    if len(metas) > 1:
        layer_stride = metas[1][3] - base
        for i in range(1, len(metas)):
            if metas[i][3] - metas[i - 1][3] != layer_stride:
                raise RegionError(f"kv_caches[{i}]: starts {metas[i][3] - metas[i - 1][3]} bytes after layer "
                                  f"{i - 1}, but layer 1 starts {layer_stride} bytes after layer 0: the layers "
                                  "must be a constant stride apart, in order")
        if layer_stride <= 0:
            raise RegionError(f"kv_caches[1]: starts {layer_stride} bytes from layer 0; the layers must follow "
                              "each other in memory, in order")
    return PagedGeometry("per_layer", layers=len(metas), page_tokens=block_size, kv_heads=kv_heads,
                         head_dim=head_size, dtype_bytes=e, num_pages=num_blocks, layer_stride=layer_stride,
                         page_stride=page_stride, kv_stride=kv_stride)


def memory_order(t: Any) -> Any:
    """`t` (torch) with its axes permuted into memory order (largest stride first), so that
    a contiguous copy of it holds its bytes in the order they lie in memory: the byte order
    of the blocks the daemon gathers from a region of `vllm_region_geometry`."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return t.permute(*order)
