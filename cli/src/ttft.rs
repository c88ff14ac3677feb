//! `kvstrata bench ttft`: time to first token against how much of the context is
//! cached, and in which tier, with an in-process daemon and the default model.
//!
//! For each context length it measures a full recompute (0 % cached), then prefills
//! with half and with all full blocks of the context cached — once served by the host
//! tier, once after the namespace was demoted to the disk tier. Every measurement
//! uses its own token sequence, so nothing is shared between rows by accident.

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
use crate::engine_verbs::{ModelArgs, load_model, ms};

/// `kvstrata bench ttft`.
#[derive(Debug, Clone, clap::Args)]
pub struct TtftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
}

#[derive(Debug, Serialize)]
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
}

/// `n` tokens of the shipped documents, starting with a marker unique to `run`.
fn context(
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
    let model = tokio::task::block_in_place(|| load_model(&args.model))?;
    let max = model.model.config().max_context;
    if let Some(c) = args.contexts.iter().find(|&&c| c >= max) {
        bail!("--contexts: {c} tokens is beyond the model's context of {max}");
    }
    let local =
        LocalDaemon::start(args.data_dir.as_deref(), ByteSize::gib(2), ByteSize::gib(4)).await?;
    let options = local.engine_options(&args.model);
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
                let r = row(n, tier, pct, &p, base_ttft);
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
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if args.markdown {
        println!(
            "| context | tier | cached | reused tokens | TTFT ms | cache load ms | load share | speed-up | prefill tok/s |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {}% | {} | {:.0} | {:.1} | {:.1}% | {:.1}x | {:.0} |",
                r.context_tokens,
                r.tier,
                r.cached_percent,
                r.reused_tokens,
                r.ttft_ms,
                r.load_ms,
                r.load_share * 100.0,
                r.speedup,
                r.prefill_tokens_per_s
            );
        }
    } else {
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(vec![
                "context",
                "tier",
                "cached",
                "reused",
                "TTFT",
                "load",
                "load share",
                "speed-up",
                "prefill tok/s",
            ]);
        for r in &rows {
            table.add_row(vec![
                r.context_tokens.to_string(),
                r.tier.to_string(),
                format!("{}%", r.cached_percent),
                r.reused_tokens.to_string(),
                format!("{:.0} ms", r.ttft_ms),
                format!("{:.1} ms", r.load_ms),
                format!("{:.1}%", r.load_share * 100.0),
                format!("{:.1}x", r.speedup),
                format!("{:.0}", r.prefill_tokens_per_s),
            ]);
        }
        println!("{table}");
    }
    Ok(())
}

fn row(n: usize, tier: &'static str, pct: u32, p: &Prefill, base: Duration) -> Row {
    let ttft = p.timings.ttft.as_secs_f64();
    let compute = p.timings.compute.as_secs_f64();
    Row {
        context_tokens: n,
        tier,
        cached_percent: pct,
        reused_tokens: p.reused_tokens,
        computed_tokens: p.computed_tokens,
        ttft_ms: ms(p.timings.ttft),
        load_ms: ms(p.timings.load),
        load_share: if ttft > 0.0 {
            p.timings.load.as_secs_f64() / ttft
        } else {
            0.0
        },
        speedup: if ttft > 0.0 {
            base.as_secs_f64() / ttft
        } else {
            0.0
        },
        prefill_tokens_per_s: if compute > 0.0 {
            p.computed_tokens as f64 / compute
        } else {
            0.0
        },
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
