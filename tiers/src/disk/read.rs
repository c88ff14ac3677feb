//! The read path: [`DiskTier::read_many`] / [`DiskTier::get_many`] look the
//! keys up and take a reader count on each block ([`plan_read`], so its
//! slot is not reused while read), read the slots as one batch of
//! transfers ([`DiskTier::read_planned`]), verify each slot's header
//! against the index and its payload against its xxh3 ([`check_read`]),
//! drop the blocks that fail ([`DiskTier::drop_corrupt`]) and hand out the
//! verified payloads without a copy. The streaming reads (`stream.rs`) and
//! the verifier (`verify.rs`) use the same steps.

use bytes::Bytes;
use std::time::Instant;

use super::file::{AlignedBuf, align_up};
use super::header::{self, CorruptKind, Expected, HEADER_REGION};
use super::index::IndexBatch;
use super::io::{self, IoDone, IoFailure, IoOp, OpKind};
use super::meta::Meta;
use super::{DiskRead, DiskTier, now_ms};
use crate::events::EventKind;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::TierCounters;

/// A block being read: where, and what the index says it holds.
pub(super) struct PlannedRead {
    pub(super) id: usize,
    pub(super) incarnation: u64,
    pub(super) ns: NamespaceId,
    pub(super) key: BlockKey,
    pub(super) parent: Option<BlockKey>,
    pub(super) file: u16,
    pub(super) offset: u64,
    pub(super) slot_bytes: usize,
    pub(super) len: u64,
    pub(super) checksum: u64,
    pub(super) seq: u64,
}

impl PlannedRead {
    /// What the slot must hold, according to the index.
    pub(super) fn expected(&self) -> Expected<'_> {
        Expected {
            namespace: &self.ns,
            key: &self.key,
            parent: self.parent.as_ref(),
            payload_len: self.len,
            checksum: self.checksum,
            seq: self.seq,
        }
    }
}

/// Takes a reader count on block `id` (so its slot is not reused while
/// read) and says what to read; touches it first if `touch`.
pub(super) fn plan_read(
    meta: &mut Meta,
    id: usize,
    touch: bool,
    now_ms: u64,
) -> Option<PlannedRead> {
    if touch {
        meta.touch(id, now_ms);
    }
    let e = meta.entries.get_mut(id)?;
    if !e.live {
        return None;
    }
    e.readers += 1;
    Some(PlannedRead {
        id,
        incarnation: e.incarnation,
        ns: e.ns,
        key: e.key,
        parent: e.parent,
        file: e.file,
        offset: e.offset,
        slot_bytes: e.slot_bytes,
        len: e.len,
        checksum: e.checksum,
        seq: e.seq,
    })
}

/// Drops a reader count taken by [`plan_read`] (freeing the slot if the
/// block was unlinked meanwhile and this was its last reader).
pub(super) fn release_read(meta: &mut Meta, id: usize, incarnation: u64) {
    if let Some(e) = meta.entries.get_mut(id)
        && e.incarnation == incarnation
    {
        e.readers = e.readers.saturating_sub(1);
    }
    meta.release_if_unused(id);
}

/// Judges a finished read of `p`'s slot: the header must match the index
/// and the payload its xxh3 ([`header::verify`]).
pub(super) fn check_read(p: &PlannedRead, d: IoDone) -> ReadOutcome {
    match (d.result, d.buf) {
        (Ok(()), Some(buf)) => match header::verify(buf.as_slice(), &p.expected()) {
            Ok(_) => ReadOutcome::Good(buf),
            Err(kind) => ReadOutcome::Corrupt(kind),
        },
        (Ok(()), None) => ReadOutcome::Failed(IoFailure::Shutdown),
        (Err(f), _) => ReadOutcome::Failed(f),
    }
}

impl PlannedRead {
    /// The verified payload, handed out without a copy.
    pub(super) fn verified_read(&self, buf: AlignedBuf) -> DiskRead {
        DiskRead {
            payload: Bytes::from_owner(Payload {
                buf,
                len: self.len as usize,
            }),
            parent: self.parent,
            seq: self.seq,
        }
    }
}

/// How a slot read ended.
pub(super) enum ReadOutcome {
    Good(AlignedBuf),
    Corrupt(CorruptKind),
    Failed(IoFailure),
}

/// The payload of a verified read, handed out without a copy.
struct Payload {
    buf: AlignedBuf,
    len: usize,
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_slice()[HEADER_REGION..HEADER_REGION + self.len]
    }
}

impl DiskTier {
    /// Takes reader counts on the blocks to read (and touches them if `touch`).
    pub(super) fn plan_reads(
        &self,
        meta: &mut Meta,
        ids: impl IntoIterator<Item = usize>,
        touch: bool,
    ) -> Vec<PlannedRead> {
        let now = now_ms();
        ids.into_iter()
            .filter_map(|id| plan_read(meta, id, touch, now))
            .collect()
    }

    /// Drops the reader counts taken by [`DiskTier::plan_reads`].
    pub(super) fn release_reads(&self, plans: &[PlannedRead]) {
        let mut meta = self.inner.meta.lock();
        for p in plans {
            release_read(&mut meta, p.id, p.incarnation);
        }
    }

    /// Reads and verifies planned slots, then releases their reader counts.
    pub(super) fn read_planned(&self, plans: &[PlannedRead]) -> Vec<ReadOutcome> {
        let inner = &*self.inner;
        let mut outcomes: Vec<Option<ReadOutcome>> = (0..plans.len()).map(|_| None).collect();
        let mut ops = Vec::with_capacity(plans.len());
        let mut op_of = Vec::with_capacity(plans.len());
        for (i, p) in plans.iter().enumerate() {
            let want = HEADER_REGION + align_up(p.len as usize);
            match inner.pool.get(want.min(p.slot_bytes)) {
                Some(buf) => {
                    ops.push(IoOp {
                        kind: OpKind::Read,
                        fd: inner.files[p.file as usize].fd(),
                        offset: p.offset,
                        buf,
                        on_late: None,
                    });
                    op_of.push(i);
                }
                None => outcomes[i] = Some(ReadOutcome::Failed(IoFailure::Errno(libc::ENOMEM))),
            }
        }
        let mut batch = io::Batch::new(&*inner.engine, ops.len());
        for op in ops {
            batch.push(op);
        }
        let busy = inner.disk.read_busy.busy();
        batch.wait_each(Instant::now() + inner.config.read_timeout, |k, d| {
            let i = op_of[k];
            let p = &plans[i];
            let len = d.buf.as_ref().map_or(0, |b| b.len());
            self.count(d.result, &inner.disk.read_ops, &inner.disk.read_bytes, len);
            outcomes[i] = Some(check_read(p, d));
        });
        drop(busy);
        self.release_reads(plans);
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(ReadOutcome::Failed(IoFailure::Shutdown)))
            .collect()
    }

    /// Drops blocks that failed verification (if still the same incarnation).
    pub(super) fn drop_corrupt(&self, bad: &[(&PlannedRead, CorruptKind)]) {
        if bad.is_empty() {
            return;
        }
        let inner = &*self.inner;
        let mut events = Vec::new();
        {
            let mut meta = inner.meta.lock();
            for (p, kind) in bad {
                TierCounters::add(&inner.disk.corrupt_blocks, 1);
                tracing::warn!(
                    namespace = %p.ns,
                    key = %p.key,
                    file = %inner.files[p.file as usize].path.display(),
                    offset = p.offset,
                    reason = kind.name(),
                    "disk tier: slot failed verification; block dropped"
                );
                let same = meta.lookup(&p.ns, &p.key) == Some(p.id)
                    && meta
                        .entries
                        .get(p.id)
                        .is_some_and(|e| e.incarnation == p.incarnation);
                if same && let Some(ev) = meta.unlink(p.id, EventKind::Evicted) {
                    events.push(ev);
                }
            }
            let mut batch = IndexBatch::default();
            meta.drain_deletes(&mut batch);
            if let Err(e) = inner.index.write(batch) {
                tracing::error!(error = %e, "disk tier: index delete failed");
                TierCounters::add(&inner.disk.io_errors, 1);
            }
        }
        inner.events.publish(events);
    }

    /// Reads blocks, all transfers submitted together. Each answer is the
    /// exact bytes stored under the key, or `None` (miss, failed verification,
    /// I/O error or timeout).
    pub fn get_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<Option<Bytes>> {
        self.read_many(ns, keys)
            .into_iter()
            .map(|r| r.map(|r| r.payload))
            .collect()
    }

    /// [`DiskTier::get_many`] with what the cache needs to promote a block:
    /// its parent and write sequence number (see [`DiskTier::is_current`]).
    pub fn read_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<Option<DiskRead>> {
        let inner = &*self.inner;
        let _open = self.enter();
        let mut out: Vec<Option<DiskRead>> = (0..keys.len()).map(|_| None).collect();
        let (plans, pos) = {
            let mut meta = inner.meta.lock();
            let mut ids = Vec::new();
            let mut pos = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                if let Some(id) = meta.lookup(ns, k) {
                    ids.push(id);
                    pos.push(i);
                }
            }
            (self.plan_reads(&mut meta, ids, true), pos)
        };
        let outcomes = self.read_planned(&plans);
        let mut bad = Vec::new();
        for ((p, o), i) in plans.iter().zip(outcomes).zip(pos) {
            match o {
                ReadOutcome::Good(buf) => out[i] = Some(p.verified_read(buf)),
                ReadOutcome::Corrupt(kind) => bad.push((p, kind)),
                ReadOutcome::Failed(f) => {
                    tracing::debug!(key = %p.key, failure = ?f, "disk tier: read failed");
                }
            }
        }
        self.drop_corrupt(&bad);
        let hits = out.iter().filter(|o| o.is_some()).count() as u64;
        let bytes: u64 = out.iter().flatten().map(|r| r.payload.len() as u64).sum();
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.misses, keys.len() as u64 - hits);
        TierCounters::add(&inner.counters.bytes_out, bytes);
        out
    }
}
