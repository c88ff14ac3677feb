//! The inline BatchGet / BatchPut path (server/src/service/codec.rs) against a
//! real daemon: large blocks byte for byte over TCP and the Unix socket, a
//! stock HTTP/2 client decoding the hand-framed response with prost (and
//! finding it byte-identical to prost's own encoding), the errors tonic would
//! give, and a grpc-core style request whose `:authority` is a socket path,
//! sent in raw frames with a large DATA frame over the Unix socket; a put
//! whose message arrives in many DATA frames (the client library's framing
//! around each payload, and odd cuts) stored byte for byte.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use common::*;
use kvstrata_client::PutItem;
use kvstrata_proto::v1 as pb;
use kvstrata_types::{Dtype, NamespaceId, NamespaceSpec};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// 16 layers × 2 × 16 tokens × 8 heads × 128 dims × 2 bytes = 1 MiB blocks.
fn mib_spec(model: &str) -> NamespaceSpec {
    NamespaceSpec::layer_major(model, 16, 8, 128, Dtype::F16, 16)
}

const MIB: usize = 1 << 20;

#[tokio::test]
async fn large_blocks_round_trip_byte_for_byte_over_both_transports() {
    let t = start(64 << 20).await;
    let r = t.uds.register_namespace(&mib_spec("inline")).await.unwrap();
    assert_eq!(r.block_bytes as usize, MIB);
    let ns = r.id;
    // Written over one transport, read over both; then overwritten over the other.
    for (round, (writer, name)) in [(&t.uds, "uds"), (&t.tcp, "tcp")].into_iter().enumerate() {
        let keys: Vec<String> = (0..4).map(|i| format!("{name}-{i}")).collect();
        let items: Vec<PutItem> = keys
            .iter()
            .map(|k| PutItem::new(Bytes::from(k.clone()), payload(k, round as u32, MIB)))
            .collect();
        let put = writer.batch_put(&ns, items).await.unwrap();
        assert_eq!(put.stored, 4, "{name}");
        assert!(
            put.results
                .iter()
                .all(|s| *s == pb::PutStatus::Stored as i32)
        );
        let mut asked: Vec<String> = keys.clone();
        asked.insert(2, "absent".into());
        for reader in [&t.tcp, &t.uds] {
            let got = reader.batch_get(&ns, &asked).await.unwrap();
            assert_eq!(got.len(), 5);
            for (k, g) in asked.iter().zip(&got) {
                assert_eq!(g.key, Bytes::from(k.clone()));
                if k == "absent" {
                    assert!(!g.found && g.payload.is_empty() && g.tier == 0);
                    continue;
                }
                assert!(g.found, "{k}");
                assert_eq!(g.tier, pb::Tier::Host as i32);
                assert!(g.payload == payload(k, round as u32, MIB), "bytes of {k}");
            }
        }
    }
    // Small and large blocks side by side in one namespace of small blocks:
    // payloads under the copy threshold share a chunk with their framing.
    let (small, bb) = register(&t.tcp, "inline-small").await;
    put(&t.uds, &small, "s", None, bb).await;
    assert!(present(&t.tcp, &small, "s", bb).await);
    assert!(present(&t.uds, &small, "s", bb).await);
    t.stop().await;
}

/// A raw HTTP/2 call on `addr`: the response headers, its DATA bytes and
/// its trailers.
async fn raw_unary(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
) -> (http::response::Parts, Vec<u8>, Option<http::HeaderMap>) {
    raw_unary_frames(addr, path, vec![body]).await
}

/// [`raw_unary`] with the request body sent as the given pieces, each in
/// DATA frames of its own.
async fn raw_unary_frames(
    addr: SocketAddr,
    path: &str,
    pieces: Vec<Bytes>,
) -> (http::response::Parts, Vec<u8>, Option<http::HeaderMap>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, false).unwrap();
    send.reserve_capacity(pieces.iter().map(Bytes::len).sum());
    let last = pieces.len().saturating_sub(1);
    for (i, piece) in pieces.into_iter().enumerate() {
        send.send_data(piece, i == last).unwrap();
    }
    let (parts, mut recv) = response.await.unwrap().into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.unwrap();
    (parts, data, trailers)
}

fn grpc_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut v = vec![0u8];
    v.extend((body.len() as u32).to_be_bytes());
    v.extend(body);
    Bytes::from(v)
}

fn ns_bytes(ns: &NamespaceId) -> Bytes {
    Bytes::copy_from_slice(ns.as_bytes())
}

#[tokio::test]
async fn a_stock_http2_client_decodes_the_response_and_it_is_prosts_encoding() {
    let t = start(64 << 20).await;
    let ns = t.tcp.register_namespace(&mib_spec("raw")).await.unwrap().id;
    let addr = t.daemon().addrs().tcp.unwrap();
    let keys: Vec<String> = (0..3).map(|i| format!("raw-{i}")).collect();

    // BatchPut in one raw message.
    let put = pb::BatchPutRequest {
        namespace_id: ns_bytes(&ns),
        items: keys
            .iter()
            .map(|k| pb::PutItem {
                key: Bytes::from(k.clone()),
                payload: payload(k, 7, MIB),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let (parts, data, trailers) =
        raw_unary(addr, "/kvstrata.v1.KvCache/BatchPut", grpc_frame(&put)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let mut body = &data[..];
    assert_eq!(body.get_u8(), 0);
    assert_eq!(body.get_u32() as usize, body.len());
    let answer = pb::BatchPutResponse::decode(body).unwrap();
    assert_eq!(answer.stored, 3);

    // BatchGet: the answer decodes with prost, and re-encoding the decoded
    // message gives back exactly the bytes that came over the wire.
    let mut asked = keys.clone();
    asked.push("missing".into());
    let get = pb::BatchGetRequest {
        namespace_id: ns_bytes(&ns),
        keys: asked.iter().map(|k| Bytes::from(k.clone())).collect(),
        ..Default::default()
    };
    let (parts, data, trailers) =
        raw_unary(addr, "/kvstrata.v1.KvCache/BatchGet", grpc_frame(&get)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let mut body = &data[..];
    assert_eq!(body.get_u8(), 0);
    assert_eq!(body.get_u32() as usize, body.len());
    let answer = pb::BatchGetResponse::decode(body).unwrap();
    assert_eq!(
        answer.encode_to_vec(),
        body,
        "the wire bytes are prost's encoding"
    );
    assert_eq!(answer.results.len(), 4);
    for (k, r) in keys.iter().zip(&answer.results) {
        assert!(r.found && r.key == k.as_bytes());
        assert!(r.payload == payload(k, 7, MIB), "bytes of {k}");
    }
    assert!(!answer.results[3].found);
    t.stop().await;
}

/// A BatchPut whose message arrives in many DATA frames — cut inside the
/// gRPC header, inside field headers and inside payloads, or framed around
/// each payload as the client library sends it — is stored byte for byte.
#[tokio::test]
async fn a_put_in_many_data_frames_is_stored_byte_for_byte() {
    let t = start(64 << 20).await;
    let ns = t
        .tcp
        .register_namespace(&mib_spec("frames"))
        .await
        .unwrap()
        .id;
    let addr = t.daemon().addrs().tcp.unwrap();
    let message = |round: u32| pb::BatchPutRequest {
        namespace_id: ns_bytes(&ns),
        items: (0..3)
            .map(|i| {
                let k = format!("frames-{i}");
                pb::PutItem {
                    key: Bytes::from(k.clone()),
                    parent: if i > 0 {
                        Bytes::from(format!("frames-{}", i - 1))
                    } else {
                        Bytes::new()
                    },
                    payload: payload(&k, round, MIB),
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    };
    // Round 0: the client library's framing (a chunk around each payload,
    // each payload its own chunk); round 1: the whole message cut at odd
    // places, a frame of a few bytes here and there.
    let framed = kvstrata_proto::codec::encode_put_request(&message(0)).unwrap();
    // [header, payload 0, framing, payload 1, framing, payload 2]
    assert_eq!(framed.len(), 6);
    let whole = grpc_frame(&message(1));
    let mut cuts = vec![0, 1, 3, 5, 6, 40, 1000, MIB / 2, MIB + 37, 2 * MIB + 100];
    cuts.push(whole.len() - 2);
    cuts.push(whole.len());
    let pieces: Vec<Bytes> = cuts.windows(2).map(|w| whole.slice(w[0]..w[1])).collect();
    for (round, body) in [framed, pieces].into_iter().enumerate() {
        let (parts, data, trailers) =
            raw_unary_frames(addr, "/kvstrata.v1.KvCache/BatchPut", body).await;
        assert_eq!(parts.status, 200);
        assert_eq!(trailers.unwrap()["grpc-status"], "0", "round {round}");
        let answer = pb::BatchPutResponse::decode(&data[5..]).unwrap();
        assert_eq!(answer.stored, 3, "round {round}");
        let keys: Vec<String> = (0..3).map(|i| format!("frames-{i}")).collect();
        for reader in [&t.tcp, &t.uds] {
            let got = reader.batch_get(&ns, &keys).await.unwrap();
            for (k, g) in keys.iter().zip(&got) {
                assert!(g.found, "{k}");
                assert!(g.payload == payload(k, round as u32, MIB), "bytes of {k}");
            }
        }
    }
    t.stop().await;
}

#[tokio::test]
async fn bad_requests_get_the_statuses_tonic_gave() {
    let t = start(8 << 20).await;
    let addr = t.daemon().addrs().tcp.unwrap();
    let status = |trailers: Option<http::HeaderMap>, parts: &http::response::Parts| {
        let h = trailers.unwrap_or_else(|| parts.headers.clone());
        (
            h.get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string()),
            h.get("grpc-message")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
        )
    };
    // Undecodable: INVALID_ARGUMENT naming the field (the limits layer's
    // rewrite of tonic's INTERNAL).
    let mut bad = vec![0u8, 0, 0, 0, 2];
    bad.extend([0x08, 0x05]);
    for path in [
        "/kvstrata.v1.KvCache/BatchGet",
        "/kvstrata.v1.KvCache/BatchPut",
    ] {
        let (parts, _, trailers) = raw_unary(addr, path, Bytes::from(bad.clone())).await;
        let (code, _) = status(trailers.clone(), &parts);
        assert_eq!(code.as_deref(), Some("3"), "{path}");
        let decoded = tonic::Status::from_header_map(&trailers.unwrap_or(parts.headers)).unwrap();
        assert!(
            decoded.message().contains("does not decode")
                && decoded.message().contains("namespace_id"),
            "{path}: {decoded:?}"
        );
    }
    // No message at all, and a cut one.
    for body in [Bytes::new(), Bytes::from_static(&[0, 0, 0, 0, 9, 1])] {
        let (parts, _, trailers) =
            raw_unary(addr, "/kvstrata.v1.KvCache/BatchGet", body.clone()).await;
        let (code, message) = status(trailers, &parts);
        assert_eq!(code.as_deref(), Some("3"), "{body:?}: {message}");
    }
    // The namespace is validated by the handler, as before.
    let get = pb::BatchGetRequest {
        namespace_id: Bytes::from_static(b"short"),
        keys: vec![Bytes::from_static(b"k")],
        ..Default::default()
    };
    let (parts, _, trailers) =
        raw_unary(addr, "/kvstrata.v1.KvCache/BatchGet", grpc_frame(&get)).await;
    let (code, message) = status(trailers, &parts);
    assert_eq!(code.as_deref(), Some("3"), "{message}");
    assert!(message.contains("namespace_id"), "{message}");
    t.stop().await;
}

// ------------------------------------------------ raw frames over the socket

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_SETTINGS: u8 = 4;
const FRAME_WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An HPACK literal without indexing, of static name `index`, plain value.
fn literal(index: u8, value: &[u8]) -> Vec<u8> {
    assert!(index < 15 && value.len() < 127);
    let mut v = vec![index, value.len() as u8];
    v.extend_from_slice(value);
    v
}

/// An HPACK literal without indexing with a literal name.
fn named(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x00, name.len() as u8];
    v.extend_from_slice(name);
    v.push(value.len() as u8);
    v.extend_from_slice(value);
    v
}

/// Reads one frame: (kind, flags, stream, payload).
async fn read_frame(s: &mut UnixStream) -> (u8, u8, u32, Vec<u8>) {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await.unwrap();
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7FFF_FFFF;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    (h[3], h[4], stream, p)
}

/// What grpc-core sends on a `unix:` target: the percent-encoded socket
/// path as `:authority`. The wrapper rewrites it; the 1 MiB DATA frame that
/// follows reaches the service unchanged (read back over TCP).
#[tokio::test]
async fn a_socket_path_authority_and_a_large_data_frame_pass_the_unix_socket() {
    let t = start(64 << 20).await;
    let ns = t
        .tcp
        .register_namespace(&mib_spec("authority"))
        .await
        .unwrap()
        .id;
    let sock = t.daemon().addrs().uds.clone().unwrap();
    let mut s = UnixStream::connect(&sock).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&frame(FRAME_SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    // Wait for the daemon's SETTINGS (stream window, frame size) and its
    // connection WINDOW_UPDATE before sending more than the default window.
    tokio::time::timeout(Duration::from_secs(20), async {
        let (mut settings, mut window) = (false, false);
        while !(settings && window) {
            let (kind, flags, stream, _) = read_frame(&mut s).await;
            if kind == FRAME_SETTINGS && flags & 1 == 0 {
                s.write_all(&frame(FRAME_SETTINGS, 1, 0, &[]))
                    .await
                    .unwrap();
                settings = true;
            }
            window |= kind == FRAME_WINDOW_UPDATE && stream == 0;
        }
    })
    .await
    .expect("the daemon's SETTINGS and WINDOW_UPDATE");
    let authority = format!("{}", sock.display()).replace('/', "%2F");
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(literal(4, b"/kvstrata.v1.KvCache/BatchPut")); // :path
    block.extend(literal(1, authority.as_bytes())); // :authority
    block.extend(named(b"content-type", b"application/grpc"));
    block.extend(named(b"te", b"trailers"));
    s.write_all(&frame(FRAME_HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    let put = pb::BatchPutRequest {
        namespace_id: ns_bytes(&ns),
        items: vec![pb::PutItem {
            key: Bytes::from_static(b"via-raw-uds"),
            payload: payload("via-raw-uds", 3, MIB),
            ..Default::default()
        }],
        ..Default::default()
    };
    s.write_all(&frame(FRAME_DATA, END_STREAM, 1, &grpc_frame(&put)))
        .await
        .unwrap();
    // The answer ends with END_STREAM on stream 1 (a RST_STREAM would be a refusal).
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (kind, flags, stream, _) = read_frame(&mut s).await;
            assert_ne!((kind, stream), (3, 1), "stream 1 was reset");
            if stream == 1 && flags & END_STREAM != 0 {
                break;
            }
        }
    })
    .await
    .expect("the answer");
    // Closed now, or the daemon's stop would wait for it to drain.
    drop(s);
    let got = t.tcp.batch_get(&ns, &["via-raw-uds"]).await.unwrap();
    assert!(got[0].found, "the raw put was stored");
    assert!(got[0].payload == payload("via-raw-uds", 3, MIB));
    t.stop().await;
}
