//! Movement out of the host tier: where its evictions go (`Demotions`:
//! the disk's demotion queue and the remote tier's write queue), and the
//! demotion queue itself (`Demoter`).
//!
//! Host-tier evictions (and write-through puts) become `DemoteItem`s on a
//! queue bounded in bytes; one writer thread drains it in batches into
//! [`DiskTier::put_many_if`]. A full queue drops the block (counted in
//! `demote_dropped`) instead of making a put wait for the disk.
//!
//! # Staleness
//!
//! Every queued item carries a ticket, recorded in `pending` under its
//! (namespace, key). A put or delete of the key removes that record
//! (`Demoter::forget`) before it removes the key from disk; the writer
//! publishes an item only if its ticket is still the recorded one, checked
//! under the disk tier's lock in the same critical section that publishes the
//! block. So a demotion can never land after, and overwrite, a newer put.
//!
//! # Reads of queued blocks
//!
//! The record also holds the queued bytes, so a get or lookup that misses
//! the host tier finds a block on its way to disk ([`Demoter::queued`])
//! instead of missing it: the host tier queues a victim before the victim
//! leaves its index, and the writer drops the record only after the disk
//! tier has published the block (or refused it, counted in
//! `demote_failed`), so the cache asks the queue after the host tier and
//! before the disk tier and a queued block is never missed.
//!
//! # Closing
//!
//! [`Demoter::close`] stops taking items and lets the writer drain what is
//! queued, for at most `drain_on_stop`; what is still queued then is dropped
//! (counted in `stop_dropped`), so a stop on a slow or failing disk ends in
//! bounded time. It reports what it wrote, what the disk refused and what
//! it dropped ([`DrainReport`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;

use crate::disk::{DiskPut, DiskTier};
use crate::host::{EvictionSink, Victim};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::remote::RemoteTier;
use crate::tier::PutOutcome;

/// Movement settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovementConfig {
    /// Bytes of payload waiting for the disk writer at most; a demotion that
    /// would exceed it is dropped. Default 256 MiB.
    pub demote_queue_bytes: u64,
    /// Blocks written to disk per batch at most. Default 32.
    pub demote_batch: usize,
    /// Whether a get served from disk copies the block into the host tier.
    /// Default true.
    pub promote_on_get: bool,
    /// How long a close lets the writer drain the queue (write-through
    /// copies and demotions); what is still queued then is dropped.
    /// Default 5 s.
    pub drain_on_stop: Duration,
    /// How long a close spends writing the host tier's blocks that the disk
    /// lacks to the disk (hottest first), so a restart finds them; zero:
    /// not at all. Default 10 s.
    pub persist_on_stop: Duration,
}

impl Default for MovementConfig {
    fn default() -> Self {
        MovementConfig {
            demote_queue_bytes: 256 << 20,
            demote_batch: 32,
            promote_on_get: true,
            drain_on_stop: Duration::from_secs(5),
            persist_on_stop: Duration::from_secs(10),
        }
    }
}

/// Counters of movement between tiers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MovementStats {
    /// Blocks written to disk by the demotion writer (evictions and write-through).
    pub demoted: u64,
    /// Demotions dropped because the queue was full.
    pub demote_dropped: u64,
    /// Demotions the disk refused (no space, I/O error) or that a newer put made stale.
    pub demote_failed: u64,
    /// Evictions not written because the disk already held the same bytes.
    pub demote_skipped: u64,
    /// Payload bytes waiting in the queue now.
    pub queued_bytes: u64,
    /// Blocks copied from disk into the host tier by gets.
    pub promoted: u64,
    /// Write-through copies queued.
    pub write_through: u64,
    /// Puts of `sync_write_through` namespaces whose disk write failed.
    pub sync_write_failed: u64,
    /// Queued blocks dropped because the close's drain deadline passed.
    pub stop_dropped: u64,
    /// Host-tier blocks the close wrote to disk.
    pub stop_persisted: u64,
}

/// What [`Demoter::close`] did with the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Blocks queued when the close began.
    pub queued: u64,
    /// Of those (and of any queued during the close), written to disk.
    pub written: u64,
    /// Refused by the disk (no room, I/O error) or made stale by a newer put.
    pub failed: u64,
    /// Dropped unwritten: the deadline passed.
    pub dropped: u64,
    /// How long the drain took.
    pub took: Duration,
}

/// One block on its way to disk.
#[derive(Debug)]
struct DemoteItem {
    ns: NamespaceId,
    key: BlockKey,
    parent: Option<BlockKey>,
    payload: Bytes,
    ticket: u64,
}

#[derive(Debug, Default)]
struct Counters {
    demoted: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    queued_bytes: AtomicU64,
    promoted: AtomicU64,
    write_through: AtomicU64,
    /// Items in the queue now (sent, not yet written or dropped).
    queued_items: AtomicU64,
    sync_write_failed: AtomicU64,
    stop_dropped: AtomicU64,
    stop_persisted: AtomicU64,
}

impl Counters {
    /// Takes a dropped item's bytes back out of the queue budget and counts the drop.
    fn unqueue_dropped(&self, len: u64) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// A queued demotion's record: its ticket, and the bytes a read of the
/// key is served until the disk has the block.
struct Queued {
    ticket: u64,
    payload: Bytes,
}

type Pending = Mutex<HashMap<(NamespaceId, BlockKey), Queued>>;

struct Shared {
    disk: DiskTier,
    config: MovementConfig,
    pending: Pending,
    next_ticket: AtomicU64,
    counters: Counters,
    /// Set when a close's drain deadline passed: the writer drops what it
    /// receives from then on.
    stop: AtomicBool,
}

/// The demotion queue and its writer thread.
pub(crate) struct Demoter {
    shared: Arc<Shared>,
    tx: Mutex<Option<Sender<DemoteItem>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Disconnected when the writer thread ends (it holds the sender).
    writer_done: Receiver<()>,
}

impl std::fmt::Debug for Demoter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demoter")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Demoter {
    /// Starts the writer thread.
    pub fn start(disk: DiskTier, config: MovementConfig) -> std::io::Result<Arc<Self>> {
        let shared = Arc::new(Shared {
            disk,
            config,
            pending: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(1),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let (done_tx, writer_done) = crossbeam_channel::bounded::<()>(0);
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kvstrata-demote".into())
                .spawn(move || {
                    let _done = done_tx;
                    write_loop(&shared, &rx);
                })?
        };
        Ok(Arc::new(Demoter {
            shared,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            writer_done,
        }))
    }

    /// Queues a copy of a block for the disk; `false` if it was dropped
    /// (queue full, or the demoter is closed).
    pub fn enqueue(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: Bytes,
    ) -> bool {
        let s = &*self.shared;
        let len = payload.len() as u64;
        let queued = s.counters.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if queued + len > s.config.demote_queue_bytes {
            s.counters.unqueue_dropped(len);
            return false;
        }
        let ticket = s.next_ticket.fetch_add(1, Ordering::Relaxed);
        let queued = Queued {
            ticket,
            payload: payload.clone(),
        };
        s.pending.lock().insert((*ns, *key), queued);
        s.counters.queued_items.fetch_add(1, Ordering::AcqRel);
        let item = DemoteItem {
            ns: *ns,
            key: *key,
            parent: parent.copied(),
            payload,
            ticket,
        };
        let sent = match self.tx.lock().as_ref() {
            Some(tx) => match tx.try_send(item) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            s.counters.unqueue_dropped(len);
            s.counters.queued_items.fetch_sub(1, Ordering::AcqRel);
            forget_ticket(&s.pending, ns, key, ticket);
        }
        sent
    }

    /// Queues a write-through copy of a block just put.
    pub fn write_through(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: Bytes,
    ) -> bool {
        let ok = self.enqueue(ns, key, parent, payload);
        if ok {
            self.shared
                .counters
                .write_through
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Makes any queued demotion of the key stale (call before removing the
    /// key from disk on a put or delete).
    pub fn forget(&self, ns: &NamespaceId, key: &BlockKey) {
        self.shared.pending.lock().remove(&(*ns, *key));
    }

    /// The bytes of each key's block waiting in the queue (evicted from the
    /// host tier, not yet published on disk), `None` where none is: see
    /// "Reads of queued blocks" in the module docs. A put or delete of the
    /// key ([`Demoter::forget`]) ends it.
    pub fn queued(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<Option<Bytes>> {
        let p = self.shared.pending.lock();
        keys.iter()
            .map(|k| p.get(&(*ns, *k)).map(|q| q.payload.clone()))
            .collect()
    }

    /// Counts a promotion (done by the cache).
    pub fn count_promotion(&self) {
        self.shared
            .counters
            .promoted
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts puts of `sync_write_through` namespaces whose disk write
    /// failed (done by the cache).
    pub fn count_sync_failed(&self, n: u64) {
        let c = &self.shared.counters;
        c.sync_write_failed.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts host-tier blocks a close wrote to disk (done by the cache).
    pub fn count_persisted(&self, n: u64) {
        let c = &self.shared.counters;
        c.stop_persisted.fetch_add(n, Ordering::Relaxed);
    }

    pub fn stats(&self) -> MovementStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MovementStats {
            demoted: get(&c.demoted),
            demote_dropped: get(&c.dropped),
            demote_failed: get(&c.failed),
            demote_skipped: get(&c.skipped),
            queued_bytes: get(&c.queued_bytes),
            promoted: get(&c.promoted),
            write_through: get(&c.write_through),
            sync_write_failed: get(&c.sync_write_failed),
            stop_dropped: get(&c.stop_dropped),
            stop_persisted: get(&c.stop_persisted),
        }
    }

    /// Stops taking items and lets the writer drain the queue for at most
    /// `deadline`; then it drops what is left, and this waits for the
    /// writer to end (after the batch it is writing, which its own write
    /// timeout bounds). Idempotent: a second call reports nothing.
    pub fn close(&self, deadline: Duration) -> DrainReport {
        let began = Instant::now();
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        let (written, failed, dropped) = (get(&c.demoted), get(&c.failed), get(&c.stop_dropped));
        let queued = get(&c.queued_items);
        drop(self.tx.lock().take());
        let Some(writer) = self.writer.lock().take() else {
            return DrainReport::default();
        };
        if let Err(RecvTimeoutError::Timeout) = self.writer_done.recv_timeout(deadline) {
            self.shared.stop.store(true, Ordering::Release);
        }
        if writer.join().is_err() {
            tracing::error!("demotion writer panicked");
        }
        DrainReport {
            queued,
            written: get(&c.demoted) - written,
            failed: get(&c.failed) - failed,
            dropped: get(&c.stop_dropped) - dropped,
            took: began.elapsed(),
        }
    }

    /// Waits until everything queued so far has been written or dropped
    /// (a test hook; [`Demoter::close`] drains the queue itself). Polls;
    /// returns `false` after `timeout`.
    #[cfg(feature = "testing")]
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + timeout;
        while self.shared.counters.queued_bytes.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }
}

impl Drop for Demoter {
    fn drop(&mut self) {
        self.close(self.shared.config.drain_on_stop);
    }
}

impl Demoter {
    /// Whether a host-tier victim should be queued: not when the disk already
    /// holds the same bytes (counted as skipped) or the queue has no room for
    /// it (counted as dropped). Checked before the victim's bytes are copied.
    pub fn wants(&self, v: &Victim<'_>) -> bool {
        if self.shared.disk.holds(v.namespace, v.key, v.checksum) {
            self.shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let len = v.payload.len() as u64;
        let c = &self.shared.counters;
        if c.queued_bytes.load(Ordering::Acquire) + len > self.shared.config.demote_queue_bytes {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Where the host tier's victims go ([`EvictionSink`]): the disk's
/// demotion queue and, with `demote` set, the remote tier's write queue.
/// Each victim's bytes are copied once, and only if one of them takes it.
/// Runs with the host tier's lock released (see [`crate::host`]).
pub(crate) struct Demotions {
    pub(crate) demoter: Option<Arc<Demoter>>,
    pub(crate) remote: Option<RemoteTier>,
}

impl Demotions {
    /// Whether any victim would go anywhere.
    pub(crate) fn is_empty(&self) -> bool {
        self.demoter.is_none() && self.remote.is_none()
    }

    fn hand_on_one(&self, v: &Victim<'_>) {
        let to_disk = self.demoter.as_ref().filter(|d| d.wants(v));
        let to_remote = self.remote.as_ref().filter(|r| {
            let room = r.has_room(v.payload.len() as u64);
            if !room {
                r.count_dropped();
            }
            room
        });
        if to_disk.is_none() && to_remote.is_none() {
            return;
        }
        let bytes = Bytes::copy_from_slice(v.payload);
        if let Some(r) = to_remote {
            r.enqueue_put(v.namespace, v.key, v.parent, bytes.clone(), false);
        }
        if let Some(d) = to_disk {
            d.enqueue(v.namespace, v.key, v.parent, bytes);
        }
    }
}

impl EvictionSink for Demotions {
    fn hand_on(&self, victims: &[Victim<'_>]) {
        for v in victims {
            self.hand_on_one(v);
        }
    }
}

fn forget_ticket(pending: &Pending, ns: &NamespaceId, key: &BlockKey, ticket: u64) {
    let mut p = pending.lock();
    if p.get(&(*ns, *key)).is_some_and(|q| q.ticket == ticket) {
        p.remove(&(*ns, *key));
    }
}

/// Whether `ticket` is still the key's recorded demotion.
fn is_current(pending: &Pending, ns: &NamespaceId, key: &BlockKey, ticket: u64) -> bool {
    pending
        .lock()
        .get(&(*ns, *key))
        .is_some_and(|q| q.ticket == ticket)
}

fn write_loop(s: &Shared, rx: &Receiver<DemoteItem>) {
    let max_batch = s.config.demote_batch.max(1);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        if s.stop.load(Ordering::Acquire) {
            drop_at_stop(s, &batch);
            continue;
        }
        // One put_many per namespace, in arrival order.
        batch.sort_by_key(|i| i.ns);
        for group in batch.chunk_by(|a, b| a.ns == b.ns) {
            write_group(s, group);
        }
    }
}

fn write_group(s: &Shared, group: &[DemoteItem]) {
    let Some(first) = group.first() else {
        return;
    };
    let ns = first.ns;
    let puts: Vec<DiskPut<'_>> = group
        .iter()
        .map(|i| DiskPut {
            key: i.key,
            parent: i.parent,
            payload: &i.payload,
        })
        .collect();
    let keep = |i: usize| {
        group
            .get(i)
            .is_some_and(|it| is_current(&s.pending, &it.ns, &it.key, it.ticket))
    };
    let outcomes = s.disk.put_many_if(&ns, &puts, &keep);
    let c = &s.counters;
    for (item, outcome) in group.iter().zip(outcomes) {
        match outcome {
            PutOutcome::Stored => c.demoted.fetch_add(1, Ordering::Relaxed),
            PutOutcome::NoSpace | PutOutcome::DiskFailed => {
                c.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        forget_ticket(&s.pending, &item.ns, &item.key, item.ticket);
        c.queued_bytes
            .fetch_sub(item.payload.len() as u64, Ordering::AcqRel);
        c.queued_items.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Drops queued items unwritten: a close's drain deadline passed.
fn drop_at_stop(s: &Shared, batch: &[DemoteItem]) {
    let c = &s.counters;
    for item in batch {
        forget_ticket(&s.pending, &item.ns, &item.key, item.ticket);
        c.queued_bytes
            .fetch_sub(item.payload.len() as u64, Ordering::AcqRel);
        c.queued_items.fetch_sub(1, Ordering::AcqRel);
        c.stop_dropped.fetch_add(1, Ordering::Relaxed);
    }
}
