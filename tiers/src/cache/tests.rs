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
    c.close();
    // Every demotion queued before the close reached the disk.
    let movement = c.stats().movement.unwrap();
    assert_eq!(movement.queued_bytes, 0);
    assert_eq!(
        movement.demoted + movement.demote_dropped,
        10,
        "{movement:?}"
    );
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
    c.close();
    drop(c);
    // The disk tier was released: the same paths open again, with the blocks.
    let again = BlockCache::new(cfg).unwrap();
    let got = again.get_batch(&ns.id, &keys).unwrap();
    assert_eq!(got.iter().flatten().count(), 10);
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
