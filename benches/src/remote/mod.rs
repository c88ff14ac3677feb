//! `kvstrata bench-remote`: throughput and latency of the remote tier (T3)
//! against the same Redis Cluster used directly, in one run
//! (`benches/remote.sh` starts a cluster and runs it, with `redis-benchmark`
//! as a second reference).
//!
//! For each `--block-size`, two paths do the same work, one after the other:
//!
//! - **kvstrata**: a real [`RemoteTier`] (no local tier in front of it)
//!   writes `--blocks` distinct blocks with [`RemoteTier::put_many`], then
//!   reads them all back with [`RemoteTier::get_many`], `--concurrency` blocks
//!   per call. Each value on the cluster is the tier's record: a 200-byte
//!   header (namespace, key, length, xxh3 of the payload) then the payload;
//!   the tier hashes on write and verifies header and checksum on read.
//! - **raw**: the `redis` crate's async cluster connection
//!   (`ClusterClientBuilder::get_async_connection`, the client the tier itself
//!   uses) sends `SET` / `GET` of the bare payloads under another key prefix,
//!   in the same batches: `--concurrency` commands in flight, wait for all,
//!   next batch.
//!
//! Both paths write the same payloads (a pseudo-random buffer with a 16-byte
//! stamp of block index and page at the start of every 4 KiB page) and every
//! block read back is checked byte for byte. A write that is not stored, a
//! read that misses, or wrong bytes stop the run with an error: they are not
//! numbers. After each path its keys are deleted, so both paths start from
//! the same (empty) cluster.
//!
//! `--rounds` rounds per size (default 2) alternate which path goes first,
//! so neither always meets a cluster that has just freed its memory; the
//! report sums them.
//!
//! Reported per size, path and direction: payload GB/s (decimal) over the
//! time spent inside the batches (payloads are generated before a batch's
//! clock starts and checked after it stops, for both paths; building the
//! Redis commands is inside it on both, as the tier's encoding is), p50 /
//! p99 / max latency of one batch (HDR histogram), this process's CPU time
//! (user + system, every thread) during the batches per GB, and the
//! kvstrata / raw ratios of GB/s and p99.

//!
//! This module opens the tier and the raw connection and runs both paths
//! per size and round ([`run_remote_bench`]); the parts live beside it:
//!
//! - `args`: the flags and the checked plan;
//! - `kvstrata_path` / `raw_path`: what each path does at one size (and the
//!   clean-up of the keys, in `raw_path`);
//! - `batch`: the batch schedule, the clock around each batch and the
//!   counters both paths feed;
//! - `report`: the report, its human and markdown tables and JSON.

mod args;
mod batch;
mod kvstrata_path;
mod raw_path;
mod report;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvstrata_tiers::disk::header::HEADER_LEN;
use kvstrata_tiers::remote::record;
use kvstrata_tiers::{EventBus, NamespaceId, RemoteTier, RemoteTierConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;

pub use args::RemoteBenchArgs;
pub use report::{
    RemoteBenchReport, RemotePathReport, RemotePhaseReport, RemoteRatios, RemoteSizeReport,
    RemoteTierCounters,
};

use args::RemotePlan;
use batch::{PathAccum, SizeCtx};
use kvstrata_path::block_key;
use raw_path::{delete_keys, raw_key, redis_err};

use crate::error::BenchError;
use crate::pattern::Pattern;

/// Bytes the tier stores in front of every payload.
const RECORD_HEADER: u64 = HEADER_LEN as u64;
/// Namespace of the benchmark's blocks.
const NAMESPACE: NamespaceId = NamespaceId(*b"kvstrata-bench-r");
/// Time allowed to open a connection to a node (both paths).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn progress_bar(len: u64, hidden: bool) -> ProgressBar {
    if hidden || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:<22} {bar:40.cyan/blue} {pos}/{len} blocks ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Runs `f` with the tier on a blocking thread (its calls wait).
async fn blocking<T: Send + 'static>(
    tier: &RemoteTier,
    f: impl FnOnce(&RemoteTier) -> T + Send + 'static,
) -> Result<T, BenchError> {
    let tier = tier.clone();
    Ok(tokio::task::spawn_blocking(move || f(&tier)).await?)
}

/// Opens the tier (keys under `prefix`) and waits up to `wait` for its
/// first connection to the cluster.
async fn open_tier(
    plan: &RemotePlan,
    prefix: &str,
    wait: Duration,
) -> Result<RemoteTier, BenchError> {
    let config = RemoteTierConfig {
        nodes: plan.nodes.clone(),
        key_prefix: prefix.to_string(),
        deadline: plan.deadline,
        connect_timeout: CONNECT_TIMEOUT,
        write_concurrency: plan.concurrency,
        ..RemoteTierConfig::default()
    };
    let tier = blocking_open(config).await?;
    let connected = blocking(&tier, move |t| t.wait_connected(wait)).await?;
    if !connected {
        let s = tier.stats();
        return Err(BenchError::InvalidArg {
            field: "--node",
            reason: format!(
                "the remote tier did not connect to {} within {wait:?}: {}",
                plan.nodes.join(","),
                s.last_error
            ),
        });
    }
    Ok(tier)
}

/// Opens the tier (on this runtime) off the async workers.
async fn blocking_open(config: RemoteTierConfig) -> Result<RemoteTier, BenchError> {
    let runtime = tokio::runtime::Handle::current();
    let tier = tokio::task::spawn_blocking(move || {
        RemoteTier::open(config, Arc::new(EventBus::new(1024)), runtime)
    })
    .await??;
    Ok(tier)
}

/// The raw path's connection: the same client library and settings as the tier.
async fn open_raw(plan: &RemotePlan) -> Result<ClusterConnection, BenchError> {
    let client = ClusterClientBuilder::new(plan.nodes.clone())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(plan.deadline)
        .retries(1)
        .build()
        .map_err(|e| redis_err("connect", &plan.nodes, e))?;
    client
        .get_async_connection()
        .await
        .map_err(|e| redis_err("connect", &plan.nodes, e))
}

/// Both paths at block size `block`, `plan.rounds` rounds each: the tier's
/// keys go under `prefix`, the raw path's under `raw_prefix`.
async fn bench_size(
    tier: &RemoteTier,
    conn: &ClusterConnection,
    plan: &RemotePlan,
    prefix: &str,
    raw_prefix: &str,
    block: usize,
    bar: &ProgressBar,
) -> Result<RemoteSizeReport, BenchError> {
    let pattern = Arc::new(Pattern::new(block));
    let kv_keys: Vec<String> = (0..plan.blocks)
        .map(|i| block_key(block, i).map(|k| record::redis_key(prefix, &NAMESPACE, &k)))
        .collect::<Result<_, _>>()?;
    let raw_keys: Vec<String> = (0..plan.blocks)
        .map(|i| raw_key(raw_prefix, block, i))
        .collect();
    let mut kv = PathAccum::new()?;
    let mut raw = PathAccum::new()?;
    // Even rounds run kvstrata first, odd rounds raw first, so neither
    // path always meets a cluster that has just freed (or never held)
    // the memory. After each path its keys go, even when it failed.
    for round in 0..plan.rounds {
        for kvstrata in [round % 2 == 0, round % 2 != 0] {
            let (result, keys) = if kvstrata {
                let (plan2, pattern2, bar2) = (plan.clone(), Arc::clone(&pattern), bar.clone());
                let r = blocking(tier, move |t| {
                    kvstrata_path::run(
                        t,
                        &SizeCtx {
                            plan: &plan2,
                            block,
                            pattern: &pattern2,
                            bar: &bar2,
                        },
                    )
                })
                .await
                .and_then(|r| r);
                (r, &kv_keys)
            } else {
                let cx = SizeCtx {
                    plan,
                    block,
                    pattern: &pattern,
                    bar,
                };
                (raw_path::run(conn, raw_prefix, &cx).await, &raw_keys)
            };
            let cleaned = delete_keys(conn, &plan.nodes, keys.clone()).await;
            let got = result?;
            cleaned?;
            if kvstrata {
                kv.merge(&got)?;
            } else {
                raw.merge(&got)?;
            }
        }
    }
    let kv = kv.report(block as u64 + RECORD_HEADER);
    let raw = raw.report(block as u64);
    Ok(RemoteSizeReport {
        block_size: block as u64,
        blocks: plan.blocks,
        ratio: RemoteRatios::between(&kv, &raw),
        kvstrata: kv,
        raw,
    })
}

/// Runs the benchmark against the cluster at `args.nodes`. A write that is
/// not stored, a read that misses or returns wrong bytes, or a Redis error
/// ends the run with an error; the keys written so far are deleted first.
/// Must run inside a multi-threaded tokio runtime.
pub async fn run_remote_bench(args: &RemoteBenchArgs) -> Result<RemoteBenchReport, BenchError> {
    let plan = args.plan()?;
    let prefix = format!("kvstrata-bench-{}", std::process::id());
    let raw_prefix = format!("{prefix}-raw");
    let wait = Duration::from_millis(args.connect_wait_ms);
    let tier = open_tier(&plan, &prefix, wait).await?;
    let conn = open_raw(&plan).await?;

    let bar = progress_bar(
        plan.sizes.len() as u64 * plan.rounds as u64 * 4 * plan.blocks,
        args.no_progress,
    );
    let mut sizes = Vec::with_capacity(plan.sizes.len());
    for &block in &plan.sizes {
        sizes.push(bench_size(&tier, &conn, &plan, &prefix, &raw_prefix, block, &bar).await?);
    }
    bar.finish_and_clear();

    let s = tier.stats();
    blocking(&tier, |t| t.close(Duration::from_secs(5))).await?;
    Ok(RemoteBenchReport {
        nodes: plan.nodes.clone(),
        concurrency: plan.concurrency,
        rounds: plan.rounds,
        deadline_ms: plan.deadline.as_millis() as u64,
        key_prefix: prefix,
        sizes,
        tier: RemoteTierCounters::from(&s),
    })
}

/// Runs the benchmark and prints its report: JSON on stdout with `json`,
/// else the markdown table with `--markdown`, else the human table.
pub async fn run_remote_and_print(
    args: &RemoteBenchArgs,
    json: bool,
) -> Result<RemoteBenchReport, BenchError> {
    let report = run_remote_bench(args).await?;
    if json {
        println!("{}", report.to_json()?);
    } else if args.markdown {
        print!("{}", report.markdown());
    } else {
        print!("{}", report.human());
    }
    Ok(report)
}
