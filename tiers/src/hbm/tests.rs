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
