//! `kvstrata demo` and `kvstrata bench ttft`: an in-process daemon with embedded
//! defaults, the default model, and the engines running through it.
//!
//! The demo runs a multi-turn RAG conversation (documents shipped in
//! `engine/data/rag/`) and prints, per turn, how much of the context came from the
//! cache and what that did to the time to first token, next to a full recompute.
//! The recompute (a whole prefill of the context without the cache, then its greedy
//! answer) runs on the last turn by default, where the context is longest; it checks
//! that the cached path gives the same first token and the same answer.
//! `--baseline-every-turn` measures it on every turn (on a 2-core CPU that is about one
//! full prefill more per turn).
//!
//! With `--device cuda` (the default when a GPU is found) the engines run on the GPU:
//! the daemon is a `kvstrata serve` child process with an HBM tier, the engine's KV
//! pool is registered with it as a CUDA-IPC KV region, and blocks move by page ids
//! (`kvstrata_engine::cuda::GpuEngine`); the turns and the checks are the same.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use kvstrata_client::{Client, proto};
use kvstrata_engine::chat::Conversation;
use kvstrata_engine::cuda::{CudaDevice, GpuEngine, GpuKvOptions};
use kvstrata_engine::engine::{Engine, EngineOptions, LoadedModel};
use kvstrata_engine::rag;
use kvstrata_engine::sampling::SamplingParams;
use kvstrata_server::{Config, Daemon};
use serde::Serialize;

use crate::engine_verbs::{Device, DeviceArgs, GpuSetup, ModelArgs, load_model, ms, prefill_bar};

/// `kvstrata demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// With --device cuda: the HBM tier of the demo daemon (0: none)
    #[arg(long, default_value = "64MiB")]
    pub gpu_hbm_bytes: ByteSize,
    /// Keep the demo daemon's files (disk tier, index, sockets) here
    /// [default: a temporary directory removed at exit]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Host-tier capacity of the demo daemon (small, so earlier turns move to disk)
    #[arg(long, default_value = "24MiB")]
    pub host_capacity: ByteSize,
    /// Disk-tier size of the demo daemon (0: no disk tier)
    #[arg(long, default_value = "1GiB")]
    pub disk_size: ByteSize,
    /// User turns to run (at most the shipped questions)
    #[arg(long, default_value_t = 6)]
    pub turns: usize,
    /// Tokens generated per answer (greedy)
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Skip the full-recompute baseline (no speed-up column)
    #[arg(long)]
    pub no_baseline: bool,
    /// Measure the full-recompute baseline on every turn, not only the last one
    #[arg(long, conflicts_with = "no_baseline")]
    pub baseline_every_turn: bool,
}

/// A daemon in this process, with a Unix socket, a mempool socket and (when it can
/// start one) a disk tier, all under one directory.
pub struct LocalDaemon {
    pub daemon: Daemon,
    pub client: Client,
    pub mempool: String,
    pub disk: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl LocalDaemon {
    /// Starts it; a disk tier that cannot start (e.g. no O_DIRECT on a tmpfs) leaves a
    /// host-only daemon and a warning.
    pub async fn start(
        data_dir: Option<&Path>,
        host_capacity: ByteSize,
        disk_size: ByteSize,
    ) -> anyhow::Result<Self> {
        let (dir, tmp) = match data_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (d.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("kvstrata-demo-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut config = Config::default();
        config.server.tcp_addr = String::new();
        config.server.metrics_addr = String::new();
        config.server.uds_path = dir.join("kvstrata.sock").display().to_string();
        config.shm.mempool_socket = dir.join("mempool.sock").display().to_string();
        config.host.capacity = host_capacity;
        config.host.segment_bytes = ByteSize::mib(4).min(host_capacity).max(ByteSize::mib(1));
        config.log.level = "warn".into();
        let mut disk = false;
        let daemon = if disk_size.as_u64() > 0 {
            let mut with_disk = config.clone();
            with_disk.disk.paths = vec![format!(
                "{}={}",
                dir.join("kvstrata-slots.bin").display(),
                disk_size.as_u64()
            )];
            match Daemon::start(with_disk).await {
                Ok(d) => {
                    disk = true;
                    d
                }
                Err(e) => {
                    eprintln!(
                        "note: no disk tier in {} ({e}); host tier only",
                        dir.display()
                    );
                    Daemon::start(config.clone()).await?
                }
            }
        } else {
            Daemon::start(config.clone()).await?
        };
        let target = daemon
            .addrs()
            .uds_target()
            .context("the demo daemon has no Unix socket")?;
        let client = Client::connect(&target).await?;
        Ok(LocalDaemon {
            daemon,
            client,
            mempool: config.shm.mempool_socket.clone(),
            disk,
            _tmp: tmp,
        })
    }

    /// Engine options for engines talking to this daemon through shared memory.
    pub fn engine_options(&self, model: &ModelArgs) -> EngineOptions {
        EngineOptions {
            block_tokens: model.block_tokens,
            mempool_socket: Some(self.mempool.clone()),
            ..EngineOptions::default()
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.client);
        self.daemon.shutdown().await?;
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct TurnRow {
    turn: usize,
    question: String,
    context_tokens: usize,
    reused_tokens: usize,
    reused_from_hbm: usize,
    reused_from_host: usize,
    reused_from_disk: usize,
    ttft_cached_ms: f64,
    load_ms: f64,
    ttft_recompute_ms: Option<f64>,
    speedup: Option<f64>,
    same_first_token: Option<bool>,
    /// Whether the recompute's greedy answer is the cached path's, token for token.
    same_answer: Option<bool>,
    answer: String,
}

/// Blocks of `tiers` served by the host tier and by the disk tier.
pub fn tier_counts(tiers: &[proto::Tier]) -> (usize, usize) {
    let host = tiers.iter().filter(|t| **t == proto::Tier::Host).count();
    let disk = tiers.iter().filter(|t| **t == proto::Tier::Disk).count();
    (host, disk)
}

fn first_words(text: &str, n: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().take(n + 1).collect();
    if words.len() > n {
        format!("{} ...", words[..n].join(" "))
    } else {
        words.join(" ")
    }
}

/// The engines of the demo: the one through the daemon and the recompute
/// baseline, on the CPU (an in-process daemon) or on the GPU (a daemon child
/// process; blocks by page ids).
enum Engines {
    Cpu {
        engine: Engine,
        baseline: Engine,
        local: LocalDaemon,
    },
    Gpu {
        engine: GpuEngine,
        baseline: GpuEngine,
        client: Client,
        _daemon: kvstrata_gpucheck::ipc::DaemonChild,
    },
}

/// What one turn did, on either device.
struct Turn {
    reused_tokens: usize,
    reused_tiers: Vec<proto::Tier>,
    first_token: u32,
    ttft: Duration,
    load: Duration,
    answer: Vec<u32>,
    /// The recompute's TTFT, first token and greedy answer, when measured.
    recompute: Option<(Duration, u32, Vec<u32>)>,
}

impl Engines {
    fn client(&self) -> &Client {
        match self {
            Engines::Cpu { local, .. } => &local.client,
            Engines::Gpu { client, .. } => client,
        }
    }

    async fn turn(
        &self,
        model: &LoadedModel,
        tokens: &[u32],
        measure: bool,
        max_tokens: usize,
        quiet: bool,
    ) -> anyhow::Result<Turn> {
        let is_eos = |t: u32| model.tokenizer.is_eos(t);
        match self {
            Engines::Cpu {
                engine, baseline, ..
            } => {
                let recompute = if measure {
                    let mut bar = prefill_bar(quiet);
                    Some(baseline.prefill(tokens, &mut bar).await?)
                } else {
                    None
                };
                let mut bar = prefill_bar(quiet);
                let prefill = engine.prefill(tokens, &mut bar).await?;
                let decoded = engine
                    .decode(
                        &prefill.handoff,
                        SamplingParams::default(),
                        max_tokens,
                        &mut |_| true,
                    )
                    .await?;
                let recompute = match recompute {
                    Some(mut p) => {
                        let answer = tokio::task::block_in_place(|| {
                            baseline.continue_local(&mut p, max_tokens)
                        })?;
                        Some((p.timings.ttft, p.handoff.first_token, answer))
                    }
                    None => None,
                };
                Ok(Turn {
                    reused_tokens: prefill.reused_tokens,
                    reused_tiers: prefill.reused_tiers,
                    first_token: prefill.handoff.first_token,
                    ttft: prefill.timings.ttft,
                    load: prefill.timings.load,
                    answer: decoded.tokens,
                    recompute,
                })
            }
            Engines::Gpu {
                engine, baseline, ..
            } => {
                let recompute = match measure {
                    true => {
                        let mut p = baseline.prefill(tokens).await?;
                        let answer = tokio::task::block_in_place(|| {
                            baseline.continue_local(&mut p, max_tokens, &is_eos)
                        })?;
                        Some((p.timings.ttft, p.handoff.first_token, answer))
                    }
                    false => None,
                };
                let prefill = engine.prefill(tokens).await?;
                let handoff = prefill.handoff.clone();
                let (reused_tokens, ttft, load) = (
                    prefill.reused_tokens,
                    prefill.timings.ttft,
                    prefill.timings.load,
                );
                let reused_tiers = prefill.reused_tiers;
                drop(prefill.seq);
                let decoded = engine
                    .decode(
                        &handoff,
                        SamplingParams::default(),
                        max_tokens,
                        &is_eos,
                        &mut |_| true,
                    )
                    .await?;
                Ok(Turn {
                    reused_tokens,
                    reused_tiers,
                    first_token: handoff.first_token,
                    ttft,
                    load,
                    answer: decoded.tokens,
                    recompute,
                })
            }
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Engines::Cpu { local, .. } => local.stop().await,
            Engines::Gpu { .. } => Ok(()),
        }
    }
}

/// The GPU engines and their daemon (a child process: a CUDA IPC handle
/// cannot be opened by the process that exported it).
async fn gpu_engines(
    args: &DemoArgs,
    dev: &Arc<CudaDevice>,
    dir: &Path,
) -> anyhow::Result<(Engines, bool, String)> {
    let bt = args.model.block_tokens;
    let setup =
        tokio::task::block_in_place(|| GpuSetup::load(dev, &args.model, None, usize::MAX, 1024))?;
    let positions = setup.model.max_positions();
    let pool = setup.model.kv_pool(bt, 2 * (positions / bt + 2))?;
    let daemon_args: Vec<String> = [
        "--gpu",
        "on",
        "--gpu-device",
        &dev.info().ordinal.to_string(),
        "--gpu-hbm-bytes",
        &args.gpu_hbm_bytes.as_u64().to_string(),
        "--host-capacity",
        &args.host_capacity.as_u64().to_string(),
        "--host-segment-bytes",
        &ByteSize::mib(4)
            .min(args.host_capacity)
            .max(ByteSize::mib(1))
            .as_u64()
            .to_string(),
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let slots = format!(
        "{}={}",
        dir.join("kvstrata-slots.bin").display(),
        args.disk_size.as_u64()
    );
    let (daemon, disk) = tokio::task::block_in_place(|| {
        if args.disk_size.as_u64() > 0 {
            let mut with_disk = daemon_args.clone();
            with_disk.extend(["--disk-path".to_string(), slots]);
            match kvstrata_gpucheck::ipc::DaemonChild::start(&with_disk) {
                Ok(d) => return Ok((d, true)),
                Err(e) => eprintln!(
                    "note: no disk tier in {} ({e}); host tier only",
                    dir.display()
                ),
            }
        }
        kvstrata_gpucheck::ipc::DaemonChild::start(&daemon_args).map(|d| (d, false))
    })
    .map_err(|e| anyhow::anyhow!("starting the demo daemon: {e}"))?;
    let client = Client::connect(&format!("unix://{}", daemon.uds().display())).await?;
    let options = GpuKvOptions {
        region_socket: Some(daemon.regions().display().to_string()),
        mempool_socket: Some(daemon.mempool().display().to_string()),
    };
    let engine = GpuEngine::connect(
        Arc::clone(&setup.model),
        Arc::clone(&pool),
        client.clone(),
        setup.spec.clone(),
        &options,
    )
    .await?
    .with_load_policy(args.device.load_policy);
    let path = match engine.store().and_then(|s| s.path_note()) {
        Some(note) => note.to_string(),
        None => "the engine's KV pages on the GPU are a CUDA-IPC region of the daemon; blocks move by page ids".to_string(),
    };
    let baseline = GpuEngine::local(setup.model, pool);
    Ok((
        Engines::Gpu {
            engine,
            baseline,
            client,
            _daemon: daemon,
        },
        disk,
        path,
    ))
}

/// `kvstrata demo`.
pub async fn run_demo(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let questions = rag::questions();
    let turns = args.turns.clamp(1, questions.len());
    if args.device.synthetic.is_some() {
        anyhow::bail!("--synthetic: the demo needs a real model's text (use bench ttft)");
    }
    let device = args.device.resolve(args.model.quiet || json)?;
    let model: Arc<LoadedModel> = tokio::task::block_in_place(|| load_model(&args.model))?;
    // The GPU demo's directory (the daemon child's disk tier), removed at the end.
    let mut gpu_tmp = None;
    let (engines, disk, path) = match &device {
        Device::Cpu => {
            let local =
                LocalDaemon::start(args.data_dir.as_deref(), args.host_capacity, args.disk_size)
                    .await?;
            let mut options = local.engine_options(&args.model);
            options.load_policy = args.device.load_policy;
            let engine = Engine::connect(model.clone(), local.client.clone(), &options).await?;
            let baseline = Engine::local(model.clone(), &options)?;
            let disk = local.disk;
            let path = "engines move blocks through shared memory".to_string();
            (
                Engines::Cpu {
                    engine,
                    baseline,
                    local,
                },
                disk,
                path,
            )
        }
        Device::Cuda(dev) => {
            let dir = match &args.data_dir {
                Some(d) => d.clone(),
                None => gpu_tmp
                    .insert(
                        tempfile::Builder::new()
                            .prefix("kvstrata-demo-")
                            .tempdir()
                            .context("creating a temporary directory")?,
                    )
                    .path()
                    .to_path_buf(),
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            gpu_engines(&args, dev, &dir).await?
        }
    };
    if !json {
        println!(
            "kvstrata demo: {} ({} layers, {} KV heads x {} dims, {} KiB of f16 KV per {}-token block)",
            model.info.model_id,
            model.model.config().num_layers,
            model.model.config().num_kv_heads,
            model.model.config().head_dim,
            model.geometry(args.model.block_tokens).block_bytes() / 1024,
            args.model.block_tokens,
        );
        println!(
            "daemon {}: host tier {}, disk tier {}; {path}\n",
            match device {
                Device::Cpu => "in this process".to_string(),
                Device::Cuda(_) => format!(
                    "in a child process: HBM tier {}",
                    args.gpu_hbm_bytes.display().iec()
                ),
            },
            args.host_capacity.display().iec(),
            if disk {
                args.disk_size.display().iec().to_string()
            } else {
                "off".into()
            }
        );
    }
    let mut convo = Conversation::with_system(rag::system_prompt());
    let mut rows = Vec::new();
    for (i, question) in questions.iter().take(turns).enumerate() {
        let tokens = convo.next_prompt_tokens(&model.tokenizer, &model.template, question)?;
        let measure = !args.no_baseline && (args.baseline_every_turn || i + 1 == turns);
        let t = engines
            .turn(
                &model,
                &tokens,
                measure,
                args.max_tokens,
                args.model.quiet || json,
            )
            .await?;
        let answer = model.tokenizer.decode(&t.answer, true)?;
        convo.record_answer(&t.answer, &answer);
        let (host, disk) = tier_counts(&t.reused_tiers);
        let hbm = t
            .reused_tiers
            .iter()
            .filter(|x| **x == proto::Tier::Hbm)
            .count();
        let row = TurnRow {
            turn: i + 1,
            question: question.clone(),
            context_tokens: tokens.len(),
            reused_tokens: t.reused_tokens,
            reused_from_hbm: hbm,
            reused_from_host: host,
            reused_from_disk: disk,
            ttft_cached_ms: ms(t.ttft),
            load_ms: ms(t.load),
            ttft_recompute_ms: t.recompute.as_ref().map(|r| ms(r.0)),
            speedup: t
                .recompute
                .as_ref()
                .map(|r| r.0.as_secs_f64() / t.ttft.as_secs_f64()),
            same_first_token: t.recompute.as_ref().map(|r| r.1 == t.first_token),
            same_answer: t.recompute.as_ref().map(|r| r.2 == t.answer),
            answer: answer.trim().to_string(),
        };
        if !json {
            println!("turn {}: {}", row.turn, question);
            println!("  -> {}", first_words(&row.answer, 16));
        }
        rows.push(row);
    }
    let stats = engines.client().stats().await?;
    if json {
        let doc = serde_json::json!({
            "model": model.info.model_id,
            "device": match &device { Device::Cpu => "cpu".to_string(), Device::Cuda(d) => format!("cuda:{}", d.info().ordinal) },
            "block_tokens": args.model.block_tokens,
            "disk_tier": disk,
            "turns": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("\n{}", turn_table(&rows));
        if !args.no_baseline {
            println!("{}", baseline_summary(&rows, args.baseline_every_turn));
        }
        for t in &stats.tiers {
            let name = proto::Tier::try_from(t.tier)
                .map(|x| x.as_str_name().trim_start_matches("TIER_").to_lowercase())
                .unwrap_or_else(|_| "?".into());
            println!(
                "{name} tier: {} blocks, {} of {}",
                t.blocks,
                ByteSize::b(t.used_bytes).display().iec(),
                ByteSize::b(t.capacity_bytes).display().iec()
            );
        }
    }
    engines.stop().await?;
    drop(gpu_tmp);
    Ok(())
}

/// What the recompute baseline checked, and on which turns.
fn baseline_summary(rows: &[TurnRow], every_turn: bool) -> String {
    let measured: Vec<&TurnRow> = rows.iter().filter(|r| r.same_answer.is_some()).collect();
    let differ =
        |f: fn(&TurnRow) -> Option<bool>| measured.iter().filter(|r| f(r) == Some(false)).count();
    let verdict = |n: usize| {
        if n == 0 {
            "same".to_string()
        } else {
            format!("{n} turn(s) differ")
        }
    };
    let turns = measured
        .iter()
        .map(|r| r.turn.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let scope = if every_turn {
        format!("turns {turns}")
    } else {
        format!("turn {turns}; --baseline-every-turn for all")
    };
    format!(
        "full recompute measured on {scope}: first token {}, greedy answer {}",
        verdict(differ(|r| r.same_first_token)),
        verdict(differ(|r| r.same_answer)),
    )
}

fn turn_table(rows: &[TurnRow]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec![
            "turn",
            "context",
            "reused",
            "TTFT cached",
            "TTFT recompute",
            "speed-up",
            "reused from",
            "answer",
        ]);
    for r in rows {
        table.add_row(vec![
            r.turn.to_string(),
            r.context_tokens.to_string(),
            r.reused_tokens.to_string(),
            format!("{:.0} ms", r.ttft_cached_ms),
            r.ttft_recompute_ms
                .map(|x| format!("{x:.0} ms"))
                .unwrap_or_else(|| "-".into()),
            r.speedup
                .map(|x| format!("{x:.1}x"))
                .unwrap_or_else(|| "-".into()),
            if r.reused_from_hbm > 0 {
                format!(
                    "hbm {} / host {} / disk {}",
                    r.reused_from_hbm, r.reused_from_host, r.reused_from_disk
                )
            } else {
                format!("host {} / disk {}", r.reused_from_host, r.reused_from_disk)
            },
            first_words(&r.answer, 6),
        ]);
    }
    table
}
