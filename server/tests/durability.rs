//! Durability in the daemon, with the disk tier's fault hooks: a
//! `sync_write_through` namespace writes each put to disk before answering
//! and answers `DISK_FAILED` (storing nothing) when that write fails; a
//! refused put (`NO_SPACE`) of such a namespace leaves the old block on disk;
//! the stop's drain of the write queue is bounded by `disk.drain_on_stop_ms`
//! and reports what it dropped. The real binary's SIGTERM/SIGKILL cases are
//! in `cli/tests/durability.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use common::{payload, small_spec};
use kvstrata_client::{Client, PutItem};
use kvstrata_proto::v1 as pb;
use kvstrata_server::{Config, Daemon};
use kvstrata_tiers::{FaultPlan, NamespaceId, NamespacePolicy};

const BLOCK: usize = 8192;

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-durability-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

/// Host tier of `host_blocks` 8 KiB blocks, a 4 MiB slot file, generous
/// disk deadlines (these tests inject their own faults).
fn disk_config(dir: &Path, host_blocks: u64) -> Config {
    let mut c = common::config(dir, host_blocks * BLOCK as u64, 4096);
    c.host.segment_bytes = ByteSize::b(host_blocks * BLOCK as u64);
    c.disk.paths = vec![format!("{}=4194304", dir.join("slots-0.kvs").display())];
    c.disk.segment_bytes = ByteSize::mib(1);
    c.disk.read_timeout_ms = 60_000;
    c.disk.write_timeout_ms = 60_000;
    c
}

async fn start(config: Config) -> (Daemon, Client) {
    let daemon = Daemon::start(config).await.expect("daemon starts");
    let client = Client::connect(&daemon.addrs().uds_target().expect("uds"))
        .await
        .expect("connect");
    (daemon, client)
}

async fn register(c: &Client, policy: NamespacePolicy) -> NamespaceId {
    c.register_namespace_with(&small_spec("durable"), Some(policy))
        .await
        .expect("register")
        .id
}

fn item(key: &str, version: u32) -> PutItem {
    PutItem::new(Bytes::from(key.to_string()), payload(key, version, BLOCK))
}

async fn put(c: &Client, ns: &NamespaceId, items: Vec<PutItem>) -> Vec<i32> {
    c.batch_put(ns, items).await.expect("put").results
}

/// `Some(version)` of the exact bytes found under `key`, `None` for a miss;
/// any other bytes fail the test.
async fn version_of(c: &Client, ns: &NamespaceId, key: &str, versions: &[u32]) -> Option<u32> {
    let r = c.batch_get(ns, &[key]).await.expect("get");
    if !r[0].found {
        return None;
    }
    let v = versions
        .iter()
        .copied()
        .find(|&v| r[0].payload == payload(key, v, BLOCK));
    assert!(v.is_some(), "{key}: bytes of no version in {versions:?}");
    v
}

/// The xxh3 of the bytes the disk tier's index holds for `key`, if any.
async fn disk_xxh3(c: &Client, ns: &NamespaceId, key: &str) -> Option<u64> {
    match c.inspect(ns, key).await {
        Ok(r) => r.disk_slot.map(|s| s.index_xxh3),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => None,
        Err(e) => panic!("inspect {key}: {e}"),
    }
}

fn xxh3(key: &str, version: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&payload(key, version, BLOCK))
}

const SYNC: NamespacePolicy = NamespacePolicy {
    write_through: false,
    remote_write_through: false,
    sync_write_through: true,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_put_is_on_disk_when_acknowledged_and_a_failed_one_is_not_stored() {
    let dir = disk_dir();
    let (d, c) = start(disk_config(dir.path(), 64)).await;
    let ns = register(&c, SYNC).await;
    let listed = c.list_namespaces().await.expect("list");
    assert!(
        listed[0]
            .policy
            .as_ref()
            .is_some_and(|p| p.sync_write_through)
    );
    let stored = pb::PutStatus::Stored as i32;
    let failed = pb::PutStatus::DiskFailed as i32;

    // Acknowledged: on disk already, no queue to wait for. A key put twice
    // in one batch: the disk holds the last version.
    let r = put(&c, &ns, vec![item("a", 0), item("b", 0), item("b", 1)]).await;
    assert_eq!(r, vec![stored; 3]);
    assert_eq!(disk_xxh3(&c, &ns, "a").await, Some(xxh3("a", 0)));
    assert_eq!(disk_xxh3(&c, &ns, "b").await, Some(xxh3("b", 1)));
    let m = c.stats().await.expect("stats").movement.expect("movement");
    assert_eq!((m.write_through, m.demote_queued_bytes), (0, 0), "{m:?}");

    // The disk refuses every write: a new key and a new version both
    // answer DISK_FAILED, and neither is served (the replaced version is
    // gone too: a miss).
    let disk = d.cache().disk().expect("disk tier");
    disk.set_fault_plan(FaultPlan {
        fail_writes_with: Some(libc::EIO),
        ..FaultPlan::default()
    });
    let r = put(&c, &ns, vec![item("c", 0), item("a", 1)]).await;
    assert_eq!(r, vec![failed; 2]);
    assert_eq!(version_of(&c, &ns, "c", &[0]).await, None, "c served");
    assert_eq!(version_of(&c, &ns, "a", &[0, 1]).await, None, "a served");
    assert_eq!(disk_xxh3(&c, &ns, "a").await, None);
    let m = c.stats().await.expect("stats").movement.expect("movement");
    assert_eq!(m.sync_write_failed, 2, "{m:?}");
    // Through a PutStream too.
    let acks = c
        .put_batches(&ns, vec![vec![item("d", 0)]])
        .await
        .expect("put stream");
    assert_eq!(acks[0].results, vec![failed]);
    assert_eq!(version_of(&c, &ns, "d", &[0]).await, None, "d served");

    // The disk recovers: puts are stored again, exactly.
    disk.set_fault_plan(FaultPlan::default());
    let r = put(&c, &ns, vec![item("c", 2), item("a", 2)]).await;
    assert_eq!(r, vec![stored; 2]);
    assert_eq!(version_of(&c, &ns, "c", &[0, 2]).await, Some(2));
    assert_eq!(disk_xxh3(&c, &ns, "a").await, Some(xxh3("a", 2)));
    assert_eq!(version_of(&c, &ns, "b", &[0, 1]).await, Some(1));
    let body = common::metrics_text(&d).await;
    assert!(
        body.contains("kvstrata_sync_write_failed_blocks_total 3"),
        "{body}"
    );
    drop(c);
    d.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sync_put_leaves_the_old_block_everywhere() {
    let dir = disk_dir();
    let (d, c) = start(disk_config(dir.path(), 4)).await;
    let ns = register(&c, SYNC).await;
    let keys: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
    let items = keys.iter().map(|k| item(k, 0)).collect();
    let r = put(&c, &ns, items).await;
    assert_eq!(r, vec![pb::PutStatus::Stored as i32; 4]);
    c.pin(&ns, &keys, Duration::from_secs(300))
        .await
        .expect("pin");
    let r = put(&c, &ns, vec![item("p0", 1), item("fresh", 0)]).await;
    assert_eq!(r, vec![pb::PutStatus::NoSpace as i32; 2]);
    assert_eq!(version_of(&c, &ns, "p0", &[0, 1]).await, Some(0));
    assert_eq!(disk_xxh3(&c, &ns, "p0").await, Some(xxh3("p0", 0)));
    assert_eq!(version_of(&c, &ns, "fresh", &[0]).await, None);
    assert_eq!(disk_xxh3(&c, &ns, "fresh").await, None);
    drop(c);
    d.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_drain_is_bounded_and_reports_what_it_dropped() {
    let dir = disk_dir();
    let mut config = disk_config(dir.path(), 1024);
    config.disk.drain_on_stop_ms = 200;
    config.disk.persist_on_stop_ms = 0;
    let (d, c) = start(config.clone()).await;
    let wt = NamespacePolicy {
        write_through: true,
        ..NamespacePolicy::default()
    };
    let ns = register(&c, wt).await;
    // Every disk write starts 1.5 s late: the queue (16 batches of 32)
    // would take 24 s or more to drain; the deadline is 200 ms.
    let cache = std::sync::Arc::clone(d.cache());
    cache.disk().expect("disk tier").set_fault_plan(FaultPlan {
        delay_writes: Some(Duration::from_millis(1500)),
        ..FaultPlan::default()
    });
    let keys: Vec<String> = (0..512).map(|i| format!("q{i:03}")).collect();
    for chunk in keys.chunks(32) {
        let r = put(&c, &ns, chunk.iter().map(|k| item(k, 0)).collect()).await;
        assert_eq!(r, vec![pb::PutStatus::Stored as i32; chunk.len()]);
    }
    drop(c);
    let began = Instant::now();
    d.shutdown().await.expect("clean shutdown");
    let took = began.elapsed();
    // The drain's 200 ms, then the batch being written (1.5 s late; 6 s
    // with the pread engine's 8 threads).
    assert!(took < Duration::from_secs(12), "stop took {took:?}");
    let m = cache.stats().movement.expect("movement");
    assert!(m.stop_dropped > 0, "{m:?}");
    assert_eq!(m.demoted + m.demote_failed + m.stop_dropped, 512, "{m:?}");
    assert_eq!(m.queued_bytes, 0, "{m:?}");
    eprintln!(
        "bounded drain: 512 queued, {} written, {} failed, {} dropped at the deadline, stop in {took:?}",
        m.demoted, m.demote_failed, m.stop_dropped
    );
    drop(cache);

    // After a restart: what was written is exact, what was dropped a miss.
    let (d, c) = start(config).await;
    let (mut hits, mut misses) = (0u64, 0u64);
    for k in &keys {
        match version_of(&c, &ns, k, &[0]).await {
            Some(_) => hits += 1,
            None => misses += 1,
        }
    }
    assert_eq!(hits, m.demoted, "{m:?}");
    assert!(misses >= m.stop_dropped, "{m:?}");
    drop(c);
    d.shutdown().await.expect("clean shutdown");
}

/// Milliseconds of a duration, for the printed table.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q`-quantile of `v` (sorted here).
fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Waits for the disk tier's STORED event of `key` on `events`.
async fn stored_on_disk(
    events: &mut (
             impl tokio_stream::Stream<Item = Result<pb::WatchEvent, kvstrata_client::ClientError>>
             + Unpin
         ),
    key: &str,
) -> Instant {
    use tokio_stream::StreamExt;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = tokio::time::timeout_at(until, events.next())
            .await
            .unwrap_or_else(|_| panic!("{key} never reached the disk"))
            .expect("watch stream open")
            .expect("watch event");
        if e.kind == pb::EventKind::Stored as i32
            && e.tier == pb::Tier::Disk as i32
            && e.key.as_ref() == key.as_bytes()
        {
            return Instant::now();
        }
    }
}

/// Acknowledgement-to-disk latency of asynchronous write-through (single
/// puts, then a burst), and the put latency of synchronous write-through,
/// printed for docs/operations.md. Asserts the promise only: every
/// write-through block reaches the disk, every sync block is there when
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgement_to_disk_latency() {
    const N: usize = 64;
    let dir = disk_dir();
    let (d, c) = start(disk_config(dir.path(), 512)).await;
    let wt = NamespacePolicy {
        write_through: true,
        ..NamespacePolicy::default()
    };
    let ns = register(&c, wt).await;
    let mut events = c.watch(Some(&ns)).await.expect("watch");

    // One put at a time: put latency, and acknowledgement to disk.
    let (mut put_lat, mut to_disk) = (Vec::new(), Vec::new());
    for i in 0..N {
        let k = format!("one-{i:03}");
        let t0 = Instant::now();
        let r = put(&c, &ns, vec![item(&k, 0)]).await;
        let acked = Instant::now();
        assert_eq!(r, vec![pb::PutStatus::Stored as i32]);
        let on_disk = stored_on_disk(&mut events, &k).await;
        put_lat.push(acked - t0);
        to_disk.push(on_disk.saturating_duration_since(acked));
    }
    // A burst: 512 blocks in batches of 64, back to back; how long after
    // the last acknowledgement the last block reaches the disk.
    let burst: Vec<String> = (0..512).map(|i| format!("burst-{i:03}")).collect();
    for chunk in burst.chunks(64) {
        let r = put(&c, &ns, chunk.iter().map(|k| item(k, 0)).collect()).await;
        assert_eq!(r, vec![pb::PutStatus::Stored as i32; chunk.len()]);
    }
    let acked = Instant::now();
    let last = burst.last().expect("burst");
    let burst_to_disk = stored_on_disk(&mut events, last).await - acked;

    // Synchronous write-through: the put itself.
    let sync_ns = c
        .register_namespace_with(&small_spec("durable-sync"), Some(SYNC))
        .await
        .expect("register")
        .id;
    let mut sync_lat = Vec::new();
    for i in 0..N {
        let k = format!("sync-{i:03}");
        let t0 = Instant::now();
        let r = put(&c, &sync_ns, vec![item(&k, 0)]).await;
        sync_lat.push(t0.elapsed());
        assert_eq!(r, vec![pb::PutStatus::Stored as i32]);
        assert_eq!(disk_xxh3(&c, &sync_ns, &k).await, Some(xxh3(&k, 0)));
    }
    let t0 = Instant::now();
    let sync_burst: Vec<String> = (0..512).map(|i| format!("sburst-{i:03}")).collect();
    for chunk in sync_burst.chunks(64) {
        let r = put(&c, &sync_ns, chunk.iter().map(|k| item(k, 0)).collect()).await;
        assert_eq!(r, vec![pb::PutStatus::Stored as i32; chunk.len()]);
    }
    let sync_burst_took = t0.elapsed();
    eprintln!(
        "8 KiB blocks, engine {}: async put p50 {:.2} ms p99 {:.2} ms; ack->disk p50 {:.2} ms p99 {:.2} ms; \
         512-block burst: last block on disk {:.1} ms after the last ack; \
         sync put p50 {:.2} ms p99 {:.2} ms; sync 512-block burst (batches of 64) {:.1} ms",
        disk_engine(&c).await,
        ms(quantile(&mut put_lat, 0.5)),
        ms(quantile(&mut put_lat, 0.99)),
        ms(quantile(&mut to_disk, 0.5)),
        ms(quantile(&mut to_disk, 0.99)),
        ms(burst_to_disk),
        ms(quantile(&mut sync_lat, 0.5)),
        ms(quantile(&mut sync_lat, 0.99)),
        ms(sync_burst_took),
    );
    drop(events);
    drop(c);
    d.shutdown().await.expect("clean shutdown");
}

async fn disk_engine(c: &Client) -> String {
    let s = c.stats().await.expect("stats");
    s.tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Disk as i32)
        .map(|t| t.io_engine.clone())
        .unwrap_or_default()
}
