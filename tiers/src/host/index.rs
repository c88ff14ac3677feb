//! The block index of a slot-arena tier ([`SlotIndex`]), shared by the host
//! and HBM tiers: which block lives in which slot, LRU order, prefix
//! structure (child counts), pins, readers, and blocks on their way out.
//! It lives under the owning tier's metadata lock; nothing here moves bytes.

use std::time::Instant;

// foldhash (hashbrown's default hasher, seeded per process) instead of
// SipHash: the maps are asked once or more per block of every read and
// write, and their keys are block hashes and slot numbers.
use hashbrown::HashMap;
use slab::Slab;

use super::IndexKey;
use crate::arena::{SlabArena, SlabCost, SlotRef};
use crate::events::{EventKind, PendingEvent};
use crate::eviction::{Evictable, LruSets, choose_victims};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::table::{BlockTable, PinState};
use crate::tier::{BlockMeta, TierCounters, TierKind};

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
    /// Its bytes are on their way out of the slot (an HBM demotion's copy,
    /// or a host eviction being handed on): it is no eviction candidate, and
    /// its slot is not freed until that is done.
    pub(crate) draining: bool,
    pub(crate) incarnation: u64,
    /// Which eviction set it is filed in under `tick`: `Some(true)` the
    /// leaves, `Some(false)` the inner blocks, `None` neither (pinned,
    /// draining or gone). Kept by `set_insert` / `set_remove` only.
    listed: Option<bool>,
}

/// The block index of a slot-arena tier (host and HBM): which block lives in
/// which slot, LRU order, prefix structure, pins and readers. Lives under the
/// tier's metadata lock.
pub(crate) struct SlotIndex {
    pub(crate) kind: TierKind,
    pub(crate) arena: SlabArena,
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

/// What [`SlotIndex::reserve`] found.
#[derive(Debug)]
pub(crate) enum Reservation {
    /// A free slot, now the caller's.
    Slot(SlotRef),
    /// No free slot: these blocks were chosen to make room and are leaving
    /// (still indexed and readable, no eviction candidates, their slots
    /// held). Hand them on, [`SlotIndex::finish_leaving`] them, reserve again.
    Leaving(Vec<usize>),
    /// Nothing can go: everything is pinned, being read or leaving.
    Full,
}

impl SlotIndex {
    /// An empty index over `arena`; incarnations start at `first_incarnation`
    /// (tiers of one kind use disjoint ranges, so a pin token of one never
    /// matches a block of another).
    pub(crate) fn new(arena: SlabArena, kind: TierKind, first_incarnation: u64) -> Self {
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

    /// Files the block in its eviction set if it is a candidate (live,
    /// unpinned, not draining), as a leaf or an inner block.
    pub(crate) fn set_insert(&mut self, id: usize) {
        self.set_remove(id);
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if !e.live || e.pins > 0 || e.draining {
            return;
        }
        let leaf = self.is_leaf(&e.ns, &e.key);
        let (class, tick) = (e.len, e.tick);
        self.sets.insert(class, tick, id, leaf);
        if let Some(e) = self.entries.get_mut(id) {
            e.listed = Some(leaf);
        }
    }

    /// Checks that the eviction sets hold exactly the candidates (live,
    /// unpinned, not draining), each once, in the set its child count says,
    /// under its tick (tests).
    #[cfg(test)]
    pub(crate) fn check_sets(&self) {
        let mut listed = 0;
        for (id, e) in self.entries.iter() {
            let candidate = e.live && e.pins == 0 && !e.draining;
            assert_eq!(e.listed.is_some(), candidate, "entry {id}: {e:?}");
            if let Some(leaf) = e.listed {
                listed += 1;
                assert_eq!(leaf, self.is_leaf(&e.ns, &e.key), "entry {id}: leaf");
                assert_eq!(self.sets.filed(e.len, e.tick, leaf), Some(id), "entry {id}");
            }
        }
        assert_eq!(self.sets.len(), listed, "the sets hold only listed entries");
    }

    /// Takes the block out of its eviction set, if it is filed in one.
    pub(crate) fn set_remove(&mut self, id: usize) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        if let Some(leaf) = e.listed.take() {
            self.sets.remove_from(e.len, e.tick, leaf);
        }
    }

    pub(crate) fn touch(&mut self, id: usize) {
        self.touch_at(id, Instant::now());
    }

    /// [`SlotIndex::touch`] with the clock read once by the caller (one
    /// reading for a whole batch of reads).
    ///
    /// A block filed in an eviction set moves to its newest end in the same
    /// set (a touch changes its recency, not whether it is a leaf); one that
    /// is not is filed if it has become a candidate.
    pub(crate) fn touch_at(&mut self, id: usize, now: Instant) {
        self.tick += 1;
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        let (old, listed) = (e.tick, e.listed);
        e.tick = tick;
        e.last_access = now;
        let (slot, class) = (e.slot, e.len);
        self.arena.note_use(slot, tick);
        match listed {
            Some(leaf) => self.sets.retick(class, old, tick, id, leaf),
            None => self.set_insert(id),
        }
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
            listed: None,
        };
        let id = self.entries.insert(entry);
        self.arena.note_use(slot, self.tick);
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

    /// What emptying a slab costs (its newest block's tick, its bytes), or
    /// `None` if one of its slots is pinned, read, leaving or reserved by a
    /// writer.
    fn slab_cost(&self, slab: u32) -> Option<SlabCost> {
        let (_, slots, live) = self.arena.slab_info(slab)?;
        let mut cost = SlabCost {
            newest: 0,
            bytes: 0,
        };
        let mut owned = 0;
        for index in 0..slots {
            if let Some(&id) = self.slot_owner.get(&SlotRef {
                segment: slab,
                index,
            }) {
                if !self.evictable_now(id) {
                    return None;
                }
                let e = self.entries.get(id)?;
                cost.newest = cost.newest.max(e.tick);
                cost.bytes += e.len as u64;
                owned += 1;
            }
        }
        // Slots counted live without an owner are reserved by writers.
        (owned == live).then_some(cost)
    }

    /// Every block of the slabs `reclaim` chose.
    fn owners_of(&self, slabs: &[u32]) -> Vec<usize> {
        let mut owners = Vec::new();
        for &slab in slabs {
            let slots = self.arena.slab_info(slab).map_or(0, |(_, n, _)| n);
            owners.extend((0..slots).filter_map(|index| {
                self.slot_owner.get(&SlotRef {
                    segment: slab,
                    index,
                })
            }));
        }
        owners
    }

    /// The blocks to evict so that a slot of `class` fits, when no free
    /// extent holds one and another class holds the least recently used
    /// block: the slabs of the window whose newest block is oldest
    /// ([`SlabArena::reclaim`]), unless the class's own least recently used
    /// idle block is older than that (then that block alone). Either way,
    /// the newest block evicted is as old as it can be.
    fn make_room(&self, class: usize) -> Option<Vec<usize>> {
        let own = self
            .sets
            .victim(class, |id| self.idle(id))
            .and_then(|id| Some((self.entries.get(id)?.tick, id)));
        // Older than every slab's newest use: no window can beat it (the
        // usual case once classes have settled; saves the O(slabs) search).
        if let Some((tick, id)) = own
            && self
                .arena
                .oldest_slab_use()
                .is_none_or(|oldest| tick < oldest)
        {
            return Some(vec![id]);
        }
        let window = self.arena.reclaim(class, |slab| self.slab_cost(slab));
        match (window, own) {
            (Some((cost, _)), Some((tick, id))) if tick < cost.newest => Some(vec![id]),
            (Some((_, slabs)), _) => Some(self.owners_of(&slabs)),
            (None, Some((_, id))) => Some(vec![id]),
            (None, None) => None,
        }
    }

    /// A free slot of `len` bytes, evicting as needed (see [`Reservation`]).
    /// With `hand_on`, victims are not unlinked here: they are marked
    /// leaving and returned, for the caller to hand on with the lock
    /// released; without, they leave at once.
    pub(crate) fn reserve(
        &mut self,
        len: usize,
        events: &mut Vec<PendingEvent>,
        counters: &TierCounters,
        hand_on: bool,
    ) -> Reservation {
        loop {
            if let Some(slot) = self.arena.alloc(len) {
                return Reservation::Slot(slot);
            }
            let Some(victims) = choose_victims(self, len) else {
                return Reservation::Full;
            };
            if hand_on {
                for &id in &victims {
                    self.set_remove(id);
                    if let Some(e) = self.entries.get_mut(id) {
                        e.draining = true;
                    }
                }
                return Reservation::Leaving(victims);
            }
            for id in victims {
                self.evict(id, events, counters);
            }
        }
    }

    /// Ends the leave of blocks [`SlotIndex::reserve`] returned, once they
    /// have been handed on: each leaves the index (an eviction), unless it
    /// was pinned meanwhile (it stays, a candidate again).
    pub(crate) fn finish_leaving(
        &mut self,
        ids: &[usize],
        events: &mut Vec<PendingEvent>,
        counters: &TierCounters,
    ) {
        for &id in ids {
            let Some(e) = self.entries.get_mut(id) else {
                continue;
            };
            e.draining = false;
            let (live, pinned) = (e.live, e.pins > 0);
            if !live {
                self.release_if_unused(id);
            } else if pinned {
                self.set_insert(id);
            } else {
                self.evict(id, events, counters);
            }
        }
    }

    /// Whether the block stored under the key is on its way out (see
    /// [`Entry::draining`]).
    pub(crate) fn is_leaving(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.index
            .get(&(*ns, *key))
            .and_then(|&id| self.entries.get(id))
            .is_some_and(|e| e.draining)
    }

    /// Unlinks a victim of pressure: an `Evicted` event and the count.
    fn evict(&mut self, id: usize, events: &mut Vec<PendingEvent>, counters: &TierCounters) {
        if let Some(ev) = self.unlink(id, EventKind::Evicted) {
            TierCounters::add(&counters.evictions, 1);
            events.push(ev);
        }
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

    /// [`Tier::keys_of`] under the lock.
    pub(crate) fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey> {
        self.index
            .keys()
            .filter(|(n, _)| n == ns)
            .map(|(_, k)| *k)
            .collect()
    }
}

/// Pins, removes, listings and stats are the shared ones (`table.rs`).
impl BlockTable for SlotIndex {
    fn tier_kind(&self) -> TierKind {
        self.kind
    }

    fn lookup(&self, ns: &NamespaceId, key: &BlockKey) -> Option<usize> {
        self.index.get(&(*ns, *key)).copied()
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
        SlotIndex::set_insert(self, id);
    }

    fn set_remove(&mut self, id: usize) {
        SlotIndex::set_remove(self, id);
    }

    fn pinned_blocks_mut(&mut self) -> &mut u64 {
        &mut self.pinned_blocks
    }

    fn unlink(&mut self, id: usize, kind: EventKind) -> Option<PendingEvent> {
        SlotIndex::unlink(self, id, kind)
    }

    fn slab_end(&self) -> usize {
        self.entries.capacity()
    }

    fn listed(&self, pos: usize, ns: Option<&NamespaceId>) -> Option<BlockMeta> {
        let e = self.entries.get(pos)?;
        (e.live && ns.is_none_or(|n| *n == e.ns)).then(|| self.meta_of(e))
    }

    fn used_bytes(&self) -> u64 {
        self.arena.used_bytes()
    }

    fn blocks(&self) -> u64 {
        self.index.len() as u64
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

    /// Another class holds the least recently used leaf: room by
    /// [`SlotIndex::make_room`] (a window of slabs, or the class's own
    /// oldest block if that is older).
    fn whole_segment_of(&self, _id: usize, class: usize) -> Option<Vec<usize>> {
        self.make_room(class)
    }

    fn any_reclaimable_segment(&self, class: usize) -> Option<Vec<usize>> {
        self.make_room(class)
    }
}
