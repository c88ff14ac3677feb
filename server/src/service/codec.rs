//! The inline data path of `BatchGet` and `BatchPut`, framed by hand so that
//! block payloads are not copied between the host tier and the socket.
//!
//! tonic's generated server decodes a request by first copying every body
//! chunk into one buffer, and encodes a response by copying the whole message
//! into another (which it grows as it goes). For a BatchGet of four 1 MiB
//! blocks that is 4 MiB copied, plus the buffer's regrowth, on a path that
//! should copy nothing: the host tier already hands out its blocks as
//! [`Bytes`] that borrow the slot.
//!
//! [`InlinePath`] sits in front of the generated `KvCacheServer` and takes
//! these two methods over at the HTTP/2 level:
//!
//! - the request body's chunks (each one HTTP/2 `DATA` frame, already a
//!   `Bytes` of hyper's read buffer) are gathered without a copy and the
//!   message is decoded over them: a payload that lies in one chunk (a
//!   message inside one frame — the daemon allows 16 MiB frames — or a
//!   payload the client sent as a frame of its own, as
//!   `kvstrata_client::inline` does) is a slice of the read buffer, so the
//!   host tier's copy into its slot is the only one;
//! - a BatchGet response is written as a list of chunks: the protobuf field
//!   headers are encoded around each payload, and the payloads themselves —
//!   the tier's own `Bytes` — go to hyper untouched, which hands them to
//!   `writev(2)`. The bytes on the wire are exactly prost's encoding of the
//!   same message ([`encode_get_response`] is tested against it), so every
//!   stock gRPC client decodes them.
//!
//! Everything else stays as tonic does it: the request still passes the
//! guard, auth and limits layers first; the handler is the service's own
//! [`KvCache::batch_get`] / [`KvCache::batch_put`] (metrics, tenancy and
//! validation unchanged); decoding failures answer with tonic's statuses (the
//! limits layer turns them into `INVALID_ARGUMENT`); a compressed request is
//! passed to the generated server, which answers it as before.
//!
//! A block being sent holds its tier read guard (like a lease) until hyper
//! has written it or the stream is dropped (client reset or disconnect).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::buf::Take;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use kvstrata_proto::codec::{
    COPY_BELOW_BYTES, Chunks, GRPC_HEADER_BYTES, SplitElement, split_field_chunks, split_field_len,
};
use kvstrata_proto::v1 as pb;
use kvstrata_proto::v1::kv_cache_server::{KvCache, KvCacheServer};
use prost::Message;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Status, body::Body as TonicBody};
use tower::Service;

use super::KvCacheService;

/// The path of `BatchGet`.
pub const BATCH_GET_PATH: &str = "/kvstrata.v1.KvCache/BatchGet";
/// The path of `BatchPut`.
pub const BATCH_PUT_PATH: &str = "/kvstrata.v1.KvCache/BatchPut";

/// Protobuf tag of `BatchGetResponse.results` (field 1, length-delimited).
const RESULTS_TAG: u8 = 1 << 3 | 2;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether the daemon runs with `KVSTRATA_GRPC_PATH=tonic`: BatchGet and
/// BatchPut then go through tonic's generated code, and Unix-socket
/// connections keep the kernel's default buffers — the inline path as it
/// was before this module, kept for side-by-side benchmarks
/// (`BASELINE=1 benches/loopback.sh`) and as a fallback.
pub fn tonic_path_requested() -> bool {
    static REQUESTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REQUESTED.get_or_init(|| std::env::var("KVSTRATA_GRPC_PATH").is_ok_and(|v| v == "tonic"))
}

/// The KvCache service with [`InlinePath`] in front: what the daemon serves
/// on its KvCache listeners. `max_message_bytes` bounds decoded requests and
/// encoded responses, as on the generated server.
pub fn kv_cache_service(
    service: KvCacheService,
    max_message_bytes: usize,
) -> InlinePath<KvCacheServer<KvCacheService>> {
    let generated = KvCacheServer::new(service.clone())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let mut path = InlinePath::new(generated, service, max_message_bytes);
    if tonic_path_requested() {
        tracing::info!(
            "KVSTRATA_GRPC_PATH=tonic: BatchGet and BatchPut use tonic's generated code"
        );
        path.enabled = false;
    }
    path
}

/// Serves `BatchGet` and `BatchPut` without copying payloads; every other
/// request goes to `inner` (the generated server).
#[derive(Clone)]
pub struct InlinePath<S> {
    inner: S,
    service: KvCacheService,
    max_message_bytes: usize,
    /// False: every request goes to `inner`.
    enabled: bool,
}

impl<S> InlinePath<S> {
    pub fn new(inner: S, service: KvCacheService, max_message_bytes: usize) -> Self {
        InlinePath {
            inner,
            service,
            max_message_bytes,
            enabled: true,
        }
    }
}

impl<S: NamedService> NamedService for InlinePath<S> {
    const NAME: &'static str = S::NAME;
}

/// The two methods [`InlinePath`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Put,
}

impl<S, B> Service<http::Request<B>> for InlinePath<S>
where
    S: Service<http::Request<B>, Response = http::Response<TonicBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<TonicBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = match req.uri().path() {
            BATCH_GET_PATH if self.enabled => Method::Get,
            BATCH_PUT_PATH if self.enabled => Method::Put,
            _ => return Box::pin(self.inner.call(req)),
        };
        // A compressed request (any grpc-encoding) is the generated
        // server's: it knows which encodings it accepts.
        if req.headers().contains_key("grpc-encoding") {
            return Box::pin(self.inner.call(req));
        }
        let service = self.service.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            let answer = match method {
                Method::Get => serve_get(service, req, max).await,
                Method::Put => serve_put(service, req, max).await,
            };
            Ok(answer.unwrap_or_else(|status| status.into_http()))
        })
    }
}

async fn serve_get<B>(
    service: KvCacheService,
    req: http::Request<B>,
    max: usize,
) -> Result<http::Response<TonicBody>, Status>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let request = read_request::<pb::BatchGetRequest, B>(req, max).await?;
    let response = service.batch_get(request).await?;
    let (metadata, message, extensions) = response.into_parts();
    let chunks = encode_get_response(&message, max)?;
    Ok(grpc_response(metadata, extensions, chunks))
}

async fn serve_put<B>(
    service: KvCacheService,
    req: http::Request<B>,
    max: usize,
) -> Result<http::Response<TonicBody>, Status>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let request = read_request::<pb::BatchPutRequest, B>(req, max).await?;
    let response = service.batch_put(request).await?;
    let (metadata, message, extensions) = response.into_parts();
    let chunks = encode_message(&message, max)?;
    Ok(grpc_response(metadata, extensions, chunks))
}

/// Reads a unary request's one message (and its trailers, as tonic does)
/// and decodes it, payloads in place when the message lies in one chunk.
async fn read_request<M, B>(req: http::Request<B>, max: usize) -> Result<tonic::Request<M>, Status>
where
    M: Message + Default,
    B: Body,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let mut body = std::pin::pin!(body);
    let mut message = MessageReader::new(max);
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        match frame.into_data() {
            Ok(mut data) => message.push(data.copy_to_bytes(data.remaining()))?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    parts.headers.extend(trailers);
                }
            }
        }
    }
    let decoded = M::decode(message.finish()?).map_err(|e| Status::internal(e.to_string()))?;
    Ok(tonic::Request::from_http(http::Request::from_parts(
        parts, decoded,
    )))
}

/// Gathers the first gRPC message of a request body from its chunks,
/// checking its header and length as tonic's decoder does.
#[derive(Debug)]
struct MessageReader {
    max: usize,
    chunks: Vec<Bytes>,
    received: usize,
    /// The message length, once the header is in.
    len: Option<usize>,
}

impl MessageReader {
    fn new(max: usize) -> Self {
        MessageReader {
            max,
            chunks: Vec::new(),
            received: 0,
            len: None,
        }
    }

    fn push(&mut self, chunk: Bytes) -> Result<(), Status> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.received += chunk.len();
        self.chunks.push(chunk);
        if self.len.is_none() && self.received >= GRPC_HEADER_BYTES {
            let mut header = [0u8; GRPC_HEADER_BYTES];
            copy_prefix(&self.chunks, &mut header);
            match header[0] {
                0 => {}
                1 => {
                    return Err(Status::internal(
                        "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                    ));
                }
                f => {
                    return Err(Status::internal(format!(
                        "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
                    )));
                }
            }
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            if len > self.max {
                return Err(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                    self.max
                )));
            }
            self.len = Some(len);
        }
        Ok(())
    }

    /// The message, read over the chunks as they came: prost decodes its
    /// `bytes` fields as slices of the chunk they lie in (a payload the
    /// client sent as a `DATA` frame of its own, or a message inside one
    /// frame, is never copied here); only a field cut across chunks is
    /// copied. Bytes after the first message are left alone, as tonic does
    /// (the guard layer refuses a second message).
    fn finish(self) -> Result<Take<Chunks>, Status> {
        let Some(len) = self.len else {
            return Err(if self.received == 0 {
                Status::internal("Missing request message.")
            } else {
                Status::internal("Unexpected EOF decoding stream.")
            });
        };
        if self.received < GRPC_HEADER_BYTES + len {
            return Err(Status::internal("Unexpected EOF decoding stream."));
        }
        let mut body = Chunks::new(self.chunks);
        body.advance(GRPC_HEADER_BYTES);
        Ok(body.take(len))
    }
}

/// Copies the first `out.len()` bytes of `chunks` (which hold at least that many).
fn copy_prefix(chunks: &[Bytes], out: &mut [u8]) {
    let mut filled = 0;
    for c in chunks {
        let n = c.len().min(out.len() - filled);
        out[filled..filled + n].copy_from_slice(&c[..n]);
        filled += n;
        if filled == out.len() {
            return;
        }
    }
}

/// A small message as one chunk: its gRPC header and prost's encoding.
fn encode_message<M: Message>(message: &M, max: usize) -> Result<Vec<Bytes>, Status> {
    let len = message.encoded_len();
    check_encoded_len(len, max)?;
    let mut buf = BytesMut::with_capacity(GRPC_HEADER_BYTES + len);
    put_grpc_header(&mut buf, len);
    message
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("Error encoding: {e}")))?;
    Ok(vec![buf.freeze()])
}

fn check_encoded_len(len: usize, max: usize) -> Result<(), Status> {
    if len > max || u32::try_from(len).is_err() {
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    Ok(())
}

fn put_grpc_header(buf: &mut BytesMut, len: usize) {
    buf.put_u8(0);
    buf.put_u32(len as u32);
}

/// A `BatchGetResponse` as gRPC message chunks whose concatenation is the
/// gRPC header followed by exactly prost's encoding of `response`; each
/// payload of [`COPY_BELOW_BYTES`] or more is a chunk of its own, the
/// payload `Bytes` itself (no copy). A response without such payloads (gets
/// into pools or KV pages, compact answers, misses, small blocks) is prost's
/// encoding in one chunk.
pub fn encode_get_response(
    response: &pb::BatchGetResponse,
    max: usize,
) -> Result<Vec<Bytes>, Status> {
    if !response
        .results
        .iter()
        .any(|r| r.payload.len() >= COPY_BELOW_BYTES)
    {
        return encode_message(response, max);
    }
    // Each result without its payload, split around where the payload
    // goes: fields 1-2 before it, fields 4-5 after (prost writes fields in
    // tag order and leaves default values out).
    let parts: Vec<SplitElement<'_, pb::GetResult>> = response
        .results
        .iter()
        .map(|r| {
            let head = pb::GetResult {
                key: r.key.clone(),
                found: r.found,
                ..Default::default()
            };
            let tail = pb::GetResult {
                tier: r.tier,
                region_error: r.region_error.clone(),
                ..Default::default()
            };
            (head, tail, &r.payload)
        })
        .collect();
    // Fields 2 to 4 (a compact answer's and an early answer's, empty
    // beside payloads in practice) follow the results, in tag order as
    // prost writes them.
    let rest = pb::BatchGetResponse {
        results: Vec::new(),
        tiers: response.tiers.clone(),
        failed: response.failed.clone(),
        pages_ready_event: response.pages_ready_event.clone(),
    };
    let total = split_field_len(&parts) + rest.encoded_len();
    check_encoded_len(total, max)?;

    let mut small = BytesMut::with_capacity(GRPC_HEADER_BYTES + 128 * parts.len());
    put_grpc_header(&mut small, total);
    let mut chunks = split_field_chunks(small, RESULTS_TAG, &parts);
    if rest.encoded_len() > 0 {
        chunks.push(rest.encode_to_vec().into());
    }
    Ok(chunks)
}

/// A successful unary answer: the handler's metadata as headers, the
/// message chunks, then `grpc-status: 0` in the trailers.
fn grpc_response(
    metadata: tonic::metadata::MetadataMap,
    extensions: tonic::Extensions,
    chunks: Vec<Bytes>,
) -> http::Response<TonicBody> {
    let mut response = http::Response::new(TonicBody::new(ChunkBody::new(chunks)));
    *response.version_mut() = http::Version::HTTP_2;
    *response.headers_mut() = metadata.into_headers();
    // Reserved names a handler may not set (tonic strips them too).
    for h in [
        "te",
        "user-agent",
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
    ] {
        response.headers_mut().remove(h);
    }
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    *response.extensions_mut() = extensions;
    response
}

/// A response body of ready chunks followed by the `grpc-status: 0` trailers.
#[derive(Debug)]
struct ChunkBody {
    chunks: VecDeque<Bytes>,
    trailers_sent: bool,
}

impl ChunkBody {
    fn new(chunks: Vec<Bytes>) -> Self {
        ChunkBody {
            chunks: chunks.into(),
            trailers_sent: false,
        }
    }
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if this.trailers_sent {
            return Poll::Ready(None);
        }
        this.trailers_sent = true;
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers_sent
    }

    fn size_hint(&self) -> SizeHint {
        let n: usize = self.chunks.iter().map(Bytes::len).sum();
        SizeHint::with_exact(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn joined(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    fn framed(message: &impl Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut v = vec![0u8];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend(body);
        v
    }

    fn result(key: &[u8], found: bool, payload: Vec<u8>, tier: i32, err: &str) -> pb::GetResult {
        pb::GetResult {
            key: Bytes::copy_from_slice(key),
            found,
            payload: payload.into(),
            tier,
            region_error: err.to_string(),
        }
    }

    #[test]
    fn large_payloads_are_their_own_chunks_and_not_copied() {
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let response = pb::BatchGetResponse {
            results: vec![
                pb::GetResult {
                    key: Bytes::from_static(b"a"),
                    found: true,
                    payload: big.clone(),
                    tier: pb::Tier::Host as i32,
                    region_error: String::new(),
                },
                result(b"b", false, Vec::new(), 0, ""),
            ],
            ..Default::default()
        };
        let chunks = encode_get_response(&response, usize::MAX).unwrap();
        assert_eq!(joined(&chunks), framed(&response));
        let sent = chunks.iter().find(|c| c.len() == big.len()).unwrap();
        assert_eq!(
            sent.as_ptr(),
            big.as_ptr(),
            "the payload is the tier's own bytes"
        );
        assert_eq!(
            pb::BatchGetResponse::decode(&joined(&chunks)[GRPC_HEADER_BYTES..]).unwrap(),
            response
        );
    }

    #[test]
    fn limits_and_empty_responses() {
        let empty = pb::BatchGetResponse::default();
        assert_eq!(
            joined(&encode_get_response(&empty, 0).unwrap()),
            vec![0, 0, 0, 0, 0]
        );
        let one = pb::BatchGetResponse {
            results: vec![result(b"k", true, vec![1; 100], 2, "")],
            ..Default::default()
        };
        let e = encode_get_response(&one, 50).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().contains("too large"), "{e:?}");
    }

    #[test]
    fn a_message_split_over_chunks_decodes_and_whole_payloads_are_not_copied() {
        let msg = pb::BatchPutRequest {
            namespace_id: Bytes::from_static(&[9; 16]),
            items: vec![
                pb::PutItem {
                    key: Bytes::from_static(b"key"),
                    payload: Bytes::from(vec![3u8; 40_000]),
                    ..Default::default()
                },
                pb::PutItem {
                    key: Bytes::from_static(b"key2"),
                    parent: Bytes::from_static(b"key"),
                    payload: Bytes::from(vec![4u8; 30_000]),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let wire = Bytes::from(framed(&msg));
        for cut in [1, 4, 5, 6, 100, 20_000, wire.len() - 1] {
            let mut r = MessageReader::new(1 << 20);
            r.push(wire.slice(..cut)).unwrap();
            r.push(wire.slice(cut..)).unwrap();
            let got = pb::BatchPutRequest::decode(r.finish().unwrap()).unwrap();
            assert_eq!(got, msg, "cut at {cut}");
        }
        // Cut around each payload (as the inline client frames a put):
        // every payload is a slice of its own chunk.
        let at = |p: &[u8]| {
            wire.windows(p.len().min(64))
                .position(|w| w == &p[..p.len().min(64)])
                .unwrap()
        };
        let (p0, p1) = (at(&msg.items[0].payload), at(&msg.items[1].payload));
        let cuts = [0, p0, p0 + 40_000, p1, p1 + 30_000, wire.len()];
        let pieces: Vec<Bytes> = cuts.windows(2).map(|w| wire.slice(w[0]..w[1])).collect();
        let mut r = MessageReader::new(1 << 20);
        for p in &pieces {
            r.push(p.clone()).unwrap();
        }
        let got = pb::BatchPutRequest::decode(r.finish().unwrap()).unwrap();
        assert_eq!(got, msg);
        for (item, piece) in got.items.iter().zip([&pieces[1], &pieces[3]]) {
            assert_eq!(item.payload.as_ptr(), piece.as_ptr(), "decoded in place");
        }
        // One chunk: the payload is a slice of it.
        let mut r = MessageReader::new(1 << 20);
        r.push(wire.clone()).unwrap();
        let got = pb::BatchPutRequest::decode(r.finish().unwrap()).unwrap();
        let p = &got.items[0].payload;
        let inside = wire.as_ptr_range();
        assert!(inside.contains(&p.as_ptr()), "decoded in place");
        // Bytes after the message are not part of it.
        let mut r = MessageReader::new(1 << 20);
        r.push(wire.clone()).unwrap();
        r.push(Bytes::from_static(&[0, 0, 0, 0, 1, 7])).unwrap();
        let got = pb::BatchPutRequest::decode(r.finish().unwrap()).unwrap();
        assert_eq!(got, msg);
    }

    #[test]
    fn bad_headers_get_tonics_statuses() {
        let mut r = MessageReader::new(10);
        let e = r.push(Bytes::from_static(&[0, 0, 0, 0, 11])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let mut r = MessageReader::new(10);
        let e = r.push(Bytes::from_static(&[1, 0, 0, 0, 1])).unwrap_err();
        assert!(e.message().starts_with("protocol error:"), "{e:?}");
        let e = MessageReader::new(10).finish().unwrap_err();
        assert_eq!(e.message(), "Missing request message.");
        let mut r = MessageReader::new(10);
        r.push(Bytes::from_static(&[0, 0, 0, 0, 3, 1])).unwrap();
        assert_eq!(
            r.finish().unwrap_err().message(),
            "Unexpected EOF decoding stream."
        );
        let mut r = MessageReader::new(10);
        r.push(Bytes::from_static(&[0, 0])).unwrap();
        assert_eq!(
            r.finish().unwrap_err().message(),
            "Unexpected EOF decoding stream."
        );
    }

    fn arb_result() -> impl Strategy<Value = pb::GetResult> {
        (
            proptest::collection::vec(any::<u8>(), 0..70),
            any::<bool>(),
            prop_oneof![
                Just(0usize),
                1usize..64,
                COPY_BELOW_BYTES - 2..COPY_BELOW_BYTES + 2,
                20_000usize..70_000,
            ],
            prop_oneof![Just(0i32), 0i32..5, any::<i32>()],
            prop_oneof![Just(String::new()), "[a-z ]{1,40}"],
            any::<u8>(),
        )
            .prop_map(|(key, found, len, tier, err, fill)| {
                result(&key, found, vec![fill; len], tier, &err)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The chunks are byte for byte prost's encoding of the same
        /// message, which prost (a stock decoder) reads back unchanged.
        #[test]
        fn chunks_are_prosts_encoding(
            results in proptest::collection::vec(arb_result(), 0..6),
            tiers in proptest::collection::vec(prop_oneof![0i32..5, any::<i32>()], 0..4),
            failed in proptest::collection::vec((any::<u32>(), "[a-z ]{0,20}"), 0..3),
            event in prop_oneof![Just(Vec::new()), proptest::collection::vec(any::<u8>(), 64)],
        ) {
            let failed = failed
                .into_iter()
                .map(|(index, message)| pb::FailedKey { index, message })
                .collect();
            let response = pb::BatchGetResponse {
                results,
                tiers,
                failed,
                pages_ready_event: event.into(),
            };
            let chunks = encode_get_response(&response, usize::MAX).unwrap();
            let wire = joined(&chunks);
            prop_assert_eq!(&wire, &framed(&response));
            let decoded = pb::BatchGetResponse::decode(&wire[GRPC_HEADER_BYTES..]).unwrap();
            prop_assert_eq!(decoded, response);
        }
    }
}
