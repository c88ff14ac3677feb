//! The [`Tier`] trait for the disk tier: single-block put and get through
//! the batch paths, and the metadata operations (contains, remove, pin,
//! unpin, meta, list, keys, stats) on the in-memory state, writing index
//! deletions where blocks leave.

use bytes::Bytes;

use super::index::IndexBatch;
use super::{DiskPut, DiskTier, now_ms};
use crate::error::CacheError;
use crate::events::EventKind;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
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

    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome {
        let inner = &self.inner;
        let event = {
            let mut meta = inner.meta.lock();
            let Some(id) = meta.lookup(ns, key) else {
                return RemoveOutcome::Missing;
            };
            let pinned = meta.entries.get(id).is_some_and(|e| e.pins > 0);
            if pinned && reason == RemoveReason::Evict {
                return RemoveOutcome::Pinned;
            }
            let kind = match reason {
                RemoveReason::Evict => EventKind::Evicted,
                RemoveReason::Delete => EventKind::Deleted,
            };
            let ev = meta.unlink(id, kind);
            let mut batch = IndexBatch::default();
            meta.drain_deletes(&mut batch);
            if let Err(e) = inner.index.write(batch) {
                tracing::error!(error = %e, "disk tier: index delete failed");
                TierCounters::add(&inner.disk.io_errors, 1);
            }
            ev
        };
        if reason == RemoveReason::Evict {
            TierCounters::add(&inner.counters.evictions, 1);
        }
        inner.events.publish(event);
        RemoveOutcome::Removed
    }

    fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        let mut meta = self.inner.meta.lock();
        let mut ids = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match meta.lookup(ns, k) {
                Some(id) => ids.push(id),
                None => return Err(i),
            }
        }
        let mut tokens = Vec::with_capacity(ids.len());
        for id in ids {
            meta.set_remove(id);
            let mut newly_pinned = false;
            if let Some(e) = meta.entries.get_mut(id) {
                e.pins += 1;
                newly_pinned = e.pins == 1;
                tokens.push(PinToken {
                    namespace: e.ns,
                    key: e.key,
                    tier: TierKind::Disk,
                    incarnation: e.incarnation,
                });
            }
            if newly_pinned {
                meta.pinned_blocks += 1;
            }
        }
        Ok(tokens)
    }

    fn unpin(&self, token: &PinToken) {
        let mut meta = self.inner.meta.lock();
        let Some(id) = meta.lookup(&token.namespace, &token.key) else {
            return;
        };
        let mut now_free = false;
        if let Some(e) = meta.entries.get_mut(id) {
            if e.incarnation != token.incarnation || e.pins == 0 {
                return;
            }
            e.pins -= 1;
            now_free = e.pins == 0;
        }
        if now_free {
            meta.pinned_blocks -= 1;
            meta.set_insert(id);
        }
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
        let meta = self.inner.meta.lock();
        let now = now_ms();
        let mut out = Vec::new();
        let end = meta.entries.capacity();
        let mut pos = cursor as usize;
        while pos < end {
            if out.len() >= limit {
                return (out, Some(pos as u64));
            }
            if let Some(e) = meta.entries.get(pos)
                && e.live
                && ns.is_none_or(|n| *n == e.ns)
            {
                out.push(meta.meta_of(e, now));
            }
            pos += 1;
        }
        (out, None)
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
        let meta = self.inner.meta.lock();
        let mut s = TierStats {
            capacity_bytes: self.inner.capacity,
            used_bytes: meta.arenas.iter().map(|a| a.used_bytes()).sum(),
            blocks: meta.index.len() as u64,
            pinned_blocks: meta.pinned_blocks,
            ..TierStats::default()
        };
        drop(meta);
        self.inner.counters.fill(&mut s);
        s
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
