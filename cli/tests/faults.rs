//! A fault of the real binary: SIGKILL of `kvstrata serve` during mixed load
//! (puts, gets checked live, deletes; write-through on half the rounds), with an
//! oracle check of every key after each restart on the same slot file.
//!
//! The test prints its counts (`eprintln!`) for docs/reliability.md.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::process::{ServeProcess, spawn_serve};
use common::{payload, small_spec};
use kvstrata_client::{Client, PutItem};
use kvstrata_proto::v1 as pb;
use kvstrata_types::{NamespaceId, NamespacePolicy};
use rand::{Rng, SeedableRng};

const BLOCK: usize = 8192;

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-faults-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
const KILL_KEYS: u32 = 200;

/// Starts the daemon on `dir`'s slot file; returns it (SIGKILLed when
/// dropped) and its socket.
fn serve(dir: &Path) -> (ServeProcess, String) {
    let daemon = spawn_serve(BIN, dir, Duration::from_secs(30), None, |cmd| {
        cmd.args([
            "--tcp-addr",
            "",
            "--metrics-addr",
            "",
            "--log-level",
            "warn",
            "--host-capacity",
            "128KiB",
            "--host-segment-bytes",
            "128KiB",
            "--disk-size",
            "8MiB",
            "--disk-engine",
            "pread",
        ])
        .arg("--disk-path")
        .arg(dir.join("slots.kvs"));
    });
    let target = daemon.target.clone();
    (daemon, target)
}

fn kill_key(k: u32) -> String {
    format!("mk-{k:04}")
}

/// What each key may hold: the versions that may be there (the last
/// acknowledged put and any in flight); a miss is always allowed (eviction,
/// a delete, a lost unsynced write).
#[derive(Default)]
struct KillOracle {
    allowed: HashMap<u32, Vec<u32>>,
}

impl KillOracle {
    fn check(&self, k: u32, r: &pb::GetResult) -> bool {
        if !r.found {
            return false;
        }
        let allowed = self.allowed.get(&k).map(Vec::as_slice).unwrap_or(&[]);
        assert!(
            allowed
                .iter()
                .any(|&v| r.payload == payload(&kill_key(k), v, BLOCK)),
            "{}: bytes of no version that may be there (allowed {allowed:?})",
            kill_key(k)
        );
        true
    }
}

#[derive(Default, Debug)]
struct KillCounts {
    puts: u64,
    gets: u64,
    deletes: u64,
    checked: u64,
    hits: u64,
}

/// Puts, gets (checked live) and deletes on random keys until the daemon dies.
async fn mixed_load(
    addr: &str,
    ns: NamespaceId,
    seed: u64,
    version: &mut u32,
    o: &mut KillOracle,
    n: &mut KillCounts,
) {
    let Ok(c) = Client::connect(addr).await else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let k = rng.random_range(0..KILL_KEYS);
        let key = kill_key(k);
        match rng.random_range(0..10) {
            0..=4 => {
                let v = *version;
                *version += 1;
                o.allowed.entry(k).or_default().push(v);
                let item = PutItem::new(Bytes::from(key.clone()), payload(&key, v, BLOCK));
                match c.batch_put(&ns, vec![item]).await {
                    Ok(r) if r.stored == 1 => {
                        o.allowed.insert(k, vec![v]);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
                n.puts += 1;
            }
            5..=7 => match c.batch_get(&ns, &[key.as_str()]).await {
                Ok(r) => {
                    n.gets += 1;
                    n.checked += 1;
                    if o.check(k, &r[0]) {
                        n.hits += 1;
                    }
                }
                Err(_) => return,
            },
            _ => match c.delete(&ns, &[key.as_str()]).await {
                Ok(_) => {
                    // Deleted: only a miss (or a later put) is allowed now.
                    o.allowed.insert(k, Vec::new());
                    n.deletes += 1;
                }
                // In flight at the kill: the old versions stay allowed.
                Err(_) => return,
            },
        }
    }
}

async fn check_all(addr: &str, ns: &NamespaceId, o: &KillOracle, n: &mut KillCounts) -> (u32, u32) {
    let c = Client::connect(addr).await.expect("connect after restart");
    let (mut hits, mut misses) = (0, 0);
    for k in 0..KILL_KEYS {
        let r = c
            .batch_get(ns, &[kill_key(k)])
            .await
            .expect("get after restart");
        n.checked += 1;
        if o.check(k, &r[0]) {
            hits += 1;
        } else {
            misses += 1;
        }
    }
    (hits, misses)
}

#[test]
fn sigkill_during_mixed_load_never_serves_wrong_bytes() {
    let dir = disk_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut oracle = KillOracle::default();
    let mut counts = KillCounts::default();
    let mut version = 1;
    let mut ns = None;
    let kills = [300u64, 700, 150, 1100, 500];
    for (round, kill_after_ms) in kills.into_iter().enumerate() {
        let (daemon, addr) = serve(dir.path());
        let id = rt.block_on(async {
            let c = Client::connect(&addr).await.expect("connect");
            let policy = NamespacePolicy {
                write_through: round % 2 == 1,
                ..NamespacePolicy::default()
            };
            c.register_namespace_with(&small_spec("faults-kill"), Some(policy))
                .await
                .expect("register")
                .id
        });
        if let Some(prev) = ns {
            assert_eq!(prev, id, "namespace id is stable across restarts");
            let (hits, misses) = rt.block_on(check_all(&addr, &id, &oracle, &mut counts));
            eprintln!("mixed kill round {round}: {hits} keys exact, {misses} misses after restart");
        }
        ns = Some(id);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(kill_after_ms));
            drop(daemon); // SIGKILL
        });
        rt.block_on(mixed_load(
            &addr,
            id,
            round as u64,
            &mut version,
            &mut oracle,
            &mut counts,
        ));
        killer.join().expect("killer");
    }
    let (_daemon, addr) = serve(dir.path());
    let id = ns.expect("namespace");
    let (hits, misses) = rt.block_on(check_all(&addr, &id, &oracle, &mut counts));
    eprintln!(
        "mixed SIGKILL: {} kills, {} puts, {} gets, {} deletes, {} blocks checked ({} live hits), final {hits} exact / {misses} misses, 0 wrong bytes",
        kills.len(),
        counts.puts,
        counts.gets,
        counts.deletes,
        counts.checked,
        counts.hits
    );
}
