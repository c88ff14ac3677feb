//! The codec of every generated client and server: prost's encoding, with
//! the encoder reserving the message's encoded length before it writes.
//!
//! tonic encodes each message into a buffer of 8 KiB that grows as the
//! encoder writes; a message carrying several large payloads outgrows it
//! once per payload, and each growth copies what is already written. For a
//! BatchPut of four 1 MiB blocks that is about 3 MiB copied on top of the
//! one copy of the encoding itself. Reserving `encoded_len` first makes it
//! exactly one. The bytes are prost's, unchanged.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

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
pub fn grpc_frame<M: Message>(message: &M) -> prost::bytes::Bytes {
    let len = message.encoded_len();
    let mut buf = prost::bytes::BytesMut::with_capacity(GRPC_HEADER_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has room for `len` bytes.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Decodes the one gRPC message held in `chunks` (the body of a unary
/// answer, header included), checking its header as tonic does. Every
/// `bytes` field that lies within one chunk is a slice of it, not a copy:
/// a block that arrived in one HTTP/2 frame is handed out as that frame.
pub fn decode_grpc_message<M: Message + Default>(
    chunks: Vec<prost::bytes::Bytes>,
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
    chunks: std::collections::VecDeque<prost::bytes::Bytes>,
    remaining: usize,
}

impl Chunks {
    pub fn new(chunks: Vec<prost::bytes::Bytes>) -> Self {
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

    fn copy_to_bytes(&mut self, len: usize) -> prost::bytes::Bytes {
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
        let mut out = prost::bytes::BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;
    use prost::bytes::Bytes;

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
}
