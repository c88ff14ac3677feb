//! The disk tier's in-memory state ([`Meta`], behind one lock): the block
//! table (a slab of [`Entry`]s found through [`KeyIndex`]), the slot arenas
//! of the files and which entry owns each slot, child counts for
//! prefix-aware eviction, the LRU sets, sequence numbers, and the index
//! deletions and access times not yet written. Everything here is rebuilt
//! from the index at start-up (see `recover.rs`); the index is written by
//! the read, write and eviction paths after they change this state.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use hashbrown::HashTable;
use parking_lot::Mutex;
use slab::Slab;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::error::DiskError;
use super::index::{IndexBatch, IndexEntry, IndexStore};
use super::now_ms;
use crate::arena::{SlotArena, SlotRef};
use crate::events::{EventKind, PendingEvent};
use crate::eviction::{Evictable, LruSets, choose_victims};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::table::{BlockTable, PinState};
use crate::tier::{BlockMeta, TierCounters, TierKind};

pub(super) type IndexKey = (NamespaceId, BlockKey);
pub(super) type FastMap<K, V> = HashMap<K, V, SeededXxh3>;

/// Keyed xxh3 for the in-memory maps: several times faster than SipHash on
/// 81-byte block keys (start-up inserts a million of them), and seeded per
/// process so that client-chosen keys cannot be aimed at one bucket.
#[derive(Debug, Clone)]
pub(super) struct SeededXxh3 {
    seed: u64,
}

impl SeededXxh3 {
    pub(super) fn random() -> Self {
        SeededXxh3 {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x6b76_7374_7261_7461u64),
        }
    }
}

impl BuildHasher for SeededXxh3 {
    type Hasher = Xxh3Buf;

    fn build_hasher(&self) -> Xxh3Buf {
        Xxh3Buf {
            seed: self.seed,
            acc: 0,
            len: 0,
            buf: [0; 128],
        }
    }
}

const NO_OWNER: usize = usize::MAX;

/// Which entry owns each published slot: per file, per segment, by slot
/// index (dense vectors, grown on first use; no hashing on the data path).
#[derive(Debug, Default)]
pub(super) struct SlotOwners {
    files: Vec<Vec<Vec<usize>>>,
}

impl SlotOwners {
    pub(super) fn for_arenas(arenas: &[SlotArena]) -> Self {
        SlotOwners {
            files: arenas
                .iter()
                .map(|a| vec![Vec::new(); a.segment_count()])
                .collect(),
        }
    }

    fn get(&self, file: u16, slot: SlotRef) -> Option<usize> {
        let v = *self
            .files
            .get(file as usize)?
            .get(slot.segment as usize)?
            .get(slot.index as usize)?;
        (v != NO_OWNER).then_some(v)
    }

    pub(super) fn set(&mut self, file: u16, slot: SlotRef, id: usize) {
        if let Some(v) = self
            .files
            .get_mut(file as usize)
            .and_then(|f| f.get_mut(slot.segment as usize))
        {
            let i = slot.index as usize;
            if v.len() <= i {
                v.resize(i + 1, NO_OWNER);
            }
            v[i] = id;
        }
    }

    fn clear(&mut self, file: u16, slot: SlotRef) {
        if let Some(v) = self
            .files
            .get_mut(file as usize)
            .and_then(|f| f.get_mut(slot.segment as usize))
            .and_then(|s| s.get_mut(slot.index as usize))
        {
            *v = NO_OWNER;
        }
    }
}

/// Buffers the (short) key and hashes it once in `finish`.
pub(super) struct Xxh3Buf {
    seed: u64,
    acc: u64,
    len: usize,
    buf: [u8; 128],
}

/// (namespace, key) → slab id. Buckets hold only (hash, id), 16 bytes a
/// block; keys are compared against the slab entries. Small buckets keep
/// start-up (a million inserts) and lookups cache- and TLB-friendly.
pub(super) struct KeyIndex {
    table: HashTable<(u64, usize)>,
    hasher: SeededXxh3,
}

impl KeyIndex {
    pub(super) fn with_capacity(n: usize, hasher: SeededXxh3) -> Self {
        KeyIndex {
            table: HashTable::with_capacity(n),
            hasher,
        }
    }

    pub(super) fn hash(&self, ns: &NamespaceId, key: &BlockKey) -> u64 {
        self.hasher.hash_one((ns, key))
    }

    fn get(&self, entries: &Slab<Entry>, ns: &NamespaceId, key: &BlockKey) -> Option<usize> {
        let h = self.hash(ns, key);
        self.table
            .find(h, |&(eh, id)| {
                eh == h
                    && entries
                        .get(id)
                        .is_some_and(|e| e.ns == *ns && e.key == *key)
            })
            .map(|&(_, id)| id)
    }

    /// Adds an id whose key is not in the table.
    pub(super) fn insert_new(&mut self, hash: u64, id: usize) {
        self.table.insert_unique(hash, (hash, id), |&(h, _)| h);
    }

    pub(super) fn remove_id(&mut self, hash: u64, id: usize) {
        if let Ok(e) = self.table.find_entry(hash, |&(h, i)| h == hash && i == id) {
            e.remove();
        }
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    pub(super) fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.table.iter().map(|&(_, id)| id)
    }
}

impl Hasher for Xxh3Buf {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.acc = xxh3_64_with_seed(&self.buf[..self.len], self.seed ^ self.acc);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.acc = xxh3_64_with_seed(bytes, self.seed ^ self.acc);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn finish(&self) -> u64 {
        xxh3_64_with_seed(&self.buf[..self.len], self.seed ^ self.acc)
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) ns: NamespaceId,
    pub(super) key: BlockKey,
    /// `KeyIndex::hash` of (ns, key).
    pub(super) hash: u64,
    pub(super) parent: Option<BlockKey>,
    pub(super) file: u16,
    pub(super) slot: SlotRef,
    pub(super) slot_bytes: usize,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) checksum: u64,
    pub(super) seq: u64,
    pub(super) tick: u64,
    pub(super) last_access_ms: u64,
    pub(super) access_dirty: bool,
    pub(super) pins: u32,
    pub(super) readers: u32,
    pub(super) live: bool,
    pub(super) incarnation: u64,
}

impl Entry {
    pub(super) fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            file: self.file,
            segment: self.slot.segment,
            slot: self.slot.index,
            slot_bytes: self.slot_bytes as u32,
            offset: self.offset,
            payload_len: self.len,
            checksum: self.checksum,
            seq: self.seq,
            last_access_ms: self.last_access_ms,
            parent: self.parent,
        }
    }
}

/// Sequence numbers are reserved in the index in steps of this many.
pub(super) const SEQ_STEP: u64 = 1 << 20;

/// The tier's in-memory state, behind one lock (`Inner::meta`).
pub(super) struct Meta {
    pub(super) arenas: Vec<SlotArena>,
    pub(super) entries: Slab<Entry>,
    pub(super) index: KeyIndex,
    /// Cached blocks per parent (by key hash), whether or not the parent is cached.
    pub(super) child_count: FastMap<u64, u32>,
    pub(super) sets: LruSets,
    pub(super) slot_owner: SlotOwners,
    pub(super) tick: u64,
    pub(super) next_incarnation: u64,
    pub(super) pinned_blocks: u64,
    pub(super) next_seq: u64,
    pub(super) seq_watermark: u64,
    pub(super) next_file: usize,
    /// Index deletions not yet written (blocks evicted by a reservation).
    pub(super) pending_deletes: Vec<IndexKey>,
    /// Entries whose access time changed since the last `persist_access`.
    pub(super) dirty_access: Vec<usize>,
}

impl Meta {
    pub(super) fn lookup(&self, ns: &NamespaceId, key: &BlockKey) -> Option<usize> {
        self.index.get(&self.entries, ns, key)
    }

    pub(super) fn children(&self, hash: u64) -> u32 {
        self.child_count.get(&hash).copied().unwrap_or(0)
    }

    pub(super) fn set_insert(&mut self, id: usize) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if !e.live || e.pins > 0 {
            return;
        }
        let leaf = self.children(e.hash) == 0;
        let (tick, slot_bytes) = (e.tick, e.slot_bytes);
        self.sets.insert(slot_bytes, tick, id, leaf);
    }

    pub(super) fn set_remove(&mut self, id: usize) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        let (class, tick) = (e.slot_bytes, e.tick);
        self.sets.remove(class, tick);
    }

    pub(super) fn touch(&mut self, id: usize, now_ms: u64) {
        self.set_remove(id);
        self.tick += 1;
        let tick = self.tick;
        let mut newly_dirty = false;
        if let Some(e) = self.entries.get_mut(id) {
            e.tick = tick;
            e.last_access_ms = now_ms;
            newly_dirty = !e.access_dirty;
            e.access_dirty = true;
        }
        if newly_dirty {
            self.dirty_access.push(id);
        }
        self.set_insert(id);
    }

    fn reclassify(&mut self, ns: &NamespaceId, key: &BlockKey) {
        if let Some(pid) = self.lookup(ns, key) {
            self.set_remove(pid);
            self.set_insert(pid);
        }
    }

    pub(super) fn add_child(&mut self, ns: &NamespaceId, parent: &BlockKey) {
        let c = self
            .child_count
            .entry(self.index.hash(ns, parent))
            .or_insert(0);
        *c += 1;
        if *c == 1 {
            self.reclassify(ns, parent);
        }
    }

    fn remove_child(&mut self, ns: &NamespaceId, parent: &BlockKey) {
        let k = self.index.hash(ns, parent);
        if let Some(c) = self.child_count.get_mut(&k) {
            *c -= 1;
            if *c == 0 {
                self.child_count.remove(&k);
                self.reclassify(ns, parent);
            }
        }
    }

    /// Takes a block out of memory and queues its index deletion. Its slot is
    /// freed now, or by its last reader.
    pub(super) fn unlink(&mut self, id: usize, kind: EventKind) -> Option<PendingEvent> {
        self.set_remove(id);
        let (ns, key, hash, parent, pins) = {
            let e = self.entries.get_mut(id)?;
            if !e.live {
                return None;
            }
            e.live = false;
            (e.ns, e.key, e.hash, e.parent, e.pins)
        };
        if pins > 0 {
            self.pinned_blocks -= 1;
        }
        self.index.remove_id(hash, id);
        self.pending_deletes.push((ns, key));
        if let Some(p) = parent {
            self.remove_child(&ns, &p);
        }
        self.release_if_unused(id);
        Some(PendingEvent {
            kind,
            namespace: ns,
            key,
            parent,
            tier: TierKind::Disk,
        })
    }

    pub(super) fn release_if_unused(&mut self, id: usize) {
        let free = matches!(self.entries.get(id), Some(e) if !e.live && e.readers == 0);
        if free {
            let e = self.entries.remove(id);
            self.slot_owner.clear(e.file, e.slot);
            if let Some(a) = self.arenas.get_mut(e.file as usize) {
                a.free(e.slot);
            }
        }
    }

    /// A segment (of any file) of another class whose blocks can all be
    /// evicted now, with the fewest live blocks.
    fn pick_reclaim(&self, slot_bytes: usize) -> Option<Vec<usize>> {
        let mut best: Option<(u32, Vec<usize>)> = None;
        for (f, arena) in self.arenas.iter().enumerate() {
            // A segment of this file cannot hold the slot at all.
            if arena.max_slot_bytes() < slot_bytes {
                continue;
            }
            for (seg, seg_slot_bytes, live) in arena.foreign_segments(slot_bytes) {
                if best.as_ref().is_some_and(|(n, _)| *n <= live) {
                    continue;
                }
                let mut owners = Vec::with_capacity(live as usize);
                let mut ok = true;
                for index in 0..arena.slots_per_segment(seg_slot_bytes) {
                    if let Some(id) = self.slot_owner.get(
                        f as u16,
                        SlotRef {
                            segment: seg,
                            index,
                        },
                    ) {
                        match self.entries.get(id) {
                            Some(e) if e.live && e.pins == 0 && e.readers == 0 => owners.push(id),
                            _ => {
                                ok = false;
                                break;
                            }
                        }
                    }
                }
                if ok && owners.len() as u32 == live {
                    best = Some((live, owners));
                }
            }
        }
        best.map(|(_, owners)| owners)
    }

    /// A free slot of `slot_bytes`, evicting as needed; `None` if nothing can go.
    pub(super) fn reserve(
        &mut self,
        slot_bytes: usize,
        events: &mut Vec<PendingEvent>,
        counters: &TierCounters,
    ) -> Option<(u16, SlotRef)> {
        loop {
            let n = self.arenas.len();
            for k in 0..n {
                let f = (self.next_file + k) % n;
                if let Some(slot) = self.arenas[f].alloc(slot_bytes) {
                    self.next_file = (f + 1) % n;
                    return Some((f as u16, slot));
                }
            }
            let victims = choose_victims(self, slot_bytes)?;
            for id in victims {
                if let Some(ev) = self.unlink(id, EventKind::Evicted) {
                    TierCounters::add(&counters.evictions, 1);
                    events.push(ev);
                }
            }
        }
    }

    /// Every block of the segment holding `id`, if all of them can be evicted
    /// now and the freed segment can hold a slot of `slot_bytes`.
    fn reclaimable_segment_of(&self, id: usize, slot_bytes: usize) -> Option<Vec<usize>> {
        let e = self.entries.get(id)?;
        let arena = self.arenas.get(e.file as usize)?;
        if arena.max_slot_bytes() < slot_bytes {
            return None;
        }
        let segment = e.slot.segment;
        let mut owners = Vec::new();
        for index in 0..arena.slots_per_segment(e.slot_bytes) {
            if let Some(owner) = self.slot_owner.get(e.file, SlotRef { segment, index }) {
                match self.entries.get(owner) {
                    Some(o) if o.live && o.pins == 0 && o.readers == 0 => owners.push(owner),
                    _ => return None,
                }
            }
        }
        // Slots counted live without an owner are reserved by writers.
        (owners.len() as u32 == arena.segment_live(segment)).then_some(owners)
    }

    pub(super) fn meta_of(&self, e: &Entry, now_ms: u64) -> BlockMeta {
        BlockMeta {
            namespace: e.ns,
            key: e.key,
            parent: e.parent,
            tier: TierKind::Disk,
            payload_bytes: e.len,
            children: self.children(e.hash),
            pins: e.pins,
            idle_ms: now_ms.saturating_sub(e.last_access_ms),
            checksum: e.checksum,
        }
    }

    /// Moves the queued deletions into `batch` (they must precede its puts).
    pub(super) fn drain_deletes(&mut self, batch: &mut IndexBatch) {
        for (ns, key) in self.pending_deletes.drain(..) {
            batch.delete(&ns, &key);
        }
    }
}

/// Pins, removes, listings and stats are the shared ones (`table.rs`).
impl BlockTable for Meta {
    fn tier_kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn lookup(&self, ns: &NamespaceId, key: &BlockKey) -> Option<usize> {
        Meta::lookup(self, ns, key)
    }

    fn pin_state(&mut self, id: usize) -> Option<PinState<'_>> {
        let e = self.entries.get_mut(id)?;
        Some(PinState {
            ns: e.ns,
            key: e.key,
            incarnation: e.incarnation,
            pins: &mut e.pins,
        })
    }

    fn set_insert(&mut self, id: usize) {
        Meta::set_insert(self, id);
    }

    fn set_remove(&mut self, id: usize) {
        Meta::set_remove(self, id);
    }

    fn pinned_blocks_mut(&mut self) -> &mut u64 {
        &mut self.pinned_blocks
    }

    /// Also queues the block's index deletion (`drain_deletes`).
    fn unlink(&mut self, id: usize, kind: EventKind) -> Option<PendingEvent> {
        Meta::unlink(self, id, kind)
    }

    fn slab_end(&self) -> usize {
        self.entries.capacity()
    }

    fn listed(&self, pos: usize, ns: Option<&NamespaceId>) -> Option<BlockMeta> {
        let e = self.entries.get(pos)?;
        (e.live && ns.is_none_or(|n| *n == e.ns)).then(|| self.meta_of(e, now_ms()))
    }

    fn used_bytes(&self) -> u64 {
        self.arenas.iter().map(|a| a.used_bytes()).sum()
    }

    fn blocks(&self) -> u64 {
        self.index.len() as u64
    }
}

impl Evictable for Meta {
    fn sets(&self) -> &LruSets {
        &self.sets
    }

    fn idle(&self, id: usize) -> bool {
        self.entries.get(id).is_some_and(|e| e.readers == 0)
    }

    fn whole_segment_of(&self, id: usize, class: usize) -> Option<Vec<usize>> {
        self.reclaimable_segment_of(id, class)
    }

    fn any_reclaimable_segment(&self, class: usize) -> Option<Vec<usize>> {
        self.pick_reclaim(class)
    }
}

/// Writes the changed access times and the queued deletions to the
/// index; returns the entries written.
pub(super) fn persist_access(meta: &Mutex<Meta>, index: &IndexStore) -> Result<usize, DiskError> {
    let mut meta = meta.lock();
    let mut batch = IndexBatch::default();
    meta.drain_deletes(&mut batch);
    let dirty = std::mem::take(&mut meta.dirty_access);
    let mut n = 0;
    for id in dirty {
        if let Some(e) = meta.entries.get_mut(id)
            && e.access_dirty
        {
            e.access_dirty = false;
            if e.live {
                batch.put(&e.ns, &e.key, &e.index_entry());
                n += 1;
            }
        }
    }
    index.write(batch)?;
    Ok(n)
}
