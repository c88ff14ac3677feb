//! Region calls: page puts and gets an engine sends on its KV region's
//! registration connection instead of over gRPC
//! ([`kvstrata_types::wire::region_calls`], docs/protocol.md).
//!
//! Why: a page request moves no payload, so its cost beyond the copies is
//! the call itself. Over gRPC that is a client library, HTTP/2 framing and
//! hand-offs between the daemon's tasks and its blocking pool, each a thread
//! wake-up; here the connection's own thread reads the request, runs it and
//! writes the answer (with an early answer, as soon as the copies are
//! queued), so a call costs the two wake-ups of a socket round trip.
//!
//! One thread per registered region serves its calls one at a time, in
//! order; an engine wanting several in flight sends the others over gRPC. The
//! thread ends when the engine closes the connection (the region is then
//! unregistered, as before) or the daemon shuts down (the connection is shut
//! down under it). The work itself is the [`CallHandler`]'s: the gRPC service,
//! with the same checks, the same tiers and the same answers.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstrata_types::wire::region_calls::{
    AnswerHeader, CALL_HEADER_BYTES, CallKind, encode_answer_header, frame, parse_call_header,
};
use tonic::Status;

/// One region call, read off the connection.
pub struct Call<'a> {
    pub kind: CallKind,
    /// The protobuf encoding of the request.
    pub body: &'a [u8],
    /// The daemon gives the call up at this instant (from the client's
    /// timeout, or `server.request_timeout_ms`): no gather or scatter starts
    /// after it.
    pub cutoff: Instant,
    /// When its header arrived.
    pub received: Instant,
}

/// An answer: the response's protobuf encoding, or why there is none.
pub type CallAnswer = Result<Vec<u8>, Status>;

/// Runs region calls (the gRPC service implements it).
pub trait CallHandler: Send + Sync + 'static {
    /// Runs `call` on this thread and gives its answer to `answer`, once:
    /// before returning, possibly before the work is done (a get answered
    /// once its copies are queued returns after they complete).
    fn call(&self, call: Call<'_>, answer: &mut dyn FnMut(CallAnswer));
}

/// What a region connection needs to serve calls.
#[derive(Clone)]
pub struct RegionCalls {
    pub handler: Arc<dyn CallHandler>,
    /// The deadline of a call whose client set none
    /// (`server.request_timeout_ms`).
    pub request_timeout: Duration,
}

/// Serves the calls of region `region_id` on `stream` until the peer closes
/// it, a header cannot be read, or an answer cannot be written. Blocking:
/// runs on its own thread.
pub fn serve(stream: &UnixStream, calls: &RegionCalls, region_id: u64) {
    let mut body = Vec::new();
    loop {
        let mut header = [0u8; CALL_HEADER_BYTES];
        if let Err(e) = read_exact(stream, &mut header) {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(region_id, error = %e, "region calls: read failed; connection closed");
            }
            return; // end-of-file: the engine closed the region
        }
        let received = Instant::now();
        let h = match parse_call_header(&header) {
            Ok(h) => h,
            Err((seq, e)) => {
                tracing::warn!(region_id, error = %e, "region calls: unreadable header; closing the connection");
                let refusal = Status::invalid_argument(e.to_string());
                let _ = write_answer(stream, None, seq, Err(refusal));
                return;
            }
        };
        body.clear();
        body.resize(h.body_len as usize, 0);
        if read_exact(stream, &mut body).is_err() {
            return;
        }
        let timeout = (h.timeout_ms > 0).then(|| Duration::from_millis(u64::from(h.timeout_ms)));
        let call = Call {
            kind: h.kind,
            body: &body,
            cutoff: received + crate::limits::call_timeout(timeout, calls.request_timeout),
            received,
        };
        let mut written = None;
        calls.handler.call(call, &mut |a| {
            if written.is_none() {
                written = Some(write_answer(stream, Some(h.kind), h.seq, a));
            }
        });
        let result = match written {
            Some(r) => r,
            None => {
                let missing = Status::internal("the daemon's handler gave no answer");
                write_answer(stream, Some(h.kind), h.seq, Err(missing))
            }
        };
        if let Err(e) = result {
            tracing::debug!(region_id, error = %e, "region calls: answer not written; connection closed");
            return;
        }
    }
}

/// `Read::read_exact` on a shared stream.
fn read_exact(mut stream: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    stream.read_exact(buf)
}

/// Writes one answer: header and body in one write.
fn write_answer(
    mut stream: &UnixStream,
    kind: Option<CallKind>,
    seq: u32,
    answer: CallAnswer,
) -> io::Result<()> {
    let (status, body) = match answer {
        Ok(b) => (0u16, b),
        Err(s) => (s.code() as u16, s.message().as_bytes().to_vec()),
    };
    let header = encode_answer_header(&AnswerHeader {
        kind,
        status,
        seq,
        body_len: body.len() as u32,
    });
    stream.write_all(&frame(&header, &body))
}
