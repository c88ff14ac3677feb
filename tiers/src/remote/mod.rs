//! The remote tier (T3): blocks on a Redis Cluster or Valkey cluster that
//! several daemons share, so KV written by one node's prefill is found by
//! every other node.
//!
//! kvstrata does not run a distributed store of its own: the cluster keeps
//! the blocks (its own `maxmemory` and eviction policy bound it) and
//! [`RemoteTier`] is a careful client of it:
//!
//! - **Reads** ([`RemoteTier::get_many`], [`RemoteTier::exists_many`]) run
//!   every key's command at once and wait at most the configured deadline.
//!   A value is served only if its self-describing header and payload
//!   checksum verify ([`record`]); a value that fails is a miss, counted in
//!   `corrupt_blocks`, and deleted. An error or a timeout is a miss too.
//! - **Writes** go through a queue bounded in bytes (`writer.rs`): host-tier
//!   evictions and write-through puts are written in the background, a full
//!   queue drops a write (counted) rather than making a put wait. Deletes
//!   (a client's `Delete`, or a put that supersedes the cluster's copy) are
//!   never dropped.
//! - **Read your own writes**: until a queued write or delete has reached the
//!   cluster, reads of that key on this node answer from the queue (the
//!   queued bytes, or a miss for a delete), so a node never serves a version
//!   older than its own completed put.
//! - **Availability**: the tier connects in the background and reconnects by
//!   itself; while the cluster is unreachable every read is a quick miss and
//!   the local tiers are unaffected.
//!
//! # Runtime
//!
//! The tier runs on a tokio runtime it is given ([`RemoteTier::open`]; the
//! daemon passes its own): its connection upkeep and its writer are tasks
//! there, and every command runs there. Each read has an async form
//! ([`RemoteTier::get_many_async`], [`RemoteTier::exists_many_async`],
//! [`RemoteTier::put_many_async`]) and a blocking one for the cache's
//! synchronous callers, which drives the command on the runtime from the
//! calling thread: on a plain thread directly, on a worker of a
//! multi-thread runtime inside `block_in_place` (so the worker's other
//! tasks move on meanwhile). A current-thread runtime's own thread cannot
//! block: there the command runs as a task and the caller waits at most its
//! deadline (a miss if the runtime cannot run it meanwhile); async callers
//! there use the async forms.
//!
//! [`RemoteTier::close`] drains the write queue (bounded), stops the tasks
//! and waits for them; dropping the last clone stops them without waiting.
//!
//! # Files
//!
//! - [`record`]: the Redis key and value of a block.
//! - `writer.rs`: the write queue and its writer task.
//! - `read.rs`: reads (gets and existence checks) and direct writes.
//! - `tier_impl.rs`: the [`crate::Tier`] trait.

mod read;
pub mod record;
mod tier_impl;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::{EventBus, EventKind, PendingEvent};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;
use crate::tier::TierKind;

pub use record::RemoteBlock;
use writer::{Op, PendingState, Writer};

/// Configuration of the remote tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTierConfig {
    /// Seed nodes of the cluster, `redis://host:port` (at least one).
    pub nodes: Vec<String>,
    /// Prefix of every Redis key this tier writes. Default `kvstrata`.
    pub key_prefix: String,
    /// A command (read, write or delete) slower than this is abandoned: a
    /// miss or a failed write. Default 250 ms.
    pub deadline: Duration,
    /// Time allowed to open a connection to a node. Default 1 s.
    pub connect_timeout: Duration,
    /// Pause between connection attempts while the cluster is unreachable,
    /// and between retries of failed deletes. Default 1 s.
    pub retry_interval: Duration,
    /// Payload bytes waiting for the writer at most; a write that would
    /// exceed it is dropped. Default 256 MiB.
    pub queue_bytes: u64,
    /// Commands the writer keeps in flight. Default 16.
    pub write_concurrency: usize,
    /// Blocks leaving the host tier (evictions) are written to the cluster,
    /// so what the disk tier later evicts is still found there. Default true.
    pub demote: bool,
    /// Every put is written to the cluster, for every namespace. Default
    /// false (a namespace's policy may still ask for it).
    pub write_through: bool,
    /// Reads that hit copy the block into the host tier. Default true.
    pub promote_on_get: bool,
    /// Expiry set on every block written, if any. Default none: the
    /// cluster's eviction policy decides.
    pub ttl: Option<Duration>,
}

impl Default for RemoteTierConfig {
    fn default() -> Self {
        RemoteTierConfig {
            nodes: Vec::new(),
            key_prefix: "kvstrata".into(),
            deadline: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            retry_interval: Duration::from_secs(1),
            queue_bytes: 256 << 20,
            write_concurrency: 16,
            demote: true,
            write_through: false,
            promote_on_get: true,
            ttl: None,
        }
    }
}

impl RemoteTierConfig {
    /// Checks every setting; the error names the `remote.*` key.
    pub fn validate(&self) -> Result<(), RemoteError> {
        if self.nodes.is_empty() {
            return Err(RemoteError::NoNodes);
        }
        for n in &self.nodes {
            let bad = |reason: String| RemoteError::BadNode {
                node: n.clone(),
                reason,
            };
            if n.starts_with("rediss://") {
                return Err(bad("TLS to the cluster is not supported yet".into()));
            }
            if !n.starts_with("redis://") {
                return Err(bad("expected redis://host:port".into()));
            }
            redis::IntoConnectionInfo::into_connection_info(n.as_str())
                .map_err(|e| bad(e.to_string()))?;
        }
        let invalid = |field, reason: &str| {
            Err(RemoteError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            return invalid(
                "key_prefix",
                "must be non-empty, without spaces or braces (braces are cluster hash tags)",
            );
        }
        if self.deadline.is_zero() {
            return invalid("deadline_ms", "must be at least 1");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout_ms", "must be at least 1");
        }
        if self.write_concurrency == 0 {
            return invalid("write_concurrency", "must be at least 1");
        }
        Ok(())
    }
}

/// Why the remote tier could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote.nodes: at least one node is needed")]
    NoNodes,
    #[error("remote.nodes: {node:?} is not a Redis URL: {reason}")]
    BadNode { node: String, reason: String },
    #[error("remote.{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The cache was opened with a remote tier but no runtime to run it on.
    #[error(
        "remote tier: no tokio runtime to run on (open the cache with one, see BlockCache::open)"
    )]
    NoRuntime,
}

/// Counters and state of the remote tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    pub nodes: Vec<String>,
    pub connected: bool,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub corrupt_blocks: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub read_bytes: u64,
    pub deletes: u64,
    pub queue_dropped: u64,
    pub queued_bytes: u64,
    pub promoted: u64,
    pub demoted: u64,
    pub write_through: u64,
    pub connect_failures: u64,
    pub last_error: String,
    pub deadline_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub corrupt: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub deletes: AtomicU64,
    pub queue_dropped: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub promoted: AtomicU64,
    pub demoted: AtomicU64,
    pub write_through: AtomicU64,
    pub connect_failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What the tier's tasks share.
pub(crate) struct Shared {
    pub config: RemoteTierConfig,
    pub client: ClusterClient,
    pub conn: RwLock<Option<ClusterConnection>>,
    pub connected: AtomicBool,
    pub counters: Counters,
    pub last_error: Mutex<String>,
    pub events: Arc<EventBus>,
    pub pending: Mutex<PendingState>,
    pub closed: AtomicBool,
    /// Write sequence stamped into each record's header.
    pub seq: AtomicU64,
}

impl Shared {
    /// The connection, if the tier holds one.
    pub fn conn(&self) -> Option<ClusterConnection> {
        self.conn.read().clone()
    }

    /// Counts a failed command; `timeout` for one past the deadline.
    pub fn failed(&self, timeout: bool, what: &str) {
        if timeout {
            bump(&self.counters.timeouts, 1);
        } else {
            bump(&self.counters.errors, 1);
        }
        let mut last = self.last_error.lock();
        last.clear();
        last.push_str(what);
    }

    /// Counts a command the client library failed; its own response timeout
    /// counts as a timeout.
    pub fn redis_failed(&self, e: &redis::RedisError) {
        self.failed(e.is_timeout(), &e.to_string());
    }

    pub fn key(&self, ns: &NamespaceId, key: &BlockKey) -> String {
        record::redis_key(&self.config.key_prefix, ns, key)
    }

    pub fn publish(
        &self,
        kind: EventKind,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<BlockKey>,
    ) {
        self.events.publish([PendingEvent {
            kind,
            namespace: *ns,
            key: *key,
            parent,
            tier: TierKind::Remote,
        }]);
    }
}

/// The remote tier. Cheap to clone; the last clone dropped stops its tasks.
#[derive(Clone)]
pub struct RemoteTier {
    shared: Arc<Shared>,
    writer: Arc<Writer>,
    tasks: Arc<Tasks>,
    runtime: Handle,
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier")
            .field("nodes", &self.shared.config.nodes)
            .finish_non_exhaustive()
    }
}

/// The tier's tasks on the runtime, and the signal that stops them (sent
/// by [`RemoteTier::close`], or when the last clone drops).
struct Tasks {
    stop: watch::Sender<bool>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Tasks {
    /// Signals every task to stop and waits up to `timeout` for them.
    fn stop_and_wait(&self, timeout: Duration) {
        self.stop.send_replace(true);
        let handles = std::mem::take(&mut *self.handles.lock());
        let end = Instant::now() + timeout;
        while handles.iter().any(|h| !h.is_finished()) {
            if Instant::now() >= end {
                tracing::warn!("remote tier: tasks still running at close");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl RemoteTier {
    /// Checks the configuration and starts connecting in the background on
    /// `runtime` (the tier's tasks and commands run there); does not wait
    /// for the cluster (see [`RemoteTier::wait_connected`]).
    pub fn open(
        config: RemoteTierConfig,
        events: Arc<EventBus>,
        runtime: Handle,
    ) -> Result<Self, RemoteError> {
        config.validate()?;
        let client = ClusterClientBuilder::new(config.nodes.clone())
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.deadline)
            .retries(1)
            .min_retry_wait(5)
            .max_retry_wait(config.deadline.as_millis().max(10) as u64)
            .build()
            .map_err(|e| RemoteError::BadNode {
                node: config.nodes.join(","),
                reason: e.to_string(),
            })?;
        let shared = Arc::new(Shared {
            config,
            client,
            conn: RwLock::new(None),
            connected: AtomicBool::new(false),
            counters: Counters::default(),
            last_error: Mutex::new(String::new()),
            events,
            pending: Mutex::new(PendingState::default()),
            closed: AtomicBool::new(false),
            seq: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1),
            ),
        });
        let (stop, stopped) = watch::channel(false);
        let (writer, write_task) = Writer::start(Arc::clone(&shared), &runtime, stopped.clone());
        let connect_task = runtime.spawn(connect_loop(Arc::clone(&shared), stopped));
        Ok(RemoteTier {
            shared,
            writer: Arc::new(writer),
            tasks: Arc::new(Tasks {
                stop,
                handles: Mutex::new(vec![write_task, connect_task]),
            }),
            runtime,
        })
    }

    pub fn config(&self) -> &RemoteTierConfig {
        &self.shared.config
    }

    /// Whether a cluster connection is held now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the first connection (blocks the calling
    /// thread).
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.is_connected() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Runs `fut` on the tier's runtime and waits for it from this
    /// (synchronous) thread; see the module docs. `None` only where the
    /// caller is a current-thread runtime's thread and `fut` did not finish
    /// within `wait`.
    fn block_on<T: Send + 'static>(
        &self,
        wait: Duration,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        match Handle::try_current() {
            Err(_) => Some(self.runtime.block_on(fut)),
            Ok(current) if current.runtime_flavor() == RuntimeFlavor::MultiThread => {
                Some(tokio::task::block_in_place(|| self.runtime.block_on(fut)))
            }
            Ok(_) => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let task = self.runtime.spawn(async move {
                    let _ = tx.send(fut.await);
                });
                let out = rx.recv_timeout(wait).ok();
                if out.is_none() {
                    task.abort();
                }
                out
            }
        }
    }

    /// Queues a block for the cluster (`write_through`: a put, else a
    /// demotion). A full queue drops it (counted) and queues a delete
    /// instead, so the cluster never keeps a copy older than this one.
    pub fn enqueue_put(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        payload: Bytes,
        write_through: bool,
    ) -> bool {
        let c = &self.shared.counters;
        bump(
            if write_through {
                &c.write_through
            } else {
                &c.demoted
            },
            1,
        );
        let op = Op::Set {
            payload,
            parent: parent.copied(),
            write_through,
        };
        self.writer.enqueue(&self.shared, ns, key, op)
    }

    /// Whether a payload of `len` bytes fits the queue now (checked before
    /// copying an evicted block's bytes).
    pub fn has_room(&self, len: u64) -> bool {
        self.shared.counters.queued_bytes.load(Ordering::Acquire) + len
            <= self.shared.config.queue_bytes
    }

    /// Counts a write the caller dropped because [`RemoteTier::has_room`] said no.
    pub fn count_dropped(&self) {
        bump(&self.shared.counters.queue_dropped, 1);
    }

    /// Queues a delete of the cluster's copy (never dropped).
    pub fn enqueue_delete(&self, ns: &NamespaceId, key: &BlockKey) {
        self.writer.enqueue(&self.shared, ns, key, Op::Delete);
    }

    /// Waits until the write queue is empty; `false` on timeout. A test
    /// hook (the cache drains the queue itself when it closes).
    #[cfg(feature = "testing")]
    pub fn flush(&self, timeout: Duration) -> bool {
        self.writer.flush(&self.shared, timeout)
    }

    pub fn count_promotion(&self) {
        bump(&self.shared.counters.promoted, 1);
    }

    pub fn stats(&self) -> RemoteStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            nodes: self.shared.config.nodes.clone(),
            connected: self.is_connected(),
            hits: g(&c.hits),
            misses: g(&c.misses),
            errors: g(&c.errors),
            timeouts: g(&c.timeouts),
            corrupt_blocks: g(&c.corrupt),
            writes: g(&c.writes),
            write_bytes: g(&c.write_bytes),
            read_bytes: g(&c.read_bytes),
            deletes: g(&c.deletes),
            queue_dropped: g(&c.queue_dropped),
            queued_bytes: g(&c.queued_bytes),
            promoted: g(&c.promoted),
            demoted: g(&c.demoted),
            write_through: g(&c.write_through),
            connect_failures: g(&c.connect_failures),
            last_error: self.shared.last_error.lock().clone(),
            deadline_ms: self.shared.config.deadline.as_millis() as u64,
        }
    }

    /// Stops the tier: waits up to `timeout` for the write queue to drain,
    /// then stops its tasks (writer, connection upkeep) and waits up to
    /// `timeout` for them. Idempotent; blocks the calling thread. Reads
    /// afterwards miss; writes queued afterwards are not sent.
    pub fn close(&self, timeout: Duration) {
        if !self.shared.closed.load(Ordering::Acquire) {
            self.writer.flush(&self.shared, timeout);
            self.shared.closed.store(true, Ordering::Release);
        }
        self.tasks.stop_and_wait(timeout);
        *self.shared.conn.write() = None;
        self.shared.connected.store(false, Ordering::Release);
    }
}

/// Connects, and reconnects after a failed attempt, until the tier stops.
/// Once connected, the cluster connection itself follows topology changes
/// and reconnects to nodes that come back.
async fn connect_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut logged_down = false;
    while !*stop.borrow() {
        if shared.conn.read().is_none() {
            let attempt = tokio::select! {
                a = tokio::time::timeout(
                    shared.config.connect_timeout * 2,
                    shared.client.get_async_connection(),
                ) => a,
                _ = stop.changed() => return,
            };
            match attempt {
                Ok(Ok(conn)) => {
                    *shared.conn.write() = Some(conn);
                    shared.connected.store(true, Ordering::Release);
                    tracing::info!(nodes = ?shared.config.nodes, "remote tier: connected to the cluster");
                    logged_down = false;
                }
                Ok(Err(e)) => {
                    bump(&shared.counters.connect_failures, 1);
                    if !logged_down {
                        tracing::warn!(nodes = ?shared.config.nodes, error = %e, "remote tier: cluster unreachable; reads miss until it answers");
                        logged_down = true;
                    }
                    *shared.last_error.lock() = e.to_string();
                }
                Err(_) => {
                    bump(&shared.counters.connect_failures, 1);
                    *shared.last_error.lock() = "connection attempt timed out".into();
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.config.retry_interval) => {}
            _ = stop.changed() => return,
        }
    }
}
