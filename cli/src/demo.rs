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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytesize::ByteSize;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use kvstrata_client::{Client, proto};
use kvstrata_engine::chat::Conversation;
use kvstrata_engine::engine::{Engine, EngineOptions, LoadedModel};
use kvstrata_engine::rag;
use kvstrata_engine::sampling::SamplingParams;
use kvstrata_server::{Config, Daemon};
use serde::Serialize;

use crate::engine_verbs::{ModelArgs, load_model, ms, prefill_bar};

/// `kvstrata demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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

/// `kvstrata demo`.
pub async fn run_demo(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let questions = rag::questions();
    let turns = args.turns.clamp(1, questions.len());
    let model: Arc<LoadedModel> = tokio::task::block_in_place(|| load_model(&args.model))?;
    let local =
        LocalDaemon::start(args.data_dir.as_deref(), args.host_capacity, args.disk_size).await?;
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
            "daemon in this process: host tier {}, disk tier {}; engines move blocks through shared memory\n",
            args.host_capacity.display().iec(),
            if local.disk {
                args.disk_size.display().iec().to_string()
            } else {
                "off".into()
            }
        );
    }
    let options = local.engine_options(&args.model);
    let engine = Engine::connect(model.clone(), local.client.clone(), &options).await?;
    let baseline = Engine::local(model.clone(), &options)?;
    let mut convo = Conversation::with_system(rag::system_prompt());
    let mut rows = Vec::new();
    for (i, question) in questions.iter().take(turns).enumerate() {
        let tokens = convo.next_prompt_tokens(&model.tokenizer, &model.template, question)?;
        let measure = !args.no_baseline && (args.baseline_every_turn || i + 1 == turns);
        let recompute = if measure {
            let mut bar = prefill_bar(args.model.quiet || json);
            Some(baseline.prefill(&tokens, &mut bar).await?)
        } else {
            None
        };
        let mut bar = prefill_bar(args.model.quiet || json);
        let prefill = engine.prefill(&tokens, &mut bar).await?;
        let decoded = engine
            .decode(
                &prefill.handoff,
                SamplingParams::default(),
                args.max_tokens,
                &mut |_| true,
            )
            .await?;
        let answer = model.tokenizer.decode(&decoded.tokens, true)?;
        convo.record_answer(&decoded.tokens, &answer);
        // The recompute's own greedy answer, from its KV in this process.
        let recompute = match recompute {
            Some(mut p) => {
                let tokens = tokio::task::block_in_place(|| {
                    baseline.continue_local(&mut p, args.max_tokens)
                })?;
                Some((p.timings.ttft, p.handoff.first_token, tokens))
            }
            None => None,
        };
        let (host, disk) = tier_counts(&prefill.reused_tiers);
        let row = TurnRow {
            turn: i + 1,
            question: question.clone(),
            context_tokens: tokens.len(),
            reused_tokens: prefill.reused_tokens,
            reused_from_host: host,
            reused_from_disk: disk,
            ttft_cached_ms: ms(prefill.timings.ttft),
            load_ms: ms(prefill.timings.load),
            ttft_recompute_ms: recompute.as_ref().map(|r| ms(r.0)),
            speedup: recompute
                .as_ref()
                .map(|r| r.0.as_secs_f64() / prefill.timings.ttft.as_secs_f64()),
            same_first_token: recompute
                .as_ref()
                .map(|r| r.1 == prefill.handoff.first_token),
            same_answer: recompute.as_ref().map(|r| r.2 == decoded.tokens),
            answer: answer.trim().to_string(),
        };
        if !json {
            println!("turn {}: {}", row.turn, question);
            println!("  -> {}", first_words(&row.answer, 16));
        }
        rows.push(row);
    }
    let stats = local.client.stats().await?;
    if json {
        let doc = serde_json::json!({
            "model": model.info.model_id,
            "block_tokens": args.model.block_tokens,
            "disk_tier": local.disk,
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
    local.stop().await
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
            format!("host {} / disk {}", r.reused_from_host, r.reused_from_disk),
            first_words(&r.answer, 6),
        ]);
    }
    table
}
