//! The [`Tier`] trait for the host tier: put (reserve, copy, publish), get
//! and its batch form under one lock, and the metadata operations on the
//! block index (pin, unpin, remove, list and stats are the shared ones of
//! [`BlockTable`]). A delete or replacement of a block being handed on waits
//! for it (see the module docs of [`crate::host`]).

use std::sync::Arc;

use bytes::Bytes;

use super::{HostTier, ReadGuard};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::table::{BlockTable, finish_remove};
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierCounters, TierKind,
    TierRead, TierStats,
};

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
        let removed = {
            let mut meta = inner.meta.lock();
            self.wait_handed_on(&mut meta, ns, key);
            meta.remove(ns, key, reason)
        };
        finish_remove(removed, reason, &inner.counters, &inner.events)
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
        let inner = &self.inner;
        inner.meta.lock().stats(inner.capacity, &inner.counters)
    }

    /// Every key under one lock; the bytes borrow their slots.
    fn read_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        _block_bytes: u64,
    ) -> Vec<Option<TierRead>> {
        let found = self.read_locked(ns, keys, |_, e| e.parent);
        let misses = found.iter().filter(|f| f.is_none()).count() as u64;
        TierCounters::add(&self.inner.counters.misses, misses);
        found
            .into_iter()
            .map(|f| f.map(|(payload, parent)| TierRead::unversioned(payload, parent)))
            .collect()
    }

    fn contains_batch(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let meta = self.inner.meta.lock();
        keys.iter()
            .map(|k| meta.index.contains_key(&(*ns, *k)))
            .collect()
    }
}
