//! Reads of the remote tier (gets and existence checks, every key's command
//! at once, each bounded by the deadline) and direct writes, each in an
//! async form and a blocking one (see the module docs of [`crate::remote`]).
//! Keys with a queued write or delete answer from the queue.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::cluster_async::ClusterConnection;

use super::writer::{self, Op};
use super::{RemoteBlock, RemoteTier, Shared, bump, record};
use crate::key::BlockKey;
use crate::namespace::NamespaceId;

/// One command's result: `Err` when it ran past the deadline.
type CommandOutcome<T> = Result<redis::RedisResult<T>, tokio::time::error::Elapsed>;

/// Commands finished per key asked: (position among the keys asked,
/// outcome); `None` when the whole batch ran past its deadline.
type Fetched<T> = Option<Vec<(usize, CommandOutcome<T>)>>;

/// Slack beyond the deadline for a whole batch of commands.
const BATCH_SLACK: Duration = Duration::from_millis(50);

/// A read split into what the write queue answers and what the cluster is
/// asked.
struct ReadPlan<T> {
    out: Vec<T>,
    /// Positions (in the caller's keys) to ask the cluster for.
    ask: Vec<usize>,
    /// The connection to ask on, when there is something to ask and one.
    conn: Option<ClusterConnection>,
    /// Whether the cluster is asked (there was a connection to ask on).
    asked: bool,
    redis_keys: Vec<String>,
}

/// Runs `command KEY` for every key at once, each bounded by the deadline,
/// and the whole batch by the deadline and a little slack.
async fn fetch<T: redis::FromRedisValue + Send + 'static>(
    deadline: Duration,
    conn: ClusterConnection,
    command: &'static str,
    keys: Vec<String>,
) -> Fetched<T> {
    let batch = async move {
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
    };
    tokio::time::timeout(deadline + BATCH_SLACK, batch)
        .await
        .ok()
}

impl RemoteTier {
    /// Reads blocks of `block_bytes` each; `None` for a miss (absent, failed
    /// verification, error or deadline). Answers from the write queue
    /// first. Blocks the calling thread (see the module docs).
    pub fn get_many(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        block_bytes: u64,
    ) -> Vec<Option<RemoteBlock>> {
        self.get_blocking(ns, keys, Some(block_bytes))
    }

    /// [`RemoteTier::get_many`] for async callers.
    pub async fn get_many_async(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        block_bytes: u64,
    ) -> Vec<Option<RemoteBlock>> {
        let mut plan = self.plan_get(ns, keys, Some(block_bytes));
        let fetched = match plan.conn.take() {
            Some(conn) => {
                let redis_keys = std::mem::take(&mut plan.redis_keys);
                fetch(self.shared.config.deadline, conn, "GET", redis_keys).await
            }
            None => None,
        };
        self.finish_get(ns, keys, Some(block_bytes), plan, fetched)
    }

    /// [`RemoteTier::get_many`]; `expected` is the payload length a value
    /// must have (`None`: any, as its header says).
    pub(super) fn get_blocking(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        expected: Option<u64>,
    ) -> Vec<Option<RemoteBlock>> {
        let mut plan = self.plan_get(ns, keys, expected);
        let fetched = match plan.conn.take() {
            Some(conn) => self.fetch_blocking(conn, "GET", std::mem::take(&mut plan.redis_keys)),
            None => None,
        };
        self.finish_get(ns, keys, expected, plan, fetched)
    }

    /// [`fetch`] from this synchronous thread.
    fn fetch_blocking<T: redis::FromRedisValue + Send + 'static>(
        &self,
        conn: ClusterConnection,
        command: &'static str,
        keys: Vec<String>,
    ) -> Fetched<T> {
        let deadline = self.shared.config.deadline;
        let fut = fetch(deadline, conn, command, keys);
        self.block_on(deadline + BATCH_SLACK, fut).flatten()
    }

    /// What the queue answers, and what to ask the cluster.
    fn plan_get(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        expected: Option<u64>,
    ) -> ReadPlan<Option<RemoteBlock>> {
        let mut out: Vec<Option<RemoteBlock>> = vec![None; keys.len()];
        let mut ask = Vec::new();
        {
            let pending = self.shared.pending.lock();
            for (i, k) in keys.iter().enumerate() {
                match pending.latest(ns, k) {
                    Some(Op::Set {
                        payload, parent, ..
                    }) if expected.is_none_or(|len| payload.len() as u64 == len) => {
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
        self.plan(ns, keys, out, ask)
    }

    fn plan<T>(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        out: Vec<T>,
        ask: Vec<usize>,
    ) -> ReadPlan<T> {
        let conn = self.shared.conn().filter(|_| !ask.is_empty());
        let redis_keys = match conn {
            Some(_) => ask.iter().map(|&i| self.shared.key(ns, &keys[i])).collect(),
            None => Vec::new(),
        };
        ReadPlan {
            out,
            ask,
            asked: conn.is_some(),
            conn,
            redis_keys,
        }
    }

    /// Verifies what the cluster answered; counts hits, misses and errors,
    /// and queues a delete of every value that fails verification.
    fn finish_get(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
        expected: Option<u64>,
        plan: ReadPlan<Option<RemoteBlock>>,
        fetched: Fetched<Option<Vec<u8>>>,
    ) -> Vec<Option<RemoteBlock>> {
        let ReadPlan {
            mut out,
            ask,
            asked,
            ..
        } = plan;
        let c = &self.shared.counters;
        if !asked {
            bump(&c.misses, ask.len() as u64);
            return out;
        }
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
                    match record::decode_checked(Bytes::from(value), ns, &keys[i], expected) {
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
    /// timeouts answer false. Blocks the calling thread (see the module
    /// docs).
    pub fn exists_many(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let mut plan = self.plan_exists(ns, keys);
        let fetched = match plan.conn.take() {
            Some(conn) => self.fetch_blocking(conn, "EXISTS", std::mem::take(&mut plan.redis_keys)),
            None => None,
        };
        self.finish_exists(plan, fetched)
    }

    /// [`RemoteTier::exists_many`] for async callers.
    pub async fn exists_many_async(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let mut plan = self.plan_exists(ns, keys);
        let fetched = match plan.conn.take() {
            Some(conn) => {
                let redis_keys = std::mem::take(&mut plan.redis_keys);
                fetch(self.shared.config.deadline, conn, "EXISTS", redis_keys).await
            }
            None => None,
        };
        self.finish_exists(plan, fetched)
    }

    fn plan_exists(&self, ns: &NamespaceId, keys: &[BlockKey]) -> ReadPlan<bool> {
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
        self.plan(ns, keys, out, ask)
    }

    fn finish_exists(&self, plan: ReadPlan<bool>, fetched: Fetched<i64>) -> Vec<bool> {
        let ReadPlan {
            mut out,
            ask,
            asked,
            ..
        } = plan;
        if !asked {
            return out;
        }
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

    /// Writes blocks now (not through the queue) and waits for them; `true`
    /// per block written. For benchmarks. Blocks the calling thread (see
    /// the module docs).
    pub fn put_many(
        &self,
        ns: &NamespaceId,
        items: &[(BlockKey, Option<BlockKey>, Bytes)],
    ) -> Vec<bool> {
        let n = items.len();
        let Some(conn) = self.shared.conn() else {
            return vec![false; n];
        };
        let fut = write_now(Arc::clone(&self.shared), conn, *ns, items.to_vec());
        let wait = self.shared.config.deadline + BATCH_SLACK;
        self.block_on(wait, fut)
            .flatten()
            .unwrap_or_else(|| vec![false; n])
    }

    /// [`RemoteTier::put_many`] for async callers.
    pub async fn put_many_async(
        &self,
        ns: &NamespaceId,
        items: &[(BlockKey, Option<BlockKey>, Bytes)],
    ) -> Vec<bool> {
        let n = items.len();
        let Some(conn) = self.shared.conn() else {
            return vec![false; n];
        };
        write_now(Arc::clone(&self.shared), conn, *ns, items.to_vec())
            .await
            .unwrap_or_else(|| vec![false; n])
    }
}

/// Writes every block at once; `None` when the batch ran past its deadline.
async fn write_now(
    shared: Arc<Shared>,
    conn: ClusterConnection,
    ns: NamespaceId,
    items: Vec<(BlockKey, Option<BlockKey>, Bytes)>,
) -> Option<Vec<bool>> {
    let n = items.len();
    let deadline = shared.config.deadline;
    let batch = async move {
        let mut set = tokio::task::JoinSet::new();
        for (slot, (key, parent, payload)) in items.into_iter().enumerate() {
            let conn = conn.clone();
            let shared = Arc::clone(&shared);
            set.spawn(async move {
                let ok =
                    writer::set_block(&shared, conn, &ns, &key, parent.as_ref(), &payload).await;
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
    };
    tokio::time::timeout(deadline + BATCH_SLACK, batch)
        .await
        .ok()
}
