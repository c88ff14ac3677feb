//! The disk tier on real files, real RocksDB and O_DIRECT, each test run on
//! both engines (io_uring and pread/pwrite).

mod disk_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use disk_common::{config, flip_byte, key, ns, open, payload, tmp};
use kvstrata_tiers::disk::header::HEADER_REGION;
use kvstrata_tiers::disk::{CorruptKind, DiskError, DiskPut, DiskTier, EngineChoice, FaultPlan};
use kvstrata_tiers::{EventBus, PutOutcome, RemoveOutcome, RemoveReason, Tier};

both_engines!(
    round_trip,
    reopen_serves_same_bytes,
    corruption_is_detected_and_dropped,
    capacity_holds_and_leaves_go_first,
    data_without_index_is_free_after_reopen,
    io_errors_and_timeouts_are_misses,
    concurrent_puts_and_gets_under_eviction,
    slow_write_times_out_and_keeps_its_slot_until_done,
);

fn slot_bytes(len: usize) -> u64 {
    (HEADER_REGION + len.div_ceil(4096) * 4096) as u64
}

fn round_trip(engine: EngineChoice) {
    let dir = tmp();
    let t = open(&config(dir.path(), 32 << 20, engine));
    let sizes = [1usize, 4096, 5000, 65536, 300_000, (1 << 20) - 4096];
    let mut used = 0;
    for (i, &len) in sizes.iter().enumerate() {
        let parent = (i > 0).then(|| key(&format!("b{}", i - 1)));
        let p = payload(i as u64, len);
        assert_eq!(
            t.put(&ns(), &key(&format!("b{i}")), parent.as_ref(), &p),
            PutOutcome::Stored
        );
        used += slot_bytes(len);
    }
    for (i, &len) in sizes.iter().enumerate() {
        let got = t.get(&ns(), &key(&format!("b{i}"))).expect("hit");
        assert_eq!(&got[..], &payload(i as u64, len)[..], "block {i}");
    }
    let s = t.stats();
    assert_eq!(
        (s.blocks, s.used_bytes, s.hits),
        (sizes.len() as u64, used, sizes.len() as u64)
    );
    let m = t.meta(&ns(), &key("b1")).unwrap();
    assert_eq!((m.children, m.payload_bytes), (1, 4096));
    assert_eq!(m.parent, Some(key("b0")));

    // Replace, batch get, remove.
    assert_eq!(
        t.put(&ns(), &key("b2"), None, &payload(99, 5000)),
        PutOutcome::Stored
    );
    let keys = [key("b2"), key("nope"), key("b3")];
    let got = t.get_many(&ns(), &keys);
    assert_eq!(&got[0].as_ref().unwrap()[..], &payload(99, 5000)[..]);
    assert!(got[1].is_none());
    assert_eq!(&got[2].as_ref().unwrap()[..], &payload(3, 65536)[..]);
    assert_eq!(t.stats().used_bytes, used);
    assert_eq!(
        t.remove(&ns(), &key("b2"), RemoveReason::Delete),
        RemoveOutcome::Removed
    );
    assert!(t.get(&ns(), &key("b2")).is_none());
    assert_eq!(t.stats().used_bytes, used - slot_bytes(5000));

    // Batch put, and a block larger than a segment is refused.
    let big = payload(7, 2 << 20);
    let items: Vec<_> = (0..8)
        .map(|i| DiskPut {
            key: key(&format!("m{i}")),
            parent: None,
            payload: &big[..100_000 + i * 1000],
        })
        .collect();
    assert!(
        t.put_many(&ns(), &items)
            .iter()
            .all(|o| *o == PutOutcome::Stored)
    );
    for (i, it) in items.iter().enumerate() {
        assert_eq!(&t.get(&ns(), &it.key).unwrap()[..], it.payload, "m{i}");
    }
    assert_eq!(t.put(&ns(), &key("huge"), None, &big), PutOutcome::NoSpace);
    assert_eq!(t.max_block_bytes(), (1 << 20) - 4096);
    let d = t.disk_stats();
    assert!(d.write_ops >= 15 && d.read_ops >= 15 && d.write_bytes > 0 && d.read_bytes > 0);
    assert_eq!((d.corrupt_blocks, d.io_errors, d.timeouts), (0, 0, 0));
}

fn reopen_serves_same_bytes(engine: EngineChoice) {
    let dir = tmp();
    let cfg = config(dir.path(), 16 << 20, engine);
    let t = open(&cfg);
    for i in 0..40u64 {
        let parent = (i % 4 != 0).then(|| key(&format!("k{}", i - 1)));
        assert_eq!(
            t.put(
                &ns(),
                &key(&format!("k{i}")),
                parent.as_ref(),
                &payload(i, 20_000 + i as usize)
            ),
            PutOutcome::Stored
        );
    }
    // Touch some blocks so access times are persisted at drop.
    t.get(&ns(), &key("k0"));
    let used = t.stats().used_bytes;
    drop(t);

    let t = open(&cfg);
    assert_eq!(t.stats().blocks, 40);
    assert_eq!(t.stats().used_bytes, used);
    for i in 0..40u64 {
        assert_eq!(
            &t.get(&ns(), &key(&format!("k{i}"))).unwrap()[..],
            &payload(i, 20_000 + i as usize)[..]
        );
    }
    assert_eq!(t.meta(&ns(), &key("k0")).unwrap().children, 1);
    // New writes land in free slots, never over the restored ones.
    for i in 40..80u64 {
        assert_eq!(
            t.put(&ns(), &key(&format!("k{i}")), None, &payload(i, 20_000)),
            PutOutcome::Stored
        );
    }
    for i in 0..40u64 {
        assert_eq!(
            &t.get(&ns(), &key(&format!("k{i}"))).unwrap()[..],
            &payload(i, 20_000 + i as usize)[..]
        );
    }
    assert_eq!(t.disk_stats().corrupt_blocks, 0);
    drop(t);
    let t = open(&cfg);
    assert_eq!(t.stats().blocks, 80);
}

fn corruption_is_detected_and_dropped(engine: EngineChoice) {
    let dir = tmp();
    let cfg = config(dir.path(), 8 << 20, engine);
    let t = open(&cfg);
    for i in 0..6u64 {
        t.put(&ns(), &key(&format!("c{i}")), None, &payload(i, 30_000));
    }
    let loc = |k: &str| t.slot_location(&ns(), &key(k)).unwrap();
    // c0: payload byte (while open); c1: header byte (while open).
    let (path, off, _) = loc("c0");
    flip_byte(&path, off + HEADER_REGION as u64 + 12_345);
    let (path, off, _) = loc("c1");
    flip_byte(&path, off + 40);
    // Inspect reports without dropping.
    let ins = t.inspect_header(&ns(), &key("c0")).unwrap();
    assert!(!ins.payload_checksum_ok);
    assert_eq!(ins.problem, Some(CorruptKind::PayloadChecksum));
    assert_eq!(ins.header.as_ref().unwrap().payload_len, 30_000);
    let ins = t.inspect_header(&ns(), &key("c2")).unwrap();
    assert!(ins.payload_checksum_ok && ins.problem.is_none());
    assert_eq!(ins.header.as_ref().unwrap().key, key("c2"));
    assert_eq!(
        t.inspect_header(&ns(), &key("c1")).unwrap().header,
        Err(CorruptKind::HeaderChecksum)
    );

    assert!(t.get(&ns(), &key("c0")).is_none());
    assert!(t.get(&ns(), &key("c1")).is_none());
    assert_eq!(t.disk_stats().corrupt_blocks, 2);
    assert!(!t.contains(&ns(), &key("c0")) && !t.contains(&ns(), &key("c1")));
    assert_eq!(
        &t.get(&ns(), &key("c2")).unwrap()[..],
        &payload(2, 30_000)[..]
    );

    // Verify finds corruption made while closed; a read of it after reopen is a miss.
    let (p3, o3, _) = loc("c3");
    let (p4, o4, _) = loc("c4");
    drop(t);
    flip_byte(&p3, o3 + HEADER_REGION as u64 + 29_999);
    flip_byte(&p4, o4 + 1);
    let t = open(&cfg);
    let r = t.verify(false);
    assert_eq!(r.scanned, 4);
    let mut bad: Vec<_> = r
        .corrupt
        .iter()
        .map(|c| (c.key.to_string(), c.reason))
        .collect();
    bad.sort();
    assert_eq!(
        bad,
        vec![
            ("c3".into(), CorruptKind::PayloadChecksum),
            ("c4".into(), CorruptKind::Magic)
        ]
    );
    assert!(t.contains(&ns(), &key("c3")));
    assert!(t.get(&ns(), &key("c3")).is_none());
    assert_eq!(t.verify(true).corrupt.len(), 1);
    assert!(!t.contains(&ns(), &key("c4")));
    assert_eq!(t.disk_stats().corrupt_blocks, 2);
    for k in ["c2", "c5"] {
        assert!(t.get(&ns(), &key(k)).is_some(), "{k}");
    }
    assert_eq!(t.stats().blocks, 2);
    drop(t);
    // Dropped blocks stay dropped.
    let t = open(&cfg);
    assert_eq!(t.stats().blocks, 2);
}

fn capacity_holds_and_leaves_go_first(engine: EngineChoice) {
    let dir = tmp();
    let len = 16_384;
    let slot = slot_bytes(len);
    let capacity = 8 * slot;
    let cfg = config(dir.path(), capacity, engine);
    let t = open(&cfg);
    let file = cfg.files[0].path.clone();
    let file_len = || std::fs::metadata(&file).unwrap().len();
    assert_eq!(file_len(), capacity);
    // root ← mid ← (leaves written later)
    t.put(&ns(), &key("root"), None, &payload(0, len));
    t.put(&ns(), &key("mid"), Some(&key("root")), &payload(1, len));
    t.put(&ns(), &key("pinned"), None, &payload(2, len));
    let tokens = t.pin(&ns(), &[key("pinned")]).unwrap();
    for i in 0..40u64 {
        let parent = (i % 2 == 0).then(|| key("mid"));
        assert_eq!(
            t.put(
                &ns(),
                &key(&format!("l{i}")),
                parent.as_ref(),
                &payload(10 + i, len)
            ),
            PutOutcome::Stored
        );
        let s = t.stats();
        assert!(s.used_bytes <= capacity && s.blocks <= 8, "{s:?}");
        assert_eq!(file_len(), capacity);
    }
    // The oldest blocks with children stayed; the pinned one too.
    for k in ["root", "mid", "pinned"] {
        assert!(t.contains(&ns(), &key(k)), "{k}");
    }
    assert!(!t.contains(&ns(), &key("l0")));
    assert!(t.contains(&ns(), &key("l39")));
    assert_eq!(
        &t.get(&ns(), &key("pinned")).unwrap()[..],
        &payload(2, len)[..]
    );
    assert!(t.stats().evictions >= 35);
    // Everything pinned: no room.
    let all = t.keys_of(&ns());
    let more = t.pin(&ns(), &all).unwrap();
    assert_eq!(
        t.put(&ns(), &key("x"), None, &payload(5, len)),
        PutOutcome::NoSpace
    );
    for tok in more.iter().chain(&tokens) {
        t.unpin(tok);
    }
    assert_eq!(t.stats().pinned_blocks, 0);
    assert_eq!(
        t.put(&ns(), &key("x"), None, &payload(5, len)),
        PutOutcome::Stored
    );
    // A larger class reclaims the (only) segment of the smaller one.
    assert_eq!(
        t.put(&ns(), &key("big"), None, &payload(6, 7 * 16_384)),
        PutOutcome::Stored
    );
    assert_eq!(t.stats().blocks, 1);
    assert!(t.stats().used_bytes <= capacity);
    drop(t);
    assert_eq!(file_len(), capacity);
    let t = open(&cfg);
    assert_eq!(t.stats().blocks, 1);
    assert_eq!(
        &t.get(&ns(), &key("big")).unwrap()[..],
        &payload(6, 7 * 16_384)[..]
    );
}

fn data_without_index_is_free_after_reopen(engine: EngineChoice) {
    let dir = tmp();
    let len = 16_384;
    let cfg = config(dir.path(), 4 * slot_bytes(len), engine);
    let t = open(&cfg);
    for k in ["a", "b", "c"] {
        assert_eq!(
            t.put(&ns(), &key(k), None, &payload(1, len)),
            PutOutcome::Stored
        );
    }
    t.set_fault_plan(FaultPlan {
        drop_index_writes: true,
        ..FaultPlan::default()
    });
    assert_eq!(
        t.put(&ns(), &key("d"), None, &payload(2, len)),
        PutOutcome::NoSpace
    );
    assert_eq!(t.disk_stats().write_ops, 4, "the data write happened");
    drop(t);
    let t = open(&cfg);
    assert!(!t.contains(&ns(), &key("d")));
    assert_eq!(t.stats().used_bytes, 3 * slot_bytes(len));
    // The slot is free: a new block fits without evicting anything.
    assert_eq!(
        t.put(&ns(), &key("e"), None, &payload(3, len)),
        PutOutcome::Stored
    );
    assert_eq!(t.stats().evictions, 0);
    for k in ["a", "b", "c"] {
        assert_eq!(&t.get(&ns(), &key(k)).unwrap()[..], &payload(1, len)[..]);
    }
    assert_eq!(&t.get(&ns(), &key("e")).unwrap()[..], &payload(3, len)[..]);
}

fn io_errors_and_timeouts_are_misses(engine: EngineChoice) {
    let dir = tmp();
    let mut cfg = config(dir.path(), 8 << 20, engine);
    cfg.read_timeout = Duration::from_millis(200);
    let t = open(&cfg);
    let p = payload(1, 50_000);
    t.put(&ns(), &key("a"), None, &p);

    t.set_fault_plan(FaultPlan {
        fail_reads_with: Some(libc::EIO),
        ..FaultPlan::default()
    });
    assert!(t.get(&ns(), &key("a")).is_none());
    assert_eq!(t.disk_stats().io_errors, 1);
    t.set_fault_plan(FaultPlan {
        short_reads: true,
        ..FaultPlan::default()
    });
    assert!(t.get(&ns(), &key("a")).is_none());
    assert_eq!(t.disk_stats().io_errors, 2);

    t.set_fault_plan(FaultPlan {
        delay_reads: Some(Duration::from_secs(2)),
        ..FaultPlan::default()
    });
    let t0 = Instant::now();
    assert!(t.get(&ns(), &key("a")).is_none());
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(t.disk_stats().timeouts, 1);

    // The block stays indexed and is served once the drive behaves.
    t.set_fault_plan(FaultPlan::default());
    assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &p[..]);
    assert_eq!(t.disk_stats().corrupt_blocks, 0);

    let used = t.stats().used_bytes;
    t.set_fault_plan(FaultPlan {
        fail_writes_with: Some(libc::ENOSPC),
        ..FaultPlan::default()
    });
    assert_eq!(t.put(&ns(), &key("b"), None, &p), PutOutcome::NoSpace);
    assert_eq!(t.disk_stats().io_errors, 3);
    assert_eq!(t.stats().used_bytes, used);
    t.set_fault_plan(FaultPlan::default());
    assert_eq!(t.put(&ns(), &key("b"), None, &p), PutOutcome::Stored);
    let s = t.stats();
    assert_eq!((s.hits, s.misses, s.rejected_puts), (1, 3, 1));
    // Dropping the tier with an abandoned read in flight waits for it safely.
    t.set_fault_plan(FaultPlan {
        delay_reads: Some(Duration::from_secs(1)),
        ..FaultPlan::default()
    });
    assert!(t.get(&ns(), &key("b")).is_none());
    drop(t);
}

#[test]
fn layout_mismatch_and_bad_config_are_refused() {
    let dir = tmp();
    let cfg = config(dir.path(), 4 << 20, EngineChoice::Pread);
    let t = open(&cfg);
    t.put(&ns(), &key("a"), None, &payload(1, 4096));
    drop(t);
    let events = || Arc::new(EventBus::new(16));
    let mut other = cfg.clone();
    other.segment_bytes = 512 << 10;
    let e = DiskTier::open(&other, events()).unwrap_err();
    assert!(matches!(e, DiskError::LayoutMismatch { .. }), "{e}");
    assert!(e.to_string().contains("segment=1048576"), "{e}");
    let mut other = cfg.clone();
    other.files[0].size_bytes = 8 << 20;
    assert!(matches!(
        DiskTier::open(&other, events()).unwrap_err(),
        DiskError::LayoutMismatch { .. }
    ));
    // Nothing was changed: the original config still opens and serves.
    let t = open(&cfg);
    assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &payload(1, 4096)[..]);
    drop(t);

    let mut bad = cfg.clone();
    bad.files.clear();
    assert!(matches!(
        DiskTier::open(&bad, events()).unwrap_err(),
        DiskError::Config { field: "files", .. }
    ));
    let mut bad = cfg.clone();
    bad.segment_bytes = 5000;
    assert!(matches!(
        DiskTier::open(&bad, events()).unwrap_err(),
        DiskError::Config {
            field: "segment_bytes",
            ..
        }
    ));
}

#[test]
fn several_files_share_the_load() {
    let dir = tmp();
    let mut cfg = config(dir.path(), 4 << 20, EngineChoice::Auto);
    cfg.files.push(kvstrata_tiers::disk::DiskFileConfig {
        path: dir.path().join("second/slots-1.kvs"),
        size_bytes: 2 << 20,
    });
    let t = open(&cfg);
    assert_eq!(t.stats().capacity_bytes, 6 << 20);
    for i in 0..40u64 {
        assert_eq!(
            t.put(&ns(), &key(&format!("f{i}")), None, &payload(i, 100_000)),
            PutOutcome::Stored
        );
    }
    let files: std::collections::HashSet<_> = (30..40)
        .map(|i| t.slot_location(&ns(), &key(&format!("f{i}"))).unwrap().0)
        .collect();
    assert_eq!(files.len(), 2);
    assert!(t.stats().used_bytes <= 6 << 20);
    drop(t);
    let t = open(&cfg);
    for i in 0..40u64 {
        assert_eq!(
            &t.get(&ns(), &key(&format!("f{i}"))).unwrap()[..],
            &payload(i, 100_000)[..]
        );
    }
    assert_eq!(t.stats().blocks, 40);
    assert_eq!(
        std::fs::metadata(dir.path().join("second/slots-1.kvs"))
            .unwrap()
            .len(),
        2 << 20
    );
}

#[test]
fn capacity_follows_recency_across_block_sizes() {
    let dir = tmp();
    let mut cfg = config(dir.path(), 8 * 65536, EngineChoice::Pread);
    cfg.segment_bytes = 65536;
    let t = open(&cfg);
    for i in 0..64u64 {
        assert_eq!(
            t.put(&ns(), &key(&format!("s{i}")), None, &payload(i, 4096)),
            PutOutcome::Stored
        );
    }
    let other = kvstrata_tiers::NamespaceId([9; 16]);
    for i in 0..40u64 {
        assert_eq!(
            t.put(&other, &key(&format!("b{i}")), None, &payload(i, 28 * 1024)),
            PutOutcome::Stored
        );
        assert!(t.stats().used_bytes <= 8 * 65536);
    }
    let big = (0..40)
        .filter(|i| t.contains(&other, &key(&format!("b{i}"))))
        .count();
    assert!(big >= 14, "only {big} of the last 40 big blocks cached");
    for i in 0..40u64 {
        if let Some(b) = t.get(&other, &key(&format!("b{i}"))) {
            assert_eq!(&b[..], &payload(i, 28 * 1024)[..]);
        }
    }
}

/// Self-describing block: key id and generation in the first 16 bytes.
fn tagged(k: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut p = payload((k << 32) ^ generation, len);
    p[..8].copy_from_slice(&k.to_le_bytes());
    p[8..16].copy_from_slice(&generation.to_le_bytes());
    p
}

fn concurrent_puts_and_gets_under_eviction(engine: EngineChoice) {
    let dir = tmp();
    let len = 20_000;
    let capacity = 24 * slot_bytes(len);
    let t = open(&config(dir.path(), capacity, engine));
    let stop = Instant::now() + Duration::from_millis(1500);
    std::thread::scope(|s| {
        for thread in 0..4u64 {
            let t = t.clone();
            s.spawn(move || {
                let mut generation = thread << 40;
                let mut x = thread + 1;
                while Instant::now() < stop {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let k = (x >> 33) % 64;
                    let bk = key(&format!("k{k}"));
                    if (x >> 20) % 3 == 0 {
                        generation += 1;
                        t.put(&ns(), &bk, None, &tagged(k, generation, len));
                    } else if let Some(b) = t.get(&ns(), &bk) {
                        assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), k);
                        let g = u64::from_le_bytes(b[8..16].try_into().unwrap());
                        assert!(b[..] == tagged(k, g, len)[..], "wrong bytes for k{k}");
                    }
                    assert!(t.stats().used_bytes <= capacity);
                }
            });
        }
    });
    let d = t.disk_stats();
    assert_eq!(
        (d.corrupt_blocks, d.io_errors, d.timeouts),
        (0, 0, 0),
        "{d:?}"
    );
    assert!(d.tier.hits > 0 && d.tier.evictions > 0, "{d:?}");
    assert!(t.verify(false).corrupt.is_empty());
}

#[test]
fn power_loss_durability_round_trip() {
    let dir = tmp();
    let mut cfg = config(dir.path(), 4 << 20, EngineChoice::Auto);
    cfg.durability = kvstrata_tiers::disk::Durability::PowerLoss;
    let t = open(&cfg);
    for i in 0..8u64 {
        assert_eq!(
            t.put(&ns(), &key(&format!("d{i}")), None, &payload(i, 70_000)),
            PutOutcome::Stored
        );
    }
    drop(t);
    let t = open(&cfg);
    for i in 0..8u64 {
        assert_eq!(
            &t.get(&ns(), &key(&format!("d{i}"))).unwrap()[..],
            &payload(i, 70_000)[..]
        );
    }
}

fn slow_write_times_out_and_keeps_its_slot_until_done(engine: EngineChoice) {
    let dir = tmp();
    let mut cfg = config(dir.path(), 4 << 20, engine);
    cfg.write_timeout = Duration::from_millis(200);
    let t = open(&cfg);
    let p = payload(3, 40_000);
    t.set_fault_plan(FaultPlan {
        delay_writes: Some(Duration::from_millis(700)),
        ..FaultPlan::default()
    });
    let t0 = Instant::now();
    assert_eq!(t.put(&ns(), &key("slow"), None, &p), PutOutcome::NoSpace);
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(t.disk_stats().timeouts, 1);
    assert!(!t.contains(&ns(), &key("slow")));
    // The kernel may still write that slot: it stays reserved until the write ends.
    assert_eq!(t.stats().used_bytes, slot_bytes(p.len()));
    t.set_fault_plan(FaultPlan::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.stats().used_bytes != 0 {
        assert!(Instant::now() < deadline, "slot never released");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(t.put(&ns(), &key("slow"), None, &p), PutOutcome::Stored);
    assert_eq!(&t.get(&ns(), &key("slow")).unwrap()[..], &p[..]);
}
