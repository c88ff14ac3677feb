//! The prefill and decode engines.
//!
//! [`Engine::prefill`] tokenizes nothing itself: it takes a prompt's token ids, computes
//! their chained block keys, asks kvstrata for the longest cached prefix, loads it into
//! a fresh [`PagedKv`], runs the model only on the remaining tokens, stores every new
//! full block, and returns the first token with a [`Handoff`] — what a decode engine,
//! possibly in another process, needs to continue. [`Engine::decode`] loads the
//! hand-off's blocks again (recomputing only the partial last block and any block the
//! daemon no longer has), then generates.
//!
//! An engine without a daemon ([`Engine::local`]) computes everything: that is the
//! "recompute" baseline the demo and the benchmarks compare with.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use kvstrata_client::{BlockHash, Client, proto};
use kvstrata_types::{Dtype, NamespaceSpec};
use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::error::{EngineError, Result};
use crate::kv::{KvGeometry, PagedKv};
use crate::load_policy::{LoadChoice, LoadPlanner, LoadPolicy, matched_tiers};
use crate::model::{LlamaModel, ModelInfo};
use crate::sampling::{Sampler, SamplingParams};
use crate::store::BlockStore;
use crate::tokenizer::Tokenizer;

/// Tokens per block (and per KV page) unless configured otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;
/// Tokens per forward pass during prefill (progress is reported between chunks).
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Blocks in an engine's shared-memory pool (each transfer moves at most this many).
pub const DEFAULT_POOL_BLOCKS: usize = crate::store::BLOCKS_PER_BATCH;

/// A model with its tokenizer and chat template, shared by engines.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub info: ModelInfo,
    /// xxh3-128 of the weights (and config) read: part of the namespace.
    pub fingerprint: [u8; 16],
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("info", &self.info)
            .field("config", self.model.config())
            .finish()
    }
}

impl LoadedModel {
    /// Loads a GGUF file, or a folder with `config.json`, `*.safetensors`,
    /// `tokenizer.json` (and a chat template in `tokenizer_config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::load_dir(path)
        } else {
            Self::load_gguf(path)
        }
    }

    fn load_gguf(path: &Path) -> Result<Self> {
        let open = || {
            std::fs::File::open(path)
                .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))
        };
        let fingerprint = fingerprint_files(&[path.to_path_buf()])?;
        let mut reader = BufReader::new(open()?);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| EngineError::BadModel {
            path: path.to_path_buf(),
            reason: format!("not a readable GGUF file: {e}"),
        })?;
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let template = ChatTemplate::from_gguf(&content)?;
        let model = LlamaModel::from_gguf(&content, &mut reader, path)?;
        let weight_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(LoadedModel {
            model,
            tokenizer,
            template,
            info: ModelInfo {
                model_id: model_id_of(path),
                path: path.to_path_buf(),
                weight_bytes,
            },
            fingerprint,
        })
    }

    fn load_dir(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::io(format!("listing {}", dir.display()), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "safetensors")
                    || p.file_name().is_some_and(|n| n == "config.json")
            })
            .collect();
        files.sort();
        let fingerprint = fingerprint_files(&files)?;
        let model = LlamaModel::from_safetensors_dir(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let template = template_from_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        let weight_bytes = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        Ok(LoadedModel {
            model,
            tokenizer,
            template,
            info: ModelInfo {
                model_id: model_id_of(dir),
                path: dir.to_path_buf(),
                weight_bytes,
            },
            fingerprint,
        })
    }

    /// The KV geometry of this model with `block_tokens` tokens per block.
    pub fn geometry(&self, block_tokens: usize) -> KvGeometry {
        let c = self.model.config();
        KvGeometry {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_tokens,
        }
    }

    /// The kvstrata namespace of this model's KV (fingerprint included).
    pub fn namespace_spec(&self, block_tokens: usize) -> NamespaceSpec {
        let c = self.model.config();
        let mut spec = NamespaceSpec::layer_major(
            self.info.model_id.clone(),
            c.num_layers as u32,
            c.num_kv_heads as u32,
            c.head_dim as u32,
            Dtype::F16,
            block_tokens as u32,
        );
        spec.model_fingerprint = self.fingerprint.to_vec();
        spec
    }
}

/// The chat template of a Hugging Face folder's `tokenizer_config.json` (`chat_template`,
/// `bos_token`, `eos_token`); plain ChatML when the file or the template is absent.
fn template_from_tokenizer_config(path: &Path) -> Result<ChatTemplate> {
    let Ok(text) = std::fs::read_to_string(path) else {
        tracing::warn!(path = %path.display(), "no tokenizer_config.json; using plain ChatML");
        return ChatTemplate::chatml();
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::BadModel {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let token = |key: &str| match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    };
    match v["chat_template"].as_str() {
        Some(source) => ChatTemplate::new(source, token("bos_token"), token("eos_token")),
        None => {
            tracing::warn!(path = %path.display(), "no chat_template; using plain ChatML");
            ChatTemplate::chatml()
        }
    }
}

fn model_id_of(path: &Path) -> String {
    let name = path
        .file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.chars().take(200).collect()
}

/// xxh3-128 over the bytes of `files` in order (streamed).
fn fingerprint_files(files: &[PathBuf]) -> Result<[u8; 16]> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(f)
            .map_err(|e| EngineError::io(format!("opening {}", f.display()), e))?;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| EngineError::io(format!("reading {}", f.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hasher.digest128().to_le_bytes())
}

/// What a prefill hands to a decode engine (serialisable, for separate processes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Handoff {
    /// The model's namespace id (hex): a decode engine with another model refuses it.
    pub namespace_id: String,
    /// The prompt's token ids.
    pub tokens: Vec<u32>,
    /// Chained keys of the prompt's full blocks (hex), first block first.
    pub block_keys: Vec<String>,
    /// The first generated token (from the prefill's last-position logits).
    pub first_token: u32,
}

/// Where a prefill's time went.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PrefillTimings {
    pub lookup: Duration,
    pub load: Duration,
    pub compute: Duration,
    /// Time to first token: lookup + load + compute.
    pub ttft: Duration,
    /// Storing the new blocks, after the first token is known.
    pub store: Duration,
}

/// The result of one prefill.
#[derive(Debug)]
pub struct Prefill {
    pub handoff: Handoff,
    /// Last-position logits of the prompt.
    pub logits: Vec<f32>,
    /// Prompt tokens whose KV came from kvstrata.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model.
    pub computed_tokens: usize,
    /// Tier of each reused block.
    pub reused_tiers: Vec<proto::Tier>,
    /// How many cached blocks the engine chose to load, and why
    /// (`crate::load_policy`); `None` when nothing was cached.
    pub load_choice: Option<LoadChoice>,
    /// New blocks stored (and refused for lack of space).
    pub stored_blocks: usize,
    pub store_no_space: usize,
    pub timings: PrefillTimings,
    /// The prompt's KV, for a decode in the same process.
    pub kv: PagedKv,
}

/// The result of one decode.
#[derive(Debug)]
pub struct Decoded {
    /// Generated tokens, the hand-off's first token first; ends with EOS if one came.
    pub tokens: Vec<u32>,
    /// Prompt tokens whose KV was loaded from kvstrata.
    pub loaded_tokens: usize,
    /// Prompt tokens recomputed (the partial last block, and blocks the daemon lost).
    pub recomputed_tokens: usize,
    /// Logits at the prompt's last position as the decode engine computed them.
    pub prompt_logits: Vec<f32>,
    /// True when generation stopped at an end-of-sequence token.
    pub stopped_at_eos: bool,
    pub stored_blocks: usize,
    pub load_time: Duration,
    pub generate_time: Duration,
}

/// Options of an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub block_tokens: usize,
    pub prefill_chunk: usize,
    /// Move blocks through a shared-memory pool registered on this mempool socket.
    pub mempool_socket: Option<String>,
    /// Load or recompute a cached prefix (`crate::load_policy`).
    pub load_policy: LoadPolicy,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_tokens: DEFAULT_BLOCK_TOKENS,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            mempool_socket: None,
            load_policy: LoadPolicy::Auto,
        }
    }
}

/// A prefill/decode engine over one model and (optionally) one kvstrata daemon.
pub struct Engine {
    model: Arc<LoadedModel>,
    geometry: KvGeometry,
    store: Option<BlockStore>,
    prefill_chunk: usize,
    planner: LoadPlanner,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.info.model_id)
            .field("geometry", &self.geometry)
            .field("store", &self.store)
            .finish()
    }
}

/// Runs CPU-heavy model code without stalling other tasks of a multi-threaded runtime.
pub(crate) fn compute<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Engine {
    /// An engine with no daemon: every prompt is computed in full.
    pub fn local(model: Arc<LoadedModel>, options: &EngineOptions) -> Result<Self> {
        let geometry = check_options(&model, options)?;
        Ok(Engine {
            model,
            geometry,
            store: None,
            prefill_chunk: options.prefill_chunk.max(1),
            planner: LoadPlanner::new(options.load_policy),
        })
    }

    /// An engine that reuses and stores KV through the daemon behind `client`.
    pub async fn connect(
        model: Arc<LoadedModel>,
        client: Client,
        options: &EngineOptions,
    ) -> Result<Self> {
        let geometry = check_options(&model, options)?;
        let spec = model.namespace_spec(options.block_tokens);
        let store = BlockStore::open(
            client,
            spec,
            geometry,
            options.mempool_socket.as_deref(),
            DEFAULT_POOL_BLOCKS,
        )
        .await?;
        Ok(Engine {
            model,
            geometry,
            store: Some(store),
            prefill_chunk: options.prefill_chunk.max(1),
            planner: LoadPlanner::new(options.load_policy),
        })
    }

    /// The model this engine runs.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// The policy and the load/compute estimates learned so far.
    pub fn load_planner(&self) -> &LoadPlanner {
        &self.planner
    }

    /// The block store, when connected to a daemon.
    pub fn store(&self) -> Option<&BlockStore> {
        self.store.as_ref()
    }

    /// KV geometry (block_tokens included).
    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    fn namespace_hex(&self) -> String {
        match &self.store {
            Some(s) => hex::encode(s.namespace_id().as_bytes()),
            None => String::new(),
        }
    }

    fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        match &self.store {
            Some(s) => s.keys(tokens),
            None => Vec::new(),
        }
    }

    /// Runs `tokens` after what `kv` holds, in chunks, reporting `(done, total)`.
    fn run(
        &self,
        tokens: &[u32],
        kv: &mut PagedKv,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        let mut done = 0;
        progress(0, tokens.len());
        for chunk in tokens.chunks(self.prefill_chunk) {
            logits = compute(|| self.model.model.forward(chunk, kv))?;
            done += chunk.len();
            progress(done, tokens.len());
        }
        Ok(logits)
    }

    /// Prefill: reuse the cached prefix (as much of it as the load policy says is
    /// worth loading), compute the rest, store new blocks (recomputed cached blocks
    /// are stored again).
    pub async fn prefill(
        &self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Prefill> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt has no tokens".into(),
            ));
        }
        let max = self.model.model.config().max_context;
        if tokens.len() >= max {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the model's context is {max}",
                tokens.len()
            )));
        }
        let started = Instant::now();
        let bt = self.geometry.block_tokens;
        let keys = self.keys(tokens);
        // The last token is always computed: its logits give the first token.
        let reusable = (tokens.len() - 1) / bt;
        let mut kv = PagedKv::new(self.geometry)?;
        let mut timings = PrefillTimings::default();
        let mut reused_tiers = Vec::new();
        let mut load_choice = None;
        if let Some(store) = &self.store {
            let t = Instant::now();
            let (matched, tiers) = store.lookup(&keys[..reusable.min(keys.len())]).await?;
            timings.lookup = t.elapsed();
            if matched > 0 {
                let block_bytes = self.geometry.block_bytes();
                let tiers = matched_tiers(matched, &tiers);
                let choice = self.planner.decide(
                    self.planner.policy(),
                    &tiers,
                    block_bytes,
                    bt,
                    tokens.len(),
                );
                if choice.load_blocks > 0 {
                    let report = store.load(&keys[..choice.load_blocks], &mut kv).await?;
                    timings.load = report.elapsed;
                    self.planner
                        .record_load(&report.tiers, block_bytes, report.elapsed);
                    reused_tiers = report.tiers;
                }
                load_choice = Some(choice);
            }
        }
        let reused = kv.len();
        let t = Instant::now();
        let logits = self.run(&tokens[reused..], &mut kv, progress)?;
        timings.compute = t.elapsed();
        timings.ttft = started.elapsed();
        self.planner
            .record_compute(reused, tokens.len(), timings.compute);
        let first_token = crate::model::argmax(&logits);
        let (mut stored_blocks, mut store_no_space) = (0, 0);
        if let Some(store) = &self.store {
            let report = store.store(&kv, &keys, reused / bt).await?;
            stored_blocks = report.stored;
            store_no_space = report.no_space;
            timings.store = report.elapsed;
        }
        Ok(Prefill {
            handoff: Handoff {
                namespace_id: self.namespace_hex(),
                tokens: tokens.to_vec(),
                block_keys: keys.iter().map(hex::encode).collect(),
                first_token,
            },
            logits,
            reused_tokens: reused,
            computed_tokens: tokens.len() - reused,
            reused_tiers,
            load_choice,
            stored_blocks,
            store_no_space,
            timings,
            kv,
        })
    }

    /// Decode: load the hand-off's KV from kvstrata, then generate up to `max_new_tokens`
    /// (the hand-off's first token included), calling `on_token` with each; it returns
    /// false to stop early. New full blocks (prompt and answer) are stored at the end.
    pub async fn decode(
        &self,
        handoff: &Handoff,
        sampling: SamplingParams,
        max_new_tokens: usize,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Decoded> {
        let tokens = &handoff.tokens;
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the hand-off has no tokens".into(),
            ));
        }
        let keys = self.keys(tokens);
        if self.store.is_some() {
            handoff.check_against(&self.namespace_hex(), &keys)?;
        }
        let started = Instant::now();
        let bt = self.geometry.block_tokens;
        let mut kv = PagedKv::new(self.geometry)?;
        if let Some(store) = &self.store {
            let usable = (tokens.len() - 1) / bt;
            store.load(&keys[..usable], &mut kv).await?;
        }
        let loaded = kv.len();
        let prompt_logits = self.run(&tokens[loaded..], &mut kv, &mut |_, _| {})?;
        let load_time = started.elapsed();
        let t = Instant::now();
        let mut sampler = Sampler::new(sampling);
        let mut generated = Vec::new();
        let mut next = handoff.first_token;
        let mut stopped_at_eos = false;
        let limit = max_new_tokens.min(
            self.model
                .model
                .config()
                .max_context
                .saturating_sub(tokens.len()),
        );
        while generated.len() < limit {
            generated.push(next);
            let go_on = on_token(next);
            if self.model.tokenizer.is_eos(next) {
                stopped_at_eos = true;
                break;
            }
            if !go_on || generated.len() >= limit {
                break;
            }
            let logits = compute(|| self.model.model.forward(&[next], &mut kv))?;
            next = sampler.sample(&logits);
        }
        let generate_time = t.elapsed();
        let mut stored_blocks = 0;
        if let Some(store) = &self.store {
            // Every position fed through the model has KV: the prompt and all but the
            // last generated token.
            let mut fed = tokens.clone();
            fed.extend_from_slice(&generated[..generated.len().saturating_sub(1)]);
            let fed_keys = store.keys(&fed);
            let first_new = loaded / bt;
            stored_blocks = store.store(&kv, &fed_keys, first_new).await?.stored;
        }
        Ok(Decoded {
            tokens: generated,
            loaded_tokens: loaded,
            recomputed_tokens: tokens.len() - loaded,
            prompt_logits,
            stopped_at_eos,
            stored_blocks,
            load_time,
            generate_time,
        })
    }

    /// Greedy generation in this process from a prefill's own KV (no reload): the
    /// reference a decode through kvstrata must match.
    pub fn continue_local(&self, prefill: &mut Prefill, max_new_tokens: usize) -> Result<Vec<u32>> {
        let mut out = vec![prefill.handoff.first_token];
        while out.len() < max_new_tokens {
            let last = out[out.len() - 1];
            if self.model.tokenizer.is_eos(last) {
                break;
            }
            let logits = compute(|| self.model.model.forward(&[last], &mut prefill.kv))?;
            out.push(crate::model::argmax(&logits));
        }
        Ok(out)
    }
}

fn check_options(model: &LoadedModel, options: &EngineOptions) -> Result<KvGeometry> {
    if options.block_tokens == 0 || options.block_tokens > 4096 {
        return Err(EngineError::InvalidRequest(format!(
            "block_tokens is {}; it must be 1 to 4096",
            options.block_tokens
        )));
    }
    Ok(model.geometry(options.block_tokens))
}

impl Handoff {
    /// Refuses a hand-off made for another model (`namespace_hex`, the
    /// decoding engine's) or whose block keys are not `keys`, the chain of
    /// its own tokens: a decode engine loads blocks by these keys.
    pub fn check_against(&self, namespace_hex: &str, keys: &[BlockHash]) -> Result<()> {
        if self.namespace_id != namespace_hex {
            return Err(EngineError::InvalidRequest(format!(
                "the hand-off is for namespace {}, this engine's model is {namespace_hex}",
                self.namespace_id
            )));
        }
        if !keys
            .iter()
            .map(hex::encode)
            .eq(self.block_keys.iter().cloned())
        {
            return Err(EngineError::InvalidRequest(
                "the hand-off's block keys are not the chain of its tokens".into(),
            ));
        }
        Ok(())
    }

    /// The block keys as bytes.
    pub fn keys(&self) -> Result<Vec<BlockHash>> {
        self.block_keys
            .iter()
            .map(|k| {
                let bytes = hex::decode(k)
                    .map_err(|e| EngineError::InvalidRequest(format!("block key {k:?}: {e}")))?;
                BlockHash::try_from(bytes.as_slice()).map_err(|_| {
                    EngineError::InvalidRequest(format!("block key {k:?} is not 16 bytes"))
                })
            })
            .collect()
    }
}
