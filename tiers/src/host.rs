//! `HostTier` (T1): blocks in a host-memory [`SlotArena`], with a hard byte
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
//! When a size class has no free slot, the tier evicts by the policy it shares
//! with the disk tier (`eviction.rs`): least recently used *leaves* (blocks no
//! cached block names as parent) before inner blocks, pinned blocks and blocks
//! being read never, and whole segments of another size class when that class
//! holds the least recently used data, so capacity follows recency. With an
//! [`EvictionSink`] set (the cache's demotion queue), each victim is offered to
//! it before its slot is reused.
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
//! The block index ([`SlotIndex`]: entries, LRU sets, child counts, pins,
//! readers) is the same for the HBM tier (`hbm.rs`), which adds only a
//! `draining` state for blocks whose bytes are being copied out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use slab::Slab;

use kvstrata_kernels::{Gpu, GpuError};

use crate::arena::{Region, SlotArena, SlotRef};
use crate::disk::checksum::xxh3_64;
use crate::events::{EventBus, EventKind, PendingEvent};
use crate::eviction::{Evictable, LruSets, choose_victims};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierCounters, TierKind,
    TierStats,
};

/// Configuration of the host tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTierConfig {
    /// Hard limit on the bytes of block payloads held. Default 4 GiB.
    pub capacity_bytes: u64,
    /// Size of the arena's segments (each holds slots of one block size; the
    /// largest block the tier accepts). Default 64 MiB; a smaller capacity
    /// makes one segment of the whole capacity.
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

/// A block the host tier is evicting under pressure, with its bytes still in
/// place. Only blocks nobody is reading or has pinned are evicted.
#[derive(Debug)]
pub struct Victim<'a> {
    pub namespace: &'a NamespaceId,
    pub key: &'a BlockKey,
    pub parent: Option<&'a BlockKey>,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    pub payload: &'a [u8],
}

/// Receives the blocks the host tier evicts to make room (the cache demotes
/// them to disk). Called with the host tier's lock held, before the victim's
/// slot can be reused: it must be quick (copy the bytes or decline) and must
/// not call back into the host tier.
pub trait EvictionSink: Send + Sync {
    fn evicted(&self, victim: Victim<'_>);
}

/// One block of a [`SlotIndex`].
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) ns: NamespaceId,
    pub(crate) key: BlockKey,
    pub(crate) parent: Option<BlockKey>,
    pub(crate) slot: SlotRef,
    pub(crate) len: usize,
    pub(crate) checksum: u64,
    pub(crate) tick: u64,
    pub(crate) last_access: Instant,
    pub(crate) pins: u32,
    pub(crate) readers: u32,
    /// False once removed from the index while readers still hold its slot.
    pub(crate) live: bool,
    /// Its bytes are being copied out of the slot (HBM demotion): it is no
    /// eviction candidate, and its slot is not freed until the copy is done.
    pub(crate) draining: bool,
    pub(crate) incarnation: u64,
}

/// The block index of a slot-arena tier (host and HBM): which block lives in
/// which slot, LRU order, prefix structure, pins and readers. Lives under the
/// tier's metadata lock.
pub(crate) struct SlotIndex {
    pub(crate) kind: TierKind,
    pub(crate) arena: SlotArena,
    pub(crate) entries: Slab<Entry>,
    pub(crate) index: HashMap<IndexKey, usize>,
    /// Cached blocks per parent key (whether or not the parent is cached).
    child_count: HashMap<IndexKey, u32>,
    /// Eviction candidates (live, unpinned, not draining) per slot size.
    sets: LruSets,
    slot_owner: HashMap<SlotRef, usize>,
    tick: u64,
    next_incarnation: u64,
    pub(crate) pinned_blocks: u64,
}

struct Inner {
    region: Region,
    meta: Mutex<SlotIndex>,
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
        let (arena, region_len) = SlotArena::new(config.capacity_bytes, config.segment_bytes);
        let region = Region::anonymous(region_len)?;
        Ok(Self::with_region(config, events, arena, region))
    }

    /// Reserves the arena in host memory `gpu` reaches: page-locked (and
    /// committed at once) on CUDA, anonymous memory on the CPU backend.
    pub fn new_pinned(
        config: &HostTierConfig,
        events: Arc<EventBus>,
        gpu: &Gpu,
    ) -> Result<Self, GpuError> {
        let (arena, region_len) = SlotArena::new(config.capacity_bytes, config.segment_bytes);
        let region = Region::pinned(gpu.alloc_pinned(region_len)?, region_len);
        Ok(Self::with_region(config, events, arena, region))
    }

    fn with_region(
        config: &HostTierConfig,
        events: Arc<EventBus>,
        arena: SlotArena,
        region: Region,
    ) -> Self {
        HostTier {
            inner: Arc::new(Inner {
                region,
                meta: Mutex::new(SlotIndex::new(arena, TierKind::Host, 1)),
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

    /// Device address of bytes handed out by this tier (a [`Tier::get`]
    /// result), when a device reaches the arena; `None` for other memory.
    pub fn device_addr(&self, data: &[u8]) -> Option<u64> {
        let region = &self.inner.region;
        region.device_addr(region.offset_of(data)?)
    }

    /// Reserves a slot of `len` bytes for a writer that fills it itself (a
    /// device copy, see [`HostSlot::device_addr`]), evicting as a put would.
    /// Publish it with [`HostTier::publish`]; dropping it frees the slot.
    pub fn reserve(&self, len: usize) -> Option<HostSlot> {
        let inner = &*self.inner;
        let mut events = Vec::new();
        let reserved = {
            let mut meta = inner.meta.lock();
            let sink = inner
                .sink
                .get()
                .map(|s| (&inner.region, s.as_ref() as &dyn EvictionSink));
            let slot = meta.reserve(len, &mut events, &inner.counters, sink);
            slot.map(|s| (s, meta.arena.offset(s)))
        };
        inner.events.publish(events);
        match reserved {
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

    /// [`Tier::get`] and [`Tier::meta`] of one block at once (the metadata
    /// describes exactly the bytes returned).
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
        let inner = &self.inner;
        let found: Vec<Option<(usize, usize, usize, BlockMeta)>> = {
            let mut meta = inner.meta.lock();
            keys.iter()
                .map(|key| {
                    let id = *meta.index.get(&(*ns, *key))?;
                    meta.touch(id);
                    let e = meta.entries.get_mut(id)?;
                    e.readers += 1;
                    let (slot, len) = (e.slot, e.len);
                    let block = meta.entries.get(id).map(|e| meta.meta_of(e))?;
                    Some((id, meta.arena.offset(slot), len, block))
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
                f.map(|(id, offset, len, block)| {
                    let bytes = Bytes::from_owner(ReadGuard {
                        inner: Arc::clone(inner),
                        id,
                        offset,
                        len,
                    });
                    (bytes, block)
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
        inner
            .meta
            .lock()
            .publish(ns, key, parent, reserved, slot.len, checksum);
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

impl SlotIndex {
    /// An empty index over `arena`; incarnations start at `first_incarnation`
    /// (tiers of one kind use disjoint ranges, so a pin token of one never
    /// matches a block of another).
    pub(crate) fn new(arena: SlotArena, kind: TierKind, first_incarnation: u64) -> Self {
        SlotIndex {
            kind,
            arena,
            entries: Slab::new(),
            index: HashMap::new(),
            child_count: HashMap::new(),
            sets: LruSets::default(),
            slot_owner: HashMap::new(),
            tick: 0,
            next_incarnation: first_incarnation,
            pinned_blocks: 0,
        }
    }

    fn is_leaf(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.child_count.get(&(*ns, *key)).copied().unwrap_or(0) == 0
    }

    pub(crate) fn set_insert(&mut self, id: usize) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if !e.live || e.pins > 0 || e.draining {
            return;
        }
        let leaf = self.is_leaf(&e.ns, &e.key);
        let (class, tick) = (e.len, e.tick);
        self.sets.insert(class, tick, id, leaf);
    }

    pub(crate) fn set_remove(&mut self, id: usize) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        let (class, tick) = (e.len, e.tick);
        self.sets.remove(class, tick);
    }

    pub(crate) fn touch(&mut self, id: usize) {
        self.set_remove(id);
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(id) {
            e.tick = tick;
            e.last_access = Instant::now();
        }
        self.set_insert(id);
    }

    /// Moves a cached parent between the leaf and inner sets after its child count changed.
    fn reclassify(&mut self, ns: &NamespaceId, key: &BlockKey) {
        if let Some(&pid) = self.index.get(&(*ns, *key)) {
            self.set_remove(pid);
            self.set_insert(pid);
        }
    }

    fn add_child(&mut self, ns: &NamespaceId, parent: &BlockKey) {
        let c = self.child_count.entry((*ns, *parent)).or_insert(0);
        *c += 1;
        if *c == 1 {
            self.reclassify(ns, parent);
        }
    }

    fn remove_child(&mut self, ns: &NamespaceId, parent: &BlockKey) {
        let k = (*ns, *parent);
        if let Some(c) = self.child_count.get_mut(&k) {
            *c -= 1;
            if *c == 0 {
                self.child_count.remove(&k);
                self.reclassify(ns, parent);
            }
        }
    }

    /// Takes a block out of the index. Its slot is freed now, or by its last
    /// reader (or, while draining, when the copy out of it is done). Returns
    /// the event to publish.
    pub(crate) fn unlink(&mut self, id: usize, kind: EventKind) -> Option<PendingEvent> {
        self.set_remove(id);
        let (ns, key, parent, pins) = {
            let e = self.entries.get_mut(id)?;
            if !e.live {
                return None;
            }
            e.live = false;
            (e.ns, e.key, e.parent, e.pins)
        };
        if pins > 0 {
            self.pinned_blocks -= 1;
        }
        self.index.remove(&(ns, key));
        if let Some(p) = parent {
            self.remove_child(&ns, &p);
        }
        self.release_if_unused(id);
        Some(PendingEvent {
            kind,
            namespace: ns,
            key,
            parent,
            tier: self.kind,
        })
    }

    /// Frees the slot of an unlinked block nobody reads or copies out of.
    pub(crate) fn release_if_unused(&mut self, id: usize) {
        let free =
            matches!(self.entries.get(id), Some(e) if !e.live && e.readers == 0 && !e.draining);
        if free {
            let e = self.entries.remove(id);
            self.slot_owner.remove(&e.slot);
            self.arena.free(e.slot);
        }
    }

    /// Publishes a filled slot under the key, replacing (without an event of
    /// its own) any block stored under it. Returns the new entry's id.
    pub(crate) fn publish(
        &mut self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        slot: SlotRef,
        len: usize,
        checksum: u64,
    ) -> usize {
        if let Some(&old) = self.index.get(&(*ns, *key)) {
            // Replaced blocks emit no event of their own: the new STORED says it.
            let _ = self.unlink(old, EventKind::Deleted);
        }
        self.tick += 1;
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let entry = Entry {
            ns: *ns,
            key: *key,
            parent: parent.copied(),
            slot,
            len,
            checksum,
            tick: self.tick,
            last_access: Instant::now(),
            pins: 0,
            readers: 0,
            live: true,
            draining: false,
            incarnation,
        };
        let id = self.entries.insert(entry);
        self.slot_owner.insert(slot, id);
        self.index.insert((*ns, *key), id);
        if let Some(p) = parent {
            self.add_child(ns, p);
        }
        self.set_insert(id);
        id
    }

    /// Whether every block of a segment can be evicted now.
    fn evictable_now(&self, id: usize) -> bool {
        self.entries
            .get(id)
            .is_some_and(|e| e.live && e.pins == 0 && e.readers == 0 && !e.draining)
    }

    /// A segment of another class whose blocks can all be evicted now, with
    /// the fewest live blocks.
    fn pick_reclaim(&self, slot_bytes: usize) -> Option<Vec<usize>> {
        let mut best: Option<(u32, Vec<usize>)> = None;
        for (seg, seg_slot_bytes, live) in self.arena.foreign_segments(slot_bytes) {
            if best.as_ref().is_some_and(|(n, _)| *n <= live) {
                continue;
            }
            let mut owners = Vec::with_capacity(live as usize);
            let mut ok = true;
            for index in 0..self.arena.slots_per_segment(seg_slot_bytes) {
                if let Some(&id) = self.slot_owner.get(&SlotRef {
                    segment: seg,
                    index,
                }) {
                    if self.evictable_now(id) {
                        owners.push(id);
                    } else {
                        ok = false;
                        break;
                    }
                }
            }
            // Slots without an owner but counted live are reserved by writers.
            if ok && owners.len() as u32 == live {
                best = Some((live, owners));
            }
        }
        best.map(|(_, owners)| owners)
    }

    /// A free slot of `len` bytes, evicting as needed; `None` if nothing can go.
    fn reserve(
        &mut self,
        len: usize,
        events: &mut Vec<PendingEvent>,
        counters: &TierCounters,
        sink: Option<(&Region, &dyn EvictionSink)>,
    ) -> Option<SlotRef> {
        loop {
            if let Some(slot) = self.arena.alloc(len) {
                return Some(slot);
            }
            let victims = choose_victims(self, len)?;
            for id in victims {
                if let (Some((region, sink)), Some(e)) = (sink, self.entries.get(id)) {
                    // SAFETY: victims have no readers, and their slot is not
                    // reused before `unlink` below, under this same lock.
                    let payload = unsafe { region.slice(self.arena.offset(e.slot), e.len) };
                    sink.evicted(Victim {
                        namespace: &e.ns,
                        key: &e.key,
                        parent: e.parent.as_ref(),
                        checksum: e.checksum,
                        payload,
                    });
                }
                if let Some(ev) = self.unlink(id, EventKind::Evicted) {
                    TierCounters::add(&counters.evictions, 1);
                    events.push(ev);
                }
            }
        }
    }

    /// Every block of the segment holding `id`, if all of them can be evicted now.
    fn reclaimable_segment_of(&self, id: usize) -> Option<Vec<usize>> {
        let e = self.entries.get(id)?;
        let segment = e.slot.segment;
        let mut owners = Vec::new();
        for index in 0..self.arena.slots_per_segment(e.len) {
            if let Some(&owner) = self.slot_owner.get(&SlotRef { segment, index }) {
                if !self.evictable_now(owner) {
                    return None;
                }
                owners.push(owner);
            }
        }
        // Slots counted live without an owner are reserved by writers.
        (owners.len() as u32 == self.arena.segment_live(segment)).then_some(owners)
    }

    pub(crate) fn meta_of(&self, e: &Entry) -> BlockMeta {
        BlockMeta {
            namespace: e.ns,
            key: e.key,
            parent: e.parent,
            tier: self.kind,
            payload_bytes: e.len as u64,
            children: self.child_count.get(&(e.ns, e.key)).copied().unwrap_or(0),
            pins: e.pins,
            idle_ms: e.last_access.elapsed().as_millis() as u64,
            checksum: e.checksum,
        }
    }

    pub(crate) fn block_meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<BlockMeta> {
        let id = *self.index.get(&(*ns, *key))?;
        self.entries.get(id).map(|e| self.meta_of(e))
    }

    /// [`Tier::remove`] under the lock: the outcome and the event to publish.
    pub(crate) fn remove(
        &mut self,
        ns: &NamespaceId,
        key: &BlockKey,
        reason: RemoveReason,
    ) -> (RemoveOutcome, Option<PendingEvent>) {
        let Some(&id) = self.index.get(&(*ns, *key)) else {
            return (RemoveOutcome::Missing, None);
        };
        let pinned = self.entries.get(id).is_some_and(|e| e.pins > 0);
        if pinned && reason == RemoveReason::Evict {
            return (RemoveOutcome::Pinned, None);
        }
        let kind = match reason {
            RemoveReason::Evict => EventKind::Evicted,
            RemoveReason::Delete => EventKind::Deleted,
        };
        (RemoveOutcome::Removed, self.unlink(id, kind))
    }

    /// [`Tier::pin`] under the lock.
    pub(crate) fn pin(
        &mut self,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Result<Vec<PinToken>, usize> {
        let mut ids = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match self.index.get(&(*ns, *k)) {
                Some(&id) => ids.push(id),
                None => return Err(i),
            }
        }
        let mut tokens = Vec::with_capacity(ids.len());
        for id in ids {
            self.set_remove(id);
            let mut newly_pinned = false;
            if let Some(e) = self.entries.get_mut(id) {
                e.pins += 1;
                newly_pinned = e.pins == 1;
                tokens.push(PinToken {
                    namespace: e.ns,
                    key: e.key,
                    tier: self.kind,
                    incarnation: e.incarnation,
                });
            }
            if newly_pinned {
                self.pinned_blocks += 1;
            }
        }
        Ok(tokens)
    }

    /// [`Tier::unpin`] under the lock.
    pub(crate) fn unpin(&mut self, token: &PinToken) {
        let Some(&id) = self.index.get(&(token.namespace, token.key)) else {
            return;
        };
        let mut now_free = false;
        if let Some(e) = self.entries.get_mut(id) {
            if e.incarnation != token.incarnation || e.pins == 0 {
                return;
            }
            e.pins -= 1;
            now_free = e.pins == 0;
        }
        if now_free {
            self.pinned_blocks -= 1;
            self.set_insert(id);
        }
    }

    /// [`Tier::list`] under the lock.
    pub(crate) fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        let mut out = Vec::new();
        let end = self.entries.capacity();
        let mut pos = cursor as usize;
        while pos < end {
            if out.len() >= limit {
                return (out, Some(pos as u64));
            }
            if let Some(e) = self.entries.get(pos)
                && e.live
                && ns.is_none_or(|n| *n == e.ns)
            {
                out.push(self.meta_of(e));
            }
            pos += 1;
        }
        (out, None)
    }

    /// [`Tier::keys_of`] under the lock.
    pub(crate) fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey> {
        self.index
            .keys()
            .filter(|(n, _)| n == ns)
            .map(|(_, k)| *k)
            .collect()
    }
}

impl Evictable for SlotIndex {
    fn sets(&self) -> &LruSets {
        &self.sets
    }

    fn idle(&self, id: usize) -> bool {
        self.entries
            .get(id)
            .is_some_and(|e| e.readers == 0 && !e.draining)
    }

    /// Every segment holds slots up to the segment size: any class fits.
    fn whole_segment_of(&self, id: usize, _class: usize) -> Option<Vec<usize>> {
        self.reclaimable_segment_of(id)
    }

    fn any_reclaimable_segment(&self, class: usize) -> Option<Vec<usize>> {
        self.pick_reclaim(class)
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

impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }

    fn max_block_bytes(&self) -> u64 {
        self.max_slot_bytes() as u64
    }

    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome {
        let Some(mut slot) = self.reserve(payload.len()) else {
            return PutOutcome::NoSpace;
        };
        slot.as_mut_slice().copy_from_slice(payload);
        match self.publish(slot, ns, key, parent, None) {
            Ok(_) => PutOutcome::Stored,
            Err(_) => PutOutcome::NoSpace,
        }
    }

    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes> {
        let inner = &self.inner;
        let found = {
            let mut meta = inner.meta.lock();
            match meta.index.get(&(*ns, *key)).copied() {
                Some(id) => {
                    meta.touch(id);
                    let slot_len = meta.entries.get_mut(id).map(|e| {
                        e.readers += 1;
                        (e.slot, e.len)
                    });
                    slot_len.map(|(slot, len)| (id, meta.arena.offset(slot), len))
                }
                None => None,
            }
        };
        match found {
            Some((id, offset, len)) => {
                TierCounters::add(&inner.counters.hits, 1);
                TierCounters::add(&inner.counters.bytes_out, len as u64);
                Some(Bytes::from_owner(ReadGuard {
                    inner: Arc::clone(inner),
                    id,
                    offset,
                    len,
                }))
            }
            None => {
                TierCounters::add(&inner.counters.misses, 1);
                None
            }
        }
    }

    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.inner.meta.lock().index.contains_key(&(*ns, *key))
    }

    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome {
        let inner = &self.inner;
        let (outcome, event) = inner.meta.lock().remove(ns, key, reason);
        if outcome == RemoveOutcome::Removed && reason == RemoveReason::Evict {
            TierCounters::add(&inner.counters.evictions, 1);
        }
        inner.events.publish(event);
        outcome
    }

    fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        self.inner.meta.lock().pin(ns, keys)
    }

    fn unpin(&self, token: &PinToken) {
        self.inner.meta.lock().unpin(token)
    }

    fn meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<BlockMeta> {
        self.inner.meta.lock().block_meta(ns, key)
    }

    fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        self.inner.meta.lock().list(ns, cursor, limit)
    }

    fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey> {
        self.inner.meta.lock().keys_of(ns)
    }

    fn stats(&self) -> TierStats {
        let meta = self.inner.meta.lock();
        let mut s = TierStats {
            capacity_bytes: self.inner.capacity,
            used_bytes: meta.arena.used_bytes(),
            blocks: meta.index.len() as u64,
            pinned_blocks: meta.pinned_blocks,
            ..TierStats::default()
        };
        drop(meta);
        self.inner.counters.fill(&mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> NamespaceId {
        NamespaceId([7; 16])
    }

    fn key(s: &str) -> BlockKey {
        BlockKey::new("key", s.as_bytes()).unwrap()
    }

    fn tier(blocks: u64, block: u64) -> HostTier {
        let cfg = HostTierConfig {
            capacity_bytes: blocks * block,
            segment_bytes: 64 << 20,
        };
        HostTier::new(&cfg, Arc::new(EventBus::new(1024))).unwrap()
    }

    fn payload(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
    }

    #[test]
    fn round_trip_and_replace() {
        let t = tier(4, 4096);
        assert_eq!(
            t.put(&ns(), &key("a"), None, &payload(1, 4096)),
            PutOutcome::Stored
        );
        assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &payload(1, 4096)[..]);
        assert_eq!(
            t.put(&ns(), &key("a"), None, &payload(2, 4096)),
            PutOutcome::Stored
        );
        assert_eq!(&t.get(&ns(), &key("a")).unwrap()[..], &payload(2, 4096)[..]);
        assert_eq!(t.stats().blocks, 1);
        assert_eq!(t.stats().used_bytes, 4096);
    }

    #[test]
    fn leaves_go_before_parents() {
        let t = tier(3, 4096);
        t.put(&ns(), &key("p"), None, &payload(1, 4096));
        t.put(&ns(), &key("c1"), Some(&key("p")), &payload(2, 4096));
        t.put(&ns(), &key("x"), None, &payload(3, 4096));
        // p is the oldest but has a cached child: c1 (oldest leaf) goes first.
        t.put(&ns(), &key("y"), None, &payload(4, 4096));
        assert!(t.contains(&ns(), &key("p")));
        assert!(!t.contains(&ns(), &key("c1")));
        // Now p is a leaf again and the least recently used one.
        t.put(&ns(), &key("z"), None, &payload(5, 4096));
        assert!(!t.contains(&ns(), &key("p")));
        assert!(t.contains(&ns(), &key("x")));
    }

    #[test]
    fn readers_keep_bytes_stable() {
        let t = tier(1, 4096);
        t.put(&ns(), &key("a"), None, &payload(1, 4096));
        let held = t.get(&ns(), &key("a")).unwrap();
        // The only slot is being read: nothing can be evicted.
        assert_eq!(
            t.put(&ns(), &key("b"), None, &payload(2, 4096)),
            PutOutcome::NoSpace
        );
        assert_eq!(&held[..], &payload(1, 4096)[..]);
        drop(held);
        assert_eq!(
            t.put(&ns(), &key("b"), None, &payload(2, 4096)),
            PutOutcome::Stored
        );
        assert_eq!(t.stats().used_bytes, 4096);
    }

    #[test]
    fn deleted_while_read_frees_after_reader() {
        let t = tier(2, 4096);
        t.put(&ns(), &key("a"), None, &payload(1, 4096));
        let held = t.get(&ns(), &key("a")).unwrap();
        assert_eq!(
            t.remove(&ns(), &key("a"), RemoveReason::Delete),
            RemoveOutcome::Removed
        );
        assert!(t.get(&ns(), &key("a")).is_none());
        assert_eq!(t.stats().used_bytes, 4096);
        assert_eq!(&held[..], &payload(1, 4096)[..]);
        drop(held);
        assert_eq!(t.stats().used_bytes, 0);
    }

    #[test]
    fn pins_survive_pressure_and_unpin_by_incarnation() {
        let t = tier(2, 4096);
        t.put(&ns(), &key("a"), None, &payload(1, 4096));
        let tokens = t.pin(&ns(), &[key("a")]).unwrap();
        for i in 0..10 {
            t.put(&ns(), &key(&format!("k{i}")), None, &payload(i, 4096));
        }
        assert!(t.contains(&ns(), &key("a")));
        assert_eq!(t.pin(&ns(), &[key("a"), key("nope")]), Err(1));
        t.unpin(&tokens[0]);
        assert_eq!(t.stats().pinned_blocks, 0);
        t.put(&ns(), &key("m"), None, &payload(9, 4096));
        t.put(&ns(), &key("n"), None, &payload(9, 4096));
        assert!(!t.contains(&ns(), &key("a")));
    }

    #[test]
    fn capacity_follows_recency_across_block_sizes() {
        // 8 segments of 64 KiB. The small class fills everything first.
        let cfg = HostTierConfig {
            capacity_bytes: 8 * 65536,
            segment_bytes: 65536,
        };
        let t = HostTier::new(&cfg, Arc::new(EventBus::new(4096))).unwrap();
        for i in 0..128 {
            assert_eq!(
                t.put(&ns(), &key(&format!("s{i}")), None, &payload(1, 4096)),
                PutOutcome::Stored
            );
        }
        // A stream of big blocks must be able to use most of the tier, not one segment.
        let other = NamespaceId([9; 16]);
        for i in 0..40 {
            assert_eq!(
                t.put(&other, &key(&format!("b{i}")), None, &payload(2, 32768)),
                PutOutcome::Stored
            );
        }
        let big_cached = (0..40)
            .filter(|i| t.contains(&other, &key(&format!("b{i}"))))
            .count();
        assert!(
            big_cached >= 14,
            "only {big_cached} of the last 40 big blocks cached"
        );
        assert!(t.stats().used_bytes <= 8 * 65536);
    }

    #[test]
    fn other_class_segment_is_reclaimed() {
        let cfg = HostTierConfig {
            capacity_bytes: 4 * 8192,
            segment_bytes: 8192,
        };
        let t = HostTier::new(&cfg, Arc::new(EventBus::new(64))).unwrap();
        for i in 0..8 {
            assert_eq!(
                t.put(&ns(), &key(&format!("s{i}")), None, &payload(i, 4096)),
                PutOutcome::Stored
            );
        }
        let other = NamespaceId([9; 16]);
        assert_eq!(
            t.put(&other, &key("big"), None, &payload(1, 8192)),
            PutOutcome::Stored
        );
        assert_eq!(
            &t.get(&other, &key("big")).unwrap()[..],
            &payload(1, 8192)[..]
        );
        assert!(t.stats().used_bytes <= 4 * 8192);
        assert_eq!(t.stats().blocks, 7);
    }
}
