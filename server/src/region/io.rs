//! The KV-region data path: every gather and scatter between a registered
//! region ([`crate::region::KvRegion`]) and the cache goes through this module.
//!
//! Two ways, chosen per region by [`direct_device`]:
//!
//! - **Direct**, for a region whose memory the cache's own devices can reach:
//!   a CUDA IPC region opened on a device the cache was given
//!   (`BlockCache::with_gpus`; matched by backend and CUDA ordinal), or, on
//!   the CPU backend, a memfd region when the cache runs on the CPU backend
//!   itself (`gpu.enabled = "cpu"`: tests). The gather writes straight into
//!   the slots [`BlockCache::put_from_device`] reserves (device `device`'s
//!   HBM tier, else a device-reachable pinned host slot) and the scatter
//!   reads straight from the addresses [`BlockCache::get_to_device`] lends:
//!   [`put_direct`], [`get_direct`]. No staging buffer, one launch per
//!   region.
//! - **Staged**, for every other region (memfd regions of a daemon whose
//!   cache has CUDA devices or none; CUDA regions on a device the cache does
//!   not hold): [`gather`] the pages into one pinned staging buffer, wait,
//!   and hand the staged bytes to `BlockCache::put_batch` (zero-copy `Bytes`
//!   that keep the buffer alive); [`scatter`] copies the payloads
//!   `get_batch` found into a pinned staging buffer and scatters them into
//!   the pages. Device addresses of one backend mean nothing to another, so
//!   a CPU-backend (memfd) region can never use a CUDA device's slots, nor
//!   the other way round.
//!
//! Atomicity of a `BatchPut` (the service, `server/src/service/put.rs`): the
//! items are validated first (payload sizes, parents), then every staged
//! gather runs, then the direct put (its gather failing stores nothing and
//! fails the request), then `put_batch` of the rest. So a failed gather,
//! staged or direct, still stores nothing. A put naming pages of more than
//! one direct-capable region sends only the **first** such region's blocks
//! (in item order) through the direct path and stages the others: a second
//! direct put could fail after the first had stored. The direct region's
//! blocks get slots all or none (`put_from_device`): when one cannot be
//! reserved, each answers `NoSpace` and nothing is gathered. A `BatchGet`
//! stores nothing, so every direct-capable region of it is read directly.
//!
//! A CUDA region needs nothing more than its device being among the cache's
//! GPUs: the region's stream and the cache's slots live on the same device
//! (the daemon gives the cache and the region registry the same `Gpu`s), and
//! the host-tier fallback is page-locked memory mapped for every device.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_kernels::{GpuError, StagingBuffer};
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheError, DevicePutError, NamespaceId, PutOutcome, TierKind,
};

use crate::region::{KvRegion, RegionLookupError};

/// Why a gather or scatter failed.
#[derive(Debug, thiserror::Error)]
pub enum RegionIoError {
    #[error(transparent)]
    Region(#[from] RegionLookupError),
    #[error("KV region {region}: {what} failed: {source}")]
    Device {
        region: u64,
        what: &'static str,
        #[source]
        source: GpuError,
    },
}

/// Pinned bytes behind a zero-copy `Bytes`.
struct Staged {
    buf: Arc<StagingBuffer>,
    range: Range<usize>,
}

impl AsRef<[u8]> for Staged {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_slice()[self.range.clone()]
    }
}

/// Blocks of one region: `pages_per_block` page ids per block, one block
/// after the other (checked against the region's geometry by the service).
#[derive(Debug, Clone, Copy)]
pub struct RegionPages<'a> {
    pub region: &'a KvRegion,
    pub pages_per_block: u32,
    pub page_ids: &'a [u32],
}

impl RegionPages<'_> {
    fn ppb(&self) -> usize {
        self.pages_per_block.max(1) as usize
    }

    fn device_error(&self, what: &'static str) -> impl FnOnce(GpuError) -> RegionIoError {
        let region = self.region.id();
        move |source| RegionIoError::Device {
            region,
            what,
            source,
        }
    }

    /// One gather launch from the pages into `blocks`, waited for.
    ///
    /// # Safety
    /// Every `blocks[i]` must address `block_bytes(pages_per_block)` bytes
    /// that this call alone writes and that the region's device can reach,
    /// valid until this returns.
    unsafe fn gather_into(&self, blocks: &[u64]) -> Result<(), RegionIoError> {
        let region = self.region;
        let base = region.base()?;
        let stream = region.stream();
        // SAFETY: `base` is the region's mapped memory, kept alive by the
        // caller's `&KvRegion` (an `Arc` held for the request) for the whole
        // call; the page ids were checked against its geometry by the
        // service; `blocks` as the caller promised, and the fence is waited
        // for before this returns.
        unsafe {
            stream
                .gather(
                    region.geometry(),
                    self.pages_per_block,
                    base,
                    self.page_ids,
                    blocks,
                )
                .map_err(self.device_error("gather"))?;
        }
        stream
            .record()
            .and_then(|f| f.wait())
            .map_err(self.device_error("gather"))?;
        region.count_gathered(blocks.len() as u64 * self.block_bytes());
        Ok(())
    }

    /// One scatter launch from `blocks` into the pages, waited for.
    ///
    /// # Safety
    /// Every `blocks[i]` must address `block_bytes(pages_per_block)` bytes
    /// that the region's device can reach and nobody writes, valid until
    /// this returns.
    unsafe fn scatter_from(&self, blocks: &[u64]) -> Result<(), RegionIoError> {
        let region = self.region;
        let base = region.base()?;
        let stream = region.stream();
        // SAFETY: as in `gather_into`, with the region written and `blocks`
        // read.
        unsafe {
            stream
                .scatter(
                    region.geometry(),
                    self.pages_per_block,
                    base,
                    self.page_ids,
                    blocks,
                )
                .map_err(self.device_error("scatter"))?;
        }
        stream
            .record()
            .and_then(|f| f.wait())
            .map_err(self.device_error("scatter"))?;
        region.count_scattered(blocks.len() as u64 * self.block_bytes());
        Ok(())
    }

    fn block_bytes(&self) -> u64 {
        self.region.geometry().block_bytes(self.pages_per_block)
    }
}

/// The device of `cache` (an index into `cache.gpus()`) that can exchange
/// addresses with `region`: the same backend and the same device ordinal.
/// `None`: the region's blocks are staged ([`gather`], [`scatter`]).
pub fn direct_device(cache: &BlockCache, region: &KvRegion) -> Option<usize> {
    let want = region.gpu().info();
    cache.gpus().iter().position(|g| {
        let info = g.info();
        info.backend == want.backend && info.ordinal == want.ordinal
    })
}

/// What [`put_direct`] did.
#[derive(Debug)]
pub struct DirectPut {
    /// One per item, in order.
    pub outcomes: Vec<PutOutcome>,
    /// Bytes gathered (0 when no slot could be reserved and nothing ran).
    pub gathered: u64,
}

/// Gathers the blocks of `pages` straight into slots of device `device`
/// (see [`direct_device`]) and publishes them under `items` (key and parent
/// of each block, in page-list order): [`BlockCache::put_from_device`] with
/// one gather launch as its fill. A failed gather stores nothing.
pub fn put_direct(
    cache: &BlockCache,
    ns: &NamespaceId,
    device: usize,
    pages: RegionPages<'_>,
    items: &[(BlockKey, Option<BlockKey>)],
) -> Result<DirectPut, DevicePutError<RegionIoError>> {
    let mut gathered = 0u64;
    let began = Instant::now();
    let mut gather_time = Duration::ZERO;
    let outcomes = cache.put_from_device(ns, device, items, |slots: &[u64]| {
        let reserved = began.elapsed();
        // SAFETY: `put_from_device` reserved each slot, of the namespace's
        // block bytes (= `block_bytes(pages_per_block)`, checked by the
        // service), for this put alone, on device `device`, which reaches the
        // same address space as the region's stream (`direct_device`); the
        // slots stay reserved until `fill` returns, after the fence.
        unsafe { pages.gather_into(slots) }?;
        gather_time = began.elapsed() - reserved;
        gathered = slots.len() as u64 * pages.block_bytes();
        Ok(())
    })?;
    tracing::debug!(
        region_id = pages.region.id(),
        blocks = items.len(),
        bytes = gathered,
        gather_us = gather_time.as_micros() as u64,
        total_us = began.elapsed().as_micros() as u64,
        "KV region: direct put (total: reserving slots, the gather, hashing and publishing)"
    );
    Ok(DirectPut { outcomes, gathered })
}

/// What [`get_direct`] found and did.
#[derive(Debug)]
pub struct DirectGet {
    /// Per key: the tier it was served from, or `None` for a miss (whose
    /// pages are left untouched).
    pub found: Vec<Option<TierKind>>,
    /// The scatter of the found blocks: the bytes moved, or why it failed
    /// (then the found keys' pages may be partly written).
    pub scatter: Result<u64, RegionIoError>,
}

/// Scatters the blocks of `keys` found in the cache straight from the
/// addresses [`BlockCache::get_to_device`] lends on device `device` into
/// their pages (`pages`: one block's page ids per key, in key order), in one
/// launch waited for before the addresses are given back.
pub fn get_direct(
    cache: &BlockCache,
    ns: &NamespaceId,
    device: usize,
    pages: RegionPages<'_>,
    keys: &[BlockKey],
) -> Result<DirectGet, CacheError> {
    let ppb = pages.ppb();
    let began = Instant::now();
    cache.get_to_device(ns, device, keys, |blocks| {
        let looked_up = began.elapsed();
        let found: Vec<Option<TierKind>> = blocks.iter().map(|b| b.map(|(_, t)| t)).collect();
        let mut page_ids: Vec<u32> = Vec::new();
        let mut addrs: Vec<u64> = Vec::new();
        for (ids, b) in pages.page_ids.chunks_exact(ppb).zip(blocks) {
            if let Some((addr, _)) = b {
                page_ids.extend_from_slice(ids);
                addrs.push(*addr);
            }
        }
        let scatter = if addrs.is_empty() {
            Ok(0)
        } else {
            let hits = RegionPages {
                page_ids: &page_ids,
                ..pages
            };
            // SAFETY: `get_to_device` lends each address, `block_bytes` of
            // the namespace (= the region's block bytes, checked by the
            // service), reachable from device `device` and never written
            // while lent, until this closure returns, after the fence.
            unsafe { hits.scatter_from(&addrs) }.map(|()| addrs.len() as u64 * pages.block_bytes())
        };
        tracing::debug!(
            region_id = pages.region.id(),
            blocks = keys.len(),
            found = addrs.len(),
            lookup_us = looked_up.as_micros() as u64,
            scatter_us = (began.elapsed() - looked_up).as_micros() as u64,
            "KV region: direct get"
        );
        DirectGet { found, scatter }
    })
}

/// Gathers blocks of `pages_per_block` pages each (`page_ids` holds them one
/// block after the other) into layer-major blocks of `block_bytes`, staged in
/// pinned memory (the staged path).
pub fn gather(
    region: &KvRegion,
    pages_per_block: u32,
    page_ids: &[u32],
    block_bytes: u64,
) -> Result<Vec<Bytes>, RegionIoError> {
    let pages = RegionPages {
        region,
        pages_per_block,
        page_ids,
    };
    let n = page_ids.len() / pages.ppb();
    if n == 0 {
        return Ok(Vec::new());
    }
    let bb = block_bytes as usize;
    let staging = region
        .gpu()
        .staging(n * bb)
        .map_err(pages.device_error("allocating pinned staging memory"))?;
    let blocks: Vec<u64> = (0..n)
        .map(|i| staging.device_ptr() + (i * bb) as u64)
        .collect();
    // SAFETY: the staging buffer is ours alone, from the region's own
    // device, `bb` bytes per block, and outlives the call.
    if let Err(e) = unsafe { pages.gather_into(&blocks) } {
        // Nothing may still write the buffer when it goes back to the cache.
        let _ = region.stream().synchronize();
        return Err(e);
    }
    let buf = Arc::new(staging);
    Ok((0..n)
        .map(|i| {
            Bytes::from_owner(Staged {
                buf: Arc::clone(&buf),
                range: i * bb..(i + 1) * bb,
            })
        })
        .collect())
}

/// Scatters `blocks` (each `block_bytes`) into the pages named by `page_ids`
/// (`pages_per_block` per block, one block after the other), staged in
/// pinned memory (the staged path).
pub fn scatter(
    region: &KvRegion,
    pages_per_block: u32,
    page_ids: &[u32],
    blocks: &[Bytes],
    block_bytes: u64,
) -> Result<(), RegionIoError> {
    let pages = RegionPages {
        region,
        pages_per_block,
        page_ids,
    };
    let n = blocks.len();
    if n == 0 {
        return Ok(());
    }
    let bb = block_bytes as usize;
    let mut staging = region
        .gpu()
        .staging(n * bb)
        .map_err(pages.device_error("allocating pinned staging memory"))?;
    for (i, b) in blocks.iter().enumerate() {
        let m = bb.min(b.len());
        staging.as_mut_slice()[i * bb..i * bb + m].copy_from_slice(&b[..m]);
    }
    let addrs: Vec<u64> = (0..n)
        .map(|i| staging.device_ptr() + (i * bb) as u64)
        .collect();
    // SAFETY: the staging buffer is ours alone, from the region's own
    // device, `bb` bytes per block, and lives until after the call.
    let scattered = unsafe { pages.scatter_from(&addrs) };
    if scattered.is_err() {
        // Nothing may still read the buffer when it goes back to the cache.
        let _ = region.stream().synchronize();
    }
    drop(staging);
    scattered
}

#[cfg(test)]
mod tests {
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
}
