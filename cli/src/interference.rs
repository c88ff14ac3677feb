//! `kvstrata bench interference`: how much a decode slows down while another
//! engine's KV is being stored into the daemon on the same GPU.
//!
//! Engine A holds a context of `--context` tokens (prefilled once, on the GPU)
//! and runs decode steps of one token each. Each row measures `--steps` steps
//! with the daemon idle ("quiet"), then the same number again while engine B
//! — a second KV pool of this process, registered with the daemon as its own
//! CUDA-IPC KV region — stores `--store-tokens` tokens of KV by page ids, back
//! to back, for as long as A runs ("loaded"): each round stores the sequence's
//! blocks under fresh keys in requests of `--store-chunk-blocks` blocks, then
//! deletes them (so the tier never fills and nothing is evicted). Both phases
//! start from the same context (A's sequence is cut back to it after each).
//!
//! A row per tier the stores land in (`hbm`: the daemon's HBM tier, gathered
//! by its kernels device to device; `host`: a daemon without an HBM tier, so
//! the blocks go through its device staging into the page-locked host tier)
//! and per request size. It reports the p50/p99 step time quiet and loaded,
//! their ratio (the target: at most 1.3), and the store bandwidth
//! achieved while A ran. The daemon is a `kvstrata serve` child process
//! (`crate::ttft::start_gpu_daemon`), so its kernels run in another CUDA
//! context than the engine's.
//!
//! Mitigations, switchable so the same binary measures with and without them:
//! `KVSTRATA_GPU_STREAM_PRIORITY=off` (stream priorities: the engine's stream
//! at the highest, the daemon's at the lowest; on by default; the child
//! daemon inherits the variable), `--store-chunk-blocks` (or
//! `KVSTRATA_STORE_CHUNK_BLOCKS`; smaller store requests) and
//! `KVSTRATA_GPU_MOVE_GROUP_BYTES` (the daemon's staging group size, host
//! rows). docs/gpu.md, "Decode interference", says what each does.
//!
//! It needs a GPU engine: on the CPU it refuses in one line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytesize::ByteSize;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use kvstrata_client::proto;
use kvstrata_engine::cuda::{
    CudaDevice, GpuEngine, GpuKvStore, GpuModel, GpuSequence, KvPath, plan_store,
};
use serde::Serialize;

use crate::engine_verbs::{Device, DeviceArgs, GpuSetup, ModelArgs, ms};
use crate::ttft::{connect_gpu_daemon, context, start_gpu_daemon};

/// The target: a decode step under a concurrent bulk store takes at
/// most this many times the quiet step.
pub const TARGET_RATIO: f64 = 1.3;

/// Where the stored blocks land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreTier {
    /// The daemon's HBM tier (its gather kernel, device to device)
    Hbm,
    /// The daemon's page-locked host tier (a daemon without an HBM tier:
    /// gather into device staging, then DMA to the host)
    Host,
}

impl StoreTier {
    pub fn name(self) -> &'static str {
        match self {
            StoreTier::Hbm => "hbm",
            StoreTier::Host => "host",
        }
    }
}

/// `kvstrata bench interference`.
#[derive(Debug, Clone, clap::Args)]
pub struct InterferenceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tokens of context engine A decodes after
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// Decode steps measured quiet, and again while the stores run
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Decode steps run before each measurement and not counted
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: usize,
    /// Tokens of KV engine B stores per round (llama3-8b: 128 KiB a token, so
    /// 16,384 tokens are 2 GiB)
    #[arg(long, default_value_t = 16384)]
    pub store_tokens: usize,
    /// Tiers the stores land in, comma-separated: hbm (the daemon's HBM tier),
    /// host (its page-locked host tier; a daemon without an HBM tier)
    #[arg(long, value_delimiter = ',', default_value = "hbm,host")]
    pub tiers: Vec<StoreTier>,
    /// Blocks per store request, comma-separated (a row each); the GPU engine
    /// stores 1,024 blocks a request
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024",
        env = "KVSTRATA_STORE_CHUNK_BLOCKS"
    )]
    pub store_chunk_blocks: Vec<usize>,
    /// The daemon's HBM tier for the hbm rows
    #[arg(long, default_value = "8GiB")]
    pub gpu_hbm_bytes: ByteSize,
    /// The daemon's page-locked host tier
    #[arg(long, default_value = "8GiB")]
    pub gpu_host_capacity: ByteSize,
    /// Prompt tokens per forward chunk (A's prefill)
    #[arg(long, default_value_t = 2048)]
    pub gpu_chunk: usize,
    /// Print the table as Markdown (for docs/benchmarks.md)
    #[arg(long)]
    pub markdown: bool,
    /// Print JSON instead of a table (as the global `--json`, which goes before `bench`)
    #[arg(long)]
    pub json: bool,
}

impl InterferenceArgs {
    /// The argument checks that need no device.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.context < 2 {
            bail!("--context: at least 2 tokens");
        }
        if self.steps == 0 {
            bail!("--steps: at least 1");
        }
        if self.model.block_tokens == 0 || self.store_tokens < self.model.block_tokens {
            bail!(
                "--store-tokens: at least one block ({} tokens)",
                self.model.block_tokens
            );
        }
        if self.tiers.is_empty() {
            bail!("--tiers: name at least one of hbm, host");
        }
        if self.store_chunk_blocks.is_empty() || self.store_chunk_blocks.contains(&0) {
            bail!("--store-chunk-blocks: every request size is at least 1 block");
        }
        Ok(())
    }
}

/// Step-time statistics of one phase, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    pub steps: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl StepStats {
    /// The statistics of `times`; `None` when there are none.
    pub fn of(times: &[Duration]) -> Option<Self> {
        let mut v: Vec<f64> = times.iter().map(|&d| ms(d)).collect();
        v.sort_by(f64::total_cmp);
        Some(StepStats {
            steps: v.len(),
            p50_ms: percentile(&v, 0.50)?,
            p99_ms: percentile(&v, 0.99)?,
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            max_ms: *v.last()?,
        })
    }

    /// Decode tokens per second (one token a step).
    pub fn tokens_per_s(&self) -> f64 {
        if self.mean_ms > 0.0 {
            1000.0 / self.mean_ms
        } else {
            0.0
        }
    }
}

/// The nearest-rank percentile `q` (0 < q ≤ 1) of ascending `sorted`.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `loaded / quiet`, 0 when the quiet time is 0.
pub fn ratio(loaded: f64, quiet: f64) -> f64 {
    if quiet > 0.0 { loaded / quiet } else { 0.0 }
}

/// What engine B's stores achieved.
#[derive(Debug, Clone, Default)]
pub struct StoreLog {
    /// (completed at, bytes stored) of each request.
    pub requests: Vec<(Instant, u64)>,
    /// Time spent inside store requests.
    pub busy: Duration,
    pub rounds: usize,
    pub no_space: usize,
    /// The tier the first stored block was found in.
    pub landed: Option<proto::Tier>,
}

impl StoreLog {
    /// GB/s stored by requests completed in `start..=end`.
    pub fn gb_per_s_within(&self, start: Instant, end: Instant) -> f64 {
        let span = end.saturating_duration_since(start).as_secs_f64();
        let bytes: u64 = self
            .requests
            .iter()
            .filter(|(t, _)| *t > start && *t <= end)
            .map(|(_, b)| b)
            .sum();
        if span > 0.0 {
            bytes as f64 / span / 1e9
        } else {
            0.0
        }
    }

    /// GB/s of the requests themselves (bytes over time inside them).
    pub fn request_gb_per_s(&self) -> f64 {
        let bytes: u64 = self.requests.iter().map(|(_, b)| b).sum();
        let s = self.busy.as_secs_f64();
        if s > 0.0 { bytes as f64 / s / 1e9 } else { 0.0 }
    }
}

/// One row: a tier and a request size, quiet against loaded.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub device: String,
    pub model: String,
    pub context_tokens: usize,
    pub tier: StoreTier,
    /// Where the stored blocks were found (the daemon's answer to a lookup).
    pub landed_tier: Option<String>,
    /// The engine stream's priority (`None`: made without one).
    pub engine_stream_priority: Option<i32>,
    pub store_tokens: usize,
    pub store_bytes_per_round: u64,
    pub store_chunk_blocks: usize,
    pub quiet: StepStats,
    pub loaded: StepStats,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
    pub ratio_mean: f64,
    pub decode_tokens_per_s_quiet: f64,
    pub decode_tokens_per_s_loaded: f64,
    /// Bytes stored while A's loaded steps ran, over their time.
    pub store_gb_per_s: f64,
    /// Bytes over the time inside the store requests.
    pub store_request_gb_per_s: f64,
    pub store_rounds: usize,
    pub store_no_space: usize,
    pub target_ratio: f64,
}

/// Everything of a row but its identity.
#[derive(Debug, Clone)]
pub struct Measured {
    pub quiet: StepStats,
    pub loaded: StepStats,
    pub store_gb_per_s: f64,
    pub store_request_gb_per_s: f64,
    pub store_rounds: usize,
    pub store_no_space: usize,
    pub landed: Option<proto::Tier>,
}

/// Where a row was measured.
#[derive(Debug, Clone)]
pub struct RowId {
    pub device: String,
    pub model: String,
    pub context_tokens: usize,
    pub tier: StoreTier,
    pub engine_stream_priority: Option<i32>,
    pub store_tokens: usize,
    pub store_bytes_per_round: u64,
    pub store_chunk_blocks: usize,
}

impl Row {
    pub fn new(id: RowId, m: Measured) -> Row {
        Row {
            device: id.device,
            model: id.model,
            context_tokens: id.context_tokens,
            tier: id.tier,
            landed_tier: m.landed.map(|t| tier_name(t).to_string()),
            engine_stream_priority: id.engine_stream_priority,
            store_tokens: id.store_tokens,
            store_bytes_per_round: id.store_bytes_per_round,
            store_chunk_blocks: id.store_chunk_blocks,
            ratio_p50: ratio(m.loaded.p50_ms, m.quiet.p50_ms),
            ratio_p99: ratio(m.loaded.p99_ms, m.quiet.p99_ms),
            ratio_mean: ratio(m.loaded.mean_ms, m.quiet.mean_ms),
            decode_tokens_per_s_quiet: m.quiet.tokens_per_s(),
            decode_tokens_per_s_loaded: m.loaded.tokens_per_s(),
            quiet: m.quiet,
            loaded: m.loaded,
            store_gb_per_s: m.store_gb_per_s,
            store_request_gb_per_s: m.store_request_gb_per_s,
            store_rounds: m.store_rounds,
            store_no_space: m.store_no_space,
            target_ratio: TARGET_RATIO,
        }
    }

    /// "p50 yes, p99 no": whether each ratio is within the target.
    pub fn target_cell(&self) -> String {
        let yn = |r: f64| if r <= TARGET_RATIO { "yes" } else { "no" };
        format!("p50 {}, p99 {}", yn(self.ratio_p50), yn(self.ratio_p99))
    }

    fn priority_cell(&self) -> String {
        match self.engine_stream_priority {
            Some(p) => format!("on ({p})"),
            None => "off".into(),
        }
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.tier.name().to_string(),
            self.landed_tier.clone().unwrap_or_else(|| "-".into()),
            self.store_chunk_blocks.to_string(),
            self.priority_cell(),
            format!("{:.2}", self.quiet.p50_ms),
            format!("{:.2}", self.quiet.p99_ms),
            format!("{:.2}", self.loaded.p50_ms),
            format!("{:.2}", self.loaded.p99_ms),
            format!("{:.2}x", self.ratio_p50),
            format!("{:.2}x", self.ratio_p99),
            format!(
                "{:.0} / {:.0}",
                self.decode_tokens_per_s_quiet, self.decode_tokens_per_s_loaded
            ),
            format!("{:.1}", self.store_gb_per_s),
            self.target_cell(),
        ]
    }
}

const HEADER: [&str; 13] = [
    "tier",
    "landed in",
    "blocks/request",
    "engine stream priority",
    "quiet p50 ms",
    "quiet p99 ms",
    "loaded p50 ms",
    "loaded p99 ms",
    "ratio p50",
    "ratio p99",
    "decode tok/s quiet / loaded",
    "store GB/s",
    "target <= 1.3x",
];

fn tier_name(t: proto::Tier) -> &'static str {
    match t {
        proto::Tier::Hbm => "hbm",
        proto::Tier::Host => "host",
        proto::Tier::Disk => "disk",
        _ => "other",
    }
}

/// The Markdown table of `rows`.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n", HEADER.join(" | "));
    out.push_str("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        out.push_str(&format!("| {} |\n", r.cells().join(" | ")));
    }
    out
}

fn print_rows(rows: &[Row], json: bool, markdown: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else if markdown {
        print!("{}", markdown_table(rows));
    } else {
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(HEADER);
        for r in rows {
            table.add_row(r.cells());
        }
        println!("{table}");
    }
    Ok(())
}

/// The one-line refusal on the CPU.
pub const NEEDS_CUDA: &str = "bench interference needs --device cuda: it times a GPU engine's \
     decode steps against the daemon's GPU copies, which the CPU engine does not have";

/// `kvstrata bench interference`.
pub async fn run_interference(args: InterferenceArgs, json: bool) -> anyhow::Result<()> {
    args.check()?;
    match args.device.resolve(args.model.quiet || json)? {
        Device::Cpu => bail!(NEEDS_CUDA),
        Device::Cuda(dev) => run_gpu(args, dev, json).await,
    }
}

/// Decode steps of one phase: their times and the span of the counted ones.
struct Phase {
    times: Vec<Duration>,
    start: Instant,
    end: Instant,
}

/// Runs `warmup` uncounted then `steps` counted greedy decode steps on `seq`
/// from `first`, then cuts `seq` back to `context` positions.
fn decode_phase(
    model: &GpuModel,
    seq: &mut GpuSequence,
    first: u32,
    context: usize,
    warmup: usize,
    steps: usize,
) -> anyhow::Result<Phase> {
    let mut token = first;
    for _ in 0..warmup {
        token = model.forward_top_k(&[token], seq, 1)?[0].0;
    }
    let mut times = Vec::with_capacity(steps);
    let start = Instant::now();
    for _ in 0..steps {
        let t = Instant::now();
        token = model.forward_top_k(&[token], seq, 1)?[0].0;
        times.push(t.elapsed());
    }
    let end = Instant::now();
    seq.truncate(context);
    Ok(Phase { times, start, end })
}

/// Engine A's phase on a blocking thread: after `go` says the stores run
/// (when given); sets `stop` when done, whatever happened.
async fn run_phase(
    model: &Arc<GpuModel>,
    mut seq: GpuSequence,
    first: u32,
    args: &InterferenceArgs,
    go: Option<std::sync::mpsc::Receiver<()>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(GpuSequence, Phase)> {
    let model = Arc::clone(model);
    let (context, warmup, steps) = (args.context, args.warmup_steps, args.steps);
    tokio::task::spawn_blocking(move || {
        let r = match go.map(|rx| rx.recv()) {
            Some(Err(_)) => Err(anyhow::anyhow!("the stores stopped before they started")),
            _ => decode_phase(&model, &mut seq, first, context, warmup, steps),
        };
        stop.store(true, Ordering::SeqCst);
        r.map(|p| (seq, p))
    })
    .await
    .context("the decode task")?
}

/// Tokens whose chained keys are unique to `salt` (the stored bytes are
/// whatever B's pages hold: only the keys must be fresh).
fn round_tokens(salt: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (salt.wrapping_mul(1_000_003).wrapping_add(i) & 0x7fff_ffff) as u32)
        .collect()
}

/// Engine B: stores its sequence's blocks (`pages`, of `block_bytes` and
/// `bt` tokens each) under fresh keys, `chunk` blocks a request, round after
/// round until `stop`; says on `go` when the first request has completed.
#[allow(clippy::too_many_arguments)]
async fn store_load(
    store: &GpuKvStore,
    pages: &[u32],
    (block_bytes, bt): (u64, usize),
    chunk: usize,
    salt: u64,
    stop: &AtomicBool,
    go: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<StoreLog> {
    let region = store.region_id().context("engine B has no KV region")?;
    let client = store.block_store().client();
    let ns = store.block_store().namespace_id();
    let mut log = StoreLog::default();
    let mut go = Some(go);
    while !stop.load(Ordering::SeqCst) {
        log.rounds += 1;
        let keys = store.keys(&round_tokens(salt + log.rounds as u64, pages.len() * bt));
        for items in plan_store(&keys, pages, 0, pages.len(), region, chunk) {
            let t = Instant::now();
            let resp = client.put_pages(ns, items).await?;
            log.busy += t.elapsed();
            let mut stored = 0u64;
            for r in &resp.results {
                match proto::PutStatus::try_from(*r) {
                    Ok(proto::PutStatus::Stored) => stored += 1,
                    Ok(proto::PutStatus::NoSpace) => log.no_space += 1,
                    other => bail!("the daemon refused a block stored by page ids: {other:?}"),
                }
            }
            log.requests.push((Instant::now(), stored * block_bytes));
            if log.landed.is_none() {
                let (_, tiers) = store.lookup(&keys[..1]).await?;
                log.landed = Some(tiers.first().copied().unwrap_or(proto::Tier::Unspecified));
            }
            if let Some(tx) = go.take() {
                // A receiver gone means the decode failed: it reports that.
                let _ = tx.send(());
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
        client.delete(ns, &keys).await?;
    }
    Ok(log)
}

/// One row: quiet steps, then steps while B stores.
#[allow(clippy::too_many_arguments)]
async fn measure_row(
    model: &Arc<GpuModel>,
    seq: GpuSequence,
    first: u32,
    args: &InterferenceArgs,
    store: &GpuKvStore,
    pages: &[u32],
    geometry: (u64, usize),
    chunk: usize,
    salt: u64,
) -> anyhow::Result<(GpuSequence, Measured)> {
    let idle = Arc::new(AtomicBool::new(false));
    let (seq, quiet) = run_phase(model, seq, first, args, None, idle).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let decode = run_phase(model, seq, first, args, Some(rx), Arc::clone(&stop));
    let stores = async {
        let r = store_load(store, pages, geometry, chunk, salt, &stop, tx).await;
        // A failed store releases the decode (its receiver sees the sender go).
        stop.store(true, Ordering::SeqCst);
        r
    };
    let (decode, stores) = tokio::join!(decode, stores);
    let log = stores?;
    let (seq, loaded) = decode?;
    let m = Measured {
        quiet: StepStats::of(&quiet.times).context("no quiet steps")?,
        loaded: StepStats::of(&loaded.times).context("no loaded steps")?,
        store_gb_per_s: log.gb_per_s_within(loaded.start, loaded.end),
        store_request_gb_per_s: log.request_gb_per_s(),
        store_rounds: log.rounds,
        store_no_space: log.no_space,
        landed: log.landed,
    };
    Ok((seq, m))
}

/// `kvstrata bench interference --device cuda`: see the module docs.
async fn run_gpu(args: InterferenceArgs, dev: Arc<CudaDevice>, json: bool) -> anyhow::Result<()> {
    let quiet = args.model.quiet || json;
    let bt = args.model.block_tokens;
    let positions = args.context + args.warmup_steps + args.steps + bt;
    let setup = tokio::task::block_in_place(|| {
        GpuSetup::load(
            &dev,
            &args.model,
            args.device.synthetic.as_deref(),
            positions + 1,
            args.gpu_chunk.max(1),
        )
    })?;
    let model = Arc::clone(&setup.model);
    let max = model.max_positions();
    if positions >= max {
        bail!(
            "--context: {} tokens and {} steps reach beyond the model's context of {max}",
            args.context,
            args.warmup_steps + args.steps
        );
    }
    // Engine A: its own pool, the context prefilled on the GPU.
    let pool_a = model.kv_pool(bt, positions.div_ceil(bt) + 2)?;
    let tokens = match (&setup.synthetic, &setup.loaded) {
        (Some(m), _) => m.prompt(args.context, 1),
        (None, Some(loaded)) => context(loaded, 1, args.context)?,
        (None, None) => bail!("no model"),
    };
    let engine_a = GpuEngine::local(Arc::clone(&model), pool_a);
    let prefill = engine_a.prefill(&tokens).await?;
    let first = prefill.handoff.first_token;
    let mut seq = prefill.seq;
    // Engine B's pool: the sequence it stores, pages of whatever they hold.
    let store_blocks = args.store_tokens / bt;
    let pool_b = model.kv_pool(bt, store_blocks)?;
    let block_bytes = pool_b.geometry().block_bytes() as u64;
    let device = format!("cuda:{} {}", dev.info().ordinal, dev.info().name);
    if !quiet {
        eprintln!(
            "{}: A decodes after {} tokens; B stores {} tokens ({}) a round; engine stream priority {}",
            setup.name,
            args.context,
            store_blocks * bt,
            ByteSize::b(store_blocks as u64 * block_bytes),
            dev.stream_priority()
                .map_or_else(|| "off".to_string(), |p| p.to_string())
        );
    }
    let mut rows = Vec::new();
    let mut salt = 1_000u64;
    for &tier in &args.tiers {
        let hbm = match tier {
            StoreTier::Hbm if args.gpu_hbm_bytes.as_u64() == 0 => {
                eprintln!("note: --gpu-hbm-bytes 0: no hbm rows");
                continue;
            }
            StoreTier::Hbm => args.gpu_hbm_bytes,
            StoreTier::Host => ByteSize::b(0),
        };
        let (daemon, _) = start_gpu_daemon(&dev, hbm, args.gpu_host_capacity, None)?;
        let (client, options) = connect_gpu_daemon(&daemon).await?;
        let store_b =
            GpuKvStore::open(client, setup.spec.clone(), Arc::clone(&pool_b), &options).await?;
        if store_b.path() != KvPath::GpuPages {
            bail!(
                "engine B's pool is not a CUDA-IPC KV region of the daemon: {}",
                store_b.path_note().unwrap_or("unknown reason")
            );
        }
        let mut seq_b = pool_b.sequence()?;
        let pages = seq_b.reserve_blocks(store_blocks)?;
        seq_b.keep_loaded(store_blocks);
        for &chunk in &args.store_chunk_blocks {
            salt += 1_000_000;
            let (s, m) = measure_row(
                &model,
                seq,
                first,
                &args,
                &store_b,
                &pages,
                (block_bytes, bt),
                chunk,
                salt,
            )
            .await?;
            seq = s;
            let row = Row::new(
                RowId {
                    device: device.clone(),
                    model: setup.name.clone(),
                    context_tokens: args.context,
                    tier,
                    engine_stream_priority: dev.stream_priority(),
                    store_tokens: store_blocks * bt,
                    store_bytes_per_round: store_blocks as u64 * block_bytes,
                    store_chunk_blocks: chunk,
                },
                m,
            );
            // Each row as it is measured (also with --json), so a run cut
            // short keeps what it measured.
            if !args.model.quiet {
                eprintln!(
                    "{} tier, {chunk} blocks a request: step p50 {:.2} -> {:.2} ms ({:.2}x), p99 {:.2} -> {:.2} ms ({:.2}x); stores {:.1} GB/s",
                    tier.name(),
                    row.quiet.p50_ms,
                    row.loaded.p50_ms,
                    row.ratio_p50,
                    row.quiet.p99_ms,
                    row.loaded.p99_ms,
                    row.ratio_p99,
                    row.store_gb_per_s
                );
            }
            rows.push(row);
        }
        drop(seq_b);
        drop(store_b);
        drop(daemon);
    }
    drop(seq);
    print_rows(&rows, json, args.markdown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: InterferenceArgs,
    }

    fn parse(args: &[&str]) -> Result<InterferenceArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("interference").chain(args.iter().copied()))
            .map(|c| c.a)
    }

    #[test]
    fn arguments_parse_with_their_defaults() {
        let a = parse(&["--device", "cuda", "--synthetic", "llama3-8b"]).unwrap();
        assert_eq!(
            a.device.device,
            Some(kvstrata_engine::cuda::DeviceChoice::Cuda(0))
        );
        assert_eq!(a.device.synthetic.as_deref(), Some("llama3-8b"));
        assert_eq!((a.context, a.steps, a.warmup_steps), (8192, 200, 10));
        assert_eq!(a.store_tokens, 16384);
        assert_eq!(a.tiers, vec![StoreTier::Hbm, StoreTier::Host]);
        assert_eq!(a.gpu_hbm_bytes.as_u64(), 8 << 30);
        assert!(!a.markdown);
        a.check().unwrap();
        let a = parse(&[
            "--context",
            "32768",
            "--steps",
            "50",
            "--tiers",
            "host",
            "--store-chunk-blocks",
            "1024,32",
            "--store-tokens",
            "32768",
            "--markdown",
        ])
        .unwrap();
        assert_eq!((a.context, a.steps, a.store_tokens), (32768, 50, 32768));
        assert_eq!(a.tiers, vec![StoreTier::Host]);
        assert_eq!(a.store_chunk_blocks, vec![1024, 32]);
        assert!(a.markdown);
        assert!(parse(&["--tiers", "disk"]).is_err());
        assert!(parse(&["--steps", "-1"]).is_err());
    }

    #[test]
    fn bad_arguments_are_refused_naming_the_flag() {
        let cases: [(&[&str], &str); 5] = [
            (&["--steps", "0"], "--steps"),
            (&["--context", "1"], "--context"),
            (&["--store-tokens", "8"], "--store-tokens"),
            (&["--store-chunk-blocks", "64,0"], "--store-chunk-blocks"),
            (&["--tiers", ""], "--tiers"),
        ];
        for (args, flag) in cases {
            match parse(args) {
                // clap may refuse it itself (an empty list).
                Err(_) => assert_eq!(flag, "--tiers", "{args:?}"),
                Ok(a) => {
                    let e = a.check().unwrap_err().to_string();
                    assert!(e.contains(flag), "{args:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.5), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
        // 200 steps: p99 is the 198th smallest.
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), Some(198.0));
    }

    fn stats(ms_each: &[u64]) -> StepStats {
        let times: Vec<Duration> = ms_each.iter().map(|&m| Duration::from_millis(m)).collect();
        StepStats::of(&times).unwrap()
    }

    #[test]
    fn step_stats_and_ratios() {
        // Unsorted input; one slow step.
        let mut quiet: Vec<u64> = vec![10; 99];
        quiet.push(30);
        quiet.reverse();
        let q = stats(&quiet);
        assert_eq!(q.steps, 100);
        assert_eq!((q.p50_ms, q.p99_ms, q.max_ms), (10.0, 10.0, 30.0));
        assert!((q.mean_ms - 10.2).abs() < 1e-9);
        assert!((q.tokens_per_s() - 1000.0 / 10.2).abs() < 1e-9);
        let loaded = stats(&[12, 13, 14, 15, 60]);
        assert_eq!((loaded.p50_ms, loaded.p99_ms), (14.0, 60.0));
        assert!(StepStats::of(&[]).is_none());
        assert_eq!(ratio(14.0, 10.0), 1.4);
        assert_eq!(ratio(1.0, 0.0), 0.0);
        let row = Row::new(
            RowId {
                device: "cuda:0 H100".into(),
                model: "synthetic-llama3-8b".into(),
                context_tokens: 8192,
                tier: StoreTier::Hbm,
                engine_stream_priority: Some(-5),
                store_tokens: 16384,
                store_bytes_per_round: 2 << 30,
                store_chunk_blocks: 1024,
            },
            Measured {
                quiet: q,
                loaded: stats(&[11, 12, 12, 13]),
                store_gb_per_s: 100.0,
                store_request_gb_per_s: 120.0,
                store_rounds: 4,
                store_no_space: 0,
                landed: Some(proto::Tier::Hbm),
            },
        );
        assert!((row.ratio_p50 - 1.2).abs() < 1e-9);
        assert!((row.ratio_p99 - 1.3).abs() < 1e-9);
        assert_eq!(row.target_cell(), "p50 yes, p99 yes");
        let v = serde_json::to_value(&row).unwrap();
        assert_eq!(v["tier"], "hbm");
        assert_eq!(v["landed_tier"], "hbm");
        assert_eq!(v["engine_stream_priority"], -5);
        assert_eq!(v["quiet"]["p50_ms"], 10.0);
        assert_eq!(v["target_ratio"], 1.3);
        let mut off = row.clone();
        off.engine_stream_priority = None;
        off.ratio_p99 = 6.0;
        assert_eq!(off.target_cell(), "p50 yes, p99 no");
        let md = markdown_table(&[row, off]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4);
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])), "{md}");
        assert!(lines[2].contains("| on (-5) |") && lines[2].contains("| 1.20x |"));
        assert!(lines[3].contains("| off |") && lines[3].contains("p99 no"));
    }

    #[test]
    fn the_store_rate_counts_requests_within_the_decode() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let log = StoreLog {
            requests: vec![
                (at(5), 1_000_000_000),
                (at(500), 2_000_000_000),
                (at(1500), 7),
            ],
            busy: Duration::from_millis(1500),
            rounds: 2,
            ..Default::default()
        };
        // Only the request completed within 100..1100 ms counts: 2 GB in 1 s.
        assert!((log.gb_per_s_within(at(100), at(1100)) - 2.0).abs() < 1e-9);
        assert_eq!(log.gb_per_s_within(at(100), at(100)), 0.0);
        assert!((log.request_gb_per_s() - 3_000_000_007.0 / 1.5 / 1e9).abs() < 1e-9);
        assert_eq!(StoreLog::default().request_gb_per_s(), 0.0);
    }

    #[test]
    fn round_keys_are_fresh_per_salt() {
        assert_ne!(round_tokens(1, 16), round_tokens(2, 16));
        assert_eq!(round_tokens(3, 16), round_tokens(3, 16));
        assert_eq!(round_tokens(3, 16).len(), 16);
    }

    #[tokio::test]
    async fn the_cpu_device_is_refused_in_one_line() {
        let a = parse(&["--device", "cpu"]).unwrap();
        let e = run_interference(a, true).await.unwrap_err().to_string();
        assert!(e.contains("needs --device cuda"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // Argument errors come before any device is touched.
        let a = parse(&["--device", "cpu", "--steps", "0"]).unwrap();
        let e = run_interference(a, true).await.unwrap_err().to_string();
        assert!(e.contains("--steps"), "{e}");
    }
}
