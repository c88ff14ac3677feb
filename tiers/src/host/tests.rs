//! Unit tests of the host tier: replacement, prefix-aware eviction, readers
//! and pins, capacity following recency across block sizes.

use super::*;
use crate::tier::{PutOutcome, RemoveOutcome, RemoveReason, Tier};

fn ns() -> NamespaceId {
    NamespaceId([7; 16])
}

fn key(s: &str) -> BlockKey {
    BlockKey::new("key", s.as_bytes()).unwrap()
}

fn tier(blocks: u64, block: u64) -> HostTier {
    let cfg = HostTierConfig {
        capacity_bytes: blocks * block,
        segment_bytes: 64 << 20,
    };
    HostTier::new(&cfg, Arc::new(EventBus::new(1024))).unwrap()
}

fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

#[test]
fn round_trip_and_replace() {
    let t = tier(4, 4096);
    assert_eq!(
        t.put(&ns(), &key("a"), None, &payload(1, 4096)),
        PutOutcome::Stored
    );
    assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &payload(1, 4096)[..]);
    assert_eq!(
        t.put(&ns(), &key("a"), None, &payload(2, 4096)),
        PutOutcome::Stored
    );
    assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &payload(2, 4096)[..]);
    assert_eq!(t.stats().blocks, 1);
    assert_eq!(t.stats().used_bytes, 4096);
}

#[test]
fn leaves_go_before_parents() {
    let t = tier(3, 4096);
    t.put(&ns(), &key("p"), None, &payload(1, 4096));
    t.put(&ns(), &key("c1"), Some(&key("p")), &payload(2, 4096));
    t.put(&ns(), &key("x"), None, &payload(3, 4096));
    // p is the oldest but has a cached child: c1 (oldest leaf) goes first.
    t.put(&ns(), &key("y"), None, &payload(4, 4096));
    assert!(t.contains(&ns(), &key("p")));
    assert!(!t.contains(&ns(), &key("c1")));
    // Now p is a leaf again and the least recently used one.
    t.put(&ns(), &key("z"), None, &payload(5, 4096));
    assert!(!t.contains(&ns(), &key("p")));
    assert!(t.contains(&ns(), &key("x")));
}

#[test]
fn readers_keep_bytes_stable() {
    let t = tier(1, 4096);
    t.put(&ns(), &key("a"), None, &payload(1, 4096));
    let held = t.get(&ns(), &key("a")).unwrap();
    // The only slot is being read: nothing can be evicted.
    assert_eq!(
        t.put(&ns(), &key("b"), None, &payload(2, 4096)),
        PutOutcome::NoSpace
    );
    assert_eq!(&held[..], &payload(1, 4096)[..]);
    drop(held);
    assert_eq!(
        t.put(&ns(), &key("b"), None, &payload(2, 4096)),
        PutOutcome::Stored
    );
    assert_eq!(t.stats().used_bytes, 4096);
}

#[test]
fn deleted_while_read_frees_after_reader() {
    let t = tier(2, 4096);
    t.put(&ns(), &key("a"), None, &payload(1, 4096));
    let held = t.get(&ns(), &key("a")).unwrap();
    assert_eq!(
        t.remove(&ns(), &key("a"), RemoveReason::Delete),
        RemoveOutcome::Removed
    );
    assert!(t.get(&ns(), &key("a")).is_none());
    assert_eq!(t.stats().used_bytes, 4096);
    assert_eq!(&held[..], &payload(1, 4096)[..]);
    drop(held);
    assert_eq!(t.stats().used_bytes, 0);
}

#[test]
fn pins_survive_pressure_and_unpin_by_incarnation() {
    let t = tier(2, 4096);
    t.put(&ns(), &key("a"), None, &payload(1, 4096));
    let tokens = t.pin(&ns(), &[key("a")]).unwrap();
    for i in 0..10 {
        t.put(&ns(), &key(&format!("k{i}")), None, &payload(i, 4096));
    }
    assert!(t.contains(&ns(), &key("a")));
    assert_eq!(t.pin(&ns(), &[key("a"), key("nope")]), Err(1));
    t.unpin(&tokens[0]);
    assert_eq!(t.stats().pinned_blocks, 0);
    t.put(&ns(), &key("m"), None, &payload(9, 4096));
    t.put(&ns(), &key("n"), None, &payload(9, 4096));
    assert!(!t.contains(&ns(), &key("a")));
}

#[test]
fn capacity_follows_recency_across_block_sizes() {
    // 8 segments of 64 KiB. The small class fills everything first.
    let cfg = HostTierConfig {
        capacity_bytes: 8 * 65536,
        segment_bytes: 65536,
    };
    let t = HostTier::new(&cfg, Arc::new(EventBus::new(4096))).unwrap();
    for i in 0..128 {
        assert_eq!(
            t.put(&ns(), &key(&format!("s{i}")), None, &payload(1, 4096)),
            PutOutcome::Stored
        );
    }
    // A stream of big blocks must be able to use most of the tier, not one segment.
    let other = NamespaceId([9; 16]);
    for i in 0..40 {
        assert_eq!(
            t.put(&other, &key(&format!("b{i}")), None, &payload(2, 32768)),
            PutOutcome::Stored
        );
    }
    let big_cached = (0..40)
        .filter(|i| t.contains(&other, &key(&format!("b{i}"))))
        .count();
    assert!(
        big_cached >= 14,
        "only {big_cached} of the last 40 big blocks cached"
    );
    assert!(t.stats().used_bytes <= 8 * 65536);
}

#[test]
fn other_class_segment_is_reclaimed() {
    let cfg = HostTierConfig {
        capacity_bytes: 4 * 8192,
        segment_bytes: 8192,
    };
    let t = HostTier::new(&cfg, Arc::new(EventBus::new(64))).unwrap();
    for i in 0..8 {
        assert_eq!(
            t.put(&ns(), &key(&format!("s{i}")), None, &payload(i, 4096)),
            PutOutcome::Stored
        );
    }
    let other = NamespaceId([9; 16]);
    assert_eq!(
        t.put(&other, &key("big"), None, &payload(1, 8192)),
        PutOutcome::Stored
    );
    assert_eq!(
        &t.get(&other, &key("big")).unwrap()[..],
        &payload(1, 8192)[..]
    );
    assert!(t.stats().used_bytes <= 4 * 8192);
    assert_eq!(t.stats().blocks, 7);
}

/// Records the victims it is handed, after signalling `entered`, and
/// returns only once `release` says so.
struct HeldSink {
    entered: crossbeam_channel::Sender<()>,
    release: crossbeam_channel::Receiver<()>,
    seen: parking_lot::Mutex<Vec<(BlockKey, Vec<u8>)>>,
}

impl EvictionSink for HeldSink {
    fn hand_on(&self, victims: &[Victim<'_>]) {
        self.seen
            .lock()
            .extend(victims.iter().map(|v| (*v.key, v.payload.to_vec())));
        let _ = self.entered.send(());
        let _ = self.release.recv();
    }
}

#[test]
fn victims_are_handed_on_unlocked_and_a_delete_waits_for_them() {
    let t = tier(1, 4096);
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, release_rx) = crossbeam_channel::unbounded();
    let sink = Arc::new(HeldSink {
        entered: entered_tx,
        release: release_rx,
        seen: parking_lot::Mutex::new(Vec::new()),
    });
    assert!(t.set_eviction_sink(Arc::clone(&sink) as Arc<dyn EvictionSink>));
    t.put(&ns(), &key("a"), None, &payload(1, 4096));
    let deleted = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // The put of b evicts a; the sink holds it while a is leaving.
        let put = s.spawn(|| t.put(&ns(), &key("b"), None, &payload(2, 4096)));
        entered.recv().unwrap();
        // The tier's lock is free meanwhile: a is still readable, exactly.
        assert!(t.contains(&ns(), &key("a")));
        assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &payload(1, 4096)[..]);
        assert_eq!(t.stats().blocks, 1);
        // A delete of a waits until it has been handed on.
        let delete = s.spawn(|| {
            let out = t.remove(&ns(), &key("a"), RemoveReason::Delete);
            deleted.store(true, std::sync::atomic::Ordering::SeqCst);
            out
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!deleted.load(std::sync::atomic::Ordering::SeqCst));
        release.send(()).unwrap();
        assert_eq!(put.join().unwrap(), PutOutcome::Stored);
        // The eviction came first: nothing left for the delete.
        assert_eq!(delete.join().unwrap(), RemoveOutcome::Missing);
    });
    assert_eq!(
        *sink.seen.lock(),
        vec![(key("a"), payload(1, 4096))],
        "the sink saw the victim's exact bytes"
    );
    assert!(!t.contains(&ns(), &key("a")) && t.contains(&ns(), &key("b")));
    assert_eq!(t.stats().used_bytes, 4096);
    assert_eq!(t.stats().evictions, 1);
}

#[test]
fn a_victim_pinned_while_handed_on_stays() {
    let t = tier(1, 4096);
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, release_rx) = crossbeam_channel::unbounded();
    let sink = Arc::new(HeldSink {
        entered: entered_tx,
        release: release_rx,
        seen: parking_lot::Mutex::new(Vec::new()),
    });
    t.set_eviction_sink(sink);
    t.put(&ns(), &key("a"), None, &payload(1, 4096));
    std::thread::scope(|s| {
        let put = s.spawn(|| t.put(&ns(), &key("b"), None, &payload(2, 4096)));
        entered.recv().unwrap();
        let tokens = t.pin(&ns(), &[key("a")]).unwrap();
        // Let every later hand-on through at once.
        drop(release);
        // a stays pinned: nothing else can go, so b finds no room.
        assert_eq!(put.join().unwrap(), PutOutcome::NoSpace);
        assert!(t.contains(&ns(), &key("a")));
        t.unpin(&tokens[0]);
    });
    assert_eq!(
        t.put(&ns(), &key("b"), None, &payload(2, 4096)),
        PutOutcome::Stored
    );
    assert!(!t.contains(&ns(), &key("a")));
}

/// A few thousand random puts (chained and not, two block sizes), reads,
/// pins, unpins and removals under eviction pressure: after each, the
/// eviction sets hold exactly the candidates, each in the set its child
/// count says (`SlotIndex::check_sets`).
#[test]
fn eviction_sets_follow_every_operation() {
    let cfg = HostTierConfig {
        capacity_bytes: 6 * 65536,
        segment_bytes: 65536,
    };
    let t = HostTier::new(&cfg, Arc::new(EventBus::new(1 << 16))).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let k = |i: u64| key(&format!("r{i}"));
    let mut tokens = Vec::new();
    for step in 0..4000 {
        let i = next(96);
        match next(10) {
            0..=3 => {
                let parent = (i > 0 && next(4) != 0).then(|| k(i - 1));
                let len = if next(5) == 0 { 16384 } else { 4096 };
                t.put(&ns(), &k(i), parent.as_ref(), &payload(i as u8, len));
            }
            4 | 5 => {
                let _ = t.get(&ns(), &k(i));
            }
            6 => {
                let keys: Vec<BlockKey> = (i..i + 8).map(k).collect();
                let _ = t.get_many_with_meta(&ns(), &keys);
            }
            7 => {
                if let Ok(got) = t.pin(&ns(), &[k(i)]) {
                    tokens.extend(got);
                }
            }
            8 => {
                if !tokens.is_empty() {
                    let token = tokens.swap_remove(next(tokens.len() as u64) as usize);
                    t.unpin(&token);
                }
            }
            _ => {
                let _ = t.remove(&ns(), &k(i), RemoveReason::Delete);
            }
        }
        t.inner.meta.lock().check_sets();
        assert!(t.stats().used_bytes <= cfg.capacity_bytes, "step {step}");
    }
}

/// `reserve_many` takes every slot or none: a request the tier cannot meet
/// (one block pinned) keeps nothing, so the next one that fits gets them
/// all, distinct and publishable.
#[test]
fn reserve_many_is_all_or_none() {
    let t = tier(4, 4096);
    assert_eq!(
        t.put(&ns(), &key("pinned"), None, &payload(1, 4096)),
        PutOutcome::Stored
    );
    let _pin = t.pin(&ns(), &[key("pinned")]).unwrap();
    let before = t.stats().rejected_puts;
    assert!(t.reserve_many(4096, 4).is_none());
    assert_eq!(t.stats().rejected_puts, before + 1);
    let slots = t.reserve_many(4096, 3).expect("three free slots");
    let mut offsets: Vec<u64> = slots.iter().map(HostSlot::host_addr).collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 3);
    assert!(
        t.reserve_many(4096, 1).is_none(),
        "the tier is full of reservations"
    );
    for (i, mut s) in slots.into_iter().enumerate() {
        s.as_mut_slice()
            .copy_from_slice(&payload(10 + i as u8, 4096));
        t.publish(s, &ns(), &key(&format!("k{i}")), None, None)
            .unwrap();
    }
    for i in 0..3u8 {
        let got = t.get(&ns(), &key(&format!("k{i}"))).unwrap();
        assert_eq!(&got[..], &payload(10 + i, 4096)[..]);
    }
    assert!(t.contains(&ns(), &key("pinned")));
}
