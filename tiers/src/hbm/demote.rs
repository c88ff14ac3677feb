//! Demotion T0→T1 by the cache's `evict` ([`HbmTier::demote_many`]): the
//! blocks are claimed, launched a group at a time with a few groups queued,
//! and each completed group is hashed (on the device, or on rayon's pool)
//! and published while the next ones copy. Also the tier's reservation,
//! which drains victims under pressure ([`Inner::reserve`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;

use super::drain::{Drain, checked_hashes, needs_host_hashing};
use super::{HbmTier, Inner, MOVE_WINDOW, Meta};
use crate::arena::SlotRef;
use crate::events::PendingEvent;
use crate::eviction::choose_victims;
use crate::host::SlotIndex;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::RemoveOutcome;

/// Drains of one [`HbmTier::demote_many`] call: (entry id, incarnation).
type Ours = HashSet<(usize, u64)>;

/// Where a batched demotion's time went (logged at debug level).
#[derive(Default)]
struct DemotionTimes {
    launching: Duration,
    publishing: Duration,
    hash_waits: Duration,
    copy_waits: Duration,
}

impl HbmTier {
    /// Demotes one block to the host tier now: [`HbmTier::demote_many`] of
    /// one key.
    pub fn demote(&self, ns: &NamespaceId, key: &BlockKey) -> RemoveOutcome {
        self.demote_many(ns, std::slice::from_ref(key))
            .pop()
            .unwrap_or(RemoveOutcome::Missing)
    }

    /// Demotes blocks to the host tier now (the cache's `evict`): their
    /// bytes are copied out, a group of [`super::HbmTierConfig::move_group_bytes`]
    /// per launch and fence, and each leaves this tier once its copy is
    /// published there (checksums verified in parallel, one group while the
    /// next copies). Returns one outcome per key: `Removed`, `Missing`, or
    /// `Pinned` for a block pinned (before or meanwhile) or replaced by a
    /// newer put while it drained.
    pub fn demote_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<RemoveOutcome> {
        let inner = &*self.inner;
        let mut events = Vec::new();
        let out = {
            let mut meta = inner.meta.lock();
            let (mut out, ours, start) = claim(&meta.index, ns, keys);
            let began = Instant::now();
            let times = inner.run_demotion(&mut meta, &ours, &start, &mut events);
            tracing::debug!(
                blocks = start.len(),
                total_us = began.elapsed().as_micros() as u64,
                launching_us = times.launching.as_micros() as u64,
                publishing_us = times.publishing.as_micros() as u64,
                waiting_for_hashes_us = times.hash_waits.as_micros() as u64,
                waiting_for_copies_us = times.copy_waits.as_micros() as u64,
                "hbm tier: batched demotion"
            );
            for (i, key) in keys.iter().enumerate() {
                if out[i] == RemoveOutcome::Removed && meta.index.index.contains_key(&(*ns, *key)) {
                    // Pinned meanwhile, or replaced by a newer block.
                    out[i] = RemoveOutcome::Pinned;
                }
            }
            out
        };
        inner.events.publish(events);
        out
    }
}

/// The blocks of `keys` a batched demotion takes: each key's outcome so
/// far (`Pinned`, `Removed` or `Missing`), the claimed (id, incarnation)
/// pairs, and the ids to start draining (those not draining already), in
/// the order they lie in HBM: their host slots are reserved in that order
/// (lowest free first), so neighbours on both sides move as one run
/// ([`kvstrata_kernels::GpuStream::copy_blocks`]).
fn claim(
    index: &SlotIndex,
    ns: &NamespaceId,
    keys: &[BlockKey],
) -> (Vec<RemoveOutcome>, Ours, Vec<usize>) {
    let mut out = vec![RemoveOutcome::Missing; keys.len()];
    let mut ours = Ours::new();
    let mut start = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let Some(&id) = index.index.get(&(*ns, *key)) else {
            continue;
        };
        let Some(e) = index.entries.get(id) else {
            continue;
        };
        if e.pins > 0 {
            out[i] = RemoveOutcome::Pinned;
            continue;
        }
        out[i] = RemoveOutcome::Removed;
        if ours.insert((id, e.incarnation)) && !e.draining {
            start.push(id);
        }
    }
    start.sort_by_cached_key(|&id| {
        index
            .entries
            .get(id)
            .map_or(usize::MAX, |e| index.arena.offset(e.slot))
    });
    (out, ours, start)
}

impl Inner {
    /// Moves the claimed blocks out, keeping [`MOVE_WINDOW`] groups of ours
    /// queued on the demotion stream. Each completed batch is taken off the
    /// queue and hashed on rayon's pool while this thread launches the next
    /// group and publishes the batch hashed before it: copying, hashing,
    /// launching and publishing run at once. Groups complete in order (one
    /// stream). Returns once none of ours is draining.
    fn run_demotion(
        &self,
        meta: &mut MutexGuard<'_, Meta>,
        ours: &Ours,
        start: &[usize],
        events: &mut Vec<PendingEvent>,
    ) -> DemotionTimes {
        let mut times = DemotionTimes::default();
        let mut pending: &[usize] = start;
        let mut hashed: Vec<(Drain, Option<u64>)> = Vec::new();
        loop {
            let batch = self.take_completed(meta);
            // Device-hashed groups are checked here at once; host copies
            // are hashed as a rayon job.
            let mut hashing = None;
            if needs_host_hashing(&batch) {
                let (tx, rx) = crossbeam_channel::bounded(1);
                rayon::spawn(move || {
                    let hashes = checked_hashes(&batch);
                    let _ = tx.send((batch, hashes));
                });
                hashing = Some(rx);
            } else if !batch.is_empty() {
                let hashes = checked_hashes(&batch);
                let t = Instant::now();
                self.finish_taken(meta, std::mem::take(&mut hashed), events);
                times.publishing += t.elapsed();
                hashed = batch.into_iter().zip(hashes).collect();
            }
            let t = Instant::now();
            pending = self.launch_window(meta, ours, pending, events);
            times.launching += t.elapsed();
            let t = Instant::now();
            self.finish_taken(meta, std::mem::take(&mut hashed), events);
            times.publishing += t.elapsed();
            if let Some(rx) = hashing {
                let t = Instant::now();
                match MutexGuard::unlocked(meta, || rx.recv()) {
                    Ok((batch, hashes)) => hashed = batch.into_iter().zip(hashes).collect(),
                    // Only if the hashing job died (rayon aborts on a
                    // panic in a spawned job): its drains are lost.
                    Err(_) => tracing::error!("hbm tier: a demotion hashing job vanished"),
                }
                times.hash_waits += t.elapsed();
                continue;
            }
            let t = Instant::now();
            let fence = meta
                .draining
                .iter()
                .find(|d| ours.contains(&(d.id, d.incarnation)))
                .map(|d| Arc::clone(&d.group));
            if let Some(group) = fence {
                // A failed copy reads as done; its group says so when it
                // is finished.
                let _ = MutexGuard::unlocked(meta, || group.fence.wait());
                times.copy_waits += t.elapsed();
                continue;
            }
            if !pending.is_empty() {
                continue;
            }
            // Ours taken by another thread's reap, not finished yet?
            let moving = ours.iter().any(|&(id, incarnation)| {
                meta.index
                    .entries
                    .get(id)
                    .is_some_and(|e| e.incarnation == incarnation && e.draining)
            });
            if !moving {
                return times;
            }
            self.reaped.wait_for(meta, Duration::from_millis(10));
        }
    }

    /// Launches groups from the front of `pending` until [`MOVE_WINDOW`]
    /// groups' worth of ours is in flight; returns what is left.
    fn launch_window<'a>(
        &self,
        meta: &mut Meta,
        ours: &Ours,
        mut pending: &'a [usize],
        events: &mut Vec<PendingEvent>,
    ) -> &'a [usize] {
        let group_bytes = self.config.move_group_bytes.max(1) as usize;
        let window = MOVE_WINDOW * group_bytes;
        let lanes = rayon::current_num_threads();
        let mut in_flight: usize = meta
            .draining
            .iter()
            .filter(|d| ours.contains(&(d.id, d.incarnation)))
            .map(|d| d.host.len())
            .sum();
        while !pending.is_empty() && in_flight < window {
            let (take, bytes) = one_group(&meta.index, pending, group_bytes, lanes);
            self.start_drains(meta, &pending[..take], events);
            pending = &pending[take..];
            in_flight += bytes;
        }
        pending
    }

    /// A free slot of `len` bytes: reaps finished drains, waits for the
    /// oldest one when only that can give room, or drains new victims.
    pub(super) fn reserve(
        &self,
        meta: &mut MutexGuard<'_, Meta>,
        len: usize,
        events: &mut Vec<PendingEvent>,
    ) -> Option<SlotRef> {
        loop {
            self.reap(meta, events);
            if let Some(slot) = meta.index.arena.alloc(len) {
                return Some(slot);
            }
            if let Some(group) = meta.draining.front().map(|d| Arc::clone(&d.group)) {
                // A failed copy reads as done; its group says so when reaped.
                let _ = MutexGuard::unlocked(meta, || group.fence.wait());
                continue;
            }
            if meta.reaping > 0 {
                // Drains being finished by a batched demotion free slots soon.
                self.reaped.wait_for(meta, Duration::from_millis(10));
                continue;
            }
            let victims = choose_victims(&meta.index, len)?;
            self.start_drains(meta, &victims, events);
        }
    }
}

/// How many of `ids` (from the front) make one move group of about
/// `group_bytes` (at least one), and their bytes. A group of at least
/// `lanes` blocks holds a multiple of `lanes` (the CPU's hashing threads),
/// so where the host copies are hashed on the CPU (the device cannot hash)
/// every thread stays busy to the end (a block is one task).
fn one_group(index: &SlotIndex, ids: &[usize], group_bytes: usize, lanes: usize) -> (usize, usize) {
    let len_of = |id: usize| index.entries.get(id).map_or(0, |e| e.len);
    let first = ids.first().map_or(1, |&id| len_of(id).max(1));
    let mut n = (group_bytes / first).max(1);
    if lanes > 1 && n >= lanes {
        n -= n % lanes;
    }
    let n = n.min(ids.len());
    (n, ids[..n].iter().map(|&id| len_of(id)).sum())
}
