//! Lets gRPC clients that send a socket path as the HTTP/2 `:authority` use
//! the daemon's Unix sockets.
//!
//! grpc-core based clients (Python `grpcio`, C++, Ruby, ...) send the
//! percent-encoded socket path as the `:authority` of a `unix:` target since
//! release 1.57, e.g. `tmp%2Fkvstrata%2Fsglang.sock`. The HTTP/2 server under
//! tonic refuses an authority that is not a host name and resets every such
//! stream with `PROTOCOL_ERROR`, so SGLang's HiCache client (grpcio over a
//! Unix socket) could not talk to the daemon at all.
//!
//! [`AuthorityFix`] wraps an accepted Unix stream and rewrites the bytes the
//! client sends: in each complete `HEADERS` frame it finds the literal
//! `:authority` values (HPACK, RFC 7541) and, when one is not a valid
//! authority, replaces each character that a host name cannot hold by `_`.
//! The value keeps its length, so the HPACK dynamic table the server builds
//! stays the same size as the client's and later indexed references still
//! line up. Everything else — the connection preface, other frames, `DATA`
//! payloads — passes through unchanged: the wrapper reads straight into the
//! caller's buffer and checks the bytes there, so a payload is never copied;
//! only a frame header or `HEADERS` frame cut by a read is held back until
//! its rest arrives. A Huffman-coded value or a header block split over
//! `CONTINUATION` frames is left as it is; grpc-core sends neither for the
//! authority.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_BYTES: usize = 24;
const FRAME_HEADER_BYTES: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HEADERS frames longer than this are passed on unchanged (never buffered whole).
const MAX_HELD_FRAME_BYTES: usize = 1 << 20;
const READ_CHUNK_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes of the connection preface still to pass.
    Preface(usize),
    /// At a frame boundary.
    FrameHeader,
    /// Payload bytes of a frame that passes unchanged.
    Payload(usize),
}

/// A stream whose incoming `:authority` values are made acceptable.
#[derive(Debug)]
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from `inner` and not yet handed to the reader.
    buf: BytesMut,
    /// Leading bytes of `buf` that are checked and may be handed over.
    ready: usize,
    state: State,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            buf: BytesMut::new(),
            ready: 0,
            state: State::Preface(PREFACE_BYTES),
        }
    }
}

/// Walks `bytes` from `state` at its start: passes preface and frame bytes,
/// rewrites each complete `HEADERS` frame in place, and stops where it needs
/// more bytes (an incomplete frame header, or a `HEADERS` frame not yet
/// whole). Returns how many leading bytes are checked and may go on.
fn scan(state: &mut State, bytes: &mut [u8]) -> usize {
    let mut at = 0usize;
    loop {
        let avail = bytes.len() - at;
        match *state {
            State::Preface(left) | State::Payload(left) => {
                if left == 0 {
                    *state = State::FrameHeader;
                    continue;
                }
                if avail == 0 {
                    return at;
                }
                let n = left.min(avail);
                at += n;
                *state = match *state {
                    State::Preface(_) if n == left => State::FrameHeader,
                    State::Preface(_) => State::Preface(left - n),
                    _ => State::Payload(left - n),
                };
            }
            State::FrameHeader => {
                if avail < FRAME_HEADER_BYTES {
                    return at;
                }
                let h = &bytes[at..at + FRAME_HEADER_BYTES];
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                let (kind, flags) = (h[3], h[4]);
                if kind == FRAME_HEADERS
                    && flags & FLAG_END_HEADERS != 0
                    && len <= MAX_HELD_FRAME_BYTES
                {
                    if avail < FRAME_HEADER_BYTES + len {
                        return at;
                    }
                    let start = at + FRAME_HEADER_BYTES;
                    fix_headers_payload(&mut bytes[start..start + len], flags);
                    at += FRAME_HEADER_BYTES + len;
                } else {
                    at += FRAME_HEADER_BYTES;
                    *state = State::Payload(len);
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    /// Reads straight into `out` and checks the new bytes there; only the
    /// tail that cannot be judged yet (part of a frame header, or of a
    /// `HEADERS` frame) is moved aside until more bytes come. `DATA`
    /// payloads are never copied.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if !this.buf.is_empty() {
                // Bytes held back: add to them until they can be judged.
                let mut chunk = [0u8; READ_CHUNK_BYTES];
                let mut rb = ReadBuf::new(&mut chunk);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                if rb.filled().is_empty() {
                    // End of stream: whatever is left goes on as it is.
                    this.ready = this.buf.len();
                    continue;
                }
                this.buf.extend_from_slice(rb.filled());
                this.ready = scan(&mut this.state, &mut this.buf[..]);
                continue;
            }
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            let got = out.filled().len() - before;
            if got == 0 {
                return Poll::Ready(Ok(()));
            }
            let checked = scan(&mut this.state, &mut out.filled_mut()[before..]);
            if checked < got {
                this.buf
                    .extend_from_slice(&out.filled()[before + checked..]);
                out.set_filled(before + checked);
            }
            if checked > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Fixes the header block of one complete HEADERS frame payload.
fn fix_headers_payload(payload: &mut [u8], flags: u8) {
    let mut start = 0usize;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let Some(&pad) = payload.first() else {
            return;
        };
        start = 1;
        end = end.saturating_sub(usize::from(pad));
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    if start < end {
        fix_header_block(&mut payload[start..end]);
    }
}

/// Walks an HPACK header block and fixes literal `:authority` values. Stops
/// at the first representation it cannot parse (the server then sees the rest
/// unchanged and judges it itself).
pub fn fix_header_block(block: &mut [u8]) {
    let mut i = 0usize;
    while i < block.len() {
        let b = block[i];
        if b & 0x80 != 0 {
            // Indexed header field.
            match integer(block, i, 7) {
                Some((_, next)) => i = next,
                None => return,
            }
            continue;
        }
        if b & 0xE0 == 0x20 {
            // Dynamic table size update.
            match integer(block, i, 5) {
                Some((_, next)) => i = next,
                None => return,
            }
            continue;
        }
        // A literal: with incremental indexing (6-bit name index), or
        // without / never indexed (4-bit name index).
        let prefix = if b & 0xC0 == 0x40 { 6 } else { 4 };
        let Some((name_index, next)) = integer(block, i, prefix) else {
            return;
        };
        i = next;
        // Static table entry 1 is `:authority`.
        let mut authority = name_index == 1;
        if name_index == 0 {
            let Some((huffman, s, e)) = string(block, i) else {
                return;
            };
            authority = !huffman && &block[s..e] == b":authority";
            i = e;
        }
        let Some((huffman, s, e)) = string(block, i) else {
            return;
        };
        if authority && !huffman {
            sanitize_authority(&mut block[s..e]);
        }
        i = e;
    }
}

/// An HPACK integer with an `prefix`-bit prefix at `block[i]`: its value and
/// the index after it.
fn integer(block: &[u8], i: usize, prefix: u32) -> Option<(u64, usize)> {
    let mask = (1u16 << prefix) as u64 - 1;
    let mut value = u64::from(*block.get(i)?) & mask;
    let mut i = i + 1;
    if value < mask {
        return Some((value, i));
    }
    let mut shift = 0u32;
    loop {
        let b = *block.get(i)?;
        i += 1;
        value = value.checked_add(u64::from(b & 0x7F) << shift)?;
        if b & 0x80 == 0 {
            return Some((value, i));
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

/// An HPACK string literal at `block[i]`: whether it is Huffman-coded, and
/// the range of its bytes.
fn string(block: &[u8], i: usize) -> Option<(bool, usize, usize)> {
    let huffman = *block.get(i)? & 0x80 != 0;
    let (len, start) = integer(block, i, 7)?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= block.len()).then_some((huffman, start, end))
}

/// Replaces every character a host name (or port) cannot hold by `_`, unless
/// the value is a valid authority already.
fn sanitize_authority(value: &mut [u8]) {
    if tonic::codegen::http::uri::Authority::try_from(&value[..]).is_ok() {
        return;
    }
    for c in value.iter_mut() {
        if !(c.is_ascii_alphanumeric() || matches!(*c, b'.' | b'-' | b'_' | b'~')) {
            *c = b'_';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A literal with incremental indexing of `:authority` (static index 1).
    fn authority_literal(value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x41, value.len() as u8];
        v.extend_from_slice(value);
        v
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_path_authority_becomes_a_host_name_of_the_same_length() {
        // :method POST (indexed 3), :authority literal, a literal header with
        // a literal name, then an indexed reference.
        let mut block = vec![0x83];
        block.extend(authority_literal(b"tmp%2Fkv%2Fsglang.sock"));
        block.extend([0x00, 0x02, b't', b'e', 0x08]);
        block.extend_from_slice(b"trailers");
        block.push(0xBE);
        let before = block.clone();
        fix_header_block(&mut block);
        assert_eq!(block.len(), before.len());
        let at = before.windows(4).position(|w| w == b"tmp%").unwrap();
        assert_eq!(&block[at..at + 22], b"tmp_2Fkv_2Fsglang.sock");
        assert_eq!(&block[..at], &before[..at]);
        assert_eq!(&block[at + 22..], &before[at + 22..]);
    }

    #[test]
    fn valid_huffman_and_literal_name_cases() {
        let mut ok = authority_literal(b"localhost:50051");
        let before = ok.clone();
        fix_header_block(&mut ok);
        assert_eq!(ok, before, "a valid authority is left alone");

        // Literal name ":authority", never indexed.
        let mut named = vec![0x10, 10];
        named.extend_from_slice(b":authority");
        named.push(5);
        named.extend_from_slice(b"a%2Fb");
        fix_header_block(&mut named);
        assert!(named.ends_with(b"a_2Fb"));

        // Huffman-coded values are not touched.
        let mut huff = vec![0x41, 0x83, 0xAA, 0xBB, 0xCC];
        let before = huff.clone();
        fix_header_block(&mut huff);
        assert_eq!(huff, before);

        // Truncated blocks stop the walk without panicking.
        let mut cut = vec![0x41, 0x20, b'a'];
        fix_header_block(&mut cut);
        let mut big_int = vec![0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        fix_header_block(&mut big_int);
    }

    #[test]
    fn integers_follow_rfc_7541() {
        // C.1.2: 1337 with a 5-bit prefix.
        assert_eq!(integer(&[0x1F, 0x9A, 0x0A], 0, 5), Some((1337, 3)));
        assert_eq!(integer(&[0x0A], 0, 5), Some((10, 1)));
        assert_eq!(integer(&[0x1F], 0, 5), None);
    }

    #[tokio::test]
    async fn the_stream_rewrites_headers_and_passes_the_rest() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        let mut block = vec![0x83];
        block.extend(authority_literal(b"%2Frun%2Fk.sock"));
        wire.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &{
            let mut p = vec![2u8];
            p.extend(&block);
            p.extend([0, 0]);
            p
        }));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        wire.extend(frame(0x0, 0x1, 1, &data));
        let mut want = wire.clone();
        let at = want.windows(3).position(|w| w == b"%2F").unwrap();
        want[at..at + 15].copy_from_slice(b"_2Frun_2Fk.sock");

        let (mut client, server) = tokio::io::duplex(777);
        let writer = tokio::spawn(async move {
            // Dribble the bytes in odd pieces.
            for piece in wire.chunks(333) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut fixed = AuthorityFix::new(server);
        let mut got = Vec::new();
        fixed.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, want);
    }

    /// Large `DATA` frames between `HEADERS` frames, in pieces of every
    /// size: each authority is fixed, every other byte comes through as it
    /// was, and the wrapper never holds more than a frame header or a
    /// `HEADERS` frame (payloads go straight to the reader).
    #[tokio::test]
    async fn large_data_passes_unchanged_and_is_not_held() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[0, 5, 0, 0xFF, 0xFF, 0xFF]));
        let mut authorities = 0;
        for stream in [1u32, 3, 5] {
            let mut block = vec![0x83];
            block.extend(authority_literal(b"tmp%2Fkv.sock"));
            wire.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, &block));
            authorities += 1;
            let data: Vec<u8> = (0..(3 << 20) + stream)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            wire.extend(frame(0x0, 0x1, stream, &data));
        }
        let mut want = wire.clone();
        let mut fixed_count = 0;
        let mut i = 0;
        while let Some(at) = want[i..].windows(13).position(|w| w == b"tmp%2Fkv.sock") {
            want[i + at..i + at + 13].copy_from_slice(b"tmp_2Fkv.sock");
            fixed_count += 1;
            i += at + 13;
        }
        assert!(fixed_count >= authorities);

        for piece in [7usize, 4093, 65_536, 1 << 20] {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let input = wire.clone();
            let writer = tokio::spawn(async move {
                for p in input.chunks(piece) {
                    client.write_all(p).await.unwrap();
                }
            });
            let mut fixed = AuthorityFix::new(server);
            let mut got = Vec::with_capacity(wire.len());
            let mut most_held = 0;
            loop {
                let mut buf = vec![0u8; 256 << 10];
                let n = fixed.read(&mut buf).await.unwrap();
                most_held = most_held.max(fixed.buf.len());
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            writer.await.unwrap();
            assert!(got == want, "pieces of {piece}: bytes differ");
            assert!(
                most_held <= READ_CHUNK_BYTES + FRAME_HEADER_BYTES + 64,
                "pieces of {piece}: held {most_held} bytes"
            );
        }
    }
}
