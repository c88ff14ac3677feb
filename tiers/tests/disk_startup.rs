//! Start-up time on a large index: synthetic entries are written straight
//! into RocksDB through the index module, then `DiskTier::open` is timed.
//! 100 000 entries by default; set KVS_STARTUP_ENTRIES=1000000 for the
//! 1M-entry measurement (an 8 GiB preallocated file).

mod disk_common;

use std::sync::Arc;
use std::time::Instant;

use disk_common::{key, ns, tmp};
use kvstrata_tiers::disk::index::{IndexEntry, IndexStore};
use kvstrata_tiers::disk::{DiskTier, DiskTierConfig, EngineChoice};
use kvstrata_tiers::{EventBus, Tier};

#[test]
fn open_with_many_index_entries() {
    let n: u64 = std::env::var("KVS_STARTUP_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tmp();
    let slot = 8192u64;
    let per_segment = (1u64 << 20) / slot;
    let cfg = DiskTierConfig {
        segment_bytes: 1 << 20,
        engine: EngineChoice::Pread,
        ..DiskTierConfig::in_dir(dir.path(), n.div_ceil(per_segment) * (1 << 20))
    };
    let events = || Arc::new(EventBus::new(16));
    drop(DiskTier::open(&cfg, events()).unwrap());

    let t0 = Instant::now();
    let index = IndexStore::open(&cfg.index_dir).unwrap();
    index
        .insert_synthetic((0..n).map(|i| {
            let entry = IndexEntry {
                file: 0,
                segment: (i / per_segment) as u32,
                slot: (i % per_segment) as u32,
                slot_bytes: slot as u32,
                offset: i * slot,
                payload_len: 4096,
                checksum: i,
                seq: i + 1,
                last_access_ms: 1_700_000_000_000 + i,
                parent: (i % 16 != 0).then(|| key(&format!("s{:08}", i - 1))),
            };
            (ns(), key(&format!("s{i:08}")), entry)
        }))
        .unwrap();
    drop(index);
    let insert = t0.elapsed();

    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let t = DiskTier::open(&cfg, events()).unwrap();
    let open = t0.elapsed();
    let rss = rss_bytes().saturating_sub(rss0);
    let s = t.stats();
    assert_eq!(s.blocks, n);
    assert_eq!(s.used_bytes, n * slot);
    assert_eq!(t.meta(&ns(), &key("s00000000")).unwrap().children, 1);
    // Synthetic entries have no slot data: a read fails verification.
    assert!(t.get(&ns(), &key("s00000005")).is_none());
    assert_eq!(t.disk_stats().corrupt_blocks, 1);
    eprintln!(
        "startup: {n} index entries inserted in {insert:?}, DiskTier::open took {open:?}, resident memory +{} MiB",
        rss >> 20
    );
    let t0 = Instant::now();
    drop(t);
    eprintln!("startup: drop took {:?}", t0.elapsed());
}

#[test]
fn conflicting_index_entries_keep_the_newest() {
    let dir = tmp();
    let cfg = DiskTierConfig {
        segment_bytes: 1 << 20,
        engine: EngineChoice::Pread,
        ..DiskTierConfig::in_dir(dir.path(), 4 << 20)
    };
    let events = || Arc::new(EventBus::new(16));
    let t = DiskTier::open(&cfg, events()).unwrap();
    let p = disk_common::payload(1, 4096);
    t.put(&ns(), &key("real"), None, &p);
    let (_, offset, slot_bytes) = t.slot_location(&ns(), &key("real")).unwrap();
    drop(t);
    // A stale entry claiming the same slot with an older sequence number,
    // and one pointing outside the file.
    let stale = IndexEntry {
        file: 0,
        segment: (offset >> 20) as u32,
        slot: ((offset % (1 << 20)) / slot_bytes) as u32,
        slot_bytes: slot_bytes as u32,
        offset,
        payload_len: 4096,
        checksum: 0,
        seq: 0,
        last_access_ms: 0,
        parent: None,
    };
    let outside = IndexEntry {
        segment: 99,
        offset: 99 << 20,
        ..stale
    };
    let index = IndexStore::open(&cfg.index_dir).unwrap();
    index
        .insert_synthetic([(ns(), key("stale"), stale), (ns(), key("outside"), outside)])
        .unwrap();
    drop(index);
    let t = DiskTier::open(&cfg, events()).unwrap();
    assert_eq!(t.stats().blocks, 1);
    assert_eq!(&t.get(&ns(), &key("real")).unwrap()[..], &p[..]);
    assert!(!t.contains(&ns(), &key("stale")) && !t.contains(&ns(), &key("outside")));
    assert_eq!(t.disk_stats().corrupt_blocks, 2);
    drop(t);
    // The dropped entries were deleted from the index.
    let t = DiskTier::open(&cfg, events()).unwrap();
    assert_eq!((t.stats().blocks, t.disk_stats().corrupt_blocks), (1, 0));
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
