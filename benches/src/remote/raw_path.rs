//! The raw path: the `redis` crate's async cluster connection (the client
//! the tier itself uses) sends `SET` / `GET` of the bare payloads, in the
//! same batches as the kvstrata path; and the clean-up of both paths' keys.

use std::time::Instant;

use bytes::Bytes;
use redis::cluster_async::ClusterConnection;

use super::batch::{Clock, PathAccum, SizeCtx, batches, failed};
use super::report::size_label;
use crate::error::BenchError;

/// Keys deleted per batch of the clean-up.
const DELETE_BATCH: usize = 64;

/// The raw path's Redis key of block `index` at `size`.
pub(super) fn raw_key(prefix: &str, size: usize, index: u64) -> String {
    format!("{prefix}:{size}:{index}")
}

/// Runs one command per key of a batch at once on the cluster connection
/// and waits for all; answers in batch order.
async fn raw_batch<T: redis::FromRedisValue + Send + 'static>(
    conn: &ClusterConnection,
    cmds: Vec<redis::Cmd>,
) -> Result<Vec<Result<T, redis::RedisError>>, BenchError> {
    let mut set = tokio::task::JoinSet::new();
    for (slot, cmd) in cmds.into_iter().enumerate() {
        let mut conn = conn.clone();
        set.spawn(async move { (slot, cmd.query_async::<T>(&mut conn).await) });
    }
    let mut out: Vec<Option<Result<T, redis::RedisError>>> = Vec::new();
    out.resize_with(set.len(), || None);
    while let Some(r) = set.join_next().await {
        let (slot, v) = r?;
        out[slot] = Some(v);
    }
    Ok(out.into_iter().flatten().collect())
}

/// A failed Redis command `op` on the cluster at `nodes`.
pub(super) fn redis_err(
    op: &'static str,
    nodes: &[String],
    source: redis::RedisError,
) -> BenchError {
    BenchError::Redis {
        op,
        url: nodes.join(","),
        source,
    }
}

/// The raw path at one size.
pub(super) async fn run(
    conn: &ClusterConnection,
    prefix: &str,
    cx: &SizeCtx<'_>,
) -> Result<PathAccum, BenchError> {
    let (block, plan) = (cx.block, cx.plan);

    cx.bar
        .set_message(format!("raw write {}", size_label(block)));
    let mut out = PathAccum::new()?;
    let started = Instant::now();
    let w = &mut out.write;
    for r in batches(plan.blocks, plan.concurrency) {
        // Payloads are ready before the clock starts, as for the tier;
        // building the commands (which copies the payloads) is timed, as
        // the tier's encoding is.
        let payloads: Vec<(u64, Bytes)> = r.clone().map(|i| (i, cx.pattern.payload(i))).collect();
        let n = payloads.len();
        let t0 = Clock::start();
        let cmds: Vec<redis::Cmd> = payloads
            .iter()
            .map(|(i, p)| {
                let mut c = redis::cmd("SET");
                c.arg(raw_key(prefix, block, *i)).arg(&p[..]);
                c
            })
            .collect();
        let res = raw_batch::<()>(conn, cmds).await?;
        w.batch(&t0, n, block);
        for r in res {
            r.map_err(|e| redis_err("SET", &plan.nodes, e))?;
        }
        cx.bar.inc(n as u64);
    }
    w.phase = started.elapsed();

    cx.bar
        .set_message(format!("raw read {}", size_label(block)));
    let started = Instant::now();
    let rd = &mut out.read;
    for r in batches(plan.blocks, plan.concurrency) {
        let t0 = Clock::start();
        let cmds: Vec<redis::Cmd> = r
            .clone()
            .map(|i| redis::cmd("GET").arg(raw_key(prefix, block, i)).clone())
            .collect();
        let n = cmds.len();
        let res = raw_batch::<Option<Vec<u8>>>(conn, cmds).await?;
        rd.batch(&t0, n, block);
        for (i, g) in r.clone().zip(res) {
            let Some(v) = g.map_err(|e| redis_err("GET", &plan.nodes, e))? else {
                return Err(failed(
                    "raw",
                    "read",
                    block,
                    format!("GET missed block {i}"),
                ));
            };
            if let Some(bad) = cx.pattern.check(i, &v) {
                return Err(failed("raw", "read", block, bad));
            }
            out.verified += 1;
        }
        cx.bar.inc(n as u64);
    }
    out.read.phase = started.elapsed();
    Ok(out)
}

/// Deletes `keys` from the cluster, a batch at a time.
pub(super) async fn delete_keys(
    conn: &ClusterConnection,
    nodes: &[String],
    keys: Vec<String>,
) -> Result<(), BenchError> {
    let mut keys = keys.into_iter().peekable();
    while keys.peek().is_some() {
        let cmds: Vec<redis::Cmd> = keys
            .by_ref()
            .take(DELETE_BATCH)
            .map(|k| redis::cmd("DEL").arg(k).clone())
            .collect();
        for r in raw_batch::<i64>(conn, cmds).await? {
            r.map_err(|e| redis_err("DEL", nodes, e))?;
        }
    }
    Ok(())
}
