//! [`SlabArena`]: per-class slabs carved from free space anywhere in the memory (host and HBM tiers).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use super::{SEGMENT_ALIGN, SlotRef};

/// A slab aims at no more than `1 / SLAB_DIVISOR` of the region (see [`SlabArena`]).
pub const SLAB_DIVISOR: usize = 256;
/// ... and at no more than `1 / (SLABS_PER_CLASS × classes)` of it, so the
/// partly used slabs of all classes together hold at most about
/// `1 / SLABS_PER_CLASS` of the region, however many classes there are.
pub const SLABS_PER_CLASS: usize = 8;

#[derive(Debug)]
struct SlabState {
    start: usize,
    /// Bytes carved for the slab: its slots, rounded up to [`SEGMENT_ALIGN`].
    len: usize,
    slot_bytes: usize,
    slots: u32,
    /// Free slots, lowest first.
    free: BinaryHeap<Reverse<u32>>,
    live: u32,
    /// Newest LRU tick noted for one of its blocks ([`SlabArena::note_use`]).
    newest: u64,
    /// Its key in `by_newest`: `newest` when last brought up to date.
    ranked: u64,
}

/// What emptying one slab would cost, for [`SlabArena::reclaim`]: the most
/// recent use among its blocks and their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlabCost {
    pub newest: u64,
    pub bytes: u64,
}

/// Size-classed slot allocator over one region, in slabs sized per class.
///
/// A class (one slot size) takes a **slab** when it has no free slot: a run
/// of the region holding `n` slots, where `n × slot` is about the *target*,
/// the region / max([`SLAB_DIVISOR`], [`SLABS_PER_CLASS`] × classes in use)
/// (at most the largest block), and at least one slot (and, for a slot size
/// that is no multiple of 4 KiB, enough slots that rounding the slab up to
/// 4 KiB wastes less than an eighth of it). Slabs start on 4 KiB boundaries
/// and are carved from the smallest free extent that holds a whole one;
/// when none does, from the smallest that holds one slot (a shorter slab),
/// so the region fills up before anything must be evicted. A slab whose
/// last slot is freed gives its bytes back at once, merged with the free
/// extents around it.
///
/// So any number of classes share the region: each holds at most one
/// partly used slab at a time, and those hold about 1/[`SLABS_PER_CLASS`]
/// of the region at most, not a fixed segment per class. To make room for
/// a class that finds no free extent large enough, [`SlabArena::reclaim`]
/// names the slabs to empty: a window of one slab's length chosen by the
/// blocks' recency.
///
/// Within a class the lowest free slot of the lowest partly used slab goes
/// first, and fresh slabs come from the lowest address among equal fits, so
/// blocks allocated together lie side by side whenever the arena allows.
#[derive(Debug)]
pub struct SlabArena {
    len: usize,
    max_slot_bytes: usize,
    slabs: slab::Slab<SlabState>,
    /// Slab start → slab id.
    by_addr: BTreeMap<usize, u32>,
    /// Free extents: start → length, and (length, start).
    free_by_addr: BTreeMap<usize, usize>,
    free_by_len: BTreeSet<(usize, usize)>,
    /// Per slot size: slabs with a free slot, as (start, id).
    partial: HashMap<usize, BTreeSet<(usize, u32)>>,
    /// Slabs per slot size.
    class_slabs: HashMap<usize, u32>,
    /// Slabs by their newest use as last brought up to date (never newer
    /// than it), as (ranked, id); the first is made exact when an `alloc`
    /// fails, so updating a use is O(1).
    by_newest: BTreeSet<(u64, u32)>,
    used_bytes: u64,
}

impl SlabArena {
    /// An arena over `capacity` bytes (aligned down to 4 KiB when it can be)
    /// holding slots of at most about `max_slot_hint` bytes: exactly the
    /// largest slot a [`SlotArena`] with that segment hint takes, so the
    /// largest block a tier accepts does not depend on the allocator.
    /// Returns the arena and the region length it needs.
    pub fn new(capacity: u64, max_slot_hint: u64) -> (Self, usize) {
        let capacity = capacity.clamp(1, usize::MAX as u64) as usize;
        let mut len = capacity;
        if len >= SEGMENT_ALIGN {
            len -= len % SEGMENT_ALIGN;
        }
        let hint = (max_slot_hint.clamp(1, capacity as u64)) as usize;
        let count = (capacity / hint).max(1);
        let mut max_slot_bytes = capacity / count;
        if max_slot_bytes >= SEGMENT_ALIGN {
            max_slot_bytes -= max_slot_bytes % SEGMENT_ALIGN;
        }
        let max_slot_bytes = max_slot_bytes.min(len);
        let mut arena = SlabArena {
            len,
            max_slot_bytes,
            slabs: slab::Slab::new(),
            by_addr: BTreeMap::new(),
            free_by_addr: BTreeMap::new(),
            free_by_len: BTreeSet::new(),
            partial: HashMap::new(),
            class_slabs: HashMap::new(),
            by_newest: BTreeSet::new(),
            used_bytes: 0,
        };
        arena.insert_free(0, len);
        (arena, len)
    }

    /// Largest slot the arena can hold.
    pub fn max_slot_bytes(&self) -> usize {
        self.max_slot_bytes
    }

    /// Bytes in slots that are reserved, live or still being read.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Bytes carved into slabs (used or not).
    pub fn slab_bytes(&self) -> u64 {
        (self.len - self.free_by_addr.values().sum::<usize>()) as u64
    }

    /// Number of slabs.
    pub fn slab_count(&self) -> usize {
        self.slabs.len()
    }

    /// Byte offset of a slot in the region.
    pub fn offset(&self, slot: SlotRef) -> usize {
        let slab = &self.slabs[slot.segment as usize];
        slab.start + slot.index as usize * slab.slot_bytes
    }

    /// Length of the slab a class takes when the free space allows.
    fn slab_len(&self, slot_bytes: usize) -> usize {
        let classes =
            self.class_slabs.len() + usize::from(!self.class_slabs.contains_key(&slot_bytes));
        let target =
            (self.len / SLAB_DIVISOR.max(SLABS_PER_CLASS * classes)).min(self.max_slot_bytes);
        let mut n = (target / slot_bytes).max(1);
        if !slot_bytes.is_multiple_of(SEGMENT_ALIGN) {
            n = n.max((8 * SEGMENT_ALIGN).div_ceil(slot_bytes));
        }
        (n * slot_bytes)
            .next_multiple_of(SEGMENT_ALIGN)
            .min(self.len)
    }

    fn insert_free(&mut self, start: usize, len: usize) {
        if len > 0 {
            self.free_by_addr.insert(start, len);
            self.free_by_len.insert((len, start));
        }
    }

    fn remove_free(&mut self, start: usize) -> usize {
        let len = self.free_by_addr.remove(&start).unwrap_or(0);
        self.free_by_len.remove(&(len, start));
        len
    }

    /// Gives `[start, start + len)` back, merged with free neighbours.
    fn release_extent(&mut self, mut start: usize, mut len: usize) {
        if let Some((&s, &l)) = self.free_by_addr.range(..start).next_back()
            && s + l == start
        {
            self.remove_free(s);
            start = s;
            len += l;
        }
        if self.free_by_addr.contains_key(&(start + len)) {
            len += self.remove_free(start + len);
        }
        self.insert_free(start, len);
    }

    /// Carves a slab for `slot_bytes` from free space (see the type docs).
    fn new_slab(&mut self, slot_bytes: usize) -> Option<u32> {
        let want = self.slab_len(slot_bytes);
        let &(extent, start) = self
            .free_by_len
            .range((want, 0)..)
            .next()
            .or_else(|| self.free_by_len.range((slot_bytes, 0)..).next())?;
        let len = if extent >= want {
            want
        } else {
            (extent / slot_bytes * slot_bytes)
                .next_multiple_of(SEGMENT_ALIGN)
                .min(extent)
        };
        self.remove_free(start);
        self.insert_free(start + len, extent - len);
        let slots = (len / slot_bytes) as u32;
        let id = self.slabs.insert(SlabState {
            start,
            len,
            slot_bytes,
            slots,
            free: (0..slots).map(Reverse).collect(),
            live: 0,
            newest: 0,
            ranked: 0,
        }) as u32;
        self.by_addr.insert(start, id);
        *self.class_slabs.entry(slot_bytes).or_default() += 1;
        self.by_newest.insert((0, id));
        self.partial
            .entry(slot_bytes)
            .or_default()
            .insert((start, id));
        Some(id)
    }

    /// Takes a free slot of `slot_bytes`, carving a new slab if the class
    /// has none free. `None` when the class is full and no free extent
    /// holds a slot.
    pub fn alloc(&mut self, slot_bytes: usize) -> Option<SlotRef> {
        if slot_bytes == 0 || slot_bytes > self.max_slot_bytes {
            return None;
        }
        let id = match self
            .partial
            .get(&slot_bytes)
            .and_then(|p| p.first().map(|&(_, id)| id))
        {
            Some(id) => id,
            None => match self.new_slab(slot_bytes) {
                Some(id) => id,
                None => {
                    // Eviction comes next: rank for it.
                    self.rank_oldest();
                    return None;
                }
            },
        };
        let slab = self.slabs.get_mut(id as usize)?;
        let Reverse(index) = slab.free.pop()?;
        slab.live += 1;
        if slab.free.is_empty() {
            let start = slab.start;
            if let Some(p) = self.partial.get_mut(&slot_bytes) {
                p.remove(&(start, id));
                if p.is_empty() {
                    self.partial.remove(&slot_bytes);
                }
            }
        }
        self.used_bytes += slot_bytes as u64;
        Some(SlotRef { segment: id, index })
    }

    /// Returns a slot; a slab whose last slot is freed gives its bytes back.
    pub fn free(&mut self, slot: SlotRef) {
        let id = slot.segment;
        let Some(slab) = self.slabs.get_mut(id as usize) else {
            debug_assert!(false, "free of a slot of no slab: {slot:?}");
            return;
        };
        debug_assert!(slab.live > 0 && slot.index < slab.slots);
        slab.free.push(Reverse(slot.index));
        slab.live -= 1;
        let (start, len, slot_bytes) = (slab.start, slab.len, slab.slot_bytes);
        self.used_bytes -= slot_bytes as u64;
        if slab.live == 0 {
            let gone = self.slabs.remove(id as usize);
            self.by_newest.remove(&(gone.ranked, id));
            self.by_addr.remove(&start);
            if let Some(n) = self.class_slabs.get_mut(&slot_bytes) {
                *n -= 1;
                if *n == 0 {
                    self.class_slabs.remove(&slot_bytes);
                }
            }
            if let Some(p) = self.partial.get_mut(&slot_bytes) {
                p.remove(&(start, id));
                if p.is_empty() {
                    self.partial.remove(&slot_bytes);
                }
            }
            self.release_extent(start, len);
        } else {
            self.partial
                .entry(slot_bytes)
                .or_default()
                .insert((start, id));
        }
    }

    /// Records a use of a slot's block at LRU tick `tick`: its slab's newest
    /// use, by which [`SlabArena::reclaim`] ranks windows. (A slab's value
    /// only grows while the slab lives, so it may be newer than its blocks
    /// are once its newest block is gone.)
    pub fn note_use(&mut self, slot: SlotRef, tick: u64) {
        if let Some(s) = self.slabs.get_mut(slot.segment as usize) {
            s.newest = s.newest.max(tick);
        }
    }

    /// The oldest newest use of any slab ([`SlabArena::note_use`]), as of
    /// the last failed [`SlabArena::alloc`]: no window [`SlabArena::reclaim`]
    /// ranks can have an older one. O(1).
    pub fn oldest_slab_use(&self) -> Option<u64> {
        self.by_newest.first().map(|&(newest, _)| newest)
    }

    /// Brings the first of `by_newest` up to date (amortized O(log s) per
    /// use noted since).
    fn rank_oldest(&mut self) {
        while let Some(&(ranked, id)) = self.by_newest.first() {
            let Some(s) = self.slabs.get_mut(id as usize) else {
                self.by_newest.pop_first();
                continue;
            };
            if s.newest == ranked {
                break;
            }
            s.ranked = s.newest;
            self.by_newest.pop_first();
            self.by_newest.insert((s.newest, id));
        }
    }

    /// Slot size, slot count and slots reserved, live or being read of a slab.
    pub fn slab_info(&self, slab: u32) -> Option<(usize, u32, u32)> {
        self.slabs
            .get(slab as usize)
            .map(|s| (s.slot_bytes, s.slots, s.live))
    }

    /// The slabs to empty so that a slab of `slot_bytes` fits, and what
    /// that costs: those overlapping a window of that slab's length, the
    /// window whose newest use ([`SlabArena::note_use`]) is oldest among
    /// those that can be emptied now. `cost` tells what emptying a slab
    /// costs, or `None` when it cannot be emptied now. `None` when no window
    /// can be emptied.
    ///
    /// O(s log s) in the slabs and free extents (a sliding-window maximum
    /// over the region, the windows sorted by it), plus `cost` of the slabs
    /// of the windows tried: the first that can be emptied, usually.
    pub fn reclaim(
        &self,
        slot_bytes: usize,
        mut cost: impl FnMut(u32) -> Option<SlabCost>,
    ) -> Option<(SlabCost, Vec<u32>)> {
        if slot_bytes == 0 || slot_bytes > self.max_slot_bytes {
            return None;
        }
        let width = self.slab_len(slot_bytes);
        // The region's tiles in address order: (start, len, slab or None).
        let mut tiles: Vec<(usize, usize, Option<u32>)> =
            Vec::with_capacity(self.by_addr.len() + self.free_by_addr.len());
        let mut slabs = self.by_addr.iter().peekable();
        let mut free = self.free_by_addr.iter().peekable();
        loop {
            let slab_first = match (slabs.peek(), free.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((s, _)), Some((f, _))) => s < f,
            };
            if slab_first {
                if let Some((&s, &id)) = slabs.next() {
                    tiles.push((s, self.slabs[id as usize].len, Some(id)));
                }
            } else if let Some((&f, &l)) = free.next() {
                tiles.push((f, l, None));
            }
        }
        let newest = |t: usize| tiles[t].2.map_or(0, |id| self.slabs[id as usize].newest);
        // Window starts: every tile's start, and every tile's end less the
        // width (each window is then a run of whole tiles at one end).
        let mut starts: Vec<usize> = tiles
            .iter()
            .flat_map(|&(s, l, _)| [Some(s), (s + l).checked_sub(width)])
            .flatten()
            .filter(|&s| s + width <= self.len)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        // Sliding maximum: tiles [first, last] overlap [s, s + width).
        let mut windows: Vec<(u64, usize, usize)> = Vec::with_capacity(starts.len());
        let mut deque = std::collections::VecDeque::new();
        let (mut first, mut next) = (0, 0);
        for s in starts {
            while tiles[first].0 + tiles[first].1 <= s {
                first += 1;
            }
            while next < tiles.len() && tiles[next].0 < s + width {
                while deque.back().is_some_and(|&b| newest(b) <= newest(next)) {
                    deque.pop_back();
                }
                deque.push_back(next);
                next += 1;
            }
            while deque.front().is_some_and(|&f| f < first) {
                deque.pop_front();
            }
            let max = deque.front().map_or(0, |&f| newest(f));
            windows.push((max, first, next));
        }
        let mut memo: HashMap<u32, Option<SlabCost>> = HashMap::new();
        let mut try_window = |first: usize, next: usize| {
            let mut total = SlabCost {
                newest: 0,
                bytes: 0,
            };
            let mut ids = Vec::new();
            for &(_, _, id) in &tiles[first..next] {
                let Some(id) = id else { continue };
                let c = (*memo.entry(id).or_insert_with(|| cost(id)))?;
                total.newest = total.newest.max(c.newest);
                total.bytes += c.bytes;
                ids.push(id);
            }
            Some((total, ids))
        };
        // Usually the best ranked window can be emptied: find it in one pass.
        let &(_, first, next) = windows.iter().min()?;
        if let Some(found) = try_window(first, next) {
            return Some(found);
        }
        windows.sort_unstable();
        windows
            .into_iter()
            .find_map(|(_, first, next)| try_window(first, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::SlotArena;

    fn slab_start(a: &SlabArena, slot: SlotRef) -> usize {
        a.offset(SlotRef {
            segment: slot.segment,
            index: 0,
        })
    }

    #[test]
    fn slab_arena_fills_then_refuses_then_reuses() {
        let (mut a, len) = SlabArena::new(10 * 4096, 64 << 20);
        assert_eq!((len, a.max_slot_bytes()), (10 * 4096, 10 * 4096));
        let slots: Vec<_> = (0..10).map(|_| a.alloc(4096).unwrap()).collect();
        assert!(a.alloc(4096).is_none());
        assert_eq!(a.used_bytes(), 10 * 4096);
        let mut offs: Vec<_> = slots.iter().map(|s| a.offset(*s)).collect();
        assert!(offs.windows(2).all(|w| w[1] == w[0] + 4096), "{offs:?}");
        offs.sort();
        offs.dedup();
        assert_eq!(offs.len(), 10, "slots overlap");
        a.free(slots[3]);
        let again = a.alloc(4096).unwrap();
        assert_eq!(a.offset(again), offs[3]);
        assert!(a.alloc(0).is_none() && a.alloc(10 * 4096 + 1).is_none());
    }

    #[test]
    fn slab_arena_keeps_the_largest_slot_of_the_segment_arena() {
        for (cap, hint) in [
            (100_000, 30_000),
            (4 * 8192, 8192),
            (1 << 20, 64 << 20),
            (3000, 1),
        ] {
            let (seg, _) = SlotArena::new(cap, hint);
            let (slab, len) = SlabArena::new(cap, hint);
            assert_eq!(slab.max_slot_bytes(), seg.max_slot_bytes(), "{cap} {hint}");
            assert!(len as u64 <= cap && len >= slab.max_slot_bytes());
        }
    }

    #[test]
    fn many_classes_fill_the_region_before_one_is_refused() {
        // 60 classes in 8 MiB: far more classes than 64 KiB... slabs of a
        // fixed size would allow. Every class gets room until the region is full.
        let (mut a, len) = SlabArena::new(8 << 20, 1 << 20);
        let sizes: Vec<usize> = (0..60).map(|k| 4096 * (1 + k % 12) + 512 * k).collect();
        let mut held = Vec::new();
        let mut first_refusal = None;
        'fill: for round in 0.. {
            let mut any = false;
            for &s in &sizes {
                match a.alloc(s) {
                    Some(slot) => {
                        held.push((slot, s));
                        any = true;
                    }
                    None => {
                        first_refusal.get_or_insert(a.used_bytes());
                    }
                }
            }
            if !any || round > 10_000 {
                break 'fill;
            }
        }
        let first = first_refusal.unwrap() as f64 / len as f64;
        assert!(first >= 0.85, "first refusal at {:.1}% used", first * 100.0);
        let mut spans: Vec<_> = held.iter().map(|&(s, l)| (a.offset(s), l)).collect();
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "slots overlap"
        );
        assert!(spans.last().is_some_and(|&(o, l)| o + l <= len));
        // Everything freed: one free extent again, the largest slot fits.
        for (slot, _) in held {
            a.free(slot);
        }
        assert_eq!((a.used_bytes(), a.slab_bytes(), a.slab_count()), (0, 0, 0));
        assert!(a.alloc(1 << 20).is_some());
    }

    #[test]
    fn a_fragment_too_small_for_a_whole_slab_takes_a_shorter_one() {
        // 16 MiB: 256 slabs of 64 KiB of 4 KiB slots.
        let (mut a, len) = SlabArena::new(16 << 20, 256 << 10);
        let small: Vec<_> = (0..4096).map(|_| a.alloc(4096).unwrap()).collect();
        assert_eq!(a.slab_count(), 256);
        assert!(a.alloc(4096).is_none());
        let first: Vec<_> = small
            .into_iter()
            .filter(|s| slab_start(&a, *s) == 0)
            .collect();
        for s in first {
            a.free(s);
        }
        assert_eq!(a.slab_count(), 255);
        // A 40 KiB block takes a one-slot slab at 0, leaving 24 KiB free.
        let big = a.alloc(40960).unwrap();
        assert_eq!(a.offset(big), 0);
        // A 12 KiB class would take a 60 KiB slab; the 24 KiB left hold two.
        let mid: Vec<_> = (0..3).map(|_| a.alloc(12288)).collect();
        let offs: Vec<_> = mid.iter().flatten().map(|s| a.offset(*s)).collect();
        assert_eq!(offs, vec![40960, 40960 + 12288]);
        assert!(mid[2].is_none());
        assert_eq!(a.used_bytes() as usize, len - 65536 + 40960 + 24576);
    }

    #[test]
    fn reclaim_takes_the_window_whose_newest_use_is_oldest() {
        // 256 slabs of 64 KiB (4 KiB slots); the first four last used at
        // ticks 10, 40, 20, 30, the others later.
        let (mut a, _) = SlabArena::new(16 << 20, 256 << 10);
        let slots: Vec<_> = (0..4096).map(|_| a.alloc(4096).unwrap()).collect();
        let mut at = std::collections::HashMap::new();
        for i in 0..256 {
            let tick = [10, 40, 20, 30].get(i).copied().unwrap_or(100 + i as u64);
            let slot = slots[i * 16];
            assert_eq!(slab_start(&a, slot), i * 65536);
            a.note_use(slot, tick);
            a.note_use(slots[i * 16 + 1], 5);
            at.insert(slot.segment, (i, tick));
        }
        let cost = |busy: Option<usize>| {
            let at = &at;
            move |slab: u32| {
                let (i, newest) = at[&slab];
                (Some(i) != busy).then_some(SlabCost {
                    newest,
                    bytes: 65536,
                })
            }
        };
        let order = |ids: Vec<u32>| ids.iter().map(|id| at[id].0).collect::<Vec<_>>();
        // A 64 KiB slab of 8 KiB slots: the oldest slab alone.
        let (c, ids) = a.reclaim(8192, cost(None)).unwrap();
        assert_eq!((order(ids), c.newest), (vec![0], 10));
        // The oldest is busy (pinned, read, reserved): the next oldest.
        let (c, ids) = a.reclaim(8192, cost(Some(0))).unwrap();
        assert_eq!((order(ids), c.newest), (vec![2], 20));
        // A 128 KiB block needs two neighbours: slabs 2 and 3 are older
        // together (newest 30) than 0 and 1 or 1 and 2 (40).
        let (c, ids) = a.reclaim(131072, cost(None)).unwrap();
        assert_eq!((order(ids), c.newest, c.bytes), (vec![2, 3], 30, 131072));
        // Emptied, they give a free extent that holds it.
        let emptied: Vec<_> = slots
            .into_iter()
            .filter(|s| (131072..262144).contains(&slab_start(&a, *s)))
            .collect();
        for s in emptied {
            a.free(s);
        }
        let big = a.alloc(131072).unwrap();
        assert_eq!(a.offset(big), 131072);
        assert!(a.reclaim(1 << 20, cost(None)).is_none());
    }
}
