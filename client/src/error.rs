//! The error type of the client library.

use std::time::Duration;

use thiserror::Error;

/// Errors of [`crate::Client`]. Every variant displays on one line.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The target string is not one of the accepted forms.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget { target: String, reason: String },
    /// The connection could not be established.
    #[error("cannot connect to {target}: {}", error_chain(.source))]
    Connect {
        target: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with a non-OK gRPC status.
    #[error("{}", status_line(.0))]
    Status(#[from] tonic::Status),
    /// A unary call took longer than the configured request timeout.
    #[error("DeadlineExceeded: no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The server answered something this client cannot make sense of.
    #[error("invalid response from the server: {0}")]
    InvalidResponse(String),
    /// A request argument is unusable; nothing was sent. `field` names it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A shared-memory pool call got an argument it cannot use.
    #[error("shared-memory pool {name:?}: {reason}")]
    PoolInvalid { name: String, reason: String },
    /// A system call of shared-memory pool set-up failed.
    #[error("shared-memory pool {name:?}: cannot {what}: {}", error_chain(.source))]
    PoolIo {
        name: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The daemon closed the registration connection instead of answering a pool id.
    #[error(
        "shared-memory pool {name:?}: daemon refused the pool registration on {socket} (see its log; \
         a daemon older than 64-bit pool ids refuses this client's preamble too)"
    )]
    PoolRefused { name: String, socket: String },
    /// No free range of the pool is large enough for the allocation.
    #[error(
        "shared-memory pool {name:?} exhausted: {requested} bytes requested, {free} bytes free, largest free range {largest} bytes"
    )]
    PoolExhausted {
        name: String,
        requested: usize,
        free: usize,
        largest: usize,
    },
}

impl ClientError {
    /// The gRPC status code of this error, when it has one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            ClientError::Timeout(_) => Some(tonic::Code::DeadlineExceeded),
            _ => None,
        }
    }

    /// The gRPC status, when the server answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// `Code: message` on one line (`InvalidArgument: items[0].payload: ...`).
fn status_line(status: &tonic::Status) -> String {
    let msg = one_line(status.message());
    if msg.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {msg}", status.code())
    }
}

/// An error and its sources joined with `: `, on one line.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = one_line(&err.to_string());
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = one_line(&e.to_string());
        if !s.is_empty() && !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_displays_code_and_message_on_one_line() {
        let e = ClientError::from(tonic::Status::invalid_argument(
            "items[0].payload: 3 bytes,\nexpected 4",
        ));
        assert_eq!(
            e.to_string(),
            "InvalidArgument: items[0].payload: 3 bytes, expected 4"
        );
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
        let e = ClientError::from(tonic::Status::not_found(""));
        assert_eq!(e.to_string(), "NotFound");
    }

    #[test]
    fn timeout_is_deadline_exceeded() {
        let e = ClientError::Timeout(Duration::from_millis(1500));
        assert_eq!(e.code(), Some(tonic::Code::DeadlineExceeded));
        assert!(e.to_string().starts_with("DeadlineExceeded"), "{e}");
    }
}
