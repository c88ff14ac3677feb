//! Copies into the HBM tier: one block ([`crate::Tier::put`]) or many, a
//! group per launch and fence with a few groups queued
//! ([`HbmTier::copy_in`], the cache's promotions on device gets).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_kernels::{CopyOp, Fence};

use super::{HbmSlot, HbmTier, MOVE_WINDOW, gpu_failed};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{PutOutcome, TierCounters};

/// One launched group of [`HbmTier::copy_in`]: each source's tag and slot,
/// the sources (held until the fence), and the fence.
type Group<T> = (Vec<(T, Option<HbmSlot>)>, Vec<Bytes>, Option<Fence>);

impl HbmTier {
    /// Copies `src` (host memory, pinned or not) into a new slot on the
    /// promotion stream and publishes it with `checksum`.
    pub(super) fn store(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        src: &[u8],
        checksum: u64,
    ) -> PutOutcome {
        let Some(slot) = self.reserve(src.len()) else {
            return PutOutcome::NoSpace;
        };
        let stream = &self.inner.promote_stream;
        // SAFETY: the slot is reserved for this writer alone; `src` is
        // borrowed until the fence below has completed.
        let copied = unsafe { stream.copy(slot.addr, src.as_ptr() as u64, src.len() as u64) }
            .and_then(|()| stream.record())
            .and_then(|f| f.wait());
        if let Err(e) = copied {
            gpu_failed("host-to-device copy", &e);
            // Nothing may still write the slot when it is freed.
            let _ = stream.synchronize();
            return PutOutcome::NoSpace;
        }
        self.publish(slot, ns, key, parent, checksum)
    }

    /// Copies host blocks into newly reserved slots of this tier, many per
    /// launch on the promotion stream (the batched kernel for sources a
    /// device reaches; DMA for others). `srcs` yields `(tag, bytes, device
    /// address of the bytes if a device reaches them)` and is pulled lazily,
    /// a group of [`super::HbmTierConfig::move_group_bytes`] at a time, with a few
    /// groups queued: the caller's work producing the next sources overlaps
    /// the copies already queued. Each group's `(tag, filled slot)` pairs go
    /// to `done` as soon as its copies completed, unpublished (the slot is
    /// `None` where none could be reserved or the copy failed), so the
    /// caller publishes one group while the next ones copy. Within a group
    /// the sources are copied in address order, into slots reserved in that
    /// order, so neighbours move as one run. Slots reserved by the call are
    /// nobody's victims, so when the tier cannot hold every source the
    /// first ones that fit are copied. The bytes are held until their
    /// group's copies have completed.
    pub fn copy_in<T>(
        &self,
        srcs: impl IntoIterator<Item = (T, Bytes, Option<u64>)>,
        mut done: impl FnMut(Vec<(T, Option<HbmSlot>)>),
    ) {
        let group_bytes = self.inner.config.move_group_bytes.max(1) as usize;
        let mut in_flight: VecDeque<Group<T>> = VecDeque::new();
        let began = Instant::now();
        let mut finishing = Duration::ZERO;
        let mut blocks = 0usize;
        let mut srcs = srcs.into_iter().peekable();
        while srcs.peek().is_some() {
            let group = self.launch_copy_in(pull_group(&mut srcs, group_bytes));
            blocks += group.0.len();
            in_flight.push_back(group);
            if in_flight.len() >= MOVE_WINDOW
                && let Some(oldest) = in_flight.pop_front()
            {
                let t = Instant::now();
                self.finish_copy_in(oldest, &mut done);
                finishing += t.elapsed();
            }
        }
        let t = Instant::now();
        while let Some(oldest) = in_flight.pop_front() {
            self.finish_copy_in(oldest, &mut done);
        }
        finishing += t.elapsed();
        tracing::debug!(
            blocks,
            total_us = began.elapsed().as_micros() as u64,
            waiting_and_publishing_us = finishing.as_micros() as u64,
            "hbm tier: batched copy in"
        );
    }

    /// Reserves a slot per source (in the order given) and queues one
    /// launch of their copies and a fence on the promotion stream.
    fn launch_copy_in<T>(&self, pulled: Vec<(T, Bytes, Option<u64>)>) -> Group<T> {
        let inner = &*self.inner;
        let stream = &inner.promote_stream;
        let mut group = Vec::with_capacity(pulled.len());
        let mut held = Vec::with_capacity(pulled.len());
        let mut kernel_ops = Vec::new();
        let mut dma_ops = Vec::new();
        for (tag, src, src_device) in pulled {
            let slot = self.reserve(src.len());
            if let Some(slot) = &slot {
                let op = |from: u64| CopyOp {
                    src: from,
                    dst: slot.addr,
                    len: src.len() as u64,
                };
                match src_device {
                    Some(addr) => kernel_ops.push(op(addr)),
                    None => dma_ops.push(op(src.as_ptr() as u64)),
                }
            }
            group.push((tag, slot));
            held.push(src);
        }
        // SAFETY: every destination is a slot reserved for this call
        // alone; the sources are held (`held`) until the fence below has
        // completed, and `Bytes` never moves or changes its data.
        let fence = unsafe { stream.copy_blocks(&kernel_ops, inner.config.dma_threshold) }
            .and_then(|()| {
                dma_ops
                    .iter()
                    .try_for_each(|op| unsafe { stream.copy(op.dst, op.src, op.len) })
            })
            .and_then(|()| stream.record());
        let fence = match fence {
            Ok(f) => Some(f),
            Err(e) => {
                gpu_failed("host-to-device copy", &e);
                None
            }
        };
        (group, held, fence)
    }

    /// Waits for a group's fence and hands its slots to `done` (all `None`
    /// if its copies failed), then lets go of its sources.
    fn finish_copy_in<T>(
        &self,
        (mut group, held, fence): Group<T>,
        done: &mut impl FnMut(Vec<(T, Option<HbmSlot>)>),
    ) {
        let ok = match fence.map(|f| f.wait()) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                gpu_failed("host-to-device copy", &e);
                false
            }
            None => false,
        };
        if !ok {
            // Nothing may still write these slots when they are freed.
            let _ = self.inner.promote_stream.synchronize();
            group.iter_mut().for_each(|(_, s)| *s = None);
        }
        drop(held);
        done(group);
    }

    /// [`HbmTier::publish`] of a slot filled by [`HbmTier::copy_in`] from
    /// the host tier, counted as a promotion.
    pub fn publish_promotion(
        &self,
        slot: HbmSlot,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        checksum: u64,
    ) -> PutOutcome {
        let out = self.publish(slot, ns, key, parent, checksum);
        if out == PutOutcome::Stored {
            TierCounters::add(&self.inner.moves.promoted, 1);
        }
        out
    }
}

/// The next sources of a [`HbmTier::copy_in`]: about `group_bytes` (at
/// least one), in source address order, so that slots reserved in that
/// order (lowest free first) put blocks side by side in host memory side
/// by side in HBM, and they move as one run.
fn pull_group<T>(
    srcs: &mut impl Iterator<Item = (T, Bytes, Option<u64>)>,
    group_bytes: usize,
) -> Vec<(T, Bytes, Option<u64>)> {
    let mut pulled = Vec::new();
    let mut bytes = 0usize;
    while pulled.is_empty() || bytes < group_bytes {
        let Some(src) = srcs.next() else {
            break;
        };
        bytes += src.1.len();
        pulled.push(src);
    }
    pulled.sort_by_key(|(_, src, device)| device.unwrap_or(src.as_ptr() as u64));
    pulled
}
