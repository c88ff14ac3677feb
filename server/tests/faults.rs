//! Fault and limit tests against a real daemon and the real client, each
//! bounded in time: overload (`server.max_inflight_requests`), request
//! deadlines (`grpc-timeout`, `server.request_timeout_ms`), message and
//! stream limits, clients that disconnect mid-stream, mid-lease and while
//! holding a shared-memory pool, a disk that cannot be allocated, returns
//! ENOSPC or EIO. (SIGKILL of the real binary during mixed load is
//! cli/tests/faults.rs.)
//!
//! Each test prints its counts (`eprintln!`) for docs/reliability.md.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use common::{payload, small_spec};
use kvstrata_client::{Client, PutItem, SharedPool};
use kvstrata_proto::v1 as pb;
use kvstrata_server::{Config, Daemon};
use kvstrata_tiers::{Dtype, FaultPlan, NamespaceId, NamespacePolicy, NamespaceSpec};
use tokio_stream::StreamExt;
use tonic::Code;

const BLOCK: usize = 8192;
/// 4 layers, 8 heads, dim 128, f16, 64 tokens = 1 MiB blocks: a GetStream
/// of a few dozen of them outgrows the HTTP/2 windows and stalls while its
/// client does not read.
const BIG: usize = 1 << 20;

fn big_spec() -> NamespaceSpec {
    NamespaceSpec::layer_major("faults-big", 4, 8, 128, Dtype::F16, 64)
}

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-faults-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

fn host_config(dir: &Path, capacity: u64) -> Config {
    let mut c = common::config(dir, capacity, 64);
    c.host.segment_bytes = ByteSize::mib(4);
    c
}

/// Host tier of `host_blocks` 8 KiB blocks and one slot file (pread engine).
fn disk_config(dir: &Path, host_blocks: u64, disk_bytes: u64) -> Config {
    let mut c = common::config(dir, host_blocks * BLOCK as u64, 64);
    c.host.segment_bytes = ByteSize::b(host_blocks * BLOCK as u64);
    c.disk.paths = vec![format!(
        "{}={}",
        dir.join("slots-0.kvs").display(),
        disk_bytes
    )];
    c.disk.engine = kvstrata_server::config::DiskIoEngine::Pread;
    c.disk.segment_bytes = ByteSize::mib(1);
    c.disk.promote_on_get = false;
    c
}

struct Running {
    daemon: Daemon,
    client: Client,
}

async fn start(config: Config) -> Running {
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let client = connect(&daemon).await;
    Running { daemon, client }
}

async fn connect(daemon: &Daemon) -> Client {
    Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect")
}

impl Running {
    async fn stop(self) {
        drop(self.client);
        self.daemon.shutdown().await.expect("clean shutdown");
    }

    async fn metrics(&self) -> String {
        let out = common::metrics_text(&self.daemon).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// A sample of the metrics text (`name{labels}` exactly), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        common::metric_value(&self.metrics().await, series)
    }

    /// Waits until the in-flight gauge reads `n`.
    async fn wait_in_flight(&self, n: f64) {
        self.wait_gauge("kvstrata_requests_in_flight", n).await;
    }

    /// Waits until the blocking-pool gauge (cache calls holding one of
    /// `server.max_blocking_tasks` slots) reads `n`.
    async fn wait_blocking(&self, n: f64) {
        self.wait_gauge("kvstrata_blocking_tasks", n).await;
    }

    /// Waits until the gauge `series` reads `n`.
    async fn wait_gauge(&self, series: &str, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series).await;
            if v == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} stuck at {v}, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn tier(s: &pb::StatsResponse, t: pb::Tier) -> pb::TierStats {
    s.tiers
        .iter()
        .find(|x| x.tier == t as i32)
        .cloned()
        .expect("tier listed")
}

fn ns_bytes(ns: &NamespaceId) -> Bytes {
    Bytes::copy_from_slice(ns.as_bytes())
}

/// A GetStream of `n` copies of the 1 MiB block "big", never read: the
/// daemon's sender stalls on flow control and the call stays in flight.
async fn stalled_stream(c: &Client, ns: &NamespaceId, n: usize) -> tonic::Streaming<pb::GetResult> {
    let keys = vec![Bytes::from_static(b"big"); n];
    c.raw()
        .get_stream(pb::BatchGetRequest {
            namespace_id: ns_bytes(ns),
            keys,
            ranges: Vec::new(),
            pages: Vec::new(),
            ..Default::default()
        })
        .await
        .expect("stream starts")
        .into_inner()
}

async fn put_big(c: &Client) -> NamespaceId {
    let ns = c
        .register_namespace(&big_spec())
        .await
        .expect("register")
        .id;
    let r = c
        .batch_put(&ns, vec![PutItem::new("big", payload("big", 0, BIG))])
        .await
        .expect("put big");
    assert_eq!(r.stored, 1);
    ns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_service_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = host_config(dir.path(), 16 << 20);
    config.server.max_inflight_requests = 2;
    // One client holds both slots here (the per-peer share is peer_limits.rs's).
    config.server.max_inflight_per_peer = 2;
    let d = start(config).await;
    let ns = put_big(&d.client).await;
    let (small, _) = common::register(&d.client, "faults-small").await;

    // Two calls in flight: GetStreams of 48 MiB that nobody reads.
    let s1 = stalled_stream(&d.client, &ns, 48).await;
    let s2 = stalled_stream(&d.client, &ns, 48).await;
    d.wait_in_flight(2.0).await;
    let mut refused = 0;
    for i in 0..20 {
        let t0 = Instant::now();
        let r = d.client.batch_get(&small, &["x"]).await;
        let took = t0.elapsed();
        let e = r.expect_err("third request must be refused");
        assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
        assert!(
            e.to_string().contains("overloaded: 2 requests in flight"),
            "{e}"
        );
        assert!(took < Duration::from_secs(1), "refusal {i} took {took:?}");
        refused += 1;
    }
    // Stats and puts are refused alike; nothing was applied.
    let e = d.client.stats().await.expect_err("stats refused");
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    let e = d
        .client
        .batch_put(&small, vec![common::item("never", None, BLOCK)])
        .await
        .expect_err("put refused");
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    let text = d.metrics().await;
    assert_eq!(
        common::metric_value(&text, "kvstrata_requests_in_flight"),
        2.0
    );
    let rejected = common::metric_value(
        &text,
        "kvstrata_requests_rejected_total{reason=\"overloaded\"}",
    );
    assert!(rejected >= 22.0, "{text}");

    // The clients of the stalled streams leave mid-stream: their slots come back.
    drop(s1);
    drop(s2);
    d.wait_in_flight(0.0).await;
    assert!(!common::present(&d.client, &small, "never", BLOCK).await);

    // A flood of concurrent puts: each is stored or refused at once, never queued.
    let mut tasks = Vec::new();
    for t in 0..24 {
        let c = d.client.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("flood-{t}");
            let t0 = Instant::now();
            let r = c
                .batch_put(&small, vec![common::item(&key, None, BLOCK)])
                .await;
            (key, r.map(|r| r.stored), t0.elapsed())
        }));
    }
    let (mut stored, mut flood_refused) = (Vec::new(), 0);
    for t in tasks {
        let (key, r, took) = t.await.expect("task");
        match r {
            Ok(1) => stored.push(key),
            Ok(n) => panic!("{key}: stored {n}"),
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert!(
                    took < Duration::from_secs(1),
                    "{key}: refusal took {took:?}"
                );
                flood_refused += 1;
            }
        }
    }
    assert!(!stored.is_empty());
    d.wait_in_flight(0.0).await;
    for key in &stored {
        assert!(
            common::present(&d.client, &small, key, BLOCK).await,
            "{key}"
        );
    }
    // Normal service afterwards, a full stream included.
    let mut s = d
        .client
        .get_stream(&ns, &["big", "big"])
        .await
        .expect("stream");
    let mut n = 0;
    while let Some(r) = s.next().await {
        let r = r.expect("item");
        assert_eq!(r.payload, payload("big", 0, BIG));
        n += 1;
    }
    assert_eq!(n, 2);
    let st = d.client.stats().await.expect("stats");
    assert_eq!(st.active_leases, 0);
    eprintln!(
        "overload: {refused} refused while 2 streams in flight (each < 1 s); flood of 24 puts: {} stored, {flood_refused} refused",
        stored.len()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_batch_and_stream_limits_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = host_config(dir.path(), 16 << 20);
    config.server.max_message_bytes = ByteSize::mib(2);
    config.server.max_batch = 8;
    config.server.max_concurrent_streams = 2;
    let d = start(config).await;
    let (ns, _) = common::register(&d.client, "faults-limits").await;
    let big = d
        .client
        .register_namespace(&big_spec())
        .await
        .expect("register")
        .id;

    // A message over max_message_bytes (3 blocks of 1 MiB): refused quickly.
    let items: Vec<PutItem> = (0..3)
        .map(|i| PutItem::new(format!("m{i}"), payload("m", i, BIG)))
        .collect();
    let t0 = Instant::now();
    let e = d
        .client
        .raw()
        .batch_put(pb::BatchPutRequest {
            namespace_id: ns_bytes(&big),
            items: items.into_iter().map(Into::into).collect(),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Over max_batch: the field is named.
    let nine: Vec<Bytes> = (0..9).map(|i| Bytes::from(format!("k{i}"))).collect();
    let e = d
        .client
        .raw()
        .lookup(pb::LookupRequest {
            namespace_id: ns_bytes(&ns),
            keys: nine.clone(),
        })
        .await
        .expect_err("batch");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("keys"), "{e:?}");
    let e = d
        .client
        .raw()
        .delete(pb::DeleteRequest {
            namespace_id: ns_bytes(&ns),
            keys: nine.clone(),
        })
        .await
        .expect_err("batch");
    assert!(e.message().contains("keys"), "{e:?}");
    // The client learnt the limit when it registered the namespace, and
    // sends as many keys as two requests.
    assert_eq!(d.client.max_batch(), 8);
    assert_eq!(d.client.lookup(&ns, &nine).await.expect("split").matched, 0);
    assert_eq!(d.client.delete(&ns, &nine).await.expect("split").deleted, 0);
    // Nothing was stored.
    let s = d.client.stats().await.expect("stats");
    assert_eq!(tier(&s, pb::Tier::Host).blocks, 0);

    // Two streams per connection: a third call on the same connection waits
    // for one of them, and runs once it ends.
    assert_eq!(put_big(&d.client).await, big);
    let s1 = stalled_stream(&d.client, &big, 48).await;
    let s2 = stalled_stream(&d.client, &big, 48).await;
    let c = d.client.clone();
    let mut third = tokio::spawn(async move { c.stats().await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third stream ran beside two open ones"
    );
    // Another connection is not held up.
    let other = connect(&d.daemon).await;
    other.stats().await.expect("another connection");
    drop(s1);
    let r = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("third call runs once a stream ends")
        .expect("task");
    r.expect("stats");
    drop(s2);
    d.wait_in_flight(0.0).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_slow_requests_and_half_apply_nothing() {
    let dir = disk_dir();
    let mut config = disk_config(dir.path(), 8, 4 << 20);
    config.server.request_timeout_ms = 700;
    config.server.max_blocking_tasks = 1;
    config.disk.read_timeout_ms = 10_000;
    let d = start(config).await;
    let c = &d.client;
    let ns = c
        .register_namespace(&small_spec("faults-deadline"))
        .await
        .unwrap()
        .id;
    let keys: Vec<String> = (0..3).map(|i| format!("slow-{i}")).collect();
    for k in &keys {
        common::put(c, &ns, k, None, BLOCK).await;
    }
    let e = c.evict(&ns, &keys, false).await.expect("evict to disk");
    assert_eq!(e.evicted, 3);
    let disk = d.daemon.cache().disk().expect("disk tier");
    disk.set_fault_plan(FaultPlan {
        delay_reads: Some(Duration::from_millis(1500)),
        ..FaultPlan::default()
    });

    // 1. A client deadline of 200 ms on a 1.5 s read.
    let mut raw = c.raw();
    let mut req = tonic::Request::new(pb::BatchGetRequest {
        namespace_id: ns_bytes(&ns),
        keys: vec![Bytes::from("slow-0")],
        ranges: Vec::new(),
        pages: Vec::new(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    let e = raw.batch_get(req).await.expect_err("deadline");
    let took = t0.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    // Wait for that read to free the blocking slot.
    d.wait_blocking(0.0).await;

    // 2. No client deadline: server.request_timeout_ms (700) ends it. Its read
    // keeps the only blocking slot for 1.5 s...
    let slow = {
        let c = c.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            (c.batch_get(&ns, &["slow-1"]).await, t0.elapsed())
        })
    };
    d.wait_blocking(1.0).await;
    // 3. ...so a put with a 200 ms deadline waits for the slot and expires
    // before it starts: none of its blocks is stored.
    let items: Vec<pb::PutItem> = (0..4)
        .map(|i| common::item(&format!("late-{i}"), None, BLOCK).into())
        .collect();
    let mut req = tonic::Request::new(pb::BatchPutRequest {
        namespace_id: ns_bytes(&ns),
        items,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    let e = raw.batch_put(req).await.expect_err("deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t0.elapsed() < Duration::from_millis(1000));
    let (r, took) = slow.await.expect("task");
    let e = r.expect_err("server deadline");
    assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1400),
        "took {took:?}"
    );
    // 4. A GetStream with a client deadline ends with DEADLINE_EXCEEDED
    // (after at most the item being read).
    let mut req = tonic::Request::new(pb::BatchGetRequest {
        namespace_id: ns_bytes(&ns),
        keys: keys.iter().map(|k| Bytes::from(k.clone())).collect(),
        ranges: Vec::new(),
        pages: Vec::new(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(300));
    let mut s = raw.get_stream(req).await.expect("stream").into_inner();
    let mut items = 0;
    let end = loop {
        match s.message().await {
            Ok(Some(r)) => {
                assert!(!r.found || r.payload == payload(&r_key(&r), 0, BLOCK));
                items += 1;
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let end = end.expect("stream ends in an error");
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(items <= 1, "{items} items after the deadline");
    // 5. A Watch with a client deadline ends with DEADLINE_EXCEEDED; without
    // one it would last.
    let mut req = tonic::Request::new(pb::WatchRequest::default());
    req.set_timeout(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut w = raw.watch(req).await.expect("watch").into_inner();
    let end = loop {
        match w.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let end = end.expect("watch ends in an error");
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    disk.set_fault_plan(FaultPlan::default());
    // The slow reads end (the gets below need the only blocking slot).
    d.wait_blocking(0.0).await;
    // Nothing half-applied; the slow blocks are intact.
    for i in 0..4 {
        assert!(
            !common::present(c, &ns, &format!("late-{i}"), BLOCK).await,
            "late-{i} stored after its deadline"
        );
    }
    for k in &keys {
        let r = c.batch_get(&ns, &[k.as_str()]).await.expect("get");
        assert!(r[0].found, "{k}");
        assert_eq!(r[0].payload, payload(k, 0, BLOCK), "{k}");
    }
    let deadlines = d
        .metric("kvstrata_requests_rejected_total{reason=\"deadline\"}")
        .await;
    assert!(deadlines >= 5.0, "deadline rejections {deadlines}");
    d.wait_in_flight(0.0).await;
    eprintln!(
        "deadlines: {deadlines} requests ended with DEADLINE_EXCEEDED; 4 late puts applied 0 blocks"
    );
    d.stop().await;
}

fn r_key(r: &pb::GetResult) -> String {
    String::from_utf8_lossy(&r.key).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_disconnect_leak_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = host_config(dir.path(), 32 << 20);
    config.shm.mempool_socket = dir.path().join("mempool.sock").display().to_string();
    let d = start(config).await;
    let big = put_big(&d.client).await;
    let (ns, bb) = common::register(&d.client, "faults-disconnect").await;

    // 1. Mid GetStream: a client on its own connection reads 2 of 40 MiB and goes away.
    {
        let c = connect(&d.daemon).await;
        let mut s = stalled_stream(&c, &big, 40).await;
        for _ in 0..2 {
            let r = s.message().await.expect("item").expect("some");
            assert_eq!(r.payload, payload("big", 0, BIG));
        }
        drop(s);
        drop(c);
    }
    d.wait_in_flight(0.0).await;

    // 2. Mid PutStream: three batches acknowledged, then the client leaves.
    {
        let c = connect(&d.daemon).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::BatchPutRequest>(4);
        let mut resp = c
            .raw()
            .put_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("put stream")
            .into_inner();
        for b in 0..3 {
            let items = (0..4)
                .map(|i| common::item(&format!("ps-{b}-{i}"), None, bb).into())
                .collect();
            tx.send(pb::BatchPutRequest {
                namespace_id: ns_bytes(&ns),
                items,
                ..Default::default()
            })
            .await
            .expect("send");
            let r = resp.message().await.expect("answer").expect("some");
            assert_eq!(r.stored, 4);
        }
        drop(resp);
        drop(tx);
        drop(c);
    }
    d.wait_in_flight(0.0).await;
    for b in 0..3 {
        for i in 0..4 {
            assert!(common::present(&d.client, &ns, &format!("ps-{b}-{i}"), bb).await);
        }
    }

    // 3. Mid lease: pins 4 blocks for 600 ms and disconnects without Unpin.
    {
        let c = connect(&d.daemon).await;
        let keys: Vec<String> = (0..4).map(|i| format!("ps-0-{i}")).collect();
        c.pin(&ns, &keys, Duration::from_millis(600))
            .await
            .expect("pin");
        drop(c);
    }
    let s = d.client.stats().await.expect("stats");
    assert_eq!(s.active_leases, 1);
    assert_eq!(tier(&s, pb::Tier::Host).pinned_blocks, 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = d.client.stats().await.expect("stats");
        if s.active_leases == 0 && tier(&s, pb::Tier::Host).pinned_blocks == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "lease never expired: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 4. A shared-memory pool whose client closes it (drops it, as at exit)
    // while using it: the daemon unmaps it.
    let mempool = d.daemon.addrs().mempool.clone().expect("mempool");
    let maps_before = memfd_mappings("faults-pool");
    let pool = tokio::task::block_in_place(|| {
        SharedPool::create(mempool.to_str().expect("utf-8"), "faults-pool", 1 << 20)
    })
    .expect("pool");
    let s = d.client.stats().await.expect("stats");
    assert_eq!((s.pools, s.pool_bytes), (1, 1 << 20));
    let mut range = pool.alloc(bb).expect("range");
    range
        .as_mut_slice()
        .copy_from_slice(&payload("from-pool", 0, bb));
    let r = d
        .client
        .batch_put_ranges(
            &ns,
            vec![kvstrata_client::RangePutItem::new(
                Bytes::from_static(b"from-pool"),
                range.to_proto(),
            )],
        )
        .await
        .expect("put from pool");
    assert_eq!(r.stored, 1);
    drop(range);
    drop(pool);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = d.client.stats().await.expect("stats");
        if s.pools == 0 && s.pool_bytes == 0 && memfd_mappings("faults-pool") == maps_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool still registered or mapped: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The block copied from the pool outlives it.
    assert!(common::present(&d.client, &ns, "from-pool", bb).await);

    let s = d.client.stats().await.expect("stats");
    assert_eq!(s.active_leases, 0);
    assert!(s.tiers.iter().all(|t| t.pinned_blocks == 0));
    let h = tier(&s, pb::Tier::Host);
    assert!(h.used_bytes <= h.capacity_bytes);
    d.wait_in_flight(0.0).await;
    eprintln!(
        "disconnects: mid GetStream, mid PutStream (12 acked blocks kept), mid lease (4 pins released), pool closed in use: 0 leaked"
    );
    d.stop().await;
}

/// How many mappings of memfds named `name` this process has.
fn memfd_mappings(name: &str) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let needle = format!("/memfd:{name}");
    maps.lines()
        .filter(|l| l.contains(&format!("{needle} ")) || l.ends_with(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_file_larger_than_the_disk_fails_start_up_clearly() {
    let dir = disk_dir();
    // 100 PiB: no filesystem here has room (or allows a file that big).
    let config = disk_config(dir.path(), 8, 100 << 50);
    let e = Daemon::start(config).await.err().expect("start-up refused");
    let msg = e.to_string();
    eprintln!("disk full at start-up: {msg}");
    assert!(msg.contains("slots-0.kvs"), "names the file: {msg}");
    assert!(
        msg.contains("No space") || msg.contains("too large") || msg.contains("space"),
        "says why: {msg}"
    );
    // Nothing big was left behind.
    let used: u64 = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum();
    assert!(used < 64 << 20, "{used} bytes allocated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_enospc_and_eio_give_misses_and_metrics_not_crashes() {
    let dir = disk_dir();
    let d = start(disk_config(dir.path(), 8, 4 << 20)).await;
    let c = &d.client;
    let ns = c
        .register_namespace_with(
            &small_spec("faults-disk"),
            Some(NamespacePolicy {
                write_through: true,
                ..NamespacePolicy::default()
            }),
        )
        .await
        .expect("register")
        .id;
    let disk = d.daemon.cache().disk().expect("disk tier");
    let stats = || async { tier(&c.stats().await.expect("stats"), pb::Tier::Disk) };
    let (mut checked, mut misses) = (0u32, 0u32);

    // ENOSPC on every write: puts are still stored in host memory; the
    // write-through and demotions fail and are counted; nothing wrong is read.
    disk.set_fault_plan(FaultPlan {
        fail_writes_with: Some(libc::ENOSPC),
        ..FaultPlan::default()
    });
    let before = stats().await.io_errors;
    let full: Vec<String> = (0..24).map(|i| format!("full-{i}")).collect();
    for k in &full {
        common::put(c, &ns, k, None, BLOCK).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats().await.io_errors == before {
        assert!(Instant::now() < deadline, "ENOSPC never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in &full {
        checked += 1;
        if !common::present(c, &ns, k, BLOCK).await {
            misses += 1;
        }
    }
    let enospc_errors = stats().await.io_errors - before;
    // The 8 newest are in host memory whatever the disk does.
    for k in &full[16..] {
        assert!(common::present(c, &ns, k, BLOCK).await, "{k}");
    }

    // EIO on every read: blocks only on disk answer misses.
    disk.set_fault_plan(FaultPlan::default());
    let on_disk: Vec<String> = (0..8).map(|i| format!("eio-{i}")).collect();
    for k in &on_disk {
        common::put(c, &ns, k, None, BLOCK).await;
    }
    let e = c.evict(&ns, &on_disk, false).await.expect("evict");
    assert_eq!(e.evicted, 8);
    disk.set_fault_plan(FaultPlan {
        fail_reads_with: Some(libc::EIO),
        ..FaultPlan::default()
    });
    let before = stats().await.io_errors;
    for k in &on_disk {
        let r = c.batch_get(&ns, &[k.as_str()]).await.expect("get answers");
        assert!(!r[0].found, "{k}: a failed read must be a miss");
        checked += 1;
        misses += 1;
    }
    let eio_errors = stats().await.io_errors - before;
    assert!(eio_errors >= 8, "EIO reads counted: {eio_errors}");
    let text = d.metrics().await;
    assert!(
        common::metric_value(&text, "kvstrata_disk_io_errors_total")
            .max(common::metric_value(&text, "kvstrata_disk_io_errors"))
            >= (eio_errors + enospc_errors) as f64,
        "{text}"
    );

    // Faults cleared: the daemon serves disk blocks exactly again (or misses
    // blocks it dropped), and new writes reach the disk.
    disk.set_fault_plan(FaultPlan::default());
    for k in &on_disk {
        checked += 1;
        if !common::present(c, &ns, k, BLOCK).await {
            misses += 1;
        }
    }
    let again: Vec<String> = (0..4).map(|i| format!("again-{i}")).collect();
    for k in &again {
        common::put(c, &ns, k, None, BLOCK).await;
    }
    let e = c.evict(&ns, &again, false).await.expect("evict");
    assert_eq!(e.evicted, 4);
    for k in &again {
        let r = c.batch_get(&ns, &[k.as_str()]).await.expect("get");
        assert!(r[0].found, "{k}");
        assert_eq!(r[0].payload, payload(k, 0, BLOCK));
        assert_eq!(r[0].tier, pb::Tier::Disk as i32);
        checked += 1;
    }
    let s = c.stats().await.expect("stats");
    for t in &s.tiers {
        assert!(t.used_bytes <= t.capacity_bytes, "{t:?}");
    }
    eprintln!(
        "disk faults: {enospc_errors} ENOSPC write errors, {eio_errors} EIO read errors counted; {checked} reads checked, {misses} misses, 0 wrong bytes"
    );
    d.stop().await;
}
