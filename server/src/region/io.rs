//! The KV-region data path: every gather and scatter between a registered
//! region ([`crate::region::KvRegion`]) and the cache goes through this module.
//!
//! Two ways, chosen per region by [`direct_device`]:
//!
//! - **Direct**, for a region whose memory the cache's own devices can reach:
//!   a CUDA IPC region opened on a device the cache was given
//!   (`BlockCache::with_gpus`; matched by backend and CUDA ordinal), or, on
//!   the CPU backend, a memfd region when the cache runs on the CPU backend
//!   itself (`gpu.enabled = "cpu"`: tests): [`put_direct`], [`get_direct`].
//!   Blocks of device `device`'s HBM tier are gathered straight into the
//!   slots [`BlockCache::put_from_device_staged`] reserves and scattered
//!   straight from the slots [`BlockCache::get_to_device_staged`] lends, one
//!   launch each. Blocks in host memory (pinned host-tier slots, blocks
//!   staged from the disk or remote tier) pass through the device's staging
//!   buffers a group at a time: DMA in and a device-to-device scatter, or a
//!   device-to-device gather, a hash on the device and DMA out, the next
//!   group's copy overlapping this group's kernel. (A kernel reading or
//!   writing pinned host memory over PCIe directly, the path taken when no
//!   staging set is free, reaches only about 0.6 of the DMA engines' speed
//!   for reads.) The launches are queued on the region's stream; the cache
//!   waits for them before it publishes or gives the addresses back.
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
use kvstrata_kernels::{CopyOp, GpuError, PageLayout, StagingBuffer};
use kvstrata_tiers::{
    BlockCache, BlockKey, CacheError, DevicePutError, NamespaceId, PutOutcome, TierKind,
};

use crate::region::{KvRegion, RegionLookupError};
use crate::thread_time::CpuMark;

/// How the direct path copies blocks whose pages are one run each
/// ([`RegionPages::block_copies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionCopy {
    /// The gather/scatter kernel (on the SMs), for every region. Default.
    Kernel,
    /// DMA (a copy engine) for regions whose blocks are one run each; the
    /// kernel for the others. `KVSTRATA_REGION_COPY=dma`.
    Dma,
}

/// The process's [`RegionCopy`], from `KVSTRATA_REGION_COPY` (`dma` or
/// `kernel`), read once.
pub fn region_copy() -> RegionCopy {
    static CHOICE: std::sync::OnceLock<RegionCopy> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("KVSTRATA_REGION_COPY").as_deref() {
        Ok("dma") => RegionCopy::Dma,
        _ => RegionCopy::Kernel,
    })
}

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
    /// A copy of the cache's own (through device staging) failed; named
    /// after the region ([`RegionIoError::Device`]) before it leaves this
    /// module.
    #[error("copy through device staging failed: {0}")]
    Staging(#[from] GpuError),
}

impl RegionIoError {
    /// `Staging` as a `Device` error of `region`.
    fn of_region(self, region: u64) -> Self {
        match self {
            RegionIoError::Staging(source) => RegionIoError::Device {
                region,
                what: "copy through device staging",
                source,
            },
            e => e,
        }
    }
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

    /// Checks the geometry, every page id (`blocks` blocks' worth) and the
    /// region's memory before anything is copied, so that a bad page list
    /// fails before the first group rather than after it (`what`: the
    /// operation named in the error).
    fn check(&self, what: &'static str, blocks: usize) -> Result<(), RegionIoError> {
        let g = self.region.geometry();
        let n = g
            .validate()
            .and_then(|()| g.check_pages("page_ids", self.pages_per_block, self.page_ids))
            .map_err(|e| self.device_error(what)(GpuError::Geometry(e)))?;
        if n != blocks {
            return Err(self.device_error(what)(GpuError::Geometry(
                kvstrata_kernels::GeometryError::new(
                    "page_ids",
                    format!("pages of {n} blocks for {blocks} blocks"),
                ),
            )));
        }
        self.region.base()?;
        Ok(())
    }

    /// With [`RegionCopy::Dma`] and a region whose every block is one run of
    /// its memory (one page per block, the page laid out as a layer-major
    /// block: `[page][layer][K|V][token][head][dim]`, the GPU engine's
    /// pool), the block copies of a gather (`gather`: pages to `blocks`) or
    /// a scatter, for the DMA engines; `None`: the gather/scatter kernel.
    fn block_copies(
        &self,
        base: u64,
        positions: &[usize],
        blocks: &[u64],
        gather: bool,
    ) -> Option<Vec<CopyOp>> {
        let g = self.region.geometry();
        let chunk = g.chunk_bytes();
        let one_run = self.pages_per_block == 1
            && g.layout == PageLayout::CrossLayer
            && g.effective_layer_stride() == 2 * chunk
            && g.effective_kv_stride() == chunk;
        if !one_run || region_copy() != RegionCopy::Dma {
            return None;
        }
        let len = g.block_bytes(1);
        Some(
            positions
                .iter()
                .zip(blocks)
                .map(|(&i, &block)| {
                    let page = base + self.page_ids[i] as u64 * g.page_stride();
                    let (src, dst) = if gather { (page, block) } else { (block, page) };
                    CopyOp { src, dst, len }
                })
                .collect(),
        )
    }

    /// The page ids of the blocks at `positions` (in this list's blocks).
    fn pages_of(&self, positions: &[usize]) -> Vec<u32> {
        let ppb = self.ppb();
        positions
            .iter()
            .flat_map(|&i| &self.page_ids[i * ppb..(i + 1) * ppb])
            .copied()
            .collect()
    }

    /// Queues (does not wait for) one gather (`gather`: the pages of the
    /// blocks at `positions` into `blocks`) or scatter (`blocks` into those
    /// pages) on the region's stream: whole-block DMA copies where
    /// [`RegionPages::block_copies`] gives them, else one kernel launch.
    ///
    /// # Safety
    /// Every `blocks[i]` must address `block_bytes(pages_per_block)` bytes
    /// that the region's device can reach, valid until a fence recorded
    /// after this on the region's stream has completed: written by this
    /// gather alone, or, for a scatter, written by nobody until then (the
    /// region's pages are written). `positions` must be blocks of this list.
    unsafe fn queue_copy(
        &self,
        positions: &[usize],
        blocks: &[u64],
        gather: bool,
    ) -> Result<(), RegionIoError> {
        let what = if gather { "gather" } else { "scatter" };
        let region = self.region;
        let base = region.base()?;
        let stream = region.stream();
        let queued = match self.block_copies(base, positions, blocks, gather) {
            // SAFETY: each op is one block's run of the region's pages
            // (`block_copies`) and one of `blocks`, under the same promises
            // as the kernel's below.
            Some(ops) => unsafe { stream.copy_blocks(&ops, 0) },
            // SAFETY: `base` is the region's mapped memory, alive while the
            // caller holds `&KvRegion`, who waits for the fence before
            // letting go; the page ids come from this list (checked against
            // the geometry by the service and `check`); `blocks` as promised.
            None => unsafe {
                let pages = self.pages_of(positions);
                let (g, ppb) = (region.geometry(), self.pages_per_block);
                if gather {
                    stream.gather(g, ppb, base, &pages, blocks)
                } else {
                    stream.scatter(g, ppb, base, &pages, blocks)
                }
            },
        };
        queued.map_err(self.device_error(what))
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

/// Gathers the blocks of `pages` into slots of device `device` (see
/// [`direct_device`]) and publishes them under `items` (key and parent of
/// each block, in page-list order): [`BlockCache::put_from_device_staged`]
/// with gather launches on the region's stream as its fill — straight into
/// HBM slots, and through device staging buffers (then DMA) into pinned host
/// slots. The page list is checked before the first launch; a failed gather
/// (or copy) stores nothing.
pub fn put_direct(
    cache: &BlockCache,
    ns: &NamespaceId,
    device: usize,
    pages: RegionPages<'_>,
    items: &[(BlockKey, Option<BlockKey>)],
) -> Result<DirectPut, DevicePutError<RegionIoError>> {
    let began = Instant::now();
    let mut launches = 0usize;
    // When the first and the last gather were queued.
    let (mut first, mut last) = (Duration::ZERO, Duration::ZERO);
    let stream = pages.region.stream();
    let outcomes = cache
        .put_from_device_staged(ns, device, items, stream, |at: &[usize], slots: &[u64]| {
            if launches == 0 {
                first = began.elapsed();
                pages.check("gather", items.len())?;
            }
            launches += 1;
            last = began.elapsed();
            // SAFETY: `put_from_device_staged` hands out each address, of the
            // namespace's block bytes (= `block_bytes(pages_per_block)`,
            // checked by the service), for this put alone — a reserved slot
            // or a staging buffer of device `device`, which reaches the same
            // address space as the region's stream (`direct_device`) — and
            // waits for the region's stream before it lets go of them.
            unsafe { pages.queue_copy(at, slots, true) }
        })
        .map_err(|e| match e {
            DevicePutError::Fill(e) => DevicePutError::Fill(e.of_region(pages.region.id())),
            e => e,
        })?;
    let gathered = match launches {
        0 => 0,
        _ => items.len() as u64 * pages.block_bytes(),
    };
    pages.region.count_gathered(gathered);
    tracing::debug!(
        region_id = pages.region.id(),
        blocks = items.len(),
        bytes = gathered,
        launches,
        reserve_us = first.as_micros() as u64,
        queue_us = (last - first).as_micros() as u64,
        total_us = began.elapsed().as_micros() as u64,
        "KV region: direct put (reserve: slots reserved; queue: gathers queued, group by group; \
         total: with the copies' completion, hashing and publishing)"
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
    /// Whether `tell` was called (the client may have been answered before
    /// the copies completed).
    pub told: bool,
}

/// Told by [`get_direct`] once every copy into the pages is queued, before
/// they complete: per key the tier it was found in, and the CUDA IPC handle
/// of the region's event recorded after those copies (`None`: nothing to
/// wait for; see [`KvRegion::record_ready`]).
pub type TellQueued<'a> = &'a mut dyn FnMut(&[Option<TierKind>], Option<[u8; 64]>);

/// Scatters the blocks of `keys` found in the cache into their pages
/// (`pages`: one block's page ids per key, in key order) on the region's
/// stream: [`BlockCache::get_to_device_staged`] — blocks in device
/// `device`'s HBM tier straight from their slots, blocks in host memory
/// copied with DMA into device staging buffers first, a group at a time.
/// The page list is checked before the first launch (a bad one writes no
/// page); everything has completed before the addresses are given back.
///
/// With `tell`, once everything is queued the region's event is recorded
/// after it ([`KvRegion::record_ready`]) and `tell` gets what was found and
/// the event's handle, so the caller can answer before the copies complete;
/// if the event cannot be recorded, `tell` is not called.
pub fn get_direct(
    cache: &BlockCache,
    ns: &NamespaceId,
    device: usize,
    pages: RegionPages<'_>,
    keys: &[BlockKey],
    tell: Option<TellQueued<'_>>,
) -> Result<DirectGet, CacheError> {
    let (began, cpu) = (
        Instant::now(),
        CpuMark::now_if(tracing::enabled!(tracing::Level::DEBUG)),
    );
    let mut launches = 0usize;
    // When the first and the last scatter were queued, and the caller told.
    let (mut first, mut last, mut told) = (Duration::ZERO, Duration::ZERO, None);
    // The thread's CPU time until the first scatter was queued.
    let mut lookup_cpu = 0;
    let stream = pages.region.stream();
    let region = pages.region;
    let (found, scattered) = cache.get_to_device_staged(
        ns,
        device,
        keys,
        stream,
        |at: &[usize], from: &[u64]| {
            if launches == 0 {
                first = began.elapsed();
                lookup_cpu = cpu.us();
                pages.check("scatter", keys.len())?;
            }
            launches += 1;
            last = began.elapsed();
            // SAFETY: `get_to_device_staged` lends each address, `block_bytes`
            // of the namespace (= the region's block bytes, checked by the
            // service), reachable from device `device` and never written
            // while lent — an HBM slot or a staging buffer its DMA filled
            // before this launch runs — and waits for the region's stream
            // before it lets go of them.
            unsafe { pages.queue_copy(at, from, false) }
        },
        |found: &[Option<TierKind>]| {
            let Some(tell) = tell else { return };
            match region.record_ready() {
                Ok(event) => {
                    tell(found, event);
                    told = Some(began.elapsed());
                }
                Err(e) => tracing::debug!(
                    region_id = region.id(),
                    error = %e,
                    "KV region: answering after the copies (no event to wait on)"
                ),
            }
        },
    )?;
    let scatter = scattered
        .map(|n| n as u64 * pages.block_bytes())
        .map_err(|e| e.of_region(pages.region.id()));
    if let Ok(bytes) = scatter {
        pages.region.count_scattered(bytes);
    }
    tracing::debug!(
        region_id = pages.region.id(),
        blocks = keys.len(),
        found = found.iter().flatten().count(),
        launches,
        lookup_us = first.as_micros() as u64,
        lookup_cpu_us = lookup_cpu,
        queue_us = (last - first).as_micros() as u64,
        told_us = told.map(|t| t.as_micros() as u64),
        total_us = began.elapsed().as_micros() as u64,
        "KV region: direct get (lookup: until the first scatter is queued; queue: copies and \
         scatters queued, group by group; told: the caller told, to answer before the copies \
         complete; total: with their completion; lookup_cpu: the thread's CPU time of the lookup \
         part, below lookup_us when it waited)"
    );
    Ok(DirectGet {
        found,
        scatter,
        told: told.is_some(),
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
mod tests;
