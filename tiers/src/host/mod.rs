//! `HostTier` (T1): blocks in a host-memory [`SlabArena`], with a hard byte
//! capacity and prefix-aware LRU eviction.
//!
//! # Concurrency
//!
//! Bytes never move under a lock. A put reserves a slot under the metadata
//! lock (an O(log n) critical section), copies the payload with the lock
//! released, then publishes the block under the lock again. A get takes a
//! reader count on the block under the lock and copies (or hands out) the
//! bytes after releasing it. A slot is reused only when its block is gone from
//! the index *and* its last reader has finished, so a reader always sees the
//! exact bytes that were published.
//!
//! # Eviction
//!
//! Each block size is a size class; a class takes slabs of the arena (runs
//! of about 1/256 of the capacity, fewer bytes with many classes, at least
//! one block) from free space as it needs them and gives them back when they
//! empty, so any number of classes fill the tier before anything is evicted.
//! When a class has no free slot and no free extent holds one, the tier
//! evicts by the policy it shares with the disk tier (`eviction.rs`): least
//! recently used *leaves* (blocks no cached block names as parent) before
//! inner blocks, pinned blocks and blocks being read never. When another
//! class holds the least recently used leaf, the tier empties one slab's
//! length of the arena, the window whose newest block is oldest, or evicts
//! the class's own oldest block if that is older still
//! (`SlotIndex::make_room`): the newest block evicted is as old as it can
//! be, so capacity follows recency across classes.
//!
//! With an [`EvictionSink`] set (the cache's demotion to disk and to the
//! remote tier), eviction runs in three steps (`evict.rs`): under the lock the
//! index chooses the victims and marks them *leaving* (still indexed and
//! readable, their slots held, no candidates for anyone else) and returns
//! them; with the lock released the sink receives them, bytes in place;
//! under the lock again they leave the index and their slots are reused. A
//! delete or put of a key whose block is leaving waits until it has been
//! handed on, so whatever the sink queued for that block is queued before
//! the delete or put goes on to make older copies unreachable. Without a
//! sink, victims leave at once.
//!
//! # Pinned memory
//!
//! [`HostTier::new_pinned`] lays the arena over a buffer from
//! [`Gpu::alloc_pinned`] (page-locked and mapped with CUDA), so the HBM tier's
//! demotions and promotions and the CUDA-IPC data path copy straight between
//! a slot and device memory ([`HostTier::device_addr`], [`HostTier::reserve`]).
//!
//! # Shared with the HBM tier
//!
//! The block index (`index.rs`, `SlotIndex`: entries, LRU sets, child counts,
//! pins, readers) is the same for the HBM tier (`hbm/`), which uses its
//! `draining` state for blocks whose bytes are being copied out.
//!
//! # Files
//!
//! - `index.rs`: the block index and the victims' leaving state.
//! - `evict.rs`: eviction with an [`EvictionSink`]: reserve, hand on, finish.
//! - `tier_impl.rs`: the [`crate::Tier`] trait.

mod evict;
pub(crate) mod index;
mod tier_impl;

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};

use kvstrata_kernels::{Gpu, GpuError};

use crate::arena::{ArenaMemory, SlabArena, SlotRef};
use crate::disk::checksum::xxh3_64;
use crate::events::{EventBus, EventKind, PendingEvent};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{BlockMeta, TierCounters, TierKind};

pub use evict::{EvictionSink, Victim};
pub(crate) use index::{Entry, SlotIndex};

/// Configuration of the host tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTierConfig {
    /// Hard limit on the bytes of block payloads held. Default 4 GiB.
    pub capacity_bytes: u64,
    /// The largest block the tier accepts (and the largest slab of the
    /// arena: block sizes share the capacity in slabs of about 1/256 of it
    /// or less, see [`SlabArena`]). Default 64 MiB; a smaller capacity makes
    /// it the capacity.
    pub segment_bytes: u64,
}

impl Default for HostTierConfig {
    fn default() -> Self {
        HostTierConfig {
            capacity_bytes: 4 << 30,
            segment_bytes: 64 << 20,
        }
    }
}

type IndexKey = (NamespaceId, BlockKey);

struct Inner {
    region: ArenaMemory,
    meta: Mutex<SlotIndex>,
    /// Signalled whenever leaving blocks have been handed on and left.
    handed_on: Condvar,
    sink: std::sync::OnceLock<Arc<dyn EvictionSink>>,
    counters: TierCounters,
    events: Arc<EventBus>,
    capacity: u64,
}

/// The host-memory tier. Cheap to clone (shared state).
#[derive(Clone)]
pub struct HostTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HostTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTier")
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl HostTier {
    /// Reserves the arena (anonymous memory, committed as it is written).
    pub fn new(config: &HostTierConfig, events: Arc<EventBus>) -> std::io::Result<Self> {
        let (arena, region_len) = SlabArena::new(config.capacity_bytes, config.segment_bytes);
        let region = ArenaMemory::anonymous(region_len)?;
        Ok(Self::with_region(config, events, arena, region))
    }

    /// Reserves the arena in host memory `gpu` reaches: page-locked (and
    /// committed at once) on CUDA, anonymous memory on the CPU backend.
    pub fn new_pinned(
        config: &HostTierConfig,
        events: Arc<EventBus>,
        gpu: &Gpu,
    ) -> Result<Self, GpuError> {
        let (arena, region_len) = SlabArena::new(config.capacity_bytes, config.segment_bytes);
        let region = ArenaMemory::pinned(gpu.alloc_pinned(region_len)?, region_len);
        Ok(Self::with_region(config, events, arena, region))
    }

    fn with_region(
        config: &HostTierConfig,
        events: Arc<EventBus>,
        arena: SlabArena,
        region: ArenaMemory,
    ) -> Self {
        HostTier {
            inner: Arc::new(Inner {
                region,
                meta: Mutex::new(SlotIndex::new(arena, TierKind::Host, 1)),
                handed_on: Condvar::new(),
                sink: std::sync::OnceLock::new(),
                counters: TierCounters::default(),
                events,
                capacity: config.capacity_bytes,
            }),
        }
    }

    /// Whether the arena is page-locked memory (a CUDA device's pinned buffer).
    pub fn is_pinned(&self) -> bool {
        self.inner.region.is_page_locked()
    }

    /// Whether a device reaches the arena ([`HostTier::new_pinned`]), so
    /// [`HostTier::device_addr`] and [`HostSlot::device_addr`] answer.
    pub fn device_reachable(&self) -> bool {
        self.inner.region.device_addr(0).is_some()
    }

    /// Device address of bytes handed out by this tier (a
    /// [`crate::Tier::get`] result), when a device reaches the arena; `None`
    /// for other memory.
    pub fn device_addr(&self, data: &[u8]) -> Option<u64> {
        let region = &self.inner.region;
        region.device_addr(region.offset_of(data)?)
    }

    /// Reserves a slot of `len` bytes for a writer that fills it itself (a
    /// device copy, see [`HostSlot::device_addr`]), evicting as a put would
    /// (victims go to the [`EvictionSink`], after this tier's lock is
    /// released). Publish it with [`HostTier::publish`]; dropping it frees
    /// the slot.
    pub fn reserve(&self, len: usize) -> Option<HostSlot> {
        let inner = &*self.inner;
        match self.reserve_slot(len) {
            Some((slot, offset)) => Some(HostSlot {
                inner: Arc::clone(&self.inner),
                slot: Some(slot),
                offset,
                len,
            }),
            None => {
                TierCounters::add(&inner.counters.rejected_puts, 1);
                None
            }
        }
    }

    /// [`HostTier::reserve`] of `n` slots of `len` bytes at once (one taking
    /// of the tier's lock, not one per slot): all of them, or `None` with
    /// none kept (counted as one rejected put).
    pub fn reserve_many(&self, len: usize, n: usize) -> Option<Vec<HostSlot>> {
        let inner = &*self.inner;
        let Some(slots) = self.reserve_slots(len, n) else {
            TierCounters::add(&inner.counters.rejected_puts, 1);
            return None;
        };
        Some(
            slots
                .into_iter()
                .map(|(slot, offset)| HostSlot {
                    inner: Arc::clone(&self.inner),
                    slot: Some(slot),
                    offset,
                    len,
                })
                .collect(),
        )
    }

    /// [`crate::Tier::get`] and [`crate::Tier::meta`] of one block at once
    /// (the metadata describes exactly the bytes returned).
    pub fn get_with_meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<(Bytes, BlockMeta)> {
        self.get_many_with_meta(ns, std::slice::from_ref(key))
            .pop()
            .flatten()
    }

    /// [`HostTier::get_with_meta`] of many keys under one lock, one answer
    /// per key (hits are counted; a miss is left to the caller's next tier
    /// read, as in `get_with_meta`).
    pub fn get_many_with_meta(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Vec<Option<(Bytes, BlockMeta)>> {
        self.read_locked(ns, keys, |index, e| index.meta_of(e))
    }

    /// Takes a reader count on each key's block under one lock and hands
    /// out its bytes (borrowing the slot), with `describe` of its entry;
    /// counts the hits and the bytes out.
    fn read_locked<T>(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        describe: impl Fn(&SlotIndex, &Entry) -> T,
    ) -> Vec<Option<(Bytes, T)>> {
        let inner = &self.inner;
        // One clock reading stamps every block of the batch (their idle time).
        let now = std::time::Instant::now();
        let found: Vec<Option<(usize, usize, usize, T)>> = {
            let mut meta = inner.meta.lock();
            keys.iter()
                .map(|key| {
                    let id = *meta.index.get(&(*ns, *key))?;
                    meta.touch_at(id, now);
                    let e = meta.entries.get_mut(id)?;
                    e.readers += 1;
                    let (slot, len) = (e.slot, e.len);
                    let described = meta.entries.get(id).map(|e| describe(&meta, e))?;
                    Some((id, meta.arena.offset(slot), len, described))
                })
                .collect()
        };
        let hits = found.iter().flatten().count() as u64;
        let bytes: usize = found.iter().flatten().map(|f| f.2).sum();
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.bytes_out, bytes as u64);
        found
            .into_iter()
            .map(|f| {
                f.map(|(id, offset, len, described)| {
                    let bytes = Bytes::from_owner(ReadGuard {
                        inner: Arc::clone(inner),
                        id,
                        offset,
                        len,
                    });
                    (bytes, described)
                })
            })
            .collect()
    }

    /// Publishes a filled reservation under the key (replacing any block
    /// stored under it), with the xxh3-64 of the slot's bytes as its
    /// checksum. With `expected`, a slot whose bytes hash otherwise is freed
    /// instead and the error says so (a copy that went wrong is never served).
    pub fn publish(
        &self,
        slot: HostSlot,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        expected: Option<u64>,
    ) -> Result<u64, ChecksumMismatch> {
        let checksum = xxh3_64(slot.as_slice());
        if let Some(expected) = expected
            && expected != checksum
        {
            return Err(ChecksumMismatch {
                expected,
                actual: checksum,
            });
        }
        self.publish_hashed(slot, ns, key, parent, checksum)
    }

    /// [`HostTier::publish`] of a slot whose bytes the caller has already
    /// hashed to `checksum` (after its copy into the slot completed): the
    /// HBM tier's batched demotion hashes many slots at once, in parallel.
    pub(crate) fn publish_hashed(
        &self,
        mut slot: HostSlot,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        checksum: u64,
    ) -> Result<u64, ChecksumMismatch> {
        let inner = &*self.inner;
        let Some(reserved) = slot.slot.take() else {
            return Err(ChecksumMismatch {
                expected: checksum,
                actual: checksum,
            });
        };
        {
            let mut meta = inner.meta.lock();
            // A block it replaces that is being handed on goes first.
            self.wait_handed_on(&mut meta, ns, key);
            meta.publish(ns, key, parent, reserved, slot.len, checksum);
        }
        TierCounters::add(&inner.counters.bytes_in, slot.len as u64);
        inner.events.publish([PendingEvent {
            kind: EventKind::Stored,
            namespace: *ns,
            key: *key,
            parent: parent.copied(),
            tier: TierKind::Host,
        }]);
        Ok(checksum)
    }

    /// Waits, with the lock released meanwhile, until the block stored under
    /// the key is not being handed on (see the module docs): a delete or put
    /// replaces it only afterwards.
    fn wait_handed_on(
        &self,
        meta: &mut MutexGuard<'_, SlotIndex>,
        ns: &NamespaceId,
        key: &BlockKey,
    ) {
        while meta.is_leaving(ns, key) {
            self.inner.handed_on.wait(meta);
        }
    }

    /// Sets where pressure evictions go (once; later calls are ignored and
    /// return `false`). Without a sink, evicted blocks are dropped.
    pub fn set_eviction_sink(&self, sink: Arc<dyn EvictionSink>) -> bool {
        self.inner.sink.set(sink).is_ok()
    }

    /// Bytes the tier can hold in one block.
    pub fn max_slot_bytes(&self) -> usize {
        self.inner.meta.lock().arena.max_slot_bytes()
    }
}

/// A publish refused because the slot's bytes do not hash to the checksum
/// the block was stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("slot bytes hash to {actual:#018x}, expected {expected:#018x}")]
pub struct ChecksumMismatch {
    pub expected: u64,
    pub actual: u64,
}

/// A host-tier slot reserved by a writer ([`HostTier::reserve`]); freed on
/// drop unless published ([`HostTier::publish`]).
pub struct HostSlot {
    inner: Arc<Inner>,
    slot: Option<SlotRef>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for HostSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSlot")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl HostSlot {
    /// Bytes the slot holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device address of the slot, when a device reaches the arena.
    pub fn device_addr(&self) -> Option<u64> {
        self.inner.region.device_addr(self.offset)
    }

    /// Host address of the slot (a valid source or destination of
    /// [`kvstrata_kernels::GpuStream::copy`], which accepts host memory).
    pub fn host_addr(&self) -> u64 {
        self.inner.region.host_addr(self.offset)
    }

    /// The slot's bytes (complete once the writer's copy into it has).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slot is reserved for this holder alone and lies in the region.
        unsafe { self.inner.region.slice(self.offset, self.len) }
    }

    /// The slot's bytes, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the slot is reserved for this writer alone (`&mut self`)
        // and lies in the region.
        unsafe { self.inner.region.slice_mut(self.offset, self.len) }
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.inner.meta.lock().arena.free(slot);
        }
    }
}

/// Keeps a block's slot from being reused while its bytes are read.
struct ReadGuard {
    inner: Arc<Inner>,
    id: usize,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for ReadGuard {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the reader count taken in `get` keeps the slot from being
        // freed or reused until this guard drops, and published slots are
        // never written.
        unsafe { self.inner.region.slice(self.offset, self.len) }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut meta = self.inner.meta.lock();
        if let Some(e) = meta.entries.get_mut(self.id) {
            e.readers -= 1;
        }
        meta.release_if_unused(self.id);
    }
}

#[cfg(test)]
mod tests;
