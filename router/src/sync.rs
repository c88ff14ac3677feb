//! Following one node: connect, subscribe to `Watch`, take a `ListBlocks`
//! snapshot while buffering events, install it as the node's index, replay the
//! buffer, apply the stream; after a lag or a broken stream, wait and start over.
//! The per-node state and the state shared by every node live here.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use kvstrata_client::{Client, ClientError, ClientOptions};
use kvstrata_proto::v1 as proto;
use kvstrata_types::NamespaceId;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::config::{NodeSpec, RouteTier, RouterConfig};
use crate::decision::{NodeStatus, TierCounts};
use crate::score::{NodeIndex, RemoteSet};

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct NodeState {
    pub(crate) spec: NodeSpec,
    pub(crate) status: Mutex<NodeStatus>,
    /// Attempts to follow the node that ended (failed to sync, or broke after).
    pub(crate) ended_attempts: AtomicU64,
    pub(crate) index: RwLock<NodeIndex>,
    pub(crate) in_flight: AtomicU64,
    pub(crate) decisions: AtomicU64,
    pub(crate) snapshots: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) lagged: AtomicU64,
    pub(crate) missed_events: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) last_seq: AtomicU64,
    pub(crate) last_score: Mutex<Option<f64>>,
    pub(crate) last_error: Mutex<Option<String>>,
}

impl NodeState {
    pub(crate) fn new(spec: NodeSpec) -> Self {
        NodeState {
            spec,
            status: Mutex::new(NodeStatus::Connecting),
            ended_attempts: AtomicU64::new(0),
            index: RwLock::new(NodeIndex::default()),
            in_flight: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            missed_events: AtomicU64::new(0),
            events: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            last_score: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        *lock(&self.status)
    }
}

pub(crate) struct Shared {
    pub(crate) config: RouterConfig,
    pub(crate) nodes: Vec<NodeState>,
    pub(crate) remote: RwLock<RemoteSet>,
    pub(crate) decisions: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) matched: Mutex<TierCounts>,
    /// Bumped on every status change, for [`Router::wait_synced`].
    pub(crate) changes: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn set_status(&self, i: usize, status: NodeStatus) {
        if let Some(n) = self.nodes.get(i) {
            *lock(&n.status) = status;
        }
        self.changes.send_modify(|c| *c = c.wrapping_add(1));
    }

    /// Applies one (non-LAGGED) event to node `i`'s index or the remote set.
    pub(crate) fn apply_event(&self, index: &mut NodeIndex, e: &proto::WatchEvent) {
        let Some(ev) = parse_event(e) else {
            return;
        };
        match ev.tier {
            Some(RouteTier::Remote) => {
                let mut remote = write(&self.remote);
                match ev.kind {
                    proto::EventKind::Stored => remote.add(ev.ns, ev.key),
                    _ => remote.remove(&ev.ns, &ev.key),
                }
            }
            tier => match ev.kind {
                proto::EventKind::Stored => {
                    if let Some(t) = tier {
                        index.add(ev.ns, ev.key, t);
                    }
                }
                _ => index.remove(&ev.ns, &ev.key, tier),
            },
        }
    }
}

struct ParsedEvent {
    kind: proto::EventKind,
    ns: NamespaceId,
    key: Bytes,
    tier: Option<RouteTier>,
}

/// A STORED / EVICTED / DELETED event with a valid namespace and key.
fn parse_event(e: &proto::WatchEvent) -> Option<ParsedEvent> {
    let kind = proto::EventKind::try_from(e.kind).ok()?;
    if !matches!(
        kind,
        proto::EventKind::Stored | proto::EventKind::Evicted | proto::EventKind::Deleted
    ) || e.key.is_empty()
    {
        return None;
    }
    let ns = NamespaceId::from_slice("namespace_id", &e.namespace_id).ok()?;
    Some(ParsedEvent {
        kind,
        ns,
        key: e.key.clone(),
        tier: RouteTier::from_proto(e.tier),
    })
}

/// Why following a node stopped.
enum SyncEnd {
    Client(ClientError),
    Lagged(u64),
    StreamEnded,
    BufferFull,
}

/// Events buffered while a snapshot is taken, at most; beyond, the node is
/// resynchronised as if it had lagged.
const MAX_BUFFERED_EVENTS: usize = 1 << 20;

impl fmt::Display for SyncEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncEnd::Client(e) => write!(f, "{e}"),
            SyncEnd::Lagged(n) => write!(f, "watch stream lagged ({n} events missed)"),
            SyncEnd::StreamEnded => f.write_str("watch stream ended"),
            SyncEnd::BufferFull => write!(
                f,
                "more than {MAX_BUFFERED_EVENTS} events arrived during the snapshot"
            ),
        }
    }
}

/// Connect, subscribe, snapshot, follow: returns when the node must be resynchronised.
async fn follow_node(shared: &Shared, i: usize) -> SyncEnd {
    let Some(node) = shared.nodes.get(i) else {
        return SyncEnd::StreamEnded;
    };
    let cfg = &shared.config;
    shared.set_status(i, NodeStatus::Connecting);
    let options = ClientOptions {
        connect_timeout: cfg.connect_timeout,
        request_timeout: Some(cfg.request_timeout),
        token: cfg.token.clone(),
        tls: cfg.tls.clone(),
        ..ClientOptions::default()
    };
    let client = match Client::connect_with(&node.spec.target, options).await {
        Ok(c) => c,
        Err(e) => return SyncEnd::Client(e),
    };
    // Subscribe first: every change after this point arrives as an event, so
    // replaying them over the snapshot leaves nothing out.
    let mut events = match client.watch(None).await {
        Ok(s) => s,
        Err(e) => return SyncEnd::Client(e),
    };
    shared.set_status(i, NodeStatus::Snapshotting);
    let snapshot = take_snapshot(&client, cfg.snapshot_page_size);
    tokio::pin!(snapshot);
    let mut buffered = Vec::new();
    let blocks = loop {
        tokio::select! {
            r = &mut snapshot => match r {
                Ok(b) => break b,
                Err(e) => return SyncEnd::Client(e),
            },
            ev = events.next() => match ev {
                Some(Ok(e)) if e.kind == proto::EventKind::Lagged as i32 => {
                    node.lagged.fetch_add(1, Ordering::Relaxed);
                    node.missed_events.fetch_add(e.missed, Ordering::Relaxed);
                    return SyncEnd::Lagged(e.missed);
                }
                Some(Ok(_)) if buffered.len() >= MAX_BUFFERED_EVENTS => {
                    return SyncEnd::BufferFull;
                }
                Some(Ok(e)) => buffered.push(e),
                Some(Err(e)) => return SyncEnd::Client(e),
                None => return SyncEnd::StreamEnded,
            },
        }
    };
    let mut index = NodeIndex::default();
    {
        let mut remote = write(&shared.remote);
        for b in &blocks {
            if b.key.is_empty() {
                continue;
            }
            let Ok(ns) = NamespaceId::from_slice("namespace_id", &b.namespace_id) else {
                continue;
            };
            match RouteTier::from_proto(b.tier) {
                Some(RouteTier::Remote) => remote.add(ns, b.key.clone()),
                Some(t) => index.add(ns, b.key.clone(), t),
                None => {}
            }
        }
    }
    let replayed = buffered.len();
    for e in &buffered {
        shared.apply_event(&mut index, e);
        node.last_seq.fetch_max(e.seq, Ordering::Relaxed);
    }
    node.events.fetch_add(replayed as u64, Ordering::Relaxed);
    let size = index.len();
    *write(&node.index) = index;
    node.snapshots.fetch_add(1, Ordering::Relaxed);
    *lock(&node.last_error) = None;
    shared.set_status(i, NodeStatus::Synced);
    tracing::info!(
        node = %node.spec.name,
        target = %node.spec.target,
        listed = blocks.len(),
        replayed,
        index_blocks = size,
        "route: node synced"
    );
    loop {
        match events.next().await {
            Some(Ok(e)) if e.kind == proto::EventKind::Lagged as i32 => {
                node.lagged.fetch_add(1, Ordering::Relaxed);
                node.missed_events.fetch_add(e.missed, Ordering::Relaxed);
                return SyncEnd::Lagged(e.missed);
            }
            Some(Ok(e)) => {
                {
                    let mut index = write(&node.index);
                    shared.apply_event(&mut index, &e);
                }
                node.events.fetch_add(1, Ordering::Relaxed);
                node.last_seq.fetch_max(e.seq, Ordering::Relaxed);
            }
            Some(Err(e)) => return SyncEnd::Client(e),
            None => return SyncEnd::StreamEnded,
        }
    }
}

/// Every block of every namespace and tier, page by page.
async fn take_snapshot(
    client: &Client,
    page_size: u32,
) -> Result<Vec<proto::BlockInfo>, ClientError> {
    let mut out = Vec::new();
    let mut token = Bytes::new();
    loop {
        let page = client
            .list_blocks(None, None, page_size, token.clone())
            .await?;
        out.extend(page.blocks);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        if page.next_page_token == token {
            return Err(ClientError::InvalidResponse(
                "ListBlocks returned the same page token twice".into(),
            ));
        }
        token = page.next_page_token;
    }
}

/// One node's task: follow it, and after each end wait and start over.
pub(crate) async fn run_node(shared: Arc<Shared>, i: usize, mut shutdown: watch::Receiver<bool>) {
    let Some(node) = shared.nodes.get(i) else {
        return;
    };
    let mut first = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !first {
            node.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let end = tokio::select! {
            end = follow_node(&shared, i) => end,
            _ = shutdown.changed() => return,
        };
        let was_synced = node.status() == NodeStatus::Synced;
        let reason = end.to_string();
        *lock(&node.last_error) = Some(reason.clone());
        node.ended_attempts.fetch_add(1, Ordering::Relaxed);
        shared.set_status(i, NodeStatus::Disconnected);
        tracing::warn!(
            node = %node.spec.name,
            target = %node.spec.target,
            was_synced,
            error = %reason,
            retry_in = ?shared.config.reconnect_interval,
            "route: node not synced"
        );
        tokio::select! {
            _ = tokio::time::sleep(shared.config.reconnect_interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> NamespaceId {
        NamespaceId([7; 16])
    }

    fn key(i: u8) -> Bytes {
        Bytes::from(vec![i; 16])
    }

    #[test]
    fn events_update_the_node_and_the_remote_set() {
        let (changes, _) = watch::channel(0);
        let shared = Shared {
            config: RouterConfig::default(),
            nodes: Vec::new(),
            remote: RwLock::new(RemoteSet::default()),
            decisions: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            matched: Mutex::new(TierCounts::default()),
            changes,
        };
        let ev = |kind: proto::EventKind, k: u8, tier: proto::Tier| proto::WatchEvent {
            seq: 1,
            kind: kind as i32,
            namespace_id: Bytes::copy_from_slice(ns().as_bytes()),
            key: key(k),
            tier: tier as i32,
            ..Default::default()
        };
        let mut idx = NodeIndex::default();
        use proto::EventKind::{Deleted, Evicted, Stored};
        shared.apply_event(&mut idx, &ev(Stored, 1, proto::Tier::Host));
        shared.apply_event(&mut idx, &ev(Stored, 1, proto::Tier::Disk));
        shared.apply_event(&mut idx, &ev(Stored, 2, proto::Tier::Remote));
        assert_eq!(idx.tiers(&ns(), &key(1)), 2 | 4);
        assert!(read(&shared.remote).contains(&ns(), &key(2)));
        assert_eq!(idx.tiers(&ns(), &key(2)), 0, "remote is not a node tier");
        shared.apply_event(&mut idx, &ev(Evicted, 1, proto::Tier::Host));
        assert_eq!(idx.tiers(&ns(), &key(1)), 4);
        shared.apply_event(&mut idx, &ev(Deleted, 1, proto::Tier::Unspecified));
        assert_eq!(idx.tiers(&ns(), &key(1)), 0);
        shared.apply_event(&mut idx, &ev(Deleted, 2, proto::Tier::Remote));
        assert!(!read(&shared.remote).contains(&ns(), &key(2)));
        // Malformed events change nothing.
        let mut bad = ev(Stored, 3, proto::Tier::Host);
        bad.namespace_id = Bytes::from_static(b"short");
        shared.apply_event(&mut idx, &bad);
        let mut lagged = ev(Stored, 3, proto::Tier::Host);
        lagged.kind = proto::EventKind::Lagged as i32;
        shared.apply_event(&mut idx, &lagged);
        assert_eq!(idx.len(), 0);
    }
}
