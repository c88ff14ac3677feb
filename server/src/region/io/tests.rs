//! Tests of the KV-region data path on the CPU backend (the same code the
//! CUDA backend runs): gathers and scatters byte for byte, staging groups,
//! failures that store nothing or write no page.

use std::io::Write;
use std::os::fd::OwnedFd;

use kvstrata_kernels::{Gpu, PageLayout, PagedGeometry, reference};
use kvstrata_tiers::{CacheConfig, Dtype, HbmTierConfig, HostTierConfig, NamespaceSpec, Tier};
use rand::{Rng, SeedableRng};

use super::*;
use crate::region::{GpuSet, KIND_MEMFD, RegionLimits, RegionPreamble, RegionRegistry};

fn geometry() -> PagedGeometry {
    PagedGeometry::packed(PageLayout::CrossLayer, 3, 3, 2, 5, 2, 9)
}

/// Random bytes with no zero, so a block left unwritten shows.
fn random(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.random_range(1..=255u8)).collect()
}

fn cache(host_bytes: u64, hbm: bool, gpus: Vec<Gpu>) -> BlockCache {
    let config = CacheConfig {
        host: HostTierConfig {
            capacity_bytes: host_bytes,
            segment_bytes: host_bytes,
        },
        hbm: hbm.then(|| HbmTierConfig {
            capacity_bytes: 1 << 20,
            segment_bytes: 1 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    BlockCache::with_gpus(config, gpus).expect("cache")
}

/// A memfd region of `geometry()` holding `bytes`.
fn region(registry: &RegionRegistry, bytes: &[u8]) -> Arc<KvRegion> {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(bytes).expect("write");
    registry
        .register(
            RegionPreamble {
                kind: KIND_MEMFD,
                device: 0,
                bytes: bytes.len() as u64,
                handle: [0; 64],
                geometry: geometry(),
                name: "engine".into(),
            },
            Some(OwnedFd::from(f)),
        )
        .expect("registers")
}

/// The region's bytes, as the daemon sees them.
fn region_bytes(r: &KvRegion) -> Vec<u8> {
    let base = r.base().expect("mapped") as *const u8;
    // SAFETY: the region maps `bytes()` bytes at `base`, alive while `r` is.
    unsafe { std::slice::from_raw_parts(base, r.bytes() as usize) }.to_vec()
}

fn key(s: &str) -> BlockKey {
    BlockKey::new("key", s.as_bytes()).expect("key")
}

#[test]
fn direct_put_and_get_match_the_references_on_the_cpu_backend() {
    let g = geometry();
    let ppb = 2u32;
    let bb = g.block_bytes(ppb) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let registry = RegionRegistry::new(
        RegionLimits {
            max_regions: 4,
            max_region_bytes: 1 << 20,
        },
        Arc::new(GpuSet::default()),
    );
    let engine = random(&mut rng, g.region_bytes() as usize);
    let r = region(&registry, &engine);
    // Only a cache on the region's backend reaches it directly.
    assert_eq!(direct_device(&cache(1 << 20, true, Vec::new()), &r), None);
    let c = cache(1 << 20, true, vec![Gpu::cpu()]);
    assert_eq!(direct_device(&c, &r), Some(0));
    let spec = NamespaceSpec::layer_major("m", g.layers, g.kv_heads, g.head_dim, Dtype::F16, 6);
    let ns = c.register_namespace(spec).expect("namespace").0.id;

    // Put: two blocks, one page named twice, gathered into HBM slots.
    let pages = [7u32, 1, 4, 4];
    let items = [(key("a"), None), (key("b"), Some(key("a")))];
    let p = RegionPages {
        region: &r,
        pages_per_block: ppb,
        page_ids: &pages,
    };
    let done = put_direct(&c, &ns, 0, p, &items).expect("put");
    assert_eq!(done.outcomes, vec![PutOutcome::Stored; 2]);
    assert_eq!(done.gathered, 2 * bb as u64);
    assert_eq!(r.info().gathered, 2 * bb as u64);
    assert_eq!(
        c.lookup(&ns, &[key("a"), key("b")]).expect("lookup"),
        vec![TierKind::Hbm; 2]
    );
    let mut want = vec![0u8; 2 * bb];
    reference::gather(&g, ppb, &pages, &engine, &mut want).expect("reference");
    let got = c.get_batch(&ns, &[key("a"), key("b")]).expect("get");
    for (i, hit) in got.iter().enumerate() {
        let (bytes, _) = hit.as_ref().expect("found");
        assert!(bytes[..] == want[i * bb..(i + 1) * bb], "block {i}");
    }

    // A failed gather (a page outside the region: the service checks
    // that first, so only the kernel's own check catches it here) stores
    // nothing and frees its slots.
    let used = c.hbm()[0].stats().used_bytes;
    let bad = RegionPages {
        page_ids: &[0, 9],
        ..p
    };
    let e = put_direct(&c, &ns, 0, bad, &[(key("c"), None)]).expect_err("fails");
    assert!(
        matches!(e, DevicePutError::Fill(RegionIoError::Device { .. })),
        "{e:?}"
    );
    assert!(c.lookup(&ns, &[key("c")]).expect("lookup").is_empty());
    assert_eq!(c.hbm()[0].stats().used_bytes, used);

    // Get: a hit from HBM, a miss, a hit from the host tier, scattered
    // over poisoned pages; the miss's pages stay as they were.
    let host_block = random(&mut rng, bb);
    c.put_batch(
        &ns,
        &[kvstrata_tiers::PutBlock {
            key: key("h"),
            parent: None,
            payload: Bytes::from(host_block.clone()),
        }],
    )
    .expect("put");
    let before = region_bytes(&r);
    let get_pages = [2u32, 3, 5, 6, 8, 0];
    let got = get_direct(
        &c,
        &ns,
        0,
        RegionPages {
            region: &r,
            pages_per_block: ppb,
            page_ids: &get_pages,
        },
        &[key("b"), key("missing"), key("h")],
        None,
    )
    .expect("get");
    assert_eq!(
        got.found,
        vec![Some(TierKind::Hbm), None, Some(TierKind::Host)]
    );
    assert_eq!(got.scatter.expect("scatter"), 2 * bb as u64);
    assert_eq!(r.info().scattered, 2 * bb as u64);
    let mut want_region = before.clone();
    reference::scatter(&g, ppb, &[2, 3], &want[bb..], &mut want_region).expect("reference");
    reference::scatter(&g, ppb, &[8, 0], &host_block, &mut want_region).expect("reference");
    assert!(
        region_bytes(&r) == want_region,
        "region differs from the reference"
    );
}

/// A memfd region of `geometry()`, a CPU-backend cache with a host tier
/// only (as `--gpu-hbm-bytes 0`), device staging buffers of three blocks
/// of one page, and a namespace of such blocks.
struct HostOnly {
    g: PagedGeometry,
    bb: usize,
    engine: Vec<u8>,
    r: Arc<KvRegion>,
    c: BlockCache,
    ns: NamespaceId,
    _registry: RegionRegistry,
}

fn host_only(seed: u64) -> HostOnly {
    let g = geometry();
    let bb = g.block_bytes(1) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let registry = RegionRegistry::new(
        RegionLimits {
            max_regions: 4,
            max_region_bytes: 1 << 20,
        },
        Arc::new(GpuSet::default()),
    );
    let engine = random(&mut rng, g.region_bytes() as usize);
    let r = region(&registry, &engine);
    let c = cache(1 << 20, false, vec![Gpu::cpu()]);
    // Groups of three blocks, taking turns over the set's two buffers.
    c.gpus()[0].set_device_staging_bytes(3 * bb);
    let spec = NamespaceSpec::layer_major("m", g.layers, g.kv_heads, g.head_dim, Dtype::F16, 3);
    let ns = c.register_namespace(spec).expect("namespace").0.id;
    HostOnly {
        g,
        bb,
        engine,
        r,
        c,
        ns,
        _registry: registry,
    }
}

fn keys(names: &[&str]) -> Vec<BlockKey> {
    names.iter().map(|n| key(n)).collect()
}

/// Puts seven blocks (an odd count: two full groups and one of one)
/// from the pages `pages` under b0..b6; checks the stored bytes against
/// the reference gather and their recorded checksums.
fn put_seven(t: &HostOnly, pages: &[u32]) -> Vec<u8> {
    let items: Vec<(BlockKey, Option<BlockKey>)> =
        (0..7).map(|i| (key(&format!("b{i}")), None)).collect();
    let p = RegionPages {
        region: &t.r,
        pages_per_block: 1,
        page_ids: pages,
    };
    let done = put_direct(&t.c, &t.ns, 0, p, &items).expect("put");
    assert_eq!(done.outcomes, vec![PutOutcome::Stored; 7]);
    assert_eq!(done.gathered, 7 * t.bb as u64);
    let names: Vec<BlockKey> = items.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        t.c.lookup(&t.ns, &names).expect("lookup"),
        vec![TierKind::Host; 7]
    );
    let mut want = vec![0u8; 7 * t.bb];
    reference::gather(&t.g, 1, pages, &t.engine, &mut want).expect("reference");
    let got = t.c.get_batch(&t.ns, &names).expect("get");
    for (i, (hit, k)) in got.iter().zip(&names).enumerate() {
        let (bytes, _) = hit.as_ref().expect("found");
        assert!(bytes[..] == want[i * t.bb..(i + 1) * t.bb], "block {i}");
        let seen = t.c.inspect(&t.ns, k).expect("inspect").expect("there");
        assert!(seen.checksum_ok(), "block {i}: recorded checksum");
    }
    want
}

/// Gets b6..b0 with a miss among them into pages 0..=7 (the miss's page
/// 2 untouched) and checks the region against the reference scatter.
fn get_seven(t: &HostOnly, stored: &[u8]) {
    let before = region_bytes(&t.r);
    let order = [6usize, 5, usize::MAX, 4, 3, 2, 1, 0];
    let names: Vec<String> = order
        .iter()
        .map(|&i| match i {
            usize::MAX => "missing".to_string(),
            i => format!("b{i}"),
        })
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let page_ids: Vec<u32> = (0..8).collect();
    let got = get_direct(
        &t.c,
        &t.ns,
        0,
        RegionPages {
            region: &t.r,
            pages_per_block: 1,
            page_ids: &page_ids,
        },
        &keys(&names),
        None,
    )
    .expect("get");
    let mut want_found = vec![Some(TierKind::Host); 8];
    want_found[2] = None;
    assert_eq!(got.found, want_found);
    assert_eq!(got.scatter.expect("scatter"), 7 * t.bb as u64);
    let mut want = before;
    for (page, &i) in order.iter().enumerate() {
        if i != usize::MAX {
            let block = &stored[i * t.bb..(i + 1) * t.bb];
            reference::scatter(&t.g, 1, &[page as u32], block, &mut want).expect("reference");
        }
    }
    assert!(
        region_bytes(&t.r) == want,
        "region differs from the reference"
    );
}

#[test]
fn host_tier_blocks_move_through_device_staging_in_groups() {
    let t = host_only(0x57a6);
    let gpu = &t.c.gpus()[0];
    assert_eq!(gpu.device_staging_bytes(), 0, "made when first needed");
    // One page named twice: a gather may read a page more than once.
    let stored = put_seven(&t, &[5, 0, 8, 3, 3, 1, 7]);
    assert_eq!(
        gpu.device_staging_bytes(),
        kvstrata_kernels::DEVICE_STAGING_BUFFERS * 3 * t.bb,
        "the put went through one staging set"
    );
    get_seven(&t, &stored);
    assert_eq!(t.r.info().gathered, 7 * t.bb as u64);
    assert_eq!(t.r.info().scattered, 7 * t.bb as u64);
    // The set went back to the pool: no second one was made.
    assert_eq!(
        gpu.device_staging_bytes(),
        kvstrata_kernels::DEVICE_STAGING_BUFFERS * 3 * t.bb
    );
}

#[test]
fn without_a_free_staging_set_host_blocks_move_straight_and_the_same() {
    let t = host_only(0xfa11);
    let gpu = &t.c.gpus()[0];
    // Another request holds every set (for longer than the put and the get
    // wait for one: each waits, then moves without).
    let held: Vec<_> = (0..kvstrata_kernels::DEVICE_STAGING_SETS)
        .map(|_| gpu.device_staging(3 * t.bb).expect("alloc").expect("a set"))
        .collect();
    let stored = put_seven(&t, &[2, 2, 6, 0, 8, 4, 1]);
    get_seven(&t, &stored);
    let counts = gpu.device_staging_counts();
    assert_eq!((counts.waits, counts.bypasses), (2, 2), "{counts:?}");
    drop(held);
    // And through a set again afterwards.
    get_seven(&t, &stored);
}

#[test]
fn a_bad_page_list_stores_nothing_and_writes_no_page() {
    let t = host_only(0xbad);
    let stored = put_seven(&t, &[0, 1, 2, 3, 4, 5, 6]);
    let host_used = |c: &BlockCache| {
        let s = c.stats();
        let (_, host) = s
            .tiers
            .iter()
            .find(|(k, _)| *k == TierKind::Host)
            .expect("host tier");
        host.used_bytes
    };
    let used = host_used(&t.c);
    // The seventh block's page lies outside the region (the service
    // checks that first; only the path's own check catches it here):
    // nothing is gathered, nothing stored, the slots are freed.
    let items: Vec<(BlockKey, Option<BlockKey>)> =
        (0..7).map(|i| (key(&format!("c{i}")), None)).collect();
    let bad = RegionPages {
        region: &t.r,
        pages_per_block: 1,
        page_ids: &[0, 1, 2, 3, 4, 5, 9],
    };
    let e = put_direct(&t.c, &t.ns, 0, bad, &items).expect_err("fails");
    assert!(
        matches!(e, DevicePutError::Fill(RegionIoError::Device { .. })),
        "{e:?}"
    );
    let names: Vec<BlockKey> = items.iter().map(|(k, _)| *k).collect();
    assert!(t.c.lookup(&t.ns, &names).expect("lookup").is_empty());
    assert_eq!(host_used(&t.c), used, "slots freed");
    assert_eq!(t.r.info().gathered, 7 * t.bb as u64, "nothing gathered");
    // A get whose last page is outside the region writes no page.
    let before = region_bytes(&t.r);
    let got = get_direct(
        &t.c,
        &t.ns,
        0,
        RegionPages {
            region: &t.r,
            pages_per_block: 1,
            page_ids: &[8, 7, 6, 5, 4, 3, 9],
        },
        &keys(&["b0", "b1", "b2", "b3", "b4", "b5", "b6"]),
        None,
    )
    .expect("get");
    assert_eq!(got.found, vec![Some(TierKind::Host); 7]);
    assert!(
        matches!(got.scatter, Err(RegionIoError::Device { .. })),
        "{:?}",
        got.scatter
    );
    assert!(region_bytes(&t.r) == before, "no page written");
    assert_eq!(t.r.info().scattered, 0);
    // The stored blocks are still whole.
    get_seven(&t, &stored);
}

#[test]
fn a_get_of_hbm_and_host_blocks_scatters_both_in_groups() {
    let g = geometry();
    let bb = g.block_bytes(1) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4b3);
    let registry = RegionRegistry::new(
        RegionLimits {
            max_regions: 4,
            max_region_bytes: 1 << 20,
        },
        Arc::new(GpuSet::default()),
    );
    let engine = random(&mut rng, g.region_bytes() as usize);
    let r = region(&registry, &engine);
    let c = cache(1 << 20, true, vec![Gpu::cpu()]);
    c.gpus()[0].set_device_staging_bytes(2 * bb);
    let spec = NamespaceSpec::layer_major("m", g.layers, g.kv_heads, g.head_dim, Dtype::F16, 3);
    let ns = c.register_namespace(spec).expect("namespace").0.id;
    // Three blocks gathered into HBM slots, five put inline (host tier).
    let p = RegionPages {
        region: &r,
        pages_per_block: 1,
        page_ids: &[4, 0, 7],
    };
    let hbm_items = [(key("h0"), None), (key("h1"), None), (key("h2"), None)];
    put_direct(&c, &ns, 0, p, &hbm_items).expect("put");
    let mut hbm_blocks = vec![0u8; 3 * bb];
    reference::gather(&g, 1, &[4, 0, 7], &engine, &mut hbm_blocks).expect("reference");
    let host_blocks: Vec<Vec<u8>> = (0..5).map(|_| random(&mut rng, bb)).collect();
    let puts: Vec<kvstrata_tiers::PutBlock> = host_blocks
        .iter()
        .enumerate()
        .map(|(i, b)| kvstrata_tiers::PutBlock {
            key: key(&format!("t{i}")),
            parent: None,
            payload: Bytes::from(b.clone()),
        })
        .collect();
    c.put_batch(&ns, &puts).expect("put");
    let names = ["t3", "h1", "t0", "t4", "h0", "t1", "h2", "t2"];
    let before = region_bytes(&r);
    let page_ids: Vec<u32> = vec![8, 6, 5, 3, 2, 1, 0, 7];
    let got = get_direct(
        &c,
        &ns,
        0,
        RegionPages {
            region: &r,
            pages_per_block: 1,
            page_ids: &page_ids,
        },
        &keys(&names),
        None,
    )
    .expect("get");
    assert_eq!(got.scatter.expect("scatter"), 8 * bb as u64);
    let tiers: Vec<Option<TierKind>> = names
        .iter()
        .map(|n| match n.as_bytes()[0] {
            b'h' => Some(TierKind::Hbm),
            _ => Some(TierKind::Host),
        })
        .collect();
    assert_eq!(got.found, tiers);
    let mut want = before;
    for (name, page) in names.iter().zip(&page_ids) {
        let i = (name.as_bytes()[1] - b'0') as usize;
        let block = match name.as_bytes()[0] {
            b'h' => &hbm_blocks[i * bb..(i + 1) * bb],
            _ => &host_blocks[i][..],
        };
        reference::scatter(&g, 1, &[*page], block, &mut want).expect("reference");
    }
    assert!(
        region_bytes(&r) == want,
        "region differs from the reference"
    );
    // The host-tier blocks were promoted into the HBM tier (from the
    // staging buffers they passed through), with their own bytes.
    let host_keys = keys(&["t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(
        c.lookup(&ns, &host_keys).expect("lookup"),
        vec![TierKind::Hbm; 5]
    );
    assert_eq!(c.hbm()[0].hbm_stats().promoted, 5);
    let got = c.get_batch(&ns, &host_keys).expect("get");
    for (i, hit) in got.iter().enumerate() {
        let (bytes, tier) = hit.as_ref().expect("found");
        assert_eq!(*tier, TierKind::Hbm);
        assert!(bytes[..] == host_blocks[i][..], "promoted block t{i}");
    }
}

#[test]
fn no_room_answers_no_space_without_gathering() {
    let g = geometry();
    let registry = RegionRegistry::new(
        RegionLimits {
            max_regions: 4,
            max_region_bytes: 1 << 20,
        },
        Arc::new(GpuSet::default()),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let r = region(&registry, &random(&mut rng, g.region_bytes() as usize));
    // No HBM tier, and a host tier of one slot, held by a pinned block.
    let bb = g.block_bytes(1);
    let c = cache(bb, false, vec![Gpu::cpu()]);
    let spec = NamespaceSpec::layer_major("m", g.layers, g.kv_heads, g.head_dim, Dtype::F16, 3);
    let ns = c.register_namespace(spec).expect("namespace").0.id;
    c.put_batch(
        &ns,
        &[kvstrata_tiers::PutBlock {
            key: key("pinned"),
            parent: None,
            payload: Bytes::from(random(&mut rng, bb as usize)),
        }],
    )
    .expect("put");
    c.pin(&ns, &[key("pinned")], std::time::Duration::from_secs(60))
        .expect("pin");
    let p = RegionPages {
        region: &r,
        pages_per_block: 1,
        page_ids: &[1, 2],
    };
    let done = put_direct(&c, &ns, 0, p, &[(key("a"), None), (key("b"), None)]).expect("put");
    assert_eq!(done.outcomes, vec![PutOutcome::NoSpace; 2]);
    assert_eq!((done.gathered, r.info().gathered), (0, 0));
}
