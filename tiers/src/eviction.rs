//! The eviction policy both the host and the disk tier follow: prefix-aware
//! LRU per size class, with capacity following recency across classes.
//!
//! [`LruSets`] holds a tier's eviction candidates (live, unpinned blocks) per
//! size class, ordered by the LRU tick of their last access, leaves apart
//! from inner blocks (blocks some cached block names as parent). A tier keeps
//! it in step with its entries; [`choose_victims`] then decides what goes
//! when a class has no free slot:
//!
//! 1. the least recently used leaf of the whole tier, if it is of the class
//!    that needs room;
//! 2. else the whole segment of that leaf, if every block in it can go now
//!    (so a segment changes class and capacity follows recency);
//! 3. else the class's own least recently used leaf, then inner block;
//! 4. else any segment of another class that can be emptied now.
//!
//! Blocks being read are skipped (the `idle` predicate); pinned blocks are
//! never in the sets.
//!
//! Steps 2 and 4 are the tier's answer ([`Evictable::whole_segment_of`],
//! [`Evictable::any_reclaimable_segment`]): the disk tier's fixed segments
//! give the whole segment; the host and HBM tiers' slab arena gives the
//! slabs of the window of arena whose newest block is oldest, or the class's
//! own oldest block if that is older still (`SlotIndex::make_room`).

use std::collections::BTreeMap;

// foldhash (hashbrown's default), not SipHash: asked once or more per block read.
use hashbrown::HashMap;

#[derive(Debug, Default)]
struct ClassSets {
    leaves: BTreeMap<u64, usize>,
    inner: BTreeMap<u64, usize>,
}

/// Eviction candidates per size class, by LRU tick. Ids are the tier's entry ids.
#[derive(Debug, Default)]
pub(crate) struct LruSets {
    classes: HashMap<usize, ClassSets>,
}

impl LruSets {
    pub(crate) fn insert(&mut self, class: usize, tick: u64, id: usize, leaf: bool) {
        let sets = self.classes.entry(class).or_default();
        if leaf {
            sets.leaves.insert(tick, id);
        } else {
            sets.inner.insert(tick, id);
        }
    }

    pub(crate) fn remove(&mut self, class: usize, tick: u64) {
        if let Some(sets) = self.classes.get_mut(&class) {
            sets.leaves.remove(&tick);
            sets.inner.remove(&tick);
        }
    }

    /// [`LruSets::remove`] from the one set the caller knows it is in.
    pub(crate) fn remove_from(&mut self, class: usize, tick: u64, leaf: bool) {
        if let Some(sets) = self.classes.get_mut(&class) {
            match leaf {
                true => sets.leaves.remove(&tick),
                false => sets.inner.remove(&tick),
            };
        }
    }

    /// Moves `id` from `old` to `new` within one set (a read's touch).
    pub(crate) fn retick(&mut self, class: usize, old: u64, new: u64, id: usize, leaf: bool) {
        let sets = self.classes.entry(class).or_default();
        let set = match leaf {
            true => &mut sets.leaves,
            false => &mut sets.inner,
        };
        set.remove(&old);
        set.insert(new, id);
    }

    /// Whether `id` is filed under `tick` in the class's leaves (`leaf`) or
    /// inner blocks, and how many blocks all sets hold (tests).
    #[cfg(test)]
    pub(crate) fn filed(&self, class: usize, tick: u64, leaf: bool) -> Option<usize> {
        let sets = self.classes.get(&class)?;
        match leaf {
            true => sets.leaves.get(&tick).copied(),
            false => sets.inner.get(&tick).copied(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.classes
            .values()
            .map(|s| s.leaves.len() + s.inner.len())
            .sum()
    }

    /// Replaces a class's sets with ones built from `(tick, id)` lists sorted
    /// by tick (O(n), for start-up).
    pub(crate) fn load_sorted(
        &mut self,
        class: usize,
        leaves: Vec<(u64, usize)>,
        inner: Vec<(u64, usize)>,
    ) {
        self.classes.insert(
            class,
            ClassSets {
                leaves: leaves.into_iter().collect(),
                inner: inner.into_iter().collect(),
            },
        );
    }

    /// The least recently used idle block of a class: leaves first.
    pub(crate) fn victim(&self, class: usize, idle: impl Fn(usize) -> bool) -> Option<usize> {
        let sets = self.classes.get(&class)?;
        sets.leaves
            .values()
            .find(|id| idle(**id))
            .or_else(|| sets.inner.values().find(|id| idle(**id)))
            .copied()
    }

    /// The least recently used idle leaf over every class, with its class.
    pub(crate) fn oldest_leaf(&self, idle: impl Fn(usize) -> bool) -> Option<(usize, usize)> {
        let mut best: Option<(u64, usize, usize)> = None;
        for (class, sets) in &self.classes {
            let first = sets.leaves.iter().find(|(_, id)| idle(**id));
            if let Some((tick, id)) = first
                && best.is_none_or(|(t, _, _)| *tick < t)
            {
                best = Some((*tick, *class, *id));
            }
        }
        best.map(|(_, class, id)| (class, id))
    }
}

/// What a tier must answer for [`choose_victims`].
pub(crate) trait Evictable {
    fn sets(&self) -> &LruSets;
    /// Nobody is reading the block.
    fn idle(&self, id: usize) -> bool;
    /// Every block of the segment holding `id`, if all can go now and the
    /// freed segment can take a slot of `class`.
    fn whole_segment_of(&self, id: usize, class: usize) -> Option<Vec<usize>>;
    /// A segment of another class than `class` that can be emptied now.
    fn any_reclaimable_segment(&self, class: usize) -> Option<Vec<usize>>;
}

/// The blocks to evict to make room for a slot of `class` (see the module
/// docs for the order); `None` if nothing can go.
pub(crate) fn choose_victims(tier: &impl Evictable, class: usize) -> Option<Vec<usize>> {
    let own_class = || {
        tier.sets()
            .victim(class, |id| tier.idle(id))
            .map(|v| vec![v])
            .or_else(|| tier.any_reclaimable_segment(class))
    };
    let victims = match tier.sets().oldest_leaf(|id| tier.idle(id)) {
        Some((c, id)) if c == class => vec![id],
        Some((_, id)) => tier.whole_segment_of(id, class).or_else(own_class)?,
        None => own_class()?,
    };
    (!victims.is_empty()).then_some(victims)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        sets: LruSets,
        busy: Vec<usize>,
    }

    impl Evictable for Fake {
        fn sets(&self) -> &LruSets {
            &self.sets
        }
        fn idle(&self, id: usize) -> bool {
            !self.busy.contains(&id)
        }
        fn whole_segment_of(&self, id: usize, _class: usize) -> Option<Vec<usize>> {
            (id != 99).then(|| vec![id, id + 100])
        }
        fn any_reclaimable_segment(&self, _class: usize) -> Option<Vec<usize>> {
            Some(vec![7])
        }
    }

    #[test]
    fn order_of_choice() {
        let mut f = Fake {
            sets: LruSets::default(),
            busy: vec![],
        };
        f.sets.insert(8, 5, 1, true);
        f.sets.insert(8, 2, 2, false);
        f.sets.insert(16, 3, 3, true);
        // Oldest leaf (tick 3, class 16) is of the class asking: it goes alone.
        assert_eq!(choose_victims(&f, 16), Some(vec![3]));
        // Asked for class 8: the oldest leaf is of class 16, its segment goes.
        assert_eq!(choose_victims(&f, 8), Some(vec![3, 103]));
        // Leaf 3 is being read: the oldest idle leaf is 1, of class 8.
        f.busy = vec![3];
        assert_eq!(choose_victims(&f, 8), Some(vec![1]));
        // Leaves before inner blocks within a class.
        assert_eq!(f.sets.victim(8, |_| true), Some(1));
        f.sets.remove(8, 5);
        assert_eq!(f.sets.victim(8, |_| true), Some(2));
        // Nothing in the class: another class's segment.
        assert_eq!(choose_victims(&f, 32), Some(vec![7]));
    }
}
