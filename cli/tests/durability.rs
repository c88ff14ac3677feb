//! What a status promises across a stop of the real binary, `kvstrata serve`,
//! with a disk tier:
//!
//! - a put answered `NO_SPACE` (host tier full of pinned blocks) in a
//!   write-through namespace is never served: not live, not after a SIGKILL
//!   and a restart; when it targeted a key holding a (pinned) block, that
//!   old block is what every tier keeps;
//! - blocks acknowledged before a SIGTERM are found after the restart:
//!   write-through blocks (the stop drains the write queue) and host-only
//!   blocks (the stop persists the host tier);
//! - in a `sync_write_through` namespace an acknowledged block survives a
//!   SIGKILL that follows the acknowledgement at once.
//!
//! Every check compares exact bytes. The tests print their counts
//! (`eprintln!`) for docs/reliability.md.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::{ServeProcess, read_log, spawn_serve};
use common::{payload, small_spec};
use kvstrata_client::{Client, PutItem};
use kvstrata_proto::v1 as pb;
use kvstrata_types::{NamespaceId, NamespacePolicy};

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
const BLOCK: usize = 8192;

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-durability-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

/// Starts the daemon on `dir`'s slot file and index with a host tier of
/// `host_blocks` 8 KiB blocks; its log (level info) goes to `dir/<n>.log`.
fn serve(dir: &Path, host_blocks: u64, run: u32) -> (ServeProcess, String) {
    let log = dir.join(format!("{run}.log"));
    let host = format!("{}KiB", host_blocks * 8);
    let daemon = spawn_serve(BIN, dir, Duration::from_secs(30), Some(&log), |cmd| {
        cmd.args(["--tcp-addr", "", "--metrics-addr", ""])
            .args(["--log-level", "info"])
            .args(["--host-capacity", &host, "--host-segment-bytes", &host])
            .args(["--disk-size", "32MiB", "--disk-engine", "auto"])
            .arg("--disk-path")
            .arg(dir.join("slots.kvs"));
    });
    let target = daemon.target.clone();
    (daemon, target)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn register(addr: &str, policy: NamespacePolicy) -> (Client, NamespaceId) {
    let c = Client::connect(addr).await.expect("connect");
    let id = c
        .register_namespace_with(&small_spec("durability"), Some(policy))
        .await
        .expect("register")
        .id;
    (c, id)
}

fn item(key: &str, version: u32) -> PutItem {
    PutItem::new(Bytes::from(key.to_string()), payload(key, version, BLOCK))
}

/// Waits until the write queue (demotions and write-through) is empty.
async fn settle(c: &Client) -> pb::MovementStats {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let m = c
            .stats()
            .await
            .expect("stats")
            .movement
            .expect("movement stats with a disk tier");
        if m.demote_queued_bytes == 0 {
            return m;
        }
        assert!(Instant::now() < until, "write queue never drained: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The key's answer: `Some(version)` of the exact bytes found, `None` for a
/// miss; bytes of no version in `versions` fail the test.
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

/// Keys listed in the disk tier.
async fn disk_keys(c: &Client, ns: &NamespaceId) -> Vec<String> {
    let blocks = c
        .list_all_blocks(Some(ns), Some(pb::Tier::Disk), None)
        .await
        .expect("list disk blocks");
    blocks
        .iter()
        .map(|b| String::from_utf8_lossy(&b.key).into_owned())
        .collect()
}

#[test]
fn a_refused_put_is_never_served_live_or_after_a_restart() {
    let dir = disk_dir();
    let rt = runtime();
    let (daemon, addr) = serve(dir.path(), 8, 0);
    let wt = NamespacePolicy {
        write_through: true,
        ..NamespacePolicy::default()
    };
    let pinned: Vec<String> = (0..8).map(|i| format!("pinned-{i}")).collect();
    let ns = rt.block_on(async {
        let (c, ns) = register(&addr, wt).await;
        // The host tier is full of version-0 blocks, all on disk too.
        let items = pinned.iter().map(|k| item(k, 0)).collect();
        assert_eq!(c.batch_put(&ns, items).await.expect("put").stored, 8);
        assert!(settle(&c).await.demoted >= 8);
        c.pin(&ns, &pinned, Duration::from_secs(300))
            .await
            .expect("pin");
        assert_eq!(common::host_stats(&c).await.pinned_blocks, 8);

        // A new key and a new version of a pinned key: both refused.
        for (key, version) in [("fresh", 0), (pinned[0].as_str(), 1)] {
            let r = c
                .batch_put(&ns, vec![item(key, version)])
                .await
                .expect("put");
            assert_eq!(
                r.results,
                vec![pb::PutStatus::NoSpace as i32],
                "{key} v{version}"
            );
        }
        // And through a PutStream.
        let acks = c
            .put_batches(&ns, vec![vec![item(&pinned[1], 1)]])
            .await
            .expect("put stream");
        assert_eq!(acks[0].results, vec![pb::PutStatus::NoSpace as i32]);
        // Whatever was queued has been written (or dropped) now.
        settle(&c).await;

        // Live: the refused bytes are nowhere; the old blocks everywhere.
        assert_eq!(version_of(&c, &ns, "fresh", &[0]).await, None, "fresh");
        let on_disk = disk_keys(&c, &ns).await;
        assert!(!on_disk.iter().any(|k| k == "fresh"), "fresh on disk");
        for (i, k) in pinned.iter().enumerate() {
            assert_eq!(version_of(&c, &ns, k, &[0, 1]).await, Some(0), "{k}");
            let slot = c
                .inspect(&ns, k)
                .await
                .expect("inspect")
                .disk_slot
                .unwrap_or_else(|| panic!("{k}: its disk copy is gone"));
            let v0 = xxhash_rust::xxh3::xxh3_64(&payload(k, 0, BLOCK));
            assert_eq!(
                slot.index_xxh3, v0,
                "{k} (#{i}): the disk holds other bytes"
            );
        }
        ns
    });

    // SIGKILL, restart: the disk tier answers.
    drop(daemon);
    let (daemon, addr) = serve(dir.path(), 8, 1);
    rt.block_on(async {
        let c = Client::connect(&addr).await.expect("connect");
        assert_eq!(version_of(&c, &ns, "fresh", &[0]).await, None, "fresh");
        for k in &pinned {
            assert_eq!(version_of(&c, &ns, k, &[0, 1]).await, Some(0), "{k}");
        }
    });
    eprintln!(
        "refused puts: 3 refused (2 over pinned blocks), 9 keys checked live and after SIGKILL: 0 refused bytes served"
    );
    drop(daemon);
}

#[test]
fn write_through_blocks_acknowledged_before_sigterm_are_on_disk_after_restart() {
    const N: usize = 1536;
    let dir = disk_dir();
    let rt = runtime();
    // Host tier larger than the working set: the disk gets the blocks only
    // by write-through (and by the stop's persisting of the host tier).
    let (daemon, addr) = serve(dir.path(), 2048, 0);
    let keys: Vec<String> = (0..N).map(|i| format!("wt-{i:05}")).collect();
    let wt = NamespacePolicy {
        write_through: true,
        ..NamespacePolicy::default()
    };
    let (ns, queued) = rt.block_on(async {
        let (c, ns) = register(&addr, wt).await;
        for chunk in keys.chunks(128) {
            let items = chunk.iter().map(|k| item(k, 0)).collect();
            let r = c.batch_put(&ns, items).await.expect("put");
            assert_eq!(r.stored as usize, chunk.len());
        }
        let m = c.stats().await.expect("stats").movement.expect("movement");
        (ns, m.demote_queued_bytes / BLOCK as u64)
    });
    // Stop right after the last acknowledgement.
    let status = daemon.sigterm();
    let log = read_log(&dir.path().join("0.log"));
    assert!(status.success(), "exit {status:?}: {log}");
    let (daemon, addr) = serve(dir.path(), 2048, 1);
    let found = rt.block_on(async {
        let c = Client::connect(&addr).await.expect("connect");
        let mut on_disk = disk_keys(&c, &ns).await;
        on_disk.sort();
        assert_eq!(on_disk, keys, "acknowledged blocks missing on disk");
        let mut found = 0;
        for k in &keys {
            assert_eq!(version_of(&c, &ns, k, &[0]).await, Some(0), "{k}");
            found += 1;
        }
        found
    });
    // The stop said what it did.
    assert!(log.contains("disk: write queue drained at stop"), "{log}");
    eprintln!(
        "write-through then SIGTERM: {N} acknowledged, {queued} still queued at the last ack, {found} found exactly after the restart"
    );
    drop(daemon);
}

#[test]
fn host_blocks_survive_a_graceful_stop() {
    const N: usize = 256;
    let dir = disk_dir();
    let rt = runtime();
    let (daemon, addr) = serve(dir.path(), 512, 0);
    let keys: Vec<String> = (0..N).map(|i| format!("host-{i:04}")).collect();
    let ns = rt.block_on(async {
        let (c, ns) = register(&addr, NamespacePolicy::default()).await;
        for chunk in keys.chunks(64) {
            let items = chunk.iter().map(|k| item(k, 0)).collect();
            let r = c.batch_put(&ns, items).await.expect("put");
            assert_eq!(r.stored as usize, chunk.len());
        }
        // Nothing went to disk: no write-through, no eviction.
        assert!(disk_keys(&c, &ns).await.is_empty());
        ns
    });
    let status = daemon.sigterm();
    let log = read_log(&dir.path().join("0.log"));
    assert!(status.success(), "exit {status:?}: {log}");
    let (daemon, addr) = serve(dir.path(), 512, 1);
    rt.block_on(async {
        let c = Client::connect(&addr).await.expect("connect");
        for k in &keys {
            assert_eq!(version_of(&c, &ns, k, &[0]).await, Some(0), "{k}");
        }
    });
    // The stop said what it did.
    assert!(
        log.lines()
            .any(|l| l.contains("host tier persisted at stop") && l.contains("written=256")),
        "{log}"
    );
    eprintln!("host-only blocks then SIGTERM: {N} put, {N} found exactly after the restart");
    drop(daemon);
}

#[test]
fn sync_write_through_blocks_survive_an_immediate_sigkill() {
    const N: usize = 512;
    let dir = disk_dir();
    let rt = runtime();
    let (daemon, addr) = serve(dir.path(), 1024, 0);
    let keys: Vec<String> = (0..N).map(|i| format!("sync-{i:04}")).collect();
    let sync = NamespacePolicy {
        sync_write_through: true,
        ..NamespacePolicy::default()
    };
    let (ns, took) = rt.block_on(async {
        let (c, ns) = register(&addr, sync).await;
        let began = Instant::now();
        for chunk in keys.chunks(32) {
            let items = chunk.iter().map(|k| item(k, 0)).collect();
            let r = c.batch_put(&ns, items).await.expect("put");
            assert_eq!(r.stored as usize, chunk.len());
        }
        (ns, began.elapsed())
    });
    // SIGKILL at once after the last acknowledgement: no stop path runs.
    drop(daemon);
    let (daemon, addr) = serve(dir.path(), 1024, 1);
    rt.block_on(async {
        let c = Client::connect(&addr).await.expect("connect");
        for k in &keys {
            assert_eq!(version_of(&c, &ns, k, &[0]).await, Some(0), "{k}");
        }
    });
    eprintln!(
        "sync write-through then SIGKILL: {N} acknowledged in {took:?} (batches of 32), {N} found exactly after the restart"
    );
    drop(daemon);
}
