//! Region calls (`docs/protocol.md`, "Region calls"): page puts and gets sent
//! on a KV region's registration connection instead of over gRPC.
//!
//! After the daemon's reply to a region registration the connection stays
//! open; the engine may then send requests on it, one at a time. Each is a
//! fixed 24-byte little-endian header and a body: the protobuf encoding of the
//! `BatchPutRequest` or `BatchGetRequest` it would send over gRPC. The daemon
//! answers each with a 24-byte header and a body: the protobuf encoding of the
//! response (status 0), or a UTF-8 message (any other status, a gRPC status
//! code). A daemon that serves region calls says so in its
//! `RegisterNamespaceResponse` (`region_calls`); older daemons ignore bytes
//! after the reply, so a client asks only a daemon that said it.
//!
//! Request:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVRQ` |
//! | 4 | 1 | call (1 `BatchPut`, 2 `BatchGet`) |
//! | 5 | 3 | zeros |
//! | 8 | 4 | sequence number (the client's; echoed in the answer) |
//! | 12 | 4 | timeout in ms (0: the daemon's `server.request_timeout_ms`) |
//! | 16 | 4 | body length |
//! | 20 | 4 | zeros |
//!
//! Answer:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVRA` |
//! | 4 | 1 | call (as asked; 0 when the header was not understood) |
//! | 5 | 1 | zero |
//! | 6 | 2 | status: a gRPC status code, 0 OK |
//! | 8 | 4 | sequence number of the request |
//! | 12 | 4 | body length |
//! | 16 | 8 | zeros |
//!
//! A header the daemon cannot read (wrong magic, unknown call, nonzero
//! reserved bytes, a body longer than [`MAX_CALL_BODY_BYTES`]) is answered
//! `INVALID_ARGUMENT` naming the field, and the daemon then closes the
//! connection (which unregisters the region): it cannot tell where the next
//! request starts.

use crate::error::InvalidField;

/// The first 4 bytes of a request.
pub const REQUEST_MAGIC: [u8; 4] = *b"KVRQ";
/// The first 4 bytes of an answer.
pub const ANSWER_MAGIC: [u8; 4] = *b"KVRA";
/// Bytes of a request's or an answer's header.
pub const CALL_HEADER_BYTES: usize = 24;
/// The largest request body the daemon reads: page requests name page ids,
/// not payloads (256 blocks with 32-byte keys and parents are about 22 KB).
pub const MAX_CALL_BODY_BYTES: u32 = 16 << 20;

/// What a region call asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A `BatchPutRequest` whose items name KV pages.
    BatchPut,
    /// A `BatchGetRequest` into KV pages.
    BatchGet,
}

impl CallKind {
    /// The byte at offset 4.
    pub fn code(self) -> u8 {
        match self {
            CallKind::BatchPut => 1,
            CallKind::BatchGet => 2,
        }
    }

    /// The gRPC method the call stands for.
    pub fn method(self) -> &'static str {
        match self {
            CallKind::BatchPut => "BatchPut",
            CallKind::BatchGet => "BatchGet",
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(CallKind::BatchPut),
            2 => Some(CallKind::BatchGet),
            _ => None,
        }
    }
}

/// A request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallHeader {
    pub kind: CallKind,
    pub seq: u32,
    /// 0: the daemon's own request timeout.
    pub timeout_ms: u32,
    pub body_len: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Encodes a request's header.
pub fn encode_call_header(h: &CallHeader) -> [u8; CALL_HEADER_BYTES] {
    let mut out = [0u8; CALL_HEADER_BYTES];
    out[..4].copy_from_slice(&REQUEST_MAGIC);
    out[4] = h.kind.code();
    out[8..12].copy_from_slice(&h.seq.to_le_bytes());
    out[12..16].copy_from_slice(&h.timeout_ms.to_le_bytes());
    out[16..20].copy_from_slice(&h.body_len.to_le_bytes());
    out
}

/// Parses a request's header. The sequence number is returned with a
/// refusal too, when the magic was right (so the refusal can echo it).
pub fn parse_call_header(b: &[u8; CALL_HEADER_BYTES]) -> Result<CallHeader, (u32, InvalidField)> {
    if b[..4] != REQUEST_MAGIC {
        return Err((
            0,
            InvalidField::new(
                "magic",
                format!("{:02x?}, not \"KVRQ\": not a region call", &b[..4]),
            ),
        ));
    }
    let seq = u32_at(b, 8);
    let refuse = |field: &'static str, why: String| Err((seq, InvalidField::new(field, why)));
    let Some(kind) = CallKind::from_code(b[4]) else {
        return refuse(
            "call",
            format!("{} is no call (1 BatchPut, 2 BatchGet)", b[4]),
        );
    };
    if b[5..8].iter().chain(&b[20..24]).any(|&x| x != 0) {
        return refuse("reserved", "bytes 5-7 and 20-23 must be zero".into());
    }
    let body_len = u32_at(b, 16);
    if body_len > MAX_CALL_BODY_BYTES {
        return refuse(
            "body_length",
            format!(
                "{body_len} bytes, more than {MAX_CALL_BODY_BYTES}: region calls carry page \
                 requests; send payloads over gRPC"
            ),
        );
    }
    Ok(CallHeader {
        kind,
        seq,
        timeout_ms: u32_at(b, 12),
        body_len,
    })
}

/// A request or an answer as sent: its header, then its body.
pub fn frame(header: &[u8; CALL_HEADER_BYTES], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CALL_HEADER_BYTES + body.len());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    out
}

/// An answer's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHeader {
    /// The call answered; `None` when the request's header was not understood.
    pub kind: Option<CallKind>,
    /// A gRPC status code (0 OK).
    pub status: u16,
    pub seq: u32,
    pub body_len: u32,
}

/// Encodes an answer's header.
pub fn encode_answer_header(h: &AnswerHeader) -> [u8; CALL_HEADER_BYTES] {
    let mut out = [0u8; CALL_HEADER_BYTES];
    out[..4].copy_from_slice(&ANSWER_MAGIC);
    out[4] = h.kind.map_or(0, CallKind::code);
    out[6..8].copy_from_slice(&h.status.to_le_bytes());
    out[8..12].copy_from_slice(&h.seq.to_le_bytes());
    out[12..16].copy_from_slice(&h.body_len.to_le_bytes());
    out
}

/// Parses an answer's header (the client's side).
pub fn parse_answer_header(b: &[u8; CALL_HEADER_BYTES]) -> Result<AnswerHeader, InvalidField> {
    if b[..4] != ANSWER_MAGIC {
        return Err(InvalidField::new(
            "magic",
            format!("{:02x?}, not \"KVRA\": not a region call's answer", &b[..4]),
        ));
    }
    let kind = match b[4] {
        0 => None,
        c => Some(
            CallKind::from_code(c)
                .ok_or_else(|| InvalidField::new("call", format!("{c} is no call")))?,
        ),
    };
    Ok(AnswerHeader {
        kind,
        status: u16::from_le_bytes([b[6], b[7]]),
        seq: u32_at(b, 8),
        body_len: u32_at(b, 12),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for kind in [CallKind::BatchPut, CallKind::BatchGet] {
            let h = CallHeader {
                kind,
                seq: 7,
                timeout_ms: 1500,
                body_len: 22_000,
            };
            assert_eq!(parse_call_header(&encode_call_header(&h)), Ok(h));
            let a = AnswerHeader {
                kind: Some(kind),
                status: 3,
                seq: 7,
                body_len: 12,
            };
            assert_eq!(parse_answer_header(&encode_answer_header(&a)), Ok(a));
        }
        let a = AnswerHeader {
            kind: None,
            status: 3,
            seq: 0,
            body_len: 0,
        };
        assert_eq!(parse_answer_header(&encode_answer_header(&a)), Ok(a));
    }

    #[test]
    fn bad_headers_name_their_field() {
        let good = encode_call_header(&CallHeader {
            kind: CallKind::BatchGet,
            seq: 9,
            timeout_ms: 0,
            body_len: 10,
        });
        let field = |b: [u8; CALL_HEADER_BYTES]| {
            parse_call_header(&b)
                .map(|_| ())
                .map_err(|(s, e)| (s, e.field))
        };
        let refused = |seq: u32, f: &str| Err((seq, f.to_string()));
        let mut b = good;
        b[0] = b'X';
        assert_eq!(field(b), refused(0, "magic"));
        let mut b = good;
        b[4] = 3;
        assert_eq!(field(b), refused(9, "call"));
        for at in [5, 6, 7, 20, 23] {
            let mut b = good;
            b[at] = 1;
            assert_eq!(field(b), refused(9, "reserved"), "byte {at}");
        }
        let mut b = good;
        b[16..20].copy_from_slice(&(MAX_CALL_BODY_BYTES + 1).to_le_bytes());
        assert_eq!(field(b), refused(9, "body_length"));
        b[16..20].copy_from_slice(&MAX_CALL_BODY_BYTES.to_le_bytes());
        assert!(parse_call_header(&b).is_ok());
        let mut a = encode_answer_header(&AnswerHeader {
            kind: None,
            status: 0,
            seq: 1,
            body_len: 0,
        });
        a[4] = 9;
        assert_eq!(
            parse_answer_header(&a).map_err(|e| e.field),
            Err("call".into())
        );
        a[0] = 0;
        assert_eq!(
            parse_answer_header(&a).map_err(|e| e.field),
            Err("magic".into())
        );
    }
}
