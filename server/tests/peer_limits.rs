//! The request layer in front of the `KvCache` service (server/src/limits.rs)
//! against a real daemon and the real client: the per-peer share of the
//! in-flight cap (`server.max_inflight_per_peer`) — one client holding its
//! whole share in idle `PutStream`s leaves room for every other client — and
//! request messages that do not decode, answered `INVALID_ARGUMENT`.
//!
//! Each test prints its counts (`eprintln!`) for docs/reliability.md.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use kvstrata_client::{Client, ClientOptions};
use kvstrata_proto::v1 as pb;
use kvstrata_server::Daemon;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

/// Requests one peer may have in flight in these tests.
const SHARE: usize = 3;

/// An idle `PutStream`: the call is open, no batch sent yet. Dropping the
/// sender ends the client's half of the stream.
struct IdleStream {
    tx: mpsc::Sender<pb::BatchPutRequest>,
    answers: tonic::Streaming<pb::BatchPutResponse>,
}

async fn idle_put_stream(c: &Client) -> Result<IdleStream, tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    let answers = c
        .raw()
        .put_stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(IdleStream { tx, answers })
}

async fn metrics_text(d: &Daemon) -> String {
    let out = common::metrics_text(d).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// Waits until the in-flight gauge reads `n`.
async fn wait_in_flight(d: &Daemon, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = common::metric_value(&metrics_text(d).await, "kvstrata_requests_in_flight");
        if v == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in-flight gauge stuck at {v}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP client whose connection comes from `source` (another peer than
/// 127.0.0.1), or `None` when this host cannot bind that address.
async fn client_from(target: &str, source: IpAddr) -> Option<Client> {
    if std::net::TcpListener::bind((source, 0)).is_err() {
        return None;
    }
    let channel = tonic::transport::Endpoint::from_shared(target.to_string())
        .expect("endpoint")
        .local_address(Some(source))
        .connect()
        .await
        .ok()?;
    Some(Client::from_channel(channel, ClientOptions::default()))
}

fn assert_peer_refusal(e: &kvstrata_client::ClientError, who: &str) {
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("per-peer limit")
            && msg.contains(who)
            && msg.contains(&format!("has {SHARE} requests in flight"))
            && msg.contains("server.max_inflight_per_peer"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holding_its_share_leaves_room_for_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::config(dir.path(), 8 << 20, 64);
    config.server.max_inflight_requests = 8;
    config.server.max_inflight_per_peer = SHARE;
    let d = Daemon::start(config).await.expect("daemon starts");
    let tcp_target = d.addrs().tcp_target().expect("tcp");
    // Peer A: this process on the Unix socket. Peer B: 127.0.0.1 over TCP.
    let a = Client::connect(&d.addrs().uds_target().expect("uds"))
        .await
        .expect("uds connect");
    let b = Client::connect(&tcp_target).await.expect("tcp connect");
    let (ns, len) = common::register(&a, "peer-limits").await;

    // A opens its whole share of idle PutStreams; its next call is refused
    // at once with the per-peer message, whatever the call.
    let mut streams = Vec::new();
    for _ in 0..SHARE {
        streams.push(idle_put_stream(&a).await.expect("stream within the share"));
    }
    wait_in_flight(&d, SHARE as f64).await;
    let me = format!("pid {}", std::process::id());
    let t0 = Instant::now();
    let e = a.stats().await.expect_err("A is at its share");
    let took = t0.elapsed();
    assert_peer_refusal(&e, &me);
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    let e = idle_put_stream(&a)
        .await
        .err()
        .expect("a stream past the share is refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("per-peer limit"), "{e}");

    // B is served, byte for byte, while A holds its share.
    b.stats().await.expect("B is served");
    common::put(&b, &ns, "b1", None, len).await;
    assert!(common::present(&b, &ns, "b1", len).await);
    // B takes its own share too, and meets its own limit alone.
    for _ in 0..SHARE {
        streams.push(idle_put_stream(&b).await.expect("B's stream"));
    }
    wait_in_flight(&d, (2 * SHARE) as f64).await;
    assert_peer_refusal(
        &b.stats().await.expect_err("B is at its share"),
        "127.0.0.1",
    );

    // A third peer (127.0.0.2 over TCP) is still served with 6 of 8 slots
    // held; the daemon-wide cap is what's left between them.
    let third = client_from(&tcp_target, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await;
    match &third {
        Some(c) => {
            c.stats().await.expect("a third peer is served");
            assert!(common::present(c, &ns, "b1", len).await);
        }
        None => eprintln!("peer_limits: cannot bind 127.0.0.2 here; third peer skipped"),
    }

    let text = metrics_text(&d).await;
    let refused = common::metric_value(
        &text,
        "kvstrata_requests_rejected_total{reason=\"peer_limit\"}",
    );
    assert_eq!(refused, 3.0, "{text}");
    assert_eq!(
        common::metric_value(
            &text,
            "kvstrata_requests_rejected_total{reason=\"overloaded\"}"
        ),
        0.0
    );
    assert_eq!(
        common::metric_value(&text, "kvstrata_requests_in_flight"),
        (2 * SHARE) as f64
    );

    // The clients end their streams: each ends cleanly with no answer, every
    // slot comes back, and A is served again.
    for mut s in streams {
        drop(s.tx);
        let end = tokio::time::timeout(Duration::from_secs(10), s.answers.next())
            .await
            .expect("stream ends");
        assert!(end.is_none(), "{end:?}");
    }
    wait_in_flight(&d, 0.0).await;
    a.stats().await.expect("A is served once its streams ended");
    eprintln!(
        "peer_limits: share {SHARE} of 8; A (Unix socket) and B (127.0.0.1) held {SHARE} idle PutStreams each; \
         {refused} calls refused (peer_limit) in {took:?} or less; third peer served: {}; in-flight gauge back to 0",
        third.is_some()
    );
    drop((a, b, third));
    d.shutdown().await.expect("clean shutdown");
}

/// Sends and receives message bodies as they are, to put bytes that do not
/// decode on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Field 1 as a varint: every request whose field 1 is `bytes`
/// (`namespace_id`) fails to decode it.
const BAD_FIELD_1: &[u8] = &[0x08, 0x05];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_request_is_invalid_argument_naming_the_field() {
    let d = common::start(8 << 20).await;
    let channel = tonic::transport::Endpoint::from_shared(d.daemon().addrs().tcp_target().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);

    // A unary call: refused before the handler runs.
    grpc.ready().await.unwrap();
    let e = grpc
        .unary(
            tonic::Request::new(Bytes::from_static(BAD_FIELD_1)),
            PathAndQuery::from_static("/kvstrata.v1.KvCache/BatchGet"),
            RawCodec,
        )
        .await
        .expect_err("does not decode");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .starts_with("request: the BatchGet request does not decode")
            && e.message().contains("BatchGetRequest.namespace_id"),
        "{e:?}"
    );
    let unary = e.message().to_string();

    // A server stream (Watch): the same, before the stream starts.
    grpc.ready().await.unwrap();
    let e = grpc
        .server_streaming(
            tonic::Request::new(Bytes::from_static(BAD_FIELD_1)),
            PathAndQuery::from_static("/kvstrata.v1.KvCache/Watch"),
            RawCodec,
        )
        .await
        .expect_err("does not decode");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("WatchRequest.namespace_id"), "{e:?}");

    // A PutStream: its handler runs first and reads the batches itself, so
    // the bad one ends the stream with INVALID_ARGUMENT in its trailers.
    let msgs = tokio_stream::iter(vec![Bytes::from_static(BAD_FIELD_1)]);
    grpc.ready().await.unwrap();
    let mut answers = grpc
        .streaming(
            tonic::Request::new(msgs),
            PathAndQuery::from_static("/kvstrata.v1.KvCache/PutStream"),
            RawCodec,
        )
        .await
        .expect("stream starts")
        .into_inner();
    let e = answers.message().await.expect_err("the bad batch ends it");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .starts_with("request: the PutStream request does not decode")
            && e.message().contains("BatchPutRequest.namespace_id"),
        "{e:?}"
    );
    // The daemon serves on.
    d.tcp.stats().await.expect("served after");
    eprintln!("undecodable: INVALID_ARGUMENT {unary:?}");
    d.stop().await;
}
