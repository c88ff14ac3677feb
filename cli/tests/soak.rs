//! Soak: many SIGKILL rounds of the real `kvstrata serve` under mixed
//! concurrent load, with slot records corrupted on disk while the daemon is
//! down, and an expected-state oracle checked for every key after each
//! restart on the same slot file and RocksDB index.
//!
//! Each round starts the daemon, checks every key the oracle knows, runs
//! several client tasks of puts (single and batched), gets (checked live) and
//! deletes over namespaces with different durability, SIGKILLs the daemon at
//! a random moment, then flips bytes in the headers or payloads of a few slot
//! records of the file before the next round. The promises checked:
//!
//! - a read answers the newest acknowledged version of the key (or, for a key
//!   with a put in flight at the kill, that put's version), or a miss; never
//!   an older version, a deleted block or bytes of another key;
//! - an acknowledged block of a `sync_write_through` namespace, a block read
//!   from disk at a restart and not written since, and an acknowledged
//!   write-through block older than the write-through bound
//!   (`SOAK_WT_BOUND_MS`, default 5000) at the kill are there after the next
//!   restart (write-through is asynchronous: a younger one may be lost; a
//!   host-only block may always be);
//! - a corrupted record is a miss (never wrong bytes) and is counted in the
//!   disk tier's `corrupt_blocks`.
//!
//! `SOAK_KILLS` sets the number of rounds (default 7; `make soak` runs 120),
//! `SOAK_SEED` the random seed (default: from the clock; printed), `SOAK_BIN`
//! another daemon binary to soak (default: this build's `kvstrata`). The
//! summary line (`eprintln!`) gives the numbers for docs/reliability.md.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::{ServeProcess, spawn_serve};
use common::{payload, small_spec};
use kvstrata_client::{Client, PutItem};
use kvstrata_proto::v1 as pb;
use kvstrata_types::{NamespaceId, NamespacePolicy};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_kvstrata");
/// Payload bytes of a block of `small_spec` (a slot is 4 KiB of header + 8 KiB).
const BLOCK: usize = 8192;
/// Keys per namespace. Every live block of every namespace fits the slot file
/// several times over, so the disk tier never evicts: a lost block is a loss.
const KEYS: u32 = 96;
/// Client tasks; task `t` owns the keys `k % TASKS == t` of every namespace,
/// so each task knows exactly what its own keys hold.
const TASKS: u32 = 4;
/// Keys whose records are corrupted in each down phase.
const CORRUPT_PER_ROUND: usize = 4;
/// Keys from `HOT` up are written only in the first `COLD_WRITES` of a
/// round: in a round killed after the write-through bound, those written are
/// older than the bound at the kill, so they must survive.
const HOT: u32 = KEYS * 2 / 3;
const COLD_WRITES: Duration = Duration::from_millis(500);
const DISK_SIZE: u64 = 16 << 20;

// The slot header (tiers/src/disk/header.rs): magic at 0, namespace id at
// 16..32, key length at 32, key at 33.., checksum-covered header bytes 0..200;
// the payload starts at 4096. Every slot starts 4 KiB-aligned.
const MAGIC: &[u8; 8] = b"KVSTSLOT";
const HEADER_REGION: usize = 4096;
const HEADER_LEN: usize = 200;

/// What `Stored` promises about surviving a SIGKILL, per namespace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Durability {
    /// Host tier only (disk by demotion): an acknowledged block may be lost.
    HostOnly,
    /// Write-through, asynchronous: lost only if younger than the bound.
    WriteThrough,
    /// `sync_write_through`: on disk before the answer, never lost.
    Sync,
}

struct Ns {
    name: &'static str,
    durability: Durability,
    id: Option<NamespaceId>,
}

impl Ns {
    fn policy(&self) -> NamespacePolicy {
        NamespacePolicy {
            write_through: self.durability == Durability::WriteThrough,
            sync_write_through: self.durability == Durability::Sync,
            ..NamespacePolicy::default()
        }
    }
}

fn namespaces() -> Vec<Ns> {
    vec![
        Ns {
            name: "soak-host",
            durability: Durability::HostOnly,
            id: None,
        },
        Ns {
            name: "soak-wt",
            durability: Durability::WriteThrough,
            id: None,
        },
        Ns {
            name: "soak-sync",
            durability: Durability::Sync,
            id: None,
        },
    ]
}

fn key_name(k: u32) -> String {
    format!("k-{k:03}")
}

fn block(ns: usize, k: u32, version: u32) -> Bytes {
    payload(&format!("{ns}/{}", key_name(k)), version, BLOCK)
}

/// The newest acknowledged version of a key.
#[derive(Clone, Copy, Debug)]
struct Acked {
    version: u32,
    at: Instant,
    /// Read back from disk at a restart and not written since: it must
    /// survive every later kill.
    on_disk: bool,
}

/// What one key may hold.
#[derive(Default, Clone, Debug)]
struct KeyState {
    /// Versions a read may answer (the newest acknowledged, and any put in
    /// flight at the kill); empty: only a miss (deleted, never written).
    allowed: Vec<u32>,
    acked: Option<Acked>,
    /// A put or delete whose answer never came (the daemon died).
    in_flight: bool,
    /// Its record was corrupted while the daemon was down: must miss.
    corrupted: bool,
}

#[derive(Default, Debug)]
struct Counts {
    puts: u64,
    put_blocks: u64,
    put_refused: u64,
    gets: u64,
    get_keys: u64,
    live_hits: u64,
    live_misses: u64,
    deletes: u64,
    errors_before_kill: u64,
    checked: u64,
    /// Keys found that had to be (by `must_survive`'s reason).
    required: BTreeMap<&'static str, u64>,
    exact: u64,
    in_flight_hits: u64,
    retried_hits: u64,
    miss_corrupted: u64,
    miss_in_flight: u64,
    miss_absent: u64,
    miss_host_only: u64,
    miss_young: u64,
    /// The oldest acknowledged write-through block lost (age at the kill).
    young_oldest: Duration,
    corrupt_keys: u64,
    corrupt_slots: u64,
    corrupt_headers: u64,
    corrupt_payloads: u64,
    corrupt_must_detect: u64,
    corrupt_detected: u64,
    violations: Vec<String>,
}

impl Counts {
    fn violation(&mut self, what: String) {
        eprintln!("soak VIOLATION: {what}");
        self.violations.push(what);
    }
}

#[derive(Default)]
struct Oracle {
    keys: BTreeMap<(usize, u32), KeyState>,
    next_version: u32,
    counts: Counts,
}

impl Oracle {
    fn state(&mut self, ns: usize, k: u32) -> &mut KeyState {
        self.keys.entry((ns, k)).or_default()
    }

    fn begin_put(&mut self, ns: usize, k: u32) -> u32 {
        self.next_version += 1;
        let v = self.next_version;
        let s = self.state(ns, k);
        s.allowed.push(v);
        s.in_flight = true;
        v
    }

    fn put_answered(&mut self, ns: usize, k: u32, v: u32, stored: bool) {
        let s = self.state(ns, k);
        s.in_flight = false;
        if stored {
            s.allowed = vec![v];
            s.acked = Some(Acked {
                version: v,
                at: Instant::now(),
                on_disk: false,
            });
        } else {
            // Refused: the old copy may have been replaced or not, and a
            // write-through copy may still land; nothing must survive.
            s.acked = None;
        }
    }

    fn delete_answered(&mut self, ns: usize, k: u32) {
        let s = self.state(ns, k);
        s.in_flight = false;
        s.allowed.clear();
        s.acked = None;
    }

    /// A live read by the key's owner (no op of its own in flight).
    fn check_live(&mut self, ns: usize, k: u32, r: &pb::GetResult) {
        let s = self.state(ns, k).clone();
        if !r.found {
            self.counts.live_misses += 1;
            return;
        }
        self.counts.live_hits += 1;
        if !s.allowed.iter().any(|&v| r.payload == block(ns, k, v)) {
            self.counts.violation(format!(
                "live read of ns {ns} key {}: bytes of no allowed version {:?}",
                key_name(k),
                s.allowed
            ));
        }
    }
}

/// A directory on a real filesystem (O_DIRECT is refused by tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvs-soak-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

fn slot_file(dir: &Path) -> PathBuf {
    dir.join("slots.kvs")
}

/// Starts the daemon (`SOAK_BIN`, else this build's) on `dir`'s slot file;
/// SIGKILLed when dropped.
fn serve(dir: &Path, engine: &str) -> ServeProcess {
    let bin = std::env::var("SOAK_BIN").unwrap_or_else(|_| BIN.to_string());
    spawn_serve(bin, dir, Duration::from_secs(60), None, |cmd| {
        cmd.args([
            "--tcp-addr",
            "",
            "--metrics-addr",
            "",
            "--log-level",
            "error",
            "--host-capacity",
            "128KiB",
            "--host-segment-bytes",
            "128KiB",
            "--disk-size",
            &DISK_SIZE.to_string(),
            "--disk-engine",
            engine,
        ])
        .arg("--disk-path")
        .arg(slot_file(dir));
    })
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// One client task's load on its own keys until the daemon dies.
async fn load(
    addr: String,
    ids: Vec<NamespaceId>,
    task: u32,
    seed: u64,
    oracle: Arc<Mutex<Oracle>>,
    killed: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(c) = Client::connect(&addr).await else {
        return;
    };
    let own: Vec<u32> = (0..KEYS).filter(|k| k % TASKS == task).collect();
    let hot: Vec<u32> = own.iter().copied().filter(|&k| k < HOT).collect();
    let started = Instant::now();
    let mut errors = 0u32;
    loop {
        let own = if started.elapsed() < COLD_WRITES {
            &own
        } else {
            &hot
        };
        let ns = rng.random_range(0..ids.len());
        let id = &ids[ns];
        let op = rng.random_range(0..100);
        // Puts 45..55 and gets 55..70 are batches of 2 to 4 keys.
        let n = if (45..70).contains(&op) {
            rng.random_range(2..=4)
        } else {
            1
        };
        let keys: Vec<u32> = own.choose_multiple(&mut rng, n).copied().collect();
        let names: Vec<String> = keys.iter().map(|&k| key_name(k)).collect();
        let ok = if op < 55 {
            let mut items = Vec::new();
            let mut versions = Vec::new();
            {
                let mut o = oracle.lock().expect("oracle");
                for (&k, name) in keys.iter().zip(&names) {
                    let v = o.begin_put(ns, k);
                    versions.push(v);
                    items.push(PutItem::new(Bytes::from(name.clone()), block(ns, k, v)));
                }
            }
            match c.batch_put(id, items).await {
                Ok(r) => {
                    let mut o = oracle.lock().expect("oracle");
                    o.counts.puts += 1;
                    o.counts.put_blocks += keys.len() as u64;
                    for ((&k, &v), status) in keys.iter().zip(&versions).zip(&r.results) {
                        let stored = *status == pb::PutStatus::Stored as i32;
                        if !stored {
                            o.counts.put_refused += 1;
                        }
                        o.put_answered(ns, k, v, stored);
                    }
                    true
                }
                Err(_) => false,
            }
        } else if op < 85 {
            match c.batch_get(id, &names).await {
                Ok(r) => {
                    let mut o = oracle.lock().expect("oracle");
                    o.counts.gets += 1;
                    o.counts.get_keys += keys.len() as u64;
                    for (&k, res) in keys.iter().zip(&r) {
                        o.check_live(ns, k, res);
                    }
                    true
                }
                Err(_) => false,
            }
        } else {
            oracle.lock().expect("oracle").state(ns, keys[0]).in_flight = true;
            match c.delete(id, &names[..1]).await {
                Ok(_) => {
                    let mut o = oracle.lock().expect("oracle");
                    o.counts.deletes += 1;
                    o.delete_answered(ns, keys[0]);
                    true
                }
                Err(_) => false,
            }
        };
        if !ok {
            // The op's keys stay in flight: either outcome may be there.
            if killed.load(Ordering::SeqCst) {
                return;
            }
            errors += 1;
            oracle.lock().expect("oracle").counts.errors_before_kill += 1;
            if errors > 100 {
                return;
            }
        }
    }
}

/// After a restart: every key of every namespace against the oracle.
async fn check_all(
    addr: &str,
    nss: &[Ns],
    oracle: &mut Oracle,
    killed_at: Instant,
    bound: Duration,
) {
    let c = Client::connect(addr).await.expect("connect after restart");
    for (ns, spec) in nss.iter().enumerate() {
        let id = spec.id.expect("registered");
        let all: Vec<u32> = (0..KEYS).collect();
        for chunk in all.chunks(32) {
            let names: Vec<String> = chunk.iter().map(|&k| key_name(k)).collect();
            let got = c.batch_get(&id, &names).await.expect("get after restart");
            for ((&k, name), r) in chunk.iter().zip(&names).zip(got) {
                let mut r = r;
                let s = oracle.state(ns, k).clone();
                // A miss that would be a violation is read again: a disk
                // read past its deadline answers a miss but keeps the block.
                let mut retries = 0;
                while !r.found
                    && retries < 2
                    && must_survive(&s, spec.durability, killed_at, bound).is_some()
                {
                    retries += 1;
                    r = c
                        .batch_get(&id, &[name.as_str()])
                        .await
                        .expect("get after restart")
                        .remove(0);
                    if r.found {
                        oracle.counts.retried_hits += 1;
                    }
                }
                judge(oracle, ns, spec.durability, k, &s, &r, killed_at, bound);
            }
        }
    }
}

/// Why a key must be found after the restart, if it must.
fn must_survive(
    s: &KeyState,
    d: Durability,
    killed_at: Instant,
    bound: Duration,
) -> Option<&'static str> {
    if s.corrupted || s.in_flight {
        return None;
    }
    let a = s.acked?;
    if a.on_disk {
        return Some("read from disk at the last restart, not written since");
    }
    match d {
        Durability::HostOnly => None,
        Durability::WriteThrough => (killed_at.saturating_duration_since(a.at) >= bound)
            .then_some("write-through, acknowledged before the bound"),
        Durability::Sync => Some("sync_write_through, acknowledged"),
    }
}

#[allow(clippy::too_many_arguments)]
fn judge(
    o: &mut Oracle,
    ns: usize,
    d: Durability,
    k: u32,
    s: &KeyState,
    r: &pb::GetResult,
    killed_at: Instant,
    bound: Duration,
) {
    o.counts.checked += 1;
    let name = key_name(k);
    let required = must_survive(s, d, killed_at, bound);
    if r.found {
        if let Some(why) = required {
            *o.counts.required.entry(why).or_default() += 1;
        }
        let hit = s
            .allowed
            .iter()
            .copied()
            .find(|&v| r.payload == block(ns, k, v));
        match hit {
            None => o.counts.violation(format!(
                "ns {ns} key {name}: bytes of no allowed version (allowed {:?}, {} bytes)",
                s.allowed,
                r.payload.len()
            )),
            Some(_) if s.corrupted => o.counts.violation(format!(
                "ns {ns} key {name}: its record was corrupted on disk, yet it was served"
            )),
            Some(v) => {
                if s.acked.is_some_and(|a| a.version == v) {
                    o.counts.exact += 1;
                } else {
                    o.counts.in_flight_hits += 1;
                }
                // The host tier is empty after a restart: this came from disk
                // (and stays there: a promotion copies).
                let st = o.state(ns, k);
                st.allowed = vec![v];
                st.acked = Some(Acked {
                    version: v,
                    at: Instant::now(),
                    on_disk: true,
                });
                st.in_flight = false;
                st.corrupted = false;
            }
        }
        return;
    }
    if let Some(why) = required {
        let age = s
            .acked
            .map(|a| killed_at.saturating_duration_since(a.at))
            .unwrap_or_default();
        o.counts.violation(format!(
            "ns {ns} key {name} ({d:?}): lost after the restart: {why} (acknowledged {age:?} before the kill)"
        ));
    } else if s.corrupted {
        o.counts.miss_corrupted += 1;
    } else if s.in_flight {
        o.counts.miss_in_flight += 1;
    } else if s.allowed.is_empty() {
        o.counts.miss_absent += 1;
    } else if d == Durability::HostOnly {
        o.counts.miss_host_only += 1;
    } else {
        o.counts.miss_young += 1;
        let age = s
            .acked
            .map(|a| killed_at.saturating_duration_since(a.at))
            .unwrap_or_default();
        o.counts.young_oldest = o.counts.young_oldest.max(age);
    }
    // Gone now; the allowed versions stay (a read past its deadline keeps
    // the block, and a later read may find it).
    let st = o.state(ns, k);
    st.acked = None;
    st.in_flight = false;
    st.corrupted = false;
}

/// While the daemon is down: flips bytes in the header or the payload of
/// every slot record of `CORRUPT_PER_ROUND` random keys. Returns how many of
/// them were sure to be indexed (they had to survive), so must be detected.
fn corrupt(
    dir: &Path,
    nss: &[Ns],
    o: &mut Oracle,
    rng: &mut StdRng,
    killed_at: Instant,
    bound: Duration,
) {
    let path = slot_file(dir);
    let bytes = std::fs::read(&path).expect("read slot file");
    let mut found: BTreeMap<(usize, u32), Vec<u64>> = BTreeMap::new();
    for off in (0..=bytes.len().saturating_sub(HEADER_REGION + BLOCK)).step_by(HEADER_REGION) {
        let h = &bytes[off..off + HEADER_LEN];
        if &h[..8] != MAGIC {
            continue;
        }
        let Some(ns) = nss
            .iter()
            .position(|n| n.id.is_some_and(|id| id.as_bytes()[..] == h[16..32]))
        else {
            continue;
        };
        let len = h[32] as usize;
        let Some(k) = std::str::from_utf8(&h[33..33 + len.min(64)])
            .ok()
            .and_then(|s| s.strip_prefix("k-"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        found.entry((ns, k)).or_default().push(off as u64);
    }
    // Half of the picks among keys sure to be indexed (when there are any):
    // their detection is certain.
    let mut sure: Vec<(usize, u32)> = found
        .keys()
        .copied()
        .filter(|&(ns, k)| {
            let s = o.state(ns, k).clone();
            must_survive(&s, nss[ns].durability, killed_at, bound).is_some()
        })
        .collect();
    sure.shuffle(rng);
    let mut picks: Vec<(usize, u32)> = sure.iter().copied().take(CORRUPT_PER_ROUND / 2).collect();
    let mut rest: Vec<(usize, u32)> = found
        .keys()
        .copied()
        .filter(|k| !picks.contains(k))
        .collect();
    rest.shuffle(rng);
    picks.extend(rest.into_iter().take(CORRUPT_PER_ROUND - picks.len()));
    let sure: HashSet<(usize, u32)> = sure.into_iter().collect();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open slot file");
    for key in picks {
        let in_header = rng.random_bool(0.5);
        for &off in &found[&key] {
            let at = if in_header {
                off + rng.random_range(0..HEADER_LEN as u64)
            } else {
                off + HEADER_REGION as u64 + rng.random_range(0..BLOCK as u64)
            };
            let flip = rng.random_range(1..=255u8);
            let byte = bytes[at as usize] ^ flip;
            file.write_at(&[byte], at).expect("corrupt slot");
            o.counts.corrupt_slots += 1;
        }
        if in_header {
            o.counts.corrupt_headers += 1;
        } else {
            o.counts.corrupt_payloads += 1;
        }
        o.counts.corrupt_keys += 1;
        if sure.contains(&key) {
            o.counts.corrupt_must_detect += 1;
        }
        o.state(key.0, key.1).corrupted = true;
    }
    file.sync_all().expect("sync slot file");
}

async fn register(addr: &str, nss: &mut [Ns]) {
    let c = Client::connect(addr).await.expect("connect");
    for ns in nss.iter_mut() {
        let id = c
            .register_namespace_with(&small_spec(ns.name), Some(ns.policy()))
            .await
            .expect("register")
            .id;
        if let Some(prev) = ns.id {
            assert_eq!(prev, id, "namespace id is stable across restarts");
        }
        ns.id = Some(id);
    }
}

async fn disk_corrupt_blocks(addr: &str) -> u64 {
    let c = Client::connect(addr).await.expect("connect");
    let s = c.stats().await.expect("stats");
    s.tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Disk as i32)
        .expect("disk tier")
        .corrupt_blocks
}

#[test]
fn soak_mixed_load_kills_and_corruption() {
    let kills = env_u64("SOAK_KILLS", 7);
    let bound = Duration::from_millis(env_u64("SOAK_WT_BOUND_MS", 5000));
    let seed = env_u64(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
    );
    eprintln!("soak: {kills} rounds, seed {seed} (SOAK_SEED to repeat)");
    let dir = disk_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nss = namespaces();
    let mut oracle = Oracle::default();
    let started = Instant::now();
    let mut killed_at = Instant::now();
    let mut daemon_died = 0u64;
    for round in 0..=kills {
        let engine = if round % 2 == 0 { "pread" } else { "auto" };
        let daemon = serve(dir.path(), engine);
        let sock = dir.path().join("kv.sock");
        let addr = format!("unix://{}", sock.display());
        rt.block_on(register(&addr, &mut nss));
        if round > 0 {
            rt.block_on(check_all(&addr, &nss, &mut oracle, killed_at, bound));
            let detected = rt.block_on(disk_corrupt_blocks(&addr));
            let c = &mut oracle.counts;
            c.corrupt_detected += detected;
            let (must, injected) = (c.corrupt_must_detect, c.corrupt_keys);
            // Cumulative: every round detects at least its sure ones and
            // at most its corrupted keys.
            if c.corrupt_detected < must || c.corrupt_detected > injected {
                c.violation(format!(
                    "round {round}: corrupt_blocks total {} outside [{must}, {injected}]",
                    c.corrupt_detected
                ));
            }
        }
        if round == kills {
            break;
        }
        if round > 0 && round % 10 == 0 {
            eprintln!(
                "soak: round {round}/{kills}, {:.0?}, {} keys checked, {} violations",
                started.elapsed(),
                oracle.counts.checked,
                oracle.counts.violations.len()
            );
        }
        // The kill: mostly within a second or two, every fourth round after
        // the write-through bound, so some of the round's own blocks must
        // survive too.
        let kill_after = if round % 4 == 3 {
            bound + Duration::from_millis(rng.random_range(300..1500))
        } else {
            Duration::from_millis(rng.random_range(30..1500))
        };
        let killed = Arc::new(AtomicBool::new(false));
        let ids: Vec<NamespaceId> = nss.iter().map(|n| n.id.expect("registered")).collect();
        let shared = Arc::new(Mutex::new(std::mem::take(&mut oracle)));
        let child = daemon.into_child();
        let killer = {
            let killed = killed.clone();
            std::thread::spawn(move || {
                let mut child = child;
                std::thread::sleep(kill_after);
                let died = child.try_wait().ok().flatten();
                killed.store(true, Ordering::SeqCst);
                let at = Instant::now();
                let _ = child.kill(); // SIGKILL
                let _ = child.wait();
                (at, died)
            })
        };
        rt.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    tokio::spawn(load(
                        addr.clone(),
                        ids.clone(),
                        t,
                        rng.random(),
                        shared.clone(),
                        killed.clone(),
                    ))
                })
                .collect();
            for t in tasks {
                tokio::time::timeout(kill_after + Duration::from_secs(60), t)
                    .await
                    .expect("load stops after the kill")
                    .expect("load task");
            }
        });
        let (at, died) = killer.join().expect("killer");
        killed_at = at;
        oracle = Arc::try_unwrap(shared)
            .ok()
            .expect("tasks done")
            .into_inner()
            .expect("oracle");
        if let Some(status) = died {
            daemon_died += 1;
            oracle.counts.violation(format!(
                "round {round}: the daemon exited by itself: {status}"
            ));
        }
        corrupt(dir.path(), &nss, &mut oracle, &mut rng, killed_at, bound);
    }
    let c = &oracle.counts;
    let misses =
        c.miss_corrupted + c.miss_in_flight + c.miss_absent + c.miss_host_only + c.miss_young;
    eprintln!(
        "soak summary: {kills} SIGKILL rounds in {:.0?} (seed {seed}); load: {} ops ({} puts of {} blocks, {} refused; {} gets of {} keys: {} live hits, {} live misses; {} deletes; {} errors before a kill); \
         after restarts: {} keys checked ({} had to be there, all found: {:?}): {} exact, {} in-flight version, {} found on a re-read, {misses} misses ({} corrupted, {} op in flight, {} deleted or never written, {} host-only, {} write-through younger than {bound:?}, the oldest {:?}); \
         corruption: {} keys / {} slots ({} headers, {} payloads), {} detected by corrupt_blocks (at least {} sure); daemon exits: {daemon_died}; violations: {}",
        started.elapsed(),
        c.puts + c.gets + c.deletes,
        c.puts,
        c.put_blocks,
        c.put_refused,
        c.gets,
        c.get_keys,
        c.live_hits,
        c.live_misses,
        c.deletes,
        c.errors_before_kill,
        c.checked,
        c.required.values().sum::<u64>(),
        c.required,
        c.exact,
        c.in_flight_hits,
        c.retried_hits,
        c.miss_corrupted,
        c.miss_in_flight,
        c.miss_absent,
        c.miss_host_only,
        c.miss_young,
        c.young_oldest,
        c.corrupt_keys,
        c.corrupt_slots,
        c.corrupt_headers,
        c.corrupt_payloads,
        c.corrupt_detected,
        c.corrupt_must_detect,
        c.violations.len(),
    );
    assert!(
        c.violations.is_empty(),
        "{} violations, first: {:?}",
        c.violations.len(),
        &c.violations[..c.violations.len().min(10)]
    );
    assert!(
        c.checked > 0 && c.corrupt_keys > 0,
        "the soak checked nothing"
    );
}
