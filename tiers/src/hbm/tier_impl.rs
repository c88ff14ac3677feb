//! The [`Tier`] trait for the HBM tier: puts copy in on the promotion
//! stream, gets copy out on the read stream and check the recorded
//! checksum; the metadata operations run on the block index (pin, unpin,
//! remove, list and stats are the shared ones of [`BlockTable`]).

use bytes::Bytes;

use super::{HbmRead, HbmTier, gpu_failed};
use crate::disk::checksum::xxh3_64;
use crate::error::CacheError;
use crate::events::EventKind;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::table::{BlockTable, finish_remove};
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierCounters,
    TierInspection, TierKind, TierRead, TierStats,
};

impl Tier for HbmTier {
    fn kind(&self) -> TierKind {
        TierKind::Hbm
    }

    fn max_block_bytes(&self) -> u64 {
        self.max_slot_bytes() as u64
    }

    /// Copies the payload in on the promotion stream; its xxh3-64 is recorded.
    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome {
        self.store(ns, key, parent, payload, xxh3_64(payload))
    }

    /// Copies the block out on the read stream and checks it against the
    /// recorded checksum: a mismatch drops the block and answers a miss.
    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes> {
        let read = self.acquire(ns, key)?;
        self.copy_out(ns, key, read)
    }

    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.inner
            .meta
            .lock()
            .index
            .index
            .contains_key(&(*ns, *key))
    }

    fn remove(&self, ns: &NamespaceId, key: &BlockKey, reason: RemoveReason) -> RemoveOutcome {
        let inner = &self.inner;
        let removed = inner.meta.lock().index.remove(ns, key, reason);
        finish_remove(removed, reason, &inner.counters, &inner.events)
    }

    fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        self.inner.meta.lock().index.pin(ns, keys)
    }

    fn unpin(&self, token: &PinToken) {
        self.inner.meta.lock().index.unpin(token)
    }

    fn meta(&self, ns: &NamespaceId, key: &BlockKey) -> Option<BlockMeta> {
        self.inner.meta.lock().index.block_meta(ns, key)
    }

    fn list(
        &self,
        ns: Option<&NamespaceId>,
        cursor: u64,
        limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        self.inner.meta.lock().index.list(ns, cursor, limit)
    }

    fn keys_of(&self, ns: &NamespaceId) -> Vec<BlockKey> {
        self.inner.meta.lock().index.keys_of(ns)
    }

    fn stats(&self) -> TierStats {
        let inner = &self.inner;
        let capacity = inner.config.capacity_bytes;
        inner.meta.lock().index.stats(capacity, &inner.counters)
    }

    /// Every key's reader count under one lock, then each block copied out
    /// and checked as [`Tier::get`] does.
    fn read_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        _block_bytes: u64,
    ) -> Vec<Option<TierRead>> {
        self.acquire_many(ns, keys)
            .into_iter()
            .zip(keys)
            .map(|(read, key)| {
                let read = read?;
                let parent = read.parent;
                let payload = self.copy_out(ns, key, read)?;
                Some(TierRead::unversioned(payload, parent))
            })
            .collect()
    }

    fn contains_batch(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let meta = self.inner.meta.lock();
        keys.iter()
            .map(|k| meta.index.index.contains_key(&(*ns, *k)))
            .collect()
    }

    /// Hashes the slot's bytes as they are now (read back through pinned
    /// memory), without the read path's check.
    fn inspect(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
    ) -> Result<Option<TierInspection>, CacheError> {
        let (Some(meta), Some(read)) = (self.meta(ns, key), self.acquire(ns, key)) else {
            return Ok(None);
        };
        let mut payload_xxh3 = None;
        self.read_back(&[read.addr()], read.len(), |_, blocks| {
            payload_xxh3 = blocks.first().map(|b| xxh3_64(b))
        })
        .map_err(|e| CacheError::device("key", &e))?;
        Ok(payload_xxh3.map(|payload_xxh3| TierInspection { meta, payload_xxh3 }))
    }
}

impl HbmTier {
    /// The bytes of an acquired block, copied out on the read stream and
    /// checked against the recorded checksum; a mismatch drops the block
    /// (if it is still the one stored) and answers `None`.
    fn copy_out(&self, ns: &NamespaceId, key: &BlockKey, read: HbmRead) -> Option<Bytes> {
        let mut buf = vec![0u8; read.len];
        let stream = &self.inner.read_stream;
        // SAFETY: the reader count keeps the slot's bytes until `read` drops;
        // `buf` is ours until the fence has completed.
        let copied = unsafe { stream.copy(buf.as_mut_ptr() as u64, read.addr, read.len as u64) }
            .and_then(|()| stream.record())
            .and_then(|f| f.wait());
        if let Err(e) = copied {
            gpu_failed("device-to-host copy", &e);
            return None;
        }
        if xxh3_64(&buf) != read.checksum {
            tracing::error!(namespace = %ns, key = %key, "hbm tier: block does not match its checksum; dropped");
            TierCounters::add(&self.inner.moves.checksum_failures, 1);
            let event = {
                let mut meta = self.inner.meta.lock();
                let still = meta.index.index.get(&(*ns, *key)) == Some(&read.id);
                if still {
                    meta.index.unlink(read.id, EventKind::Deleted)
                } else {
                    None
                }
            };
            self.inner.events.publish(event);
            return None;
        }
        Some(Bytes::from(buf))
    }
}
