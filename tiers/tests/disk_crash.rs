//! Crash consistency: a child process (this test binary, re-run as
//! `crash_child`) writes blocks in a loop and prints each acknowledged
//! (key, generation); the parent SIGKILLs it at a random point, reopens the
//! tier and checks every key against the oracle: an acknowledged key is
//! served byte-exact (its last acknowledged generation, or the one write
//! that was in flight); any other key is a miss or exact. Three kill points
//! per engine, on the same files, so later rounds start from a crashed state.

mod disk_common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use disk_common::{check_engine, key, ns, payload, tmp};
use kvstrata_tiers::disk::{DiskTier, DiskTierConfig, EngineChoice};
use kvstrata_tiers::{EventBus, PutOutcome, Tier};
use rand::Rng;

const CHILD_DIR: &str = "KVS_CRASH_CHILD_DIR";
const CHILD_ENGINE: &str = "KVS_CRASH_CHILD_ENGINE";
const CHILD_GEN: &str = "KVS_CRASH_CHILD_GEN";
const KEYS: u64 = 300;
const LEN: usize = 48 * 1024;

fn config(dir: &Path, engine: EngineChoice) -> DiskTierConfig {
    DiskTierConfig {
        segment_bytes: 1 << 20,
        engine,
        ..DiskTierConfig::in_dir(dir, 24 << 20)
    }
}

fn block(k: u64, generation: u64) -> Vec<u8> {
    let mut p = payload((k << 32) ^ generation, LEN);
    p[..8].copy_from_slice(&k.to_le_bytes());
    p[8..16].copy_from_slice(&generation.to_le_bytes());
    p
}

fn bkey(k: u64) -> kvstrata_tiers::BlockKey {
    key(&format!("crash-{k}"))
}

/// The child: runs only when spawned by `crash_rounds`.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let engine = match std::env::var(CHILD_ENGINE).as_deref() {
        Ok("pread") => EngineChoice::Pread,
        _ => EngineChoice::Auto,
    };
    let mut generation: u64 = std::env::var(CHILD_GEN)
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let t = DiskTier::open(
        &config(Path::new(&dir), engine),
        Arc::new(EventBus::new(16)),
    )
    .unwrap();
    let mut out = std::io::stdout().lock();
    // Bounded, in case the parent is gone.
    for round in 0..100u64 {
        for k in 0..KEYS {
            generation += 1;
            let parent = (k % 8 != 0).then(|| bkey(k - 1));
            let stored = t.put(&ns(), &bkey(k), parent.as_ref(), &block(k, generation));
            assert_eq!(stored, PutOutcome::Stored, "round {round} key {k}");
            writeln!(out, "ACK {k} {generation}").unwrap();
            out.flush().unwrap();
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn parse_ack(line: &str) -> Option<(u64, u64)> {
    // The harness prints "test crash_child ... " before the first ack.
    let at = line.find("ACK ")?;
    let mut it = line[at + 4..].split(' ');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn crash_rounds(engine: EngineChoice, engine_env: &str) {
    let dir = tmp();
    let cfg = config(dir.path(), engine);
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut rng = rand::rng();
    for round in 0..3u64 {
        let base = (round + 1) * 1_000_000;
        let kill_after = rng.random_range(20..900usize);
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ENGINE, engine_env)
            .env(CHILD_GEN, base.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
        let mut seen = 0;
        for line in lines.by_ref() {
            if let Some((k, g)) = parse_ack(&line.unwrap()) {
                acked.insert(k, g);
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        assert!(seen >= kill_after, "child ended early after {seen} acks");
        child.0.kill().unwrap(); // SIGKILL
        // Acks already in the pipe were acknowledged before the kill.
        for line in lines {
            if let Some((k, g)) = parse_ack(&line.unwrap()) {
                acked.insert(k, g);
            }
        }
        let _ = child.0.wait();
        let last_acked = acked.values().copied().max().unwrap_or(0);

        let t = DiskTier::open(&cfg, Arc::new(EventBus::new(16))).unwrap();
        check_engine(&t, engine);
        let mut served = 0;
        for k in 0..KEYS {
            match t.get(&ns(), &bkey(k)) {
                Some(b) => {
                    assert_eq!(b.len(), LEN);
                    let g = u64::from_le_bytes(b[8..16].try_into().unwrap());
                    assert_eq!(
                        u64::from_le_bytes(b[..8].try_into().unwrap()),
                        k,
                        "round {round}: wrong key's bytes"
                    );
                    assert!(
                        b[..] == block(k, g)[..],
                        "round {round} key {k}: bytes differ from generation {g}"
                    );
                    let ok = acked.get(&k) == Some(&g) || g > last_acked;
                    assert!(
                        ok,
                        "round {round} key {k}: served generation {g}, acknowledged {:?}",
                        acked.get(&k)
                    );
                    // An in-flight write that landed counts as the latest.
                    acked.insert(k, g);
                    served += 1;
                }
                None => assert!(
                    !acked.contains_key(&k),
                    "round {round}: acknowledged key {k} missing"
                ),
            }
        }
        assert_eq!(t.disk_stats().corrupt_blocks, 0, "round {round}");
        assert!(t.verify(false).corrupt.is_empty());
        eprintln!(
            "{engine_env} round {round}: killed after {kill_after} acks, {served} keys served"
        );
        assert_eq!(served, acked.len());
    }
}

#[test]
fn crash_rounds_io_uring() {
    crash_rounds(EngineChoice::Auto, "auto");
}

#[test]
fn crash_rounds_pread() {
    crash_rounds(EngineChoice::Pread, "pread");
}
