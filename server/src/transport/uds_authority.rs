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
//! payloads — passes through unchanged (payloads are read straight into the
//! caller's buffer). A Huffman-coded value or a header block split over
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

    /// Moves the parser forward over buffered bytes; false when it needs more.
    fn step(&mut self) -> bool {
        let avail = self.buf.len() - self.ready;
        match self.state {
            State::Preface(left) | State::Payload(left) => {
                if left == 0 {
                    self.state = State::FrameHeader;
                    return true;
                }
                if avail == 0 {
                    return false;
                }
                let n = left.min(avail);
                self.ready += n;
                self.state = match self.state {
                    State::Preface(_) if n == left => State::FrameHeader,
                    State::Preface(_) => State::Preface(left - n),
                    _ => State::Payload(left - n),
                };
                true
            }
            State::FrameHeader => {
                if avail < FRAME_HEADER_BYTES {
                    return false;
                }
                let h = &self.buf[self.ready..self.ready + FRAME_HEADER_BYTES];
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                let (kind, flags) = (h[3], h[4]);
                if kind == FRAME_HEADERS
                    && flags & FLAG_END_HEADERS != 0
                    && len <= MAX_HELD_FRAME_BYTES
                {
                    if avail < FRAME_HEADER_BYTES + len {
                        return false;
                    }
                    let start = self.ready + FRAME_HEADER_BYTES;
                    fix_headers_payload(&mut self.buf[start..start + len], flags);
                    self.ready += FRAME_HEADER_BYTES + len;
                } else {
                    self.ready += FRAME_HEADER_BYTES;
                    self.state = State::Payload(len);
                }
                true
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
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
            // A payload that passes unchanged goes straight to the caller.
            if let State::Payload(left) = this.state
                && left > 0
                && this.buf.is_empty()
            {
                let limit = left.min(out.remaining());
                let mut direct = out.take(limit);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                // SAFETY: the inner reader initialised these `n` bytes of
                // `out`'s unfilled part.
                unsafe { out.assume_init(n) };
                out.advance(n);
                this.state = State::Payload(left - n);
                return Poll::Ready(Ok(()));
            }
            if this.step() {
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream: whatever is left goes on as it is.
                this.ready = this.buf.len();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.buf.extend_from_slice(rb.filled());
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
}
