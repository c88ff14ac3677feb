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

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvstrata_tiers::disk::header::HEADER_LEN;
use kvstrata_tiers::remote::record;
use kvstrata_tiers::{BlockKey, EventBus, NamespaceId, RemoteTier, RemoteTierConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use serde::Serialize;

use crate::disk::{Pattern, STAMP, parse_size};
use crate::error::BenchError;
use crate::report::{OpAccum, OpReport};

/// Largest block accepted: Redis refuses bulk strings over 512 MB
/// (`proto-max-bulk-len`), and the tier adds its header.
const MAX_BLOCK_BYTES: u64 = 256 << 20;
/// Bytes the tier stores in front of every payload.
const RECORD_HEADER: u64 = HEADER_LEN as u64;
/// Namespace of the benchmark's blocks.
const NAMESPACE: NamespaceId = NamespaceId(*b"kvstrata-bench-r");
/// Time allowed to open a connection to a node (both paths).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys deleted per batch of the clean-up.
const DELETE_BATCH: usize = 64;

/// Flags of `kvstrata bench-remote` (`--json` is the global flag).
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteBenchArgs {
    /// Seed node of the Redis Cluster, redis://host:port (repeatable, or a
    /// comma-separated list).
    #[arg(
        long = "node",
        value_name = "URL",
        required = true,
        value_delimiter = ','
    )]
    pub nodes: Vec<String>,

    /// Payload bytes per block; a comma-separated list runs each size
    /// (fio-style: 256K and 1M are KiB and MiB).
    #[arg(
        long = "block-size",
        value_name = "SIZE",
        value_delimiter = ',',
        default_values = ["256KiB", "1MiB"],
        value_parser = parse_size
    )]
    pub block_sizes: Vec<ByteSize>,

    /// Blocks written and then read per block size and path.
    #[arg(long, default_value_t = 512)]
    pub blocks: u64,

    /// Rounds per block size. Each round writes and reads `--blocks` blocks
    /// on both paths; even rounds run kvstrata first, odd rounds raw first.
    /// The report sums all rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,

    /// Blocks per batch: commands in flight at once (per put_many /
    /// get_many call of the tier, per batch of SET / GET on the raw path).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,

    /// Per-command deadline of both paths, milliseconds. A command past it
    /// fails the run. The tier's production default (250 ms) is meant for
    /// serving; the benchmark measures throughput, so it waits longer.
    #[arg(long, default_value_t = 5000)]
    pub deadline_ms: u64,

    /// How long to wait for the first connection to the cluster, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub connect_wait_ms: u64,

    /// Print the result as a markdown table (ignored with --json).
    #[arg(long)]
    pub markdown: bool,

    /// Hide the progress bar (it is shown only when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl Default for RemoteBenchArgs {
    fn default() -> Self {
        RemoteBenchArgs {
            nodes: Vec::new(),
            block_sizes: vec![ByteSize::kib(256), ByteSize::mib(1)],
            blocks: 512,
            rounds: 2,
            concurrency: 16,
            deadline_ms: 5000,
            connect_wait_ms: 10_000,
            markdown: false,
            no_progress: false,
        }
    }
}

/// Flags checked.
#[derive(Debug, Clone)]
struct RemotePlan {
    nodes: Vec<String>,
    sizes: Vec<usize>,
    blocks: u64,
    rounds: u32,
    concurrency: usize,
    deadline: Duration,
}

impl RemoteBenchArgs {
    fn plan(&self) -> Result<RemotePlan, BenchError> {
        let bad =
            |field: &'static str, reason: String| Err(BenchError::InvalidArg { field, reason });
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if nodes.is_empty() {
            return bad("--node", "at least one node is needed".into());
        }
        if self.block_sizes.is_empty() {
            return bad("--block-size", "at least one size is needed".into());
        }
        let mut sizes = Vec::with_capacity(self.block_sizes.len());
        for bs in &self.block_sizes {
            let bs = bs.as_u64();
            if bs < STAMP as u64 {
                return bad(
                    "--block-size",
                    format!("{bs} bytes; at least {STAMP} (the verification stamp)"),
                );
            }
            if bs > MAX_BLOCK_BYTES {
                return bad(
                    "--block-size",
                    format!("{bs} bytes; at most {MAX_BLOCK_BYTES}"),
                );
            }
            let b = usize::try_from(bs).map_err(|_| BenchError::InvalidArg {
                field: "--block-size",
                reason: format!("{bs} bytes does not fit in memory"),
            })?;
            sizes.push(b);
        }
        if self.blocks == 0 {
            return bad("--blocks", "must be at least 1".into());
        }
        if self.rounds == 0 {
            return bad("--rounds", "must be at least 1".into());
        }
        if self.concurrency == 0 {
            return bad("--concurrency", "must be at least 1".into());
        }
        if self.deadline_ms == 0 {
            return bad("--deadline-ms", "must be at least 1".into());
        }
        Ok(RemotePlan {
            nodes,
            sizes,
            blocks: self.blocks,
            rounds: self.rounds,
            concurrency: self.concurrency,
            deadline: Duration::from_millis(self.deadline_ms),
        })
    }
}

/// One direction (write or read) of one path.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemotePhaseReport {
    /// Sum of the batches' wall times: the time the caller waited on the
    /// store. GB/s and blocks/s are over this time.
    pub seconds: f64,
    /// Wall time of the whole phase, the bench's payload generation and
    /// byte-for-byte checks between batches included.
    pub phase_seconds: f64,
    /// CPU time (user + system, all threads) this process used during the
    /// batches: the client side's cost (not the Redis servers').
    pub cpu_seconds: f64,
    /// `cpu_seconds` per decimal GB of payload.
    pub cpu_s_per_gb: f64,
    /// Batches (`rpcs`), blocks, payload bytes and rates, per-batch latency.
    #[serde(flatten)]
    pub op: OpReport,
}

/// Write then read of one path.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemotePathReport {
    /// Bytes of one value on the cluster (the tier adds its 200-byte record header).
    pub value_bytes: u64,
    pub write: RemotePhaseReport,
    pub read: RemotePhaseReport,
    /// Blocks read back and checked byte for byte (all of them).
    pub verified_blocks: u64,
    /// Blocks read back wrong or missing (0: the run fails otherwise).
    pub verify_failures: u64,
}

/// kvstrata / raw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteRatios {
    /// Write GB/s ratio (higher is better for kvstrata).
    pub write_gb_per_s: f64,
    /// Read GB/s ratio.
    pub read_gb_per_s: f64,
    /// Write p99 ratio (lower is better for kvstrata).
    pub write_p99: f64,
    /// Read p99 ratio.
    pub read_p99: f64,
}

/// Both paths at one block size.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteSizeReport {
    pub block_size: u64,
    /// Blocks written and read per round and path.
    pub blocks: u64,
    /// Through [`RemoteTier`].
    pub kvstrata: RemotePathReport,
    /// The same cluster through the redis crate directly.
    pub raw: RemotePathReport,
    /// kvstrata / raw.
    pub ratio: RemoteRatios,
}

impl RemoteSizeReport {
    /// Write then read: (op, kvstrata phase, raw phase, GB/s ratio, p99 ratio).
    fn directions(
        &self,
    ) -> [(
        &'static str,
        &RemotePhaseReport,
        &RemotePhaseReport,
        f64,
        f64,
    ); 2] {
        [
            (
                "write",
                &self.kvstrata.write,
                &self.raw.write,
                self.ratio.write_gb_per_s,
                self.ratio.write_p99,
            ),
            (
                "read",
                &self.kvstrata.read,
                &self.raw.read,
                self.ratio.read_gb_per_s,
                self.ratio.read_p99,
            ),
        ]
    }
}

/// The tier's own counters after the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteTierCounters {
    pub writes: u64,
    pub write_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub read_bytes: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub corrupt_blocks: u64,
}

/// Everything a run measured, with the settings it ran under.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteBenchReport {
    /// Seed nodes.
    pub nodes: Vec<String>,
    /// Blocks per batch (commands in flight).
    pub concurrency: usize,
    /// Rounds per block size (alternating which path goes first); every
    /// figure sums all rounds.
    pub rounds: u32,
    /// Per-command deadline of both paths.
    pub deadline_ms: u64,
    /// Prefix of the tier's keys; the raw path uses `<prefix>-raw`.
    pub key_prefix: String,
    pub sizes: Vec<RemoteSizeReport>,
    pub tier: RemoteTierCounters,
}

/// `256 KiB`, `1 MiB`, or bytes when not a whole number of KiB.
fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl RemoteBenchReport {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, BenchError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    fn title(&self) -> String {
        format!(
            "kvstrata bench-remote: {} seed node{} ({}), {} blocks x {} round{} per size and path \
             (alternating which path goes first), batches of {} in flight, deadline {} ms",
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            self.nodes.join(", "),
            self.sizes.first().map_or(0, |s| s.blocks),
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
            self.concurrency,
            self.deadline_ms
        )
    }

    /// The report as a human-readable table.
    pub fn human(&self) -> String {
        let mut out = self.title();
        out.push('\n');
        out.push_str(
            "kvstrata: RemoteTier put_many / get_many (value = 200-byte record header + payload, verified); \
             raw: redis cluster-async SET / GET of the payload\n\n",
        );
        out.push_str(&format!(
            "{:<8} {:<6} {:<9} {:>7} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>11} {:>9}\n",
            "block",
            "op",
            "path",
            "blocks",
            "seconds",
            "GB/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU s/GB",
            "GB/s ratio",
            "p99 ratio"
        ));
        for s in &self.sizes {
            let size = size_label(s.block_size as usize);
            for (op, kv, raw, gr, pr) in s.directions() {
                for (path, p, ratios) in [("kvstrata", kv, Some((gr, pr))), ("raw", raw, None)] {
                    let (g, q) = match ratios {
                        Some((g, q)) => (format!("{g:.2}"), format!("{q:.2}")),
                        None => ("-".into(), "-".into()),
                    };
                    out.push_str(&format!(
                        "{:<8} {:<6} {:<9} {:>7} {:>8.3} {:>7.3} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>11} {:>9}\n",
                        size,
                        op,
                        path,
                        p.op.blocks,
                        p.seconds,
                        p.op.gb_per_s,
                        ms(p.op.p50_us),
                        ms(p.op.p99_us),
                        ms(p.op.max_us),
                        p.cpu_s_per_gb,
                        g,
                        q
                    ));
                }
            }
        }
        let verified: u64 = self
            .sizes
            .iter()
            .map(|s| s.kvstrata.verified_blocks + s.raw.verified_blocks)
            .sum();
        out.push_str(&format!(
            "\nverification: {verified} blocks read back, all correct; tier counters: {} errors, {} timeouts, {} corrupt\n",
            self.tier.errors, self.tier.timeouts, self.tier.corrupt_blocks
        ));
        out
    }

    /// The report as a markdown table (one row per block size and direction).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("{}\n\n", self.title()));
        out.push_str(
            "| block size | op | blocks | kvstrata GB/s | raw cluster GB/s | GB/s kvstrata/raw | \
             kvstrata p50 / p99 (ms) | raw p50 / p99 (ms) | p99 kvstrata/raw | \
             client CPU s/GB, kvstrata / raw |\n",
        );
        out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in &self.sizes {
            let size = size_label(s.block_size as usize);
            for (op, kv, raw, gr, pr) in s.directions() {
                out.push_str(&format!(
                    "| {} | {} | {} | {:.3} | {:.3} | **{:.2}** | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.2} / {:.2} |\n",
                    size,
                    op,
                    kv.op.blocks,
                    kv.op.gb_per_s,
                    raw.op.gb_per_s,
                    gr,
                    ms(kv.op.p50_us),
                    ms(kv.op.p99_us),
                    ms(raw.op.p50_us),
                    ms(raw.op.p99_us),
                    pr,
                    kv.cpu_s_per_gb,
                    raw.cpu_s_per_gb
                ));
            }
        }
        let verified: u64 = self
            .sizes
            .iter()
            .map(|s| s.kvstrata.verified_blocks + s.raw.verified_blocks)
            .sum();
        out.push_str(&format!(
            "\nLatency is per batch of {} blocks. Client CPU: user + system seconds of this process (all threads) \
             during the batches, per GB of payload. {verified} blocks read back and checked byte for byte, \
             all correct; tier counters: {} errors, {} timeouts, {} corrupt.\n",
            self.concurrency, self.tier.errors, self.tier.timeouts, self.tier.corrupt_blocks
        ));
        out
    }
}

/// CPU time (user + system, all threads) this process has used so far.
fn process_cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given a pointer to; it was
    // zeroed, so it is initialised even if the call failed.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Start of a batch: wall clock and process CPU time.
struct Clock {
    wall: Instant,
    cpu: Duration,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            cpu: process_cpu(),
            wall: Instant::now(),
        }
    }
}

/// Counters of one direction of one path, over every round.
struct PhaseAccum {
    acc: OpAccum,
    /// Sum of the batches' wall times.
    busy: Duration,
    /// Sum of the phases' wall times.
    phase: Duration,
    /// Process CPU time used during the batches.
    cpu: Duration,
}

impl PhaseAccum {
    fn new() -> Result<Self, BenchError> {
        Ok(PhaseAccum {
            acc: OpAccum::new()?,
            busy: Duration::ZERO,
            phase: Duration::ZERO,
            cpu: Duration::ZERO,
        })
    }

    fn merge(&mut self, other: &PhaseAccum) -> Result<(), BenchError> {
        self.acc.merge(&other.acc)?;
        self.busy += other.busy;
        self.phase += other.phase;
        self.cpu += other.cpu;
        Ok(())
    }

    /// One batch of `blocks` blocks of `block` bytes, all stored or found,
    /// that started at `clock`.
    fn batch(&mut self, clock: &Clock, blocks: usize, block: usize) {
        let took = clock.wall.elapsed();
        self.cpu += process_cpu().saturating_sub(clock.cpu);
        self.acc.record_latency(took);
        self.busy += took;
        self.acc.blocks += blocks as u64;
        self.acc.hits += blocks as u64;
        self.acc.bytes += (blocks * block) as u64;
    }

    fn report(&self) -> RemotePhaseReport {
        let secs = self.busy.as_secs_f64();
        let cpu = self.cpu.as_secs_f64();
        RemotePhaseReport {
            seconds: secs,
            phase_seconds: self.phase.as_secs_f64(),
            cpu_seconds: cpu,
            cpu_s_per_gb: div(cpu, self.acc.bytes as f64 / 1e9),
            op: OpReport::from_accum(&self.acc, secs),
        }
    }
}

/// Write and read of one path, over every round.
struct PathAccum {
    write: PhaseAccum,
    read: PhaseAccum,
    verified: u64,
}

impl PathAccum {
    fn new() -> Result<Self, BenchError> {
        Ok(PathAccum {
            write: PhaseAccum::new()?,
            read: PhaseAccum::new()?,
            verified: 0,
        })
    }

    fn merge(&mut self, other: &PathAccum) -> Result<(), BenchError> {
        self.write.merge(&other.write)?;
        self.read.merge(&other.read)?;
        self.verified += other.verified;
        Ok(())
    }

    fn report(&self, value_bytes: u64) -> RemotePathReport {
        RemotePathReport {
            value_bytes,
            write: self.write.report(),
            read: self.read.report(),
            verified_blocks: self.verified,
            verify_failures: 0,
        }
    }
}

/// Batches of `c` consecutive block indices out of `n`.
fn batches(n: u64, c: usize) -> impl Iterator<Item = std::ops::Range<u64>> {
    let c = c as u64;
    (0..n.div_ceil(c)).map(move |b| b * c..((b + 1) * c).min(n))
}

/// The tier's key of block `index` at `size`.
fn block_key(size: usize, index: u64) -> Result<BlockKey, BenchError> {
    BlockKey::new("key", format!("bench-remote-{size}-{index}").as_bytes()).map_err(|e| {
        BenchError::Protocol {
            op: "bench-remote",
            reason: e.to_string(),
        }
    })
}

/// The raw path's Redis key of block `index` at `size`.
fn raw_key(prefix: &str, size: usize, index: u64) -> String {
    format!("{prefix}:{size}:{index}")
}

fn failed(path: &'static str, op: &'static str, block: usize, reason: String) -> BenchError {
    BenchError::RemoteFailed {
        path,
        op,
        block_size: block as u64,
        reason,
    }
}

/// What a path needs for one block size.
struct SizeCtx<'a> {
    plan: &'a RemotePlan,
    block: usize,
    pattern: &'a Pattern,
    bar: &'a ProgressBar,
}

/// The kvstrata path at one size (blocking: the tier's calls wait).
fn kvstrata_path(tier: &RemoteTier, cx: &SizeCtx<'_>) -> Result<PathAccum, BenchError> {
    let (block, plan) = (cx.block, cx.plan);
    let why = |tier: &RemoteTier| {
        let s = tier.stats();
        format!(
            "tier counters: {} errors, {} timeouts, {} corrupt; last error: {:?}",
            s.errors, s.timeouts, s.corrupt_blocks, s.last_error
        )
    };
    let keys: Vec<BlockKey> = (0..plan.blocks)
        .map(|i| block_key(block, i))
        .collect::<Result<_, _>>()?;

    cx.bar
        .set_message(format!("kvstrata write {}", size_label(block)));
    let mut out = PathAccum::new()?;
    let started = Instant::now();
    let w = &mut out.write;
    for r in batches(plan.blocks, plan.concurrency) {
        let items: Vec<(BlockKey, Option<BlockKey>, Bytes)> = r
            .clone()
            .map(|i| (keys[i as usize], None, cx.pattern.payload(i)))
            .collect();
        let t0 = Clock::start();
        let stored = tier.put_many(&NAMESPACE, &items);
        w.batch(&t0, items.len(), block);
        if let Some(j) = stored.iter().position(|ok| !ok) {
            return Err(failed(
                "kvstrata",
                "write",
                block,
                format!(
                    "put_many did not store block {}; {}",
                    r.start + j as u64,
                    why(tier)
                ),
            ));
        }
        cx.bar.inc(items.len() as u64);
    }
    w.phase = started.elapsed();

    cx.bar
        .set_message(format!("kvstrata read {}", size_label(block)));
    let started = Instant::now();
    let rd = &mut out.read;
    for r in batches(plan.blocks, plan.concurrency) {
        let ks = &keys[r.start as usize..r.end as usize];
        let t0 = Clock::start();
        let got = tier.get_many(&NAMESPACE, ks, block as u64);
        rd.batch(&t0, ks.len(), block);
        for (i, g) in r.clone().zip(got) {
            let Some(b) = g else {
                return Err(failed(
                    "kvstrata",
                    "read",
                    block,
                    format!("get_many missed block {i}; {}", why(tier)),
                ));
            };
            if let Some(bad) = cx.pattern.check(i, &b.payload) {
                return Err(failed("kvstrata", "read", block, bad));
            }
            out.verified += 1;
        }
        cx.bar.inc(ks.len() as u64);
    }
    out.read.phase = started.elapsed();
    Ok(out)
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

fn redis_err(op: &'static str, nodes: &[String], source: redis::RedisError) -> BenchError {
    BenchError::Redis {
        op,
        url: nodes.join(","),
        source,
    }
}

/// The raw path at one size.
async fn raw_path(
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
async fn delete_keys(
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

/// Runs the benchmark against the cluster at `args.nodes`. A write that is
/// not stored, a read that misses or returns wrong bytes, or a Redis error
/// ends the run with an error; the keys written so far are deleted first.
/// Must run inside a multi-threaded tokio runtime.
pub async fn run_remote_bench(args: &RemoteBenchArgs) -> Result<RemoteBenchReport, BenchError> {
    let plan = args.plan()?;
    let prefix = format!("kvstrata-bench-{}", std::process::id());
    let raw_prefix = format!("{prefix}-raw");

    let config = RemoteTierConfig {
        nodes: plan.nodes.clone(),
        key_prefix: prefix.clone(),
        deadline: plan.deadline,
        connect_timeout: CONNECT_TIMEOUT,
        write_concurrency: plan.concurrency,
        ..RemoteTierConfig::default()
    };
    let tier = blocking_open(config).await?;
    let wait = Duration::from_millis(args.connect_wait_ms);
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

    // The raw path: the same client library and settings as the tier.
    let client = ClusterClientBuilder::new(plan.nodes.clone())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(plan.deadline)
        .retries(1)
        .build()
        .map_err(|e| redis_err("connect", &plan.nodes, e))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| redis_err("connect", &plan.nodes, e))?;

    let bar = progress_bar(
        plan.sizes.len() as u64 * plan.rounds as u64 * 4 * plan.blocks,
        args.no_progress,
    );
    let mut sizes = Vec::with_capacity(plan.sizes.len());
    for &block in &plan.sizes {
        let pattern = Arc::new(Pattern::new(block));
        let kv_keys: Vec<String> = (0..plan.blocks)
            .map(|i| block_key(block, i).map(|k| record::redis_key(&prefix, &NAMESPACE, &k)))
            .collect::<Result<_, _>>()?;
        let raw_keys: Vec<String> = (0..plan.blocks)
            .map(|i| raw_key(&raw_prefix, block, i))
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
                    let r = blocking(&tier, move |t| {
                        kvstrata_path(
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
                        plan: &plan,
                        block,
                        pattern: &pattern,
                        bar: &bar,
                    };
                    (raw_path(&conn, &raw_prefix, &cx).await, &raw_keys)
                };
                let cleaned = delete_keys(&conn, &plan.nodes, keys.clone()).await;
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
        let ratio = RemoteRatios {
            write_gb_per_s: div(kv.write.op.gb_per_s, raw.write.op.gb_per_s),
            read_gb_per_s: div(kv.read.op.gb_per_s, raw.read.op.gb_per_s),
            write_p99: div(kv.write.op.p99_us, raw.write.op.p99_us),
            read_p99: div(kv.read.op.p99_us, raw.read.op.p99_us),
        };
        sizes.push(RemoteSizeReport {
            block_size: block as u64,
            blocks: plan.blocks,
            kvstrata: kv,
            raw,
            ratio,
        });
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
        tier: RemoteTierCounters {
            writes: s.writes,
            write_bytes: s.write_bytes,
            hits: s.hits,
            misses: s.misses,
            read_bytes: s.read_bytes,
            errors: s.errors,
            timeouts: s.timeouts,
            corrupt_blocks: s.corrupt_blocks,
        },
    })
}

/// Opens the tier (it starts its own runtime) off the async workers.
async fn blocking_open(config: RemoteTierConfig) -> Result<RemoteTier, BenchError> {
    let tier = tokio::task::spawn_blocking(move || {
        RemoteTier::open(config, Arc::new(EventBus::new(1024)))
    })
    .await??;
    Ok(tier)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::PAGE;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: RemoteBenchArgs,
    }

    fn parse(args: &[&str]) -> Result<RemoteBenchArgs, clap::Error> {
        let mut v = vec!["bench-remote"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn defaults_and_lists() {
        let a = parse(&["--node", "redis://127.0.0.1:7000"]).unwrap();
        assert_eq!(a.nodes, ["redis://127.0.0.1:7000"]);
        assert_eq!(
            a.block_sizes.iter().map(|b| b.as_u64()).collect::<Vec<_>>(),
            [256 << 10, 1 << 20]
        );
        assert_eq!((a.blocks, a.concurrency, a.deadline_ms), (512, 16, 5000));
        assert_eq!(a.rounds, 2);
        assert!(!a.markdown);
        let a = parse(&[
            "--node",
            "redis://a:1,redis://b:2",
            "--node",
            "redis://c:3",
            "--block-size",
            "64KiB,1M",
            "--blocks",
            "16",
            "--concurrency",
            "4",
            "--markdown",
        ])
        .unwrap();
        assert_eq!(a.nodes, ["redis://a:1", "redis://b:2", "redis://c:3"]);
        assert_eq!(
            a.block_sizes.iter().map(|b| b.as_u64()).collect::<Vec<_>>(),
            [64 << 10, 1 << 20]
        );
        let p = a.plan().unwrap();
        assert_eq!(p.sizes, [64 << 10, 1 << 20]);
        assert_eq!((p.blocks, p.concurrency), (16, 4));
        assert!(parse(&[]).is_err(), "--node is required");
    }

    #[test]
    fn rejects_bad_flags() {
        let base = RemoteBenchArgs {
            nodes: vec!["redis://127.0.0.1:1".into()],
            ..RemoteBenchArgs::default()
        };
        for (args, field) in [
            (
                RemoteBenchArgs {
                    nodes: vec![" ".into()],
                    ..base.clone()
                },
                "--node",
            ),
            (
                RemoteBenchArgs {
                    blocks: 0,
                    ..base.clone()
                },
                "--blocks",
            ),
            (
                RemoteBenchArgs {
                    concurrency: 0,
                    ..base.clone()
                },
                "--concurrency",
            ),
            (
                RemoteBenchArgs {
                    rounds: 0,
                    ..base.clone()
                },
                "--rounds",
            ),
            (
                RemoteBenchArgs {
                    block_sizes: vec![ByteSize::b(8)],
                    ..base.clone()
                },
                "--block-size",
            ),
            (
                RemoteBenchArgs {
                    deadline_ms: 0,
                    ..base.clone()
                },
                "--deadline-ms",
            ),
        ] {
            match args.plan() {
                Err(BenchError::InvalidArg { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(base.plan().is_ok());
    }

    #[test]
    fn batches_cover_every_block_once() {
        let b: Vec<_> = batches(10, 4).collect();
        assert_eq!(b, [0..4, 4..8, 8..10]);
        assert_eq!(batches(4, 4).count(), 1);
        let one: Vec<_> = batches(1, 16).collect();
        assert_eq!((one.len(), one[0].clone()), (1, 0..1));
    }

    #[test]
    fn pattern_catches_wrong_blocks() {
        let p = Pattern::new(2 * PAGE + 10);
        let a = p.payload(3);
        assert_eq!(p.check(3, &a), None);
        assert!(p.check(4, &a).is_some());
        let mut b = a.to_vec();
        b[PAGE + 100] ^= 1;
        assert!(
            p.check(3, &b)
                .unwrap()
                .contains(&format!("byte {}", PAGE + 100))
        );
        assert!(p.check(3, &a[..10]).is_some());
        assert_ne!(p.payload(1), p.payload(2));
    }

    #[test]
    fn tables_show_both_paths_and_ratios() {
        let phase = |gb: f64, p99: f64| RemotePhaseReport {
            seconds: 1.0,
            phase_seconds: 1.1,
            cpu_seconds: 0.5,
            cpu_s_per_gb: 0.25,
            op: OpReport {
                blocks: 16,
                gb_per_s: gb,
                p50_us: p99 / 2.0,
                p99_us: p99,
                ..OpReport::default()
            },
        };
        let path = |gb: f64| RemotePathReport {
            value_bytes: 1,
            write: phase(gb, 2000.0),
            read: phase(gb * 2.0, 1000.0),
            verified_blocks: 16,
            verify_failures: 0,
        };
        let r = RemoteBenchReport {
            nodes: vec!["redis://x:1".into()],
            concurrency: 16,
            rounds: 1,
            deadline_ms: 5000,
            key_prefix: "p".into(),
            sizes: vec![RemoteSizeReport {
                block_size: 1 << 20,
                blocks: 16,
                kvstrata: path(0.5),
                raw: path(1.0),
                ratio: RemoteRatios {
                    write_gb_per_s: 0.5,
                    read_gb_per_s: 0.5,
                    write_p99: 1.0,
                    read_p99: 1.0,
                },
            }],
            tier: RemoteTierCounters::default(),
        };
        let md = r.markdown();
        assert!(md.contains("| 1 MiB | write | 16 | 0.500 | 1.000 | **0.50** | 1.00 / 2.00 | 1.00 / 2.00 | 1.00 | 0.25 / 0.25 |"), "{md}");
        let h = r.human();
        assert!(
            h.contains("kvstrata") && h.contains("raw") && h.contains("all correct"),
            "{h}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(json["sizes"][0]["raw"]["read"]["gb_per_s"], 2.0);
        assert_eq!(json["sizes"][0]["ratio"]["read_gb_per_s"], 0.5);
    }
}
