//! The first layer of every gRPC listener's server, in front of routing:
//!
//! - refuses a request whose `content-type` is not gRPC with HTTP 415 (and a
//!   gRPC status, INVALID_ARGUMENT, for gRPC clients), as the gRPC over
//!   HTTP/2 protocol asks; tonic itself would route and answer it;
//! - refuses a second message on a call that takes one (a unary or
//!   server-streaming method) with INVALID_ARGUMENT; tonic itself decodes the
//!   first message and drops the rest unread;
//! - counts the calls open on each connection for the idle timeout
//!   ([`super::conn`]): a call is open from its request until its response
//!   body ends or is dropped;
//! - attaches the connect info of the stream underneath the connection
//!   wrapper ([`TcpConnectInfo`], [`UdsConnectInfo`]) for the layers that
//!   read it.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::Frame;
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::conn::{CallGuard, ConnInfo};
use crate::metrics::{ConnCounters, Malformed};

/// The paths (`/package.Service/Method`) of the methods whose request is one
/// message (unary and server-streaming), from the encoded descriptor sets.
pub fn one_message_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    let mut paths = HashSet::new();
    for set in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            tracing::warn!(
                "a service descriptor set does not decode; its methods' request messages are not counted"
            );
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                let full = if package.is_empty() {
                    service_name
                } else {
                    format!("{package}.{service_name}")
                };
                for method in service.method {
                    if !method.client_streaming.unwrap_or(false) {
                        paths.insert(format!("/{full}/{}", method.name.unwrap_or_default()));
                    }
                }
            }
        }
    }
    paths
}

/// The layer (see the module doc).
#[derive(Debug, Clone)]
pub struct GrpcGuardLayer {
    one_message: Arc<HashSet<String>>,
    counters: Arc<ConnCounters>,
}

impl GrpcGuardLayer {
    pub fn new(one_message: Arc<HashSet<String>>, counters: Arc<ConnCounters>) -> Self {
        GrpcGuardLayer {
            one_message,
            counters,
        }
    }
}

impl<S> Layer<S> for GrpcGuardLayer {
    type Service = GrpcGuard<S>;

    fn layer(&self, inner: S) -> GrpcGuard<S> {
        GrpcGuard {
            inner,
            one_message: Arc::clone(&self.one_message),
            counters: Arc::clone(&self.counters),
        }
    }
}

/// The service of [`GrpcGuardLayer`].
#[derive(Debug, Clone)]
pub struct GrpcGuard<S> {
    inner: S,
    one_message: Arc<HashSet<String>>,
    counters: Arc<ConnCounters>,
}

/// Whether `value` names gRPC: `application/grpc`, optionally followed by
/// `+codec` or `;parameters`.
fn is_grpc_content_type(value: &[u8]) -> bool {
    let Some(rest) = value.strip_prefix(b"application/grpc") else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+') | Some(b';'))
}

/// The answer to a request that is not gRPC: HTTP 415, with a gRPC status
/// for gRPC clients that sent a wrong type.
fn unsupported_media_type(content_type: Option<&http::HeaderValue>) -> http::Response<Body> {
    let shown = content_type.map_or_else(
        || "none".to_string(),
        |v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
    );
    let mut response = Status::invalid_argument(format!(
        "content-type: {shown} is not application/grpc; this is a gRPC server"
    ))
    .into_http::<Body>();
    *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response
}

impl<S> Service<http::Request<Body>> for GrpcGuard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let info = req.extensions().get::<ConnInfo>().cloned();
        let guard = info.as_ref().map(|i| i.conn.call_started());
        if let Some(info) = info {
            if let Some(tcp) = info.tcp {
                req.extensions_mut().insert(tcp);
            }
            if let Some(uds) = info.uds {
                req.extensions_mut().insert(uds);
            }
        }
        let content_type = req.headers().get(http::header::CONTENT_TYPE);
        if !content_type.is_some_and(|v| is_grpc_content_type(v.as_bytes())) {
            self.counters.malformed(Malformed::ContentType);
            tracing::debug!(path = req.uri().path(), content_type = ?content_type, "request refused: not gRPC (HTTP 415)");
            let response = unsupported_media_type(content_type);
            return Box::pin(async move { Ok(response) });
        }
        if self.one_message.contains(req.uri().path()) {
            let counters = Arc::clone(&self.counters);
            req = req.map(|body| Body::new(OneMessage::new(body, counters)));
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that holds its call open (for the idle timeout) until it
/// ends or is dropped.
struct Guarded {
    inner: Body,
    _guard: CallGuard,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// gRPC length-prefixed message framing: a flag byte and a 4-byte length.
const MESSAGE_HEADER_BYTES: usize = 5;

/// A request body that must carry one gRPC message: the first byte of a
/// second one ends it with INVALID_ARGUMENT (which tonic answers with).
struct OneMessage {
    inner: Body,
    /// Bytes of the current message's header seen, and its length so far.
    header_seen: usize,
    length: u64,
    /// Payload bytes of the current message still to come.
    payload_left: u64,
    messages: u32,
    refused: bool,
    counters: Arc<ConnCounters>,
}

impl OneMessage {
    fn new(inner: Body, counters: Arc<ConnCounters>) -> Self {
        OneMessage {
            inner,
            header_seen: 0,
            length: 0,
            payload_left: 0,
            messages: 0,
            refused: false,
            counters,
        }
    }

    /// Walks the framing of `data`; false once a second message begins.
    fn scan(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left.min(data.len() as u64)) as usize;
                data = &data[n..];
                self.payload_left -= n as u64;
                continue;
            }
            if self.header_seen == 0 {
                if self.messages >= 1 {
                    return false;
                }
                self.messages += 1;
                self.length = 0;
            }
            if self.header_seen >= 1 {
                self.length = (self.length << 8) | u64::from(data[0]);
            }
            self.header_seen += 1;
            data = &data[1..];
            if self.header_seen == MESSAGE_HEADER_BYTES {
                self.header_seen = 0;
                self.payload_left = self.length;
            }
        }
        true
    }
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && !self.scan(data.chunk())
        {
            self.refused = true;
            self.counters.malformed(Malformed::UnaryMessages);
            tracing::debug!("request refused: a second message on a one-message call");
            return Poll::Ready(Some(Err(Status::invalid_argument(
                "request: this method takes exactly one request message; a second one was sent",
            ))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for OneMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneMessage")
            .field("messages", &self.messages)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend(len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    fn accepts(wire: &[u8], chunk: usize) -> bool {
        let mut m = OneMessage::new(Body::empty(), Arc::default());
        wire.chunks(chunk.max(1)).all(|c| m.scan(c))
    }

    #[test]
    fn one_message_passes_two_do_not() {
        let one = message(300);
        let mut two = message(300);
        two.extend(message(0));
        let mut empty_two = message(0);
        empty_two.extend(message(0));
        for chunk in [1, 2, 5, 6, 299, 1000] {
            assert!(accepts(&one, chunk));
            assert!(accepts(&message(0), chunk));
            assert!(!accepts(&two, chunk), "chunk {chunk}");
            assert!(!accepts(&empty_two, chunk), "chunk {chunk}");
        }
        // One trailing byte of a second message is enough.
        let mut started = message(10);
        started.push(0);
        assert!(!accepts(&started, 3));
    }

    #[test]
    fn grpc_content_types() {
        for ok in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc_content_type(ok));
        }
        for bad in [
            &b"text/plain"[..],
            b"application/grpc-web",
            b"application/grpcx",
            b"",
            b"application/json",
        ] {
            assert!(!is_grpc_content_type(bad));
        }
    }

    #[test]
    fn the_kvstrata_and_health_methods_that_take_one_message() {
        let paths = one_message_methods(&[
            kvstrata_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ]);
        for p in [
            "/kvstrata.v1.KvCache/Stats",
            "/kvstrata.v1.KvCache/BatchPut",
            "/kvstrata.v1.KvCache/GetStream",
            "/kvstrata.v1.KvCache/Watch",
            "/sglang.runtime.hicache.StorageServer/BatchGet",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
        ] {
            assert!(paths.contains(p), "{p} missing from {paths:?}");
        }
        assert!(!paths.contains("/kvstrata.v1.KvCache/PutStream"));
    }
}
