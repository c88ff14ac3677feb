//! The disk tier's streaming calls (`put_stream`, `get_stream`,
//! `read_stream`) on real files, real RocksDB and O_DIRECT, each test run on
//! both engines (io_uring and pread/pwrite): more blocks than the queue
//! depth, a buffer pool smaller than the stream, corruption inside the
//! stream, injected faults, and who gets which answer.

mod disk_common;

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use disk_common::{config, flip_byte, key, ns, open, payload, tmp};
use kvstrata_tiers::disk::header::HEADER_REGION;
use kvstrata_tiers::disk::{DiskTierConfig, EngineChoice, FaultPlan, StreamPut};
use kvstrata_tiers::{BlockKey, PutOutcome, RemoveReason, Tier};

both_engines!(
    stream_round_trip_with_a_small_buffer_pool,
    stream_keeps_at_most_depth_in_flight,
    corrupt_slots_inside_a_stream_are_misses,
    read_faults_in_a_stream_are_misses_never_hangs,
    write_faults_in_a_stream_fail_the_put_never_hang,
    streams_answer_every_index_once_with_its_own_block,
    a_panicking_callback_leaves_nothing_held,
);

fn slot_bytes(len: usize) -> u64 {
    (HEADER_REGION + len.div_ceil(4096) * 4096) as u64
}

fn len_of(i: usize) -> usize {
    20_000 + (i * 977) % 40_000
}

/// A config whose buffer pool holds only `slots` slots of the largest block.
fn small_pool(
    dir: &std::path::Path,
    capacity: u64,
    engine: EngineChoice,
    slots: usize,
) -> DiskTierConfig {
    DiskTierConfig {
        buffer_pool_bytes: slots * slot_bytes(60_000) as usize,
        ..config(dir, capacity, engine)
    }
}

/// Streams `n` blocks `s{i}` (payload `payload(i, len_of(i))`) in; returns
/// the outcome per item.
fn put_all(t: &kvstrata_tiers::DiskTier, n: usize, depth: usize) -> Vec<PutOutcome> {
    let items = (0..n).map(|i| StreamPut {
        key: key(&format!("s{i}")),
        parent: None,
        payload: payload(i as u64, len_of(i)),
    });
    let mut out = vec![None; n];
    let stored = t.put_stream(&ns(), items, depth, |i, o| {
        assert!(out[i].is_none(), "item {i} answered twice");
        out[i] = Some(o);
    });
    let out: Vec<PutOutcome> = out
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("item {i} never answered")))
        .collect();
    assert_eq!(
        stored,
        out.iter().filter(|o| **o == PutOutcome::Stored).count()
    );
    out
}

/// Streams `keys` out; returns the answer per key (each exactly once).
fn get_all(t: &kvstrata_tiers::DiskTier, keys: &[BlockKey], depth: usize) -> Vec<Option<Bytes>> {
    let mut out: Vec<Option<Option<Bytes>>> = vec![None; keys.len()];
    let hits = t.get_stream(&ns(), keys, depth, |i, b| {
        assert!(out[i].is_none(), "key {i} answered twice");
        out[i] = Some(b);
    });
    let out: Vec<Option<Bytes>> = out
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("key {i} never answered")))
        .collect();
    assert_eq!(hits, out.iter().filter(|o| o.is_some()).count());
    out
}

fn stream_round_trip_with_a_small_buffer_pool(engine: EngineChoice) {
    let dir = tmp();
    let n = 120;
    // The pool holds 3 slots; the stream is 120 blocks, 8 in flight, and
    // the caller holds on to every block it reads.
    let cfg = small_pool(dir.path(), 16 << 20, engine, 3);
    let t = open(&cfg);
    let out = put_all(&t, n, 8);
    assert!(out.iter().all(|o| *o == PutOutcome::Stored), "{out:?}");
    let used: u64 = (0..n).map(|i| slot_bytes(len_of(i))).sum();
    let s = t.stats();
    assert_eq!((s.blocks, s.used_bytes), (n as u64, used));
    let d = t.disk_stats();
    assert_eq!((d.write_ops, d.write_bytes), (n as u64, used));

    // Read back in a shuffled order, with keys that are not there mixed in.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (i * 7919 + 13) % (i + 1));
    }
    let mut keys: Vec<BlockKey> = order.iter().map(|i| key(&format!("s{i}"))).collect();
    keys.insert(5, key("absent-a"));
    keys.push(key("absent-b"));
    let got = get_all(&t, &keys, 8);
    let mut held = Vec::new();
    for (k, g) in keys.iter().zip(got) {
        let name = k.to_string();
        match name.strip_prefix('s').and_then(|x| x.parse::<usize>().ok()) {
            Some(i) => {
                let b = g.unwrap_or_else(|| panic!("{name} missed"));
                assert!(
                    b[..] == payload(i as u64, len_of(i))[..],
                    "{name}: wrong bytes"
                );
                held.push(b);
            }
            None => assert!(g.is_none(), "{name} was never stored"),
        }
    }
    assert_eq!(held.len(), n);
    let d = t.disk_stats();
    assert_eq!((d.read_ops, d.read_bytes), (n as u64, used));
    assert_eq!((d.corrupt_blocks, d.io_errors, d.timeouts), (0, 0, 0));
    let s = t.stats();
    assert_eq!((s.hits, s.misses), (n as u64, 2));
    drop(held);

    // Streamed blocks are ordinary blocks: get_many serves them, and so
    // does a reopened tier (their index entries were written).
    let few: Vec<BlockKey> = (0..10).map(|i| key(&format!("s{i}"))).collect();
    for (i, g) in t.get_many(&ns(), &few).into_iter().enumerate() {
        assert!(g.unwrap()[..] == payload(i as u64, len_of(i))[..]);
    }
    drop(t);
    let t = open(&cfg);
    assert_eq!(t.stats().blocks, n as u64);
    let all: Vec<BlockKey> = (0..n).map(|i| key(&format!("s{i}"))).collect();
    // Depth 1 and a depth larger than the stream work too.
    for depth in [1, 500] {
        for (i, g) in get_all(&t, &all, depth).into_iter().enumerate() {
            assert!(g.expect("hit after reopen")[..] == payload(i as u64, len_of(i))[..]);
        }
    }
    // An empty stream answers nothing.
    assert_eq!(t.get_stream(&ns(), &[], 4, |_, _| panic!("no keys")), 0);
    let none: Vec<StreamPut<Vec<u8>>> = Vec::new();
    assert_eq!(t.put_stream(&ns(), none, 4, |_, _| panic!("no items")), 0);
}

/// Items are pulled only when a place in the window is free (an item is
/// taken and not yet answered while its write is in flight, or finished and
/// waiting to be published with the next index batch: at most `depth` of
/// each), and the transfers really overlap, `depth` at a time: with every
/// write and read delayed by `delay`, `n` blocks take about `n / depth`
/// delays, never less (more in flight would be faster) and far less than
/// `n` delays (one at a time, or waves that drain).
fn stream_keeps_at_most_depth_in_flight(engine: EngineChoice) {
    let dir = tmp();
    let t = open(&config(dir.path(), 8 << 20, engine));
    let (n, depth, delay) = (16usize, 4usize, Duration::from_millis(60));
    let pulled = Cell::new(0usize);
    let answered = Cell::new(0usize);
    let max_open = Cell::new(0usize);
    let items = (0..n).map(|i| {
        pulled.set(pulled.get() + 1);
        let open = pulled.get() - answered.get();
        max_open.set(max_open.get().max(open));
        assert!(open <= 2 * depth, "{open} items taken with {depth} places");
        StreamPut {
            key: key(&format!("w{i}")),
            parent: None,
            payload: payload(i as u64, 8192),
        }
    });
    t.set_fault_plan(FaultPlan {
        delay_writes: Some(delay),
        delay_reads: Some(delay),
        ..FaultPlan::default()
    });
    let t0 = Instant::now();
    let stored = t.put_stream(&ns(), items, depth, |_, o| {
        assert_eq!(o, PutOutcome::Stored);
        answered.set(answered.get() + 1);
    });
    let took = t0.elapsed();
    assert_eq!((stored, answered.get()), (n, n));
    assert!(max_open.get() >= depth, "the window was never full");
    // Each transfer takes `delay`: at most `depth` at once means at least
    // n / depth waves; overlapping at all means well under n delays.
    let waves = (n / depth) as u32;
    let within_window = |took: Duration, what: &str| {
        assert!(
            took >= delay * waves,
            "{took:?}: more than {depth} {what} in flight"
        );
        assert!(
            took < delay * (n as u32) / 2,
            "{took:?}: {what} did not overlap"
        );
    };
    within_window(took, "writes");

    let keys: Vec<BlockKey> = (0..n).map(|i| key(&format!("w{i}"))).collect();
    let t0 = Instant::now();
    let got = get_all(&t, &keys, depth);
    let took = t0.elapsed();
    assert!(got.iter().all(Option::is_some));
    within_window(took, "reads");
    t.set_fault_plan(FaultPlan::default());
}

fn corrupt_slots_inside_a_stream_are_misses(engine: EngineChoice) {
    let dir = tmp();
    let t = open(&small_pool(dir.path(), 16 << 20, engine, 4));
    let n = 48;
    assert!(put_all(&t, n, 6).iter().all(|o| *o == PutOutcome::Stored));
    let loc = |i: usize| t.slot_location(&ns(), &key(&format!("s{i}"))).unwrap();
    // A payload byte, a header byte, the last payload byte.
    let (p, o, _) = loc(3);
    flip_byte(&p, o + HEADER_REGION as u64 + 1000);
    let (p, o, _) = loc(20);
    flip_byte(&p, o + 30);
    let (p, o, _) = loc(47);
    flip_byte(&p, o + HEADER_REGION as u64 + len_of(47) as u64 - 1);
    let bad = [3usize, 20, 47];
    let keys: Vec<BlockKey> = (0..n).map(|i| key(&format!("s{i}"))).collect();
    let got = get_all(&t, &keys, 6);
    for (i, g) in got.iter().enumerate() {
        if bad.contains(&i) {
            assert!(g.is_none(), "corrupt s{i} was served");
            assert!(!t.contains(&ns(), &keys[i]), "corrupt s{i} still indexed");
        } else {
            assert!(
                g.as_ref().expect("hit")[..] == payload(i as u64, len_of(i))[..],
                "s{i}"
            );
        }
    }
    let d = t.disk_stats();
    assert_eq!((d.corrupt_blocks, d.io_errors, d.timeouts), (3, 0, 0));
    assert_eq!(d.tier.blocks, (n - bad.len()) as u64);
    // Dropped for good; the rest keeps being served.
    let got = get_all(&t, &keys, 6);
    assert_eq!(got.iter().filter(|g| g.is_none()).count(), bad.len());
    assert_eq!(t.disk_stats().corrupt_blocks, 3);
    assert!(t.verify(false).corrupt.is_empty());
}

fn read_faults_in_a_stream_are_misses_never_hangs(engine: EngineChoice) {
    let dir = tmp();
    let mut cfg = config(dir.path(), 8 << 20, engine);
    cfg.read_timeout = Duration::from_millis(150);
    let t = open(&cfg);
    let n = 12;
    assert!(put_all(&t, n, 4).iter().all(|o| *o == PutOutcome::Stored));
    let keys: Vec<BlockKey> = (0..n).map(|i| key(&format!("s{i}"))).collect();

    t.set_fault_plan(FaultPlan {
        fail_reads_with: Some(libc::EIO),
        ..FaultPlan::default()
    });
    assert!(get_all(&t, &keys, 4).iter().all(Option::is_none));
    assert_eq!(t.disk_stats().io_errors, n as u64);
    t.set_fault_plan(FaultPlan {
        short_reads: true,
        ..FaultPlan::default()
    });
    assert!(get_all(&t, &keys, 4).iter().all(Option::is_none));
    assert_eq!(t.disk_stats().io_errors, 2 * n as u64);

    // Reads slower than the deadline: each is a miss at its own deadline,
    // three windows of four, so well under a second, not a hang.
    t.set_fault_plan(FaultPlan {
        delay_reads: Some(Duration::from_millis(700)),
        ..FaultPlan::default()
    });
    let t0 = Instant::now();
    assert!(get_all(&t, &keys, 4).iter().all(Option::is_none));
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1200), "{took:?}");
    let d = t.disk_stats();
    assert_eq!((d.timeouts, d.corrupt_blocks), (n as u64, 0));

    // Nothing was dropped: once the drive behaves, every block is served.
    t.set_fault_plan(FaultPlan::default());
    assert_eq!(t.stats().blocks, n as u64);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Abandoned reads may still hold the pread workers for a while.
        let got = get_all(&t, &keys, 4);
        if got.iter().all(Option::is_some) {
            for (i, g) in got.into_iter().enumerate() {
                assert!(g.unwrap()[..] == payload(i as u64, len_of(i))[..]);
            }
            break;
        }
        assert!(Instant::now() < deadline, "blocks never served again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(t.disk_stats().corrupt_blocks, 0);
}

fn write_faults_in_a_stream_fail_the_put_never_hang(engine: EngineChoice) {
    let dir = tmp();
    let mut cfg = config(dir.path(), 8 << 20, engine);
    cfg.write_timeout = Duration::from_millis(150);
    let t = open(&cfg);
    let n = 10;

    t.set_fault_plan(FaultPlan {
        fail_writes_with: Some(libc::ENOSPC),
        ..FaultPlan::default()
    });
    assert!(put_all(&t, n, 4).iter().all(|o| *o == PutOutcome::NoSpace));
    let d = t.disk_stats();
    assert_eq!(
        (d.io_errors, d.tier.blocks, d.tier.used_bytes),
        (n as u64, 0, 0)
    );
    assert_eq!(d.tier.rejected_puts, n as u64);

    // Data written, index write skipped: answered NoSpace, nothing indexed.
    t.set_fault_plan(FaultPlan {
        drop_index_writes: true,
        ..FaultPlan::default()
    });
    assert!(put_all(&t, n, 4).iter().all(|o| *o == PutOutcome::NoSpace));
    assert_eq!(
        t.disk_stats().write_ops,
        n as u64,
        "the data writes happened"
    );
    assert_eq!((t.stats().blocks, t.stats().used_bytes), (0, 0));

    // Writes slower than the deadline: NoSpace at each one's deadline; the
    // slots stay reserved until the kernel is done, then are freed.
    t.set_fault_plan(FaultPlan {
        delay_writes: Some(Duration::from_millis(600)),
        ..FaultPlan::default()
    });
    let t0 = Instant::now();
    assert!(put_all(&t, 8, 4).iter().all(|o| *o == PutOutcome::NoSpace));
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1100), "{took:?}");
    assert_eq!(t.disk_stats().timeouts, 8);
    assert_eq!(t.stats().blocks, 0);
    t.set_fault_plan(FaultPlan::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.stats().used_bytes != 0 {
        assert!(
            Instant::now() < deadline,
            "slots of abandoned writes never freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the tier works normally afterwards.
    assert!(put_all(&t, n, 4).iter().all(|o| *o == PutOutcome::Stored));
    let keys: Vec<BlockKey> = (0..n).map(|i| key(&format!("s{i}"))).collect();
    for (i, g) in get_all(&t, &keys, 4).into_iter().enumerate() {
        assert!(g.unwrap()[..] == payload(i as u64, len_of(i))[..]);
    }
}

/// Every index is answered once, with the block of its own key: refused
/// items, a key written twice in one stream (the later item wins), a key
/// read several times, parents kept.
fn streams_answer_every_index_once_with_its_own_block(engine: EngineChoice) {
    let dir = tmp();
    let t = open(&config(dir.path(), 16 << 20, engine));
    let too_big = vec![7u8; t.max_payload_bytes() as usize + 1];
    // item: (key, payload); "dup" twice, an empty and an oversized payload.
    let mut items: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| (format!("o{i}"), payload(100 + i as u64, 9000 + i * 100)))
        .collect();
    items.insert(4, ("dup".into(), payload(1, 30_000)));
    items.insert(9, ("empty".into(), Vec::new()));
    items.insert(17, ("huge".into(), too_big));
    items.push(("dup".into(), payload(2, 31_000)));
    let mut order = Vec::new();
    let mut outcome: HashMap<usize, PutOutcome> = HashMap::new();
    let stream = items.iter().enumerate().map(|(i, (k, p))| StreamPut {
        key: key(k),
        parent: (i > 0).then(|| key("o0")),
        payload: &p[..],
    });
    let stored = t.put_stream(&ns(), stream, 5, |i, o| {
        order.push(i);
        assert!(outcome.insert(i, o).is_none(), "item {i} answered twice");
    });
    assert_eq!(outcome.len(), items.len());
    assert_eq!(stored, items.len() - 2);
    for (i, (k, _)) in items.iter().enumerate() {
        let want = if k == "empty" || k == "huge" {
            PutOutcome::NoSpace
        } else {
            PutOutcome::Stored
        };
        assert_eq!(outcome[&i], want, "item {i} ({k})");
    }
    order.sort_unstable();
    assert_eq!(order, (0..items.len()).collect::<Vec<_>>());
    assert_eq!(t.stats().rejected_puts, 2);
    // The later "dup" won; parents were recorded.
    assert!(t.get(&ns(), &key("dup")).unwrap()[..] == payload(2, 31_000)[..]);
    assert_eq!(t.meta(&ns(), &key("o5")).unwrap().parent, Some(key("o0")));
    assert_eq!(t.meta(&ns(), &key("o0")).unwrap().children, 30);

    // Reads: a key several times, misses between hits; read_stream also
    // answers the parent and the sequence number.
    let names = [
        "o3", "nope", "o3", "dup", "o29", "empty", "o3", "huge", "o0",
    ];
    let keys: Vec<BlockKey> = names.iter().map(|k| key(k)).collect();
    let mut got: HashMap<usize, Option<kvstrata_tiers::disk::DiskRead>> = HashMap::new();
    let hits = t.read_stream(&ns(), &keys, 2, |i, r| {
        assert!(got.insert(i, r).is_none(), "key {i} answered twice");
    });
    assert_eq!((got.len(), hits), (names.len(), 6));
    for (i, name) in names.iter().enumerate() {
        let r = &got[&i];
        let want = items.iter().rev().find(|(k, _)| k == name).map(|(_, p)| p);
        match (name, r) {
            (&"nope" | &"empty" | &"huge", None) => {}
            (_, Some(r)) => {
                assert!(
                    r.payload[..] == want.unwrap()[..],
                    "key {i} ({name}): wrong block"
                );
                let parent = (*name != "o0").then(|| key("o0"));
                assert_eq!(r.parent, parent, "{name}");
                assert!(t.is_current(&ns(), &keys[i], r.seq));
            }
            (_, None) => panic!("key {i} ({name}) missed"),
        }
    }
}

/// A caller's callback that panics in the middle of a stream leaves nothing
/// held: no reader count keeps the slot of a block deleted afterwards, and
/// the busy clocks (`read_busy`, `write_busy`) run again for later streams.
/// Before the stream state released itself on drop, a panic in `on_block`
/// kept the reader counts of the reads in flight until restart.
fn a_panicking_callback_leaves_nothing_held(engine: EngineChoice) {
    let dir = tmp();
    let n = 40;
    let t = open(&config(dir.path(), 16 << 20, engine));
    let out = put_all(&t, n, 8);
    assert!(out.iter().all(|o| *o == PutOutcome::Stored), "{out:?}");
    let keys: Vec<BlockKey> = (0..n).map(|i| key(&format!("s{i}"))).collect();

    let mut answered = 0;
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.get_stream(&ns(), &keys, 8, |_, _| {
            answered += 1;
            assert!(answered < 5, "a caller's bug");
        })
    }));
    assert!(read.is_err(), "the callback's panic reaches the caller");
    let more = (n..n + 20).map(|i| StreamPut {
        key: key(&format!("s{i}")),
        parent: None,
        payload: payload(i as u64, len_of(i)),
    });
    let write = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.put_stream(&ns(), more, 8, |_, _| panic!("a caller's bug"))
    }));
    assert!(write.is_err(), "the callback's panic reaches the caller");

    // Later streams work, read the exact bytes, and are timed again.
    let before = t.disk_stats();
    let got = get_all(&t, &keys, 8);
    for (i, g) in got.iter().enumerate() {
        let b = g.as_ref().unwrap_or_else(|| panic!("s{i} missed"));
        assert!(
            b[..] == payload(i as u64, len_of(i))[..],
            "s{i}: wrong bytes"
        );
    }
    drop(got);
    let again = put_all(&t, 4, 4);
    assert!(again.iter().all(|o| *o == PutOutcome::Stored), "{again:?}");
    let after = t.disk_stats();
    assert!(
        after.read_busy > before.read_busy,
        "read_busy stuck at {:?}",
        after.read_busy
    );
    assert!(
        after.write_busy > before.write_busy,
        "write_busy stuck at {:?}",
        after.write_busy
    );

    // Every slot comes back once its block is deleted (writes the panic
    // abandoned in flight free theirs when they complete).
    for i in 0..n + 20 {
        t.remove(&ns(), &key(&format!("s{i}")), RemoveReason::Delete);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.stats().used_bytes != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = t.stats();
    assert_eq!(
        (s.blocks, s.used_bytes),
        (0, 0),
        "slots still held after every block was deleted"
    );
}
