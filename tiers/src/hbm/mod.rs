//! `HbmTier` (T0): blocks in GPU memory, one tier per device, in front of the
//! host tier.
//!
//! # Memory
//!
//! One [`Gpu::alloc_device`] allocation per device (plain `cuMemAlloc` on
//! CUDA, so CUDA IPC works on it), carved by a [`SlabArena`] exactly as the
//! host arena is: the capacity is a hard limit, size classes share it in slabs.
//! The block index is the host tier's `SlotIndex` (prefix-aware LRU from
//! `eviction.rs`, pins, readers), so pinned blocks and blocks being read are
//! never evicted.
//!
//! # Streams
//!
//! Four streams per device: *promotion* (host→device: [`crate::Tier::put`] and
//! [`HbmTier::copy_in`]), *demotion* (device→host copies of victims),
//! *hash* (the device's checks of the victims' bytes) and *read*
//! (device→host copies of [`crate::Tier::get`] and checksum read-backs).
//! Every copy is followed by a [`kvstrata_kernels::Fence`]; no slot is written, freed or
//! reused while a copy that touches it is queued.
//!
//! # Demotion T0→T1
//!
//! When a size class has no free slot, victims are chosen by the shared
//! policy and *drained*: each gets a host-tier slot ([`HostTier::reserve`])
//! and a device→host copy on the demotion stream, and waits in the
//! `draining` list. Drains move in groups of `move_group_bytes` (64 MiB by
//! default): one copy launch (kernel or batched DMA, neighbours merged into
//! one run) and one fence per group. [`HbmTier::demote_many`] (the cache's
//! `evict`) takes its blocks in HBM order, keeps a few groups queued and
//! reaps each as it completes, so publishing one group overlaps the copies
//! of the next. A draining block stays in the index and readable (readers
//! find it in T0 until it is published in T1), is no eviction candidate, and
//! keeps its slot until its fence has completed. Reservation first *reaps*
//! completed drains (oldest first), and waits on the oldest fence when that
//! is the only way to get room; it chooses new victims only when nothing is
//! draining, so it never evicts more than it needs.
//!
//! Each group's sources are checked on the device while they copy: a
//! `kvs_xxh3` launch on the *hash* stream hashes every source slot in HBM
//! (at HBM speed, beside the PCIe-bound copy) into a pinned buffer, and the
//! group's fence waits for it. The host's memory bandwidth goes to the copy
//! alone; hashing the host copies on the CPU instead ran at 50-60 GB/s with
//! the copies landing in the same memory, slower than PCIe
//! (docs/benchmarks.md). A copy that completes without a device error is
//! exact (the fence reports any error, and the group is then dropped), so a
//! host copy of a source that hashes to the recorded checksum is the block.
//! Where the device cannot hash (the launch fails), the host copies are
//! hashed on the CPU (rayon), as before.
//!
//! Reaping drains, under this tier's lock: for each completed drain, if the
//! block is still the live one and unpinned, its host slot is published if
//! its hash equals the checksum recorded at put (a block whose bytes hash
//! otherwise, or whose copy failed, is dropped and counted, never served),
//! then the block leaves T0. A block deleted or replaced meanwhile
//! is not published (its host slot is freed), so a demotion never lands
//! after, and overwrites, a newer put: the cache removes T0 copies of a key
//! before it writes the host tier, and that removal takes this same lock. A
//! block pinned while draining stays in T0. A block the host tier already
//! holds with the same checksum (a promoted copy; the tiers are inclusive)
//! leaves T0 without a copy; one the host tier cannot take (everything there
//! pinned) is dropped and counted.
//!
//! # Promotion T1→T0
//!
//! [`HbmTier::copy_in`] copies host-resident blocks into new slots on the
//! promotion stream, a group per launch and fence with a few groups queued,
//! and hands each completed group back unpublished; the cache publishes
//! each block with the host tier's recorded checksum unless a put or delete
//! of its stripe ran meanwhile (`promote_on_device_get`, see
//! [`crate::cache`]).
//!
//! # Device-side access
//!
//! For the CUDA-IPC data path the cache reserves slots ([`HbmTier::reserve`]),
//! lets the caller fill them with a kernel, reads them back for their
//! checksums ([`HbmTier::read_back`]) and publishes them
//! ([`HbmTier::publish`]); reads take a reader count on a block
//! ([`HbmTier::acquire`]) and hand out its device address.
//!
//! # Files
//!
//! - `demote.rs`: demotion under pressure and by `evict`
//!   ([`HbmTier::demote_many`]), and reservation.
//! - `drain.rs`: one drain's life: launched in a group, reaped, published.
//! - `promote.rs`: copies in ([`crate::Tier::put`], [`HbmTier::copy_in`]).
//! - `readback.rs`: device-side reads for checksums
//!   ([`HbmTier::read_back`], [`HbmTier::hash_on_device`]).
//! - `tier_impl.rs`: the [`crate::Tier`] trait.

mod demote;
mod drain;
mod promote;
mod readback;
mod tier_impl;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvstrata_kernels::{DEFAULT_DMA_THRESHOLD, DeviceBuffer, Gpu, GpuError, GpuStream};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::arena::{SlabArena, SlotRef};
use crate::events::{EventBus, EventKind, PendingEvent};
use crate::host::{HostTier, SlotIndex};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{PutOutcome, TierCounters, TierKind};

use drain::Drain;

/// Default of [`HbmTierConfig::move_group_bytes`]: large enough that the
/// work per group (a fence, a launch, publishing) vanishes beside its copy
/// (64 MiB take about 1.2 ms over PCIe Gen5). Measured on an H200
/// (docs/benchmarks.md): promotion reached 0.84 of the pinned-copy ceiling
/// with 16 MiB groups and 0.94 with 64 MiB; demotion 0.94 with either.
pub const DEFAULT_MOVE_GROUP_BYTES: u64 = 64 << 20;

/// Groups a batched move keeps queued on its stream at once: the copies of
/// the others run while the CPU finishes (hashes, publishes) one.
const MOVE_WINDOW: usize = 4;

/// Configuration of the HBM tier (the same for every device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbmTierConfig {
    /// Hard limit on the bytes of block payloads held per device. Default 1 GiB.
    pub capacity_bytes: u64,
    /// The largest block the tier accepts (and the largest slab of the
    /// arena). Default 64 MiB; a smaller capacity makes it the capacity.
    pub segment_bytes: u64,
    /// Whether [`crate::BlockCache::get_to_device`] copies the blocks it
    /// served from the host tier into this device's HBM tier afterwards.
    /// Default true.
    pub promote_on_device_get: bool,
    /// Bytes of device slots read back per batch through a pinned staging
    /// buffer (at least one block), to compute their checksums when they
    /// cannot be hashed on the device. Default 16 MiB.
    pub staging_bytes: u64,
    /// Blocks of at least this many bytes move between T0 and T1 with DMA
    /// (`cuMemcpyAsync`), smaller ones with the batched-copy kernel. Default
    /// [`DEFAULT_DMA_THRESHOLD`] (measured: docs/benchmarks.md, "GPU tiers").
    pub dma_threshold: u64,
    /// Bytes of blocks moved between T0 and T1 per launch and fence
    /// (demotion, and [`HbmTier::copy_in`]); a group holds at least one
    /// block. Default [`DEFAULT_MOVE_GROUP_BYTES`].
    pub move_group_bytes: u64,
}

impl Default for HbmTierConfig {
    fn default() -> Self {
        HbmTierConfig {
            capacity_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            promote_on_device_get: true,
            staging_bytes: 16 << 20,
            dma_threshold: DEFAULT_DMA_THRESHOLD,
            move_group_bytes: DEFAULT_MOVE_GROUP_BYTES,
        }
    }
}

/// Counters and identity of one device's HBM tier (beside its [`crate::TierStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HbmStats {
    /// Position of the device in the cache's GPU list (the `device` argument
    /// of the device-side calls).
    pub device: usize,
    /// The device's ordinal for its driver.
    pub ordinal: usize,
    pub name: String,
    /// "cuda" or "cpu".
    pub backend: &'static str,
    /// Blocks copied out to the host tier under pressure or by `evict`.
    pub demoted: u64,
    /// Blocks that left without a copy because the host tier already held
    /// the same bytes.
    pub demote_skipped: u64,
    /// Blocks dropped on the way out: the host tier had no room, or a copy failed.
    pub demote_dropped: u64,
    /// Blocks copied in from the host tier.
    pub promoted: u64,
    /// Copies whose bytes did not hash to the recorded checksum (dropped, never served).
    pub checksum_failures: u64,
    /// Blocks whose copy out is in flight now.
    pub draining: u64,
    /// Bytes of pinned staging buffers the device keeps for reuse
    /// ([`Gpu::staging`]).
    pub staging_cached_bytes: u64,
    /// Requests that found every device staging set lent and waited for one.
    pub device_staging_waits: u64,
    /// Requests that moved host blocks without device staging (every set
    /// still lent after the wait, or no device memory for one).
    pub device_staging_bypasses: u64,
}

#[derive(Debug, Default)]
struct MoveCounters {
    demoted: AtomicU64,
    demote_skipped: AtomicU64,
    demote_dropped: AtomicU64,
    promoted: AtomicU64,
    checksum_failures: AtomicU64,
}

struct Meta {
    index: SlotIndex,
    /// In fence order (one demotion stream).
    draining: VecDeque<Drain>,
    /// Drains taken off `draining` (copy complete) and not yet finished:
    /// their slots are freed soon ([`Inner::reaped`] says when).
    reaping: usize,
}

struct Inner {
    gpu: Gpu,
    device: usize,
    memory: DeviceBuffer,
    meta: Mutex<Meta>,
    /// Signalled whenever drains taken off the queue are finished.
    reaped: Condvar,
    host: Option<HostTier>,
    promote_stream: GpuStream,
    demote_stream: GpuStream,
    /// Hashes the sources of each demotion group while the demotion stream
    /// copies them.
    hash_stream: GpuStream,
    read_stream: GpuStream,
    /// Whether a failed device hash has been logged (once).
    hash_fallback_logged: std::sync::atomic::AtomicBool,
    counters: TierCounters,
    moves: MoveCounters,
    events: Arc<EventBus>,
    config: HbmTierConfig,
}

/// One device's HBM tier. Cheap to clone (shared state).
#[derive(Clone)]
pub struct HbmTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HbmTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbmTier")
            .field("device", &self.inner.device)
            .field("capacity", &self.inner.config.capacity_bytes)
            .finish()
    }
}

fn gpu_failed(what: &str, e: &GpuError) {
    tracing::error!(error = %e, "hbm tier: {what} failed");
}

impl HbmTier {
    /// Allocates the arena on `gpu`. `device` is the tier's position in the
    /// cache's GPU list; `host` is where victims go (without one they are
    /// dropped).
    pub fn new(
        config: &HbmTierConfig,
        gpu: Gpu,
        device: usize,
        host: Option<HostTier>,
        events: Arc<EventBus>,
    ) -> Result<Self, GpuError> {
        let (arena, region_len) = SlabArena::new(config.capacity_bytes, config.segment_bytes);
        let memory = gpu.alloc_device(region_len)?;
        // Incarnations of device d start at (d + 1) << 48: the host tier's
        // start at 1, so no pin token matches a block of another tier.
        let first = ((device as u64) + 1) << 48;
        Ok(HbmTier {
            inner: Arc::new(Inner {
                promote_stream: gpu.stream()?,
                demote_stream: gpu.stream()?,
                hash_stream: gpu.stream()?,
                read_stream: gpu.stream()?,
                gpu,
                device,
                memory,
                meta: Mutex::new(Meta {
                    index: SlotIndex::new(arena, TierKind::Hbm, first),
                    draining: VecDeque::new(),
                    reaping: 0,
                }),
                reaped: Condvar::new(),
                host,
                hash_fallback_logged: std::sync::atomic::AtomicBool::new(false),
                counters: TierCounters::default(),
                moves: MoveCounters::default(),
                events,
                config: config.clone(),
            }),
        })
    }

    pub fn config(&self) -> &HbmTierConfig {
        &self.inner.config
    }

    /// Position of the device in the cache's GPU list.
    pub fn device(&self) -> usize {
        self.inner.device
    }

    pub fn gpu(&self) -> &Gpu {
        &self.inner.gpu
    }

    /// Bytes the tier can hold in one block.
    pub fn max_slot_bytes(&self) -> usize {
        self.inner.meta.lock().index.arena.max_slot_bytes()
    }

    /// Identity and movement counters.
    pub fn hbm_stats(&self) -> HbmStats {
        let inner = &self.inner;
        let info = inner.gpu.info();
        let m = &inner.moves;
        let staging = inner.gpu.device_staging_counts();
        HbmStats {
            device: inner.device,
            ordinal: info.ordinal,
            name: info.name.clone(),
            backend: info.backend.name(),
            demoted: m.demoted.load(Ordering::Relaxed),
            demote_skipped: m.demote_skipped.load(Ordering::Relaxed),
            demote_dropped: m.demote_dropped.load(Ordering::Relaxed),
            promoted: m.promoted.load(Ordering::Relaxed),
            checksum_failures: m.checksum_failures.load(Ordering::Relaxed),
            draining: inner.meta.lock().draining.len() as u64,
            staging_cached_bytes: inner.gpu.staging_cached_bytes() as u64,
            device_staging_waits: staging.waits,
            device_staging_bypasses: staging.bypasses,
        }
    }

    /// Reserves a slot of `len` bytes, demoting victims to the host tier if
    /// it must; `None` when nothing can go (everything pinned or being read).
    /// Fill it through [`HbmSlot::addr`] and publish it with
    /// [`HbmTier::publish`]; dropping it frees the slot.
    pub fn reserve(&self, len: usize) -> Option<HbmSlot> {
        let inner = &*self.inner;
        let mut events = Vec::new();
        let slot = {
            let mut meta = inner.meta.lock();
            let slot = inner.reserve(&mut meta, len, &mut events);
            slot.map(|s| (s, meta.index.arena.offset(s)))
        };
        inner.events.publish(events);
        match slot {
            Some((slot, offset)) => Some(HbmSlot {
                inner: Arc::clone(&self.inner),
                slot: Some(slot),
                addr: inner.memory.ptr() + offset as u64,
                len,
            }),
            None => {
                TierCounters::add(&inner.counters.rejected_puts, 1);
                None
            }
        }
    }

    /// Publishes a filled slot under the key with its payload's xxh3-64,
    /// replacing any block stored under it here. The copy into the slot must
    /// have completed.
    pub fn publish(
        &self,
        mut slot: HbmSlot,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        checksum: u64,
    ) -> PutOutcome {
        let inner = &*self.inner;
        let Some(reserved) = slot.slot.take() else {
            return PutOutcome::NoSpace;
        };
        inner
            .meta
            .lock()
            .index
            .publish(ns, key, parent, reserved, slot.len, checksum);
        TierCounters::add(&inner.counters.bytes_in, slot.len as u64);
        inner.events.publish([PendingEvent {
            kind: EventKind::Stored,
            namespace: *ns,
            key: *key,
            parent: parent.copied(),
            tier: TierKind::Hbm,
        }]);
        PutOutcome::Stored
    }

    /// Takes a reader count on a block: its slot keeps its bytes and is not
    /// reused until the returned guard drops. Counts as an access.
    pub fn acquire(&self, ns: &NamespaceId, key: &BlockKey) -> Option<HbmRead> {
        self.acquire_many(ns, std::slice::from_ref(key))
            .pop()
            .flatten()
    }

    /// [`HbmTier::acquire`] of many keys under one lock, one answer per key.
    pub fn acquire_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<Option<HbmRead>> {
        let inner = &self.inner;
        type Found = (usize, usize, usize, u64, Option<BlockKey>);
        // One clock reading for the batch (outside the lock).
        let now = Instant::now();
        let found: Vec<Option<Found>> = {
            let mut meta = inner.meta.lock();
            let index = &mut meta.index;
            keys.iter()
                .map(|key| {
                    let id = index.index.get(&(*ns, *key)).copied()?;
                    index.touch_at(id, now);
                    let e = index.entries.get_mut(id)?;
                    e.readers += 1;
                    let (slot, len, checksum, parent) = (e.slot, e.len, e.checksum, e.parent);
                    Some((id, index.arena.offset(slot), len, checksum, parent))
                })
                .collect()
        };
        let hits = found.iter().flatten().count() as u64;
        let bytes: usize = found.iter().flatten().map(|f| f.2).sum();
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.misses, found.len() as u64 - hits);
        TierCounters::add(&inner.counters.bytes_out, bytes as u64);
        found
            .into_iter()
            .map(|f| {
                f.map(|(id, offset, len, checksum, parent)| HbmRead {
                    inner: Arc::clone(inner),
                    id,
                    addr: inner.memory.ptr() + offset as u64,
                    len,
                    checksum,
                    parent,
                })
            })
            .collect()
    }

    /// Gives back reads of this tier under one lock (dropping each takes
    /// the lock once per block); reads of another tier are dropped as usual.
    pub fn release_many(&self, reads: Vec<HbmRead>) {
        let mut others = Vec::new();
        {
            let mut meta = self.inner.meta.lock();
            for mut r in reads {
                match Arc::ptr_eq(&r.inner, &self.inner) {
                    true => release_read(&mut r.id, &mut meta),
                    false => others.push(r),
                }
            }
        }
        drop(others);
    }

    /// Stops the tier, as the cache's ordered close does before the host
    /// tier's movement is drained: waits for every demotion copy in flight
    /// and finishes it (what completed is published in the host tier), then
    /// for every stream. The tier stays usable; dropping it afterwards has
    /// nothing left to wait for.
    pub fn close(&self) {
        let inner = &*self.inner;
        let mut events = Vec::new();
        {
            let mut meta = inner.meta.lock();
            loop {
                inner.reap(&mut meta, &mut events);
                if let Some(group) = meta.draining.front().map(|d| Arc::clone(&d.group)) {
                    // A failed copy reads as done; its group says so when reaped.
                    let _ = MutexGuard::unlocked(&mut meta, || group.fence.wait());
                    continue;
                }
                if meta.reaping == 0 {
                    break;
                }
                // Drains taken by a batched demotion are being finished.
                inner.reaped.wait_for(&mut meta, Duration::from_millis(10));
            }
        }
        inner.events.publish(events);
        inner.synchronize_streams("stream synchronize at close");
    }
}

/// An HBM slot reserved by a writer ([`HbmTier::reserve`]); freed on drop
/// unless published.
pub struct HbmSlot {
    inner: Arc<Inner>,
    slot: Option<SlotRef>,
    addr: u64,
    len: usize,
}

impl std::fmt::Debug for HbmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbmSlot")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .finish()
    }
}

impl HbmSlot {
    /// Device address of the slot.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HbmSlot {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.inner.meta.lock().index.arena.free(slot);
        }
    }
}

/// A reader count on an HBM block ([`HbmTier::acquire`]): its slot keeps
/// the block's exact bytes until this drops.
pub struct HbmRead {
    inner: Arc<Inner>,
    id: usize,
    addr: u64,
    len: usize,
    checksum: u64,
    parent: Option<BlockKey>,
}

impl std::fmt::Debug for HbmRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbmRead")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .finish()
    }
}

impl HbmRead {
    /// Device address of the block's bytes.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// xxh3-64 of the payload, recorded at put.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }
}

/// The `id` of an [`HbmRead`] already given back ([`HbmTier::release_many`]).
const RELEASED: usize = usize::MAX;

/// Gives back the reader count of the read of entry `*id` (`meta` is its
/// tier's, locked) and marks it given back.
fn release_read(id: &mut usize, meta: &mut Meta) {
    if *id == RELEASED {
        return;
    }
    if let Some(e) = meta.index.entries.get_mut(*id) {
        e.readers -= 1;
    }
    meta.index.release_if_unused(*id);
    *id = RELEASED;
}

impl Drop for HbmRead {
    fn drop(&mut self) {
        if self.id != RELEASED {
            release_read(&mut self.id, &mut self.inner.meta.lock());
        }
    }
}

impl Inner {
    /// Waits for every stream: no copy may still touch the device memory or
    /// a host slot when they are freed.
    fn synchronize_streams(&self, what: &str) {
        for s in [
            &self.promote_stream,
            &self.demote_stream,
            &self.hash_stream,
            &self.read_stream,
        ] {
            if let Err(e) = s.synchronize() {
                gpu_failed(what, &e);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.synchronize_streams("stream synchronize at shutdown");
    }
}

#[cfg(test)]
mod tests;
