//! Closing the cache: [`BlockCache::close`], the ordered shutdown (module
//! docs of [`crate::cache`]), and what it keeps for the next start:
//!
//! 1. the write queue (write-through copies and demotions) is drained into
//!    the disk tier, for at most `movement.drain_on_stop`; what is still
//!    queued then is dropped and counted;
//! 2. the host tier's blocks that the disk does not hold (same key, same
//!    checksum) are written to it, hottest first, for at most
//!    `movement.persist_on_stop` (zero: not at all) and never more than the
//!    disk tier's capacity (the coldest would only push the hottest out), so
//!    a restarted daemon finds its hot set on disk;
//! 3. the disk tier is closed ([`crate::disk::DiskTier::close`]): its I/O
//!    threads stop, its access times are persisted and its index is
//!    flushed and closed, so its paths can be opened again at once.
//!
//! Both run after writes are refused, so no put, delete or eviction of a
//! key runs meanwhile: the host tier's bytes are the current version of
//! each key, and the disk may take them without stripe locks.

use std::time::{Duration, Instant};

use super::{BlockCache, DiskSide};
use crate::disk::DiskPut;
use crate::movement::DrainReport;
use crate::namespace::NamespaceId;
use crate::tier::{BlockMeta, PutOutcome, Tier};

/// Longest a close waits for the remote tier's write queue to drain (and
/// then for its tasks to stop).
const REMOTE_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Blocks per disk write while persisting the host tier.
const PERSIST_BATCH: usize = 64;

/// Disk header region before each payload, and the payload's alignment.
const DISK_ALIGN: u64 = 4096;

/// What the close did with the host tier's blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PersistReport {
    /// Blocks in the host tier when it began.
    pub host_blocks: u64,
    /// Of those, already on disk with the same bytes.
    pub already_on_disk: u64,
    /// Written to disk now.
    pub written: u64,
    /// Refused by the disk (no room, I/O error).
    pub failed: u64,
    /// Not written: the deadline passed, or the disk tier is smaller than
    /// the host tier's hot set.
    pub left: u64,
    pub took: Duration,
}

/// What [`BlockCache::close`] did; empty when the cache was closed already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopReport {
    /// The write queue's drain (with a disk tier).
    pub drain: Option<DrainReport>,
    /// The host tier written to disk (with a disk tier and
    /// `persist_on_stop` above zero).
    pub persist: Option<PersistReport>,
    pub took: Duration,
}

impl BlockCache {
    /// Shuts the cache down in order (see the module docs), once: later
    /// calls return at once, with an empty report. Blocks until done, for
    /// at most about `drain_on_stop` + `persist_on_stop` + a couple of
    /// seconds for the remote tier's queue (plus one disk write timeout for
    /// a write in flight); call it from a thread that may block (the daemon
    /// runs it through `spawn_blocking` after its listeners have drained).
    /// Reads still answer afterwards, from what the tiers hold (the closed
    /// disk tier reads on the caller's thread); writes fail with
    /// [`crate::CacheError::Closed`]. No I/O thread of the disk tier is
    /// left running, and its index is closed.
    pub fn close(&self) -> StopReport {
        {
            // Waits for the writes in flight.
            let mut closed = self.closed.write();
            if *closed {
                return StopReport::default();
            }
            *closed = true;
        }
        let began = Instant::now();
        for h in &self.hbm {
            h.close();
        }
        let mut report = StopReport::default();
        if let Some(d) = &self.disk {
            let m = &self.config.movement;
            let drain = d.demoter.close(m.drain_on_stop);
            log_drain(&drain, m.drain_on_stop);
            report.drain = Some(drain);
            if !m.persist_on_stop.is_zero() {
                let persist = self.persist_host(d, m.persist_on_stop);
                d.demoter.count_persisted(persist.written);
                log_persist(&persist, m.persist_on_stop);
                report.persist = Some(persist);
            }
            // After the writer drained and the host tier was persisted;
            // errors are logged by the tier.
            let _ = d.tier.close();
        }
        if let Some(r) = &self.remote {
            r.close(REMOTE_CLOSE_TIMEOUT);
        }
        report.took = began.elapsed();
        tracing::info!(took_ms = report.took.as_millis() as u64, "cache closed");
        report
    }

    /// Writes the host tier's blocks that the disk lacks to the disk,
    /// hottest first, within `deadline` and the disk tier's capacity.
    fn persist_host(&self, d: &DiskSide, deadline: Duration) -> PersistReport {
        let began = Instant::now();
        let mut blocks = self.host_blocks();
        let mut r = PersistReport {
            host_blocks: blocks.len() as u64,
            ..PersistReport::default()
        };
        // Hottest first; as many as the disk holds at most.
        blocks.sort_by_key(|m| m.idle_ms);
        let mut room = Tier::stats(&d.tier).capacity_bytes;
        let fits = blocks
            .iter()
            .take_while(|m| {
                let slot = DISK_ALIGN + m.payload_bytes.next_multiple_of(DISK_ALIGN);
                let ok = slot <= room;
                room = room.saturating_sub(slot);
                ok
            })
            .count();
        r.left = (blocks.len() - fits) as u64;
        blocks.truncate(fits);
        let mut rest = blocks.as_slice();
        let hottest = blocks.first().map(|m| (m.namespace, m.key));
        while !rest.is_empty() {
            // The deadline passed, or the disk began evicting what this
            // close wrote (the capacity estimate was high: the disk has less
            // room for this block size): the colder rest stays out.
            let evicting =
                r.written > 0 && hottest.is_some_and(|(ns, key)| !d.tier.contains(&ns, &key));
            if began.elapsed() >= deadline || evicting {
                r.left += rest.len() as u64;
                break;
            }
            // The next run of blocks of one namespace, in hotness order.
            let ns = rest[0].namespace;
            let run = rest
                .iter()
                .take(PERSIST_BATCH)
                .take_while(|m| m.namespace == ns)
                .count();
            let (chunk, tail) = rest.split_at(run);
            rest = tail;
            self.persist_chunk(d, &ns, chunk, &mut r);
        }
        r.took = began.elapsed();
        r
    }

    /// Every block of the host tier, one listing page at a time.
    fn host_blocks(&self) -> Vec<BlockMeta> {
        let mut out = Vec::new();
        let mut cursor = 0;
        loop {
            let (page, next) = Tier::list(&self.host, None, cursor, 4096);
            out.extend(page);
            match next {
                Some(n) => cursor = n,
                None => return out,
            }
        }
    }

    /// One disk write of the blocks of `chunk` (all of namespace `ns`)
    /// that the disk does not already hold.
    fn persist_chunk(
        &self,
        d: &DiskSide,
        ns: &NamespaceId,
        chunk: &[BlockMeta],
        r: &mut PersistReport,
    ) {
        let mut held = Vec::with_capacity(chunk.len());
        for m in chunk {
            if d.tier.holds(ns, &m.key, m.checksum) {
                r.already_on_disk += 1;
                continue;
            }
            // Gone meanwhile (a read can still promote, never remove): skip.
            match self.host.get_with_meta(ns, &m.key) {
                Some((bytes, meta)) => held.push((bytes, meta)),
                None => r.left += 1,
            }
        }
        if held.is_empty() {
            return;
        }
        let puts: Vec<DiskPut<'_>> = held
            .iter()
            .map(|(bytes, meta)| DiskPut {
                key: meta.key,
                parent: meta.parent,
                payload: bytes,
            })
            .collect();
        for outcome in d.tier.put_many(ns, &puts) {
            match outcome {
                PutOutcome::Stored => r.written += 1,
                PutOutcome::NoSpace | PutOutcome::DiskFailed => r.failed += 1,
            }
        }
    }
}

fn log_drain(d: &DrainReport, deadline: Duration) {
    let took_ms = d.took.as_millis() as u64;
    if d.dropped > 0 {
        tracing::warn!(
            queued = d.queued,
            written = d.written,
            failed = d.failed,
            dropped = d.dropped,
            took_ms,
            deadline_ms = deadline.as_millis() as u64,
            "disk: write queue not drained at stop: blocks dropped unwritten (disk.drain_on_stop_ms passed)"
        );
    } else {
        tracing::info!(
            queued = d.queued,
            written = d.written,
            failed = d.failed,
            took_ms,
            "disk: write queue drained at stop"
        );
    }
}

fn log_persist(p: &PersistReport, deadline: Duration) {
    let took_ms = p.took.as_millis() as u64;
    if p.left > 0 || p.failed > 0 {
        tracing::warn!(
            host_blocks = p.host_blocks,
            already_on_disk = p.already_on_disk,
            written = p.written,
            failed = p.failed,
            left = p.left,
            took_ms,
            deadline_ms = deadline.as_millis() as u64,
            "disk: host tier only partly persisted at stop (deadline disk.persist_on_stop_ms, or the disk is smaller)"
        );
    } else {
        tracing::info!(
            host_blocks = p.host_blocks,
            already_on_disk = p.already_on_disk,
            written = p.written,
            took_ms,
            "disk: host tier persisted at stop"
        );
    }
}
