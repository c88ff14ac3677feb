//! Connections that do not behave: silent ones (no HTTP/2 handshake), idle
//! ones, dead peers that stop answering pings, too many from one peer or in
//! all, and requests that are not proper gRPC (a wrong content type, two
//! messages on a one-message call). Each is closed or refused and counted,
//! and real clients go on being served.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::{Client, ClientOptions, ClientTls};
use kvstrata_server::{Config, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio_stream::StreamExt;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
/// How long anything the tests wait for may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

async fn start(cfg: impl FnOnce(&mut Config)) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config(dir.path(), 1 << 20, 64);
    cfg(&mut c);
    let d = Daemon::start(c).await.expect("daemon starts");
    (d, dir)
}

fn tcp_addr(d: &Daemon) -> SocketAddr {
    d.addrs().tcp.unwrap()
}

/// The value of one sample (`name{labels}`), 0 when absent.
async fn metric(d: &Daemon, sample: &str) -> u64 {
    common::metric_value(&common::metrics_text(d).await, sample) as u64
}

/// Polls until `sample` reads `want`.
async fn until_metric(d: &Daemon, sample: &str, want: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = metric(d, sample).await;
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} stayed {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `sample` (a counter) reads at least `want`; returns it.
async fn until_at_least(d: &Daemon, sample: &str, want: u64) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = metric(d, sample).await;
        if v >= want {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} stayed {v}, want {want} or more"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the daemon closes the connection (EOF or reset); the bytes
/// it sent before. Fails past `PATIENCE`.
async fn until_closed<S: AsyncReadExt + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all)
        .await
        .expect("the daemon closed the connection");
    got
}

/// A TCP connection from `source` (a loopback address) to `to`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// One HTTP/2 frame as read raw: (type, flags, payload).
async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await.ok()?;
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[3], h[4], payload))
}

const PING: u8 = 6;
const ACK: u8 = 1;

#[tokio::test]
async fn silent_connections_are_closed_at_the_handshake_deadline() {
    let (d, _dir) = start(|c| c.server.handshake_timeout_ms = 1000).await;
    let addr = tcp_addr(&d);
    // A real client, connected first, is served before and after.
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    client.stats().await.unwrap();

    let opened = Instant::now();
    let mut tcp = Vec::new();
    for _ in 0..20 {
        tcp.push(TcpStream::connect(addr).await.unwrap());
    }
    // Half a preface, then nothing.
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&PREFACE[..10]).await.unwrap();
        tcp.push(s);
    }
    let uds = d.addrs().uds.clone().unwrap();
    let mut unix = Vec::new();
    for _ in 0..3 {
        unix.push(UnixStream::connect(&uds).await.unwrap());
    }
    until_metric(&d, "kvstrata_connections_open{listener=\"tcp\"}", 23).await;
    until_metric(&d, "kvstrata_connections_open{listener=\"unix\"}", 3).await;
    for s in &mut tcp {
        until_closed(s).await;
    }
    for s in &mut unix {
        until_closed(s).await;
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "closed early: {took:?}"
    );
    until_metric(
        &d,
        "kvstrata_connections_closed_total{reason=\"handshake_timeout\"}",
        25,
    )
    .await;
    until_metric(&d, "kvstrata_connections_open{listener=\"tcp\"}", 1).await;
    until_metric(&d, "kvstrata_connections_open{listener=\"unix\"}", 0).await;
    client.stats().await.unwrap();
    eprintln!("25 silent connections closed {took:?} after they opened (deadline 1000 ms)");
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn connection_limits_refuse_the_extra_and_serve_the_rest() {
    let (d, _dir) = start(|c| {
        c.server.max_connections = 5;
        c.server.max_connections_per_peer = 3;
        c.server.handshake_timeout_ms = 120_000;
    })
    .await;
    let addr = tcp_addr(&d);
    let open = "kvstrata_connections_open{listener=\"tcp\"}";
    // 127.0.0.1 takes its 3.
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(connect_from("127.0.0.1", addr).await);
    }
    until_metric(&d, open, 3).await;
    // Its 4th is refused: closed at once, before any byte.
    let mut extra = connect_from("127.0.0.1", addr).await;
    assert!(until_closed(&mut extra).await.is_empty());
    until_metric(
        &d,
        "kvstrata_connections_refused_total{reason=\"peer_limit\"}",
        1,
    )
    .await;
    // 127.0.0.2 takes 2: the daemon holds its 5.
    let mut second = Vec::new();
    for _ in 0..2 {
        second.push(connect_from("127.0.0.2", addr).await);
    }
    until_metric(&d, open, 5).await;
    // Beyond 5, any peer is refused, on TCP and on the Unix socket.
    let mut over = connect_from("127.0.0.2", addr).await;
    assert!(until_closed(&mut over).await.is_empty());
    let mut over_unix = UnixStream::connect(d.addrs().uds.clone().unwrap())
        .await
        .unwrap();
    assert!(until_closed(&mut over_unix).await.is_empty());
    until_metric(
        &d,
        "kvstrata_connections_refused_total{reason=\"daemon_limit\"}",
        2,
    )
    .await;
    until_metric(&d, open, 5).await;

    // One of 127.0.0.1's closes: a real client from there is served again.
    drop(first.pop());
    until_metric(&d, open, 4).await;
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    client.stats().await.unwrap();
    until_metric(&d, open, 5).await;
    // The held connections were never closed by the daemon.
    assert_eq!(
        metric(&d, "kvstrata_connections_accepted_total{listener=\"tcp\"}").await,
        6
    );
    drop((first, second, client));
    until_metric(&d, open, 0).await;
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_connections_are_closed_and_clients_reconnect() {
    let idle = Duration::from_millis(800);
    let (d, _dir) = start(|c| c.server.idle_timeout_ms = idle.as_millis() as u64).await;
    let addr = tcp_addr(&d);
    let idle_closed = "kvstrata_connections_closed_total{reason=\"idle_timeout\"}";

    // A raw HTTP/2 connection that completes its handshake and sends no call.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(PREFACE).await.unwrap();
    raw.write_all(&SETTINGS).await.unwrap();
    let since = Instant::now();
    let got = until_closed(&mut raw).await;
    let idle_for = since.elapsed();
    assert!(got.len() >= 9, "the server's SETTINGS came first");
    assert!(idle_for >= idle, "{idle_for:?}");
    until_metric(&d, idle_closed, 1).await;

    // A real client: served, left idle until the daemon closes its
    // connection, then served again on a new one.
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    client.stats().await.unwrap();
    until_at_least(&d, idle_closed, 2).await;
    until_metric(&d, "kvstrata_connections_open{listener=\"tcp\"}", 0).await;
    client.stats().await.unwrap();

    // A connection with a call open (a Watch) is not idle: after several
    // idle timeouts its stream still delivers (a closed connection would
    // have ended it with an error).
    let watcher = Client::connect(&format!("http://{addr}")).await.unwrap();
    let (ns, bb) = common::register(&watcher, "idle").await;
    let mut events = watcher.watch(Some(&ns)).await.unwrap();
    tokio::time::sleep(idle * 3).await;
    common::put(&client, &ns, "k", None, bb).await;
    let e = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("event");
    assert_eq!(&e.key[..], b"k");
    drop(events);
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn keepalive_pings_drop_a_dead_peer_and_keep_a_live_one() {
    let (d, _dir) = start(|c| {
        c.server.keepalive_interval_ms = 200;
        c.server.keepalive_timeout_ms = 1000;
        c.server.idle_timeout_ms = 0;
    })
    .await;
    let addr = tcp_addr(&d);
    let handshake = |mut s: TcpStream| async move {
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&SETTINGS).await.unwrap();
        s
    };
    let mut dead = handshake(TcpStream::connect(addr).await.unwrap()).await;
    let mut live = handshake(TcpStream::connect(addr).await.unwrap()).await;

    // The dead peer never answers: it gets a PING, then is dropped. The
    // live one, read at the same time, answers every PING and is kept: it
    // sees several more.
    let dead_frames = async {
        let mut pings = 0;
        while let Some((kind, flags, _)) = read_frame(&mut dead).await {
            if kind == PING && flags & ACK == 0 {
                pings += 1;
            }
        }
        pings
    };
    let live_frames = async {
        let mut acked = 0;
        while acked < 6 {
            let (kind, flags, payload) = read_frame(&mut live).await.expect("still open");
            if kind == PING && flags & ACK == 0 {
                let mut ack = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
                ack.extend_from_slice(&payload);
                live.write_all(&ack).await.unwrap();
                acked += 1;
            }
        }
    };
    let (pings, ()) =
        tokio::time::timeout(PATIENCE, async { tokio::join!(dead_frames, live_frames) })
            .await
            .expect("the dead peer is dropped, the live one keeps getting pings");
    assert!(pings >= 1, "a PING came before the drop");

    drop(live);
    until_metric(&d, "kvstrata_connections_open{listener=\"tcp\"}", 0).await;

    // The real client answers pings too: after several intervals and more
    // than a timeout it is still on its first connection.
    let accepted = "kvstrata_connections_accepted_total{listener=\"tcp\"}";
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    client.stats().await.unwrap();
    assert_eq!(metric(&d, accepted).await, 3);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.stats().await.unwrap();
    assert_eq!(metric(&d, accepted).await, 3);
    until_metric(&d, "kvstrata_connections_open{listener=\"tcp\"}", 1).await;
    d.shutdown().await.unwrap();
}

/// One raw HTTP/2 request to `path`: the response's HTTP status and its
/// grpc-status (from the headers, or the trailers).
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Option<String>, Option<String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("te", "trailers");
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let (response, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(Bytes::copy_from_slice(body), true).unwrap();
    let response = response.await.unwrap();
    let (parts, mut recv) = response.into_parts();
    let header = |h: &http::HeaderMap, k: &str| {
        h.get(k)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut status = header(&parts.headers, "grpc-status");
    let mut message = header(&parts.headers, "grpc-message");
    if status.is_none() {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        if let Some(t) = recv.trailers().await.unwrap() {
            status = header(&t, "grpc-status");
            message = header(&t, "grpc-message");
        }
    }
    (parts.status.as_u16(), status, message)
}

/// A gRPC message: flag byte, big-endian length, payload.
fn grpc_message(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn malformed_grpc_is_refused() {
    let (d, _dir) = start(|_| {}).await;
    let addr = tcp_addr(&d);
    let stats = "/kvstrata.v1.KvCache/Stats";
    let one = grpc_message(b"");
    let mut two = one.clone();
    two.extend(grpc_message(b""));

    // The control: one message, application/grpc.
    let (http, status, _) = raw_call(addr, stats, Some("application/grpc"), &one).await;
    assert_eq!((http, status.as_deref()), (200, Some("0")));

    // Not gRPC: HTTP 415, and INVALID_ARGUMENT for gRPC clients.
    for ct in [Some("text/plain"), None, Some("application/grpc-web")] {
        let (http, status, message) = raw_call(addr, stats, ct, &one).await;
        assert_eq!((http, status.as_deref()), (415, Some("3")), "{ct:?}");
        assert!(message.unwrap().contains("content-type"));
    }
    until_metric(
        &d,
        "kvstrata_requests_malformed_total{reason=\"content_type\"}",
        3,
    )
    .await;

    // Two messages on a unary call, and on a server-streaming one.
    let (http, status, message) = raw_call(addr, stats, Some("application/grpc"), &two).await;
    assert_eq!((http, status.as_deref()), (200, Some("3")), "{message:?}");
    assert!(message.unwrap().contains("exactly"));
    let (_, status, _) = raw_call(
        addr,
        "/kvstrata.v1.KvCache/Watch",
        Some("application/grpc+proto"),
        &two,
    )
    .await;
    assert_eq!(status.as_deref(), Some("3"));
    // The health check is guarded the same way.
    let (_, status, _) = raw_call(
        addr,
        "/grpc.health.v1.Health/Check",
        Some("application/grpc"),
        &two,
    )
    .await;
    assert_eq!(status.as_deref(), Some("3"));
    until_metric(
        &d,
        "kvstrata_requests_malformed_total{reason=\"unary_messages\"}",
        3,
    )
    .await;

    // Real clients are unaffected.
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    client.stats().await.unwrap();
    d.shutdown().await.unwrap();
}

/// A self-signed certificate for 127.0.0.1: (cert, key).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    common::openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    (dir.join("cert.pem"), dir.join("key.pem"))
}

#[tokio::test]
async fn tls_connections_get_the_same_deadline() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let (d, _dir) = start(|c| {
        c.server.handshake_timeout_ms = 1000;
        c.tls.cert = cert.display().to_string();
        c.tls.key = key.display().to_string();
    })
    .await;
    let addr = tcp_addr(&d);
    // Silent, and stalled inside the first TLS record: closed at the deadline.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[22, 3, 1, 0, 200, 1]).await.unwrap();
    until_closed(&mut silent).await;
    until_closed(&mut stalled).await;
    until_metric(
        &d,
        "kvstrata_connections_closed_total{reason=\"handshake_timeout\"}",
        2,
    )
    .await;

    // A TLS client that completed its handshake is past the deadline: it
    // stays on its first connection for several deadlines.
    let options = ClientOptions {
        tls: Some(ClientTls::from_files(Some(&cert), None).unwrap()),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&format!("https://{addr}"), options)
        .await
        .unwrap();
    client.stats().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.stats().await.unwrap();
    let accepted = "kvstrata_connections_accepted_total{listener=\"tcp\"}";
    assert_eq!(metric(&d, accepted).await, 3);
    assert_eq!(
        metric(
            &d,
            "kvstrata_connections_closed_total{reason=\"handshake_timeout\"}"
        )
        .await,
        2
    );
    d.shutdown().await.unwrap();
}
