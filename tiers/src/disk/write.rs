//! The write path: [`DiskTier::put_many`] reserves a slot per block under
//! the metadata lock (evicting as needed, [`DiskTier::reserve_write`]),
//! fills each I/O buffer with header, payload and padding while hashing
//! the payload and starts its write at once ([`DiskTier::start_write`]),
//! waits for the batch, and only then publishes the blocks whose data
//! landed, in memory and as one index `WriteBatch`
//! ([`DiskTier::publish_writes`]). The streaming puts (`stream.rs`) use the
//! same steps.

use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use super::checksum::{copy_and_xxh3_64, xxh3_64};
use super::config::Durability;
use super::file::align_up;
use super::header::{HEADER_REGION, SlotHeader};
use super::index::{IndexBatch, IndexEntry};
use super::io::{self, IoFailure, IoOp, OpKind};
use super::meta::{Entry, IndexKey, Meta, SEQ_STEP};
use super::{DiskPut, DiskTier, now_ms};
use crate::arena::SlotRef;
use crate::events::{EventKind, PendingEvent};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{PutOutcome, TierCounters, TierKind};

/// A slot being written.
pub(super) struct PlannedWrite {
    /// Position of the block in the caller's items.
    pub(super) item: usize,
    pub(super) key: BlockKey,
    pub(super) parent: Option<BlockKey>,
    /// Payload bytes.
    pub(super) len: u64,
    /// xxh3-64 of the payload, once the buffer is filled.
    pub(super) checksum: u64,
    pub(super) file: u16,
    pub(super) slot: SlotRef,
    pub(super) slot_bytes: usize,
    pub(super) offset: u64,
    pub(super) seq: u64,
}

impl DiskTier {
    /// Stores blocks, writing all their slots as one batch of transfers.
    pub fn put_many(&self, ns: &NamespaceId, items: &[DiskPut<'_>]) -> Vec<PutOutcome> {
        self.put_many_if(ns, items, &|_| true)
    }

    /// [`DiskTier::put_many`], publishing item `i` only if `keep(i)` still
    /// holds once its data is on disk. `keep` runs under the tier's metadata
    /// lock, in the same critical section that publishes the block and writes
    /// its index entry, so a caller can order publication against its own
    /// invalidations (the cache uses it to drop demotions made stale by a
    /// newer put). `keep` must not call back into this tier. A dropped item
    /// answers `NoSpace` and its slot is freed.
    pub fn put_many_if(
        &self,
        ns: &NamespaceId,
        items: &[DiskPut<'_>],
        keep: &dyn Fn(usize) -> bool,
    ) -> Vec<PutOutcome> {
        let inner = &*self.inner;
        let mut out = vec![PutOutcome::NoSpace; items.len()];
        let Some(_open) = self.enter_write("put") else {
            TierCounters::add(&inner.counters.rejected_puts, items.len() as u64);
            return out;
        };
        let mut events = Vec::new();
        let mut planned = Vec::with_capacity(items.len());
        {
            let mut meta = inner.meta.lock();
            for (i, it) in items.iter().enumerate() {
                if let Some(p) = self.reserve_write(
                    &mut meta,
                    i,
                    it.key,
                    it.parent,
                    it.payload.len(),
                    &mut events,
                ) {
                    planned.push(p);
                }
            }
        }
        let rejected = items.len() - planned.len();
        TierCounters::add(&inner.counters.rejected_puts, rejected as u64);
        if planned.is_empty() {
            inner.events.publish(events);
            return out;
        }

        let mut batch = io::Batch::new(&*inner.engine, planned.len());
        let mut lens = Vec::with_capacity(planned.len());
        let deadline = Instant::now() + inner.config.write_timeout;
        let busy = inner.disk.write_busy.busy();
        let mut no_buffer = Vec::new();
        for (pi, p) in planned.iter_mut().enumerate() {
            let Some(op) = self.start_write(ns, p, items[p.item].payload) else {
                no_buffer.push(pi);
                continue;
            };
            lens.push(op.buf.len());
            // Each write starts as soon as its buffer is filled.
            batch.submit(op);
        }
        let done_v = batch.wait(deadline);
        drop(busy);
        for (d_, len) in done_v.iter().zip(lens) {
            self.count(
                d_.result,
                &inner.disk.write_ops,
                &inner.disk.write_bytes,
                len,
            );
        }
        let mut results: Vec<Result<(), IoFailure>> =
            done_v.into_iter().map(|d| d.result).collect();
        for &pi in &no_buffer {
            results.insert(pi, Err(IoFailure::Errno(libc::ENOMEM)));
        }
        let written: Vec<(PlannedWrite, Result<(), IoFailure>)> =
            planned.into_iter().zip(results).collect();
        let stored = self.publish_writes(ns, &written, &|p| keep(p.item), false);
        for &w in &stored {
            let p = &written[w].0;
            out[p.item] = PutOutcome::Stored;
            self.stored_event(ns, p, &mut events);
        }
        let failed = written.len() - stored.len();
        TierCounters::add(&inner.counters.rejected_puts, failed as u64);
        inner.events.publish(events);
        out
    }

    /// Reserves a slot for a block of `len` payload bytes (evicting as
    /// needed) and assigns its write sequence number; `None` when the block
    /// is empty, too large, or nothing can be evicted.
    pub(super) fn reserve_write(
        &self,
        meta: &mut Meta,
        item: usize,
        key: BlockKey,
        parent: Option<BlockKey>,
        len: usize,
        events: &mut Vec<PendingEvent>,
    ) -> Option<PlannedWrite> {
        let inner = &*self.inner;
        if len == 0 || len as u64 > inner.max_payload {
            return None;
        }
        let slot_bytes = HEADER_REGION + align_up(len);
        let (file, slot) = meta.reserve(slot_bytes, events, &inner.counters)?;
        let offset = meta.arenas[file as usize].offset(slot) as u64;
        let seq = meta.next_seq;
        meta.next_seq += 1;
        if meta.next_seq >= meta.seq_watermark {
            let wm = meta.next_seq + SEQ_STEP;
            let mut b = IndexBatch::default();
            b.set_seq_watermark(wm);
            match inner.index.write(b) {
                Ok(()) => meta.seq_watermark = wm,
                Err(e) => {
                    tracing::warn!(error = %e, "disk tier: sequence watermark not written")
                }
            }
        }
        Some(PlannedWrite {
            item,
            key,
            parent,
            len: len as u64,
            checksum: 0,
            file,
            slot,
            slot_bytes,
            offset,
            seq,
        })
    }

    /// Fills a buffer with the slot (header, payload, zero padding), hashing
    /// the payload while copying it (into `p.checksum`), and returns the
    /// write; `None` when no buffer can be had.
    pub(super) fn start_write(
        &self,
        ns: &NamespaceId,
        p: &mut PlannedWrite,
        payload: &[u8],
    ) -> Option<IoOp> {
        let inner = &*self.inner;
        let Some(mut buf) = inner.pool.get(p.slot_bytes) else {
            p.checksum = xxh3_64(payload);
            return None;
        };
        let b = buf.as_mut_slice();
        let end = HEADER_REGION + payload.len();
        // One pass over the payload: copied into the buffer and hashed.
        p.checksum = copy_and_xxh3_64(&mut b[HEADER_REGION..end], payload);
        let header = SlotHeader {
            namespace: *ns,
            key: p.key,
            parent: p.parent,
            payload_len: payload.len() as u64,
            payload_xxh3: p.checksum,
            seq: p.seq,
        };
        header.encode(&mut b[..HEADER_REGION]);
        b[end..].fill(0);
        let weak: Weak<Mutex<Meta>> = Arc::downgrade(&inner.meta);
        let (file, slot) = (p.file, p.slot);
        // Releases the slot once a write abandoned at its deadline has finished.
        let on_late: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let Some(m) = weak.upgrade()
                && let Some(a) = m.lock().arenas.get_mut(file as usize)
            {
                a.free(slot);
            }
        });
        Some(IoOp {
            kind: OpKind::Write,
            fd: inner.files[p.file as usize].fd(),
            offset: p.offset,
            buf,
            on_late: Some(on_late),
        })
    }

    /// Publishes finished writes: in memory, and as one index `WriteBatch`
    /// (with any queued deletions), all under the metadata lock, and only
    /// for writes whose data has landed. A write that failed frees its slot
    /// (an abandoned one is freed by its late hook), as does one that `keep`
    /// rejects or, with `newer_wins`, one whose key already holds a block of
    /// a later sequence number (it was replaced by a later put and counts as
    /// stored). With [`Durability::PowerLoss`] the WAL is synced before
    /// anything counts as stored. Returns the positions in `writes` of the
    /// blocks stored.
    pub(super) fn publish_writes(
        &self,
        ns: &NamespaceId,
        writes: &[(PlannedWrite, Result<(), IoFailure>)],
        keep: &dyn Fn(&PlannedWrite) -> bool,
        newer_wins: bool,
    ) -> Vec<usize> {
        let inner = &*self.inner;
        let skip_index = inner.faults.get().drop_index_writes;
        let mut stored = Vec::new();
        let mut superseded = Vec::new();
        {
            let mut meta = inner.meta.lock();
            let mut puts: Vec<(IndexKey, IndexEntry)> = Vec::new();
            for (w, (p, result)) in writes.iter().enumerate() {
                match result {
                    Ok(()) if !skip_index && keep(p) => {}
                    // Abandoned: the late hook frees the slot.
                    Err(IoFailure::Timeout) => continue,
                    _ => {
                        meta.arenas[p.file as usize].free(p.slot);
                        continue;
                    }
                }
                if let Some(old) = meta.lookup(ns, &p.key) {
                    if newer_wins && meta.entries.get(old).is_some_and(|e| e.seq > p.seq) {
                        meta.arenas[p.file as usize].free(p.slot);
                        superseded.push(w);
                        continue;
                    }
                    // A replaced block emits no event of its own.
                    let _ = meta.unlink(old, EventKind::Deleted);
                }
                let (id, entry) = publish_in_memory(&mut meta, ns, p);
                puts.push(((*ns, p.key), entry));
                stored.push((w, id));
            }
            let mut batch = IndexBatch::default();
            meta.drain_deletes(&mut batch);
            for ((n, k), e) in &puts {
                batch.put(n, k, e);
            }
            if let Err(e) = inner.index.write(batch) {
                tracing::error!(error = %e, "disk tier: index write failed; puts dropped");
                TierCounters::add(&inner.disk.io_errors, 1);
                for (_, id) in stored.drain(..) {
                    let _ = meta.unlink(id, EventKind::Deleted);
                }
            }
        }
        if inner.config.durability == Durability::PowerLoss
            && !stored.is_empty()
            && let Err(e) = inner.index.sync()
        {
            tracing::error!(error = %e, "disk tier: WAL sync failed; puts dropped");
            TierCounters::add(&inner.disk.io_errors, 1);
            let mut meta = inner.meta.lock();
            for (_, id) in stored.drain(..) {
                let _ = meta.unlink(id, EventKind::Deleted);
            }
        }
        let mut out: Vec<usize> = stored.into_iter().map(|(w, _)| w).collect();
        out.extend(superseded);
        out
    }

    /// Counts a stored block and queues its event.
    pub(super) fn stored_event(
        &self,
        ns: &NamespaceId,
        p: &PlannedWrite,
        events: &mut Vec<PendingEvent>,
    ) {
        TierCounters::add(&self.inner.counters.bytes_in, p.len);
        events.push(PendingEvent {
            kind: EventKind::Stored,
            namespace: *ns,
            key: p.key,
            parent: p.parent,
            tier: TierKind::Disk,
        });
    }
}

/// Publishes a written block in memory: a new entry (the most recently
/// used), owner of its slot, found by its key, counted as its parent's
/// child, in the LRU sets. Returns its id and its index entry.
fn publish_in_memory(meta: &mut Meta, ns: &NamespaceId, p: &PlannedWrite) -> (usize, IndexEntry) {
    meta.tick += 1;
    let incarnation = meta.next_incarnation;
    meta.next_incarnation += 1;
    let hash = meta.index.hash(ns, &p.key);
    let entry = Entry {
        ns: *ns,
        key: p.key,
        hash,
        parent: p.parent,
        file: p.file,
        slot: p.slot,
        slot_bytes: p.slot_bytes,
        offset: p.offset,
        len: p.len,
        checksum: p.checksum,
        seq: p.seq,
        tick: meta.tick,
        last_access_ms: now_ms(),
        access_dirty: false,
        pins: 0,
        readers: 0,
        live: true,
        incarnation,
    };
    let index_entry = entry.index_entry();
    let id = meta.entries.insert(entry);
    meta.slot_owner.set(p.file, p.slot, id);
    meta.index.insert_new(hash, id);
    if let Some(parent) = &p.parent {
        meta.add_child(ns, parent);
    }
    meta.set_insert(id);
    (id, index_entry)
}
