//! The event bus behind `Watch`: every block stored, evicted or deleted in any
//! tier is published here with a sequence number that increases by one per event.

use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::TierKind;

/// What happened to a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Stored,
    Evicted,
    Deleted,
}

/// One cache event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEvent {
    pub seq: u64,
    pub kind: EventKind,
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub tier: TierKind,
    pub unix_ms: u64,
}

/// An event before it gets its sequence number.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub kind: EventKind,
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub tier: TierKind,
}

/// Broadcasts events to every watcher. A watcher that falls more than the
/// buffer behind loses the oldest events and is told how many (tokio's
/// `RecvError::Lagged`), so it can resynchronise.
pub struct EventBus {
    tx: broadcast::Sender<CacheEvent>,
    seq: Mutex<u64>,
}

impl EventBus {
    /// A bus keeping up to `buffer` events for slow watchers.
    pub fn new(buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(16));
        EventBus {
            tx,
            seq: Mutex::new(0),
        }
    }

    /// Publishes events in order.
    pub fn publish(&self, events: impl IntoIterator<Item = PendingEvent>) {
        // Most callers publish what an operation may have caused, often
        // nothing (a reservation that evicted nothing): no clock, no lock.
        let mut events = events.into_iter().peekable();
        if events.peek().is_none() {
            return;
        }
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut seq = self.seq.lock();
        for e in events {
            *seq += 1;
            // No receivers is fine: nobody is watching.
            let _ = self.tx.send(CacheEvent {
                seq: *seq,
                kind: e.kind,
                namespace: e.namespace,
                key: e.key,
                parent: e.parent,
                tier: e.tier,
                unix_ms,
            });
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.tx.subscribe()
    }

    /// Sequence number of the latest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        *self.seq.lock()
    }
}
