//! [`SlotArena`]: fixed-size segments, each assigned whole to one size class (the disk tier).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use super::{SEGMENT_ALIGN, SlotRef};

#[derive(Debug, Default)]
struct Segment {
    /// Slot size of the class this segment serves; 0 while unassigned.
    slot_bytes: usize,
    /// Free slots, lowest first.
    free: BinaryHeap<Reverse<u32>>,
    live: u32,
}

#[derive(Debug, Default)]
struct Class {
    /// Segments of this class that have at least one free slot.
    partial: BTreeSet<u32>,
    segments: u32,
}

/// Size-classed slot allocator over a region of `segments * segment_bytes`.
#[derive(Debug)]
pub struct SlotArena {
    segment_bytes: usize,
    segments: Vec<Segment>,
    /// Unassigned segments, lowest first.
    free_segments: BinaryHeap<Reverse<u32>>,
    classes: HashMap<usize, Class>,
    used_bytes: u64,
}

impl SlotArena {
    /// Lays out `capacity` bytes as segments of about `segment_hint` bytes
    /// (at least one segment; segment size aligned down to 4 KiB when it can be).
    /// Returns the arena and the region length it needs.
    pub fn new(capacity: u64, segment_hint: u64) -> (Self, usize) {
        let capacity = capacity.max(1);
        let hint = segment_hint.clamp(1, capacity);
        let count = (capacity / hint).clamp(1, u32::MAX as u64);
        let mut segment_bytes = (capacity / count) as usize;
        if segment_bytes >= SEGMENT_ALIGN {
            segment_bytes -= segment_bytes % SEGMENT_ALIGN;
        }
        let segments = (0..count).map(|_| Segment::default()).collect();
        let free_segments = (0..count as u32).map(Reverse).collect();
        let arena = SlotArena {
            segment_bytes,
            segments,
            free_segments,
            classes: HashMap::new(),
            used_bytes: 0,
        };
        (arena, segment_bytes * count as usize)
    }

    /// Largest slot the arena can hold (one whole segment).
    pub fn max_slot_bytes(&self) -> usize {
        self.segment_bytes
    }

    /// Bytes in slots that are reserved, live or still being read.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Byte offset of a slot in the region.
    pub fn offset(&self, slot: SlotRef) -> usize {
        let seg = &self.segments[slot.segment as usize];
        slot.segment as usize * self.segment_bytes + slot.index as usize * seg.slot_bytes
    }

    /// Takes a free slot of `slot_bytes`, assigning a free segment to the class
    /// if needed. The lowest free slot of the lowest partial segment goes
    /// first (and the lowest free segment), so blocks allocated together lie
    /// side by side whenever the arena allows, and their copies between
    /// tiers coalesce into long runs. `None` when the class is full and no segment is free.
    pub fn alloc(&mut self, slot_bytes: usize) -> Option<SlotRef> {
        if slot_bytes == 0 || slot_bytes > self.segment_bytes {
            return None;
        }
        let seg_id = match self
            .classes
            .get(&slot_bytes)
            .and_then(|c| c.partial.first().copied())
        {
            Some(s) => s,
            None => {
                let Reverse(s) = self.free_segments.pop()?;
                let seg = &mut self.segments[s as usize];
                let n = (self.segment_bytes / slot_bytes) as u32;
                seg.slot_bytes = slot_bytes;
                seg.free = (0..n).map(Reverse).collect();
                seg.live = 0;
                let class = self.classes.entry(slot_bytes).or_default();
                class.partial.insert(s);
                class.segments += 1;
                s
            }
        };
        let seg = &mut self.segments[seg_id as usize];
        let Reverse(index) = seg.free.pop()?;
        seg.live += 1;
        if seg.free.is_empty()
            && let Some(class) = self.classes.get_mut(&slot_bytes)
        {
            class.partial.remove(&seg_id);
        }
        self.used_bytes += slot_bytes as u64;
        Some(SlotRef {
            segment: seg_id,
            index,
        })
    }

    /// Returns a slot; a segment whose last slot is freed goes back to the pool.
    pub fn free(&mut self, slot: SlotRef) {
        let seg = &mut self.segments[slot.segment as usize];
        let slot_bytes = seg.slot_bytes;
        debug_assert!(slot_bytes > 0 && seg.live > 0);
        seg.free.push(Reverse(slot.index));
        seg.live -= 1;
        self.used_bytes -= slot_bytes as u64;
        let now_empty = seg.live == 0;
        if now_empty {
            seg.free = BinaryHeap::new();
            seg.slot_bytes = 0;
            self.free_segments.push(Reverse(slot.segment));
        }
        if let Some(class) = self.classes.get_mut(&slot_bytes) {
            if now_empty {
                class.partial.remove(&slot.segment);
                class.segments -= 1;
                if class.segments == 0 {
                    self.classes.remove(&slot_bytes);
                }
            } else {
                class.partial.insert(slot.segment);
            }
        }
    }

    /// Segments assigned to a class other than `slot_bytes`, with their slot
    /// size and live count (candidates for reclaiming room for that class).
    pub fn foreign_segments(
        &self,
        slot_bytes: usize,
    ) -> impl Iterator<Item = (u32, usize, u32)> + '_ {
        self.segments
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.slot_bytes != 0 && s.slot_bytes != slot_bytes)
            .map(|(i, s)| (i as u32, s.slot_bytes, s.live))
    }

    /// Slots of a segment that are reserved, live or still being read.
    pub fn segment_live(&self, segment: u32) -> u32 {
        self.segments.get(segment as usize).map_or(0, |s| s.live)
    }

    /// Number of slots a segment of this class holds.
    pub fn slots_per_segment(&self, slot_bytes: usize) -> u32 {
        (self.segment_bytes / slot_bytes.max(1)) as u32
    }

    /// Rebuilds the allocation state of a fresh arena from the slots that are
    /// known to be live (the disk tier does this at start-up from its index).
    ///
    /// Items are taken in order, so put the ones to keep first: an item is
    /// rejected when its segment or slot is out of range, its slot size is 0
    /// or larger than a segment, its segment already serves another size
    /// class, or its slot was already claimed by an earlier item. Returns the
    /// positions (in `live`) of the rejected items. An arena that already has
    /// allocations rejects everything. O(items + slots of the claimed segments).
    pub fn restore(&mut self, live: &[(SlotRef, usize)]) -> Vec<usize> {
        if self.used_bytes != 0 || self.free_segments.len() != self.segments.len() {
            return (0..live.len()).collect();
        }
        let mut rejected = Vec::new();
        let mut taken: HashMap<u32, Vec<bool>> = HashMap::new();
        for (pos, &(slot, slot_bytes)) in live.iter().enumerate() {
            let Some(seg) = self.segments.get_mut(slot.segment as usize) else {
                rejected.push(pos);
                continue;
            };
            if slot_bytes == 0 || slot_bytes > self.segment_bytes {
                rejected.push(pos);
                continue;
            }
            let per_segment = self.segment_bytes / slot_bytes;
            if slot.index as usize >= per_segment
                || (seg.slot_bytes != 0 && seg.slot_bytes != slot_bytes)
            {
                rejected.push(pos);
                continue;
            }
            seg.slot_bytes = slot_bytes;
            let bits = taken
                .entry(slot.segment)
                .or_insert_with(|| vec![false; per_segment]);
            if bits[slot.index as usize] {
                rejected.push(pos);
                continue;
            }
            bits[slot.index as usize] = true;
            seg.live += 1;
            self.used_bytes += slot_bytes as u64;
        }
        for (&seg_id, bits) in &taken {
            let seg = &mut self.segments[seg_id as usize];
            seg.free = (0..bits.len() as u32)
                .filter(|&i| !bits[i as usize])
                .map(Reverse)
                .collect();
            let class = self.classes.entry(seg.slot_bytes).or_default();
            class.segments += 1;
            if !seg.free.is_empty() {
                class.partial.insert(seg_id);
            }
        }
        let segments = &self.segments;
        self.free_segments = (0..segments.len() as u32)
            .filter(|&s| segments[s as usize].slot_bytes == 0)
            .map(Reverse)
            .collect();
        rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_then_refuses_then_reuses() {
        let (mut a, len) = SlotArena::new(10 * 4096, 64 << 20);
        assert_eq!(len, 10 * 4096);
        let slots: Vec<_> = (0..10).map(|_| a.alloc(4096).unwrap()).collect();
        assert!(a.alloc(4096).is_none());
        assert_eq!(a.used_bytes(), 10 * 4096);
        let mut offs: Vec<_> = slots.iter().map(|s| a.offset(*s)).collect();
        offs.sort();
        offs.dedup();
        assert_eq!(offs.len(), 10, "slots overlap");
        assert!(offs.iter().all(|o| o + 4096 <= len));
        a.free(slots[3]);
        assert_eq!(a.alloc(4096), Some(slots[3]));
    }

    #[test]
    fn lowest_free_slot_goes_first_so_neighbours_stay_adjacent() {
        let (mut a, _) = SlotArena::new(3 * 8 * 4096, 8 * 4096);
        let slots: Vec<_> = (0..24).map(|_| a.alloc(4096).unwrap()).collect();
        let offs: Vec<_> = slots.iter().map(|s| a.offset(*s)).collect();
        assert!(offs.windows(2).all(|w| w[1] == w[0] + 4096), "{offs:?}");
        // Freed in an arbitrary order, the slots come back lowest first:
        // allocated together, they lie side by side again.
        for i in [5, 1, 17, 3, 2, 16, 4, 18] {
            a.free(slots[i]);
        }
        let again: Vec<_> = (0..8)
            .map(|_| {
                let s = a.alloc(4096).unwrap();
                a.offset(s)
            })
            .collect();
        let want: Vec<_> = [1, 2, 3, 4, 5, 16, 17, 18]
            .iter()
            .map(|&i| offs[i])
            .collect();
        assert_eq!(again, want);
        // Emptied segments return to the pool and are reassigned lowest first.
        for s in &slots[8..24] {
            a.free(*s);
        }
        let next = a.alloc(8192).unwrap();
        assert_eq!(a.offset(next), 8 * 4096);
    }

    #[test]
    fn classes_share_segments() {
        let (mut a, _) = SlotArena::new(4 * 8192, 8192);
        assert_eq!(a.segment_count(), 4);
        let small: Vec<_> = (0..4).map(|_| a.alloc(4096).unwrap()).collect();
        // 4 small slots take two segments; two remain for the big class.
        assert!(a.alloc(8192).is_some());
        assert!(a.alloc(8192).is_some());
        assert!(a.alloc(8192).is_none());
        for s in &small[..2] {
            a.free(*s);
        }
        // One small segment emptied and went back to the pool.
        assert!(a.alloc(8192).is_some());
        assert_eq!(a.foreign_segments(8192).count(), 1);
    }

    #[test]
    fn restore_rebuilds_free_state() {
        let (mut a, _) = SlotArena::new(4 * 8192, 8192);
        let live = [
            (
                SlotRef {
                    segment: 1,
                    index: 0,
                },
                4096,
            ),
            (
                SlotRef {
                    segment: 1,
                    index: 0,
                },
                4096,
            ), // duplicate
            (
                SlotRef {
                    segment: 1,
                    index: 1,
                },
                8192,
            ), // class conflict
            (
                SlotRef {
                    segment: 2,
                    index: 0,
                },
                8192,
            ),
            (
                SlotRef {
                    segment: 9,
                    index: 0,
                },
                8192,
            ), // out of range
            (
                SlotRef {
                    segment: 2,
                    index: 1,
                },
                8192,
            ), // index out of range
        ];
        assert_eq!(a.restore(&live), vec![1, 2, 4, 5]);
        assert_eq!(a.used_bytes(), 4096 + 8192);
        // Segment 1 has one free 4 KiB slot; segments 0 and 3 are free.
        assert_eq!(
            a.alloc(4096),
            Some(SlotRef {
                segment: 1,
                index: 1
            })
        );
        let big: Vec<_> = (0..2).map(|_| a.alloc(8192).unwrap()).collect();
        assert!(big.iter().all(|s| s.segment == 0 || s.segment == 3));
        assert!(a.alloc(8192).is_none());
        a.free(SlotRef {
            segment: 2,
            index: 0,
        });
        assert_eq!(
            a.alloc(8192),
            Some(SlotRef {
                segment: 2,
                index: 0
            })
        );
        // Only a fresh arena can be restored.
        assert_eq!(a.restore(&live[..1]), vec![0]);
    }

    #[test]
    fn oversized_slots_are_refused() {
        let (mut a, _) = SlotArena::new(1 << 20, 1 << 20);
        assert!(a.alloc((1 << 20) + 1).is_none());
        assert!(a.alloc(0).is_none());
    }
}
