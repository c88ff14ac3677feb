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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
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
}

impl Default for MovementConfig {
    fn default() -> Self {
        MovementConfig {
            demote_queue_bytes: 256 << 20,
            demote_batch: 32,
            promote_on_get: true,
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
}

impl Counters {
    /// Takes a dropped item's bytes back out of the queue budget and counts the drop.
    fn unqueue_dropped(&self, len: u64) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

type Pending = Mutex<HashMap<(NamespaceId, BlockKey), u64>>;

struct Shared {
    disk: DiskTier,
    config: MovementConfig,
    pending: Pending,
    next_ticket: AtomicU64,
    counters: Counters,
}

/// The demotion queue and its writer thread.
pub(crate) struct Demoter {
    shared: Arc<Shared>,
    tx: Mutex<Option<Sender<DemoteItem>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kvstrata-demote".into())
                .spawn(move || write_loop(&shared, &rx))?
        };
        Ok(Arc::new(Demoter {
            shared,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
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
        s.pending.lock().insert((*ns, *key), ticket);
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

    /// Counts a promotion (done by the cache).
    pub fn count_promotion(&self) {
        self.shared
            .counters
            .promoted
            .fetch_add(1, Ordering::Relaxed);
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
        }
    }

    /// Stops taking items, lets the writer finish what is queued, and waits
    /// for it. Idempotent.
    pub fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(h) = self.writer.lock().take()
            && h.join().is_err()
        {
            tracing::error!("demotion writer panicked");
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
        self.close();
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
    if p.get(&(*ns, *key)) == Some(&ticket) {
        p.remove(&(*ns, *key));
    }
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
            .is_some_and(|it| s.pending.lock().get(&(it.ns, it.key)) == Some(&it.ticket))
    };
    let outcomes = s.disk.put_many_if(&ns, &puts, &keep);
    let c = &s.counters;
    for (item, outcome) in group.iter().zip(outcomes) {
        match outcome {
            PutOutcome::Stored => c.demoted.fetch_add(1, Ordering::Relaxed),
            PutOutcome::NoSpace => c.failed.fetch_add(1, Ordering::Relaxed),
        };
        forget_ticket(&s.pending, &item.ns, &item.key, item.ticket);
        c.queued_bytes
            .fetch_sub(item.payload.len() as u64, Ordering::AcqRel);
    }
}
