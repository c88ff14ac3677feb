//! `DiskTier::close` on real files, real RocksDB and O_DIRECT: the ordered
//! close waits for a write in flight, ends the engine's threads, releases
//! the index (the same directory opens again in this process while the
//! closed tier still exists), and leaves a tier that still reads exactly
//! and refuses every change at once. One test runs both engines in turn:
//! it counts the engines' threads of this process, so no other test of
//! this binary may run beside it.

mod disk_common;

use std::sync::mpsc;

use disk_common::{config, key, ns, open, payload, tmp};
use kvstrata_tiers::disk::{DiskError, DiskTier, EngineChoice, StreamPut};
use kvstrata_tiers::{PutOutcome, RemoveOutcome, RemoveReason, Tier};

/// Threads of this process that belong to a disk engine (the kernel keeps
/// 15 bytes of a thread's name: "kvstrata-uring", "kvstrata-pread-").
fn engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("kvstrata-uring") || name.starts_with("kvstrata-pread"))
        .count()
}

fn len_of(i: u64) -> usize {
    10_000 + 997 * i as usize
}

/// Every block `0..n` reads back exactly.
fn assert_all_exact(t: &DiskTier, n: u64) {
    let keys: Vec<_> = (0..n).map(|i| key(&format!("k{i}"))).collect();
    for (i, got) in t.get_many(&ns(), &keys).into_iter().enumerate() {
        let got = got.unwrap_or_else(|| panic!("block {i} missing"));
        assert_eq!(
            &got[..],
            &payload(i as u64, len_of(i as u64))[..],
            "block {i}"
        );
    }
}

#[test]
fn close_is_ordered_idempotent_and_releases_the_directory() {
    for engine in [EngineChoice::Auto, EngineChoice::Pread] {
        close_on(engine);
    }
}

fn close_on(engine: EngineChoice) {
    let dir = tmp();
    let cfg = config(dir.path(), 16 << 20, engine);
    assert_eq!(engine_threads(), 0, "{engine:?}: no tier is open yet");
    let t = open(&cfg);
    assert!(engine_threads() > 0, "{engine:?}: the engine runs threads");
    for i in 0..24u64 {
        let parent = (i % 4 != 0).then(|| key(&format!("k{}", i - 1)));
        let p = payload(i, len_of(i));
        assert_eq!(
            t.put(&ns(), &key(&format!("k{i}")), parent.as_ref(), &p),
            PutOutcome::Stored
        );
    }
    t.get(&ns(), &key("k0"));

    // A stream of writes holds the tier open: the close started while it
    // runs waits for it, and every one of its blocks is stored.
    let (started_tx, started_rx) = mpsc::channel();
    let streaming = {
        let t = t.clone();
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            let items = (24..40u64).map(|i| {
                if i == 24 {
                    started_tx.send(()).unwrap();
                }
                StreamPut {
                    key: key(&format!("k{i}")),
                    parent: None,
                    payload: payload(i, len_of(i)),
                }
            });
            t.put_stream(&ns(), items, 4, |_, o| outcomes.push(o));
            outcomes
        })
    };
    started_rx.recv().unwrap();
    let clone = t.clone();
    clone.close().unwrap();
    let outcomes = streaming.join().unwrap();
    assert_eq!(outcomes, vec![PutOutcome::Stored; 16], "{engine:?}");
    assert!(t.is_closed());
    assert_eq!(engine_threads(), 0, "{engine:?}: close ended the threads");

    // A second close (on any clone) does nothing.
    t.close().unwrap();
    clone.close().unwrap();

    // Closed: reads still answer exactly (on this thread); every change is
    // refused at once and changes nothing.
    assert_all_exact(&t, 40);
    assert_eq!(engine_threads(), 0, "{engine:?}: reads start no thread");
    let blocks = t.stats().blocks;
    assert_eq!(blocks, 40);
    assert_eq!(
        t.put(&ns(), &key("new"), None, &payload(99, 5000)),
        PutOutcome::NoSpace
    );
    let mut refused = Vec::new();
    let stored = t.put_stream(
        &ns(),
        (0..3u64).map(|i| StreamPut {
            key: key(&format!("s{i}")),
            parent: None,
            payload: payload(i, 4096),
        }),
        2,
        |i, o| refused.push((i, o)),
    );
    assert_eq!(stored, 0);
    assert_eq!(
        refused,
        (0..3).map(|i| (i, PutOutcome::NoSpace)).collect::<Vec<_>>()
    );
    assert_eq!(
        t.remove(&ns(), &key("k3"), RemoveReason::Delete),
        RemoveOutcome::Missing
    );
    assert!(t.contains(&ns(), &key("k3")));
    assert!(!t.contains(&ns(), &key("new")));
    assert_eq!(t.stats().blocks, blocks);
    assert!(matches!(
        t.save_namespace(&ns(), b"record"),
        Err(DiskError::Closed)
    ));
    assert!(matches!(t.persist_access(), Err(DiskError::Closed)));
    assert!(matches!(t.load_namespaces(), Err(DiskError::Closed)));
    assert_eq!(DiskError::Closed.to_string(), "the disk tier is closed");

    // The index is closed: the same directory opens again in this process
    // while the closed tier still exists, with every acknowledged block.
    let again = open(&cfg);
    assert_eq!(again.stats().blocks, 40, "{engine:?}");
    assert_all_exact(&again, 40);
    assert_eq!(again.meta(&ns(), &key("k0")).unwrap().children, 1);
    drop(t);
    drop(clone);
    // The reopened tier works on after the closed one is gone.
    assert_eq!(
        again.put(&ns(), &key("k40"), None, &payload(40, len_of(40))),
        PutOutcome::Stored
    );
    assert_all_exact(&again, 41);
    drop(again);
    assert_eq!(engine_threads(), 0, "{engine:?}: dropping closes too");
    // Dropping closed it in order as well.
    let last = open(&cfg);
    assert_all_exact(&last, 41);
    last.close().unwrap();
}
