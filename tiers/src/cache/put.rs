//! Writes: puts, deletes and `evict`, in the order that keeps every older
//! copy of a key unreachable once the call returns (module docs of
//! [`crate::cache`]): under the key's stripe lock, T0 copies go first, then
//! the host tier is written, then any queued demotion of the key is dropped
//! and the disk copy removed; the remote tier's write or delete is queued
//! after the host write.
//!
//! A put the host tier refuses (`NoSpace`: everything evictable is pinned
//! or being read) changes nothing below it: no write-through is queued, no
//! older copy is removed, so a block it would have replaced (pinned, say)
//! stays exactly as it was in every tier, and the refused bytes are never
//! served, now or after a restart.
//!
//! A namespace with `sync_write_through` writes its puts to the disk tier
//! before answering ([`BlockCache::put_batch`]); a block whose disk write
//! fails leaves every tier and answers `DiskFailed`.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;

use super::{BlockCache, DiskSide, PutBlock};
use crate::disk::DiskPut;
use crate::error::CacheError;
use crate::hbm::HbmTier;
use crate::key::BlockKey;
use crate::namespace::{Namespace, NamespaceId};
use crate::tier::{PutOutcome, RemoveOutcome, RemoveReason, Tier, TierKind};

impl BlockCache {
    /// Stores a batch. Validates every item first (payload size, a parent
    /// other than the block itself); on error nothing is stored. Parents are
    /// keys of the same namespace. A put under a cached key replaces the old
    /// block, pinned or not; pins held on the old block then cover nothing.
    /// An item the host tier refuses (`NoSpace`) changes nothing.
    ///
    /// With the namespace's `sync_write_through`, the stored items are
    /// written to the disk tier (in one submission) before this returns;
    /// an item whose disk write fails is removed from every tier again and
    /// answers `DiskFailed`.
    pub fn put_batch(
        &self,
        ns: &NamespaceId,
        items: &[PutBlock],
    ) -> Result<Vec<PutOutcome>, CacheError> {
        let namespace = self.namespace("namespace_id", ns)?;
        validate_puts(ns, &namespace, items)?;
        let _open = self.admit_write()?;
        if namespace.policy.sync_write_through
            && let Some(d) = &self.disk
        {
            return Ok(self.put_sync(ns, &namespace, items, d));
        }
        Ok(items
            .iter()
            .map(|item| self.put_one(ns, &namespace, item))
            .collect())
    }

    fn put_one(&self, ns: &NamespaceId, namespace: &Namespace, item: &PutBlock) -> PutOutcome {
        let (key, parent) = (&item.key, item.parent.as_ref());
        let _stripe = self.write_stripe(ns, key);
        // T0 copies go first: a T0 demotion of the old block can then no
        // longer publish it in the host tier after this put.
        self.drop_hbm_copies(ns, key, None);
        // Replaces the old block; if a host eviction is handing the old
        // block on, this waits until it has queued it.
        let out = self.host.put(ns, key, parent, &item.payload);
        if out != PutOutcome::Stored {
            // Refused: the old block (if any) is still the host tier's, so
            // its disk and remote copies, and any queued write of it, stay
            // as they are; the refused bytes are queued nowhere.
            return out;
        }
        // After the host write: it supersedes any write of the old block a
        // host eviction queued (an eviction of the new block racing this
        // put may be superseded too: a miss on the cluster, never old bytes).
        self.queue_remote(ns, namespace, key, parent, Some(&item.payload[..]));
        if let Some(d) = &self.disk {
            drop_disk_copy(d, ns, key);
            if namespace.policy.writes_to_disk() {
                // The disk write runs after this call returns: it gets
                // its own copy, never the caller's buffer (which may be
                // a client's shared-memory pool, reused at once).
                d.demoter
                    .write_through(ns, key, parent, Bytes::copy_from_slice(&item.payload));
            }
        }
        out
    }

    /// Queues the remote tier's part of a put under the key's stripe lock,
    /// after the host write: the block's write (with write-through) or a
    /// delete of the cluster's copy; `payload` `None` (a put that failed):
    /// a delete.
    pub(super) fn queue_remote(
        &self,
        ns: &NamespaceId,
        namespace: &Namespace,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: Option<&[u8]>,
    ) {
        let Some(r) = &self.remote else {
            return;
        };
        let through = namespace.policy.remote_write_through || r.config().write_through;
        match payload.filter(|_| through) {
            Some(bytes) => {
                r.enqueue_put(ns, key, parent, Bytes::copy_from_slice(bytes), true);
            }
            None => r.enqueue_delete(ns, key),
        }
    }

    /// `put_batch` of a `sync_write_through` namespace. Holds the stripe
    /// locks of every key of the batch (in stripe order) for the whole
    /// call, so no other write of these keys runs between the host write
    /// and the disk write: each stored item's older disk copy goes as in
    /// `put_one`, then one disk write of the last stored item of each key
    /// (an earlier one of the same key was replaced by it). A key whose
    /// disk write failed leaves the host tier again (and a copy a racing
    /// demotion queued or wrote), so a failed put is never served; its
    /// items answer `DiskFailed`. The remote tier's writes are queued once
    /// the outcome is known.
    fn put_sync(
        &self,
        ns: &NamespaceId,
        namespace: &Namespace,
        items: &[PutBlock],
        d: &DiskSide,
    ) -> Vec<PutOutcome> {
        let _stripes = self.write_stripes(ns, items.iter().map(|i| &i.key));
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            self.drop_hbm_copies(ns, &item.key, None);
            let o = self
                .host
                .put(ns, &item.key, item.parent.as_ref(), &item.payload);
            if o == PutOutcome::Stored {
                drop_disk_copy(d, ns, &item.key);
            }
            out.push(o);
        }
        let mut last: HashMap<BlockKey, usize> = HashMap::new();
        for (i, (item, o)) in items.iter().zip(&out).enumerate() {
            if *o == PutOutcome::Stored {
                last.insert(item.key, i);
            }
        }
        let mut order: Vec<usize> = last.into_values().collect();
        order.sort_unstable();
        let writes: Vec<DiskPut<'_>> = order
            .iter()
            .map(|&i| DiskPut {
                key: items[i].key,
                parent: items[i].parent,
                payload: &items[i].payload,
            })
            .collect();
        let written = d.tier.put_many(ns, &writes);
        let failed: HashSet<BlockKey> = order
            .iter()
            .zip(&written)
            .filter(|(_, o)| **o != PutOutcome::Stored)
            .map(|(&i, _)| items[i].key)
            .collect();
        for key in &failed {
            // Waits for a host eviction handing the block on; then the
            // demotion it queued is dropped, and a copy it wrote removed.
            self.host.remove(ns, key, RemoveReason::Delete);
            drop_disk_copy(d, ns, key);
        }
        for (item, o) in items.iter().zip(out.iter_mut()) {
            if *o != PutOutcome::Stored {
                continue;
            }
            let ok = !failed.contains(&item.key);
            if !ok {
                *o = PutOutcome::DiskFailed;
            }
            let payload = ok.then_some(&item.payload[..]);
            self.queue_remote(ns, namespace, &item.key, item.parent.as_ref(), payload);
        }
        if !failed.is_empty() {
            let n = out.iter().filter(|o| **o == PutOutcome::DiskFailed).count();
            d.demoter.count_sync_failed(n as u64);
            tracing::warn!(
                namespace = %ns,
                blocks = n,
                "sync write-through: disk write failed; the blocks were not stored"
            );
        }
        out
    }

    /// Removes the key from every HBM tier but `except` (a put's
    /// replacement rule: no T0 copy may outlive a newer put).
    pub(super) fn drop_hbm_copies(&self, ns: &NamespaceId, key: &BlockKey, except: Option<usize>) {
        for h in &self.hbm {
            if Some(h.device()) != except {
                h.remove(ns, key, RemoveReason::Delete);
            }
        }
    }

    /// Deletes keys from every tier; returns how many blocks were removed
    /// (the remote tier's copy leaves in the background, not counted).
    pub fn delete(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<u32, CacheError> {
        self.namespace("namespace_id", ns)?;
        let _open = self.admit_write()?;
        let mut n = 0;
        for k in keys {
            let _stripe = self.write_stripe(ns, k);
            // Reads on this node miss the cluster's copy from now on; the
            // remote tier's turn in the list below queues the delete again,
            // after any write of the block a host eviction queued meanwhile.
            if let Some(r) = &self.remote {
                r.enqueue_delete(ns, k);
            }
            // Fastest tier first. The host copy goes before the disk's: until
            // it is gone, a put of another key may evict it and queue it for
            // the disk (its removal waits for such a hand-off), so queued
            // demotions are forgotten only then, and a deleted block is never
            // published on disk after this returns (a stale read the
            // 32-client stress test caught). So: host, then forget, then disk.
            for t in &self.tiers {
                if t.kind() == TierKind::Disk
                    && let Some(d) = &self.disk
                {
                    d.demoter.forget(ns, k);
                }
                if t.remove(ns, k, RemoveReason::Delete) == RemoveOutcome::Removed {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Demotes keys (or, with `all`, the whole namespace) one tier down: a
    /// host-tier block is written to disk (now, not through the queue) and
    /// leaves the host tier; a block only on disk (or with no disk tier, only
    /// in the host tier) is dropped. Returns (evicted, skipped because pinned).
    pub fn evict(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        all: bool,
    ) -> Result<(u32, u32), CacheError> {
        let began = Instant::now();
        self.namespace("namespace_id", ns)?;
        let _open = self.admit_write()?;
        let keys: Vec<BlockKey> = if all {
            let mut seen = HashSet::new();
            self.tiers
                .iter()
                .flat_map(|t| t.keys_of(ns))
                .filter(|k| seen.insert(*k))
                .collect()
        } else {
            // Each key once: a repeated key is not evicted two tiers down.
            let mut seen = HashSet::new();
            keys.iter().filter(|k| seen.insert(**k)).copied().collect()
        };
        tracing::debug!(
            keys = keys.len(),
            listing_us = began.elapsed().as_micros() as u64,
            "evict"
        );
        // T0 blocks go one tier down in batches (one launch and fence per
        // group, checksums in parallel; see `HbmTier::demote_many`). No
        // stripe lock is needed: a put removes T0 copies under the T0 lock
        // before it writes the host tier, and a drain publishes only a block
        // still live.
        let in_t0 = demote_from_hbm(&self.hbm, ns, &keys);
        let (mut evicted, mut pinned) = (0, 0);
        for (k, in_t0) in keys.iter().zip(in_t0) {
            let outcome = match in_t0 {
                Some(done) => done,
                None => self.evict_one(ns, k),
            };
            match outcome {
                RemoveOutcome::Removed => evicted += 1,
                RemoveOutcome::Pinned => pinned += 1,
                RemoveOutcome::Missing => {}
            }
        }
        Ok((evicted, pinned))
    }

    /// One key one tier down, below T0 (see [`BlockCache::evict`]).
    fn evict_one(&self, ns: &NamespaceId, key: &BlockKey) -> RemoveOutcome {
        let _stripe = self.stripe(ns, key).lock();
        // In T0: one tier down is the host tier.
        let in_hbm: Vec<&HbmTier> = self.hbm.iter().filter(|h| h.contains(ns, key)).collect();
        if !in_hbm.is_empty() {
            let mut out = RemoveOutcome::Missing;
            for h in in_hbm {
                match h.demote(ns, key) {
                    RemoveOutcome::Pinned => return RemoveOutcome::Pinned,
                    RemoveOutcome::Removed => out = RemoveOutcome::Removed,
                    RemoveOutcome::Missing => {}
                }
            }
            return out;
        }
        let Some(meta) = self.host.meta(ns, key) else {
            return match &self.disk {
                Some(d) => d.tier.remove(ns, key, RemoveReason::Evict),
                None => RemoveOutcome::Missing,
            };
        };
        if meta.pins > 0 {
            return RemoveOutcome::Pinned;
        }
        if let Some(d) = &self.disk
            && !d.tier.holds(ns, key, meta.checksum)
            && let Some(bytes) = self.host.get(ns, key)
        {
            d.demoter.forget(ns, key);
            let item = DiskPut {
                key: *key,
                parent: meta.parent,
                payload: &bytes,
            };
            d.tier.put_many(ns, &[item]);
        }
        if let Some(r) = self.remote.as_ref().filter(|r| r.config().demote)
            && let Some(bytes) = self.host.get(ns, key)
        {
            let copy = Bytes::copy_from_slice(&bytes);
            r.enqueue_put(ns, key, meta.parent.as_ref(), copy, false);
        }
        self.host.remove(ns, key, RemoveReason::Evict)
    }
}

/// Makes every older disk copy of a key unreachable (a put or delete of it
/// ran): a queued demotion is dropped, then the disk's copy removed.
pub(super) fn drop_disk_copy(d: &DiskSide, ns: &NamespaceId, key: &BlockKey) {
    d.demoter.forget(ns, key);
    if d.tier.contains(ns, key) {
        d.tier.remove(ns, key, RemoveReason::Delete);
    }
}

/// Every item's payload is the namespace's block size and no block is its
/// own parent; the error names the first item that is not.
fn validate_puts(
    ns: &NamespaceId,
    namespace: &Namespace,
    items: &[PutBlock],
) -> Result<(), CacheError> {
    for (i, item) in items.iter().enumerate() {
        if item.payload.len() as u64 != namespace.block_bytes {
            return Err(CacheError::invalid(
                format!("items[{i}].payload"),
                format!(
                    "{} bytes, but namespace {} stores blocks of exactly {} bytes",
                    item.payload.len(),
                    ns,
                    namespace.block_bytes
                ),
            ));
        }
        if item.parent.as_ref() == Some(&item.key) {
            return Err(CacheError::invalid(
                format!("items[{i}].parent"),
                "a block cannot be its own parent",
            ));
        }
    }
    Ok(())
}

/// Demotes the keys held in T0 one tier down, each HBM tier in one batch;
/// per key, the combined outcome over the tiers (pinned in any wins, then
/// removed from one), or `None` where no T0 had it.
fn demote_from_hbm(
    hbm: &[HbmTier],
    ns: &NamespaceId,
    keys: &[BlockKey],
) -> Vec<Option<RemoveOutcome>> {
    let mut in_t0: Vec<Option<RemoveOutcome>> = vec![None; keys.len()];
    for h in hbm {
        for (i, outcome) in h.demote_many(ns, keys).into_iter().enumerate() {
            in_t0[i] = match (in_t0[i], outcome) {
                (Some(RemoveOutcome::Pinned), _) | (_, RemoveOutcome::Pinned) => {
                    Some(RemoveOutcome::Pinned)
                }
                (Some(RemoveOutcome::Removed), _) | (_, RemoveOutcome::Removed) => {
                    Some(RemoveOutcome::Removed)
                }
                _ => None,
            };
        }
    }
    in_t0
}
