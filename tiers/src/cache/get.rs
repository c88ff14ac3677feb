//! Lookups and reads through the tier list ([`BlockCache::lookup`],
//! [`BlockCache::get_batch`]): each tier is asked, in one batch, for what
//! the faster tiers missed. A hit below the host tier is copied into it
//! (promotion on get) unless a faster tier got the key meanwhile or the
//! copy read is no longer the tier's current one. Before the disk tier,
//! the demotion queue is asked: a block evicted from the host tier and not
//! yet on disk is served from it (as the disk tier's, not promoted), so no
//! read misses a block between the two (see [`crate::movement`]).

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::BlockCache;
use crate::error::CacheError;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{PutOutcome, Tier, TierKind, TierRead};

impl BlockCache {
    /// Longest cached prefix of `keys`: the tier of each leading hit (the
    /// fastest tier holding it). Each tier is asked once, for the keys the
    /// faster ones lack (the remote tier, last, in one round trip).
    pub fn lookup(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Vec<TierKind>, CacheError> {
        self.namespace("namespace_id", ns)?;
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let mut found: Vec<Option<TierKind>> = vec![None; keys.len()];
        let mut missed: Vec<usize> = (0..keys.len()).collect();
        // What the next tier is asked for: every key at first.
        let mut miss_keys: Cow<[BlockKey]> = Cow::Borrowed(keys);
        for tier in &self.tiers {
            if missed.is_empty() {
                break;
            }
            let kind = tier.kind();
            if let Some(queued) = self.queued_before(kind, ns, &miss_keys) {
                let held: Vec<bool> = queued.iter().map(Option::is_some).collect();
                missed = keep_misses(&missed, &held, |i| found[i] = Some(kind));
                miss_keys = Cow::Owned(missed.iter().map(|&i| keys[i]).collect());
                if missed.is_empty() {
                    break;
                }
            }
            let held = tier.contains_batch(ns, &miss_keys);
            missed = keep_misses(&missed, &held, |i| found[i] = Some(kind));
            miss_keys = Cow::Owned(missed.iter().map(|&i| keys[i]).collect());
        }
        Ok(found.into_iter().map_while(|t| t).collect())
    }

    /// Reads a batch: for each key the exact bytes and the tier, or `None`.
    pub fn get_batch(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<(Bytes, TierKind)>>, CacheError> {
        let namespace = self.namespace("namespace_id", ns)?;
        let mut out: Vec<Option<(Bytes, TierKind)>> = vec![None; keys.len()];
        let mut missed: Vec<usize> = (0..keys.len()).collect();
        // What the next tier is asked for: every key at first.
        let mut miss_keys: Cow<[BlockKey]> = Cow::Borrowed(keys);
        for (position, tier) in self.tiers.iter().enumerate() {
            if missed.is_empty() {
                break;
            }
            let kind = tier.kind();
            if let Some(queued) = self.queued_before(kind, ns, &miss_keys) {
                let mut still = Vec::new();
                for (&i, q) in missed.iter().zip(queued) {
                    match q {
                        Some(payload) => out[i] = Some((payload, kind)),
                        None => still.push(i),
                    }
                }
                missed = still;
                miss_keys = Cow::Owned(missed.iter().map(|&i| keys[i]).collect());
                if missed.is_empty() {
                    break;
                }
            }
            let reads = tier.read_batch(ns, &miss_keys, namespace.block_bytes);
            let promote = self.promotes_on_get(kind);
            let mut still = Vec::new();
            for ((&i, key), read) in missed.iter().zip(miss_keys.iter()).zip(reads) {
                match read {
                    Some(read) => {
                        if promote {
                            self.promote(ns, key, position, &read);
                        }
                        out[i] = Some((read.payload, kind));
                    }
                    None => still.push(i),
                }
            }
            missed = still;
            miss_keys = Cow::Owned(missed.iter().map(|&i| keys[i]).collect());
        }
        Ok(out)
    }

    /// Before the disk tier (`kind`), the blocks of `keys` waiting in the
    /// demotion queue ([`crate::movement::Demoter::queued`]); `None` before
    /// any other tier. The queue drops a block only once the disk tier has
    /// published it (or refused it, counted in `demote_failed`), so a
    /// queued key missed here is found by the disk tier's read that follows.
    fn queued_before(
        &self,
        kind: TierKind,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Option<Vec<Option<Bytes>>> {
        match (&self.disk, kind) {
            (Some(d), TierKind::Disk) if !keys.is_empty() => Some(d.demoter.queued(ns, keys)),
            _ => None,
        }
    }

    /// Whether a get that hits in a tier of `kind` copies the block into
    /// the host tier: the disk tier's (movement `promote_on_get`) and the
    /// remote tier's (its own `promote_on_get`).
    fn promotes_on_get(&self, kind: TierKind) -> bool {
        match kind {
            TierKind::Disk => self.config.movement.promote_on_get,
            TierKind::Remote => self
                .remote
                .as_ref()
                .is_some_and(|r| r.config().promote_on_get),
            TierKind::Hbm | TierKind::Host => false,
        }
    }

    /// Copies a block read from the tier at `position` of the list into the
    /// host tier, under the key's stripe lock, unless a faster tier has the
    /// key now (a put since the read, or a promotion by a concurrent get) or
    /// the tier no longer holds the version read (a put or delete replaced
    /// it), so a get never resurrects bytes older than a completed put.
    fn promote(&self, ns: &NamespaceId, key: &BlockKey, position: usize, read: &TierRead) {
        let _stripe = self.stripe(ns, key).lock();
        let Some((source, faster)) = self.tiers[..=position].split_last() else {
            return;
        };
        if faster.iter().any(|t| t.contains(ns, key)) || !source.is_current(ns, key, read.version) {
            return;
        }
        if self.host.put(ns, key, read.parent.as_ref(), &read.payload) != PutOutcome::Stored {
            return;
        }
        match source.kind() {
            TierKind::Disk => {
                if let Some(d) = &self.disk {
                    d.demoter.count_promotion();
                }
            }
            TierKind::Remote => {
                if let Some(r) = &self.remote {
                    r.count_promotion();
                }
            }
            TierKind::Hbm | TierKind::Host => {}
        }
    }
}

/// The positions of `asked` whose answer in `hit` is false; `on_hit` is
/// called with each position answered true.
fn keep_misses(asked: &[usize], hit: &[bool], mut on_hit: impl FnMut(usize)) -> Vec<usize> {
    let mut missed = Vec::new();
    for (&i, &h) in asked.iter().zip(hit) {
        if h {
            on_hit(i);
        } else {
            missed.push(i);
        }
    }
    missed
}
