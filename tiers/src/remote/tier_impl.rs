//! The [`Tier`] trait for the remote tier, below the local tiers in the
//! cache's list. Reads and existence checks ask the cluster (one batch per
//! call); a put writes now; a remove queues a delete (it happens in the
//! background, so it is not counted as a removed block). The cluster keeps
//! no pins, metadata listing or per-namespace key sets: those answer empty.

use bytes::Bytes;

use super::RemoteTier;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{
    BlockMeta, PinToken, PutOutcome, RemoveOutcome, RemoveReason, Tier, TierKind, TierRead,
    TierStats,
};

impl Tier for RemoteTier {
    fn kind(&self) -> TierKind {
        TierKind::Remote
    }

    /// The cluster's own limits apply (its maximum value size).
    fn max_block_bytes(&self) -> u64 {
        u64::MAX
    }

    /// Writes the block now (not through the queue): `NoSpace` when the
    /// write failed or ran past the deadline.
    fn put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: &[u8],
    ) -> PutOutcome {
        let item = (*key, parent.copied(), Bytes::copy_from_slice(payload));
        match self.put_many(ns, &[item]).first() {
            Some(true) => PutOutcome::Stored,
            _ => PutOutcome::NoSpace,
        }
    }

    fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<Bytes> {
        let read = self.get_blocking(ns, std::slice::from_ref(key), None);
        read.into_iter().next().flatten().map(|b| b.payload)
    }

    fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.exists_many(ns, std::slice::from_ref(key))
            .first()
            .copied()
            .unwrap_or(false)
    }

    /// Queues a delete of the cluster's copy; answers `Missing` (the block
    /// leaves in the background).
    fn remove(&self, ns: &NamespaceId, key: &BlockKey, _reason: RemoveReason) -> RemoveOutcome {
        self.enqueue_delete(ns, key);
        RemoveOutcome::Missing
    }

    /// Blocks on the cluster cannot be pinned: `Err(0)` for any key.
    fn pin(&self, _ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<PinToken>, usize> {
        if keys.is_empty() {
            Ok(Vec::new())
        } else {
            Err(0)
        }
    }

    fn unpin(&self, _token: &PinToken) {}

    fn meta(&self, _ns: &NamespaceId, _key: &BlockKey) -> Option<BlockMeta> {
        None
    }

    fn list(
        &self,
        _ns: Option<&NamespaceId>,
        _cursor: u64,
        _limit: usize,
    ) -> (Vec<BlockMeta>, Option<u64>) {
        (Vec::new(), None)
    }

    fn keys_of(&self, _ns: &NamespaceId) -> Vec<BlockKey> {
        Vec::new()
    }

    /// The tier's traffic; the cluster's capacity and occupancy are its own
    /// (`maxmemory`), reported as 0.
    fn stats(&self) -> TierStats {
        let r = RemoteTier::stats(self);
        TierStats {
            hits: r.hits,
            misses: r.misses,
            bytes_in: r.write_bytes,
            bytes_out: r.read_bytes,
            rejected_puts: r.queue_dropped,
            ..TierStats::default()
        }
    }

    fn read_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        block_bytes: u64,
    ) -> Vec<Option<TierRead>> {
        self.get_many(ns, keys, block_bytes)
            .into_iter()
            .map(|b| {
                b.map(|b| TierRead {
                    payload: b.payload,
                    parent: b.parent,
                    version: b.seq,
                })
            })
            .collect()
    }

    fn contains_batch(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        self.exists_many(ns, keys)
    }
}
