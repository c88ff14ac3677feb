//! The block-table operations the slot tiers share: [`BlockTable`] is what
//! the host and HBM tiers' `SlotIndex` (`host/index.rs`) and the disk
//! tier's `Meta` (`disk/meta.rs`) have in common — a slab of entries found
//! by key, each with pins and an incarnation, kept in LRU candidate sets —
//! and its provided methods are the one copy of the [`Tier`](crate::Tier)
//! operations that need nothing else: pin, unpin, remove, list and stats.
//! Each tier calls them under its own metadata lock; what differs (how a
//! key is found, what an entry records, how blocks leave) stays with the
//! tier's table.

use crate::events::{EventBus, EventKind, PendingEvent};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{
    BlockMeta, PinToken, RemoveOutcome, RemoveReason, TierCounters, TierKind, TierStats,
};

/// One entry's pin state, borrowed from its table.
pub(crate) struct PinState<'a> {
    pub(crate) ns: NamespaceId,
    pub(crate) key: BlockKey,
    pub(crate) incarnation: u64,
    pub(crate) pins: &'a mut u32,
}

/// A slot tier's block table (see the module docs). Ids are slab positions.
pub(crate) trait BlockTable {
    /// The tier the table belongs to (pin tokens carry it).
    fn tier_kind(&self) -> TierKind;

    /// The id of the live block stored under the key.
    fn lookup(&self, ns: &NamespaceId, key: &BlockKey) -> Option<usize>;

    /// Entry `id`'s pin state.
    fn pin_state(&mut self, id: usize) -> Option<PinState<'_>>;

    /// Puts entry `id` into the eviction candidates (if it may be one).
    fn set_insert(&mut self, id: usize);

    /// Takes entry `id` out of the eviction candidates.
    fn set_remove(&mut self, id: usize);

    /// Blocks with at least one pin.
    fn pinned_blocks_mut(&mut self) -> &mut u64;

    /// Takes a block out of the table; the event to publish.
    fn unlink(&mut self, id: usize, kind: EventKind) -> Option<PendingEvent>;

    /// One past the highest slab position (where a listing ends).
    fn slab_end(&self) -> usize;

    /// The metadata of the live block at slab position `pos`, if there is
    /// one and it is in `ns` (any namespace with `None`).
    fn listed(&self, pos: usize, ns: Option<&NamespaceId>) -> Option<BlockMeta>;

    /// Payload bytes of the slots in use.
    fn used_bytes(&self) -> u64;

    /// Live blocks.
    fn blocks(&self) -> u64;

    /// [`Tier::pin`](crate::Tier::pin) under the lock: every key or none
    /// (`Err` with the position of the first missing key).
    fn pin(&mut self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        let mut ids = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match self.lookup(ns, k) {
                Some(id) => ids.push(id),
                None => return Err(i),
            }
        }
        let tier = self.tier_kind();
        let mut tokens = Vec::with_capacity(ids.len());
        for id in ids {
            self.set_remove(id);
            let Some(e) = self.pin_state(id) else {
                continue;
            };
            *e.pins += 1;
            let newly_pinned = *e.pins == 1;
            tokens.push(PinToken {
                namespace: e.ns,
                key: e.key,
                tier,
                incarnation: e.incarnation,
            });
            if newly_pinned {
                *self.pinned_blocks_mut() += 1;
            }
        }
        Ok(tokens)
    }

    /// [`Tier::unpin`](crate::Tier::unpin) under the lock: a token of
    /// another incarnation (the block was replaced) does nothing.
    fn unpin(&mut self, token: &PinToken) {
        let Some(id) = self.lookup(&token.namespace, &token.key) else {
            return;
        };
        let Some(e) = self.pin_state(id) else {
            return;
        };
        if e.incarnation != token.incarnation || *e.pins == 0 {
            return;
        }
        *e.pins -= 1;
        if *e.pins == 0 {
            *self.pinned_blocks_mut() -= 1;
            self.set_insert(id);
        }
    }

    /// [`Tier::remove`](crate::Tier::remove) under the lock: the outcome and
    /// the event to publish ([`finish_remove`] does both).
    fn remove(
        &mut self,
        ns: &NamespaceId,
        key: &BlockKey,
        reason: RemoveReason,
    ) -> (RemoveOutcome, Option<PendingEvent>) {
        let Some(id) = self.lookup(ns, key) else {
            return (RemoveOutcome::Missing, None);
        };
        let pinned = self.pin_state(id).is_some_and(|e| *e.pins > 0);
        if pinned && reason == RemoveReason::Evict {
            return (RemoveOutcome::Pinned, None);
        }
        let kind = match reason {
            RemoveReason::Evict => EventKind::Evicted,
            RemoveReason::Delete => EventKind::Deleted,
        };
        (RemoveOutcome::Removed, self.unlink(id, kind))
    }

    /// [`Tier::list`](crate::Tier::list) under the lock: up to `limit` blocks
    /// from slab position `cursor`, and where the next page starts.
    fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        let mut out = Vec::new();
        let end = self.slab_end();
        let mut pos = cursor as usize;
        while pos < end {
            if out.len() >= limit {
                return (out, Some(pos as u64));
            }
            out.extend(self.listed(pos, ns));
            pos += 1;
        }
        (out, None)
    }

    /// [`Tier::stats`](crate::Tier::stats) under the lock, for a tier of
    /// `capacity_bytes` counting in `counters`.
    fn stats(&mut self, capacity_bytes: u64, counters: &TierCounters) -> TierStats {
        let mut s = TierStats {
            capacity_bytes,
            used_bytes: self.used_bytes(),
            blocks: self.blocks(),
            pinned_blocks: *self.pinned_blocks_mut(),
            ..TierStats::default()
        };
        counters.fill(&mut s);
        s
    }
}

/// After [`BlockTable::remove`], with the lock released: counts an
/// eviction, publishes the event, and hands the outcome on.
pub(crate) fn finish_remove(
    (outcome, event): (RemoveOutcome, Option<PendingEvent>),
    reason: RemoveReason,
    counters: &TierCounters,
    events: &EventBus,
) -> RemoveOutcome {
    if outcome == RemoveOutcome::Removed && reason == RemoveReason::Evict {
        TierCounters::add(&counters.evictions, 1);
    }
    events.publish(event);
    outcome
}
