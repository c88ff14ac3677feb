//! Moves between pinned host memory (the host tier's slots, staged misses)
//! and an engine's pages through device staging buffers
//! ([`kvstrata_kernels::DeviceStaging`]), at the speed of the DMA engines.
//!
//! A kernel reading page-locked host memory over PCIe reaches only about 0.6
//! of the pinned-copy ceiling; the DMA engines reach it. So:
//!
//! - **into pages** ([`scatter_from_host`]): per group of blocks (a staging
//!   buffer's worth), one batched DMA copy of their host bytes into a device
//!   buffer on the set's copy stream, then the caller's scatter from that
//!   buffer (device to device) on its own stream, after the copy's fence;
//! - **out of pages** ([`gather_to_host`]): per group, the caller's gather
//!   into a device buffer, then, after its fence, one batched DMA copy into
//!   the reserved host slots on the copy stream and `kvs_xxh3` of the buffer
//!   on the hash stream (the checksums, without reading the host copies).
//!
//! The set's buffers take turns: a group waits (on the device) for the
//! fences of the last group that used its buffer, so the next group's DMA
//! runs while this group's kernel does; the CPU queues every group without
//! waiting, then (out of pages) waits for the groups in order and hands each
//! one on as soon as its copy and hash completed, so the caller publishes it
//! while the later groups still move. Blocks are taken in host address order,
//! so slots that lie side by side move as one run (`GpuStream::copy_blocks`
//! merges them). Both functions return only once every copy, kernel and hash
//! they queued has completed, also when they fail (the streams are then
//! synchronised), so the caller may give the addresses and buffers back.
//!
//! A request that finds every set of the device lent waits for one
//! ([`kvstrata_kernels::DEVICE_STAGING_WAIT`]) rather than moving its blocks
//! with kernels over PCIe, which would run at about 0.6 of the link and slow
//! the requests that hold the sets.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use kvstrata_kernels::{
    CopyOp, DEVICE_STAGING_WAIT, DeviceStaging, Fence, Gpu, GpuError, GpuStream, HashRun,
};

use crate::hbm::DEFAULT_MOVE_GROUP_BYTES;
use crate::tier::TierKind;

/// Blocks by `(position in the request, address)`.
type Placed = Vec<(usize, u64)>;

/// How blocks move between a device and host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moves {
    /// Runs of at least this many bytes move with DMA, shorter ones with
    /// the batched-copy kernel.
    pub dma_threshold: u64,
    /// Bytes of blocks per group: the size of a device staging buffer.
    pub group_bytes: u64,
}

impl Default for Moves {
    fn default() -> Self {
        Moves {
            dma_threshold: kvstrata_kernels::DEFAULT_DMA_THRESHOLD,
            group_bytes: DEFAULT_MOVE_GROUP_BYTES,
        }
    }
}

/// A staging set of `gpu` whose buffers hold at least one block of `len`
/// bytes, for `n` blocks, waiting up to [`DEVICE_STAGING_WAIT`] for one when
/// every set is lent; `None` (nothing to move, every set still lent, no
/// device memory, or blocks larger than a buffer): the caller moves the
/// blocks straight from host memory.
pub(crate) fn lend(gpu: &Gpu, moves: Moves, len: usize, n: usize) -> Option<DeviceStaging> {
    lend_within(gpu, moves, len, n, DEVICE_STAGING_WAIT)
}

/// [`lend`] with another wait.
pub(crate) fn lend_within(
    gpu: &Gpu,
    moves: Moves,
    len: usize,
    n: usize,
    wait: Duration,
) -> Option<DeviceStaging> {
    if n == 0 || len == 0 {
        return None;
    }
    match gpu.device_staging_within(moves.group_bytes.max(len as u64) as usize, wait) {
        Ok(Some(set)) if set.buffer_bytes() >= len => Some(set),
        Ok(Some(_)) => {
            tracing::debug!(
                block_bytes = len,
                "device staging buffers are smaller than a block: moving straight from host memory"
            );
            None
        }
        Ok(None) => {
            tracing::debug!(
                wait_ms = wait.as_millis() as u64,
                "every device staging set is still lent after the wait: moving straight from host memory"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "device staging memory cannot be had (not tried again): blocks move between the host tier and engine pages straight from host memory, slower");
            None
        }
    }
}

/// The fill of [`crate::BlockCache::put_from_device_staged`]: the HBM
/// slots gathered straight into, the host slots through device staging
/// (or straight, without a set). `on_host[i]`: whether item `i`'s slot is
/// in host memory. Returns the checksums it knows (the host slots hashed on
/// the device), per item; every copy has completed when it returns, also on
/// an error.
///
/// Once every group is queued, each group of host slots whose copy and hash
/// have completed goes to `done(items, checksums)` while the later groups
/// still move (the caller publishes them then); a group is told only if
/// every group before it was, and nothing is told when queuing failed.
#[allow(clippy::too_many_arguments)]
pub(super) fn fill_staged<E: From<GpuError>>(
    gpu: &Gpu,
    moves: Moves,
    stream: &GpuStream,
    on_host: &[bool],
    addrs: &[u64],
    len: usize,
    gather: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
    done: &mut dyn FnMut(&[usize], &[u64]),
) -> Result<Vec<Option<u64>>, E> {
    let mut known = vec![None; on_host.len()];
    let (mut hbm, mut host): (Placed, Placed) = (Vec::new(), Vec::new());
    for (i, (&h, &addr)) in on_host.iter().zip(addrs).enumerate() {
        match h {
            false => hbm.push((i, addr)),
            true => host.push((i, addr)),
        }
    }
    // In host address order: neighbouring slots move as one run.
    host.sort_unstable_by_key(|&(_, addr)| addr);
    let set = lend(gpu, moves, len, host.len());
    let queued = (|| {
        if !hbm.is_empty() {
            let (at, to): (Vec<usize>, Vec<u64>) = hbm.iter().copied().unzip();
            gather(&at, &to)?;
        }
        let Some(set) = &set else {
            if !host.is_empty() {
                let (at, to): (Vec<usize>, Vec<u64>) = host.iter().copied().unzip();
                gather(&at, &to)?;
            }
            return Ok(());
        };
        // The checksums land in pinned memory, 8 bytes per host slot.
        let sums = gpu.staging(8 * host.len())?;
        let at = sums.host_ptr();
        gather_to_host(
            set,
            moves.dma_threshold,
            stream,
            &host,
            len,
            Some(sums.device_ptr()),
            gather,
            &mut |group: Range<usize>, hashed: bool| {
                if !hashed {
                    return; // hashed on the CPU by the caller
                }
                let items: Vec<usize> = host[group.clone()].iter().map(|&(i, _)| i).collect();
                let checksums: Vec<u64> = group
                    .map(|k| {
                        // SAFETY: `sums` holds 8 bytes per host slot, and the
                        // hash of this group, which wrote slot k's, has
                        // completed (nothing else writes them).
                        u64::from_le_bytes(unsafe {
                            std::ptr::read_unaligned(at.add(8 * k).cast::<[u8; 8]>())
                        })
                    })
                    .collect();
                for (&i, &c) in items.iter().zip(&checksums) {
                    known[i] = Some(c);
                }
                done(&items, &checksums);
            },
        )?;
        Ok::<(), E>(())
    })();
    let finished = finish(&[stream]);
    queued?;
    finished.map_err(E::from)?;
    Ok(known)
}

/// What [`crate::BlockCache::get_to_device_staged`] lends, for
/// [`scatter_lent`].
pub(super) struct Lent<'a> {
    /// Per key, the address and tier of its block (`None`: a miss).
    pub blocks: &'a [Option<(u64, TierKind)>],
    /// Per key, whether the address is in the device's own memory.
    pub on_device: &'a [bool],
    /// Per key position, an HBM slot to copy its block into from the staging
    /// buffer it passes through (its promotion), if any.
    pub promote_to: &'a HashMap<usize, u64>,
}

/// The use of the blocks [`crate::BlockCache::get_to_device_staged`] lends:
/// those in the device's memory scattered where they lie, those in host
/// memory through device staging (or straight, without a set), with the
/// promotion copies of `promote_to` from the staging buffers. Once every
/// copy and scatter is queued (none failed to queue), `queued` runs, before
/// the wait for their completion. Returns the blocks scattered and whether
/// the host blocks went through staging (so every promotion copy ran);
/// everything queued has completed when it returns.
pub(super) fn scatter_lent<E: From<GpuError>>(
    gpu: &Gpu,
    moves: Moves,
    stream: &GpuStream,
    lent: Lent<'_>,
    len: usize,
    scatter: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
    queued: impl FnOnce(),
) -> Result<(usize, bool), E> {
    let (mut device, mut host): (Placed, Placed) = (Vec::new(), Vec::new());
    for (i, (b, &dev)) in lent.blocks.iter().zip(lent.on_device).enumerate() {
        match b {
            Some((addr, _)) if dev => device.push((i, *addr)),
            Some((addr, _)) => host.push((i, *addr)),
            None => {}
        }
    }
    host.sort_unstable_by_key(|&(_, addr)| addr);
    let set = lend(gpu, moves, len, host.len());
    // The blocks in the device's memory first; then the host blocks, whose
    // staged path tells `queued` itself, before it waits for its copies (so
    // an answer can leave while they run); the other paths tell it here.
    let device_queued = match device.is_empty() {
        true => Ok(()),
        false => {
            let (at, from): (Vec<usize>, Vec<u64>) = device.iter().copied().unzip();
            scatter(&at, &from)
        }
    };
    let queued_ok = match (device_queued, &set) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(set)) => scatter_from_host(
            set,
            moves.dma_threshold,
            stream,
            &host,
            len,
            lent.promote_to,
            scatter,
            queued,
        ),
        (Ok(()), None) => {
            let host_queued = match host.is_empty() {
                true => Ok(()),
                false => {
                    let (at, from): (Vec<usize>, Vec<u64>) = host.iter().copied().unzip();
                    scatter(&at, &from)
                }
            };
            if host_queued.is_ok() {
                queued();
            }
            host_queued
        }
    };
    let done = finish(&[stream]);
    queued_ok?;
    done.map_err(E::from)?;
    Ok((device.len() + host.len(), set.is_some()))
}

/// Makes the work queued on `stream` from now on wait for every fence of
/// `after`.
fn wait_all(stream: &GpuStream, after: &[Fence]) -> Result<(), GpuError> {
    after.iter().try_for_each(|f| stream.wait_for(f))
}

/// Waits for everything queued on the streams; on a failure, still lets
/// every stream finish before returning the first error.
pub(super) fn finish(streams: &[&GpuStream]) -> Result<(), GpuError> {
    let mut first = None;
    for s in streams {
        if let Err(e) = s.record().and_then(|f| f.wait()) {
            let _ = s.synchronize();
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Blocks per group: as many as one buffer of the set holds (at least one;
/// [`lend`] only lends sets whose buffers hold a block).
fn per_group(set: &DeviceStaging, len: usize) -> usize {
    (set.buffer_bytes() / len.max(1)).max(1)
}

/// The first and the last group of a move hold at most this share of a
/// full group (`per / EDGE_SHARE` blocks, at least one).
const EDGE_SHARE: usize = 8;

/// Splits `blocks` into the groups of one move: full groups of `per` blocks
/// between a short first and a short last group (at most `per /
/// EDGE_SHARE` blocks each).
///
/// Only one side of the pipeline overlaps the other: out of pages, the DMA
/// of the first group waits for its whole gather, and into pages the last
/// group's scatter runs after its whole DMA. With full groups at the edges
/// that is a 64 MiB kernel (tens of microseconds) that nothing overlaps; the
/// short edges cut it to an eighth, and the middle keeps the large groups
/// whose fixed costs vanish beside their copies.
///
/// A move of at most one full group stays one group: its copies are short
/// enough that what the edges would overlap is small, while each extra group
/// is another kernel and copy the device must switch to — from an engine's
/// kernels, when that engine decodes while another stores.
fn edge_groups<T>(blocks: &[T], per: usize) -> Vec<&[T]> {
    let per = per.max(1);
    if blocks.len() <= per {
        return match blocks.is_empty() {
            true => Vec::new(),
            false => vec![blocks],
        };
    }
    let edge = (per / EDGE_SHARE).max(1);
    let mut groups = Vec::with_capacity(blocks.len() / per + 3);
    let mut rest = blocks;
    let first = rest.len().min(edge);
    let (head, tail) = rest.split_at(first);
    if !head.is_empty() {
        groups.push(head);
    }
    rest = tail;
    while !rest.is_empty() {
        // Leave a short last group, unless what is left is one already.
        let take = match rest.len() <= edge {
            true => rest.len(),
            false => per.min(rest.len() - edge),
        };
        let (group, tail) = rest.split_at(take);
        groups.push(group);
        rest = tail;
    }
    groups
}

/// Copies the blocks at `blocks` (`(position, host address)`, `len` bytes
/// each, readable by the device) into an engine's pages: per group, one DMA
/// into a staging buffer, then `scatter(positions, staged addresses)`, which
/// must queue (not wait for) the scatter of those positions' blocks on
/// `stream`; then, for each position of `promote_to`, a device-to-device
/// copy of its staged block to that address (an HBM slot of `len` bytes
/// reserved for the caller) on `stream`. Once every group is queued (none
/// failed to queue), `queued` runs, before the wait for their completion:
/// work recorded on `stream` after that point follows every copy and
/// scatter (the scatters wait for their copies' fences on `stream`).
/// Returns once everything queued has completed; on an error the groups
/// before it may have been written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_from_host<E: From<GpuError>>(
    set: &DeviceStaging,
    dma_threshold: u64,
    stream: &GpuStream,
    blocks: &[(usize, u64)],
    len: usize,
    promote_to: &HashMap<usize, u64>,
    scatter: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
    queued: impl FnOnce(),
) -> Result<(), E> {
    let copy = set.copy_stream();
    let all_queued = queue_scatters(set, dma_threshold, stream, blocks, len, promote_to, scatter);
    if all_queued.is_ok() {
        queued();
    }
    let done = finish(&[copy, stream]);
    all_queued?;
    done.map_err(E::from)
}

fn queue_scatters<E: From<GpuError>>(
    set: &DeviceStaging,
    dma_threshold: u64,
    stream: &GpuStream,
    blocks: &[(usize, u64)],
    len: usize,
    promote_to: &HashMap<usize, u64>,
    scatter: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
) -> Result<(), E> {
    let copy = set.copy_stream();
    let buffers = set.buffers();
    // Per buffer: the fence of the last scatter that read it.
    let mut read: Vec<Vec<Fence>> = buffers.iter().map(|_| Vec::new()).collect();
    let stride = len as u64;
    for (g, group) in edge_groups(blocks, per_group(set, len))
        .into_iter()
        .enumerate()
    {
        let b = g % buffers.len();
        let base = buffers[b].ptr();
        wait_all(copy, &std::mem::take(&mut read[b]))?;
        let ops: Vec<CopyOp> = group
            .iter()
            .enumerate()
            .map(|(j, &(_, src))| CopyOp {
                src,
                dst: base + j as u64 * stride,
                len: stride,
            })
            .collect();
        // SAFETY: the sources are the caller's readable blocks, unchanged
        // until this returns; the buffer is the set's, and no scatter still
        // reads it (the copy stream waits for the last one).
        unsafe { copy.copy_blocks(&ops, dma_threshold) }?;
        stream.wait_for(&copy.record()?)?;
        let positions: Vec<usize> = group.iter().map(|&(i, _)| i).collect();
        let staged: Vec<u64> = ops.iter().map(|op| op.dst).collect();
        scatter(&positions, &staged)?;
        let promotions: Vec<CopyOp> = positions
            .iter()
            .zip(&staged)
            .filter_map(|(p, &src)| {
                promote_to.get(p).map(|&dst| CopyOp {
                    src,
                    dst,
                    len: stride,
                })
            })
            .collect();
        if !promotions.is_empty() {
            // SAFETY: the staged blocks are complete (after the copy's fence)
            // and not written until the fence below; each destination is an
            // HBM slot reserved for the caller alone, kept until this returns.
            // Device to device: the batched kernel (a DMA would queue behind
            // the next group's copy in).
            unsafe { stream.copy_blocks(&promotions, u64::MAX) }?;
        }
        read[b].push(stream.record()?);
    }
    Ok(())
}

/// Writes the blocks of `slots` (`(position, device-reachable host slot
/// address)`, `len` bytes each) out of an engine's pages: per group,
/// `gather(positions, staged addresses)`, which must queue (not wait for)
/// the gather of those positions' blocks on `stream`, into a staging
/// buffer; then one DMA copy into the slots and, with `sums` (the device
/// address of `8 * slots.len()` writable bytes), `kvs_xxh3` of the staged
/// blocks into `sums + 8 * k` for the `k`-th slot.
///
/// Once every group is queued, it waits for them in order and tells
/// `done(range of slots, hashed)` of each as soon as its copy (and hash)
/// completed, so the caller can use those slots while the later groups still
/// move; after a failure (queuing, or a fence) it tells no more. Returns
/// whether every block was hashed (a hash launch that fails stops the
/// hashing; the caller then hashes the host copies), once everything queued
/// has completed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_to_host<E: From<GpuError>>(
    set: &DeviceStaging,
    dma_threshold: u64,
    stream: &GpuStream,
    slots: &[(usize, u64)],
    len: usize,
    sums: Option<u64>,
    gather: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
    done: &mut dyn FnMut(Range<usize>, bool),
) -> Result<bool, E> {
    let queued = queue_gathers(set, dma_threshold, stream, slots, len, sums, gather);
    let waited = match &queued {
        Ok((_, groups)) => groups.iter().try_for_each(|g| {
            g.copied.wait()?;
            if let Some(h) = &g.hashed {
                h.wait()?;
            }
            done(g.slots.clone(), g.hashed.is_some());
            Ok::<(), GpuError>(())
        }),
        Err(_) => Ok(()),
    };
    let finished = finish(&[stream, set.copy_stream(), set.hash_stream()]);
    let (hashed, _) = queued?;
    waited.map_err(E::from)?;
    finished.map_err(E::from)?;
    Ok(hashed)
}

/// A group queued by [`queue_gathers`]: its slots (a range of the request's)
/// and the fences of its copy into them and, if it was hashed, of its hash.
struct QueuedGroup {
    slots: Range<usize>,
    copied: Fence,
    hashed: Option<Fence>,
}

/// Queues the groups of [`gather_to_host`]; returns whether every block is
/// hashed, and the groups in order.
fn queue_gathers<E: From<GpuError>>(
    set: &DeviceStaging,
    dma_threshold: u64,
    stream: &GpuStream,
    slots: &[(usize, u64)],
    len: usize,
    mut sums: Option<u64>,
    gather: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
) -> Result<(bool, Vec<QueuedGroup>), E> {
    let (copy, hash) = (set.copy_stream(), set.hash_stream());
    let buffers = set.buffers();
    let mut groups: Vec<QueuedGroup> = Vec::new();
    // Per buffer: the last group staged in it (whose copy out of it and
    // hash the next gather into it waits for).
    let mut last: Vec<Option<usize>> = vec![None; buffers.len()];
    let stride = len as u64;
    // The checksum of the k-th slot goes to `sums + 8 * k`.
    let mut first_slot = 0;
    for (g, group) in edge_groups(slots, per_group(set, len))
        .into_iter()
        .enumerate()
    {
        let b = g % buffers.len();
        let base = buffers[b].ptr();
        if let Some(prev) = last[b].and_then(|p| groups.get(p)) {
            stream.wait_for(&prev.copied)?;
            prev.hashed.iter().try_for_each(|h| stream.wait_for(h))?;
        }
        let positions: Vec<usize> = group.iter().map(|&(i, _)| i).collect();
        let staged: Vec<u64> = (0..group.len() as u64).map(|j| base + j * stride).collect();
        gather(&positions, &staged)?;
        let gathered = stream.record()?;
        copy.wait_for(&gathered)?;
        let ops: Vec<CopyOp> = group
            .iter()
            .zip(&staged)
            .map(|(&(_, dst), &src)| CopyOp {
                src,
                dst,
                len: stride,
            })
            .collect();
        // SAFETY: the slots are reserved for the caller's put alone and stay
        // so until this returns; the buffer was written by the gather the
        // copy stream waits for, and nothing writes it until this copy's
        // fence (the next gather into it waits).
        unsafe { copy.copy_blocks(&ops, dma_threshold) }?;
        let copied = copy.record()?;
        let mut hashed = None;
        if let Some(out) = sums {
            let runs: Vec<HashRun> = staged
                .iter()
                .map(|&addr| HashRun { addr, len: stride })
                .collect();
            let at = out + 8 * first_slot as u64;
            hash.wait_for(&gathered)?;
            // SAFETY: the staged blocks are not written until the fence
            // recorded below (the next gather into the buffer waits for
            // it); `out` holds 8 bytes per slot, the caller's until this
            // returns.
            match unsafe { hash.xxh3(&runs, at) } {
                Ok(()) => hashed = Some(hash.record()?),
                Err(e) => {
                    tracing::warn!(error = %e, "device staging: hashing on the device failed; the host copies are hashed instead");
                    sums = None;
                }
            }
        }
        last[b] = Some(groups.len());
        groups.push(QueuedGroup {
            slots: first_slot..first_slot + group.len(),
            copied,
            hashed,
        });
        first_slot += group.len();
    }
    Ok((sums.is_some(), groups))
}

#[cfg(test)]
mod tests {
    use kvstrata_kernels::{Gpu, GpuError};
    use rand::{Rng, SeedableRng};

    use super::*;

    #[derive(Debug, PartialEq)]
    enum TestError {
        Gpu(String),
        Refused(usize),
    }

    impl From<GpuError> for TestError {
        fn from(e: GpuError) -> Self {
            TestError::Gpu(e.to_string())
        }
    }

    fn random(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
        (0..len).map(|_| rng.random_range(1..=255u8)).collect()
    }

    /// Groups cover the blocks in order, none larger than a buffer, with
    /// short first and last groups once there is more than one.
    #[test]
    fn groups_are_full_between_short_edges() {
        for per in [1usize, 3, 8, 32, 33] {
            let edge = (per / EDGE_SHARE).max(1);
            for n in 0..200usize {
                let blocks: Vec<usize> = (0..n).collect();
                let groups = edge_groups(&blocks, per);
                let flat: Vec<usize> = groups.iter().flat_map(|g| g.iter().copied()).collect();
                assert_eq!(flat, blocks, "per {per}, n {n}");
                assert!(groups.iter().all(|g| !g.is_empty() && g.len() <= per));
                if n <= per {
                    // One group at most: no short edges.
                    assert_eq!(groups.len(), usize::from(n > 0), "per {per}, n {n}");
                    continue;
                }
                if let (Some(first), Some(last)) = (groups.first(), groups.last()) {
                    assert!(
                        first.len() <= edge && last.len() <= edge,
                        "per {per}, n {n}"
                    );
                }
                // Between the edges every group is full but one, the one
                // before the last, which takes what a full group leaves.
                let middle = groups.len().saturating_sub(3);
                assert!(groups.iter().skip(1).take(middle).all(|g| g.len() == per));
            }
        }
        let blocks: Vec<usize> = (0..256).collect();
        let sizes: Vec<usize> = edge_groups(&blocks, 32).iter().map(|g| g.len()).collect();
        assert_eq!(sizes, [4, 32, 32, 32, 32, 32, 32, 32, 24, 4]);
        let sizes: Vec<usize> = edge_groups(&blocks[..32], 32)
            .iter()
            .map(|g| g.len())
            .collect();
        assert_eq!(sizes, [32]);
        let sizes: Vec<usize> = edge_groups(&blocks[..33], 32)
            .iter()
            .map(|g| g.len())
            .collect();
        assert_eq!(sizes, [4, 25, 4]);
    }

    /// Every block through sets of two buffers of three blocks (so groups
    /// cycle over both buffers, the last one short), both ways, with the
    /// checksums of the staged blocks.
    #[test]
    fn groups_cycle_over_the_buffers_both_ways_byte_for_byte() {
        let len = 100usize;
        let gpu = Gpu::cpu();
        gpu.set_device_staging_bytes(3 * len);
        let moves = Moves {
            dma_threshold: 1,
            group_bytes: 1 << 20,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for n in [1usize, 2, 3, 5, 7, 13] {
            let set = lend(&gpu, moves, len, n).expect("a set");
            assert_eq!(set.buffer_bytes(), 3 * len);
            let stream = gpu.stream().unwrap();
            // "Pages": one block per position, written by the "scatter".
            let host = random(&mut rng, n * len);
            let mut pages = vec![0u8; n * len];
            let blocks: Vec<(usize, u64)> = (0..n)
                .rev()
                .map(|i| (i, host.as_ptr() as u64 + (i * len) as u64))
                .collect();
            let groups = std::cell::Cell::new(0);
            // Groups queued when told (told once).
            let mut told = Vec::new();
            // Every third block also copied ("promoted") into `promoted`.
            let mut promoted = vec![0u8; n * len];
            let targets: HashMap<usize, u64> = (0..n)
                .step_by(3)
                .map(|i| (i, promoted.as_mut_ptr() as u64 + (i * len) as u64))
                .collect();
            scatter_from_host(
                &set,
                moves.dma_threshold,
                &stream,
                &blocks,
                len,
                &targets,
                &mut |pos: &[usize], staged: &[u64]| -> Result<(), TestError> {
                    groups.set(groups.get() + 1);
                    assert!(pos.len() <= 3);
                    for (&p, &a) in pos.iter().zip(staged) {
                        // SAFETY: a staged block of `len` bytes.
                        let b = unsafe { std::slice::from_raw_parts(a as *const u8, len) };
                        pages[p * len..(p + 1) * len].copy_from_slice(b);
                    }
                    Ok(())
                },
                || told.push(groups.get()),
            )
            .expect("scatter");
            assert_eq!(groups.get(), edge_groups(&blocks, 3).len());
            assert_eq!(told, vec![groups.get()], "told once, every group queued");
            assert!(pages == host, "{n} blocks scattered");
            for i in 0..n {
                let got = &promoted[i * len..(i + 1) * len];
                match targets.contains_key(&i) {
                    true => assert!(got == &host[i * len..(i + 1) * len], "promoted {i}"),
                    false => assert!(got.iter().all(|&b| b == 0), "not promoted {i}"),
                }
            }

            // And back out: "gather" the pages into staged blocks, copied
            // into slots in another order, hashed.
            let mut slots_mem = vec![0u8; n * len];
            let base = slots_mem.as_mut_ptr() as u64;
            let slots: Vec<(usize, u64)> = (0..n)
                .map(|k| ((k * 5) % n, base + (k * len) as u64))
                .collect();
            let mut sums = vec![0u8; 8 * n];
            let mut told: Vec<(Range<usize>, bool)> = Vec::new();
            let hashed = gather_to_host(
                &set,
                moves.dma_threshold,
                &stream,
                &slots,
                len,
                Some(sums.as_mut_ptr() as u64),
                &mut |pos: &[usize], staged: &[u64]| -> Result<(), TestError> {
                    for (&p, &a) in pos.iter().zip(staged) {
                        // SAFETY: a staged buffer of `len` bytes.
                        let b = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, len) };
                        b.copy_from_slice(&pages[p * len..(p + 1) * len]);
                    }
                    Ok(())
                },
                &mut |group, hashed| told.push((group, hashed)),
            )
            .expect("gather");
            assert!(hashed);
            // Every group told once, in order, hashed.
            let mut next = 0;
            for (group, hashed) in &told {
                assert_eq!(group.start, next, "groups told in order");
                assert!(group.end > group.start && *hashed);
                next = group.end;
            }
            assert_eq!(next, n, "every slot told");
            for (k, &(p, _)) in slots.iter().enumerate() {
                let want = &host[p * len..(p + 1) * len];
                assert!(&slots_mem[k * len..(k + 1) * len] == want, "slot {k}");
                let sum = u64::from_le_bytes(sums[8 * k..8 * k + 8].try_into().unwrap());
                assert_eq!(sum, xxhash_rust::xxh3::xxh3_64(want), "checksum {k}");
            }
        }
    }

    #[test]
    fn a_failing_group_stops_the_rest_and_returns_its_error() {
        let len = 64usize;
        let gpu = Gpu::cpu();
        gpu.set_device_staging_bytes(2 * len);
        let set = lend(&gpu, Moves::default(), len, 9).expect("a set");
        let stream = gpu.stream().unwrap();
        let mut slots_mem = vec![0u8; 9 * len];
        let base = slots_mem.as_mut_ptr() as u64;
        let slots: Vec<(usize, u64)> = (0..9).map(|k| (k, base + (k * len) as u64)).collect();
        let mut calls = 0;
        let mut told: Vec<Range<usize>> = Vec::new();
        let e = gather_to_host(
            &set,
            1,
            &stream,
            &slots,
            len,
            None,
            &mut |pos: &[usize], staged: &[u64]| {
                calls += 1;
                if calls == 3 {
                    return Err(TestError::Refused(pos[0]));
                }
                for &a in staged {
                    // SAFETY: a staged buffer of `len` bytes.
                    unsafe { std::slice::from_raw_parts_mut(a as *mut u8, len) }.fill(9);
                }
                Ok(())
            },
            &mut |group, _| told.push(group),
        )
        .expect_err("the third group fails");
        assert!(
            told.is_empty(),
            "no group told when queuing failed: {told:?}"
        );
        // Groups of 1, 2, 2, ...: the third starts at block 3.
        assert_eq!(e, TestError::Refused(3));
        assert_eq!(calls, 3, "nothing after the failure");
        // The groups before it were copied, nothing after.
        assert!(slots_mem[..3 * len].iter().all(|&b| b == 9));
        assert!(slots_mem[3 * len..].iter().all(|&b| b == 0));
    }

    /// A host-tier-only cache on the CPU backend (as `--gpu-hbm-bytes 0`)
    /// with staging buffers of two blocks, and a namespace of 256-byte
    /// blocks.
    fn host_cache() -> (crate::BlockCache, crate::NamespaceId, usize) {
        let config = crate::CacheConfig {
            host: crate::HostTierConfig {
                capacity_bytes: 1 << 20,
                segment_bytes: 1 << 20,
            },
            ..Default::default()
        };
        let c = crate::BlockCache::with_gpus(config, vec![Gpu::cpu()]).unwrap();
        let spec =
            crate::NamespaceSpec::layer_major("m", 2, 1, 16, crate::namespace::Dtype::F16, 2);
        let (ns, _) = c.register_namespace(spec).unwrap();
        let len = ns.block_bytes as usize;
        c.gpus()[0].set_device_staging_bytes(2 * len);
        (c, ns.id, len)
    }

    fn k(i: usize) -> crate::BlockKey {
        crate::BlockKey::new("k", format!("b{i}").as_bytes()).unwrap()
    }

    fn host_used(c: &crate::BlockCache) -> u64 {
        let s = c.stats();
        let (_, host) = s.tiers.iter().find(|(t, _)| *t == TierKind::Host).unwrap();
        host.used_bytes
    }

    /// "Gathers" block `i` as `len` bytes of `i + 1`.
    fn fill(len: usize) -> impl FnMut(&[usize], &[u64]) -> Result<(), TestError> {
        move |pos: &[usize], to: &[u64]| {
            for (&i, &a) in pos.iter().zip(to) {
                // SAFETY: a staged block of `len` bytes.
                unsafe { std::slice::from_raw_parts_mut(a as *mut u8, len) }.fill(i as u8 + 1);
            }
            Ok(())
        }
    }

    #[test]
    fn a_put_failing_in_its_third_group_stores_nothing() {
        let (c, ns, len) = host_cache();
        let stream = Gpu::cpu().stream().unwrap();
        let items: Vec<_> = (0..7).map(|i| (k(i), None)).collect();
        let mut calls = 0;
        let mut ok = fill(len);
        let e = c
            .put_from_device_staged(&ns, 0, &items, &stream, |pos: &[usize], to: &[u64]| {
                calls += 1;
                if calls == 3 {
                    return Err(TestError::Refused(pos[0]));
                }
                ok(pos, to)
            })
            .expect_err("fails");
        assert!(
            matches!(e, crate::DevicePutError::Fill(TestError::Refused(_))),
            "{e:?}"
        );
        let keys: Vec<_> = (0..7).map(k).collect();
        assert!(c.lookup(&ns, &keys).unwrap().is_empty(), "nothing stored");
        assert_eq!(host_used(&c), 0, "every slot freed");

        // The same put without the failure: every block, with its checksum.
        let out = c
            .put_from_device_staged(&ns, 0, &items, &stream, fill(len))
            .unwrap();
        assert_eq!(out, vec![crate::PutOutcome::Stored; 7]);
        for (i, key) in keys.iter().enumerate() {
            let seen = c.inspect(&ns, key).unwrap().unwrap();
            assert!(seen.checksum_ok(), "block {i}");
            let (bytes, tier) = c.get_batch(&ns, &[*key]).unwrap().remove(0).unwrap();
            assert_eq!(tier, TierKind::Host);
            assert!(bytes.iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
        assert!(c.gpus()[0].device_staging_bytes() > 0, "through staging");

        // A get whose second group fails: its error, every key found.
        let mut calls = 0;
        let mut pages = vec![0u8; 8 * len];
        let mut missing = keys.clone();
        missing.insert(3, k(99));
        let mut told = None;
        let (found, scattered) = c
            .get_to_device_staged(
                &ns,
                0,
                &missing,
                &stream,
                |pos: &[usize], from: &[u64]| {
                    calls += 1;
                    if calls == 2 {
                        return Err(TestError::Refused(pos[0]));
                    }
                    copy_lent(&mut pages, len, pos, from);
                    Ok(())
                },
                |f: &[Option<TierKind>]| told = Some(f.to_vec()),
            )
            .unwrap();
        assert!(matches!(scattered, Err(TestError::Refused(_))));
        assert_eq!(calls, 2, "no group after the failure");
        assert_eq!(found.iter().filter(|f| f.is_some()).count(), 7);
        assert_eq!(found[3], None);
        assert_eq!(told, None, "not queued: nobody is told so");

        // The same get, every group queued: told once, before the copies
        // complete, with what was found (each block written by then on this
        // CPU backend, whose copies run as they are queued).
        let mut pages = vec![0u8; 8 * len];
        let mut told = None;
        let (found, scattered) = c
            .get_to_device_staged(
                &ns,
                0,
                &missing,
                &stream,
                |pos: &[usize], from: &[u64]| {
                    copy_lent(&mut pages, len, pos, from);
                    Ok::<(), TestError>(())
                },
                |f: &[Option<TierKind>]| {
                    assert!(told.is_none(), "told twice");
                    told = Some(f.to_vec());
                },
            )
            .unwrap();
        assert_eq!(scattered.unwrap(), 7);
        assert_eq!(told.as_deref(), Some(&found[..]));
        for (p, key) in missing.iter().enumerate() {
            let want = match c.get_batch(&ns, &[*key]).unwrap().remove(0) {
                Some((bytes, _)) => bytes.to_vec(),
                None => vec![0u8; len],
            };
            assert_eq!(&pages[p * len..(p + 1) * len], &want[..], "page {p}");
        }
    }

    #[test]
    fn a_key_twice_in_a_staged_put_keeps_its_last_item() {
        // Two items of one key in groups far apart (1, 2, 2, 1, 1 blocks:
        // staging of two blocks): the request answers as if published in
        // item order, whatever order its groups complete in.
        let (c, ns, len) = host_cache();
        let stream = Gpu::cpu().stream().unwrap();
        let mut items: Vec<_> = (0..6).map(|i| (k(i), None)).collect();
        items.push((k(0), Some(k(5))));
        let out = c
            .put_from_device_staged(&ns, 0, &items, &stream, fill(len))
            .unwrap();
        assert_eq!(out, vec![crate::PutOutcome::Stored; 7]);
        let (bytes, _) = c.get_batch(&ns, &[k(0)]).unwrap().remove(0).unwrap();
        assert!(bytes.iter().all(|&b| b == 7), "the last item's bytes");
        assert!(c.inspect(&ns, &k(0)).unwrap().unwrap().checksum_ok());
        for i in 1..6 {
            let (bytes, _) = c.get_batch(&ns, &[k(i)]).unwrap().remove(0).unwrap();
            assert!(bytes.iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
        assert_eq!(host_used(&c), 6 * len as u64, "the first item's slot freed");
    }

    /// The test's scatter: copies the lent blocks at `from` (`len` bytes
    /// each, readable host memory on this CPU backend) to the pages of
    /// positions `pos`.
    fn copy_lent(pages: &mut [u8], len: usize, pos: &[usize], from: &[u64]) {
        for (&p, &a) in pos.iter().zip(from) {
            // SAFETY: a lent block of `len` bytes.
            let b = unsafe { std::slice::from_raw_parts(a as *const u8, len) };
            pages[p * len..(p + 1) * len].copy_from_slice(b);
        }
    }

    #[test]
    fn no_set_for_blocks_larger_than_a_buffer_or_when_all_are_lent() {
        let gpu = Gpu::cpu();
        gpu.set_device_staging_bytes(1000);
        assert!(lend(&gpu, Moves::default(), 1001, 1).is_none());
        assert!(lend(&gpu, Moves::default(), 10, 0).is_none());
        let held: Vec<_> = (0..kvstrata_kernels::DEVICE_STAGING_SETS)
            .map(|_| lend(&gpu, Moves::default(), 1000, 1).expect("a set"))
            .collect();
        let none = Duration::ZERO;
        assert!(lend_within(&gpu, Moves::default(), 1000, 1, none).is_none());
        let short = Duration::from_millis(20);
        assert!(lend_within(&gpu, Moves::default(), 1000, 1, short).is_none());
        let counts = gpu.device_staging_counts();
        assert_eq!((counts.waits, counts.bypasses), (1, 2), "{counts:?}");
        drop(held);
        assert!(lend(&gpu, Moves::default(), 1000, 1).is_some());
    }

    #[test]
    fn a_request_finding_every_set_lent_waits_for_one_to_come_back() {
        let gpu = Gpu::cpu();
        gpu.set_device_staging_bytes(1000);
        let mut held: Vec<_> = (0..kvstrata_kernels::DEVICE_STAGING_SETS)
            .map(|_| lend(&gpu, Moves::default(), 1000, 1).expect("a set"))
            .collect();
        let first = held[0].buffers()[0].ptr();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let gpu = gpu.clone();
            std::thread::spawn(move || {
                tx.send(()).unwrap();
                // Long enough never to run out on a loaded machine: the set
                // comes back as soon as the main thread drops it.
                lend_within(&gpu, Moves::default(), 1000, 1, Duration::from_secs(60))
                    .map(|set| set.buffers()[0].ptr())
            })
        };
        rx.recv().unwrap();
        // Whether or not the waiter is asleep yet, it gets the returned set.
        drop(held.remove(0));
        assert_eq!(waiter.join().unwrap(), Some(first), "the set given back");
        let counts = gpu.device_staging_counts();
        assert_eq!(counts.bypasses, 0, "{counts:?}");
        assert!(counts.waits <= 1, "{counts:?}");
    }
}
