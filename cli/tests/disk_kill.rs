//! SIGKILL in the middle of a write-heavy load, restart on the same paths,
//! and an oracle check of every key: each answer is the exact bytes of the
//! last acknowledged write, of the write in flight at the kill, or a miss.
//! Several kill points, with both I/O engines. The daemon is the real
//! binary; its host tier is small, so most blocks reach disk by demotion,
//! the rest by write-through.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::process::{ServeProcess, spawn_serve};
use kvstrata_client::{Client, PutItem};
use kvstrata_types::{Dtype, NamespaceId, NamespacePolicy, NamespaceSpec};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
const BLOCK: usize = 8192;
const KEYS: u32 = 300;

fn spec() -> NamespaceSpec {
    // 2 layers, 1 head, dim 64, f16, 16 tokens = 8 KiB blocks.
    NamespaceSpec::layer_major("kill-test", 2, 1, 64, Dtype::F16, 16)
}

fn payload(key: u32, version: u32) -> Bytes {
    let mut state = xxhash_rust::xxh3::xxh3_64(format!("{key}/{version}").as_bytes()) | 1;
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v.extend_from_slice(&state.to_le_bytes());
    }
    v.truncate(BLOCK);
    Bytes::from(v)
}

fn key(k: u32) -> Bytes {
    Bytes::from(format!("key-{k:04}"))
}

/// Starts the daemon on `dir`'s slot file and index; returns it (SIGKILLed
/// when dropped) and its socket.
fn serve(dir: &Path, engine: &str) -> (ServeProcess, String) {
    let daemon = spawn_serve(BIN, dir, Duration::from_secs(30), None, |cmd| {
        cmd.args([
            "--tcp-addr",
            "",
            "--metrics-addr",
            "",
            "--log-level",
            "warn",
            "--host-capacity",
            "64KiB",
            "--host-segment-bytes",
            "64KiB",
            "--disk-size",
            "16MiB",
            "--disk-engine",
            engine,
        ])
        .arg("--disk-path")
        .arg(dir.join("slots.kvs"));
    });
    let target = daemon.target.clone();
    (daemon, target)
}

/// What may be stored under each key: the last acknowledged version and
/// any version whose put was in flight.
#[derive(Default)]
struct Oracle {
    allowed: HashMap<u32, Vec<u32>>,
}

impl Oracle {
    fn in_flight(&mut self, k: u32, v: u32) {
        self.allowed.entry(k).or_default().push(v);
    }

    fn acked(&mut self, k: u32, v: u32) {
        // Everything before the acknowledged version is gone for good.
        self.allowed.insert(k, vec![v]);
    }
}

/// Writes random keys with increasing versions until killed (the caller
/// kills the daemon; the loop stops at the first error).
async fn load(
    addr: String,
    ns: NamespaceId,
    seed: u64,
    mut next_version: u32,
    oracle: &mut Oracle,
) -> u32 {
    let c = match Client::connect(&addr).await {
        Ok(c) => c,
        Err(_) => return next_version,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let batch: Vec<u32> = (0..8).map(|_| rng.random_range(0..KEYS)).collect();
        let mut items = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut written = Vec::new();
        for &k in &batch {
            if !seen.insert(k) {
                continue;
            }
            let v = next_version;
            next_version += 1;
            oracle.in_flight(k, v);
            written.push((k, v));
            items.push(PutItem::new(key(k), payload(k, v)));
        }
        match c.batch_put(&ns, items).await {
            Ok(r) => {
                for ((k, v), status) in written.into_iter().zip(r.results) {
                    if status == kvstrata_proto::v1::PutStatus::Stored as i32 {
                        oracle.acked(k, v);
                    }
                }
            }
            Err(_) => return next_version,
        }
    }
}

/// Anchor blocks of a round: written, then moved to disk by a synchronous
/// `Evict` before the load starts, and never written again. Whatever the kill
/// point, each one must survive with its exact bytes.
const ANCHORS: u32 = 16;

fn anchor_key(round: u32, i: u32) -> Bytes {
    Bytes::from(format!("anchor-{round}-{i:02}"))
}

async fn write_anchors(addr: &str, ns: &NamespaceId, round: u32) {
    let c = Client::connect(addr).await.expect("connect");
    // Four at a time: the host tier holds eight blocks.
    for first in (0..ANCHORS).step_by(4) {
        let keys: Vec<Bytes> = (first..first + 4).map(|i| anchor_key(round, i)).collect();
        let items = (first..first + 4)
            .map(|i| PutItem::new(anchor_key(round, i), payload(1_000_000 + round, i)))
            .collect();
        let r = c.batch_put(ns, items).await.expect("put anchors");
        assert_eq!(r.stored, 4);
        let e = c.evict(ns, &keys, false).await.expect("evict anchors");
        assert_eq!(e.evicted, 4, "anchors moved to disk");
    }
}

async fn check(addr: &str, ns: &NamespaceId, oracle: &Oracle, rounds: u32) -> (u32, u32) {
    let c = Client::connect(addr).await.expect("connect after restart");
    for round in 0..rounds {
        let keys: Vec<Bytes> = (0..ANCHORS).map(|i| anchor_key(round, i)).collect();
        let got = c.batch_get(ns, &keys).await.expect("get anchors");
        for (i, r) in got.iter().enumerate() {
            assert!(
                r.found,
                "anchor {round}/{i}, on disk before the kill, is missing"
            );
            assert_eq!(
                r.payload,
                payload(1_000_000 + round, i as u32),
                "anchor {round}/{i}"
            );
        }
    }
    let (mut hits, mut misses) = (0, 0);
    for k in 0..KEYS {
        let r = c.batch_get(ns, &[key(k)]).await.expect("get after restart");
        if !r[0].found {
            misses += 1;
            continue;
        }
        hits += 1;
        let allowed = oracle.allowed.get(&k).cloned().unwrap_or_default();
        assert!(
            allowed.iter().any(|&v| r[0].payload == payload(k, v)),
            "key {k}: bytes of no version that may be there (allowed {allowed:?})"
        );
    }
    (hits, misses)
}

fn kill_rounds(engine: &str) {
    let dir = tempfile::Builder::new()
        .prefix("kvs-kill-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut oracle = Oracle::default();
    let mut version = 1;
    let mut ns = None;
    for (round, kill_after_ms) in [150u64, 400, 900, 60].into_iter().enumerate() {
        let (daemon, addr) = serve(dir.path(), engine);
        let id = rt.block_on(async {
            let c = Client::connect(&addr).await.expect("connect");
            // Half the rounds write through, half rely on demotion alone.
            let policy = NamespacePolicy {
                write_through: round % 2 == 0,
                ..NamespacePolicy::default()
            };
            c.register_namespace_with(&spec(), Some(policy))
                .await
                .expect("register")
                .id
        });
        if let Some(prev) = ns {
            assert_eq!(prev, id, "namespace id is stable across restarts");
            // Everything the previous incarnation may have left is checked
            // before new writes start.
            let (hits, misses) = rt.block_on(check(&addr, &id, &oracle, round as u32));
            eprintln!("{engine} round {round}: {hits} keys served exactly, {misses} misses");
        }
        ns = Some(id);
        rt.block_on(write_anchors(&addr, &id, round as u32));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(kill_after_ms));
            // SIGKILL: no shutdown path runs.
            drop(daemon);
        });
        version = rt.block_on(load(addr.clone(), id, round as u64, version, &mut oracle));
        killer.join().expect("killer thread");
    }
    // Final restart and check.
    let (_daemon, addr) = serve(dir.path(), engine);
    let id = ns.expect("namespace");
    let (hits, misses) = rt.block_on(check(&addr, &id, &oracle, 4));
    eprintln!("{engine} final: {hits} keys served exactly, {misses} misses, {version} writes");
}

#[test]
fn sigkill_during_writes_never_serves_wrong_bytes_io_uring() {
    kill_rounds("auto");
}

#[test]
fn sigkill_during_writes_never_serves_wrong_bytes_pread() {
    kill_rounds("pread");
}
