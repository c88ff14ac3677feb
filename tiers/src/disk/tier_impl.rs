//! The [`Tier`] trait for the disk tier: single-block put and get through
//! the batch paths, and the metadata operations (contains, remove, pin,
//! unpin, meta, list, keys, stats) on the in-memory state, writing index
//! deletions where blocks leave (pin, unpin, remove, list and stats are
//! the shared ones of [`BlockTable`]).

use bytes::Bytes;

use super::index::IndexBatch;
use super::{DiskPut, DiskTier, now_ms};
use crate::error::CacheError;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::table::{BlockTable, finish_remove};
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierCounters,
    TierInspection, TierKind, TierRead, TierStats,
};

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn max_block_bytes(&self) -> u64 {
        self.inner.max_payload
    }

    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome {
        let item = DiskPut {
            key: *key,
            parent: parent.copied(),
            payload,
        };
        self.put_many(ns, &[item])
            .pop()
            .unwrap_or(PutOutcome::NoSpace)
    }

    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes> {
        self.get_many(ns, std::slice::from_ref(key)).pop().flatten()
    }

    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.inner.meta.lock().lookup(ns, key).is_some()
    }

    /// Once the tier is closed, changes nothing and answers `Missing`.
    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome {
        let inner = &self.inner;
        let Some(_open) = self.enter_write("remove") else {
            return RemoveOutcome::Missing;
        };
        let removed = {
            let mut meta = inner.meta.lock();
            let removed = meta.remove(ns, key, reason);
            if removed.0 == RemoveOutcome::Removed {
                let mut batch = IndexBatch::default();
                meta.drain_deletes(&mut batch);
                if let Err(e) = inner.index.write(batch) {
                    tracing::error!(error = %e, "disk tier: index delete failed");
                    TierCounters::add(&inner.disk.io_errors, 1);
                }
            }
            removed
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
        let meta = self.inner.meta.lock();
        let id = meta.lookup(ns, key)?;
        meta.entries.get(id).map(|e| meta.meta_of(e, now_ms()))
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
        let meta = self.inner.meta.lock();
        meta.index
            .ids()
            .filter_map(|id| meta.entries.get(id))
            .filter(|e| e.ns == *ns)
            .map(|e| e.key)
            .collect()
    }

    fn stats(&self) -> TierStats {
        let inner = &self.inner;
        inner.meta.lock().stats(inner.capacity, &inner.counters)
    }

    /// Every miss of the batch in one submission ([`DiskTier::read_many`]),
    /// versioned by the slot's write sequence.
    fn read_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        _block_bytes: u64,
    ) -> Vec<Option<TierRead>> {
        self.read_many(ns, keys)
            .into_iter()
            .map(|r| {
                r.map(|r| TierRead {
                    payload: r.payload,
                    parent: r.parent,
                    version: r.seq,
                })
            })
            .collect()
    }

    /// Every key under one lock.
    fn contains_batch(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let meta = self.inner.meta.lock();
        keys.iter().map(|k| meta.lookup(ns, k).is_some()).collect()
    }

    fn is_current(&self, ns: &NamespaceId, key: &BlockKey, version: u64) -> bool {
        DiskTier::is_current(self, ns, key, version)
    }

    /// What the slot holds now, from its header inspection, without the read
    /// path's verification (which would drop a corrupt slot).
    fn inspect(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<Option<TierInspection>, CacheError> {
        let Some(meta) = Tier::meta(self, ns, key) else {
            return Ok(None);
        };
        Ok(self.inspect_header(ns, key).ok().map(|h| TierInspection {
            meta,
            payload_xxh3: h.payload_xxh3,
        }))
    }
}
