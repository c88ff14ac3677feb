//! One drain's life (a T0 victim whose bytes are copied to the host tier):
//! started in a group ([`Inner::start_drains`]) with one launch of copies,
//! the device's hashes of the sources and one fence ([`DrainGroup`]);
//! taken off the queue when its fence completed; finished by publishing
//! its host copy if the block is still live, unpinned and hashes to its
//! recorded checksum ([`Inner::finish_drain`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvstrata_kernels::{CopyOp, Fence, HashRun, StagingBuffer};
use parking_lot::MutexGuard;
use rayon::prelude::*;

use super::{Inner, Meta, gpu_failed};
use crate::disk::checksum::xxh3_64;
use crate::events::{EventKind, PendingEvent};
use crate::host::{ChecksumMismatch, HostSlot};
use crate::tier::{Tier, TierCounters};

/// What each completed drain's bytes hash to, to compare with the checksum
/// recorded at put: the device's hash of its source ([`DrainGroup`]), or,
/// for a group the device could not hash, xxh3-64 of its host copy, in
/// parallel on rayon's pool. `None` for a drain whose copy failed.
pub(super) fn checked_hashes(drains: &[Drain]) -> Vec<Option<u64>> {
    let on_host = |d: &Drain| match d.group.device_hash(d.member) {
        Some(h) => Some(h),
        None => Some(xxh3_64(d.host.as_slice())),
    };
    let hash = |d: &Drain| if d.group.copied() { on_host(d) } else { None };
    if drains.iter().filter(|d| d.group.hashes.is_none()).count() > 1 {
        drains.par_iter().map(hash).collect()
    } else {
        drains.iter().map(hash).collect()
    }
}

/// Whether some completed drain needs its host copy hashed on the CPU.
pub(super) fn needs_host_hashing(drains: &[Drain]) -> bool {
    drains.iter().any(|d| d.group.hashes.is_none())
}

/// A victim whose bytes are being copied to the host tier.
pub(super) struct Drain {
    pub(super) id: usize,
    /// The entry's incarnation (entry ids are reused).
    pub(super) incarnation: u64,
    pub(super) host: HostSlot,
    /// The launch it belongs to, and its position there.
    pub(super) group: Arc<DrainGroup>,
    member: usize,
}

/// A block joining a demotion group.
struct GroupMember {
    id: usize,
    incarnation: u64,
    host: HostSlot,
    /// Recorded at put.
    checksum: u64,
}

/// One launch of drains: the fence after their copies and the device's
/// hashes of their sources.
pub(super) struct DrainGroup {
    /// Completes after the copies and the hashes.
    pub(super) fence: Fence,
    /// xxh3-64 of each member's source in device memory (`kvs_xxh3` on the
    /// hash stream), a little-endian u64 per member in group order, each
    /// poisoned with the complement of the recorded checksum before the
    /// launch (lent from the device's staging cache, back to it when the
    /// group is done). `None` when the hash could not be launched: the host
    /// copies are hashed on the CPU instead.
    hashes: Option<StagingBuffer>,
    /// Whether the fence completed without a device error (asked once).
    copied: std::sync::OnceLock<bool>,
}

impl DrainGroup {
    /// Whether the group's copies (and hashes) completed without a device
    /// error (logged once per group). Call once the fence is done.
    fn copied(&self) -> bool {
        *self.copied.get_or_init(|| match self.fence.wait() {
            Ok(()) => true,
            Err(e) => {
                gpu_failed("demotion copy", &e);
                false
            }
        })
    }

    /// The device's hash of member `i`'s source, once the fence is done.
    fn device_hash(&self, i: usize) -> Option<u64> {
        let bytes = self.hashes.as_ref()?.as_slice().get(8 * i..8 * i + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

impl Inner {
    /// Finishes every drain whose copy has completed, oldest first. The
    /// host copies are hashed in parallel (rayon's pool) before any is
    /// published.
    pub(super) fn reap(&self, meta: &mut MutexGuard<'_, Meta>, events: &mut Vec<PendingEvent>) {
        let done = self.take_completed(meta);
        if done.is_empty() {
            return;
        }
        let hashes = checked_hashes(&done);
        self.finish_taken(meta, done.into_iter().zip(hashes).collect(), events);
    }

    /// Takes every drain whose copy has completed off the queue, oldest
    /// first; they count as `reaping` until [`Inner::finish_taken`].
    pub(super) fn take_completed(&self, meta: &mut Meta) -> Vec<Drain> {
        let mut done = Vec::new();
        while meta
            .draining
            .front()
            .is_some_and(|d| d.group.fence.is_done())
        {
            if let Some(d) = meta.draining.pop_front() {
                done.push(d);
            }
        }
        meta.reaping += done.len();
        done
    }

    /// Finishes drains taken by [`Inner::take_completed`], with their
    /// [`checked_hashes`], and wakes whoever waits for them.
    pub(super) fn finish_taken(
        &self,
        meta: &mut Meta,
        done: Vec<(Drain, Option<u64>)>,
        events: &mut Vec<PendingEvent>,
    ) {
        if done.is_empty() {
            return;
        }
        meta.reaping -= done.len();
        for (d, hash) in done {
            self.finish_drain(meta, d, hash, events);
        }
        self.reaped.notify_all();
    }

    /// Publishes a drained block in the host tier (its bytes hashed to
    /// `hashed`; `None` if its copy failed), or frees the copy when the
    /// block was deleted, replaced or pinned meanwhile, or its copy failed
    /// or its bytes do not match the recorded checksum.
    fn finish_drain(
        &self,
        meta: &mut Meta,
        drain: Drain,
        hashed: Option<u64>,
        events: &mut Vec<PendingEvent>,
    ) {
        let index = &mut meta.index;
        let Some(e) = index.entries.get_mut(drain.id) else {
            return;
        };
        e.draining = false;
        let (live, pinned) = (e.live, e.pins > 0);
        let (ns, key, parent, checksum) = (e.ns, e.key, e.parent, e.checksum);
        if !live {
            // Deleted or replaced while its bytes were copied: not published.
            index.release_if_unused(drain.id);
            return;
        }
        if pinned {
            // Pinned while draining: it stays.
            index.set_insert(drain.id);
            return;
        }
        // Drains start only with a host tier.
        if let Some(host) = &self.host {
            let published = match hashed {
                Some(h) if h == checksum => {
                    Some(host.publish_hashed(drain.host, &ns, &key, parent.as_ref(), h))
                }
                Some(h) => Some(Err(ChecksumMismatch {
                    expected: checksum,
                    actual: h,
                })),
                // The copy failed (logged with the device error).
                None => None,
            };
            match published {
                None => TierCounters::add(&self.moves.demote_dropped, 1),
                Some(Ok(_)) => TierCounters::add(&self.moves.demoted, 1),
                Some(Err(mismatch)) => {
                    tracing::error!(namespace = %ns, key = %key, %mismatch, "hbm tier: demotion copy came out wrong; block dropped");
                    TierCounters::add(&self.moves.checksum_failures, 1);
                    TierCounters::add(&self.moves.demote_dropped, 1);
                }
            }
        }
        if let Some(ev) = index.unlink(drain.id, EventKind::Evicted) {
            TierCounters::add(&self.counters.evictions, 1);
            events.push(ev);
        }
    }

    /// Starts copying blocks out to the host tier, a group of
    /// [`HbmTierConfig::move_group_bytes`] per launch and fence (or lets a block go at once
    /// when the host already holds its bytes, or cannot take them).
    pub(super) fn start_drains(
        &self,
        meta: &mut Meta,
        ids: &[usize],
        events: &mut Vec<PendingEvent>,
    ) {
        let host = self.host.as_ref();
        let mut group: Vec<GroupMember> = Vec::new();
        let mut ops: Vec<CopyOp> = Vec::new();
        let mut bytes = 0usize;
        for &id in ids {
            let index = &mut meta.index;
            let Some(e) = index.entries.get(id) else {
                continue;
            };
            if e.draining || !e.live {
                continue;
            }
            let (ns, key, len, checksum, slot) = (e.ns, e.key, e.len, e.checksum, e.slot);
            let incarnation = e.incarnation;
            let src = self.memory.ptr() + index.arena.offset(slot) as u64;
            let already =
                host.is_some_and(|h| h.meta(&ns, &key).is_some_and(|m| m.checksum == checksum));
            let host_slot = if already {
                TierCounters::add(&self.moves.demote_skipped, 1);
                None
            } else {
                let reserved = host.and_then(|h| h.reserve(len));
                if reserved.is_none() {
                    TierCounters::add(&self.moves.demote_dropped, 1);
                }
                reserved
            };
            let Some(host_slot) = host_slot else {
                if let Some(ev) = index.unlink(id, EventKind::Evicted) {
                    TierCounters::add(&self.counters.evictions, 1);
                    events.push(ev);
                }
                continue;
            };
            // Leaves the eviction candidates now: it is ours.
            index.set_remove(id);
            if let Some(e) = index.entries.get_mut(id) {
                e.draining = true;
            }
            // A mapped pinned slot takes the batched kernel (or DMA above the
            // threshold); pageable memory only DMA (`host_addr`).
            ops.push(CopyOp {
                src,
                dst: host_slot.device_addr().unwrap_or(host_slot.host_addr()),
                len: len as u64,
            });
            group.push(GroupMember {
                id,
                incarnation,
                host: host_slot,
                checksum,
            });
            bytes += len;
            if bytes >= self.config.move_group_bytes as usize {
                self.launch_drains(meta, std::mem::take(&mut group), &mut ops, events);
                bytes = 0;
            }
        }
        if !group.is_empty() {
            self.launch_drains(meta, group, &mut ops, events);
        }
    }

    /// Launches one group's copies and fence and queues its drains; a group
    /// whose launch fails is dropped (its blocks leave T0 uncopied).
    fn launch_drains(
        &self,
        meta: &mut Meta,
        group: Vec<GroupMember>,
        ops: &mut Vec<CopyOp>,
        events: &mut Vec<PendingEvent>,
    ) {
        let stream = &self.demote_stream;
        let (mut kernel, mut dma) = (Vec::new(), Vec::new());
        let runs: Vec<HashRun> = ops
            .iter()
            .map(|op| HashRun {
                addr: op.src,
                len: op.len,
            })
            .collect();
        for (member, op) in group.iter().zip(ops.drain(..)) {
            if member.host.device_addr().is_some() {
                kernel.push(op);
            } else {
                dma.push(op);
            }
        }
        // SAFETY: every host slot is reserved for its drain; every source
        // slot is draining, so it is not freed or reused before its fence.
        let copied =
            unsafe { stream.copy_blocks(&kernel, self.config.dma_threshold) }.and_then(|()| {
                dma.iter()
                    .try_for_each(|op| unsafe { stream.copy(op.dst, op.src, op.len) })
            });
        let mut hashes = None;
        if copied.is_ok() {
            let checksums: Vec<u64> = group.iter().map(|m| m.checksum).collect();
            hashes = self.hash_sources(&runs, &checksums);
        }
        match copied.and_then(|()| stream.record()) {
            Ok(fence) => {
                let group_state = Arc::new(DrainGroup {
                    fence,
                    hashes,
                    copied: std::sync::OnceLock::new(),
                });
                for (member, m) in group.into_iter().enumerate() {
                    meta.draining.push_back(Drain {
                        id: m.id,
                        incarnation: m.incarnation,
                        host: m.host,
                        group: Arc::clone(&group_state),
                        member,
                    });
                }
            }
            Err(err) => {
                gpu_failed("demotion copy", &err);
                // Make sure nothing is still reading the sources or writing
                // the hash buffer.
                let _ = stream.synchronize();
                if let Some(buf) = hashes {
                    let _ = self.hash_stream.synchronize();
                    drop(buf);
                }
                let index = &mut meta.index;
                for GroupMember { id, host, .. } in group {
                    drop(host);
                    TierCounters::add(&self.moves.demote_dropped, 1);
                    if let Some(e) = index.entries.get_mut(id) {
                        e.draining = false;
                    }
                    if let Some(ev) = index.unlink(id, EventKind::Evicted) {
                        TierCounters::add(&self.counters.evictions, 1);
                        events.push(ev);
                    }
                }
            }
        }
    }

    /// Queues `kvs_xxh3` of a demotion group's sources on the hash stream,
    /// into a pinned buffer poisoned with the complement of each recorded
    /// checksum, and makes the demotion stream wait for it (the group's
    /// fence then covers the hashes too; the copies run meanwhile). `None`
    /// when it cannot be launched: the group's host copies are hashed on the
    /// CPU instead.
    fn hash_sources(&self, runs: &[HashRun], checksums: &[u64]) -> Option<StagingBuffer> {
        let mut buf = match self.gpu.staging(8 * runs.len()) {
            Ok(b) => b,
            Err(e) => {
                gpu_failed("pinned buffer for demotion hashes", &e);
                return None;
            }
        };
        for (out, c) in buf.as_mut_slice().chunks_exact_mut(8).zip(checksums) {
            out.copy_from_slice(&(!c).to_le_bytes());
        }
        let hs = &self.hash_stream;
        // SAFETY: every source slot is draining (not written, freed or
        // reused before the group's fence, which waits for this hash); the
        // buffer is held by the group until then.
        let queued = unsafe { hs.xxh3(runs, buf.device_ptr()) }
            .and_then(|()| hs.record())
            .and_then(|hashed| self.demote_stream.wait_for(&hashed));
        match queued {
            Ok(()) => Some(buf),
            Err(e) => {
                // Nothing may still write the buffer when it is reused.
                let _ = hs.synchronize();
                if !self.hash_fallback_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "hbm tier: cannot hash on the device; demotions hash their host copies instead");
                }
                drop(buf);
                None
            }
        }
    }
}
