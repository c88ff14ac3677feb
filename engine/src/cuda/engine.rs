//! The prefill and decode engines on a CUDA device: [`GpuEngine`], the GPU
//! twin of `crate::engine::Engine`.
//!
//! A prefill computes the prompt's chained block keys, asks the daemon for
//! the longest cached prefix, loads it into a fresh [`GpuSequence`] of the
//! engine's pool (by page ids when the pool is registered as a KV region:
//! [`GpuKvStore`]), runs the model on the rest, stores every new full block,
//! and hands off like the CPU engine ([`Handoff`]), so a decode — in this
//! process, another one, or on the CPU engine — continues from the blocks.
//! Greedy decoding picks tokens on the device (top-1); a temperature samples
//! on the host from the logits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstrata_client::{BlockHash, Client, proto};
use kvstrata_types::NamespaceSpec;

use super::forward::GpuModel;
use super::kv::{GpuKvPool, GpuSequence};
use super::region::{GpuKvOptions, GpuKvStore};
use crate::engine::{Handoff, PrefillTimings, compute};
use crate::error::{EngineError, Result};
use crate::load_policy::{LoadChoice, LoadPlanner, LoadPolicy, matched_tiers};
use crate::sampling::{Sampler, SamplingParams};

/// The result of one prefill on the GPU.
#[derive(Debug)]
pub struct GpuPrefill {
    pub handoff: Handoff,
    /// Prompt tokens whose KV came from kvstrata.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model.
    pub computed_tokens: usize,
    /// Tier of each reused block.
    pub reused_tiers: Vec<proto::Tier>,
    /// How many cached blocks the engine chose to load, and why
    /// (`crate::load_policy`); `None` when nothing was cached.
    pub load_choice: Option<LoadChoice>,
    pub stored_blocks: usize,
    pub store_no_space: usize,
    pub timings: PrefillTimings,
    /// The prompt's KV, for a decode in this process.
    pub seq: GpuSequence,
}

/// The result of one decode on the GPU.
#[derive(Debug)]
pub struct GpuDecoded {
    /// Generated tokens, the hand-off's first token first.
    pub tokens: Vec<u32>,
    /// Prompt tokens whose KV was loaded from kvstrata.
    pub loaded_tokens: usize,
    /// Tier each loaded block came from.
    pub loaded_tiers: Vec<proto::Tier>,
    /// Prompt tokens recomputed (the partial last block, and blocks the daemon lost).
    pub recomputed_tokens: usize,
    /// The token the decode engine's own pass over the prompt picks (greedy):
    /// equal to the hand-off's first token when the loaded KV is right.
    pub prompt_next_token: u32,
    pub stopped_at_eos: bool,
    pub stored_blocks: usize,
    pub load_time: Duration,
    pub generate_time: Duration,
}

/// A prefill/decode engine over one model on one device and (optionally) one
/// kvstrata daemon.
pub struct GpuEngine {
    model: Arc<GpuModel>,
    pool: Arc<GpuKvPool>,
    store: Option<GpuKvStore>,
    planner: LoadPlanner,
}

impl std::fmt::Debug for GpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEngine")
            .field("model", &self.model)
            .field("pool", &self.pool)
            .field("store", &self.store)
            .field("load_policy", &self.planner.policy())
            .finish()
    }
}

impl GpuEngine {
    /// An engine with no daemon: every prompt is computed in full (the
    /// recompute baseline).
    pub fn local(model: Arc<GpuModel>, pool: Arc<GpuKvPool>) -> Self {
        GpuEngine {
            model,
            pool,
            store: None,
            planner: LoadPlanner::default(),
        }
    }

    /// An engine that reuses and stores KV through the daemon behind
    /// `client`, registering `pool` as a KV region when it can
    /// ([`GpuKvStore::open`]).
    pub async fn connect(
        model: Arc<GpuModel>,
        pool: Arc<GpuKvPool>,
        client: Client,
        spec: NamespaceSpec,
        options: &GpuKvOptions,
    ) -> Result<Self> {
        let g = pool.geometry();
        let c = model.config();
        if (g.num_layers, g.num_kv_heads, g.head_dim) != (c.num_layers, c.num_kv_heads, c.head_dim)
        {
            return Err(EngineError::InvalidRequest(format!(
                "the KV pool's pages are {g:?}, the model's geometry differs"
            )));
        }
        let store = GpuKvStore::open(client, spec, Arc::clone(&pool), options).await?;
        Ok(GpuEngine {
            model,
            pool,
            store: Some(store),
            planner: LoadPlanner::default(),
        })
    }

    /// The same engine deciding between loading and recomputing a cached
    /// prefix by `policy` (default [`LoadPolicy::Auto`]).
    pub fn with_load_policy(mut self, policy: LoadPolicy) -> Self {
        self.planner.set_policy(policy);
        self
    }

    /// The policy and the load/compute estimates learned so far.
    pub fn load_planner(&self) -> &LoadPlanner {
        &self.planner
    }

    pub fn model(&self) -> &Arc<GpuModel> {
        &self.model
    }

    pub fn pool(&self) -> &Arc<GpuKvPool> {
        &self.pool
    }

    /// The daemon side, when connected.
    pub fn store(&self) -> Option<&GpuKvStore> {
        self.store.as_ref()
    }

    fn block_tokens(&self) -> usize {
        self.pool.geometry().block_tokens
    }

    fn namespace_hex(&self) -> String {
        match &self.store {
            Some(s) => hex::encode(s.block_store().namespace_id().as_bytes()),
            None => String::new(),
        }
    }

    fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        match &self.store {
            Some(s) => s.keys(tokens),
            None => Vec::new(),
        }
    }

    fn check_prompt(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt has no tokens".into(),
            ));
        }
        let max = self.model.max_positions();
        if tokens.len() >= max {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the GPU model was set up for {max}",
                tokens.len()
            )));
        }
        Ok(())
    }

    /// Greedy next token after running `tokens` on `seq`.
    fn next_greedy(&self, tokens: &[u32], seq: &mut GpuSequence) -> Result<u32> {
        let top = compute(|| self.model.forward_top_k(tokens, seq, 1))?;
        Ok(top[0].0)
    }

    /// Prefill: reuse the cached prefix (as much of it as the load policy
    /// says is worth loading), compute the rest, store the new full blocks
    /// (recomputed cached blocks are stored again: into the daemon's fastest
    /// tier). The first token is greedy.
    pub async fn prefill(&self, tokens: &[u32]) -> Result<GpuPrefill> {
        self.prefill_with_policy(tokens, self.planner.policy())
            .await
    }

    /// [`Self::prefill`] under another load policy than the engine's (the
    /// estimates are the engine's, and learn from it).
    pub async fn prefill_with_policy(
        &self,
        tokens: &[u32],
        policy: LoadPolicy,
    ) -> Result<GpuPrefill> {
        self.check_prompt(tokens)?;
        let started = Instant::now();
        let bt = self.block_tokens();
        let keys = self.keys(tokens);
        // The last token is always computed: its logits give the first token.
        let reusable = (tokens.len() - 1) / bt;
        let mut seq = self.pool.sequence()?;
        let mut timings = PrefillTimings::default();
        let mut reused_tiers = Vec::new();
        let mut load_choice = None;
        if let Some(store) = &self.store {
            let t = Instant::now();
            let (matched, tiers) = store.lookup(&keys[..reusable.min(keys.len())]).await?;
            timings.lookup = t.elapsed();
            if matched > 0 {
                let block_bytes = self.pool.geometry().block_bytes();
                let tiers = matched_tiers(matched, &tiers);
                let choice = self
                    .planner
                    .decide(policy, &tiers, block_bytes, bt, tokens.len());
                if choice.load_blocks > 0 {
                    let n = choice.load_blocks;
                    let known = tiers.get(..n).unwrap_or(&[]);
                    let report = store.load_from(&keys[..n], known, &mut seq).await?;
                    timings.load = report.elapsed;
                    self.planner
                        .record_load(&report.tiers, block_bytes, report.elapsed);
                    reused_tiers = report.tiers;
                }
                load_choice = Some(choice);
            }
        }
        let reused = seq.len();
        let t = Instant::now();
        let first_token = self.next_greedy(&tokens[reused..], &mut seq)?;
        timings.compute = t.elapsed();
        timings.ttft = started.elapsed();
        self.planner
            .record_compute(reused, tokens.len(), timings.compute);
        let (mut stored_blocks, mut store_no_space) = (0, 0);
        if let Some(store) = &self.store {
            let report = store.store(&seq, &keys, reused / bt).await?;
            stored_blocks = report.stored;
            store_no_space = report.no_space;
            timings.store = report.elapsed;
        }
        Ok(GpuPrefill {
            handoff: Handoff {
                namespace_id: self.namespace_hex(),
                tokens: tokens.to_vec(),
                block_keys: keys.iter().map(hex::encode).collect(),
                first_token,
            },
            reused_tokens: reused,
            computed_tokens: tokens.len() - reused,
            reused_tiers,
            load_choice,
            stored_blocks,
            store_no_space,
            timings,
            seq,
        })
    }

    /// Decode: load the hand-off's KV from kvstrata, recompute the rest of the
    /// prompt, then generate up to `max_new_tokens` (the hand-off's first
    /// token included), calling `on_token` with each (false stops). New full
    /// blocks are stored at the end.
    pub async fn decode(
        &self,
        handoff: &Handoff,
        sampling: SamplingParams,
        max_new_tokens: usize,
        is_eos: &dyn Fn(u32) -> bool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<GpuDecoded> {
        let tokens = &handoff.tokens;
        self.check_prompt(tokens)?;
        let keys = self.keys(tokens);
        if self.store.is_some() {
            handoff.check_against(&self.namespace_hex(), &keys)?;
        }
        let started = Instant::now();
        let bt = self.block_tokens();
        let mut seq = self.pool.sequence()?;
        let mut loaded_tiers = Vec::new();
        if let Some(store) = &self.store {
            let usable = (tokens.len() - 1) / bt;
            let report = store.load(&keys[..usable], &mut seq).await?;
            // Every load teaches the load policy its tiers' bandwidths.
            self.planner.record_load(
                &report.tiers,
                self.pool.geometry().block_bytes(),
                report.elapsed,
            );
            loaded_tiers = report.tiers;
        }
        let loaded = seq.len();
        let prompt_next_token = self.next_greedy(&tokens[loaded..], &mut seq)?;
        let load_time = started.elapsed();
        let t = Instant::now();
        let mut sampler = Sampler::new(sampling);
        let greedy = sampling.temperature == 0.0;
        let mut generated = Vec::new();
        let mut next = handoff.first_token;
        let mut stopped_at_eos = false;
        let limit = max_new_tokens.min(self.model.max_positions().saturating_sub(tokens.len()));
        while generated.len() < limit {
            generated.push(next);
            let go_on = on_token(next);
            if is_eos(next) {
                stopped_at_eos = true;
                break;
            }
            if !go_on || generated.len() >= limit {
                break;
            }
            next = if greedy {
                self.next_greedy(&[next], &mut seq)?
            } else {
                let logits = compute(|| self.model.forward(&[next], &mut seq))?;
                sampler.sample(&logits)
            };
        }
        let generate_time = t.elapsed();
        let mut stored_blocks = 0;
        if let Some(store) = &self.store {
            let mut fed = tokens.clone();
            fed.extend_from_slice(&generated[..generated.len().saturating_sub(1)]);
            let fed_keys = store.keys(&fed);
            stored_blocks = store.store(&seq, &fed_keys, loaded / bt).await?.stored;
        }
        Ok(GpuDecoded {
            tokens: generated,
            loaded_tokens: loaded,
            loaded_tiers,
            recomputed_tokens: tokens.len() - loaded,
            prompt_next_token,
            stopped_at_eos,
            stored_blocks,
            load_time,
            generate_time,
        })
    }

    /// Greedy generation in this process from a prefill's own KV (no reload):
    /// the reference a decode through kvstrata must match.
    pub fn continue_local(
        &self,
        prefill: &mut GpuPrefill,
        max_new_tokens: usize,
        is_eos: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<u32>> {
        let mut out = vec![prefill.handoff.first_token];
        while out.len() < max_new_tokens {
            let last = out[out.len() - 1];
            if is_eos(last) {
                break;
            }
            out.push(self.next_greedy(&[last], &mut prefill.seq)?);
        }
        Ok(out)
    }
}
