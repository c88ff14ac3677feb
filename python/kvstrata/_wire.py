"""Protobuf wire bytes of the page requests (`BatchPut` and `BatchGet` naming KV-region
pages), built without one protobuf message per block.

A request of n blocks as generated messages costs n `KvPages` and n `PutItem` objects,
each built in Python: microseconds per block, most of the client's time on a batch of
hundreds of blocks. Two ways around that:

- The array forms (`batch_get_page_ids_request`, `batch_put_page_ids_request`: every key's
  pages in one region, for a daemon that reads them) have no message per block, so
  protobuf's own encoder builds them from a list of keys and one of page ids: a few C calls
  whatever the count.
- The per-block forms (for a daemon that reads only those, or pages in several regions)
  are built with numpy: every block is one row of a byte matrix (its fields side by side,
  each padded to the widest) with a mask of the bytes that are real; the masked bytes, row
  after row, are the request. The bytes are exactly what protobuf serializes (fields in
  number order, packed `page_ids`, minimal varints, proto3 defaults left out, a present
  `pages` message written even when empty), so the daemon decodes them unchanged.

tests/python/test_wire.py compares both with `SerializeToString()` of the generated messages.

Wire format (docs/protocol.md; `proto/kvstrata/v1/kvstrata.proto`):

- `KvPages`: `region_id` (1, varint), `page_ids` (2, packed varints);
- `PutItem`: `key` (1), `parent` (2), `pages` (5, a `KvPages`);
- `BatchPutRequest`: `namespace_id` (1), `items` (2, one `PutItem` each), or the array form's
  `keys` (3), `page_region_id` (4), `page_ids` (5, packed), `parents` (6), `chain_parents` (7)
  and `first_parent` (8);
- `BatchGetRequest`: `namespace_id` (1), `keys` (2, one each), `pages` (4, one `KvPages` each),
  or `page_region_id` (5) and `page_ids` (6, packed) for every key at once, `compact_answer` (7)
  and `answer_when_queued` (8).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .v1 import kvstrata_pb2 as pb

#: Field tags (field number << 3 | wire type; 0: varint, 2: length-delimited).
TAG_REGION_ID = 0x08        # KvPages.region_id
TAG_PAGE_IDS = 0x12         # KvPages.page_ids (packed)
TAG_ITEM_KEY = 0x0A         # PutItem.key
TAG_ITEM_PARENT = 0x12      # PutItem.parent
TAG_ITEM_PAGES = 0x2A       # PutItem.pages
TAG_NAMESPACE_ID = 0x0A     # BatchPutRequest / BatchGetRequest.namespace_id
TAG_PUT_ITEMS = 0x12        # BatchPutRequest.items
TAG_GET_KEYS = 0x12         # BatchGetRequest.keys
TAG_GET_PAGES = 0x22        # BatchGetRequest.pages
TAG_GET_WHEN_QUEUED = 0x40  # BatchGetRequest.answer_when_queued

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


def varint(n: int) -> bytes:
    """The base-128 varint of `0 <= n < 2**64`."""
    if n < 0 or n > U64_MAX:
        raise ValueError(f"{n} is not a 64-bit unsigned integer")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: int, data: bytes) -> bytes:
    """A length-delimited field (tag, length, bytes)."""
    return bytes((tag,)) + varint(len(data)) + data


def kv_pages_bytes(region_id: int, page_ids: Sequence[int]) -> bytes:
    """One `KvPages` message (reference encoder, one block)."""
    out = bytes((TAG_REGION_ID,)) + varint(region_id) if region_id else b""
    if len(page_ids):
        out += field(TAG_PAGE_IDS, b"".join(varint(int(p)) for p in page_ids))
    return out


# --- byte matrices -------------------------------------------------------------------

#: Bytes of n rows as (bytes (n, w), mask (n, w) of the real ones or None for all, each
#: row's length: an array, or one number for all rows).
Strings = tuple[np.ndarray, Optional[np.ndarray], Union[int, np.ndarray]]

#: Smallest value of each varint length beyond one byte.
_VARINT_STEPS = np.array([1 << (7 * i) for i in range(1, 10)], dtype=np.uint64)


def _uniform(lengths: np.ndarray) -> Union[int, np.ndarray]:
    """One number when every row has the same length (the usual case: cheaper fields)."""
    lo = int(lengths.min())
    return lo if lo == int(lengths.max()) else lengths


def _varints(values: np.ndarray) -> Strings:
    """Varints of unsigned integers, shape (n, k): (bytes, mask) of shape (n, k * w), w the
    longest varint of them (mask None: every byte is real), and each row's length."""
    v = values.astype(np.uint64, copy=False)
    n, k = v.shape
    top = int(v.max()) if v.size else 0
    if top < 0x80:
        return v.astype(np.uint8), None, k
    width = (top.bit_length() + 6) // 7
    lengths = np.searchsorted(_VARINT_STEPS, v, side="right") + 1  # the groups up to the last non-zero one
    groups = ((v[..., None] >> np.arange(0, 7 * width, 7, dtype=np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    if int(lengths.min()) == width:  # all as long as the longest
        groups[..., :-1] |= 0x80
        return groups.reshape(n, k * width), None, k * width
    cols = np.arange(width)
    groups[cols < lengths[..., None] - 1] |= 0x80  # continuation bits
    return (groups.reshape(n, k * width), (cols < lengths[..., None]).reshape(n, k * width),
            _uniform(lengths.sum(axis=1)))


class Rows:
    """n rows of bytes built column by column: each part is a column range, with a mask of
    the bytes a row really has; `build()` joins every row's masked bytes, row after row.
    `length` is each row's length so far (an array, or one number for all rows)."""

    def __init__(self, n: int) -> None:
        self.n = n
        # (bytes: a row for all rows, or (n, w); mask: None (all), (n, 1) or (n, w); width)
        self.parts: list[tuple[np.ndarray, Optional[np.ndarray], int]] = []
        self.length: Union[int, np.ndarray] = 0

    def const(self, data: bytes, present: Optional[np.ndarray] = None) -> None:
        """The same bytes on every row (left out where `present` is False)."""
        self.parts.append((np.frombuffer(data, dtype=np.uint8), None if present is None else present[:, None],
                           len(data)))
        self.length = self.length + (len(data) if present is None else present * len(data))

    def matrix(self, b: np.ndarray, mask: Optional[np.ndarray], lengths: Union[int, np.ndarray]) -> None:
        """(n, w) bytes; `mask` None: all of them real."""
        self.parts.append((b, mask, b.shape[1]))
        self.length = self.length + lengths

    def varint(self, values: np.ndarray, present: Optional[np.ndarray] = None) -> None:
        """One varint per row (left out where `present` is False)."""
        b, m, lengths = _varints(values.reshape(self.n, 1))
        if present is not None:
            m = present[:, None] if m is None else m & present[:, None]
            lengths = lengths * present
        self.matrix(b, m, lengths)

    def field(self, tag: int, inner: "Rows", present: Optional[np.ndarray] = None) -> None:
        """A length-delimited field per row holding `inner`'s row (left out where `present`
        is False: then `inner` must hold nothing on that row)."""
        if isinstance(inner.length, int):
            self.const(bytes((tag,)) + varint(inner.length), present)
        else:
            self.const(bytes((tag,)), present)
            self.varint(inner.length, present)
        self.parts += inner.parts
        self.length = self.length + inner.length

    def build(self) -> bytes:
        width = sum(w for _, _, w in self.parts)
        b = np.empty((self.n, width), dtype=np.uint8)
        dense = all(mask is None for _, mask, _ in self.parts)
        m = None if dense else np.empty((self.n, width), dtype=bool)
        c = 0
        for data, mask, w in self.parts:
            if w == 0:
                continue
            b[:, c:c + w] = data
            if m is not None:
                m[:, c:c + w] = True if mask is None else mask
            c += w
        return b.tobytes() if m is None else b[m].tobytes()


def _strings(items: Sequence[bytes]) -> Strings:
    """A byte string per row: (bytes, mask) padded to the longest (mask None: all the same
    length), and the lengths."""
    n = len(items)
    joined = b"".join(items)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=n)
    if int(lengths.sum()) != len(joined):  # memoryviews of wider items: len() is not their bytes
        items = [bytes(x) for x in items]
        joined = b"".join(items)
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=n)
    width = int(lengths.max()) if n else 0
    if n and int(lengths.min()) == width:  # all the same length (the usual keys)
        return np.frombuffer(joined, dtype=np.uint8).reshape(n, width), None, width
    mask = np.arange(width) < lengths[:, None]
    b = np.zeros((n, width), dtype=np.uint8)
    b[mask] = np.frombuffer(joined, dtype=np.uint8)
    return b, mask, lengths


def _presence(lengths: Union[int, np.ndarray], n: int) -> Optional[np.ndarray]:
    """Rows where a proto3 bytes field of these lengths is written (None: all), for
    `Rows.field`; a field absent from every row gets an all-False mask."""
    if isinstance(lengths, int):
        return None if lengths else np.zeros(n, dtype=bool)
    return lengths > 0


# --- KvPages of a batch ----------------------------------------------------------------


class PagesRows:
    """The `KvPages` of n blocks: either one region and an (n, pages_per_block) array of
    page ids (`from_ids`), or messages serialized one by one (`from_messages`); `rows()`
    lays them out for the request builders."""

    def __init__(self, n: int, region_id: int = 0, page_ids: Optional[np.ndarray] = None,
                 messages: Optional[Sequence[bytes]] = None) -> None:
        self.n = n
        self._region_id = region_id
        self._page_ids = page_ids
        self._messages = messages

    @classmethod
    def from_ids(cls, region_id: int, page_ids: np.ndarray) -> "PagesRows":
        return cls(page_ids.shape[0], region_id=region_id, page_ids=page_ids)

    @classmethod
    def from_messages(cls, messages: Sequence[bytes]) -> "PagesRows":
        return cls(len(messages), messages=messages)

    def message(self, i: int) -> bytes:
        """Block i's `KvPages` message."""
        if self._messages is not None:
            return bytes(self._messages[i])
        assert self._page_ids is not None
        return kv_pages_bytes(self._region_id, self._page_ids[i].tolist())

    def tail(self, start: int) -> "PagesRows":
        """Blocks start.. of these."""
        if self._messages is not None:
            return PagesRows.from_messages(self._messages[start:])
        assert self._page_ids is not None
        return PagesRows.from_ids(self._region_id, self._page_ids[start:])

    def rows(self) -> Rows:
        r = Rows(self.n)
        if self._messages is not None:
            r.matrix(*_strings(self._messages))
            return r
        assert self._page_ids is not None
        if self._region_id:
            r.const(bytes((TAG_REGION_ID,)) + varint(self._region_id))
        if self._page_ids.shape[1]:
            packed = Rows(self.n)
            packed.matrix(*_varints(self._page_ids))
            r.field(TAG_PAGE_IDS, packed)
        return r


# --- requests --------------------------------------------------------------------------


def _header(namespace_id: bytes) -> bytes:
    return field(TAG_NAMESPACE_ID, namespace_id) if namespace_id else b""


def _repeated_bytes(tag: int, items: Sequence[bytes]) -> bytes:
    """A repeated `bytes` field: tag, length and bytes of every item (an empty one too),
    joined by `bytes.join` (keys of one length, the usual case, in one join)."""
    items = _bytes_list(items)
    lengths = set(map(len, items))
    if len(lengths) == 1:
        head = bytes((tag,)) + varint(lengths.pop())
        return head + head.join(items)
    heads = {n: bytes((tag,)) + varint(n) for n in lengths}
    return b"".join([part for x in items for part in (heads[len(x)], x)])


def batch_get_pages_request(namespace_id: bytes, keys: Sequence[bytes], pages: PagesRows) -> bytes:
    """`BatchGetRequest{namespace_id, keys, pages}` (no ranges)."""
    n = len(keys)
    if pages.n != n:
        raise ValueError(f"pages: {pages.n} page lists for {n} keys")
    if n == 0:
        return _header(namespace_id)
    page_rows = Rows(n)
    page_rows.field(TAG_GET_PAGES, pages.rows())
    return _header(namespace_id) + _repeated_bytes(TAG_GET_KEYS, keys) + page_rows.build()


def _bytes_list(items: Sequence[bytes]) -> Sequence[bytes]:
    """`items` as protobuf takes them for a repeated `bytes` field: `bytes` objects (a
    memoryview or bytearray is copied)."""
    if all(type(x) is bytes for x in items):
        return items
    return [bytes(x) for x in items]


def _id_list(page_ids: np.ndarray) -> list[int]:
    return page_ids.reshape(-1).tolist()


def batch_get_page_ids_request(namespace_id: bytes, keys: Sequence[bytes], region_id: int,
                               page_ids: np.ndarray, compact: bool = False, when_queued: bool = False) -> bytes:
    """`BatchGetRequest{namespace_id, keys, page_region_id, page_ids, compact_answer,
    answer_when_queued}`: every key's pages in one region, `page_ids` an (n, pages_per_block)
    array (the array form, for a daemon that says `page_id_arrays`); `compact`: answered with
    each key's tier instead of a `GetResult` per key (for a daemon that says `compact_answers`);
    `when_queued`: the daemon may answer once its copies into the pages are queued on the GPU,
    naming the CUDA event to wait on in `BatchGetResponse.pages_ready_event` (a daemon that
    does not know the field ignores it).

    The array forms have no message per block, so protobuf's own encoder (C, upb) builds
    them: a few calls whatever the count of blocks, a fraction of the byte-matrix builders'
    cost when the CPU's caches are cold between an engine's requests."""
    n = len(keys)
    if page_ids.shape[0] != n:
        raise ValueError(f"page_ids: {page_ids.shape[0]} page lists for {n} keys")
    return pb.BatchGetRequest(namespace_id=namespace_id, keys=_bytes_list(keys), page_region_id=region_id,
                              page_ids=_id_list(page_ids), compact_answer=compact,
                              answer_when_queued=when_queued).SerializeToString()


def batch_put_page_ids_request(namespace_id: bytes, keys: Sequence[bytes], parents: Union[str, Sequence[bytes]],
                               region_id: int, page_ids: np.ndarray, first_parent: bytes = b"") -> bytes:
    """`BatchPutRequest{namespace_id, keys, page_region_id, page_ids, parents | chain_parents,
    first_parent}`: the array form (for a daemon that says `page_id_array_puts`), every key's
    pages in one region, `page_ids` an (n, pages_per_block) array. `parents`: one per key
    (b"": none), or "chain" (each key the parent of the next; the first one's parent is
    `first_parent`). Encoded by protobuf, as `batch_get_page_ids_request`."""
    n = len(keys)
    if page_ids.shape[0] != n:
        raise ValueError(f"page_ids: {page_ids.shape[0]} page lists for {n} keys")
    req = pb.BatchPutRequest(namespace_id=namespace_id, keys=_bytes_list(keys), page_region_id=region_id,
                             page_ids=_id_list(page_ids))
    if isinstance(parents, str):
        if parents != "chain":
            raise ValueError("parents: 'chain' or one parent per key")
        req.chain_parents = True
        req.first_parent = bytes(first_parent)
        return req.SerializeToString()
    if len(parents) != n:
        raise ValueError(f"parents: {len(parents)} parents for {n} keys")
    if first_parent:
        raise ValueError("first_parent: only with parents='chain'")
    if any(parents):
        req.parents.extend(_bytes_list(parents))
    return req.SerializeToString()


def put_item_bytes(key: bytes, parent: bytes, kv_pages: bytes) -> bytes:
    """One `PutItem{key, parent, pages}` (reference encoder, one block)."""
    return ((field(TAG_ITEM_KEY, key) if key else b"") + (field(TAG_ITEM_PARENT, parent) if parent else b"")
            + field(TAG_ITEM_PAGES, kv_pages))


def _row(s: Strings, i: int) -> bytes:
    """Row i of a `_strings` result."""
    b, _, lengths = s
    return b[i, :lengths if isinstance(lengths, int) else int(lengths[i])].tobytes()


def _cut(s: Strings, start: int, stop: Optional[int]) -> Strings:
    """Rows start..stop of a `_strings` result."""
    b, m, lengths = s
    return (b[start:stop], None if m is None else m[start:stop],
            lengths if isinstance(lengths, int) else _uniform(lengths[start:stop]))


def _put_items(keys: Strings, parents: Strings, pages: PagesRows) -> bytes:
    """The `items` fields of a BatchPutRequest, one `PutItem` per row."""
    n = pages.n
    key, parent = Rows(n), Rows(n)
    key.matrix(*keys)
    parent.matrix(*parents)
    item = Rows(n)
    item.field(TAG_ITEM_KEY, key, _presence(keys[2], n))
    item.field(TAG_ITEM_PARENT, parent, _presence(parents[2], n))
    item.field(TAG_ITEM_PAGES, pages.rows())
    items = Rows(n)
    items.field(TAG_PUT_ITEMS, item)
    return items.build()


def batch_put_pages_request(namespace_id: bytes, keys: Sequence[bytes], parents: Union[str, Sequence[bytes]],
                            pages: PagesRows, first_parent: bytes = b"") -> bytes:
    """`BatchPutRequest{namespace_id, items: [PutItem{key, parent, pages}]}`. `parents`:
    one per key (b"": none), or "chain" (each key the parent of the next; the first one's
    parent is `first_parent`)."""
    n = len(keys)
    if pages.n != n:
        raise ValueError(f"pages: {pages.n} page lists for {n} keys")
    if n == 0:
        return _header(namespace_id)
    ks = _strings(keys)
    if isinstance(parents, str):
        if parents != "chain":
            raise ValueError("parents: 'chain' or one parent per key")
        # item 0 (parent: first_parent) on its own; the others' parents are the keys before
        # them, so their rows are alike (no mask when the keys are)
        first = field(TAG_PUT_ITEMS, put_item_bytes(_row(ks, 0), bytes(first_parent), pages.message(0)))
        if n == 1:
            return _header(namespace_id) + first
        return _header(namespace_id) + first + _put_items(_cut(ks, 1, None), _cut(ks, 0, n - 1), pages.tail(1))
    if len(parents) != n:
        raise ValueError(f"parents: {len(parents)} parents for {n} keys")
    return _header(namespace_id) + _put_items(ks, _strings(parents), pages)
