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
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import RegionError

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
