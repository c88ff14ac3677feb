//! `BatchGet` and `BatchPut` with inline payloads, framed by hand so that
//! no payload is copied on the client.
//!
//! tonic's generated client encodes a request by copying the whole message
//! into one buffer, and decodes an answer by first copying every HTTP/2
//! `DATA` frame of it into another. Here:
//!
//! - a `BatchPut` is written as a list of chunks: the protobuf field headers
//!   are encoded around each payload, and each payload of 8 KiB or more is
//!   handed to hyper as the caller's own [`Bytes`] (h2 writes it with
//!   `writev(2)`, in a `DATA` frame of its own, which the daemon decodes in
//!   place). The bytes on the wire are exactly prost's encoding of the same
//!   message (`kvstrata_proto::codec::encode_put_request` is tested against it), so any gRPC
//!   server decodes them;
//! - a `BatchGet` answer is decoded over the frames as they came
//!   ([`kvstrata_proto::codec::decode_grpc_message`]): the daemon sends each
//!   block as a frame of its own, so a block's `payload` is the frame
//!   itself, and the only copy on the client is the kernel's.
//!
//! Both calls are ordinary gRPC unary calls on the same channel (the same
//! headers, deadline and metadata, the channel's interceptors); only the
//! encoding and decoding differ.

use std::collections::VecDeque;
use std::future::poll_fn;

use bytes::{Buf, Bytes};
use http_body::Body;
use kvstrata_proto::codec::{decode_grpc_message, encode_put_request, grpc_frame};
use kvstrata_proto::v1 as pb;
use tonic::Status;
use tonic::client::GrpcService;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;

/// The path of `BatchGet`.
const BATCH_GET_PATH: &str = "/kvstrata.v1.KvCache/BatchGet";
/// The path of `BatchPut`.
const BATCH_PUT_PATH: &str = "/kvstrata.v1.KvCache/BatchPut";

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
    let body = vec![grpc_frame(&message)];
    let (metadata, chunks) = unary(service, BATCH_GET_PATH, metadata, extensions, body).await?;
    let message: pb::BatchGetResponse = decode_grpc_message(chunks, max_message_bytes)?;
    Ok(tonic::Response::from_parts(
        metadata,
        message,
        tonic::Extensions::new(),
    ))
}

/// One `BatchPut` on `service`, each payload of 8 KiB or more sent as it is
/// (no copy). The answer is decoded as in [`batch_get`].
pub async fn batch_put<S>(
    service: &mut S,
    request: tonic::Request<pb::BatchPutRequest>,
    max_message_bytes: usize,
) -> Result<tonic::Response<pb::BatchPutResponse>, Status>
where
    S: GrpcService<tonic::body::Body>,
    <S::ResponseBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (metadata, extensions, message) = request.into_parts();
    let body = encode_put_request(&message)?;
    let (metadata, chunks) = unary(service, BATCH_PUT_PATH, metadata, extensions, body).await?;
    let message: pb::BatchPutResponse = decode_grpc_message(chunks, max_message_bytes)?;
    Ok(tonic::Response::from_parts(
        metadata,
        message,
        tonic::Extensions::new(),
    ))
}

/// One unary call of `path` whose request message is `body` (its chunks,
/// gRPC header included). Returns the answer's metadata (headers and
/// trailers, as tonic merges them) and its message chunks as they came;
/// an answer whose status is not OK is that status.
async fn unary<S>(
    service: &mut S,
    path: &'static str,
    metadata: MetadataMap,
    extensions: tonic::Extensions,
    body: Vec<Bytes>,
) -> Result<(MetadataMap, Vec<Bytes>), Status>
where
    S: GrpcService<tonic::body::Body>,
    <S::ResponseBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut req = http::Request::new(tonic::body::Body::new(ChunkBody(body.into())));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(path);
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
    // As tonic does: the trailers join the headers in the metadata.
    let mut headers = parts.headers;
    if let Some(t) = trailers {
        headers.extend(t);
    }
    Ok((MetadataMap::from_headers(headers), chunks))
}

/// A request body of ready chunks.
struct ChunkBody(VecDeque<Bytes>);

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        std::task::Poll::Ready(
            self.get_mut()
                .0
                .pop_front()
                .map(|b| Ok(http_body::Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

/// Lets a process that receives blocks through these calls reuse freed
/// HTTP/2 frame buffers instead of faulting in fresh pages for each answer
/// (glibc's mmap and trim thresholds raised for the whole process; see
/// [`kvstrata_proto::frame_buffers`]). Call it once at start-up.
pub use kvstrata_proto::frame_buffers::keep_freed_frame_buffers;
