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
//! - **Writes** go through a queue bounded in bytes ([`writer`]): host-tier
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
//! The synchronous methods may be called from any thread, inside or outside
//! a tokio runtime: the commands run on the tier's own small runtime.

pub mod record;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;

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
    #[error("remote tier: cannot start its runtime: {0}")]
    Runtime(#[source] std::io::Error),
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

/// One command's result: `Err` when it ran past the deadline.
type CommandOutcome<T> = Result<redis::RedisResult<T>, tokio::time::error::Elapsed>;

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
    runtime: Arc<RuntimeGuard>,
    writer: Arc<Writer>,
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier")
            .field("nodes", &self.shared.config.nodes)
            .finish_non_exhaustive()
    }
}

/// Owns the tier's runtime; dropping it shuts the runtime down without
/// waiting (the tasks only hold network connections).
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl RuntimeGuard {
    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(|r| r.handle())
    }
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl RemoteTier {
    /// Checks the configuration and starts connecting in the background;
    /// does not wait for the cluster (see [`RemoteTier::wait_connected`]).
    pub fn open(config: RemoteTierConfig, events: Arc<EventBus>) -> Result<Self, RemoteError> {
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvstrata-remote")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
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
        let writer = Writer::start(Arc::clone(&shared), runtime.handle());
        runtime.spawn(connect_loop(Arc::clone(&shared)));
        Ok(RemoteTier {
            shared,
            runtime: Arc::new(RuntimeGuard(Some(runtime))),
            writer: Arc::new(writer),
        })
    }

    pub fn config(&self) -> &RemoteTierConfig {
        &self.shared.config
    }

    /// Whether a cluster connection is held now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the first connection.
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

    /// Runs `fut` on the tier's runtime and waits for it at most `wait`.
    fn run<T: Send + 'static>(
        &self,
        wait: Duration,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let handle = self.runtime.handle()?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let task = handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        let out = rx.recv_timeout(wait).ok();
        if out.is_none() {
            task.abort();
        }
        out
    }

    /// Runs `command KEY` for every key at once, each bounded by the
    /// deadline; `(position in keys, outcome)` per command that finished, or
    /// `None` when the whole batch ran past the deadline.
    fn each_key<T: redis::FromRedisValue + Send + 'static>(
        &self,
        conn: ClusterConnection,
        command: &'static str,
        keys: Vec<String>,
    ) -> Option<Vec<(usize, CommandOutcome<T>)>> {
        let deadline = self.shared.config.deadline;
        self.run(deadline + Duration::from_millis(50), async move {
            let mut set = tokio::task::JoinSet::new();
            for (slot, key) in keys.into_iter().enumerate() {
                let mut conn = conn.clone();
                set.spawn(async move {
                    let mut cmd = redis::cmd(command);
                    cmd.arg(&key);
                    let query = cmd.query_async::<T>(&mut conn);
                    (slot, tokio::time::timeout(deadline, query).await)
                });
            }
            let mut got = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    got.push(r);
                }
            }
            got
        })
    }

    /// Reads blocks of `block_bytes` each; `None` for a miss (absent, failed
    /// verification, error or deadline). Answers from the write queue first.
    pub fn get_many(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        block_bytes: u64,
    ) -> Vec<Option<RemoteBlock>> {
        let mut out: Vec<Option<RemoteBlock>> = vec![None; keys.len()];
        let mut ask = Vec::new();
        {
            let pending = self.shared.pending.lock();
            for (i, k) in keys.iter().enumerate() {
                match pending.latest(ns, k) {
                    Some(Op::Set {
                        payload, parent, ..
                    }) if payload.len() as u64 == block_bytes => {
                        out[i] = Some(RemoteBlock {
                            payload: payload.clone(),
                            parent: *parent,
                            seq: 0,
                        });
                    }
                    Some(_) => {}
                    None => ask.push(i),
                }
            }
        }
        let c = &self.shared.counters;
        let Some(conn) = self.shared.conn().filter(|_| !ask.is_empty()) else {
            bump(&c.misses, ask.len() as u64);
            return out;
        };
        let redis_keys = ask.iter().map(|&i| self.shared.key(ns, &keys[i])).collect();
        let fetched = self.each_key::<Option<Vec<u8>>>(conn, "GET", redis_keys);
        let Some(fetched) = fetched else {
            self.shared.failed(true, "read batch past its deadline");
            bump(&c.misses, ask.len() as u64);
            return out;
        };
        let mut answered = 0u64;
        for (slot, r) in fetched {
            let i = ask[slot];
            match r {
                Ok(Ok(Some(value))) => {
                    match record::decode(Bytes::from(value), ns, &keys[i], block_bytes) {
                        Ok(b) => {
                            bump(&c.read_bytes, b.payload.len() as u64);
                            out[i] = Some(b);
                            answered += 1;
                        }
                        Err(kind) => {
                            bump(&c.corrupt, 1);
                            tracing::warn!(namespace = %ns, key = %keys[i], check = kind.name(), "remote tier: value failed verification; dropped");
                            self.writer.enqueue(&self.shared, ns, &keys[i], Op::Delete);
                        }
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => self.shared.redis_failed(&e),
                Err(_) => self.shared.failed(true, "read past its deadline"),
            }
        }
        bump(&c.hits, answered);
        bump(&c.misses, ask.len() as u64 - answered);
        out
    }

    /// Whether each key is on the cluster (or queued for it). Errors and
    /// timeouts answer false.
    pub fn exists_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let mut out = vec![false; keys.len()];
        let mut ask = Vec::new();
        {
            let pending = self.shared.pending.lock();
            for (i, k) in keys.iter().enumerate() {
                match pending.latest(ns, k) {
                    Some(Op::Set { .. }) => out[i] = true,
                    Some(Op::Delete) => {}
                    None => ask.push(i),
                }
            }
        }
        let Some(conn) = self.shared.conn().filter(|_| !ask.is_empty()) else {
            return out;
        };
        let redis_keys = ask.iter().map(|&i| self.shared.key(ns, &keys[i])).collect();
        let fetched = self.each_key::<i64>(conn, "EXISTS", redis_keys);
        let Some(fetched) = fetched else {
            self.shared.failed(true, "exists batch past its deadline");
            return out;
        };
        for (slot, r) in fetched {
            match r {
                Ok(Ok(n)) => out[ask[slot]] = n > 0,
                Ok(Err(e)) => self.shared.redis_failed(&e),
                Err(_) => self.shared.failed(true, "exists past its deadline"),
            }
        }
        out
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
    /// copying a victim's bytes under the host lock).
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

    /// Writes blocks now (not through the queue) and waits for them; `true`
    /// per block written. For benchmarks and tests.
    pub fn put_many(
        &self,
        ns: &NamespaceId,
        items: &[(BlockKey, Option<BlockKey>, Bytes)],
    ) -> Vec<bool> {
        let Some(conn) = self.shared.conn() else {
            return vec![false; items.len()];
        };
        let shared = Arc::clone(&self.shared);
        let ns = *ns;
        let items: Vec<_> = items.to_vec();
        let n = items.len();
        let deadline = shared.config.deadline;
        self.run(deadline + Duration::from_millis(50), async move {
            let mut set = tokio::task::JoinSet::new();
            for (slot, (key, parent, payload)) in items.into_iter().enumerate() {
                let conn = conn.clone();
                let shared = Arc::clone(&shared);
                set.spawn(async move {
                    let ok = writer::set_block(&shared, conn, &ns, &key, parent.as_ref(), &payload)
                        .await;
                    (slot, ok)
                });
            }
            let mut out = vec![false; n];
            while let Some(r) = set.join_next().await {
                if let Ok((slot, ok)) = r {
                    out[slot] = ok;
                }
            }
            out
        })
        .unwrap_or_else(|| vec![false; n])
    }

    /// Waits until the write queue is empty; `false` on timeout.
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

    /// Stops the writer after it has drained the queue (at most `timeout`).
    pub fn close(&self, timeout: Duration) {
        self.writer.flush(&self.shared, timeout);
        self.shared.closed.store(true, Ordering::Release);
    }
}

/// Connects, and reconnects after a failed attempt, until the tier closes.
/// Once connected, the cluster connection itself follows topology changes
/// and reconnects to nodes that come back.
async fn connect_loop(shared: Arc<Shared>) {
    let mut logged_down = false;
    while !shared.closed.load(Ordering::Acquire) {
        if shared.conn.read().is_none() {
            let attempt = tokio::time::timeout(
                shared.config.connect_timeout * 2,
                shared.client.get_async_connection(),
            )
            .await;
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
        tokio::time::sleep(shared.config.retry_interval).await;
    }
}
