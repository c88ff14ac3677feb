//! `BatchGet` with inline payloads, decoded where the bytes arrived.
//!
//! tonic's generated client copies every HTTP/2 `DATA` frame of an answer
//! into one buffer before prost decodes it. The daemon sends each block of a
//! BatchGet answer as a frame of its own, so here the frames are kept as
//! they came and the answer is decoded over them
//! ([`kvstrata_proto::codec::decode_grpc_message`]): a block's `payload` is
//! the frame itself, and the only copy on the client is the kernel's.
//!
//! The call is an ordinary gRPC unary call on the same channel (the same
//! headers, deadline and metadata, the channel's interceptors); only the
//! decoding differs.

use std::future::poll_fn;

use bytes::{Buf, Bytes};
use http_body::Body;
use kvstrata_proto::codec::{decode_grpc_message, grpc_frame};
use kvstrata_proto::v1 as pb;
use tonic::Status;
use tonic::client::GrpcService;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;

/// The path of `BatchGet`.
const BATCH_GET_PATH: &str = "/kvstrata.v1.KvCache/BatchGet";

/// One `BatchGet` on `service` (a [`tonic::transport::Channel`], possibly
/// wrapped in interceptors), its answer decoded in place. Answers larger than
/// `max_message_bytes` are refused as tonic refuses them.
pub async fn batch_get<S>(
    service: &mut S,
    request: tonic::Request<pb::BatchGetRequest>,
    max_message_bytes: usize,
) -> Result<tonic::Response<pb::BatchGetResponse>, Status>
where
    S: GrpcService<tonic::body::Body>,
    <S::ResponseBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (metadata, extensions, message) = request.into_parts();
    let mut req = http::Request::new(tonic::body::Body::new(OneChunk(Some(grpc_frame(&message)))));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(BATCH_GET_PATH);
    *req.version_mut() = http::Version::HTTP_2;
    *req.extensions_mut() = extensions;
    let headers = req.headers_mut();
    *headers = metadata.into_headers();
    headers.insert("te", http::HeaderValue::from_static("trailers"));
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );

    poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = service
        .call(req)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(Status::from_header_map(&parts.headers).unwrap_or_else(|| {
            Status::unknown(format!(
                "HTTP status {} without a gRPC status",
                parts.status
            ))
        }));
    }
    // A trailers-only answer (an error) carries the status in the headers.
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let mut body = std::pin::pin!(body);
    let mut chunks = Vec::new();
    let mut trailers = None;
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        match frame.into_data() {
            Ok(mut data) => chunks.push(data.copy_to_bytes(data.remaining())),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let status = trailers
        .as_ref()
        .and_then(Status::from_header_map)
        .or_else(|| Status::from_header_map(&parts.headers));
    match status {
        Some(s) if s.code() == tonic::Code::Ok => {}
        Some(s) => return Err(s),
        None => return Err(Status::internal("the answer ended without a grpc-status")),
    }
    let message: pb::BatchGetResponse = decode_grpc_message(chunks, max_message_bytes)?;
    // As tonic does: the trailers join the headers in the metadata.
    let mut headers = parts.headers;
    if let Some(t) = trailers {
        headers.extend(t);
    }
    Ok(tonic::Response::from_parts(
        MetadataMap::from_headers(headers),
        message,
        tonic::Extensions::new(),
    ))
}

/// A request body of one chunk.
struct OneChunk(Option<Bytes>);

impl Body for OneChunk {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        std::task::Poll::Ready(
            self.get_mut()
                .0
                .take()
                .map(|b| Ok(http_body::Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}
