"""The canonical namespace id and chained block keys of docs/hashing.md.

Every process, machine and language that follows docs/hashing.md finds the same
blocks: xxHash3-128 (default secret, seed 0), written little-endian, over fixed
little-endian encodings.
"""

from __future__ import annotations

import struct
from typing import Sequence

import xxhash

MAGIC = b"kvstrata-namespace-v1"
#: Wire codes of `kvstrata.v1.Dtype`, by name.
DTYPES = {"f16": 1, "bf16": 2, "f32": 3, "fp8_e4m3": 4, "fp8_e5m2": 5, "int8": 6}
#: Bytes per element of each dtype code.
DTYPE_BYTES = {1: 2, 2: 2, 3: 4, 4: 1, 5: 1, 6: 1}
#: Wire codes of `kvstrata.v1.Layout`, by name.
LAYOUTS = {"layer_major": 1, "opaque": 2}
KEY_BYTES = 16


def xxh3_128_le(data: bytes) -> bytes:
    """XXH3-128 of `data` as 16 little-endian bytes (not xxhash's big-endian digest)."""
    return xxhash.xxh3_128_intdigest(data).to_bytes(16, "little")


def canonical_encoding(
    model_id: str,
    model_fingerprint: bytes,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: int,
    block_tokens: int,
    layout: int,
    tp_rank: int,
    tp_size: int,
    opaque_block_bytes: int,
) -> bytes:
    """The canonical encoding of a namespace spec (dtype and layout as wire codes;
    layout 0 is read as layer-major, tp_size 0 as 1)."""
    m = model_id.encode("utf-8")
    return (
        MAGIC
        + struct.pack("<I", len(m))
        + m
        + struct.pack("<I", len(model_fingerprint))
        + bytes(model_fingerprint)
        + struct.pack(
            "<IIIBIBIIQ",
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            block_tokens,
            layout or 1,
            tp_rank,
            tp_size or 1,
            opaque_block_bytes,
        )
    )


def namespace_id_of_encoding(encoding: bytes) -> bytes:
    """The 16-byte namespace id of a canonical encoding."""
    return xxh3_128_le(encoding)


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as e:
        raise ValueError(f"tokens: every token id must be 0 to 4294967295 ({e})") from None


def next_block_key(prev: bytes, block: Sequence[int]) -> bytes:
    """One step of the chain: the key of the block of `block` tokens after `prev`
    (the namespace id for the first block)."""
    if len(prev) != KEY_BYTES:
        raise ValueError(f"prev: a chain key or namespace id is 16 bytes, got {len(prev)}")
    return xxh3_128_le(bytes(prev) + _tokens_bytes(block))


def chain_keys(prev: bytes, tokens: Sequence[int], block_tokens: int) -> list[bytes]:
    """Continues a chain from `prev` over every full block of `tokens`."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens: must be at least 1, got {block_tokens}")
    keys: list[bytes] = []
    h = bytes(prev)
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        h = next_block_key(h, tokens[start : start + block_tokens])
        keys.append(h)
    return keys


def block_keys(namespace_id: bytes, tokens: Sequence[int], block_tokens: int) -> list[bytes]:
    """Keys of every full block of `tokens` under a namespace (a trailing partial block
    gets none)."""
    return chain_keys(namespace_id, tokens, block_tokens)
