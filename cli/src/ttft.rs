//! `kvstrata bench ttft`: time to first token against how much of the context is
//! cached, and in which tier, with an in-process daemon and the default model.
//!
//! For each context length it measures a full recompute (0 % cached), then prefills
//! with half and with all full blocks of the context cached — once served by the host
//! tier, once after the namespace was demoted to the disk tier. Every measurement
//! uses its own token sequence, so nothing is shared between rows by accident.
//!
//! With `--device cuda` (the default when a GPU is found) the engines run on the GPU
//! ([`run_ttft_gpu`]): the daemon is a `kvstrata serve` child process (a CUDA IPC
//! handle cannot be opened by the process that exported it), the engine's KV pool is
//! registered with it as a CUDA-IPC KV region, and a cached prefix is loaded by page
//! ids from the tier each row names: the daemon's HBM tier (where a store by page ids
//! lands), its page-locked host tier (after an evict) and its disk tier (after two).
//! Each context's rows share its tokens: the blocks are deleted after every row, and
//! every cached row's first token is checked against the recompute's.
//!
//! Load or recompute (`kvstrata_engine::load_policy`): every cached row is measured
//! with the policy `always` (the prefix is loaded, however slow its tier) and says
//! what `auto` would have chosen there, with the estimates (column "auto"). With
//! `--load-policy auto` (the default) or `never`, a GPU row whose choice under that
//! policy differs from loading everything is measured again under it (a second row
//! of the tier, its "policy" column naming it).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use kvstrata_client::BlockHash;
use kvstrata_engine::engine::{Engine, Prefill};
use kvstrata_engine::rag;
use kvstrata_engine::store::BlockStore;
use serde::Serialize;

use crate::demo::{LocalDaemon, tier_counts};
use crate::engine_verbs::{Device, DeviceArgs, GpuSetup, ModelArgs, load_model, ms};
use kvstrata_client::{Client, proto};
use kvstrata_engine::cuda::{CudaDevice, GpuEngine, GpuKvOptions, GpuPrefill, KvPath};
use kvstrata_engine::engine::PrefillTimings;
use kvstrata_engine::load_policy::{LoadChoice, LoadPolicy};
use kvstrata_gpucheck::ceilings::{CopyCeilings, cuda_copy_ceilings};
use std::sync::Arc;

/// `kvstrata bench ttft`.
#[derive(Debug, Clone, clap::Args)]
pub struct TtftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// With --device cuda: the HBM tier of the bench's daemon (0: none, stored
    /// blocks land in its page-locked host tier)
    #[arg(long, default_value = "8GiB")]
    pub gpu_hbm_bytes: ByteSize,
    /// With --device cuda: the host tier of the bench's daemon (page-locked)
    #[arg(long, default_value = "8GiB")]
    pub gpu_host_capacity: ByteSize,
    /// With --device cuda: the disk tier of the bench's daemon (its slot file
    /// goes in --data-dir)
    #[arg(long, default_value = "8GiB")]
    pub gpu_disk_size: ByteSize,
    /// With --device cuda: prompt tokens per forward chunk
    #[arg(long, default_value_t = 2048)]
    pub gpu_chunk: usize,
    /// Context lengths in tokens, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    pub contexts: Vec<usize>,
    /// Cached share of each context in percent, comma-separated (100: every full block)
    #[arg(long, value_delimiter = ',', default_value = "0,50,100")]
    pub cached: Vec<u32>,
    /// Skip the disk-tier rows
    #[arg(long)]
    pub no_disk: bool,
    /// Keep the daemon's files here [default: a temporary directory]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the table as Markdown (for docs/benchmarks.md)
    #[arg(long)]
    pub markdown: bool,
    /// Print JSON instead of a table (as the global `--json`, which goes before `bench`)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    context_tokens: usize,
    tier: &'static str,
    cached_percent: u32,
    reused_tokens: usize,
    computed_tokens: usize,
    ttft_ms: f64,
    load_ms: f64,
    load_share: f64,
    speedup: f64,
    prefill_tokens_per_s: f64,
    /// GPU rows: the device, how KV moved, the load's rate, and whether the
    /// first token is the recompute's.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_path: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_gb_per_s: Option<f64>,
    /// The load's GB/s over the ceiling of its path measured in the same
    /// run: the device copy (bytes copied) from the HBM tier, the pinned
    /// host-to-device copy from the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_of_ceiling: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ceiling_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    same_first_token: Option<bool>,
    /// Cached rows: the load policy the row ran under, what `auto` picks
    /// (`load`, `recompute`, `load k/m` blocks) and its estimated TTFTs.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_policy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_choice: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    estimated_load_all_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    estimated_recompute_ms: Option<f64>,
}

impl Row {
    /// The "load GB/s" cell: the rate, and its share of the same run's
    /// ceiling when one was measured (`445.1 (0.30)`).
    fn load_rate_cell(&self) -> String {
        match (self.load_gb_per_s, self.load_of_ceiling) {
            (Some(g), Some(c)) => format!("{g:.1} ({c:.2})"),
            (Some(g), None) => format!("{g:.1}"),
            _ => "-".to_string(),
        }
    }

    /// Sets the load's share of the ceiling of its tier's path (`ceilings`
    /// measured in the same run): the device copy from the HBM tier, the
    /// pinned host-to-device copy from the others.
    fn with_ceiling(mut self, ceilings: Option<&CopyCeilings>) -> Self {
        if let (Some(g), Some(c)) = (self.load_gb_per_s, ceilings) {
            let ceiling = match self.tier {
                "hbm" => c.d2d_copied(),
                _ => c.h2d,
            };
            if ceiling > 0.0 {
                self.load_of_ceiling = Some(g / ceiling);
                self.ceiling_gb_per_s = Some(ceiling);
            }
        }
        self
    }

    /// Adds the policy a cached row ran under and what `auto` chose.
    fn with_choice(mut self, policy: LoadPolicy, choice: Option<&LoadChoice>) -> Self {
        self.load_policy = Some(policy.name());
        if let Some(c) = choice {
            self.auto_choice = Some(c.auto_label());
            self.estimated_load_all_ms = c.load_all_ms;
            self.estimated_recompute_ms = c.recompute_ms;
        }
        self
    }

    /// The "auto" cell: the choice and the estimates it weighed.
    fn auto_cell(&self) -> String {
        let Some(choice) = &self.auto_choice else {
            return "-".into();
        };
        match (self.estimated_load_all_ms, self.estimated_recompute_ms) {
            (Some(l), Some(r)) => format!("{choice} (est. load {l:.0} / recompute {r:.0} ms)"),
            _ => format!("{choice} (no compute estimate yet)"),
        }
    }
}

/// `n` tokens of the shipped documents, starting with a marker unique to `run`.
pub(crate) fn context(
    model: &kvstrata_engine::engine::LoadedModel,
    run: usize,
    n: usize,
) -> anyhow::Result<Vec<u32>> {
    let mut text = format!("Session {run}.\n");
    while text.len() < n * 8 {
        text.push_str(&rag::documents_text());
    }
    let tokens = model.tokenizer.encode(&text)?;
    if tokens.len() < n {
        bail!("the documents give only {} tokens, {n} asked", tokens.len());
    }
    Ok(tokens[..n].to_vec())
}

/// `kvstrata bench ttft`.
pub async fn run_ttft(args: TtftArgs, json: bool) -> anyhow::Result<()> {
    if args.contexts.is_empty() || args.contexts.iter().any(|&c| c < 2) {
        bail!("--contexts: every context must be at least 2 tokens");
    }
    if args.cached.iter().any(|&p| p > 100) {
        bail!("--cached: percentages are 0 to 100");
    }
    if let Device::Cuda(dev) = args.device.resolve(args.model.quiet || json)? {
        return run_ttft_gpu(args, dev, json).await;
    }
    let model = tokio::task::block_in_place(|| load_model(&args.model))?;
    let max = model.model.config().max_context;
    if let Some(c) = args.contexts.iter().find(|&&c| c >= max) {
        bail!("--contexts: {c} tokens is beyond the model's context of {max}");
    }
    let local =
        LocalDaemon::start(args.data_dir.as_deref(), ByteSize::gib(2), ByteSize::gib(4)).await?;
    let mut options = local.engine_options(&args.model);
    // Cached rows measure the load; each says what `auto` would choose.
    options.load_policy = LoadPolicy::Always;
    let engine = Engine::connect(model.clone(), local.client.clone(), &options).await?;
    let recompute = Engine::local(model.clone(), &options)?;
    let bt = options.block_tokens;
    let mut tiers = vec!["host"];
    if local.disk && !args.no_disk {
        tiers.push("disk");
    }
    let mut rows = Vec::new();
    let mut run = 0;
    let quiet = args.model.quiet || json;
    for &n in &args.contexts {
        run += 1;
        let tokens = context(&model, run, n)?;
        let base = recompute.prefill(&tokens, &mut |_, _| {}).await?;
        let base_ttft = base.timings.ttft;
        for &pct in &args.cached {
            if pct == 0 {
                rows.push(row(n, "-", 0, &base, base_ttft));
                if !quiet {
                    eprintln!("{n} tokens, 0% cached: {:.0} ms", ms(base_ttft));
                }
                continue;
            }
            for &tier in &tiers {
                run += 1;
                let tokens = context(&model, run, n)?;
                // Warm: store the cached share's blocks (100: every full block).
                let warm_blocks = ((n * pct as usize / 100) / bt).min((n - 1) / bt);
                let warm_len = if pct == 100 {
                    n
                } else {
                    (warm_blocks * bt).max(1)
                };
                engine.prefill(&tokens[..warm_len], &mut |_, _| {}).await?;
                let store = engine.store().context("engine without a store")?;
                if tier == "disk" {
                    demote_to_disk(&local, store, &store.keys(&tokens)).await?;
                }
                let p = engine.prefill(&tokens, &mut |_, _| {}).await?;
                let r = row(n, tier, pct, &p, base_ttft)
                    .with_choice(LoadPolicy::Always, p.load_choice.as_ref());
                if !quiet {
                    eprintln!(
                        "{n} tokens, {pct}% cached in {tier}: {:.0} ms ({} reused)",
                        r.ttft_ms, r.reused_tokens
                    );
                }
                rows.push(r);
            }
        }
    }
    local.stop().await?;
    print_rows(&rows, json, args.markdown)
}

fn print_rows(rows: &[Row], json: bool, markdown: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if markdown {
        print!("{}", markdown_table(rows));
    } else {
        let gpu = rows.iter().any(|r| r.load_gb_per_s.is_some());
        let policy = rows.iter().any(|r| r.load_policy.is_some());
        let mut header = vec![
            "context",
            "tier",
            "cached",
            "reused",
            "TTFT",
            "load",
            "load share",
            "speed-up",
            "prefill tok/s",
        ];
        if gpu {
            header.insert(6, "load GB/s");
            header.push("same first token");
        }
        if policy {
            header.insert(2, "policy");
            header.push("auto");
        }
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(header);
        for r in rows {
            let mut cells = vec![
                r.context_tokens.to_string(),
                r.tier.to_string(),
                format!("{}%", r.cached_percent),
                r.reused_tokens.to_string(),
                format!("{:.1} ms", r.ttft_ms),
                format!("{:.1} ms", r.load_ms),
                format!("{:.1}%", r.load_share * 100.0),
                format!("{:.1}x", r.speedup),
                format!("{:.0}", r.prefill_tokens_per_s),
            ];
            if gpu {
                cells.insert(6, r.load_rate_cell());
                cells.push(same_label(r.same_first_token).to_string());
            }
            if policy {
                cells.insert(2, r.load_policy.unwrap_or("-").to_string());
                cells.push(r.auto_cell());
            }
            table.add_row(cells);
        }
        println!("{table}");
    }
    Ok(())
}

fn same_label(same: Option<bool>) -> &'static str {
    match same {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

/// The Markdown table of `rows` (for docs/benchmarks.md); GPU rows add the
/// load's GB/s and the first-token check; cached rows the load policy they ran
/// under and what `auto` chose.
fn markdown_table(rows: &[Row]) -> String {
    let gpu = rows.iter().any(|r| r.load_gb_per_s.is_some());
    let policy = rows.iter().any(|r| r.load_policy.is_some());
    let (pol_head, pol_rule) = match policy {
        true => (" policy |", "---|"),
        false => ("", ""),
    };
    let (auto_head, auto_rule) = match policy {
        true => (" auto |", "---|"),
        false => ("", ""),
    };
    let mut out = String::new();
    if gpu {
        out.push_str(&format!("| context | tier |{pol_head} cached | reused tokens | TTFT ms | cache load ms | load GB/s | load share | speed-up | prefill tok/s | same first token |{auto_head}\n"));
        out.push_str(&format!(
            "|---:|---|{pol_rule}---:|---:|---:|---:|---:|---:|---:|---:|---|{auto_rule}\n"
        ));
    } else {
        out.push_str(&format!("| context | tier |{pol_head} cached | reused tokens | TTFT ms | cache load ms | load share | speed-up | prefill tok/s |{auto_head}\n"));
        out.push_str(&format!(
            "|---:|---|{pol_rule}---:|---:|---:|---:|---:|---:|---:|{auto_rule}\n"
        ));
    }
    for r in rows {
        let pol = match policy {
            true => format!(" {} |", r.load_policy.unwrap_or("-")),
            false => String::new(),
        };
        let auto = match policy {
            true => format!(" {} |", r.auto_cell()),
            false => String::new(),
        };
        let head = format!(
            "| {} | {} |{pol} {}% | {} | {:.1} | {:.1} |",
            r.context_tokens, r.tier, r.cached_percent, r.reused_tokens, r.ttft_ms, r.load_ms
        );
        let tail = format!(
            " {:.1}% | {:.1}x | {:.0} |",
            r.load_share * 100.0,
            r.speedup,
            r.prefill_tokens_per_s
        );
        if gpu {
            let same = same_label(r.same_first_token);
            let gbps = r.load_rate_cell();
            out.push_str(&format!("{head} {gbps} |{tail} {same} |{auto}\n"));
        } else {
            out.push_str(&format!("{head}{tail}{auto}\n"));
        }
    }
    out
}

fn row(n: usize, tier: &'static str, pct: u32, p: &Prefill, base: Duration) -> Row {
    timing_row(
        n,
        tier,
        pct,
        p.reused_tokens,
        p.computed_tokens,
        &p.timings,
        base,
    )
}

fn timing_row(
    n: usize,
    tier: &'static str,
    pct: u32,
    reused_tokens: usize,
    computed_tokens: usize,
    t: &PrefillTimings,
    base: Duration,
) -> Row {
    let ttft = t.ttft.as_secs_f64();
    let compute = t.compute.as_secs_f64();
    Row {
        context_tokens: n,
        tier,
        cached_percent: pct,
        reused_tokens,
        computed_tokens,
        ttft_ms: ms(t.ttft),
        load_ms: ms(t.load),
        load_share: if ttft > 0.0 {
            t.load.as_secs_f64() / ttft
        } else {
            0.0
        },
        speedup: if ttft > 0.0 {
            base.as_secs_f64() / ttft
        } else {
            0.0
        },
        prefill_tokens_per_s: if compute > 0.0 {
            computed_tokens as f64 / compute
        } else {
            0.0
        },
        device: None,
        kv_path: None,
        load_gb_per_s: None,
        load_of_ceiling: None,
        ceiling_gb_per_s: None,
        same_first_token: None,
        load_policy: None,
        auto_choice: None,
        estimated_load_all_ms: None,
        estimated_recompute_ms: None,
    }
}

/// Demotes the namespace to disk and waits until the chain's blocks are served from there.
async fn demote_to_disk(
    local: &LocalDaemon,
    store: &BlockStore,
    keys: &[BlockHash],
) -> anyhow::Result<()> {
    let no_keys: &[&[u8]] = &[];
    local
        .client
        .evict(store.namespace_id(), no_keys, true)
        .await?;
    for _ in 0..200 {
        let (_, tiers) = store.lookup(keys).await?;
        if tier_counts(&tiers).0 == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("blocks did not move to the disk tier after an evict")
}

/// The daemon tiers a GPU row's prefix is served from, fastest first.
const GPU_TIERS: [(&str, proto::Tier); 3] = [
    ("hbm", proto::Tier::Hbm),
    ("host", proto::Tier::Host),
    ("disk", proto::Tier::Disk),
];

fn tier_rank(t: proto::Tier) -> Option<usize> {
    GPU_TIERS.iter().position(|(_, x)| *x == t)
}

/// What to do so that every block of a prefix (their tiers, from `Lookup`)
/// is served from `want`.
#[derive(Debug, PartialEq, Eq)]
enum Demote {
    /// Every block is in `want`.
    Done,
    /// Demote these blocks (indices) one tier.
    Evict(Vec<usize>),
    /// A block is missing or below `want`: the row cannot be measured.
    Unreachable,
}

fn demote_plan(tiers: &[proto::Tier], want: proto::Tier) -> Demote {
    let Some(w) = tier_rank(want) else {
        return Demote::Unreachable;
    };
    let mut faster = Vec::new();
    for (i, t) in tiers.iter().enumerate() {
        match tier_rank(*t) {
            Some(r) if r < w => faster.push(i),
            Some(r) if r == w => {}
            _ => return Demote::Unreachable,
        }
    }
    if faster.is_empty() {
        Demote::Done
    } else {
        Demote::Evict(faster)
    }
}

/// Demotes `keys` (evicting those in a faster tier) until all are served
/// from `want`; false when that cannot happen (no such tier, blocks lost).
async fn move_to_tier(
    client: &Client,
    store: &BlockStore,
    keys: &[BlockHash],
    want: proto::Tier,
) -> anyhow::Result<bool> {
    // Demotions to disk are queued: poll, evicting again what is still faster.
    for _ in 0..500 {
        let (matched, tiers) = store.lookup(keys).await?;
        if matched < keys.len() {
            return Ok(false);
        }
        match demote_plan(&tiers, want) {
            Demote::Done => return Ok(true),
            Demote::Unreachable => return Ok(false),
            Demote::Evict(idx) => {
                let faster: Vec<&[u8]> = idx.iter().map(|&i| &keys[i][..]).collect();
                client.evict(store.namespace_id(), &faster, false).await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}

/// Bytes of each buffer of the copy ceilings `bench ttft --device cuda`
/// measures (large enough for the links' steady rate, small beside a 128k
/// prompt's KV).
const CEILING_BYTES: u64 = 256 << 20;

/// Bytes per second of a load of `blocks` blocks of `block_bytes`, in GB/s.
fn gb_per_s(blocks: usize, block_bytes: usize, load: Duration) -> Option<f64> {
    let s = load.as_secs_f64();
    (blocks > 0 && s > 0.0).then(|| (blocks * block_bytes) as f64 / s / 1e9)
}

/// The GPU benches' daemon: a `kvstrata serve` child process on `dev` (a CUDA
/// IPC handle cannot be opened by the process that exported it) with an HBM
/// tier of `hbm` bytes (0: none), a page-locked host tier of `host` bytes and,
/// when `disk` names a slot file and its size and the tier can be made there,
/// a disk tier (the `bool`: whether it has one). The child inherits this
/// process's environment (`KVSTRATA_GPU_*`).
pub(crate) fn start_gpu_daemon(
    dev: &CudaDevice,
    hbm: ByteSize,
    host: ByteSize,
    disk: Option<(PathBuf, ByteSize)>,
) -> anyhow::Result<(kvstrata_gpucheck::ipc::DaemonChild, bool)> {
    let daemon_args: Vec<String> = vec![
        "--gpu".into(),
        "on".into(),
        "--gpu-device".into(),
        dev.info().ordinal.to_string(),
        "--gpu-hbm-bytes".into(),
        hbm.as_u64().to_string(),
        "--host-capacity".into(),
        host.as_u64().to_string(),
        "--log-level".into(),
        "warn".into(),
    ];
    tokio::task::block_in_place(|| {
        if let Some((slots, size)) = &disk {
            let mut with_disk = daemon_args.clone();
            with_disk.extend([
                "--disk-path".into(),
                format!("{}={}", slots.display(), size.as_u64()),
            ]);
            match kvstrata_gpucheck::ipc::DaemonChild::start(&with_disk) {
                Ok(d) => return Ok((d, true)),
                Err(e) => eprintln!(
                    "note: no disk tier in {} ({e})",
                    slots.parent().unwrap_or(slots.as_path()).display()
                ),
            }
        }
        kvstrata_gpucheck::ipc::DaemonChild::start(&daemon_args).map(|d| (d, false))
    })
    .map_err(|e| anyhow::anyhow!("starting the bench's daemon: {e}"))
}

/// A client of `daemon` and the sockets a GPU engine registers its KV pool on.
pub(crate) async fn connect_gpu_daemon(
    daemon: &kvstrata_gpucheck::ipc::DaemonChild,
) -> anyhow::Result<(Client, GpuKvOptions)> {
    let client = Client::connect(&format!("unix://{}", daemon.uds().display())).await?;
    let options = GpuKvOptions {
        region_socket: Some(daemon.regions().display().to_string()),
        mempool_socket: Some(daemon.mempool().display().to_string()),
    };
    Ok((client, options))
}

/// `kvstrata bench ttft --device cuda`: see the module docs.
pub async fn run_ttft_gpu(args: TtftArgs, dev: Arc<CudaDevice>, json: bool) -> anyhow::Result<()> {
    let quiet = args.model.quiet || json;
    let bt = args.model.block_tokens;
    let longest = args.contexts.iter().copied().max().unwrap_or(2);
    // The ceilings the loads are put against, measured in this run before
    // anything else takes the device's memory.
    let ceilings =
        tokio::task::block_in_place(|| cuda_copy_ceilings(dev.info().ordinal, CEILING_BYTES, 10));
    let ceilings = match ceilings {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("note: no copy ceilings measured ({e}); load rates without ratios");
            None
        }
    };
    let setup = tokio::task::block_in_place(|| {
        GpuSetup::load(
            &dev,
            &args.model,
            args.device.synthetic.as_deref(),
            longest + bt,
            args.gpu_chunk.max(1),
        )
    })?;
    let max = setup.model.max_positions();
    if longest >= max {
        bail!("--contexts: {longest} tokens is beyond the model's context of {max}");
    }
    // Two sequences of the longest context at once (the measured one and the
    // one being dropped), and a margin.
    let pages = 2 * (longest / bt + 2);
    let pool = setup.model.kv_pool(bt, pages)?;
    let block_bytes = pool.geometry().block_bytes();
    // The daemon: another process (CUDA IPC), on this GPU.
    let data = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            None
        }
        None => Some(tempfile::tempdir().context("creating a temporary directory")?),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| data.as_ref().map(|d| d.path().to_path_buf()))
        .context("no data directory")?;
    let slots = data_dir.join("kvstrata-slots.bin");
    let want_disk = !args.no_disk && args.gpu_disk_size.as_u64() > 0;
    let disk_tier = want_disk.then_some((slots, args.gpu_disk_size));
    let (daemon, disk) =
        start_gpu_daemon(&dev, args.gpu_hbm_bytes, args.gpu_host_capacity, disk_tier)?;
    let (client, options) = connect_gpu_daemon(&daemon).await?;
    let engine = GpuEngine::connect(
        Arc::clone(&setup.model),
        Arc::clone(&pool),
        client.clone(),
        setup.spec.clone(),
        &options,
    )
    .await?
    .with_load_policy(LoadPolicy::Always);
    // Cached rows measure the load (`always`); a second row runs under the
    // flag's policy where its choice differs.
    let extra_policy = match args.device.load_policy {
        LoadPolicy::Always => None,
        p => Some(p),
    };
    let store = engine.store().context("engine without a store")?;
    let kv_path = store.path();
    if let Some(note) = store.path_note() {
        eprintln!("note: {note}");
    } else if !quiet {
        eprintln!(
            "{}: KV pool of {pages} pages ({:.1} GiB) registered with the daemon as CUDA-IPC region {}",
            setup.name,
            (pages * block_bytes) as f64 / (1u64 << 30) as f64,
            store.region_id().unwrap_or(0)
        );
    }
    let recompute = GpuEngine::local(Arc::clone(&setup.model), Arc::clone(&pool));
    let tokens_of = |run: usize, n: usize| -> anyhow::Result<Vec<u32>> {
        match (&setup.synthetic, &setup.loaded) {
            (Some(m), _) => Ok(m.prompt(n, run as u64)),
            (None, Some(loaded)) => context(loaded, run, n),
            (None, None) => bail!("no model"),
        }
    };
    let mut tiers: Vec<(&'static str, proto::Tier)> = Vec::new();
    for (name, t) in GPU_TIERS {
        let wanted = match t {
            proto::Tier::Hbm => kv_path == KvPath::GpuPages && args.gpu_hbm_bytes.as_u64() > 0,
            proto::Tier::Disk => disk,
            _ => true,
        };
        if wanted {
            tiers.push((name, t));
        }
    }
    // Warm-up: kernels loaded, cuBLAS's choices made for the chunk sizes;
    // then the cached path from each memory tier (the daemon's first copies
    // and the engine's short chunks after a prefix: one token after whole
    // blocks, and a whole block recomputed when every block is cached), so
    // that the first row measured does not pay for them (CUDA loads a
    // kernel at its first launch; its load estimates start from these).
    let warm = tokens_of(0, longest.min(args.gpu_chunk.max(1)) + 1)?;
    let whole = &warm[..warm.len() - 1];
    recompute.prefill(&warm).await?;
    let warm_keys = store.keys(&warm);
    drop(engine.prefill(&warm).await?);
    for &(_, want) in tiers.iter().filter(|(_, t)| *t != proto::Tier::Disk) {
        if move_to_tier(&client, store.block_store(), &warm_keys, want).await? {
            drop(engine.prefill(&warm).await?);
            drop(engine.prefill(whole).await?);
        }
    }
    client
        .delete(store.block_store().namespace_id(), &warm_keys)
        .await?;
    let device = format!("cuda:{} {}", dev.info().ordinal, dev.info().name);
    let mut rows = Vec::new();
    for (run, &n) in args.contexts.iter().enumerate() {
        let tokens = tokens_of(run + 1, n)?;
        // Recompute: best of two.
        let mut base: Option<GpuPrefill> = None;
        for _ in 0..2 {
            let p = recompute.prefill(&tokens).await?;
            if base
                .as_ref()
                .is_none_or(|b| p.timings.ttft < b.timings.ttft)
            {
                base = Some(p);
            }
        }
        let base = base.context("no recompute")?;
        let base_ttft = base.timings.ttft;
        let base_token = base.handoff.first_token;
        drop(base);
        let keys = store.keys(&tokens);
        for &pct in &args.cached {
            if pct == 0 {
                let mut r = timing_row(
                    n,
                    "-",
                    0,
                    0,
                    n,
                    &PrefillTimings {
                        ttft: base_ttft,
                        compute: base_ttft,
                        ..Default::default()
                    },
                    base_ttft,
                );
                r.device = Some(device.clone());
                rows.push(r);
                if !quiet {
                    eprintln!("{n} tokens, 0% cached: {:.1} ms", ms(base_ttft));
                }
                continue;
            }
            // Warm once: store the cached share's blocks (100: every full block);
            // each tier's row then moves them one tier further down.
            let warm_blocks = ((n * pct as usize / 100) / bt).min((n - 1) / bt);
            let warm_len = if pct == 100 {
                n
            } else {
                (warm_blocks * bt).max(1)
            };
            drop(engine.prefill(&tokens[..warm_len]).await?);
            let ns = store.block_store().namespace_id();
            let stored = &keys[..warm_blocks.min(keys.len())];
            // What a measured prefill stored beyond the cached share.
            let beyond = &keys[stored.len()..];
            let forget_beyond = || async {
                match beyond.is_empty() {
                    true => Ok(()),
                    false => client.delete(ns, beyond).await.map(drop),
                }
            };
            forget_beyond().await?;
            for &(tier, want) in &tiers {
                let mut policies = vec![LoadPolicy::Always];
                let mut next = 0;
                while let Some(&policy) = policies.get(next) {
                    next += 1;
                    if !move_to_tier(&client, store.block_store(), stored, want).await? {
                        eprintln!(
                            "{n} tokens, {pct}% cached: the blocks cannot be served from the {tier} tier; row skipped"
                        );
                        break;
                    }
                    let p = engine.prefill_with_policy(&tokens, policy).await?;
                    forget_beyond().await?;
                    let mut r = timing_row(
                        n,
                        tier,
                        pct,
                        p.reused_tokens,
                        p.computed_tokens,
                        &p.timings,
                        base_ttft,
                    )
                    .with_choice(policy, p.load_choice.as_ref());
                    r.device = Some(device.clone());
                    r.kv_path = Some(kv_path.name());
                    r.load_gb_per_s = gb_per_s(p.reused_tiers.len(), block_bytes, p.timings.load);
                    let mut r = r.with_ceiling(ceilings.as_ref());
                    r.same_first_token = Some(p.handoff.first_token == base_token);
                    if let (LoadPolicy::Always, Some(extra), Some(c)) =
                        (policy, extra_policy, &p.load_choice)
                    {
                        let differs = match extra {
                            LoadPolicy::Auto => c.auto_blocks != c.matched_blocks,
                            LoadPolicy::Never => c.matched_blocks > 0,
                            LoadPolicy::Always => false,
                        };
                        if differs {
                            policies.push(extra);
                        }
                    }
                    drop(p);
                    if !quiet {
                        eprintln!(
                            "{n} tokens, {pct}% cached in {tier}, {policy}: {:.1} ms ({} reused, load {:.1} ms, {:.1} GB/s; auto: {})",
                            r.ttft_ms,
                            r.reused_tokens,
                            r.load_ms,
                            r.load_gb_per_s.unwrap_or(0.0),
                            r.auto_cell()
                        );
                    }
                    rows.push(r);
                }
            }
            client.delete(ns, &keys).await?;
        }
    }
    drop(engine);
    drop(daemon);
    if let (Some(c), false) = (&ceilings, json) {
        println!(
            "Copy ceilings in this run ({} MiB, median of 10): pinned H2D {:.1} GB/s, device copy \
             {:.0} GB/s of bytes copied ({:.0} read + written); the load GB/s column gives each \
             load's share of the ceiling of its path (HBM: the device copy; host, disk: pinned H2D).\n",
            CEILING_BYTES >> 20,
            c.h2d,
            c.d2d_copied(),
            c.d2d
        );
    }
    print_rows(&rows, json, args.markdown)?;
    if rows.iter().any(|r| r.same_first_token == Some(false)) {
        bail!("a cached prefix gave another first token than the full recompute");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ttft: TtftArgs,
    }

    #[test]
    fn loads_are_put_against_the_ceiling_of_their_path() {
        let c = CopyCeilings {
            h2d: 50.0,
            d2h: 49.0,
            d2d: 3000.0,
        };
        let t = PrefillTimings::default();
        let mut hbm = timing_row(8192, "hbm", 100, 8176, 16, &t, Duration::from_millis(300));
        hbm.load_gb_per_s = Some(750.0);
        let hbm = hbm.with_ceiling(Some(&c));
        assert_eq!(hbm.load_of_ceiling, Some(0.5));
        assert_eq!(hbm.ceiling_gb_per_s, Some(1500.0));
        assert_eq!(hbm.load_rate_cell(), "750.0 (0.50)");
        let mut host = timing_row(8192, "host", 100, 8176, 16, &t, Duration::from_millis(300));
        host.load_gb_per_s = Some(45.0);
        assert_eq!(
            host.clone().with_ceiling(Some(&c)).load_rate_cell(),
            "45.0 (0.90)"
        );
        // No ceiling measured, or no load: the rate alone, or nothing.
        assert_eq!(host.with_ceiling(None).load_rate_cell(), "45.0");
        let recompute = timing_row(8192, "-", 0, 0, 8192, &t, Duration::from_millis(300));
        assert_eq!(recompute.with_ceiling(Some(&c)).load_rate_cell(), "-");
        let md = markdown_table(&[hbm]);
        assert!(md.contains("| 750.0 (0.50) |"), "{md}");
    }

    #[test]
    fn gpu_arguments_parse() {
        let a = Cli::try_parse_from([
            "ttft",
            "--device",
            "cuda:1",
            "--synthetic",
            "llama3-8b",
            "--contexts",
            "2048,8192,32768",
            "--gpu-hbm-bytes",
            "0",
        ])
        .unwrap()
        .ttft;
        assert_eq!(
            a.device.device,
            Some(kvstrata_engine::cuda::DeviceChoice::Cuda(1))
        );
        assert_eq!(a.device.synthetic.as_deref(), Some("llama3-8b"));
        assert_eq!(a.contexts, vec![2048, 8192, 32768]);
        assert_eq!(a.gpu_hbm_bytes.as_u64(), 0);
        assert_eq!(a.gpu_chunk, 2048);
        assert_eq!(a.device.load_policy, LoadPolicy::Auto);
        let a = Cli::try_parse_from(["ttft", "--load-policy", "never"])
            .unwrap()
            .ttft;
        assert_eq!(a.device.load_policy, LoadPolicy::Never);
        assert!(Cli::try_parse_from(["ttft", "--load-policy", "maybe"]).is_err());
        let a = Cli::try_parse_from(["ttft"]).unwrap().ttft;
        assert_eq!(a.device.device, None);
        assert!(Cli::try_parse_from(["ttft", "--device", "gpu"]).is_err());
    }

    #[test]
    fn rows_reach_their_tier_by_evicting_the_faster_blocks() {
        use proto::Tier::{Disk, Hbm, Host};
        assert_eq!(demote_plan(&[Hbm, Hbm], Hbm), Demote::Done);
        assert_eq!(
            demote_plan(&[Hbm, Host, Hbm], Host),
            Demote::Evict(vec![0, 2])
        );
        assert_eq!(demote_plan(&[Host, Disk], Disk), Demote::Evict(vec![0]));
        assert_eq!(demote_plan(&[Host, Disk], Host), Demote::Unreachable);
        assert_eq!(
            demote_plan(&[proto::Tier::Unspecified], Host),
            Demote::Unreachable
        );
        assert_eq!(demote_plan(&[], Disk), Demote::Done);
    }

    fn gpu_row() -> Row {
        let t = PrefillTimings {
            lookup: Duration::from_millis(1),
            load: Duration::from_millis(4),
            compute: Duration::from_millis(5),
            ttft: Duration::from_millis(10),
            store: Duration::ZERO,
        };
        let mut r = timing_row(8192, "host", 100, 8176, 16, &t, Duration::from_millis(400));
        r.device = Some("cuda:0 H100".into());
        r.kv_path = Some(KvPath::GpuPages.name());
        r.load_gb_per_s = gb_per_s(511, 2 << 20, t.load);
        r.same_first_token = Some(true);
        r
    }

    #[test]
    fn gpu_rows_carry_the_load_rate_and_the_token_check() {
        let r = gpu_row();
        assert!((r.speedup - 40.0).abs() < 1e-9);
        assert!((r.load_share - 0.4).abs() < 1e-9);
        let gbps = r.load_gb_per_s.unwrap();
        assert!(
            (gbps - 511.0 * 2097152.0 / 0.004 / 1e9).abs() < 1e-6,
            "{gbps}"
        );
        assert_eq!(gb_per_s(0, 10, Duration::from_millis(1)), None);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kv_path"], "gpu-pages");
        assert_eq!(v["same_first_token"], true);
        assert_eq!(v["tier"], "host");
        // CPU rows keep their JSON: no GPU fields.
        let mut cpu = gpu_row();
        cpu.device = None;
        cpu.kv_path = None;
        cpu.load_gb_per_s = None;
        cpu.same_first_token = None;
        let v = serde_json::to_value(&cpu).unwrap();
        assert!(v.get("kv_path").is_none() && v.get("load_gb_per_s").is_none());
        let md = markdown_table(&[r]);
        assert!(md.contains("load GB/s") && md.contains("| yes |"), "{md}");
        let md = markdown_table(&[cpu]);
        assert!(!md.contains("load GB/s"), "{md}");
    }

    #[test]
    fn cached_rows_say_their_policy_and_what_auto_chose() {
        let choice = LoadChoice {
            policy: LoadPolicy::Always,
            matched_blocks: 127,
            load_blocks: 127,
            auto_blocks: 0,
            load_all_ms: Some(428.4),
            recompute_ms: Some(58.2),
            auto_ms: Some(58.2),
            probe: false,
        };
        let r = gpu_row().with_choice(LoadPolicy::Always, Some(&choice));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["load_policy"], "always");
        assert_eq!(v["auto_choice"], "recompute");
        assert_eq!(v["estimated_recompute_ms"], 58.2);
        let base = timing_row(
            8192,
            "-",
            0,
            0,
            8192,
            &PrefillTimings::default(),
            Duration::from_millis(1),
        );
        let mut auto = gpu_row().with_choice(LoadPolicy::Auto, None);
        auto.tier = "disk";
        let md = markdown_table(&[base, r, auto]);
        let lines: Vec<&str> = md.lines().collect();
        assert!(lines[0].contains("| tier | policy | cached |") && lines[0].ends_with("| auto |"));
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])), "{md}");
        assert!(
            lines[2].contains("| - | 0% |") && lines[2].ends_with("| - |"),
            "{md}"
        );
        assert!(
            lines[3].contains("| always |")
                && lines[3].contains("recompute (est. load 428 / recompute 58 ms)"),
            "{md}"
        );
        assert!(
            lines[4].contains("| auto |") && lines[4].ends_with("| - |"),
            "{md}"
        );
        // CPU rows get the same two columns.
        let mut cpu = gpu_row().with_choice(LoadPolicy::Always, Some(&choice));
        cpu.load_gb_per_s = None;
        let md = markdown_table(&[cpu]);
        assert!(
            md.contains("| policy |") && md.contains("| recompute (est."),
            "{md}"
        );
    }
}
