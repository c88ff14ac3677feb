//! The CUDA-IPC data path: blocks a device writes into reserved slots
//! ([`BlockCache::put_from_device`]) and blocks lent to a device by address
//! ([`BlockCache::get_to_device`]), then promoted into its HBM tier
//! ([`BlockCache::promote_to_hbm`]). The `_staged` variants
//! ([`BlockCache::put_from_device_staged`],
//! [`BlockCache::get_to_device_staged`]) move the blocks that lie in host
//! memory through device staging buffers with DMA ([`staged`]).

mod staged;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;
use kvstrata_kernels::{Gpu, GpuError, GpuStream, StagingBuffer};
use rayon::prelude::*;

use super::put::drop_disk_copy;
use super::{BlockCache, DevicePutError};
use crate::disk::DiskPut;
use crate::disk::checksum::xxh3_64;
use crate::error::CacheError;
use crate::hbm::{HbmRead, HbmSlot, HbmTier};
use crate::host::HostSlot;
use crate::key::BlockKey;
use crate::namespace::{Namespace, NamespaceId};
use crate::tier::{PutOutcome, RemoveReason, Tier, TierKind};

/// A host-tier block lent by `get_to_device`, kept for its promotion.
struct HostRead {
    /// Its position in the request's keys (`usize::MAX`: read again later).
    pos: usize,
    key: BlockKey,
    bytes: Bytes,
    parent: Option<BlockKey>,
    checksum: u64,
    /// The key's stripe epoch, read before the bytes.
    epoch: u64,
}

/// A slot reserved by `put_from_device`.
enum DeviceSlot {
    Hbm(HbmSlot),
    Host(HostSlot),
}

impl DeviceSlot {
    fn addr(&self) -> u64 {
        match self {
            DeviceSlot::Hbm(s) => s.addr(),
            DeviceSlot::Host(s) => s.device_addr().unwrap_or(s.host_addr()),
        }
    }
}

/// Where a device put's bytes must also go: the write-through policies.
#[derive(Clone, Copy)]
struct WriteThrough {
    remote: bool,
    disk: bool,
    /// The disk write runs before the put answers (`sync_write_through`).
    sync: bool,
}

impl WriteThrough {
    /// Whether the blocks' bytes are needed on the host (kept as copies).
    fn keeps_bytes(self) -> bool {
        self.remote || self.disk
    }
}

/// Blocks lent in place by `get_to_device`, and the keys it must stage.
#[derive(Default)]
struct InPlace {
    addrs: Vec<Option<(u64, TierKind)>>,
    hbm_reads: Vec<HbmRead>,
    /// With promotion on, with their metadata and stripe epoch (read
    /// first), so the promotion reuses these reads.
    host_reads: Vec<HostRead>,
    /// Positions found in neither.
    missed: Vec<usize>,
}

impl BlockCache {
    fn check_device(&self, device: usize) -> Result<&Gpu, CacheError> {
        self.gpus.get(device).ok_or_else(|| {
            CacheError::invalid(
                "device",
                format!(
                    "device {device} does not exist (the daemon has {} GPU{})",
                    self.gpus.len(),
                    if self.gpus.len() == 1 { "" } else { "s" }
                ),
            )
        })
    }

    /// Stores blocks whose bytes a device writes (the CUDA-IPC data path).
    ///
    /// Reserves a slot per item — in device `device`'s HBM tier, or in the
    /// (pinned) host tier when there is no HBM tier or it has no room —
    /// then calls `fill` once with the device-reachable address of every
    /// slot, in item order (`block_bytes` of the namespace each). `fill` must
    /// have written them all, and waited for its copies to complete, when it
    /// returns. The slots are then read back for their xxh3-64 checksums
    /// and published; any older version of each key leaves every tier, as
    /// with [`BlockCache::put_batch`] (and the namespace's write-through
    /// policies apply).
    ///
    /// All or nothing: when some slot cannot be reserved (everything
    /// evictable is pinned or being read) `fill` is not called and every item
    /// answers `NoSpace`; when `fill` fails every slot is freed and its error
    /// returned. Items are validated first (a block cannot be its own
    /// parent; `device` must exist); an empty batch does not call `fill`.
    pub fn put_from_device<E>(
        &self,
        ns: &NamespaceId,
        device: usize,
        items: &[(BlockKey, Option<BlockKey>)],
        fill: impl FnOnce(&[u64]) -> Result<(), E>,
    ) -> Result<Vec<PutOutcome>, DevicePutError<E>> {
        self.put_device_slots(ns, device, items, |on_host, addrs, _, _| {
            fill(addrs).map_err(DevicePutError::Fill)?;
            Ok(vec![None; on_host.len()])
        })
    }

    /// [`BlockCache::put_from_device`] for a writer that queues its copies
    /// on a stream of device `device` (an engine's gather): `gather(positions,
    /// addresses)` must queue on `stream`, without waiting, the writes of
    /// the blocks of those item positions to those addresses (`block_bytes`
    /// each); it is called once per group, for every item once.
    ///
    /// Items whose slot is in the HBM tier are gathered straight into it (one
    /// call). Items whose slot is in the pinned host tier are gathered into
    /// device staging buffers a group at a time, copied out into their slots
    /// with DMA and hashed on the device while the next group is gathered
    /// ([`staged`]); without a staging set (every set lent, no device
    /// memory) they are gathered straight into their slots and hashed on
    /// the CPU, as [`BlockCache::put_from_device`] does.
    ///
    /// Slots are reserved all or none before anything is gathered, and no
    /// block is published before its copy has completed and its checksum is
    /// known. Once every group is queued, each staged group is published as
    /// soon as its copy and hash complete, while the later groups still move
    /// (publishing 256 blocks takes about 0.2 ms that would otherwise follow
    /// the last copy); the other items are published at the end, and all of
    /// them at the end when a key appears twice (its last item wins). A
    /// failure to queue (a `gather` call, a launch) frees every slot and
    /// stores nothing; a copy or fence that fails afterwards frees every
    /// slot not published yet and returns the error, leaving the groups
    /// already published (complete and checked) stored. Errors of the
    /// device's own copies come as `E::from`.
    pub fn put_from_device_staged<E: From<GpuError>>(
        &self,
        ns: &NamespaceId,
        device: usize,
        items: &[(BlockKey, Option<BlockKey>)],
        stream: &GpuStream,
        mut gather: impl FnMut(&[usize], &[u64]) -> Result<(), E>,
    ) -> Result<Vec<PutOutcome>, DevicePutError<E>> {
        let gpu = self.check_device(device)?;
        let moves = self.device_moves(device);
        self.put_device_slots(ns, device, items, |on_host, addrs, len, done| {
            staged::fill_staged(gpu, moves, stream, on_host, addrs, len, &mut gather, done)
                .map_err(DevicePutError::Fill)
        })
    }

    /// How blocks move between device `device` and host memory: the HBM
    /// tier's settings (`gpu.dma_threshold`, `gpu.move_group_bytes`), or
    /// their defaults without an HBM tier.
    fn device_moves(&self, device: usize) -> staged::Moves {
        if let Some(m) = self.config().device_moves {
            return staged::Moves {
                dma_threshold: m.dma_threshold,
                group_bytes: m.group_bytes,
            };
        }
        self.hbm
            .get(device)
            .map_or_else(staged::Moves::default, |h| staged::Moves {
                dma_threshold: h.config().dma_threshold,
                group_bytes: h.config().move_group_bytes,
            })
    }

    /// The body of both device puts: validates, reserves a slot per item,
    /// calls `fill(on host, slot addresses, block bytes, done)` (which
    /// returns the checksums it already knows, per item), computes the
    /// others and publishes. Items `fill` hands to `done(items, checksums)`
    /// (copied and hashed while later ones still move) are published there
    /// and then, unless a key appears twice in the request (its last item
    /// must win, so the request publishes in item order at the end).
    fn put_device_slots<E>(
        &self,
        ns: &NamespaceId,
        device: usize,
        items: &[(BlockKey, Option<BlockKey>)],
        fill: impl FnOnce(
            &[bool],
            &[u64],
            usize,
            &mut dyn FnMut(&[usize], &[u64]),
        ) -> Result<Vec<Option<u64>>, DevicePutError<E>>,
    ) -> Result<Vec<PutOutcome>, DevicePutError<E>> {
        let namespace = self.namespace("namespace_id", ns)?;
        self.check_device(device)?;
        for (i, (key, parent)) in items.iter().enumerate() {
            if parent.as_ref() == Some(key) {
                return Err(CacheError::invalid(
                    format!("items[{i}].parent"),
                    "a block cannot be its own parent",
                )
                .into());
            }
        }
        let _open = self.admit_write()?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let began = Instant::now();
        let len = namespace.block_bytes as usize;
        let hbm = self.hbm.get(device);
        let Some(slots) = self.reserve_device_slots(hbm, len, items.len()) else {
            return Ok(vec![PutOutcome::NoSpace; items.len()]);
        };
        let reserved = began.elapsed();
        let addrs: Vec<u64> = slots.iter().map(DeviceSlot::addr).collect();
        let on_host: Vec<bool> = slots
            .iter()
            .map(|s| matches!(s, DeviceSlot::Host(_)))
            .collect();
        let through = self.write_through_of(&namespace);
        // Decided at the first group told, while the later ones still copy.
        let mut early: Option<bool> = None;
        let mut slots: Vec<Option<DeviceSlot>> = slots.into_iter().map(Some).collect();
        let mut out: Vec<Option<PutOutcome>> = vec![None; items.len()];
        let mut published_early = 0usize;
        let known = fill(
            &on_host,
            &addrs,
            len,
            &mut |at: &[usize], checksums: &[u64]| {
                if !*early.get_or_insert_with(|| distinct_keys(items)) {
                    return;
                }
                for (&i, &checksum) in at.iter().zip(checksums) {
                    let (Some(slot), Some((key, parent))) =
                        (slots.get_mut(i).and_then(Option::take), items.get(i))
                    else {
                        continue;
                    };
                    let outcome = self.publish_device_put(
                        ns,
                        hbm,
                        (key, parent.as_ref()),
                        slot,
                        Some(checksum),
                        None,
                        through,
                    );
                    out[i] = Some(outcome);
                    published_early += 1;
                }
            },
        )?;
        let filled = began.elapsed();
        // The slots not published yet, in item order.
        let (rest, rest_slots): (Vec<usize>, Vec<DeviceSlot>) = slots
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .unzip();
        let rest_addrs: Vec<u64> = rest.iter().map(|&i| addrs[i]).collect();
        let rest_known: Vec<Option<u64>> = rest
            .iter()
            .map(|&i| known.get(i).copied().flatten())
            .collect();
        let (checksums, mut copies) =
            device_checksums(hbm, &rest_slots, &rest_addrs, len, through, rest_known)?;
        let hashed = began.elapsed();
        for (j, (&i, slot)) in rest.iter().zip(rest_slots).enumerate() {
            let (key, parent) = &items[i];
            out[i] = Some(self.publish_device_put(
                ns,
                hbm,
                (key, parent.as_ref()),
                slot,
                checksums[j],
                copies[j].take(),
                through,
            ));
        }
        // (Fields are evaluated only when the line is logged.)
        tracing::debug!(
            blocks = items.len(),
            slot_runs = slot_runs(&addrs, len),
            published_early,
            reserve_us = reserved.as_micros() as u64,
            fill_us = (filled - reserved).as_micros() as u64,
            checksum_us = (hashed - filled).as_micros() as u64,
            publish_us = (began.elapsed() - hashed).as_micros() as u64,
            "device put (reserve: slots; fill: copies queued and completed, the blocks \
             published_early meanwhile; checksum: those the fill did not compute; publish: the \
             others, under the stripe locks)"
        );
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or(PutOutcome::NoSpace))
            .collect())
    }

    /// A slot per item: in the HBM tier if it has room, else in the pinned
    /// host tier; `None` (the reserved ones freed) when one cannot be had.
    fn reserve_device_slots(
        &self,
        hbm: Option<&HbmTier>,
        len: usize,
        n: usize,
    ) -> Option<Vec<DeviceSlot>> {
        let mut slots: Vec<DeviceSlot> = Vec::with_capacity(n);
        // The HBM tier's while it has room, then the host tier's, all at once.
        if let Some(h) = hbm {
            while slots.len() < n {
                match h.reserve(len) {
                    Some(s) => slots.push(DeviceSlot::Hbm(s)),
                    None => break,
                }
            }
        }
        if slots.len() < n {
            for s in self.host.reserve_many(len, n - slots.len())? {
                // A host tier whose memory no device reaches cannot take them.
                s.device_addr()?;
                slots.push(DeviceSlot::Host(s));
            }
        }
        Some(slots)
    }

    fn write_through_of(&self, namespace: &Namespace) -> WriteThrough {
        WriteThrough {
            remote: self
                .remote
                .as_ref()
                .is_some_and(|r| namespace.policy.remote_write_through || r.config().write_through),
            disk: self.disk.is_some() && namespace.policy.writes_to_disk(),
            sync: self.disk.is_some() && namespace.policy.sync_write_through,
        }
    }

    /// Publishes one filled device slot under its key's stripe lock, after
    /// the older version left every tier (T0 first, so no T0 demotion of it
    /// can reach the host tier afterwards); queues the write-throughs of a
    /// stored block (none of a refused one), or with `sync` writes it to
    /// disk first: a failed disk write takes it out of every tier again
    /// (`DiskFailed`).
    #[allow(clippy::too_many_arguments)]
    fn publish_device_put(
        &self,
        ns: &NamespaceId,
        hbm: Option<&HbmTier>,
        (key, parent): (&BlockKey, Option<&BlockKey>),
        slot: DeviceSlot,
        checksum: Option<u64>,
        mut copy: Option<Bytes>,
        through: WriteThrough,
    ) -> PutOutcome {
        let _stripe = self.write_stripe(ns, key);
        self.drop_hbm_copies(ns, key, None);
        // Waits for a host eviction handing the old block on.
        self.host.remove(ns, key, RemoveReason::Delete);
        if let Some(d) = &self.disk {
            d.demoter.forget(ns, key);
            if d.tier.contains(ns, key) {
                d.tier.remove(ns, key, RemoveReason::Delete);
            }
        }
        if let DeviceSlot::Host(s) = &slot
            && through.keeps_bytes()
        {
            copy = Some(Bytes::copy_from_slice(s.as_slice()));
        }
        // Before the publish: the old block can no longer be evicted, and a
        // demotion of the new block that races with this put then queues its
        // write after this. A write-through that must wait for the outcome
        // (a sync put, or a refused one) is queued after the publish, over
        // a delete queued now.
        let remote_now = through.remote && !through.sync;
        if let Some(r) = &self.remote {
            match copy.clone().filter(|_| remote_now) {
                Some(bytes) => {
                    r.enqueue_put(ns, key, parent, bytes, true);
                }
                None => r.enqueue_delete(ns, key),
            }
        }
        let mut outcome = match slot {
            DeviceSlot::Hbm(s) => match (hbm, checksum) {
                (Some(h), Some(c)) => h.publish(s, ns, key, parent, c),
                _ => PutOutcome::NoSpace,
            },
            // Hashed already (in parallel, `device_checksums`): publishing
            // stays cheap under the stripe lock.
            DeviceSlot::Host(s) => match checksum {
                Some(c) => self.host.publish_hashed(s, ns, key, parent, c),
                None => self.host.publish(s, ns, key, parent, None),
            }
            .map_or(PutOutcome::NoSpace, |_| PutOutcome::Stored),
        };
        if outcome != PutOutcome::Stored {
            // Not stored: nothing is queued for it (and a write-through
            // queued above is superseded).
            if let Some(r) = self.remote.as_ref().filter(|_| remote_now) {
                r.enqueue_delete(ns, key);
            }
            return outcome;
        }
        let Some(d) = &self.disk else {
            return outcome;
        };
        let bytes = copy.filter(|_| through.disk);
        match bytes {
            Some(bytes) if through.sync => {
                let put = DiskPut {
                    key: *key,
                    parent: parent.copied(),
                    payload: &bytes,
                };
                if d.tier.put_many(ns, &[put]).first() != Some(&PutOutcome::Stored) {
                    // Out of every tier again (waiting for an eviction
                    // handing it on; then its queued or written copy goes).
                    self.drop_hbm_copies(ns, key, None);
                    self.host.remove(ns, key, RemoveReason::Delete);
                    drop_disk_copy(d, ns, key);
                    d.demoter.count_sync_failed(1);
                    tracing::warn!(namespace = %ns, "sync write-through: disk write failed; the block was not stored");
                    outcome = PutOutcome::DiskFailed;
                }
                let stored = outcome == PutOutcome::Stored;
                if let Some(r) = self.remote.as_ref().filter(|_| through.remote) {
                    if stored {
                        r.enqueue_put(ns, key, parent, bytes.clone(), true);
                    } else {
                        r.enqueue_delete(ns, key);
                    }
                }
            }
            Some(bytes) => {
                d.demoter.write_through(ns, key, parent, bytes);
            }
            None => {}
        }
        outcome
    }

    /// Lends device-reachable addresses of the exact bytes of `keys` to
    /// `use_blocks` (the CUDA-IPC data path: the caller scatters from them
    /// into an engine's pages and waits for its copies before returning).
    ///
    /// For each key, `Some((address, tier))` of `block_bytes` bytes, or
    /// `None` for a miss: device `device`'s HBM slot (held by a reader
    /// count), else the pinned host slot (held likewise), else the bytes of
    /// another device's HBM tier, the disk or the remote tier staged in one
    /// pinned buffer from [`Gpu::alloc_pinned`]. Every address stays valid
    /// and unchanged until `use_blocks` returns. Afterwards, with the HBM
    /// tier's `promote_on_device_get`, the blocks now in the host tier are
    /// copied into device `device`'s HBM tier.
    ///
    /// Checksums: staged bytes were verified by their tier's read path (the
    /// disk and remote tiers check theirs, an HBM tier's `get` checks its
    /// copy); a slot lent in place is the one published with its checksum
    /// and never written while lent, and is not re-hashed (that would cost
    /// a read-back of every block).
    pub fn get_to_device<R>(
        &self,
        ns: &NamespaceId,
        device: usize,
        keys: &[BlockKey],
        use_blocks: impl FnOnce(&[Option<(u64, TierKind)>]) -> R,
    ) -> Result<R, CacheError> {
        self.lend_to_device(ns, device, keys, false, |blocks, _, _| use_blocks(blocks))
    }

    /// [`BlockCache::get_to_device`] for a reader that queues its copies on
    /// a stream of device `device` (an engine's scatter):
    /// `scatter(positions, addresses)` must queue on `stream`, without
    /// waiting, the reads of the blocks at those addresses (`block_bytes`
    /// each) for those key positions; it is called once per group, for
    /// every key found once. Returns, per key, the tier it was found in
    /// (`None`: a miss, never passed to `scatter`), and the number of blocks
    /// scattered or the first error (then the blocks of the groups before
    /// it may have been written).
    ///
    /// Blocks in device `device`'s HBM tier are read where they lie: the
    /// keys are looked up there [`LOOKUP_CHUNK`] at a time, and each chunk's
    /// hits are passed to `scatter` before the next chunk is looked up (the
    /// copies start while the lookups go on). Blocks in host memory (the
    /// pinned host tier, or staged from the disk or remote tier or another
    /// device) are copied with DMA into
    /// device staging buffers a group at a time, each group scattered from
    /// there while the next one copies ([`staged`]); without a staging set
    /// they are read straight from host memory. Everything queued has
    /// completed when this returns, so the addresses are given back only
    /// then. Errors of the device's own copies come as `E::from`.
    ///
    /// `queued(found)` runs once every copy and scatter is queued, before
    /// the wait for their completion (not at all when one failed to queue):
    /// a caller may answer its client from there, with an event recorded on
    /// `stream` for the client to wait on (docs/protocol.md, "Answers before
    /// the copies complete"). Everything in the blocks' way (their reads,
    /// staging, promotion) is still given back only after completion.
    pub fn get_to_device_staged<E: From<GpuError>>(
        &self,
        ns: &NamespaceId,
        device: usize,
        keys: &[BlockKey],
        stream: &GpuStream,
        mut scatter: impl FnMut(&[usize], &[u64]) -> Result<(), E>,
        queued: impl FnOnce(&[Option<TierKind>]),
    ) -> Result<FoundAndScattered<E>, CacheError> {
        let len = self.namespace("namespace_id", ns)?.block_bytes as usize;
        let gpu = self.check_device(device)?;
        let moves = self.device_moves(device);
        let hbm = self.hbm.get(device);
        // The device's own HBM tier first, a chunk of keys at a time, each
        // chunk's scatter queued before the next chunk is looked up.
        let ahead = match hbm {
            Some(h) => scatter_hbm_ahead(h, ns, keys, &mut scatter),
            None => HbmAhead::none(keys.len()),
        };
        let HbmAhead {
            mut found,
            mut reads,
            rest,
            failed,
        } = ahead;
        // The HBM tier's reads are given back only once the copies from them
        // are over: after a wait for the stream here, or in the other tiers'
        // path below, which waits for it itself.
        let release = |reads: Vec<HbmRead>| {
            if let Some(h) = hbm {
                h.release_many(reads);
            }
        };
        let wait_and_release = |reads: Vec<HbmRead>| {
            let waited = staged::finish(&[stream]);
            release(reads);
            waited
        };
        if let Some(e) = failed {
            let _ = wait_and_release(reads);
            return Ok((found, Err(e)));
        }
        let from_hbm = found.iter().flatten().count();
        if rest.is_empty() {
            queued(&found);
            let scattered = wait_and_release(reads).map(|()| from_hbm).map_err(E::from);
            return Ok((found, scattered));
        }
        // The others (the host tier, staged reads of slower tiers), with
        // positions in `rest`'s numbering mapped back to the request's.
        let rest_keys: Vec<BlockKey> = rest.iter().map(|&i| keys[i]).collect();
        let mut scatter_rest = |at: &[usize], from: &[u64]| {
            let at: Vec<usize> = at.iter().map(|&p| rest[p]).collect();
            scatter(&at, from)
        };
        let lent = self.lend_to_device(
            ns,
            device,
            &rest_keys,
            true,
            |blocks, on_device, promote| {
                for (&i, b) in rest.iter().zip(blocks) {
                    found[i] = b.map(|(_, t)| t);
                }
                // Host-tier blocks to promote into the HBM tier from the staging
                // buffers they pass through (device to device): a slot each,
                // reserved now; the rest are promoted afterwards as before.
                let mut slots: Vec<(HbmSlot, &HostRead)> = Vec::new();
                if let Some((h, reads)) = promote {
                    for r in reads.iter().filter(|r| r.pos < blocks.len()) {
                        if h.contains(ns, &r.key) {
                            continue;
                        }
                        match h.reserve(len) {
                            Some(slot) => slots.push((slot, r)),
                            None => break,
                        }
                    }
                }
                let targets: HashMap<usize, u64> =
                    slots.iter().map(|(s, r)| (r.pos, s.addr())).collect();
                let scattered = staged::scatter_lent(
                    gpu,
                    moves,
                    stream,
                    staged::Lent {
                        blocks,
                        on_device,
                        promote_to: &targets,
                    },
                    len,
                    &mut scatter_rest,
                    || queued(&found),
                );
                // Every copy queued on the stream, the HBM chunks' too, is over
                // (`scatter_lent` waits for the stream): before the promotions,
                // which may need these blocks' HBM slots to be evictable again.
                release(std::mem::take(&mut reads));
                // Published only when every copy into them has completed (the
                // staged path ran, without an error), under the stripe rule of
                // `promote_to_hbm`; otherwise freed unpublished.
                if let (Some((h, _)), Ok((_, true))) = (promote, &scattered) {
                    for (slot, r) in slots {
                        let stripe = self.stripe(ns, &r.key).lock();
                        if *stripe == r.epoch && !h.contains(ns, &r.key) {
                            h.publish_promotion(slot, ns, &r.key, r.parent.as_ref(), r.checksum);
                        }
                    }
                }
                scattered.map(|(n, _)| n + from_hbm)
            },
        );
        match lent {
            Ok(scattered) => Ok((found, scattered)),
            Err(e) => {
                // The other tiers failed before lending anything; the HBM
                // chunks' scatters still complete before their reads go.
                let _ = wait_and_release(reads);
                Err(e)
            }
        }
    }

    /// The body of both device gets: `use_blocks` gets the lent addresses,
    /// per key whether its address is in device `device`'s own memory (its
    /// HBM tier) rather than host memory, and, with promotion on get, the
    /// HBM tier and the host-tier blocks lent in place (promoted afterwards
    /// unless `use_blocks` published them in the HBM tier itself).
    fn lend_to_device<R>(
        &self,
        ns: &NamespaceId,
        device: usize,
        keys: &[BlockKey],
        hbm_looked_up: bool,
        use_blocks: impl FnOnce(
            &[Option<(u64, TierKind)>],
            &[bool],
            Option<(&HbmTier, &[HostRead])>,
        ) -> R,
    ) -> Result<R, CacheError> {
        let began = Instant::now();
        self.namespace("namespace_id", ns)?;
        let gpu = self.check_device(device)?;
        let hbm = self.hbm.get(device);
        let promote_to = hbm.filter(|h| h.config().promote_on_device_get);
        // Keys the caller already looked for in the HBM tier are not looked
        // for (nor counted as misses) there again.
        let in_place_hbm = hbm.filter(|_| !hbm_looked_up);
        let mut lent = self.lend_in_place(ns, in_place_hbm, keys, promote_to.is_some());
        // Lent in place from the device's HBM tier (staged blocks may come
        // from another device's HBM tier, through pinned memory).
        let on_device: Vec<bool> = lent
            .addrs
            .iter()
            .map(|a| matches!(a, Some((_, TierKind::Hbm))))
            .collect();
        // The rest through the ordinary read path, staged in pinned memory
        // (lent from the device's staging cache).
        let staging = self.stage_misses(ns, gpu, keys, &lent.missed, &mut lent.addrs)?;
        let looked_up = began.elapsed();
        let result = use_blocks(
            &lent.addrs,
            &on_device,
            promote_to.map(|h| (h, &lent.host_reads[..])),
        );
        let InPlace {
            addrs,
            hbm_reads,
            host_reads,
            missed,
        } = lent;
        match hbm {
            Some(h) => h.release_many(hbm_reads),
            None => drop(hbm_reads),
        }
        drop(staging);
        let used = began.elapsed();
        if let Some(h) = promote_to {
            // Served from the disk or remote tier: in the host tier now
            // (their promotion on get), read again below.
            let staged: Vec<BlockKey> = missed
                .iter()
                .filter(|&&i| addrs[i].is_some())
                .map(|&i| keys[i])
                .collect();
            self.promote_to_hbm(h, ns, host_reads, &staged);
        }
        tracing::debug!(
            keys = keys.len(),
            lookups_us = looked_up.as_micros() as u64,
            total_us = began.elapsed().as_micros() as u64,
            promotion_us = (began.elapsed() - used).as_micros() as u64,
            "get_to_device"
        );
        Ok(result)
    }

    /// The blocks `get_to_device` lends where they lie: one lock per tier
    /// for the whole batch, the device's HBM tier first, then the host tier
    /// for the rest (with `promote`, each stripe's epoch read before its
    /// block).
    fn lend_in_place(
        &self,
        ns: &NamespaceId,
        hbm: Option<&HbmTier>,
        keys: &[BlockKey],
        promote: bool,
    ) -> InPlace {
        let mut lent = InPlace {
            addrs: vec![None; keys.len()],
            ..InPlace::default()
        };
        let mut in_host: Vec<usize> = Vec::new();
        match hbm {
            Some(h) => {
                for (i, read) in h.acquire_many(ns, keys).into_iter().enumerate() {
                    match read {
                        Some(read) => {
                            lent.addrs[i] = Some((read.addr(), TierKind::Hbm));
                            lent.hbm_reads.push(read);
                        }
                        None => in_host.push(i),
                    }
                }
            }
            None => in_host.extend(0..keys.len()),
        }
        let epochs: Vec<u64> = match promote {
            true => in_host
                .iter()
                .map(|&i| *self.stripe(ns, &keys[i]).lock())
                .collect(),
            false => vec![0; in_host.len()],
        };
        let host_keys: Vec<BlockKey> = in_host.iter().map(|&i| keys[i]).collect();
        let found = self.host.get_many_with_meta(ns, &host_keys);
        for ((&i, epoch), hit) in in_host.iter().zip(epochs).zip(found) {
            if let Some((bytes, meta)) = hit
                && let Some(addr) = self.host.device_addr(&bytes)
            {
                lent.addrs[i] = Some((addr, TierKind::Host));
                lent.host_reads.push(HostRead {
                    pos: i,
                    key: keys[i],
                    bytes,
                    parent: meta.parent,
                    checksum: meta.checksum,
                    epoch,
                });
                continue;
            }
            lent.missed.push(i);
        }
        lent
    }

    /// Reads the `missed` keys through [`BlockCache::get_batch`] and copies
    /// the hits into one pinned buffer from the device's staging cache,
    /// setting their addresses; the buffer must outlive their use.
    fn stage_misses(
        &self,
        ns: &NamespaceId,
        gpu: &Gpu,
        keys: &[BlockKey],
        missed: &[usize],
        addrs: &mut [Option<(u64, TierKind)>],
    ) -> Result<Option<StagingBuffer>, CacheError> {
        if missed.is_empty() {
            return Ok(None);
        }
        let miss_keys: Vec<BlockKey> = missed.iter().map(|&i| keys[i]).collect();
        let found = self.get_batch(ns, &miss_keys)?;
        let total: usize = found.iter().flatten().map(|(b, _)| b.len()).sum();
        if total == 0 {
            return Ok(None);
        }
        let mut buf = gpu
            .staging(total)
            .map_err(|e| CacheError::device("keys", &e))?;
        let base = buf.device_ptr();
        let bytes = buf.as_mut_slice();
        let mut at = 0;
        for (&i, hit) in missed.iter().zip(&found) {
            if let Some((b, tier)) = hit {
                bytes[at..at + b.len()].copy_from_slice(b);
                addrs[i] = Some((base + at as u64, *tier));
                at += b.len();
            }
        }
        Ok(Some(buf))
    }

    /// Copies host-resident blocks into an HBM tier (those it lacks), in
    /// batches ([`HbmTier::copy_in`]): the blocks `held` (read by the
    /// caller, each with its stripe's write epoch read first), then the
    /// `others`, read here lazily while earlier groups copy. A block is
    /// published, under its stripe lock, only if no put or delete under that
    /// stripe ran since its epoch was read, so the bytes promoted are the
    /// host tier's current ones.
    fn promote_to_hbm(
        &self,
        h: &HbmTier,
        ns: &NamespaceId,
        held: Vec<HostRead>,
        others: &[BlockKey],
    ) {
        let reread = others.iter().filter_map(|k| {
            let epoch = *self.stripe(ns, k).lock();
            let (bytes, meta) = self.host.get_with_meta(ns, k)?;
            Some(HostRead {
                pos: usize::MAX,
                key: *k,
                bytes,
                parent: meta.parent,
                checksum: meta.checksum,
                epoch,
            })
        });
        let mut seen = HashSet::new();
        let srcs = held
            .into_iter()
            .chain(reread)
            .filter(|r| seen.insert(r.key) && !h.contains(ns, &r.key))
            .map(|r| {
                let device = self.host.device_addr(&r.bytes);
                let HostRead {
                    key,
                    bytes,
                    parent,
                    checksum,
                    epoch,
                    ..
                } = r;
                ((key, parent, checksum, epoch), bytes, device)
            });
        // Each group is published while the next ones copy.
        h.copy_in(srcs, |group| {
            for ((key, parent, checksum, epoch), slot) in group {
                let Some(slot) = slot else {
                    continue;
                };
                let stripe = self.stripe(ns, &key).lock();
                // A put or delete ran meanwhile (or another promotion won):
                // the slot is freed unpublished.
                if *stripe == epoch && !h.contains(ns, &key) {
                    h.publish_promotion(slot, ns, &key, parent.as_ref(), checksum);
                }
            }
        });
    }
}

/// What [`BlockCache::get_to_device_staged`] found (per key, its tier) and
/// scattered (the blocks, or the first error).
type FoundAndScattered<E> = (Vec<Option<TierKind>>, Result<usize, E>);

/// Keys of a device get looked up in the device's HBM tier per chunk, each
/// chunk's scatter queued before the next lookup, so the copies start after
/// the first chunk's lookups instead of every key's (an 8k-token prompt is
/// 511 keys; their lookups took 0.15–0.6 ms on an H100's host).
const LOOKUP_CHUNK: usize = 64;

/// What [`scatter_hbm_ahead`] did.
struct HbmAhead<E> {
    /// Per key, `Some(Hbm)` when scattered from the HBM tier.
    found: Vec<Option<TierKind>>,
    /// The reads of those blocks, to give back once their copies are over.
    reads: Vec<HbmRead>,
    /// Positions of the keys not in the HBM tier, in order.
    rest: Vec<usize>,
    /// The scatter that failed to queue (no chunk is queued after it; the
    /// keys not in the HBM tier are then misses, `rest` empty).
    failed: Option<E>,
}

impl<E> HbmAhead<E> {
    /// Nothing found: every key is left to the other tiers.
    fn none(n: usize) -> Self {
        HbmAhead {
            found: vec![None; n],
            reads: Vec::new(),
            rest: (0..n).collect(),
            failed: None,
        }
    }
}

/// Looks `keys` up in HBM tier `h` [`LOOKUP_CHUNK`] at a time and queues the
/// scatter of each chunk's hits (`scatter(positions, addresses)`) before
/// looking up the next chunk. After a scatter fails to queue, the remaining
/// chunks are only looked up (so every hit is reported with the failure, as
/// when the whole request is one scatter) and the keys not in the tier are
/// left out of `rest` (misses: their pages are not written).
fn scatter_hbm_ahead<E>(
    h: &HbmTier,
    ns: &NamespaceId,
    keys: &[BlockKey],
    scatter: &mut impl FnMut(&[usize], &[u64]) -> Result<(), E>,
) -> HbmAhead<E> {
    let mut ahead = HbmAhead {
        found: vec![None; keys.len()],
        reads: Vec::with_capacity(keys.len()),
        rest: Vec::new(),
        failed: None,
    };
    for (c, chunk) in keys.chunks(LOOKUP_CHUNK).enumerate() {
        let first = c * LOOKUP_CHUNK;
        let (mut at, mut from) = (
            Vec::with_capacity(chunk.len()),
            Vec::with_capacity(chunk.len()),
        );
        for (j, read) in h.acquire_many(ns, chunk).into_iter().enumerate() {
            match read {
                Some(read) => {
                    at.push(first + j);
                    from.push(read.addr());
                    // Given back once the stream's copies are over, even
                    // when the scatter below fails partway.
                    ahead.reads.push(read);
                }
                None if ahead.failed.is_none() => ahead.rest.push(first + j),
                None => {}
            }
        }
        for &i in &at {
            ahead.found[i] = Some(TierKind::Hbm);
        }
        if at.is_empty() || ahead.failed.is_some() {
            continue;
        }
        if let Err(e) = scatter(&at, &from) {
            ahead.failed = Some(e);
            ahead.rest.clear();
        }
    }
    ahead
}

/// Per item of a device put, its bytes when a write-through needs them.
type KeptBytes = Vec<Option<Bytes>>;

/// Runs of slots that follow each other in item order (a group's copies
/// merge along them).
fn slot_runs(addrs: &[u64], len: usize) -> usize {
    1 + addrs
        .windows(2)
        .filter(|w| w[1] != w[0].wrapping_add(len as u64))
        .count()
}

/// Whether no key appears twice among `items`.
fn distinct_keys(items: &[(BlockKey, Option<BlockKey>)]) -> bool {
    let mut seen = HashSet::with_capacity(items.len());
    items.iter().all(|(key, _)| seen.insert(key))
}

/// Checksums of the slots of a device put: `known` (hashed on the device
/// while they were staged) as they are; pinned host slots hashed on the CPU;
/// T0 slots hashed on the device, or read back through pinned memory when a
/// write-through policy needs their bytes (kept, as `copies`) or the device
/// cannot hash.
fn device_checksums(
    hbm: Option<&HbmTier>,
    slots: &[DeviceSlot],
    addrs: &[u64],
    len: usize,
    through: WriteThrough,
    known: Vec<Option<u64>>,
) -> Result<(Vec<Option<u64>>, KeptBytes), CacheError> {
    let keep = through.keeps_bytes();
    let mut checksums = known;
    checksums.resize(slots.len(), None);
    let mut copies: Vec<Option<Bytes>> = vec![None; slots.len()];
    // Pinned host slots (the HBM tier full, or none) not hashed yet: their
    // bytes are in host memory already, hashed here in parallel rather than
    // one after the other at publish (a single core hashes far slower than
    // PCIe fills them).
    let host: Vec<(usize, &[u8])> = slots
        .iter()
        .enumerate()
        .filter(|&(i, _)| checksums[i].is_none())
        .filter_map(|(i, s)| match s {
            DeviceSlot::Host(h) => Some((i, h.as_slice())),
            DeviceSlot::Hbm(_) => None,
        })
        .collect();
    let sums: Vec<u64> = host.par_iter().map(|(_, b)| xxh3_64(b)).collect();
    for ((i, _), sum) in host.iter().zip(sums) {
        checksums[*i] = Some(sum);
    }
    let Some(h) = hbm else {
        return Ok((checksums, copies));
    };
    let at: Vec<usize> = (0..slots.len())
        .filter(|&i| matches!(slots[i], DeviceSlot::Hbm(_)))
        .collect();
    let hbm_addrs: Vec<u64> = at.iter().map(|&i| addrs[i]).collect();
    // Without a write-through the bytes stay on the device: hashed
    // there, nothing is read back.
    let on_device = match keep {
        true => None,
        false => match h.hash_on_device(&hbm_addrs, len) {
            Ok(sums) => Some(sums),
            Err(e) => {
                tracing::warn!(error = %e, "hbm tier: device hashing failed; reading the blocks back to hash them");
                None
            }
        },
    };
    match on_device {
        Some(sums) => {
            for (&i, sum) in at.iter().zip(sums) {
                checksums[i] = Some(sum);
            }
        }
        None => h
            .read_back(&hbm_addrs, len, |first, blocks| {
                // Hashed in parallel: a staging buffer holds many blocks.
                let sums: Vec<u64> = blocks.par_iter().map(|b| xxh3_64(b)).collect();
                for (j, (bytes, sum)) in blocks.iter().zip(sums).enumerate() {
                    checksums[at[first + j]] = Some(sum);
                    if keep {
                        copies[at[first + j]] = Some(Bytes::copy_from_slice(bytes));
                    }
                }
            })
            .map_err(|e| CacheError::device("items", &e))?,
    }
    Ok((checksums, copies))
}
