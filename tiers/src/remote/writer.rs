//! The remote tier's write queue.
//!
//! Every queued operation (write or delete) is recorded in [`PendingState`]
//! under its (namespace, key) with a ticket; a newer operation on the key
//! replaces the record, and the writer runs an item only if its ticket is
//! still the recorded one. So the last operation queued for a key is the one
//! that reaches the cluster, whatever the order of the commands in flight:
//! the writer runs one batch at a time and a key appears at most once in a
//! batch.
//!
//! A failed write or delete leaves a delete behind (a tombstone, retried
//! every `retry_interval`): the cluster may still hold an older copy, which
//! must not be served. Until then reads of the key on this node miss.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::cluster_async::ClusterConnection;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Shared, bump, record};
use crate::events::EventKind;
use crate::key::BlockKey;
use crate::namespace::NamespaceId;

/// Tombstones kept for retry at most; beyond, a failed delete is given up
/// (counted in `queue_dropped`).
const MAX_TOMBSTONES: usize = 1 << 20;

/// What to do with a key on the cluster.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Set {
        payload: Bytes,
        parent: Option<BlockKey>,
        write_through: bool,
    },
    Delete,
}

impl Op {
    fn queued_bytes(&self) -> u64 {
        match self {
            Op::Set { payload, .. } => payload.len() as u64,
            Op::Delete => 0,
        }
    }
}

/// One key's latest queued operation.
#[derive(Debug)]
struct Entry {
    ticket: u64,
    op: Op,
    /// A delete left behind by a failed operation, waiting for its retry.
    tombstone: bool,
}

/// The latest queued operation of every key not yet on the cluster.
#[derive(Debug, Default)]
pub(crate) struct PendingState {
    ops: HashMap<(NamespaceId, BlockKey), Entry>,
    next_ticket: u64,
    tombstones: usize,
}

impl PendingState {
    pub fn latest(&self, ns: &NamespaceId, key: &BlockKey) -> Option<&Op> {
        self.ops.get(&(*ns, *key)).map(|e| &e.op)
    }

    /// Records `op` as the key's latest; returns its ticket and the queued
    /// bytes of the operation it replaced.
    fn record(&mut self, ns: &NamespaceId, key: &BlockKey, op: Op, tombstone: bool) -> (u64, u64) {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.tombstones += usize::from(tombstone);
        let replaced = self.ops.insert(
            (*ns, *key),
            Entry {
                ticket,
                op,
                tombstone,
            },
        );
        (ticket, replaced.map_or(0, |old| self.forget(old)))
    }

    fn forget(&mut self, entry: Entry) -> u64 {
        self.tombstones -= usize::from(entry.tombstone);
        entry.op.queued_bytes()
    }

    /// The operation if `ticket` is still the key's latest.
    fn current(&self, ns: &NamespaceId, key: &BlockKey, ticket: u64) -> Option<Op> {
        match self.ops.get(&(*ns, *key)) {
            Some(e) if e.ticket == ticket => Some(e.op.clone()),
            _ => None,
        }
    }

    /// Removes the record if `ticket` is still the latest; returns its bytes.
    fn finish(&mut self, ns: &NamespaceId, key: &BlockKey, ticket: u64) -> Option<u64> {
        match self.ops.get(&(*ns, *key)) {
            Some(e) if e.ticket == ticket => {
                let entry = self.ops.remove(&(*ns, *key))?;
                Some(self.forget(entry))
            }
            _ => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Debug)]
struct Item {
    ns: NamespaceId,
    key: BlockKey,
    ticket: u64,
}

/// The queue's sender side; the writer task drains the receiver.
pub(crate) struct Writer {
    tx: UnboundedSender<Item>,
}

impl Writer {
    /// Starts the writer task on `handle`; it runs until `stop` says so.
    pub fn start(
        shared: Arc<Shared>,
        handle: &tokio::runtime::Handle,
        stop: watch::Receiver<bool>,
    ) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = unbounded_channel();
        let task = handle.spawn(write_loop(shared, rx, tx.clone(), stop));
        (Writer { tx }, task)
    }

    /// Queues `op` for the key. A write that does not fit the byte budget
    /// is dropped (counted); if it was a put's write-through, a delete is
    /// queued instead. Returns whether `op` itself was queued.
    pub fn enqueue(&self, shared: &Shared, ns: &NamespaceId, key: &BlockKey, op: Op) -> bool {
        let c = &shared.counters;
        let len = op.queued_bytes();
        let (op, queued) = if len > 0
            && c.queued_bytes.load(Ordering::Acquire) + len > shared.config.queue_bytes
        {
            bump(&c.queue_dropped, 1);
            match op {
                Op::Set {
                    write_through: true,
                    ..
                } => (Op::Delete, false),
                _ => return false,
            }
        } else {
            (op, true)
        };
        let len = op.queued_bytes();
        let (ticket, freed) = shared.pending.lock().record(ns, key, op, false);
        c.queued_bytes.fetch_add(len, Ordering::AcqRel);
        c.queued_bytes.fetch_sub(freed, Ordering::AcqRel);
        let _ = self.tx.send(Item {
            ns: *ns,
            key: *key,
            ticket,
        });
        queued
    }

    /// Waits until nothing is queued; `false` on timeout (polls; blocks the
    /// calling thread).
    pub fn flush(&self, shared: &Shared, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if shared.pending.lock().is_empty() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Writes one block; counts and publishes on success.
pub(crate) async fn set_block(
    shared: &Shared,
    mut conn: ClusterConnection,
    ns: &NamespaceId,
    key: &BlockKey,
    parent: Option<&BlockKey>,
    payload: &[u8],
) -> bool {
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    let value = record::encode(ns, key, parent, payload, seq);
    let mut cmd = redis::cmd("SET");
    cmd.arg(shared.key(ns, key)).arg(value);
    if let Some(ttl) = shared.config.ttl {
        cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
    }
    match tokio::time::timeout(shared.config.deadline, cmd.query_async::<()>(&mut conn)).await {
        Ok(Ok(())) => {
            bump(&shared.counters.writes, 1);
            bump(&shared.counters.write_bytes, payload.len() as u64);
            shared.publish(EventKind::Stored, ns, key, parent.copied());
            true
        }
        Ok(Err(e)) => {
            shared.redis_failed(&e);
            false
        }
        Err(_) => {
            shared.failed(true, "write past its deadline");
            false
        }
    }
}

async fn delete_block(
    shared: &Shared,
    mut conn: ClusterConnection,
    ns: &NamespaceId,
    key: &BlockKey,
) -> bool {
    let cmd = redis::cmd("DEL").arg(shared.key(ns, key)).clone();
    match tokio::time::timeout(shared.config.deadline, cmd.query_async::<i64>(&mut conn)).await {
        Ok(Ok(n)) => {
            if n > 0 {
                bump(&shared.counters.deletes, 1);
                shared.publish(EventKind::Deleted, ns, key, None);
            }
            true
        }
        Ok(Err(e)) => {
            shared.redis_failed(&e);
            false
        }
        Err(_) => {
            shared.failed(true, "delete past its deadline");
            false
        }
    }
}

async fn run_op(shared: &Shared, ns: &NamespaceId, key: &BlockKey, op: &Op) -> bool {
    let Some(conn) = shared.conn() else {
        return false;
    };
    match op {
        Op::Set {
            payload, parent, ..
        } => set_block(shared, conn, ns, key, parent.as_ref(), payload).await,
        Op::Delete => delete_block(shared, conn, ns, key).await,
    }
}

async fn write_loop(
    shared: Arc<Shared>,
    mut rx: UnboundedReceiver<Item>,
    tx: UnboundedSender<Item>,
    mut stop: watch::Receiver<bool>,
) {
    let max = shared.config.write_concurrency.max(1);
    let mut batch = Vec::with_capacity(max);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, max) => n,
            _ = stop.changed() => return,
        };
        if received == 0 || *stop.borrow() {
            return;
        }
        let mut set = tokio::task::JoinSet::new();
        for item in batch.drain(..) {
            let Some(op) = shared
                .pending
                .lock()
                .current(&item.ns, &item.key, item.ticket)
            else {
                continue; // superseded by a newer operation on the key
            };
            let shared = Arc::clone(&shared);
            set.spawn(async move {
                let ok = run_op(&shared, &item.ns, &item.key, &op).await;
                (item, ok)
            });
        }
        while let Some(done) = set.join_next().await {
            let Ok((item, ok)) = done else { continue };
            let c = &shared.counters;
            let mut pending = shared.pending.lock();
            if ok {
                if let Some(bytes) = pending.finish(&item.ns, &item.key, item.ticket) {
                    c.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                }
                continue;
            }
            // Failed: the cluster may hold an older copy. Leave a delete
            // behind and retry it later, unless a newer operation took over.
            let Some(bytes) = pending.finish(&item.ns, &item.key, item.ticket) else {
                continue;
            };
            c.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            if pending.tombstones >= MAX_TOMBSTONES {
                bump(&c.queue_dropped, 1);
                continue;
            }
            let (ticket, _) = pending.record(&item.ns, &item.key, Op::Delete, true);
            drop(pending);
            let retry = Item { ticket, ..item };
            let tx = tx.clone();
            let wait = shared.config.retry_interval;
            let closed = Arc::clone(&shared);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if !closed.closed.load(Ordering::Acquire) {
                    let _ = tx.send(retry);
                }
            });
        }
        let pending = shared.pending.lock();
        if shared.closed.load(Ordering::Acquire) && pending.is_empty() {
            return;
        }
    }
}
