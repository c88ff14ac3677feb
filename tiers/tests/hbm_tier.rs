//! The HBM tier (T0) and the pinned host tier inside a real `BlockCache`, on
//! the CPU backend of `Gpu` (device memory is host memory, every copy runs
//! at once): demotion and promotion under pressure, replacement rules, pins
//! and readers, the device-side data path, several devices. The same
//! scenario runs with CUDA through `kvstrata gpu-check` (kvstrata-gpucheck's
//! `hbm` check).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvstrata_kernels::GpuError;
use kvstrata_tiers::events::EventKind;
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheConfig, CacheError, DevicePutError, DiskTierConfig, Dtype,
    EngineChoice, Gpu, HbmTierConfig, HostTierConfig, NamespaceId, NamespaceSpec, PutBlock,
    PutOutcome, Tier, TierKind,
};

/// 4 layers × 2 (K,V) × 16 tokens × 1 head × 64 dims × 2 bytes = 16 KiB.
const BLOCK: u64 = 16384;

fn spec() -> NamespaceSpec {
    NamespaceSpec::layer_major("hbm-test", 4, 1, 64, Dtype::F16, 16)
}

fn config(hbm_blocks: u64, host_blocks: u64) -> CacheConfig {
    CacheConfig {
        host: HostTierConfig {
            capacity_bytes: host_blocks * BLOCK,
            segment_bytes: 8 * BLOCK,
        },
        hbm: Some(HbmTierConfig {
            capacity_bytes: hbm_blocks * BLOCK,
            segment_bytes: 2 * BLOCK,
            promote_on_device_get: true,
            staging_bytes: 3 * BLOCK,
            dma_threshold: 2 * BLOCK,
            move_group_bytes: 3 * BLOCK,
        }),
        ..CacheConfig::default()
    }
}

fn open(cfg: CacheConfig, devices: usize) -> (BlockCache, NamespaceId) {
    let gpus = (0..devices).map(|_| Gpu::cpu()).collect();
    let c = BlockCache::with_gpus(cfg, gpus).unwrap();
    let (ns, _) = c.register_namespace(spec()).unwrap();
    assert_eq!(ns.block_bytes, BLOCK);
    (c, ns.id)
}

fn key(i: usize) -> BlockKey {
    BlockKey::new("key", format!("k{i}").as_bytes()).unwrap()
}

fn payload(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `put_from_device` of `(key index, payload seed)` on `device`: the "device"
/// copies each payload into its slot.
fn device_put(c: &BlockCache, ns: &NamespaceId, device: usize, items: &[(usize, u64)]) {
    let keys: Vec<(BlockKey, Option<BlockKey>)> =
        items.iter().map(|&(i, _)| (key(i), None)).collect();
    let out = c
        .put_from_device(ns, device, &keys, |addrs: &[u64]| {
            assert_eq!(addrs.len(), items.len());
            for (&addr, &(_, seed)) in addrs.iter().zip(items) {
                let p = payload(seed);
                // SAFETY: the CPU backend's slots are host memory of BLOCK bytes.
                unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), addr as *mut u8, p.len()) };
            }
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(out.iter().all(|o| *o == PutOutcome::Stored), "{out:?}");
}

/// `get_to_device`: the bytes at every address, copied out inside the
/// callback, with the tier each came from.
fn device_get(
    c: &BlockCache,
    ns: &NamespaceId,
    device: usize,
    keys: &[BlockKey],
) -> Vec<Option<(Vec<u8>, TierKind)>> {
    c.get_to_device(ns, device, keys, |addrs| {
        addrs
            .iter()
            .map(|a| {
                a.map(|(addr, tier)| {
                    // SAFETY: valid for BLOCK bytes until this callback returns.
                    let b =
                        unsafe { std::slice::from_raw_parts(addr as *const u8, BLOCK as usize) };
                    (b.to_vec(), tier)
                })
            })
            .collect()
    })
    .unwrap()
}

fn inline_put(c: &BlockCache, ns: &NamespaceId, i: usize, seed: u64) {
    let item = PutBlock {
        key: key(i),
        parent: None,
        payload: Bytes::from(payload(seed)),
    };
    assert_eq!(c.put_batch(ns, &[item]).unwrap(), vec![PutOutcome::Stored]);
}

fn tier_rows(c: &BlockCache, kind: TierKind) -> Vec<kvstrata_tiers::TierStats> {
    c.stats()
        .tiers
        .into_iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, s)| s)
        .collect()
}

fn assert_within_capacity(c: &BlockCache) {
    for (kind, t) in c.stats().tiers {
        assert!(
            t.used_bytes <= t.capacity_bytes,
            "{} tier: {} of {}",
            kind.name(),
            t.used_bytes,
            t.capacity_bytes
        );
    }
}

#[test]
fn round_trips_through_demotion_and_promotion() {
    // T0 of 4 blocks, host of 40, a working set of 32.
    let (c, ns) = open(config(4, 40), 1);
    let mut seeds: HashMap<usize, u64> = HashMap::new();
    for batch in 0..8 {
        let items: Vec<(usize, u64)> = (0..4)
            .map(|j| (batch * 4 + j, 1000 + batch as u64 * 4 + j as u64))
            .collect();
        device_put(&c, &ns, 0, &items);
        seeds.extend(items.iter().copied());
        assert_within_capacity(&c);
        assert!(tier_rows(&c, TierKind::Hbm)[0].blocks <= 4);
    }
    let hbm = c.stats().hbm[0].clone();
    assert_eq!(hbm.demoted, 28, "{hbm:?}");
    // Every block readable, byte for byte, whichever tier holds it; device
    // reads promote host blocks back into T0.
    let mut from = HashMap::new();
    for round in 0..64usize {
        let ids = [round % 32, (round * 7 + 3) % 32, (round * 13 + 5) % 32];
        let keys: Vec<BlockKey> = ids.iter().map(|&i| key(i)).collect();
        for (i, got) in ids.iter().zip(device_get(&c, &ns, 0, &keys)) {
            let (bytes, tier) = got.expect("hit");
            assert_eq!(bytes, payload(seeds[i]), "block {i} from {tier:?}");
            *from.entry(tier).or_insert(0) += 1;
        }
        assert_within_capacity(&c);
    }
    let keys: Vec<BlockKey> = (0..32).map(key).collect();
    for (i, got) in c.get_batch(&ns, &keys).unwrap().into_iter().enumerate() {
        let (bytes, _) = got.expect("hit");
        assert_eq!(&bytes[..], &payload(seeds[&i])[..], "block {i}");
    }
    let hbm = c.stats().hbm[0].clone();
    assert!(hbm.promoted > 0, "{hbm:?}");
    assert!(
        from.get(&TierKind::Hbm).copied().unwrap_or(0) > 0,
        "{from:?}"
    );
    assert!(
        from.get(&TierKind::Host).copied().unwrap_or(0) > 0,
        "{from:?}"
    );
    assert_eq!(hbm.checksum_failures, 0);
    // Promoted blocks also stay in the host tier: demoting them again is free.
    assert!(hbm.demote_skipped > 0, "{hbm:?}");
}

#[test]
fn concurrent_device_and_inline_traffic_stays_exact() {
    let (c, ns) = open(config(6, 64), 1);
    let c = Arc::new(c);
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                // Each thread owns keys t*10 .. t*10+10 and their versions.
                let mut version: HashMap<usize, u64> = HashMap::new();
                for step in 0..120usize {
                    let i = t * 10 + (step * 7) % 10;
                    let seed = (t * 1_000_000 + step) as u64;
                    match step % 4 {
                        0 => {
                            device_put(&c, &ns, 0, &[(i, seed)]);
                            version.insert(i, seed);
                        }
                        1 => {
                            inline_put(&c, &ns, i, seed);
                            version.insert(i, seed);
                        }
                        2 => {
                            let got = device_get(&c, &ns, 0, &[key(i)]);
                            if let Some(&v) = version.get(&i) {
                                let (bytes, tier) = got[0].clone().expect("hit");
                                assert_eq!(bytes, payload(v), "key {i} from {tier:?}");
                            }
                        }
                        _ => {
                            let got = c.get_batch(&ns, &[key(i)]).unwrap();
                            if let Some(&v) = version.get(&i) {
                                let (bytes, tier) = got[0].clone().expect("hit");
                                assert_eq!(&bytes[..], &payload(v)[..], "key {i} from {tier:?}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for _ in 0..50 {
        assert_within_capacity(&c);
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_within_capacity(&c);
    assert_eq!(c.stats().hbm[0].checksum_failures, 0);
}

#[test]
fn pins_and_reads_in_flight_are_never_evicted() {
    let (c, ns) = open(config(2, 16), 1);
    device_put(&c, &ns, 0, &[(0, 10), (1, 11)]);
    let lease = c.pin(&ns, &[key(0)], Duration::from_secs(60)).unwrap();
    assert_eq!(tier_rows(&c, TierKind::Hbm)[0].pinned_blocks, 1);
    // While block 1 is being read (and 0 pinned), new device puts find no
    // T0 victim: they go to the host tier, and both blocks stay in T0.
    let inside = c
        .get_to_device(&ns, 0, &[key(1)], |addrs| {
            assert_eq!(addrs[0].map(|a| a.1), Some(TierKind::Hbm));
            device_put(&c, &ns, 0, &[(2, 12), (3, 13)]);
            // SAFETY: valid for BLOCK bytes until this callback returns.
            unsafe { std::slice::from_raw_parts(addrs[0].unwrap().0 as *const u8, BLOCK as usize) }
                .to_vec()
        })
        .unwrap();
    assert_eq!(inside, payload(11));
    let hbm = &c.hbm()[0];
    assert!(hbm.contains(&ns, &key(0)));
    assert!(hbm.contains(&ns, &key(1)));
    assert!(c.host().contains(&ns, &key(2)));
    // An explicit evict skips the pinned block.
    assert_eq!(c.evict(&ns, &[key(0)], false).unwrap(), (0, 1));
    c.unpin(lease.lease_id).unwrap();
    assert_eq!(tier_rows(&c, TierKind::Hbm)[0].pinned_blocks, 0);
    // Unpinned and idle: now they can go down.
    device_put(&c, &ns, 0, &[(4, 14), (5, 15)]);
    assert!(!hbm.contains(&ns, &key(0)));
    for (i, seed) in [(0, 10), (1, 11), (2, 12), (3, 13), (4, 14), (5, 15)] {
        let got = device_get(&c, &ns, 0, &[key(i)]);
        assert_eq!(got[0].clone().unwrap().0, payload(seed), "block {i}");
    }
}

#[test]
fn a_put_replaces_the_hbm_copy() {
    let (c, ns) = open(config(4, 16), 1);
    device_put(&c, &ns, 0, &[(0, 1)]);
    assert_eq!(c.lookup(&ns, &[key(0)]).unwrap(), vec![TierKind::Hbm]);
    inline_put(&c, &ns, 0, 2);
    assert_eq!(c.lookup(&ns, &[key(0)]).unwrap(), vec![TierKind::Host]);
    assert!(!c.hbm()[0].contains(&ns, &key(0)));
    let got = device_get(&c, &ns, 0, &[key(0)]);
    assert_eq!(got[0].clone().unwrap(), (payload(2), TierKind::Host));
    // Promoted by that read; a device put replaces both copies.
    assert!(c.hbm()[0].contains(&ns, &key(0)));
    device_put(&c, &ns, 0, &[(0, 3)]);
    assert!(!c.host().contains(&ns, &key(0)));
    let (bytes, tier) = c.get_batch(&ns, &[key(0)]).unwrap()[0].clone().unwrap();
    assert_eq!((&bytes[..], tier), (&payload(3)[..], TierKind::Hbm));
    // Demoted by evict: the host tier now serves the newest version.
    assert_eq!(c.evict(&ns, &[key(0)], false).unwrap(), (1, 0));
    assert_eq!(c.lookup(&ns, &[key(0)]).unwrap(), vec![TierKind::Host]);
    assert_eq!(
        device_get(&c, &ns, 0, &[key(0)])[0].clone().unwrap().0,
        payload(3)
    );
}

#[test]
fn delete_removes_every_copy() {
    let (c, ns) = open(config(4, 16), 1);
    inline_put(&c, &ns, 0, 1);
    device_get(&c, &ns, 0, &[key(0)]); // promoted: in T0 and T1
    assert!(c.hbm()[0].contains(&ns, &key(0)) && c.host().contains(&ns, &key(0)));
    assert_eq!(c.delete(&ns, &[key(0)]).unwrap(), 2);
    assert_eq!(c.lookup(&ns, &[key(0)]).unwrap(), vec![]);
    assert!(c.get_batch(&ns, &[key(0)]).unwrap()[0].is_none());
    assert!(device_get(&c, &ns, 0, &[key(0)])[0].is_none());
    for (_, t) in c.stats().tiers {
        assert_eq!((t.blocks, t.used_bytes), (0, 0));
    }
}

#[test]
fn failing_fill_stores_nothing_and_keeps_the_old_version() {
    let (c, ns) = open(config(4, 16), 1);
    device_put(&c, &ns, 0, &[(0, 1)]);
    let before: Vec<_> = c.stats().tiers;
    let items = vec![(key(0), None), (key(1), None)];
    let err = c
        .put_from_device(&ns, 0, &items, |addrs: &[u64]| {
            assert_eq!(addrs.len(), 2);
            Err("gather failed")
        })
        .unwrap_err();
    assert!(
        matches!(err, DevicePutError::Fill("gather failed")),
        "{err:?}"
    );
    let after: Vec<_> = c.stats().tiers;
    for ((_, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!((a.blocks, a.used_bytes), (b.blocks, b.used_bytes));
    }
    assert_eq!(
        device_get(&c, &ns, 0, &[key(0)])[0].clone().unwrap().0,
        payload(1)
    );
    assert!(device_get(&c, &ns, 0, &[key(1)])[0].is_none());
    // Bad input is refused before anything is reserved or `fill` runs.
    let e = c
        .put_from_device(&ns, 3, &items, |_: &[u64]| -> Result<(), ()> {
            panic!("fill called")
        })
        .unwrap_err();
    assert!(
        matches!(&e, DevicePutError::Cache(CacheError::InvalidArgument { field, .. }) if field == "device"),
        "{e:?}"
    );
    let own = vec![(key(5), Some(key(5)))];
    let e = c
        .put_from_device(&ns, 0, &own, |_: &[u64]| -> Result<(), ()> {
            panic!("fill called")
        })
        .unwrap_err();
    assert!(e.to_string().contains("items[0].parent"), "{e}");
}

#[test]
fn get_to_device_serves_disk_blocks_exactly() {
    let dir = tempfile::Builder::new()
        .prefix("kvs-hbm-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let mut cfg = config(4, 16);
    cfg.disk = Some(DiskTierConfig {
        segment_bytes: 1 << 20,
        engine: EngineChoice::Pread,
        ..DiskTierConfig::in_dir(dir.path(), 8 << 20)
    });
    let (c, ns) = open(cfg, 1);
    for i in 0..6 {
        inline_put(&c, &ns, i, 100 + i as u64);
    }
    let keys: Vec<BlockKey> = (0..6).map(key).collect();
    assert_eq!(c.evict(&ns, &keys, false).unwrap(), (6, 0));
    assert!(c.flush_demotions(Duration::from_secs(10)));
    assert_eq!(c.lookup(&ns, &keys).unwrap(), vec![TierKind::Disk; 6]);
    let got = device_get(&c, &ns, 0, &keys);
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(
            g.unwrap(),
            (payload(100 + i as u64), TierKind::Disk),
            "block {i}"
        );
    }
    // Promoted on the way: disk → host (promote_on_get) → HBM, in one
    // batch: the first four fit (slots reserved for the batch are nobody's
    // victims), the other two stay in the host tier.
    assert_eq!(
        c.lookup(&ns, &keys).unwrap(),
        [&[TierKind::Hbm; 4][..], &[TierKind::Host; 2][..]].concat()
    );
    let got = device_get(&c, &ns, 0, &keys);
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(g.unwrap().0, payload(100 + i as u64), "block {i}");
    }
}

#[test]
fn two_devices_keep_separate_t0s() {
    let (c, ns) = open(config(2, 16), 2);
    device_put(&c, &ns, 0, &[(0, 1)]);
    device_put(&c, &ns, 1, &[(1, 2)]);
    let (h0, h1) = (&c.hbm()[0], &c.hbm()[1]);
    assert!(h0.contains(&ns, &key(0)) && !h0.contains(&ns, &key(1)));
    assert!(h1.contains(&ns, &key(1)) && !h1.contains(&ns, &key(0)));
    let stats = c.stats();
    let devices: Vec<usize> = stats.hbm.iter().map(|h| h.device).collect();
    assert_eq!(devices, vec![0, 1]);
    assert_eq!(tier_rows(&c, TierKind::Hbm).len(), 2);
    // Device 1 reads device 0's block through staging, exact bytes.
    let got = device_get(&c, &ns, 1, &[key(0), key(1)]);
    assert_eq!(got[0].clone().unwrap(), (payload(1), TierKind::Hbm));
    assert_eq!(got[1].clone().unwrap(), (payload(2), TierKind::Hbm));
    // Pins on both devices release exactly their own blocks.
    let lease = c
        .pin(&ns, &[key(0), key(1)], Duration::from_secs(60))
        .unwrap();
    let pinned: Vec<u64> = tier_rows(&c, TierKind::Hbm)
        .iter()
        .map(|t| t.pinned_blocks)
        .collect();
    assert_eq!(pinned, vec![1, 1]);
    c.unpin(lease.lease_id).unwrap();
    let pinned: Vec<u64> = tier_rows(&c, TierKind::Hbm)
        .iter()
        .map(|t| t.pinned_blocks)
        .collect();
    assert_eq!(pinned, vec![0, 0]);
    // A put on one device removes the other's copy.
    device_put(&c, &ns, 1, &[(0, 3)]);
    assert!(!h0.contains(&ns, &key(0)) && h1.contains(&ns, &key(0)));
    assert_eq!(
        device_get(&c, &ns, 0, &[key(0)])[0].clone().unwrap().0,
        payload(3)
    );
}

#[test]
fn watch_sees_hbm_store_eviction_and_demotion() {
    let (c, ns) = open(config(1, 16), 1);
    let mut rx = c.subscribe();
    device_put(&c, &ns, 0, &[(0, 1)]);
    device_put(&c, &ns, 0, &[(1, 2)]);
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        seen.push((e.kind, e.tier, e.key));
    }
    assert!(
        seen.contains(&(EventKind::Stored, TierKind::Hbm, key(0))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(EventKind::Stored, TierKind::Host, key(0))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(EventKind::Evicted, TierKind::Hbm, key(0))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(EventKind::Stored, TierKind::Hbm, key(1))),
        "{seen:?}"
    );
}

#[test]
fn without_an_hbm_tier_device_puts_land_in_the_host_tier() {
    let mut cfg = config(4, 16);
    cfg.hbm = None;
    let (c, ns) = open(cfg, 1);
    assert!(c.hbm().is_empty());
    device_put(&c, &ns, 0, &[(0, 1), (1, 2)]);
    assert_eq!(
        c.lookup(&ns, &[key(0), key(1)]).unwrap(),
        vec![TierKind::Host; 2]
    );
    let got = device_get(&c, &ns, 0, &[key(0), key(1)]);
    assert_eq!(got[0].clone().unwrap(), (payload(1), TierKind::Host));
    assert_eq!(got[1].clone().unwrap(), (payload(2), TierKind::Host));
    let meta = c.inspect(&ns, &key(1)).unwrap().unwrap();
    assert!(meta.checksum_ok());
}

#[test]
fn no_gpu_cache_is_as_before() {
    let mut cfg = config(4, 16);
    cfg.hbm = Some(HbmTierConfig::default());
    let c = BlockCache::new(cfg).unwrap();
    let (ns, _) = c.register_namespace(spec()).unwrap();
    let stats = c.stats();
    assert!(stats.hbm.is_empty() && !stats.host_pinned);
    assert_eq!(
        stats.tiers.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![TierKind::Host]
    );
    let e = c
        .put_from_device(&ns.id, 0, &[(key(0), None)], |_: &[u64]| Ok::<(), ()>(()))
        .unwrap_err();
    assert!(e.to_string().contains("device"), "{e}");
    let e = c.get_to_device(&ns.id, 0, &[key(0)], |_| ()).unwrap_err();
    assert!(matches!(e, CacheError::InvalidArgument { .. }), "{e}");
}

#[test]
fn inspect_reads_hbm_blocks() {
    let (c, ns) = open(config(4, 16), 1);
    device_put(&c, &ns, 0, &[(0, 9)]);
    let i = c.inspect(&ns, &key(0)).unwrap().unwrap();
    assert_eq!(i.meta.tier, TierKind::Hbm);
    assert!(i.checksum_ok());
    assert_eq!(i.meta.checksum, xxhash_rust::xxh3::xxh3_64(&payload(9)));
}

/// `evict` of many T0 blocks demotes them a group at a time (one launch and
/// fence per group, checksums hashed in parallel) and every byte lands in the
/// host tier; `get_to_device` promotes them back a group at a time.
#[test]
fn batched_demotion_and_promotion_move_every_byte() {
    let n = 40usize;
    let (c, ns) = open(config(n as u64, 3 * n as u64), 1);
    let items: Vec<(usize, u64)> = (0..n).map(|i| (i, 7000 + i as u64)).collect();
    for chunk in items.chunks(7) {
        device_put(&c, &ns, 0, chunk);
    }
    assert_eq!(tier_rows(&c, TierKind::Hbm)[0].used_bytes, n as u64 * BLOCK);

    // Duplicates and an unknown key in the request are harmless.
    let mut keys: Vec<BlockKey> = (0..n).map(key).collect();
    keys.push(key(3));
    keys.push(key(9999));
    assert_eq!(c.evict(&ns, &keys, false).unwrap(), (n as u32, 0));
    let hbm = &c.stats().hbm[0];
    assert_eq!(
        (hbm.demoted, hbm.draining, hbm.checksum_failures),
        (n as u64, 0, 0)
    );
    assert_eq!(tier_rows(&c, TierKind::Hbm)[0].used_bytes, 0);
    let got = c.get_batch(&ns, &keys[..n]).unwrap();
    for (i, g) in got.iter().enumerate() {
        let (bytes, tier) = g.clone().expect("demoted block is in the host tier");
        assert_eq!(tier, TierKind::Host, "key {i}");
        assert_eq!(&bytes[..], &payload(7000 + i as u64)[..], "key {i}");
    }

    let got = device_get(&c, &ns, 0, &keys[..n]);
    for (i, g) in got.iter().enumerate() {
        let (bytes, tier) = g.clone().expect("hit");
        assert_eq!(tier, TierKind::Host, "key {i}");
        assert_eq!(bytes, payload(7000 + i as u64), "key {i}");
    }
    assert_eq!(c.stats().hbm[0].promoted, n as u64);
    assert_eq!(tier_rows(&c, TierKind::Hbm)[0].used_bytes, n as u64 * BLOCK);
    let got = device_get(&c, &ns, 0, &keys[..n]);
    for (i, g) in got.iter().enumerate() {
        let (bytes, tier) = g.clone().expect("hit");
        assert_eq!(tier, TierKind::Hbm, "key {i}");
        assert_eq!(bytes, payload(7000 + i as u64), "key {i}");
    }
    assert_within_capacity(&c);
}

/// Promotions into T0 hold no stripe lock while they copy: a put that lands
/// meanwhile must still win. One writer puts new versions of a few keys and
/// reads each back at once (through T0 and through the host tier); readers
/// keep promoting the same keys with `get_to_device`. A promotion that
/// published the bytes it read before the put would serve the old version.
#[test]
fn a_promotion_racing_a_put_never_shadows_it() {
    let (c, ns) = open(config(8, 64), 1);
    let c = Arc::new(c);
    let keys: Vec<BlockKey> = (0..6).map(key).collect();
    // Keys 0..6 change; 100..110 never do and keep T0 (8 blocks) churning.
    for i in (0..6).chain(100..110) {
        inline_put(&c, &ns, i, i as u64);
    }
    let filler: Vec<BlockKey> = (100..110).map(key).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (c, keys, filler, stop) = (
                Arc::clone(&c),
                keys.clone(),
                filler.clone(),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = device_get(&c, &ns, 0, &keys);
                    // Push them out of T0 again, so promotions keep happening.
                    let _ = device_get(&c, &ns, 0, &filler);
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    for step in 0..1500u64 {
        let i = (step % 6) as usize;
        let seed = 1000 + step;
        inline_put(&c, &ns, i, seed);
        let want = payload(seed);
        let (bytes, tier) = device_get(&c, &ns, 0, &[key(i)])[0]
            .clone()
            .expect("a block just put is found");
        assert_eq!(
            bytes, want,
            "step {step}: key {i} from {tier:?} is not the version just put"
        );
        let (bytes, tier) = c.get_batch(&ns, &[key(i)]).unwrap()[0]
            .clone()
            .expect("a block just put is found");
        assert_eq!(&bytes[..], &want[..], "step {step}: key {i} from {tier:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(rounds > 0, "the readers never ran");
    assert!(c.stats().hbm[0].promoted > 0, "nothing was promoted");
    assert_eq!(c.stats().hbm[0].checksum_failures, 0);
}

/// Batched demotions from several threads at once (each takes completed
/// drains off the queue, hashes them unlocked and publishes them) while a
/// writer keeps putting from the device under pressure: every read returns
/// the version just written, nothing is left draining, no copy is wrong.
#[test]
fn concurrent_evicts_and_device_puts_stay_exact() {
    let (c, ns) = open(config(12, 256), 1);
    let c = Arc::new(c);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let evictors: Vec<_> = (0..2)
        .map(|_| {
            let (c, stop) = (Arc::clone(&c), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut evicted = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // The HBM tier's own batched demotion (the cache's
                    // `evict` would also drop blocks found only in the host
                    // tier, as there is no disk tier here).
                    let keys: Vec<BlockKey> = (0..30).map(key).collect();
                    evicted += c.hbm()[0]
                        .demote_many(&ns, &keys)
                        .iter()
                        .filter(|o| **o == kvstrata_tiers::RemoveOutcome::Removed)
                        .count() as u64;
                }
                evicted
            })
        })
        .collect();
    for step in 0..400u64 {
        let items: Vec<(usize, u64)> = (0..5)
            .map(|j| (((step * 5 + j) % 30) as usize, 50_000 + step * 5 + j))
            .collect();
        device_put(&c, &ns, 0, &items);
        let keys: Vec<BlockKey> = items.iter().map(|&(i, _)| key(i)).collect();
        for ((i, seed), got) in items.iter().zip(device_get(&c, &ns, 0, &keys)) {
            let (bytes, tier) = got.expect("a block just put is found");
            assert_eq!(bytes, payload(*seed), "step {step}: key {i} from {tier:?}");
        }
        assert_within_capacity(&c);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let evicted: u64 = evictors.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(evicted > 0, "the evictors never demoted anything");
    let hbm = &c.stats().hbm[0];
    assert_eq!((hbm.draining, hbm.checksum_failures), (0, 0));
    assert!(hbm.demoted > 0);
}

/// A staged device get larger than one lookup chunk, its keys mixing the
/// HBM tier, the host tier and misses in every chunk: each page gets its
/// block's exact bytes (misses stay untouched), the caller is told once
/// with every key's tier, and each key is looked up in the HBM tier once
/// (its hits and misses counted once). A get whose second scatter fails
/// reports every HBM hit with the failure and leaves the others as misses.
#[test]
fn staged_gets_scatter_hbm_chunks_as_they_are_looked_up() {
    let (c, ns) = open(config(100, 200), 1);
    let stream = c.gpus()[0].stream().unwrap();
    // 0..100 land in the HBM tier, 100..150 in the host tier.
    let items: Vec<(usize, u64)> = (0..150).map(|i| (i, 1000 + i as u64)).collect();
    device_put(&c, &ns, 0, &items);
    assert_eq!(c.delete(&ns, &[key(30), key(120)]).unwrap(), 2);
    // Interleaved: every chunk of the request holds both tiers.
    let order: Vec<usize> = (0..75).flat_map(|i| [i, 149 - i]).collect();
    let keys: Vec<BlockKey> = order.iter().map(|&i| key(i)).collect();
    let hbm_before = tier_rows(&c, TierKind::Hbm)[0].clone();
    let len = BLOCK as usize;
    let mut pages = vec![7u8; keys.len() * len];
    let mut told: Option<Vec<Option<TierKind>>> = None;
    let mut calls = 0;
    let (found, scattered) = c
        .get_to_device_staged(
            &ns,
            0,
            &keys,
            &stream,
            |pos: &[usize], from: &[u64]| {
                calls += 1;
                for (&p, &a) in pos.iter().zip(from) {
                    // SAFETY: a lent block of BLOCK bytes (host memory on the CPU backend).
                    let b = unsafe { std::slice::from_raw_parts(a as *const u8, len) };
                    pages[p * len..(p + 1) * len].copy_from_slice(b);
                }
                Ok::<(), GpuError>(())
            },
            |f: &[Option<TierKind>]| {
                assert!(told.is_none(), "told twice");
                told = Some(f.to_vec());
            },
        )
        .unwrap();
    assert_eq!(scattered.unwrap(), 148);
    assert_eq!(told.as_deref(), Some(&found[..]));
    assert!(calls > 3, "one scatter per chunk at least: {calls}");
    for (p, &i) in order.iter().enumerate() {
        let page = &pages[p * len..(p + 1) * len];
        match i {
            30 | 120 => {
                assert_eq!(found[p], None, "key {i}");
                assert!(page.iter().all(|&b| b == 7), "a miss's page is untouched");
            }
            _ => {
                let want = if i < 100 {
                    TierKind::Hbm
                } else {
                    TierKind::Host
                };
                assert_eq!(found[p], Some(want), "key {i}");
                assert!(
                    page == &payload(1000 + i as u64)[..],
                    "key {i}: bytes differ"
                );
            }
        }
    }
    let hbm_after = tier_rows(&c, TierKind::Hbm)[0].clone();
    assert_eq!(
        hbm_after.hits - hbm_before.hits,
        99,
        "HBM hits counted once"
    );
    // The 49 host-tier blocks missed in the HBM tier once; the 2 absent
    // keys once more by the slower tiers' read path, which asks every tier.
    assert_eq!(
        hbm_after.misses - hbm_before.misses,
        49 + 2 * 2,
        "HBM misses"
    );

    // The second scatter fails: every HBM hit is reported (with the
    // failure), and no key is looked for beyond the HBM tier.
    let hbm_before = tier_rows(&c, TierKind::Hbm)[0].clone();
    let host_before = tier_rows(&c, TierKind::Host)[0].clone();
    let mut calls = 0;
    let mut told = false;
    let (found, scattered) = c
        .get_to_device_staged(
            &ns,
            0,
            &keys,
            &stream,
            |_: &[usize], _: &[u64]| -> Result<(), GpuError> {
                calls += 1;
                match calls {
                    2 => Err(GpuError::Unsupported {
                        what: "the test's second scatter",
                    }),
                    _ => Ok(()),
                }
            },
            |_: &[Option<TierKind>]| told = true,
        )
        .unwrap();
    assert!(scattered.is_err());
    assert_eq!(calls, 2, "no scatter after the failure");
    assert!(!told, "not queued: nobody is told so");
    let hbm_after = tier_rows(&c, TierKind::Hbm)[0].clone();
    let host_after = tier_rows(&c, TierKind::Host)[0].clone();
    let hits = (hbm_after.hits - hbm_before.hits) as usize;
    assert_eq!(
        hits + (hbm_after.misses - hbm_before.misses) as usize,
        keys.len()
    );
    assert!(
        hits > 64,
        "the HBM tier holds blocks of more than one chunk: {hits}"
    );
    assert_eq!(
        found.iter().flatten().count(),
        hits,
        "every HBM hit reported"
    );
    assert!(found.iter().flatten().all(|t| *t == TierKind::Hbm));
    assert_eq!(
        host_after.hits, host_before.hits,
        "the host tier was not read"
    );
}
