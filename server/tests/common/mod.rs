//! Test support: a real daemon on an ephemeral TCP port and a temp Unix socket,
//! and real clients connected to both.
#![allow(dead_code)]

pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use kvstrata_client::{Client, PutItem};
use kvstrata_server::{Config, Daemon};
use kvstrata_types::{Dtype, NamespaceId, NamespaceSpec};

pub struct TestDaemon {
    pub daemon: Option<Daemon>,
    pub tcp: Client,
    pub uds: Client,
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.expect("clean shutdown");
        }
    }
}

pub fn config(dir: &std::path::Path, capacity: u64, max_batch: usize) -> Config {
    let mut c = Config::default();
    c.server.tcp_addr = "127.0.0.1:0".into();
    c.server.uds_path = dir.join("kv.sock").display().to_string();
    c.server.metrics_addr = "127.0.0.1:0".into();
    c.server.max_batch = max_batch;
    c.host.capacity = ByteSize::b(capacity);
    c
}

pub async fn start(capacity: u64) -> TestDaemon {
    start_with(capacity, 4096).await
}

pub async fn start_with(capacity: u64, max_batch: usize) -> TestDaemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(config(dir.path(), capacity, max_batch))
        .await
        .expect("daemon starts");
    let tcp = Client::connect(&daemon.addrs().tcp_target().expect("tcp"))
        .await
        .expect("tcp connect");
    let uds = Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("uds connect");
    TestDaemon {
        daemon: Some(daemon),
        tcp,
        uds,
        dir,
    }
}

/// A small layer-major geometry: 2 layers, 1 head, dim 64, f16, 16 tokens = 8 KiB blocks.
pub fn small_spec(model: &str) -> NamespaceSpec {
    NamespaceSpec::layer_major(model, 2, 1, 64, Dtype::F16, 16)
}

pub async fn register(c: &Client, model: &str) -> (NamespaceId, usize) {
    let r = c
        .register_namespace(&small_spec(model))
        .await
        .expect("register");
    (r.id, r.block_bytes as usize)
}

/// Deterministic, never-constant payload for (tag, version).
pub fn payload(tag: &str, version: u32, len: usize) -> Bytes {
    let seed = xxhash_rust::xxh3::xxh3_64(format!("{tag}/{version}").as_bytes());
    let mut state = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend_from_slice(&state.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

pub fn item(key: &str, parent: Option<&str>, len: usize) -> PutItem {
    let it = PutItem::new(Bytes::copy_from_slice(key.as_bytes()), payload(key, 0, len));
    match parent {
        Some(p) => it.with_parent(Bytes::copy_from_slice(p.as_bytes())),
        None => it,
    }
}

pub async fn put(c: &Client, ns: &NamespaceId, key: &str, parent: Option<&str>, len: usize) {
    let r = c
        .batch_put(ns, vec![item(key, parent, len)])
        .await
        .expect("put");
    assert_eq!(r.stored, 1, "put {key} not stored");
}

/// Whether `key` is cached, checking the bytes byte for byte when it is.
pub async fn present(c: &Client, ns: &NamespaceId, key: &str, len: usize) -> bool {
    let r = c.batch_get(ns, &[key.as_bytes()]).await.expect("get");
    if r[0].found {
        assert_eq!(r[0].payload, payload(key, 0, len), "wrong bytes for {key}");
    }
    r[0].found
}

pub async fn host_stats(c: &Client) -> kvstrata_proto::v1::TierStats {
    let s = c.stats().await.expect("stats");
    s.tiers
        .into_iter()
        .find(|t| t.tier == kvstrata_proto::v1::Tier::Host as i32)
        .expect("host tier")
}

pub const SHORT: Duration = Duration::from_millis(50);

/// `GET path` on a daemon's metrics listener `addr`, with an `Authorization`
/// header value if given: the HTTP status code and the whole response.
pub async fn http_get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

/// The whole response to `GET /metrics` on `d`'s metrics listener.
pub async fn metrics_text(d: &Daemon) -> String {
    let addr = d.addrs().metrics.expect("metrics listener");
    http_get(addr, "/metrics", None).await.1
}

/// One sample (`name{labels}` exactly) of a metrics text; 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Runs `openssl args` in `dir` (test certificates); fails the test when it
/// fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the openssl command runs");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
