//! Streaming puts and gets: [`DiskTier::put_stream`] and
//! [`DiskTier::read_stream`] / [`DiskTier::get_stream`] keep up to `depth`
//! transfers in flight from the first block to the last (an
//! [`io::Pipeline`]), starting the next transfers before verifying or
//! publishing the finished ones, and answer each block through a callback
//! as it completes. Their steps are those of the batch calls (`write.rs`,
//! `read.rs`); the guards here give back slots and reader counts if a
//! caller's callback panics.

use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use super::file::align_up;
use super::header::HEADER_REGION;
use super::io::{self, IoDone, IoFailure, IoOp, OpKind};
use super::meta::Meta;
use super::read::{PlannedRead, ReadOutcome, check_read, plan_read, release_read};
use super::write::PlannedWrite;
use super::{DiskRead, DiskTier, StreamPut, now_ms};
use crate::events::PendingEvent;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::{PutOutcome, TierCounters};

/// The writes a [`DiskTier::put_stream`] has in flight, each with its
/// reserved slot. If the caller's callback panics, dropping this waits for
/// them (each up to its deadline) and frees the slots of those that
/// completed, unpublished; a write abandoned at its deadline frees its slot
/// through its late hook, as always. On the normal path nothing is left.
struct StreamWrites<'a, 'e> {
    meta: &'a Mutex<Meta>,
    pipe: io::Pipeline<'e>,
    /// (pipeline index, write).
    open: Vec<(usize, PlannedWrite)>,
}

impl Drop for StreamWrites<'_, '_> {
    fn drop(&mut self) {
        let mut done = Vec::new();
        while !self.open.is_empty() {
            self.pipe.wait_some(&mut done);
            for (index, d) in done.drain(..) {
                let Some(k) = self.open.iter().position(|(i, _)| *i == index) else {
                    continue;
                };
                let (_, p) = self.open.swap_remove(k);
                // A timed-out write frees its slot through its late hook.
                if !matches!(d.result, Err(IoFailure::Timeout))
                    && let Some(a) = self.meta.lock().arenas.get_mut(p.file as usize)
                {
                    a.free(p.slot);
                }
            }
        }
    }
}

/// The reader counts a [`DiskTier::read_stream`] holds: reads in flight and
/// reads finished but not yet released. Dropping it releases them all, so a
/// caller's callback that panics leaves no slot pinned by a reader count (an
/// abandoned read still in flight reads into a buffer the engine keeps, and
/// nobody looks at what it reads).
struct StreamReads<'a> {
    meta: &'a Mutex<Meta>,
    /// (pipeline index, key index, plan).
    open: Vec<(usize, usize, PlannedRead)>,
    /// (entry id, incarnation) of finished reads.
    release: Vec<(usize, u64)>,
}

impl Drop for StreamReads<'_> {
    fn drop(&mut self) {
        if self.open.is_empty() && self.release.is_empty() {
            return;
        }
        let mut meta = self.meta.lock();
        let open = self.open.drain(..).map(|(_, _, p)| (p.id, p.incarnation));
        for (id, incarnation) in self.release.drain(..).chain(open) {
            release_read(&mut meta, id, incarnation);
        }
    }
}

impl DiskTier {
    /// Stores a stream of blocks with up to `depth` writes in flight the
    /// whole time, like fio's `iodepth`: the window is filled at the start,
    /// and each time writes complete the next blocks' writes start (their
    /// slots reserved and buffers filled) before the finished ones are
    /// published, so the drive never waits for the caller between blocks.
    /// [`DiskTier::put_many`] instead starts with an empty queue and ends
    /// with its slowest write, every call.
    ///
    /// `items` is pulled lazily, only when a place in the window is free,
    /// and each payload is needed only until it has been copied into its
    /// I/O buffer, so a caller can generate payloads on the fly.
    /// `on_done(i, outcome)` answers item `i` (its position in `items`) as
    /// soon as its outcome is known: in completion order, not item order.
    /// `Stored` is answered only after the block's data has landed and its
    /// index entry is written; finished writes are published together, one
    /// index `WriteBatch` per wake-up, as in `put_many`. Each write has the
    /// tier's `write_timeout` from its own start; a failed, timed-out or
    /// refused block (empty, too large, no evictable space, no buffer)
    /// answers `NoSpace`. If the same key occurs twice in the stream, the
    /// later item's bytes are kept, whichever write completes first.
    /// Returns the number of blocks stored. If `on_done` panics, the panic
    /// reaches the caller once the writes in flight have completed and the
    /// slots of the unpublished ones are free again.
    pub fn put_stream<P, I>(
        &self,
        ns: &NamespaceId,
        items: I,
        depth: usize,
        mut on_done: impl FnMut(usize, PutOutcome),
    ) -> usize
    where
        I: IntoIterator<Item = StreamPut<P>>,
        P: AsRef<[u8]>,
    {
        let inner = &*self.inner;
        let Some(_open) = self.enter_write("put_stream") else {
            let mut refused = 0u64;
            for (i, _) in items.into_iter().enumerate() {
                refused += 1;
                on_done(i, PutOutcome::NoSpace);
            }
            TierCounters::add(&inner.counters.rejected_puts, refused);
            return 0;
        };
        let depth = depth.max(1);
        let timeout = inner.config.write_timeout;
        let mut items = items.into_iter().enumerate();
        let mut exhausted = false;
        // Writes in flight, with their pipeline index; on a panic in
        // `on_done`, their slots are given back when they complete.
        let mut held = StreamWrites {
            meta: &inner.meta,
            pipe: io::Pipeline::new(&*inner.engine, depth),
            open: Vec::with_capacity(depth),
        };
        let mut finished: Vec<(PlannedWrite, Result<(), IoFailure>)> = Vec::new();
        let mut done = Vec::with_capacity(depth);
        let mut pulled: Vec<(usize, StreamPut<P>)> = Vec::with_capacity(depth);
        let mut planned: Vec<Option<PlannedWrite>> = Vec::with_capacity(depth);
        let mut refused: Vec<usize> = Vec::new();
        let mut events = Vec::new();
        let mut stored_total = 0usize;
        let busy = inner.disk.write_busy.busy();
        loop {
            // Refill the window; a refused item does not take a place.
            while !exhausted && held.open.len() < depth {
                pulled.clear();
                while held.open.len() + pulled.len() < depth {
                    match items.next() {
                        Some(it) => pulled.push(it),
                        None => {
                            exhausted = true;
                            break;
                        }
                    }
                }
                if pulled.is_empty() {
                    break;
                }
                planned.clear();
                {
                    let mut meta = inner.meta.lock();
                    for (i, it) in &pulled {
                        planned.push(self.reserve_write(
                            &mut meta,
                            *i,
                            it.key,
                            it.parent,
                            it.payload.as_ref().len(),
                            &mut events,
                        ));
                    }
                }
                for ((i, it), p) in pulled.drain(..).zip(planned.drain(..)) {
                    let Some(mut p) = p else {
                        refused.push(i);
                        continue;
                    };
                    match self.start_write(ns, &mut p, it.payload.as_ref()) {
                        Some(op) => {
                            let index = held.pipe.push(op, Instant::now() + timeout);
                            // Each write starts as soon as its buffer is filled.
                            held.pipe.flush();
                            held.open.push((index, p));
                        }
                        None => finished.push((p, Err(IoFailure::Errno(libc::ENOMEM)))),
                    }
                }
            }
            // The window is full again: now publish what finished.
            stored_total += self.answer_stream_writes(
                ns,
                &mut refused,
                &mut finished,
                &mut events,
                &mut on_done,
            );
            if held.open.is_empty() {
                if exhausted {
                    break;
                }
                continue;
            }
            self.collect_stream_writes(&mut held, &mut done, &mut finished);
        }
        drop(busy);
        stored_total
    }

    /// Answers a put stream's refused items (`NoSpace`), publishes its
    /// finished writes (one index batch) and answers each, then publishes
    /// the events; returns the blocks stored.
    fn answer_stream_writes(
        &self,
        ns: &NamespaceId,
        refused: &mut Vec<usize>,
        finished: &mut Vec<(PlannedWrite, Result<(), IoFailure>)>,
        events: &mut Vec<PendingEvent>,
        on_done: &mut impl FnMut(usize, PutOutcome),
    ) -> usize {
        let inner = &*self.inner;
        if !refused.is_empty() {
            TierCounters::add(&inner.counters.rejected_puts, refused.len() as u64);
            for i in refused.drain(..) {
                on_done(i, PutOutcome::NoSpace);
            }
        }
        let mut stored_count = 0;
        if !finished.is_empty() {
            let stored = self.publish_writes(ns, finished, &|_| true, true);
            let mut ok = vec![false; finished.len()];
            for &w in &stored {
                ok[w] = true;
                self.stored_event(ns, &finished[w].0, events);
            }
            stored_count = stored.len();
            let failed = finished.len() - stored.len();
            TierCounters::add(&inner.counters.rejected_puts, failed as u64);
            for ((p, _), ok) in finished.drain(..).zip(ok) {
                let outcome = if ok {
                    PutOutcome::Stored
                } else {
                    PutOutcome::NoSpace
                };
                on_done(p.item, outcome);
            }
        }
        if !events.is_empty() {
            inner.events.publish(std::mem::take(events));
        }
        stored_count
    }

    /// Waits until some of a put stream's writes have completed (or passed
    /// their deadline) and moves them, counted, to `finished`.
    fn collect_stream_writes(
        &self,
        writes: &mut StreamWrites<'_, '_>,
        done: &mut Vec<(usize, IoDone)>,
        finished: &mut Vec<(PlannedWrite, Result<(), IoFailure>)>,
    ) {
        let inner = &*self.inner;
        writes.pipe.wait_some(done);
        for (index, d) in done.drain(..) {
            let Some(k) = writes.open.iter().position(|(i, _)| *i == index) else {
                continue;
            };
            let (_, p) = writes.open.swap_remove(k);
            let len = d.buf.as_ref().map_or(p.slot_bytes, |b| b.len());
            self.count(
                d.result,
                &inner.disk.write_ops,
                &inner.disk.write_bytes,
                len,
            );
            finished.push((p, d.result));
        }
    }

    /// Reads a stream of blocks with up to `depth` reads in flight the
    /// whole time, like fio's `iodepth`: each time reads complete, the next
    /// ones start before the finished ones are verified and handed out, so
    /// the drive never waits for the caller between blocks
    /// ([`DiskTier::read_many`] instead starts with an empty queue and ends
    /// with its slowest read, every call).
    ///
    /// `on_block(i, read)` answers `keys[i]` once: in completion order (a
    /// key that is not on disk at once, when the stream reaches it), not
    /// key order. Every answer is verified exactly as in `read_many`: the
    /// exact bytes stored under the key, or `None` for a miss, a slot that
    /// fails verification (dropped and counted in `corrupt_blocks`), an
    /// I/O error or a read slower than the tier's `read_timeout` (counted;
    /// the block stays indexed). Blocks are looked up (and their reader
    /// counts taken) only when their read starts. Returns the number of hits.
    /// If `on_block` panics, the panic reaches the caller with every reader
    /// count of the stream released.
    pub fn read_stream(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        depth: usize,
        mut on_block: impl FnMut(usize, Option<DiskRead>),
    ) -> usize {
        let inner = &*self.inner;
        let _open = self.enter();
        let depth = depth.max(1);
        let mut next = 0usize;
        let mut pipe = io::Pipeline::new(&*inner.engine, depth);
        // Reads in flight, and reader counts to drop (reads that have
        // finished); released on drop, also if `on_block` panics.
        let mut held = StreamReads {
            meta: &inner.meta,
            open: Vec::with_capacity(depth),
            release: Vec::with_capacity(depth),
        };
        let mut planned: Vec<(usize, PlannedRead)> = Vec::with_capacity(depth);
        let mut finished: Vec<(usize, PlannedRead, IoDone)> = Vec::with_capacity(depth);
        let mut misses: Vec<usize> = Vec::new();
        let mut done = Vec::with_capacity(depth);
        let (mut hits, mut bytes) = (0u64, 0u64);
        let busy = inner.disk.read_busy.busy();
        loop {
            // One lock: drop the reader counts of finished reads, plan the next ones.
            let room = depth - held.open.len();
            if !held.release.is_empty() || (room > 0 && next < keys.len()) {
                let mut meta = inner.meta.lock();
                for (id, incarnation) in held.release.drain(..) {
                    release_read(&mut meta, id, incarnation);
                }
                let now = now_ms();
                while planned.len() < room && next < keys.len() {
                    let i = next;
                    next += 1;
                    match meta
                        .lookup(ns, &keys[i])
                        .and_then(|id| plan_read(&mut meta, id, true, now))
                    {
                        Some(p) => planned.push((i, p)),
                        None => misses.push(i),
                    }
                }
            }
            self.start_stream_reads(&mut planned, &mut pipe, &mut held, &mut finished);
            // The window is full again: now answer, verifying what finished.
            for i in misses.drain(..) {
                on_block(i, None);
            }
            let (round_hits, round_bytes) = self.answer_stream_reads(&mut finished, &mut on_block);
            hits += round_hits;
            bytes += round_bytes;
            if held.open.is_empty() {
                if next >= keys.len() {
                    break;
                }
                continue;
            }
            self.collect_stream_reads(&mut pipe, &mut held, &mut done, &mut finished);
        }
        drop(busy);
        // The last reader counts go back.
        drop(held);
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.misses, keys.len() as u64 - hits);
        TierCounters::add(&inner.counters.bytes_out, bytes);
        hits as usize
    }

    /// Starts a read stream's planned reads, each with its own deadline; a
    /// read that gets no buffer finishes at once, failed.
    fn start_stream_reads(
        &self,
        planned: &mut Vec<(usize, PlannedRead)>,
        pipe: &mut io::Pipeline<'_>,
        reads: &mut StreamReads<'_>,
        finished: &mut Vec<(usize, PlannedRead, IoDone)>,
    ) {
        let inner = &*self.inner;
        let timeout = inner.config.read_timeout;
        for (i, p) in planned.drain(..) {
            let want = HEADER_REGION + align_up(p.len as usize);
            match inner.pool.get(want.min(p.slot_bytes)) {
                Some(buf) => {
                    let op = IoOp {
                        kind: OpKind::Read,
                        fd: inner.files[p.file as usize].fd(),
                        offset: p.offset,
                        buf,
                        on_late: None,
                    };
                    let index = pipe.push(op, Instant::now() + timeout);
                    reads.open.push((index, i, p));
                }
                None => {
                    reads.release.push((p.id, p.incarnation));
                    let failed = IoDone {
                        buf: None,
                        result: Err(IoFailure::Errno(libc::ENOMEM)),
                    };
                    finished.push((i, p, failed));
                }
            }
        }
        pipe.flush();
    }

    /// Verifies a read stream's finished reads and answers each (a slot
    /// that fails verification is dropped and answers `None`); returns the
    /// hits and their payload bytes.
    fn answer_stream_reads(
        &self,
        finished: &mut Vec<(usize, PlannedRead, IoDone)>,
        on_block: &mut impl FnMut(usize, Option<DiskRead>),
    ) -> (u64, u64) {
        let (mut hits, mut bytes) = (0u64, 0u64);
        for (i, p, d) in finished.drain(..) {
            let read = match check_read(&p, d) {
                ReadOutcome::Good(buf) => Some(p.verified_read(buf)),
                ReadOutcome::Corrupt(kind) => {
                    self.drop_corrupt(&[(&p, kind)]);
                    None
                }
                ReadOutcome::Failed(f) => {
                    tracing::debug!(key = %p.key, failure = ?f, "disk tier: read failed");
                    None
                }
            };
            if let Some(r) = &read {
                hits += 1;
                bytes += r.payload.len() as u64;
            }
            on_block(i, read);
        }
        (hits, bytes)
    }

    /// Waits until some of a read stream's reads have completed (or passed
    /// their deadline), counts them, queues their reader counts for release
    /// and moves them to `finished`.
    fn collect_stream_reads(
        &self,
        pipe: &mut io::Pipeline<'_>,
        reads: &mut StreamReads<'_>,
        done: &mut Vec<(usize, IoDone)>,
        finished: &mut Vec<(usize, PlannedRead, IoDone)>,
    ) {
        let inner = &*self.inner;
        pipe.wait_some(done);
        for (index, d) in done.drain(..) {
            let Some(k) = reads.open.iter().position(|(x, _, _)| *x == index) else {
                continue;
            };
            let (_, i, p) = reads.open.swap_remove(k);
            let len = d.buf.as_ref().map_or(0, |b| b.len());
            self.count(d.result, &inner.disk.read_ops, &inner.disk.read_bytes, len);
            // The read is over: its slot may be reused from now on.
            reads.release.push((p.id, p.incarnation));
            finished.push((i, p, d));
        }
    }

    /// [`DiskTier::read_stream`] answering payloads only (as
    /// [`DiskTier::get_many`] does for [`DiskTier::read_many`]).
    pub fn get_stream(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        depth: usize,
        mut on_block: impl FnMut(usize, Option<Bytes>),
    ) -> usize {
        self.read_stream(ns, keys, depth, |i, r| on_block(i, r.map(|r| r.payload)))
    }
}
