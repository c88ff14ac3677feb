//! Unit tests of the HBM tier on the CPU backend: pressure demotes to the
//! host tier; readers and pins are never victims.

use super::*;
use crate::host::HostTierConfig;
use crate::tier::Tier;

fn ns() -> NamespaceId {
    NamespaceId([3; 16])
}

fn key(s: &str) -> BlockKey {
    BlockKey::new("key", s.as_bytes()).unwrap()
}

fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13) ^ tag).collect()
}

fn tiers(hbm_blocks: u64, host_blocks: u64, block: u64) -> (HbmTier, HostTier) {
    let events = Arc::new(EventBus::new(1024));
    let host = HostTier::new(
        &HostTierConfig {
            capacity_bytes: host_blocks * block,
            segment_bytes: 64 << 20,
        },
        Arc::clone(&events),
    )
    .unwrap();
    let cfg = HbmTierConfig {
        capacity_bytes: hbm_blocks * block,
        ..HbmTierConfig::default()
    };
    let hbm = HbmTier::new(&cfg, Gpu::cpu(), 0, Some(host.clone()), events).unwrap();
    (hbm, host)
}

#[test]
fn pressure_demotes_to_host() {
    let (hbm, host) = tiers(2, 8, 4096);
    for i in 0..5u8 {
        let k = key(&format!("k{i}"));
        assert_eq!(
            hbm.put(&ns(), &k, None, &payload(i, 4096)),
            PutOutcome::Stored
        );
        assert!(hbm.stats().used_bytes <= 2 * 4096);
    }
    assert_eq!(hbm.stats().blocks, 2);
    assert_eq!(host.stats().blocks, 3);
    for i in 0..5u8 {
        let k = key(&format!("k{i}"));
        let got = hbm.get(&ns(), &k).or_else(|| host.get(&ns(), &k)).unwrap();
        assert_eq!(&got[..], &payload(i, 4096)[..]);
    }
    assert_eq!(hbm.hbm_stats().demoted, 3);
}

#[test]
fn readers_and_pins_are_never_victims() {
    let (hbm, _host) = tiers(2, 8, 4096);
    hbm.put(&ns(), &key("a"), None, &payload(1, 4096));
    hbm.put(&ns(), &key("b"), None, &payload(2, 4096));
    let read = hbm.acquire(&ns(), &key("a")).unwrap();
    let pins = hbm.pin(&ns(), &[key("b")]).unwrap();
    assert_eq!(
        hbm.put(&ns(), &key("c"), None, &payload(3, 4096)),
        PutOutcome::NoSpace
    );
    drop(read);
    assert_eq!(
        hbm.put(&ns(), &key("c"), None, &payload(3, 4096)),
        PutOutcome::Stored
    );
    assert!(hbm.contains(&ns(), &key("b")));
    assert!(!hbm.contains(&ns(), &key("a")));
    hbm.unpin(&pins[0]);
}

#[test]
fn reads_given_back_in_one_batch_free_their_blocks_once() {
    let (hbm, _host) = tiers(2, 8, 4096);
    let (other, _other_host) = tiers(1, 8, 4096);
    hbm.put(&ns(), &key("a"), None, &payload(1, 4096));
    hbm.put(&ns(), &key("b"), None, &payload(2, 4096));
    other.put(&ns(), &key("x"), None, &payload(3, 4096));
    let mut reads: Vec<HbmRead> = hbm
        .acquire_many(&ns(), &[key("a"), key("missing"), key("b")])
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(reads.len(), 2);
    // A read of another tier in the batch is given back by its own drop.
    reads.push(other.acquire(&ns(), &key("x")).unwrap());
    assert_eq!(
        hbm.put(&ns(), &key("c"), None, &payload(4, 4096)),
        PutOutcome::NoSpace,
        "both blocks are being read"
    );
    assert_eq!(
        other.put(&ns(), &key("y"), None, &payload(5, 4096)),
        PutOutcome::NoSpace
    );
    hbm.release_many(reads);
    assert_eq!(
        hbm.put(&ns(), &key("c"), None, &payload(4, 4096)),
        PutOutcome::Stored
    );
    assert_eq!(
        other.put(&ns(), &key("y"), None, &payload(5, 4096)),
        PutOutcome::Stored
    );
    // Each reader count went down once: a new read and its drop leave the
    // block readable and evictable as before (a second decrement would
    // have underflowed).
    let again = hbm.acquire(&ns(), &key("c")).unwrap();
    drop(again);
    assert_eq!(
        hbm.put(&ns(), &key("d"), None, &payload(6, 4096)),
        PutOutcome::Stored
    );
    assert_eq!(hbm.stats().blocks, 2);
}

/// What `acquire_many` of 511 keys costs (an 8k prefix of 16-token blocks),
/// in a tier of 4,096 chained blocks on the CPU backend: prints the best and
/// mean of 400 batches per round. A timing harness, not a check
/// (docs/benchmarks.md cites it): `cargo test --release -p kvstrata-tiers
/// --lib acquire_many_timing -- --ignored --nocapture`. What a read must
/// keep (LRU order, the eviction sets) is tested by
/// `host::tests::eviction_sets_follow_every_operation`.
#[test]
#[ignore = "a timing harness: prints, asserts nothing about time"]
fn acquire_many_timing() {
    let (hbm, _host) = tiers(8192, 16, 4096);
    let mut keys = Vec::new();
    let mut parent: Option<BlockKey> = None;
    for i in 0..4096u32 {
        let k = key(&format!("k{i}"));
        assert_eq!(
            hbm.put(&ns(), &k, parent.as_ref(), &payload(i as u8, 4096)),
            PutOutcome::Stored
        );
        parent = Some(k);
        keys.push(k);
    }
    for round in 0..5 {
        let mut best = std::time::Duration::MAX;
        let mut total = std::time::Duration::ZERO;
        for it in 0..400 {
            let at = (it * 511) % (4096 - 511);
            let batch = &keys[at..at + 511];
            let t = std::time::Instant::now();
            let got = hbm.acquire_many(&ns(), batch);
            let d = t.elapsed();
            hbm.release_many(got.into_iter().flatten().collect());
            best = best.min(d);
            total += d;
        }
        eprintln!(
            "round {round}: 511 keys best {:?} mean {:?}",
            best,
            total / 400
        );
    }
}

/// Random puts (demoting under pressure), batch reads held across later
/// puts, single reads and removals: after each, the HBM tier's eviction
/// sets hold exactly its candidates (`SlotIndex::check_sets`).
#[test]
fn eviction_sets_follow_reads_and_demotions() {
    let (hbm, _host) = tiers(12, 64, 4096);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let k = |i: u64| key(&format!("h{i}"));
    let mut held = Vec::new();
    for _ in 0..2000 {
        let i = next(40);
        match next(8) {
            0..=3 => {
                let parent = (i > 0 && next(3) != 0).then(|| k(i - 1));
                hbm.put(&ns(), &k(i), parent.as_ref(), &payload(i as u8, 4096));
            }
            4 => {
                let keys: Vec<BlockKey> = (i..i + 6).map(k).collect();
                held.push(hbm.acquire_many(&ns(), &keys));
            }
            5 => {
                if let Some(reads) = held.pop() {
                    hbm.release_many(reads.into_iter().flatten().collect());
                }
            }
            6 => {
                let _ = hbm.get(&ns(), &k(i));
            }
            _ => {
                let _ = hbm.remove(&ns(), &k(i), crate::tier::RemoveReason::Delete);
            }
        }
        hbm.inner.meta.lock().index.check_sets();
    }
}
