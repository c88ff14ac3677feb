//! `HbmTier` (T0): blocks in GPU memory, one tier per device, in front of the
//! host tier.
//!
//! # Memory
//!
//! One [`Gpu::alloc_device`] allocation per device (plain `cuMemAlloc` on
//! CUDA, so CUDA IPC works on it), carved by a [`SlotArena`] exactly as the
//! host arena is: the capacity is a hard limit, size classes share segments.
//! The block index is the host tier's [`SlotIndex`] (prefix-aware LRU from
//! `eviction.rs`, pins, readers), so pinned blocks and blocks being read are
//! never evicted.
//!
//! # Streams
//!
//! Four streams per device: *promotion* (host→device: [`Tier::put`] and
//! [`HbmTier::copy_in`]), *demotion* (device→host copies of victims),
//! *hash* (the device's checks of the victims' bytes) and *read*
//! (device→host copies of [`Tier::get`] and checksum read-backs).
//! Every copy is followed by a [`Fence`]; no slot is written, freed or
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

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use kvstrata_kernels::{
    CopyOp, DEFAULT_DMA_THRESHOLD, DeviceBuffer, Fence, Gpu, GpuError, GpuStream, HashRun,
    StagingBuffer,
};
use parking_lot::{Condvar, Mutex, MutexGuard};
use rayon::prelude::*;

use crate::arena::{SlotArena, SlotRef};
use crate::disk::checksum::xxh3_64;
use crate::events::{EventBus, EventKind, PendingEvent};
use crate::eviction::choose_victims;
use crate::host::{ChecksumMismatch, HostSlot, HostTier, SlotIndex};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierCounters, TierKind,
    TierStats,
};

/// Default of [`HbmTierConfig::move_group_bytes`]: large enough that the
/// work per group (a fence, a launch, publishing) vanishes beside its copy
/// (64 MiB take about 1.2 ms over PCIe Gen5). Measured on an H200
/// (docs/benchmarks.md): promotion reached 0.84 of the pinned-copy ceiling
/// with 16 MiB groups and 0.94 with 64 MiB; demotion 0.94 with either.
pub const DEFAULT_MOVE_GROUP_BYTES: u64 = 64 << 20;

/// Groups a batched move keeps queued on its stream at once: the copies of
/// the others run while the CPU finishes (hashes, publishes) one.
const MOVE_WINDOW: usize = 4;

/// What each completed drain's bytes hash to, to compare with the checksum
/// recorded at put: the device's hash of its source ([`DrainGroup`]), or,
/// for a group the device could not hash, xxh3-64 of its host copy, in
/// parallel on rayon's pool. `None` for a drain whose copy failed.
fn checked_hashes(drains: &[Drain]) -> Vec<Option<u64>> {
    let on_host = |d: &Drain| match d.group.device_hash(d.member) {
        Some(h) => Some(h),
        None => Some(xxh3_64(d.host.as_slice())),
    };
    let hash = |d: &Drain| if d.group.copied() { on_host(d) } else { None };
    if drains.iter().filter(|d| d.group.hashes.is_none()).count() > 1 {
        drains.par_iter().map(hash).collect()
    } else {
        drains.iter().map(hash).collect()
    }
}

/// Whether some completed drain needs its host copy hashed on the CPU.
fn needs_host_hashing(drains: &[Drain]) -> bool {
    drains.iter().any(|d| d.group.hashes.is_none())
}

/// How many of `ids` (from the front) make one move group of about
/// `group_bytes` (at least one), and their bytes. A group of at least
/// `lanes` blocks holds a multiple of `lanes` (the CPU's hashing threads),
/// so where the host copies are hashed on the CPU (the device cannot hash)
/// every thread stays busy to the end (a block is one task).
fn one_group(index: &SlotIndex, ids: &[usize], group_bytes: usize, lanes: usize) -> (usize, usize) {
    let len_of = |id: usize| index.entries.get(id).map_or(0, |e| e.len);
    let first = ids.first().map_or(1, |&id| len_of(id).max(1));
    let mut n = (group_bytes / first).max(1);
    if lanes > 1 && n >= lanes {
        n -= n % lanes;
    }
    let n = n.min(ids.len());
    (n, ids[..n].iter().map(|&id| len_of(id)).sum())
}

/// Configuration of the HBM tier (the same for every device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbmTierConfig {
    /// Hard limit on the bytes of block payloads held per device. Default 1 GiB.
    pub capacity_bytes: u64,
    /// Size of the arena's segments (each holds slots of one block size; the
    /// largest block the tier accepts). Default 64 MiB; a smaller capacity
    /// makes one segment of the whole capacity.
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

/// Counters and identity of one device's HBM tier (beside its [`TierStats`]).
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
}

#[derive(Debug, Default)]
struct MoveCounters {
    demoted: AtomicU64,
    demote_skipped: AtomicU64,
    demote_dropped: AtomicU64,
    promoted: AtomicU64,
    checksum_failures: AtomicU64,
}

/// A victim whose bytes are being copied to the host tier.
struct Drain {
    id: usize,
    /// The entry's incarnation (entry ids are reused).
    incarnation: u64,
    host: HostSlot,
    /// The launch it belongs to, and its position there.
    group: Arc<DrainGroup>,
    member: usize,
}

/// A block joining a demotion group.
struct GroupMember {
    id: usize,
    incarnation: u64,
    host: HostSlot,
    /// Recorded at put.
    checksum: u64,
}

/// One launch of drains: the fence after their copies and the device's
/// hashes of their sources.
struct DrainGroup {
    /// Completes after the copies and the hashes.
    fence: Fence,
    /// xxh3-64 of each member's source in device memory (`kvs_xxh3` on the
    /// hash stream), a little-endian u64 per member in group order, each
    /// poisoned with the complement of the recorded checksum before the
    /// launch (lent from the device's staging cache, back to it when the
    /// group is done). `None` when the hash could not be launched: the host
    /// copies are hashed on the CPU instead.
    hashes: Option<StagingBuffer>,
    /// Whether the fence completed without a device error (asked once).
    copied: std::sync::OnceLock<bool>,
}

impl DrainGroup {
    /// Whether the group's copies (and hashes) completed without a device
    /// error (logged once per group). Call once the fence is done.
    fn copied(&self) -> bool {
        *self.copied.get_or_init(|| match self.fence.wait() {
            Ok(()) => true,
            Err(e) => {
                gpu_failed("demotion copy", &e);
                false
            }
        })
    }

    /// The device's hash of member `i`'s source, once the fence is done.
    fn device_hash(&self, i: usize) -> Option<u64> {
        let bytes = self.hashes.as_ref()?.as_slice().get(8 * i..8 * i + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
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
        let (arena, region_len) = SlotArena::new(config.capacity_bytes, config.segment_bytes);
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

    /// Copies `src` (host memory, pinned or not) into a new slot on the
    /// promotion stream and publishes it with `checksum`.
    fn store(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        src: &[u8],
        checksum: u64,
    ) -> PutOutcome {
        let Some(slot) = self.reserve(src.len()) else {
            return PutOutcome::NoSpace;
        };
        let stream = &self.inner.promote_stream;
        // SAFETY: the slot is reserved for this writer alone; `src` is
        // borrowed until the fence below has completed.
        let copied = unsafe { stream.copy(slot.addr, src.as_ptr() as u64, src.len() as u64) }
            .and_then(|()| stream.record())
            .and_then(|f| f.wait());
        if let Err(e) = copied {
            gpu_failed("host-to-device copy", &e);
            // Nothing may still write the slot when it is freed.
            let _ = stream.synchronize();
            return PutOutcome::NoSpace;
        }
        self.publish(slot, ns, key, parent, checksum)
    }

    /// Copies host blocks into newly reserved slots of this tier, many per
    /// launch on the promotion stream (the batched kernel for sources a
    /// device reaches; DMA for others). `srcs` yields `(tag, bytes, device
    /// address of the bytes if a device reaches them)` and is pulled lazily,
    /// a group of [`HbmTierConfig::move_group_bytes`] at a time, with a few
    /// groups queued: the caller's work producing the next sources overlaps
    /// the copies already queued. Each group's `(tag, filled slot)` pairs go
    /// to `done` as soon as its copies completed, unpublished (the slot is
    /// `None` where none could be reserved or the copy failed), so the
    /// caller publishes one group while the next ones copy. Within a group
    /// the sources are copied in address order, into slots reserved in that
    /// order, so neighbours move as one run. Slots reserved by the call are
    /// nobody's victims, so when the tier cannot hold every source the
    /// first ones that fit are copied. The bytes are held until their
    /// group's copies have completed.
    pub fn copy_in<T>(
        &self,
        srcs: impl IntoIterator<Item = (T, Bytes, Option<u64>)>,
        mut done: impl FnMut(Vec<(T, Option<HbmSlot>)>),
    ) {
        let inner = &*self.inner;
        let stream = &inner.promote_stream;
        let group_bytes = inner.config.move_group_bytes.max(1) as usize;
        type Group<T> = (Vec<(T, Option<HbmSlot>)>, Vec<Bytes>, Option<Fence>);
        let mut in_flight: VecDeque<Group<T>> = VecDeque::new();
        let finish = |(mut group, held, fence): Group<T>,
                      done: &mut dyn FnMut(Vec<(T, Option<HbmSlot>)>)| {
            let ok = match fence.map(|f| f.wait()) {
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    gpu_failed("host-to-device copy", &e);
                    false
                }
                None => false,
            };
            if !ok {
                // Nothing may still write these slots when they are freed.
                let _ = stream.synchronize();
                group.iter_mut().for_each(|(_, s)| *s = None);
            }
            drop(held);
            done(group);
        };
        let began = std::time::Instant::now();
        let mut finishing = std::time::Duration::ZERO;
        let mut blocks = 0usize;
        let mut srcs = srcs.into_iter().peekable();
        while srcs.peek().is_some() {
            let mut pulled = Vec::new();
            let mut bytes = 0usize;
            while pulled.is_empty() || bytes < group_bytes {
                let Some(src) = srcs.next() else {
                    break;
                };
                bytes += src.1.len();
                pulled.push(src);
            }
            // In source order: slots are reserved in that order (lowest free
            // first), so blocks side by side in host memory land side by
            // side and move as one run.
            pulled.sort_by_key(|(_, src, device)| device.unwrap_or(src.as_ptr() as u64));
            let mut group = Vec::new();
            let mut held = Vec::new();
            let mut kernel_ops = Vec::new();
            let mut dma_ops = Vec::new();
            for (tag, src, src_device) in pulled {
                let slot = self.reserve(src.len());
                if let Some(slot) = &slot {
                    let op = |from: u64| CopyOp {
                        src: from,
                        dst: slot.addr,
                        len: src.len() as u64,
                    };
                    match src_device {
                        Some(addr) => kernel_ops.push(op(addr)),
                        None => dma_ops.push(op(src.as_ptr() as u64)),
                    }
                }
                group.push((tag, slot));
                held.push(src);
            }
            // SAFETY: every destination is a slot reserved for this call
            // alone; the sources are held (`held`) until the fence below has
            // completed, and `Bytes` never moves or changes its data.
            let fence = unsafe { stream.copy_blocks(&kernel_ops, inner.config.dma_threshold) }
                .and_then(|()| {
                    dma_ops
                        .iter()
                        .try_for_each(|op| unsafe { stream.copy(op.dst, op.src, op.len) })
                })
                .and_then(|()| stream.record());
            let fence = match fence {
                Ok(f) => Some(f),
                Err(e) => {
                    gpu_failed("host-to-device copy", &e);
                    None
                }
            };
            blocks += group.len();
            in_flight.push_back((group, held, fence));
            if in_flight.len() >= MOVE_WINDOW
                && let Some(oldest) = in_flight.pop_front()
            {
                let t = std::time::Instant::now();
                finish(oldest, &mut done);
                finishing += t.elapsed();
            }
        }
        let t = std::time::Instant::now();
        while let Some(oldest) = in_flight.pop_front() {
            finish(oldest, &mut done);
        }
        finishing += t.elapsed();
        tracing::debug!(
            blocks,
            total_us = began.elapsed().as_micros() as u64,
            waiting_and_publishing_us = finishing.as_micros() as u64,
            "hbm tier: batched copy in"
        );
    }

    /// [`HbmTier::publish`] of a slot filled by [`HbmTier::copy_in`] from
    /// the host tier, counted as a promotion.
    pub fn publish_promotion(
        &self,
        slot: HbmSlot,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        checksum: u64,
    ) -> PutOutcome {
        let out = self.publish(slot, ns, key, parent, checksum);
        if out == PutOutcome::Stored {
            TierCounters::add(&self.inner.moves.promoted, 1);
        }
        out
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
        let found: Vec<Option<(usize, usize, usize, u64)>> = {
            let mut meta = inner.meta.lock();
            let index = &mut meta.index;
            keys.iter()
                .map(|key| {
                    let id = index.index.get(&(*ns, *key)).copied()?;
                    index.touch(id);
                    let e = index.entries.get_mut(id)?;
                    e.readers += 1;
                    let (slot, len, checksum) = (e.slot, e.len, e.checksum);
                    Some((id, index.arena.offset(slot), len, checksum))
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
                f.map(|(id, offset, len, checksum)| HbmRead {
                    inner: Arc::clone(inner),
                    id,
                    addr: inner.memory.ptr() + offset as u64,
                    len,
                    checksum,
                })
            })
            .collect()
    }

    /// Reads device-reachable blocks of `len` bytes each (slots of this tier
    /// or any address the device reaches) back to the host through a pinned
    /// buffer lent by [`Gpu::staging`], `staging_bytes` at a time, and hands each batch to `f`: the
    /// position in `addrs` of its first block, and the blocks' bytes.
    pub fn read_back(
        &self,
        addrs: &[u64],
        len: usize,
        mut f: impl FnMut(usize, &[&[u8]]),
    ) -> Result<(), GpuError> {
        if addrs.is_empty() || len == 0 {
            return Ok(());
        }
        let inner = &self.inner;
        let per_batch = (inner.config.staging_bytes as usize / len)
            .max(1)
            .min(addrs.len());
        let buf = inner.gpu.staging(per_batch * len)?;
        let stream = &inner.read_stream;
        for (b, chunk) in addrs.chunks(per_batch).enumerate() {
            let ops: Vec<CopyOp> = chunk
                .iter()
                .enumerate()
                .map(|(i, &src)| CopyOp {
                    src,
                    dst: buf.device_ptr() + (i * len) as u64,
                    len: len as u64,
                })
                .collect();
            // SAFETY: the staging buffer is lent to this call alone, large
            // enough for the chunk; the sources are the caller's readable
            // blocks.
            let copied = unsafe { stream.copy_blocks(&ops, inner.config.dma_threshold) }
                .and_then(|()| stream.record())
                .and_then(|f| f.wait());
            if let Err(e) = copied {
                // Nothing may still write the buffer when it goes back.
                let _ = stream.synchronize();
                return Err(e);
            }
            let blocks: Vec<&[u8]> = buf.as_slice().chunks_exact(len).take(chunk.len()).collect();
            f(b * per_batch, &blocks);
        }
        Ok(())
    }

    /// xxh3-64 of device-reachable blocks of `len` bytes each, computed on
    /// the device (`kvs_xxh3` on the hash stream) without copying them out:
    /// the checksums of blocks an engine's kernel wrote into reserved slots.
    pub fn hash_on_device(&self, addrs: &[u64], len: usize) -> Result<Vec<u64>, GpuError> {
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        let inner = &*self.inner;
        let runs: Vec<HashRun> = addrs
            .iter()
            .map(|&addr| HashRun {
                addr,
                len: len as u64,
            })
            .collect();
        let buf = inner.gpu.staging(8 * runs.len())?;
        let hs = &inner.hash_stream;
        // SAFETY: the blocks are the caller's readable, unchanging memory
        // until this returns; the buffer is ours until the wait completes.
        let hashed = unsafe { hs.xxh3(&runs, buf.device_ptr()) }
            .and_then(|()| hs.record())
            .and_then(|f| f.wait());
        if let Err(e) = hashed {
            // Nothing may still write the buffer when it is reused.
            let _ = hs.synchronize();
            drop(buf);
            return Err(e);
        }
        let sums = buf
            .as_slice()
            .chunks_exact(8)
            .take(runs.len())
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        Ok(sums)
    }

    /// Demotes one block to the host tier now: [`HbmTier::demote_many`] of
    /// one key.
    pub fn demote(&self, ns: &NamespaceId, key: &BlockKey) -> RemoveOutcome {
        self.demote_many(ns, std::slice::from_ref(key))
            .pop()
            .unwrap_or(RemoveOutcome::Missing)
    }

    /// Demotes blocks to the host tier now (the cache's `evict`): their
    /// bytes are copied out, a group of [`HbmTierConfig::move_group_bytes`] per launch and
    /// fence, and each leaves this tier once its copy is published there
    /// (checksums verified in parallel, one group while the next copies).
    /// Returns one outcome per key: `Removed`, `Missing`, or `Pinned` for a
    /// block pinned (before or meanwhile) or replaced by a newer put while
    /// it drained.
    pub fn demote_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<RemoveOutcome> {
        let inner = &*self.inner;
        let mut events = Vec::new();
        let mut out = vec![RemoveOutcome::Missing; keys.len()];
        {
            let mut meta = inner.meta.lock();
            let mut ours: HashSet<(usize, u64)> = HashSet::new();
            let mut start = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                let Some(&id) = meta.index.index.get(&(*ns, *key)) else {
                    continue;
                };
                let Some(e) = meta.index.entries.get(id) else {
                    continue;
                };
                if e.pins > 0 {
                    out[i] = RemoveOutcome::Pinned;
                    continue;
                }
                out[i] = RemoveOutcome::Removed;
                if ours.insert((id, e.incarnation)) && !e.draining {
                    start.push(id);
                }
            }
            // In the order the blocks lie in HBM: their host slots are
            // reserved in that order (lowest free first), so neighbours on
            // both sides move as one run ([`GpuStream::copy_blocks`]).
            {
                let index = &meta.index;
                start.sort_by_cached_key(|&id| {
                    index
                        .entries
                        .get(id)
                        .map_or(usize::MAX, |e| index.arena.offset(e.slot))
                });
            }
            // Keep MOVE_WINDOW groups of ours queued on the demotion stream.
            // Each completed batch is taken off the queue and hashed on
            // rayon's pool while this thread launches the next group and
            // publishes the batch hashed before it: copying, hashing,
            // launching and publishing run at once. Groups complete in
            // order (one stream).
            let group_bytes = inner.config.move_group_bytes.max(1) as usize;
            let window = MOVE_WINDOW * group_bytes;
            let lanes = rayon::current_num_threads();
            let mut pending: &[usize] = &start;
            let mut hashed: Vec<(Drain, Option<u64>)> = Vec::new();
            let began = std::time::Instant::now();
            let mut launching = std::time::Duration::ZERO;
            let mut publishing = std::time::Duration::ZERO;
            let mut hash_waits = std::time::Duration::ZERO;
            let mut copy_waits = std::time::Duration::ZERO;
            loop {
                let batch = inner.take_completed(&mut meta);
                // Device-hashed groups are checked here at once; host copies
                // are hashed as a rayon job.
                let mut hashing = None;
                if needs_host_hashing(&batch) {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    rayon::spawn(move || {
                        let hashes = checked_hashes(&batch);
                        let _ = tx.send((batch, hashes));
                    });
                    hashing = Some(rx);
                } else if !batch.is_empty() {
                    let hashes = checked_hashes(&batch);
                    let t = std::time::Instant::now();
                    inner.finish_taken(&mut meta, std::mem::take(&mut hashed), &mut events);
                    publishing += t.elapsed();
                    hashed = batch.into_iter().zip(hashes).collect();
                }
                let t = std::time::Instant::now();
                let mut in_flight: usize = meta
                    .draining
                    .iter()
                    .filter(|d| ours.contains(&(d.id, d.incarnation)))
                    .map(|d| d.host.len())
                    .sum();
                while !pending.is_empty() && in_flight < window {
                    let (take, bytes) = one_group(&meta.index, pending, group_bytes, lanes);
                    inner.start_drains(&mut meta, &pending[..take], &mut events);
                    pending = &pending[take..];
                    in_flight += bytes;
                }
                launching += t.elapsed();
                let t = std::time::Instant::now();
                inner.finish_taken(&mut meta, std::mem::take(&mut hashed), &mut events);
                publishing += t.elapsed();
                if let Some(rx) = hashing {
                    let t = std::time::Instant::now();
                    match MutexGuard::unlocked(&mut meta, || rx.recv()) {
                        Ok((batch, hashes)) => hashed = batch.into_iter().zip(hashes).collect(),
                        // Only if the hashing job died (rayon aborts on a
                        // panic in a spawned job): its drains are lost.
                        Err(_) => tracing::error!("hbm tier: a demotion hashing job vanished"),
                    }
                    hash_waits += t.elapsed();
                    continue;
                }
                let t = std::time::Instant::now();
                let fence = meta
                    .draining
                    .iter()
                    .find(|d| ours.contains(&(d.id, d.incarnation)))
                    .map(|d| Arc::clone(&d.group));
                if let Some(group) = fence {
                    // A failed copy reads as done; its group says so when it
                    // is finished.
                    let _ = MutexGuard::unlocked(&mut meta, || group.fence.wait());
                    copy_waits += t.elapsed();
                    continue;
                }
                if !pending.is_empty() {
                    continue;
                }
                // Ours taken by another thread's reap, not finished yet?
                let moving = ours.iter().any(|&(id, incarnation)| {
                    meta.index
                        .entries
                        .get(id)
                        .is_some_and(|e| e.incarnation == incarnation && e.draining)
                });
                if !moving {
                    break;
                }
                inner
                    .reaped
                    .wait_for(&mut meta, std::time::Duration::from_millis(10));
            }
            tracing::debug!(
                blocks = start.len(),
                total_us = began.elapsed().as_micros() as u64,
                launching_us = launching.as_micros() as u64,
                publishing_us = publishing.as_micros() as u64,
                waiting_for_hashes_us = hash_waits.as_micros() as u64,
                waiting_for_copies_us = copy_waits.as_micros() as u64,
                "hbm tier: batched demotion"
            );
            for (i, key) in keys.iter().enumerate() {
                if out[i] == RemoveOutcome::Removed && meta.index.index.contains_key(&(*ns, *key)) {
                    // Pinned meanwhile, or replaced by a newer block.
                    out[i] = RemoveOutcome::Pinned;
                }
            }
        }
        inner.events.publish(events);
        out
    }
}

impl Inner {
    /// Finishes every drain whose copy has completed, oldest first. The
    /// host copies are hashed in parallel (rayon's pool) before any is
    /// published.
    fn reap(&self, meta: &mut MutexGuard<'_, Meta>, events: &mut Vec<PendingEvent>) {
        let done = self.take_completed(meta);
        if done.is_empty() {
            return;
        }
        let hashes = checked_hashes(&done);
        self.finish_taken(meta, done.into_iter().zip(hashes).collect(), events);
    }

    /// Takes every drain whose copy has completed off the queue, oldest
    /// first; they count as `reaping` until [`Inner::finish_taken`].
    fn take_completed(&self, meta: &mut Meta) -> Vec<Drain> {
        let mut done = Vec::new();
        while meta
            .draining
            .front()
            .is_some_and(|d| d.group.fence.is_done())
        {
            if let Some(d) = meta.draining.pop_front() {
                done.push(d);
            }
        }
        meta.reaping += done.len();
        done
    }

    /// Finishes drains taken by [`Inner::take_completed`], with their
    /// [`checked_hashes`], and wakes whoever waits for them.
    fn finish_taken(
        &self,
        meta: &mut Meta,
        done: Vec<(Drain, Option<u64>)>,
        events: &mut Vec<PendingEvent>,
    ) {
        if done.is_empty() {
            return;
        }
        meta.reaping -= done.len();
        for (d, hash) in done {
            self.finish_drain(meta, d, hash, events);
        }
        self.reaped.notify_all();
    }

    /// Publishes a drained block in the host tier (its bytes hashed to
    /// `hashed`; `None` if its copy failed), or frees the copy when the
    /// block was deleted, replaced or pinned meanwhile, or its copy failed
    /// or its bytes do not match the recorded checksum.
    fn finish_drain(
        &self,
        meta: &mut Meta,
        drain: Drain,
        hashed: Option<u64>,
        events: &mut Vec<PendingEvent>,
    ) {
        let index = &mut meta.index;
        let Some(e) = index.entries.get_mut(drain.id) else {
            return;
        };
        e.draining = false;
        let (live, pinned) = (e.live, e.pins > 0);
        let (ns, key, parent, checksum) = (e.ns, e.key, e.parent, e.checksum);
        if !live {
            // Deleted or replaced while its bytes were copied: not published.
            index.release_if_unused(drain.id);
            return;
        }
        if pinned {
            // Pinned while draining: it stays.
            index.set_insert(drain.id);
            return;
        }
        // Drains start only with a host tier.
        if let Some(host) = &self.host {
            let published = match hashed {
                Some(h) if h == checksum => {
                    Some(host.publish_hashed(drain.host, &ns, &key, parent.as_ref(), h))
                }
                Some(h) => Some(Err(ChecksumMismatch {
                    expected: checksum,
                    actual: h,
                })),
                // The copy failed (logged with the device error).
                None => None,
            };
            match published {
                None => TierCounters::add(&self.moves.demote_dropped, 1),
                Some(Ok(_)) => TierCounters::add(&self.moves.demoted, 1),
                Some(Err(mismatch)) => {
                    tracing::error!(namespace = %ns, key = %key, %mismatch, "hbm tier: demotion copy came out wrong; block dropped");
                    TierCounters::add(&self.moves.checksum_failures, 1);
                    TierCounters::add(&self.moves.demote_dropped, 1);
                }
            }
        }
        if let Some(ev) = index.unlink(drain.id, EventKind::Evicted) {
            TierCounters::add(&self.counters.evictions, 1);
            events.push(ev);
        }
    }

    /// Starts copying blocks out to the host tier, a group of
    /// [`HbmTierConfig::move_group_bytes`] per launch and fence (or lets a block go at once
    /// when the host already holds its bytes, or cannot take them).
    fn start_drains(&self, meta: &mut Meta, ids: &[usize], events: &mut Vec<PendingEvent>) {
        let host = self.host.as_ref();
        let mut group: Vec<GroupMember> = Vec::new();
        let mut ops: Vec<CopyOp> = Vec::new();
        let mut bytes = 0usize;
        for &id in ids {
            let index = &mut meta.index;
            let Some(e) = index.entries.get(id) else {
                continue;
            };
            if e.draining || !e.live {
                continue;
            }
            let (ns, key, len, checksum, slot) = (e.ns, e.key, e.len, e.checksum, e.slot);
            let incarnation = e.incarnation;
            let src = self.memory.ptr() + index.arena.offset(slot) as u64;
            let already =
                host.is_some_and(|h| h.meta(&ns, &key).is_some_and(|m| m.checksum == checksum));
            let host_slot = if already {
                TierCounters::add(&self.moves.demote_skipped, 1);
                None
            } else {
                let reserved = host.and_then(|h| h.reserve(len));
                if reserved.is_none() {
                    TierCounters::add(&self.moves.demote_dropped, 1);
                }
                reserved
            };
            let Some(host_slot) = host_slot else {
                if let Some(ev) = index.unlink(id, EventKind::Evicted) {
                    TierCounters::add(&self.counters.evictions, 1);
                    events.push(ev);
                }
                continue;
            };
            // Leaves the eviction candidates now: it is ours.
            index.set_remove(id);
            if let Some(e) = index.entries.get_mut(id) {
                e.draining = true;
            }
            // A mapped pinned slot takes the batched kernel (or DMA above the
            // threshold); pageable memory only DMA (`host_addr`).
            ops.push(CopyOp {
                src,
                dst: host_slot.device_addr().unwrap_or(host_slot.host_addr()),
                len: len as u64,
            });
            group.push(GroupMember {
                id,
                incarnation,
                host: host_slot,
                checksum,
            });
            bytes += len;
            if bytes >= self.config.move_group_bytes as usize {
                self.launch_drains(meta, std::mem::take(&mut group), &mut ops, events);
                bytes = 0;
            }
        }
        if !group.is_empty() {
            self.launch_drains(meta, group, &mut ops, events);
        }
    }

    /// Launches one group's copies and fence and queues its drains; a group
    /// whose launch fails is dropped (its blocks leave T0 uncopied).
    fn launch_drains(
        &self,
        meta: &mut Meta,
        group: Vec<GroupMember>,
        ops: &mut Vec<CopyOp>,
        events: &mut Vec<PendingEvent>,
    ) {
        let stream = &self.demote_stream;
        let (mut kernel, mut dma) = (Vec::new(), Vec::new());
        let runs: Vec<HashRun> = ops
            .iter()
            .map(|op| HashRun {
                addr: op.src,
                len: op.len,
            })
            .collect();
        for (member, op) in group.iter().zip(ops.drain(..)) {
            if member.host.device_addr().is_some() {
                kernel.push(op);
            } else {
                dma.push(op);
            }
        }
        // SAFETY: every host slot is reserved for its drain; every source
        // slot is draining, so it is not freed or reused before its fence.
        let copied =
            unsafe { stream.copy_blocks(&kernel, self.config.dma_threshold) }.and_then(|()| {
                dma.iter()
                    .try_for_each(|op| unsafe { stream.copy(op.dst, op.src, op.len) })
            });
        let mut hashes = None;
        if copied.is_ok() {
            let checksums: Vec<u64> = group.iter().map(|m| m.checksum).collect();
            hashes = self.hash_sources(&runs, &checksums);
        }
        match copied.and_then(|()| stream.record()) {
            Ok(fence) => {
                let group_state = Arc::new(DrainGroup {
                    fence,
                    hashes,
                    copied: std::sync::OnceLock::new(),
                });
                for (member, m) in group.into_iter().enumerate() {
                    meta.draining.push_back(Drain {
                        id: m.id,
                        incarnation: m.incarnation,
                        host: m.host,
                        group: Arc::clone(&group_state),
                        member,
                    });
                }
            }
            Err(err) => {
                gpu_failed("demotion copy", &err);
                // Make sure nothing is still reading the sources or writing
                // the hash buffer.
                let _ = stream.synchronize();
                if let Some(buf) = hashes {
                    let _ = self.hash_stream.synchronize();
                    drop(buf);
                }
                let index = &mut meta.index;
                for GroupMember { id, host, .. } in group {
                    drop(host);
                    TierCounters::add(&self.moves.demote_dropped, 1);
                    if let Some(e) = index.entries.get_mut(id) {
                        e.draining = false;
                    }
                    if let Some(ev) = index.unlink(id, EventKind::Evicted) {
                        TierCounters::add(&self.counters.evictions, 1);
                        events.push(ev);
                    }
                }
            }
        }
    }

    /// Queues `kvs_xxh3` of a demotion group's sources on the hash stream,
    /// into a pinned buffer poisoned with the complement of each recorded
    /// checksum, and makes the demotion stream wait for it (the group's
    /// fence then covers the hashes too; the copies run meanwhile). `None`
    /// when it cannot be launched: the group's host copies are hashed on the
    /// CPU instead.
    fn hash_sources(&self, runs: &[HashRun], checksums: &[u64]) -> Option<StagingBuffer> {
        let mut buf = match self.gpu.staging(8 * runs.len()) {
            Ok(b) => b,
            Err(e) => {
                gpu_failed("pinned buffer for demotion hashes", &e);
                return None;
            }
        };
        for (out, c) in buf.as_mut_slice().chunks_exact_mut(8).zip(checksums) {
            out.copy_from_slice(&(!c).to_le_bytes());
        }
        let hs = &self.hash_stream;
        // SAFETY: every source slot is draining (not written, freed or
        // reused before the group's fence, which waits for this hash); the
        // buffer is held by the group until then.
        let queued = unsafe { hs.xxh3(runs, buf.device_ptr()) }
            .and_then(|()| hs.record())
            .and_then(|hashed| self.demote_stream.wait_for(&hashed));
        match queued {
            Ok(()) => Some(buf),
            Err(e) => {
                // Nothing may still write the buffer when it is reused.
                let _ = hs.synchronize();
                if !self.hash_fallback_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "hbm tier: cannot hash on the device; demotions hash their host copies instead");
                }
                drop(buf);
                None
            }
        }
    }

    /// A free slot of `len` bytes: reaps finished drains, waits for the
    /// oldest one when only that can give room, or drains new victims.
    fn reserve(
        &self,
        meta: &mut MutexGuard<'_, Meta>,
        len: usize,
        events: &mut Vec<PendingEvent>,
    ) -> Option<SlotRef> {
        loop {
            self.reap(meta, events);
            if let Some(slot) = meta.index.arena.alloc(len) {
                return Some(slot);
            }
            if let Some(group) = meta.draining.front().map(|d| Arc::clone(&d.group)) {
                // A failed copy reads as done; its group says so when reaped.
                let _ = MutexGuard::unlocked(meta, || group.fence.wait());
                continue;
            }
            if meta.reaping > 0 {
                // Drains being finished by a batched demotion free slots soon.
                self.reaped
                    .wait_for(meta, std::time::Duration::from_millis(10));
                continue;
            }
            let victims = choose_victims(&meta.index, len)?;
            self.start_drains(meta, &victims, events);
        }
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

impl Drop for HbmRead {
    fn drop(&mut self) {
        let mut meta = self.inner.meta.lock();
        if let Some(e) = meta.index.entries.get_mut(self.id) {
            e.readers -= 1;
        }
        meta.index.release_if_unused(self.id);
    }
}

impl Tier for HbmTier {
    fn kind(&self) -> TierKind {
        TierKind::Hbm
    }

    fn max_block_bytes(&self) -> u64 {
        self.max_slot_bytes() as u64
    }

    /// Copies the payload in on the promotion stream; its xxh3-64 is recorded.
    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome {
        self.store(ns, key, parent, payload, xxh3_64(payload))
    }

    /// Copies the block out on the read stream and checks it against the
    /// recorded checksum: a mismatch drops the block and answers a miss.
    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes> {
        let read = self.acquire(ns, key)?;
        let mut buf = vec![0u8; read.len];
        let stream = &self.inner.read_stream;
        // SAFETY: the reader count keeps the slot's bytes until `read` drops;
        // `buf` is ours until the fence has completed.
        let copied = unsafe { stream.copy(buf.as_mut_ptr() as u64, read.addr, read.len as u64) }
            .and_then(|()| stream.record())
            .and_then(|f| f.wait());
        if let Err(e) = copied {
            gpu_failed("device-to-host copy", &e);
            return None;
        }
        if xxh3_64(&buf) != read.checksum {
            tracing::error!(namespace = %ns, key = %key, "hbm tier: block does not match its checksum; dropped");
            TierCounters::add(&self.inner.moves.checksum_failures, 1);
            let event = {
                let mut meta = self.inner.meta.lock();
                let still = meta.index.index.get(&(*ns, *key)) == Some(&read.id);
                if still {
                    meta.index.unlink(read.id, EventKind::Deleted)
                } else {
                    None
                }
            };
            self.inner.events.publish(event);
            return None;
        }
        Some(Bytes::from(buf))
    }

    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.inner
            .meta
            .lock()
            .index
            .index
            .contains_key(&(*ns, *key))
    }

    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome {
        let inner = &self.inner;
        let (outcome, event) = inner.meta.lock().index.remove(ns, key, reason);
        if outcome == RemoveOutcome::Removed && reason == RemoveReason::Evict {
            TierCounters::add(&inner.counters.evictions, 1);
        }
        inner.events.publish(event);
        outcome
    }

    fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        self.inner.meta.lock().index.pin(ns, keys)
    }

    fn unpin(&self, token: &PinToken) {
        self.inner.meta.lock().index.unpin(token)
    }

    fn meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<BlockMeta> {
        self.inner.meta.lock().index.block_meta(ns, key)
    }

    fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        self.inner.meta.lock().index.list(ns, cursor, limit)
    }

    fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey> {
        self.inner.meta.lock().index.keys_of(ns)
    }

    fn stats(&self) -> TierStats {
        let meta = self.inner.meta.lock();
        let mut s = TierStats {
            capacity_bytes: self.inner.config.capacity_bytes,
            used_bytes: meta.index.arena.used_bytes(),
            blocks: meta.index.index.len() as u64,
            pinned_blocks: meta.index.pinned_blocks,
            ..TierStats::default()
        };
        drop(meta);
        self.inner.counters.fill(&mut s);
        s
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No copy may still touch the device memory or a host slot when
        // they are freed.
        for s in [
            &self.promote_stream,
            &self.demote_stream,
            &self.hash_stream,
            &self.read_stream,
        ] {
            if let Err(e) = s.synchronize() {
                gpu_failed("stream synchronize at shutdown", &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostTierConfig;

    fn ns() -> NamespaceId {
        NamespaceId([3; 16])
    }

    fn key(s: &str) -> BlockKey {
        BlockKey::new("key", s.as_bytes()).unwrap()
    }

    fn payload(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(13) ^ tag).collect()
    }

    fn tiers(hbm_blocks: u64, host_blocks: u64, block: u64) -> (HbmTier, HostTier) {
        let events = Arc::new(EventBus::new(1024));
        let host = HostTier::new(
            &HostTierConfig {
                capacity_bytes: host_blocks * block,
                segment_bytes: 64 << 20,
            },
            Arc::clone(&events),
        )
        .unwrap();
        let cfg = HbmTierConfig {
            capacity_bytes: hbm_blocks * block,
            ..HbmTierConfig::default()
        };
        let hbm = HbmTier::new(&cfg, Gpu::cpu(), 0, Some(host.clone()), events).unwrap();
        (hbm, host)
    }

    #[test]
    fn pressure_demotes_to_host() {
        let (hbm, host) = tiers(2, 8, 4096);
        for i in 0..5u8 {
            let k = key(&format!("k{i}"));
            assert_eq!(
                hbm.put(&ns(), &k, None, &payload(i, 4096)),
                PutOutcome::Stored
            );
            assert!(hbm.stats().used_bytes <= 2 * 4096);
        }
        assert_eq!(hbm.stats().blocks, 2);
        assert_eq!(host.stats().blocks, 3);
        for i in 0..5u8 {
            let k = key(&format!("k{i}"));
            let got = hbm.get(&ns(), &k).or_else(|| host.get(&ns(), &k)).unwrap();
            assert_eq!(&got[..], &payload(i, 4096)[..]);
        }
        assert_eq!(hbm.hbm_stats().demoted, 3);
    }

    #[test]
    fn readers_and_pins_are_never_victims() {
        let (hbm, _host) = tiers(2, 8, 4096);
        hbm.put(&ns(), &key("a"), None, &payload(1, 4096));
        hbm.put(&ns(), &key("b"), None, &payload(2, 4096));
        let read = hbm.acquire(&ns(), &key("a")).unwrap();
        let pins = hbm.pin(&ns(), &[key("b")]).unwrap();
        assert_eq!(
            hbm.put(&ns(), &key("c"), None, &payload(3, 4096)),
            PutOutcome::NoSpace
        );
        drop(read);
        assert_eq!(
            hbm.put(&ns(), &key("c"), None, &payload(3, 4096)),
            PutOutcome::Stored
        );
        assert!(hbm.contains(&ns(), &key("b")));
        assert!(!hbm.contains(&ns(), &key("a")));
        hbm.unpin(&pins[0]);
    }
}
