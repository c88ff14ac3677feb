//! Unit tests of the cache: a bad batch changes nothing, leases expire,
//! listing pages cover every block once.

use super::*;
use crate::namespace::Dtype;

fn cache(capacity: u64) -> (BlockCache, NamespaceId, u64) {
    let cfg = CacheConfig {
        host: HostTierConfig {
            capacity_bytes: capacity,
            segment_bytes: 64 << 20,
        },
        ..CacheConfig::default()
    };
    let c = BlockCache::new(cfg).unwrap();
    let (ns, created) = c
        .register_namespace(NamespaceSpec::layer_major("m", 2, 1, 64, Dtype::F16, 16))
        .unwrap();
    assert!(created);
    (c, ns.id, ns.block_bytes)
}

fn k(s: &str) -> BlockKey {
    BlockKey::new("k", s.as_bytes()).unwrap()
}

#[test]
fn bad_batch_changes_nothing() {
    let (c, ns, bb) = cache(1 << 20);
    let good = PutBlock {
        key: k("a"),
        parent: None,
        payload: Bytes::from(vec![1; bb as usize]),
    };
    let bad = PutBlock {
        key: k("b"),
        parent: None,
        payload: Bytes::from(vec![1; 3]),
    };
    let e = c.put_batch(&ns, &[good, bad]).unwrap_err();
    assert!(e.to_string().contains("items[1].payload"), "{e}");
    assert_eq!(c.stats().tiers[0].1.blocks, 0);
}

#[test]
fn lease_expiry_unpins() {
    let (c, ns, bb) = cache(1 << 20);
    let item = PutBlock {
        key: k("a"),
        parent: None,
        payload: Bytes::from(vec![1; bb as usize]),
    };
    c.put_batch(&ns, &[item]).unwrap();
    let l = c.pin(&ns, &[k("a")], Duration::from_millis(1)).unwrap();
    assert_eq!(c.stats().tiers[0].1.pinned_blocks, 1);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(c.expire_leases(), 1);
    assert_eq!(c.stats().tiers[0].1.pinned_blocks, 0);
    assert_eq!(
        c.unpin(l.lease_id),
        Err(CacheError::LeaseNotFound(l.lease_id))
    );
}

#[test]
fn listing_pages_cover_everything_once() {
    let (c, ns, bb) = cache(1 << 22);
    let items: Vec<_> = (0..25)
        .map(|i| PutBlock {
            key: k(&format!("b{i}")),
            parent: None,
            payload: Bytes::from(vec![i as u8; bb as usize]),
        })
        .collect();
    c.put_batch(&ns, &items).unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = c.list_blocks(Some(&ns), None, cursor, 7).unwrap();
        assert!(page.len() <= 7);
        seen.extend(page.into_iter().map(|m| m.key));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 25);
}

#[test]
fn close_drains_demotions_then_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        host: HostTierConfig {
            capacity_bytes: 2 * 8192,
            segment_bytes: 64 << 20,
        },
        disk: Some(DiskTierConfig::in_dir(dir.path(), 8 << 20)),
        ..CacheConfig::default()
    };
    let c = BlockCache::new(cfg.clone()).unwrap();
    let (ns, _) = c
        .register_namespace(NamespaceSpec::layer_major("m", 2, 1, 64, Dtype::F16, 16))
        .unwrap();
    let items: Vec<PutBlock> = (0..12)
        .map(|i| PutBlock {
            key: k(&format!("b{i}")),
            parent: None,
            payload: Bytes::from(vec![i as u8; ns.block_bytes as usize]),
        })
        .collect();
    for item in &items {
        c.put_batch(&ns.id, std::slice::from_ref(item)).unwrap();
    }
    let report = c.close();
    // Every demotion queued before the close reached the disk, and the two
    // blocks still in the host tier were written there too.
    let movement = c.stats().movement.unwrap();
    assert_eq!(movement.queued_bytes, 0);
    assert_eq!(
        movement.demoted + movement.demote_dropped,
        10,
        "{movement:?}"
    );
    let drain = report.drain.expect("a drain report");
    assert_eq!(drain.dropped, 0, "{report:?}");
    let persist = report.persist.expect("a persist report");
    assert_eq!((persist.host_blocks, persist.written), (2, 2), "{report:?}");
    assert_eq!(movement.stop_persisted, 2);
    // Reads still answer, exactly; writes are refused.
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    for (got, item) in c.get_batch(&ns.id, &keys).unwrap().iter().zip(&items) {
        let (bytes, _) = got
            .as_ref()
            .expect("every block is on disk or in the host tier");
        assert_eq!(bytes, &item.payload);
    }
    assert_eq!(
        c.put_batch(&ns.id, &items[..1]).unwrap_err(),
        CacheError::Closed
    );
    assert_eq!(
        c.delete(&ns.id, &keys[..1]).unwrap_err(),
        CacheError::Closed
    );
    assert_eq!(
        c.evict(&ns.id, &keys[..1], false).unwrap_err(),
        CacheError::Closed
    );
    assert_eq!(
        c.close(),
        StopReport::default(),
        "a second close does nothing"
    );
    drop(c);
    // The disk tier was released: the same paths open again, with the blocks.
    let again = BlockCache::new(cfg).unwrap();
    let got = again.get_batch(&ns.id, &keys).unwrap();
    assert_eq!(got.iter().flatten().count(), 12);
    for (got, item) in got.iter().zip(&items) {
        assert_eq!(got.as_ref().map(|g| &g.0), Some(&item.payload));
    }
}

/// A cache over a slot file in `dir`: a host tier of `host_blocks` blocks
/// of 8 KiB, a disk of `disk_bytes`, the given movement settings.
fn disk_cache(
    dir: &std::path::Path,
    host_blocks: u64,
    disk_bytes: u64,
    movement: MovementConfig,
) -> (BlockCache, Arc<Namespace>) {
    let cfg = CacheConfig {
        host: HostTierConfig {
            capacity_bytes: host_blocks * 8192,
            segment_bytes: 64 << 20,
        },
        disk: Some(DiskTierConfig::in_dir(dir, disk_bytes)),
        movement,
        ..CacheConfig::default()
    };
    let c = BlockCache::new(cfg).unwrap();
    let (ns, _) = c
        .register_namespace(NamespaceSpec::layer_major("m", 2, 1, 64, Dtype::F16, 16))
        .unwrap();
    (c, ns)
}

fn block(i: u32, version: u8, len: u64) -> PutBlock {
    let mut payload = vec![version; len as usize];
    payload[..4].copy_from_slice(&i.to_le_bytes());
    PutBlock {
        key: k(&format!("b{i}")),
        parent: None,
        payload: Bytes::from(payload),
    }
}

#[test]
fn close_persists_the_hottest_host_blocks_that_fit_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    // 128 host blocks; a disk of 1 MiB holds 85 slots of 12 KiB.
    let (c, ns) = disk_cache(dir.path(), 128, 1 << 20, MovementConfig::default());
    let items: Vec<PutBlock> = (0..128).map(|i| block(i, 1, ns.block_bytes)).collect();
    c.put_batch(&ns.id, &items).unwrap();
    // Distinct access times: the 40 read next are the hottest.
    std::thread::sleep(Duration::from_millis(20));
    let hot: Vec<BlockKey> = items[50..90].iter().map(|i| i.key).collect();
    assert!(
        c.get_batch(&ns.id, &hot)
            .unwrap()
            .iter()
            .all(Option::is_some)
    );
    let report = c.close();
    let persist = report.persist.expect("persisted");
    assert_eq!(persist.host_blocks, 128, "{report:?}");
    assert_eq!(persist.written, 85, "{report:?}");
    assert_eq!(persist.left, 43, "{report:?}");
    drop(c);
    let (again, _) = disk_cache(dir.path(), 128, 1 << 20, MovementConfig::default());
    let got = again.get_batch(&ns.id, &hot).unwrap();
    for (got, item) in got.iter().zip(&items[50..90]) {
        assert_eq!(got.as_ref().map(|g| &g.0), Some(&item.payload));
    }
    let all: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let got = again.get_batch(&ns.id, &all).unwrap();
    assert_eq!(got.iter().flatten().count(), 85);
    for (got, item) in got.iter().zip(&items) {
        if let Some((bytes, _)) = got {
            assert_eq!(bytes, &item.payload);
        }
    }
}

#[test]
fn close_without_persisting_leaves_the_host_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let movement = MovementConfig {
        persist_on_stop: Duration::ZERO,
        ..MovementConfig::default()
    };
    let (c, ns) = disk_cache(dir.path(), 16, 1 << 20, movement);
    let items: Vec<PutBlock> = (0..8).map(|i| block(i, 1, ns.block_bytes)).collect();
    c.put_batch(&ns.id, &items).unwrap();
    let report = c.close();
    assert_eq!(report.persist, None);
    drop(c);
    let (again, _) = disk_cache(dir.path(), 16, 1 << 20, movement);
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    assert_eq!(
        again
            .get_batch(&ns.id, &keys)
            .unwrap()
            .iter()
            .flatten()
            .count(),
        0
    );
}

#[test]
fn close_releases_the_disk_tier_while_the_cache_lives() {
    let dir = tempfile::tempdir().unwrap();
    let movement = MovementConfig::default();
    let (c, ns) = disk_cache(dir.path(), 4, 1 << 20, movement);
    let items: Vec<PutBlock> = (0..12).map(|i| block(i, 1, ns.block_bytes)).collect();
    c.put_batch(&ns.id, &items).unwrap();
    c.close();
    assert!(c.disk().is_some_and(|d| d.is_closed()));
    // The closed disk tier released its index: a second cache opens the
    // same paths while the first still exists, and serves every block.
    let (again, _) = disk_cache(dir.path(), 4, 1 << 20, movement);
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    for cache in [&again, &c] {
        let got = cache.get_batch(&ns.id, &keys).unwrap();
        for (got, item) in got.iter().zip(&items) {
            assert_eq!(got.as_ref().map(|g| &g.0), Some(&item.payload));
        }
    }
}

#[test]
fn a_remote_tier_needs_a_runtime() {
    let cfg = CacheConfig {
        remote: Some(RemoteTierConfig {
            nodes: vec!["redis://127.0.0.1:1".into()],
            ..RemoteTierConfig::default()
        }),
        ..CacheConfig::default()
    };
    let e = BlockCache::new(cfg).unwrap_err();
    assert!(
        matches!(e, OpenError::Remote(RemoteError::NoRuntime)),
        "{e}"
    );
}
