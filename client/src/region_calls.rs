//! Region calls from the client's side: page requests sent on a
//! [`KvRegion`](crate::KvRegion)'s own registration connection instead of
//! over gRPC (`docs/protocol.md`, "Region calls";
//! [`kvstrata_types::wire::region_calls`]).
//!
//! A call is the gRPC request's protobuf bytes behind a 24-byte header; the
//! daemon's thread for the region runs it and writes the answer back, so a
//! page request costs a socket round trip instead of tonic, HTTP/2 and the
//! daemon's hand-offs between threads. Calls on one connection run one at a
//! time: [`CallChannel::try_call`] returns `None` when another call holds it
//! (or the connection was lost), and the caller goes over gRPC instead.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvstrata_types::wire::region_calls::{
    CALL_HEADER_BYTES, CallHeader, CallKind, MAX_CALL_BODY_BYTES, encode_call_header, frame,
    parse_answer_header,
};

use crate::error::ClientError;

/// The calls of one region's connection (which it owns: dropping it closes
/// the connection and unregisters the region).
pub(crate) struct CallChannel {
    conn: UnixStream,
    state: Mutex<CallState>,
}

struct CallState {
    seq: u32,
    /// The connection is lost or out of step: no more calls on it.
    retired: bool,
}

/// Why a read stopped short.
enum ReadFailure {
    /// The deadline passed before the first byte of an answer.
    Timeout,
    /// The connection failed or closed, or the deadline passed mid-answer.
    Lost(String),
}

impl CallChannel {
    pub(crate) fn new(conn: UnixStream) -> Self {
        CallChannel {
            conn,
            state: Mutex::new(CallState {
                seq: 0,
                retired: false,
            }),
        }
    }

    /// Sends one call (`body`: the request's protobuf encoding) and returns
    /// the answer's body, the response's protobuf encoding; `None` when the
    /// channel is busy with another call or retired (send over gRPC then).
    /// A refusal is the daemon's status, as gRPC would give it; no answer
    /// within `timeout` is [`ClientError::Timeout`] (the connection stays
    /// usable: the late answer is skipped by the next call).
    pub(crate) fn try_call(
        &self,
        kind: CallKind,
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Option<Result<Vec<u8>, ClientError>> {
        if body.len() > MAX_CALL_BODY_BYTES as usize {
            return None;
        }
        let mut state = self.state.try_lock().ok()?;
        if state.retired {
            return None;
        }
        Some(match self.call(&mut state, kind, body, timeout) {
            Ok(answer) => Ok(answer),
            Err(Answered(e)) => Err(e),
            Err(Lost(why)) => {
                state.retired = true;
                Err(lost(kind, &why))
            }
        })
    }

    fn call(
        &self,
        state: &mut CallState,
        kind: CallKind,
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallFailure> {
        state.seq = state.seq.wrapping_add(1);
        let seq = state.seq;
        let timeout_ms = timeout.map_or(0, |t| t.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        let deadline = timeout.map(|t| Instant::now() + t);
        let header = encode_call_header(&CallHeader {
            kind,
            seq,
            timeout_ms,
            body_len: body.len() as u32,
        });
        let request = frame(&header, body);
        // A write cut short leaves the connection out of step.
        self.conn
            .set_write_timeout(timeout)
            .and_then(|()| (&self.conn).write_all(&request))
            .map_err(|e| Lost(format!("sending the call: {e}")))?;
        loop {
            let mut head = [0u8; CALL_HEADER_BYTES];
            match self.read_by(&mut head, deadline, false) {
                Ok(()) => {}
                Err(ReadFailure::Timeout) => {
                    return Err(Answered(ClientError::Timeout(timeout.unwrap_or_default())));
                }
                Err(ReadFailure::Lost(why)) => return Err(Lost(why)),
            }
            let h = parse_answer_header(&head).map_err(|e| Lost(format!("answer header: {e}")))?;
            let mut answer = vec![0u8; h.body_len as usize];
            match self.read_by(&mut answer, deadline, true) {
                Ok(()) => {}
                Err(ReadFailure::Timeout) => return Err(Lost("an answer cut short".into())),
                Err(ReadFailure::Lost(why)) => return Err(Lost(why)),
            }
            if h.seq != seq {
                continue; // the answer to an earlier call that timed out
            }
            if h.status != 0 {
                let message = String::from_utf8_lossy(&answer).into_owned();
                let code = tonic::Code::from(i32::from(h.status));
                return Err(Answered(ClientError::Status(tonic::Status::new(
                    code, message,
                ))));
            }
            if h.kind != Some(kind) {
                return Err(Lost(format!(
                    "the daemon answered {:?} to {kind:?}",
                    h.kind
                )));
            }
            return Ok(answer);
        }
    }

    /// Fills `buf` by `deadline`. `started`: part of this answer was read
    /// already, so running out of time leaves the connection out of step.
    fn read_by(
        &self,
        buf: &mut [u8],
        deadline: Option<Instant>,
        started: bool,
    ) -> Result<(), ReadFailure> {
        let mut at = 0;
        while at < buf.len() {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(timed_out(started || at > 0)),
                },
                None => None,
            };
            self.conn
                .set_read_timeout(left)
                .map_err(|e| ReadFailure::Lost(e.to_string()))?;
            match (&self.conn).read(&mut buf[at..]) {
                Ok(0) => return Err(ReadFailure::Lost("the daemon closed the connection".into())),
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(timed_out(started || at > 0));
                }
                Err(e) => return Err(ReadFailure::Lost(e.to_string())),
            }
        }
        Ok(())
    }
}

fn timed_out(midway: bool) -> ReadFailure {
    match midway {
        true => ReadFailure::Lost("no whole answer by the deadline".into()),
        false => ReadFailure::Timeout,
    }
}

/// How a call failed: with an answer for the caller, or by losing the
/// connection (which retires the channel).
enum CallFailure {
    Answered(ClientError),
    Lost(String),
}
use CallFailure::{Answered, Lost};

fn lost(kind: CallKind, why: &str) -> ClientError {
    ClientError::Status(tonic::Status::unavailable(format!(
        "{} region call: {why}; later requests go over gRPC",
        kind.method()
    )))
}
