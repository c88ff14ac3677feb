//! The codec of every generated client and server: prost's encoding, with
//! the encoder reserving the message's encoded length before it writes.
//!
//! tonic encodes each message into a buffer of 8 KiB that grows as the
//! encoder writes; a message carrying several large payloads outgrows it
//! once per payload, and each growth copies what is already written. For a
//! BatchPut of four 1 MiB blocks that is about 3 MiB copied on top of the
//! one copy of the encoding itself. Reserving `encoded_len` first makes it
//! exactly one. The bytes are prost's, unchanged.
//!
//! Also the pieces of the hand-framed unary calls (the daemon's and the
//! client library's `BatchGet` / `BatchPut`, which move payloads without
//! copying them): [`grpc_frame`], [`encode_put_request`] (a BatchPut as
//! chunks around its payloads) and [`decode_grpc_message`] over the frames
//! a message arrived in ([`Chunks`]).

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::v1::{BatchPutRequest, PutItem};

/// prost encoding and decoding; the encoder reserves before it writes.
#[derive(Debug, Clone, Copy)]
pub struct KvCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for KvCodec<T, U> {
    fn default() -> Self {
        KvCodec(PhantomData)
    }
}

impl<T, U> Codec for KvCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = PlainDecoder<U>;

    fn encoder(&mut self) -> ReservingEncoder<T> {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> PlainDecoder<U> {
        PlainDecoder(PhantomData)
    }
}

/// Encodes a message after reserving its encoded length in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct ReservingEncoder<T>(PhantomData<fn(T)>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("Error encoding: {e}")))
    }
}

/// Decodes a message as prost does (`bytes` fields are slices of the
/// received buffer, not copies).
#[derive(Debug, Clone, Copy)]
pub struct PlainDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default> Decoder for PlainDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic's own decoder answers INTERNAL with prost's message; the
        // daemon's limits layer relies on that text.
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// Compression flag and length in front of every gRPC message.
pub const GRPC_HEADER_BYTES: usize = 5;

/// `message` as one gRPC message: uncompressed flag, length, prost's bytes.
pub fn grpc_frame<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(GRPC_HEADER_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has room for `len` bytes.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Payloads shorter than this are copied into the surrounding chunk by
/// [`encode_put_request`] rather than sent as a chunk (and an HTTP/2 frame)
/// of their own.
pub const COPY_BELOW_BYTES: usize = 8 * 1024;
/// Protobuf tag of `BatchPutRequest.items` (field 2, length-delimited).
const ITEMS_TAG: u8 = 2 << 3 | 2;
/// Protobuf tag of the payload field of `PutItem` and `GetResult` (field 3,
/// length-delimited).
const PAYLOAD_TAG: u8 = 3 << 3 | 2;

/// One element of a repeated message field whose payload (field 3, `bytes`)
/// travels as a chunk of its own: the element without its payload, split
/// into the fields before the payload and those after it, and the payload.
pub type SplitElement<'a, M> = (M, M, &'a Bytes);

/// Encoded length of one [`SplitElement`], its payload included.
pub fn split_element_len<M: Message>((head, tail, payload): &SplitElement<'_, M>) -> usize {
    let payload_field = if payload.is_empty() {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(payload.len() as u64) + payload.len()
    };
    head.encoded_len() + payload_field + tail.encoded_len()
}

/// Encoded length of `elements` as a repeated field (tags and lengths
/// included).
pub fn split_field_len<M: Message>(elements: &[SplitElement<'_, M>]) -> usize {
    elements
        .iter()
        .map(|e| {
            let n = split_element_len(e);
            1 + prost::encoding::encoded_len_varint(n as u64) + n
        })
        .sum()
}

/// Appends `elements` as the repeated field `field_tag` to `small` (which
/// holds what the message has before them) and returns the message's chunks
/// in order: each payload of [`COPY_BELOW_BYTES`] or more is a chunk of its
/// own, the payload `Bytes` itself (no copy); shorter ones are copied in.
pub fn split_field_chunks<M: Message>(
    mut small: BytesMut,
    field_tag: u8,
    elements: &[SplitElement<'_, M>],
) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(2 * elements.len() + 1);
    for e in elements {
        let (head, tail, payload) = e;
        small.put_u8(field_tag);
        prost::encoding::encode_varint(split_element_len(e) as u64, &mut small);
        head.encode_raw(&mut small);
        if !payload.is_empty() {
            small.put_u8(PAYLOAD_TAG);
            prost::encoding::encode_varint(payload.len() as u64, &mut small);
            if payload.len() < COPY_BELOW_BYTES {
                small.put_slice(payload);
            } else {
                chunks.push(small.split().freeze());
                chunks.push((*payload).clone());
            }
        }
        tail.encode_raw(&mut small);
    }
    if !small.is_empty() {
        chunks.push(small.freeze());
    }
    chunks
}

/// A `BatchPutRequest` as gRPC message chunks whose concatenation is the
/// gRPC header followed by exactly prost's encoding of `request`; each
/// payload of 8 KiB or more is a chunk of its own, the payload `Bytes`
/// itself (no copy). Fails only for a message longer than a gRPC message
/// can be (4 GiB).
pub fn encode_put_request(request: &BatchPutRequest) -> Result<Vec<Bytes>, Status> {
    // Each item without its payload, split around where the payload goes:
    // fields 1-2 before it, fields 4-5 after (prost writes fields in tag
    // order and leaves default values out).
    let parts: Vec<SplitElement<'_, PutItem>> = request
        .items
        .iter()
        .map(|it| {
            let head = PutItem {
                key: it.key.clone(),
                parent: it.parent.clone(),
                ..Default::default()
            };
            let tail = PutItem {
                range: it.range,
                pages: it.pages.clone(),
                ..Default::default()
            };
            (head, tail, &it.payload)
        })
        .collect();
    // Every field but the items (the namespace; the array form's fields,
    // which a request with items leaves empty), then the items.
    let namespace = BatchPutRequest {
        items: Vec::new(),
        ..request.clone()
    };
    let total = namespace.encoded_len() + split_field_len(&parts);
    let Ok(total32) = u32::try_from(total) else {
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {total} bytes, the limit is: {} bytes",
            u32::MAX
        )));
    };

    let mut small = BytesMut::with_capacity(GRPC_HEADER_BYTES + 64 + 128 * parts.len());
    small.put_u8(0);
    small.put_u32(total32);
    namespace.encode_raw(&mut small);
    Ok(split_field_chunks(small, ITEMS_TAG, &parts))
}

/// Decodes the one gRPC message held in `chunks` (the body of a unary
/// answer, header included), checking its header as tonic does. Every
/// `bytes` field that lies within one chunk is a slice of it, not a copy:
/// a block that arrived in one HTTP/2 frame is handed out as that frame.
pub fn decode_grpc_message<M: Message + Default>(
    chunks: Vec<Bytes>,
    max_message_bytes: usize,
) -> Result<M, Status> {
    let mut body = Chunks::new(chunks);
    if body.remaining() < GRPC_HEADER_BYTES {
        return Err(if body.remaining() == 0 {
            Status::internal("Missing response message.")
        } else {
            Status::internal("Unexpected EOF decoding stream.")
        });
    }
    match body.get_u8() {
        0 => {}
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with compression flag {f}, but no compression was asked for"
            )));
        }
    }
    let len = body.get_u32() as usize;
    if len > max_message_bytes {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max_message_bytes} bytes"
        )));
    }
    if body.remaining() < len {
        return Err(Status::internal("Unexpected EOF decoding stream."));
    }
    M::decode(body.take(len)).map_err(|e| Status::internal(e.to_string()))
}

/// Bytes that arrived in several chunks, read as one [`Buf`] whose
/// `copy_to_bytes` slices a chunk instead of copying when it can.
#[derive(Debug, Default)]
pub struct Chunks {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: usize,
}

impl Chunks {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let chunks: std::collections::VecDeque<_> =
            chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let remaining = chunks.iter().map(|c| c.len()).sum();
        Chunks { chunks, remaining }
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.remaining, "copy_to_bytes past the end");
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= len
        {
            let out = front.split_to(len);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            self.remaining -= len;
            return out;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;
    use Bytes;

    #[test]
    fn chunked_answers_decode_and_single_chunk_fields_are_slices() {
        let msg = pb::BatchGetResponse {
            results: vec![
                pb::GetResult {
                    key: Bytes::from_static(b"k1"),
                    found: true,
                    payload: Bytes::from(vec![5u8; 70_000]),
                    tier: 2,
                    region_error: String::new(),
                },
                pb::GetResult {
                    key: Bytes::from_static(b"k2"),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let wire = grpc_frame(&msg);
        assert_eq!(&wire[GRPC_HEADER_BYTES..], &msg.encode_to_vec()[..]);
        // Whole, and cut at every interesting place.
        let got: pb::BatchGetResponse = decode_grpc_message(vec![wire.clone()], 1 << 20).unwrap();
        assert_eq!(got, msg);
        let p = &got.results[0].payload;
        assert!(
            wire.as_ptr_range().contains(&p.as_ptr()),
            "a slice of the chunk"
        );
        for cut in [1, 5, 9, 12, 20, 1000, wire.len() - 3] {
            let chunks = vec![wire.slice(..cut), Bytes::new(), wire.slice(cut..)];
            let got: pb::BatchGetResponse = decode_grpc_message(chunks, 1 << 20).unwrap();
            assert_eq!(got, msg, "cut at {cut}");
        }
        let e = decode_grpc_message::<pb::BatchGetResponse>(vec![wire.clone()], 100).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let e = decode_grpc_message::<pb::BatchGetResponse>(vec![wire.slice(..50)], 1 << 20)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
    }

    #[test]
    fn put_requests_are_prosts_encoding_and_large_payloads_are_not_copied() {
        use crate::v1 as pb;
        let big = Bytes::from(vec![7u8; 300_000]);
        let shapes = vec![
            pb::BatchPutRequest::default(),
            pb::BatchPutRequest {
                namespace_id: Bytes::from_static(&[1; 16]),
                ..Default::default()
            },
            pb::BatchPutRequest {
                namespace_id: Bytes::from_static(&[1; 16]),
                keys: vec![Bytes::from_static(b"k0"), Bytes::from_static(b"k1")],
                page_region_id: 9,
                page_ids: vec![3, 4],
                chain_parents: true,
                first_parent: Bytes::from_static(b"p"),
                ..Default::default()
            },
            pb::BatchPutRequest {
                namespace_id: Bytes::from_static(&[1; 16]),
                items: vec![
                    pb::PutItem {
                        key: Bytes::from_static(b"a"),
                        parent: Bytes::from_static(b"p"),
                        payload: big.clone(),
                        ..Default::default()
                    },
                    pb::PutItem {
                        key: Bytes::from_static(b"b"),
                        payload: Bytes::from(vec![2u8; COPY_BELOW_BYTES - 1]),
                        ..Default::default()
                    },
                    pb::PutItem {
                        key: Bytes::from_static(b"c"),
                        payload: Bytes::from(vec![3u8; COPY_BELOW_BYTES]),
                        ..Default::default()
                    },
                    pb::PutItem {
                        key: Bytes::from_static(b"r"),
                        range: Some(pb::PoolRange {
                            pool_id: 3,
                            offset: 4096,
                            length: 8192,
                        }),
                        ..Default::default()
                    },
                    pb::PutItem::default(),
                ],
                ..Default::default()
            },
        ];
        for msg in shapes {
            let chunks = encode_put_request(&msg).unwrap();
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(&joined[..], &grpc_frame(&msg)[..], "{msg:?}");
            let got: pb::BatchPutRequest = decode_grpc_message(chunks.clone(), 1 << 30).unwrap();
            assert_eq!(got, msg);
            for item in msg
                .items
                .iter()
                .filter(|i| i.payload.len() >= COPY_BELOW_BYTES)
            {
                assert!(
                    chunks.iter().any(|c| c.as_ptr() == item.payload.as_ptr()),
                    "a payload of {} bytes is sent as it is",
                    item.payload.len()
                );
                // ... and the receiver decodes it in place.
                assert!(
                    got.items
                        .iter()
                        .any(|g| g.payload.as_ptr() == item.payload.as_ptr()),
                    "decoded as the sent chunk"
                );
            }
        }
    }
}
