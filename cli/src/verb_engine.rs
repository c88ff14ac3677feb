//! The engine behind `kvstrata prefill`, `decode` and `chat`, on the CPU
//! (`kvstrata_engine::engine::Engine`) or on a CUDA device
//! (`kvstrata_engine::cuda::GpuEngine`), with one interface for the verbs.
//!
//! Both engines put their blocks in the same namespace for the same model
//! file: the namespace comes from `LoadedModel::namespace_spec` either way
//! (model id, file fingerprint, layers, KV heads, head dim, f16,
//! `block_tokens`, layer-major), and a GPU page is a CPU page byte for byte.
//! So a GPU prefill's blocks feed a CPU decode and the reverse; only the
//! values differ by the backends' rounding (bf16 weights on the GPU).
//!
//! On the GPU the engine's KV pool is registered with the daemon as a CUDA-IPC
//! KV region when `--kv-region-socket` names the daemon's region socket, and
//! blocks move by page ids; otherwise (or when the daemon refuses it) they go
//! through shared memory (`--mempool-socket`) or inline, and the engine says
//! so once.

use std::sync::Arc;
use std::time::Duration;

use kvstrata_client::{Client, ClientOptions};
use kvstrata_engine::cuda::{CudaDevice, DeviceChoice, GpuEngine, GpuKvOptions, KvPath};
use kvstrata_engine::engine::{Engine, Handoff, LoadedModel, PrefillTimings};
use kvstrata_engine::load_policy::LoadPolicy;
use kvstrata_engine::model::argmax;
use kvstrata_engine::sampling::SamplingParams;
use kvstrata_engine::synthetic::SyntheticModel;
use kvstrata_engine::{EngineError, Result};

use crate::engine_verbs::{Device, GpuSetup, ModelArgs, load_model, resolve_engine_device};

/// Which device the engine verbs run on, and how a GPU engine reaches the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct VerbDeviceArgs {
    /// cpu, cuda or cuda:N [default: cuda when a GPU is found, else cpu]
    #[arg(long, env = "KVSTRATA_DEVICE")]
    pub device: Option<DeviceChoice>,
    /// Run a synthetic-weights model of a real geometry on the GPU instead of
    /// --model (llama3-8b, qwen3-8b, llama3-70b-tp8-shard): seeded random
    /// weights, so its text is meaningless and its tokens are shown as ids
    #[arg(long)]
    pub synthetic: Option<String>,
    /// With the GPU engine: the daemon's KV-region socket (its
    /// --kv-region-socket); the engine's KV pages are registered there and
    /// blocks move by page ids. Without it blocks go through --mempool-socket
    /// or inline
    #[arg(long, env = "KVSTRATA_KV_REGION_SOCKET")]
    pub kv_region_socket: Option<String>,
    /// With the GPU engine: most prompt tokens per forward pass
    #[arg(long, default_value_t = 1024)]
    pub gpu_chunk: usize,
}

impl VerbDeviceArgs {
    /// The device (said once on standard error unless `quiet`).
    pub fn resolve(&self, quiet: bool) -> Result<Device> {
        resolve_engine_device(self.device, self.synthetic.is_some(), quiet)
    }
}

/// A model loaded for the verbs, before its engine connects (the GPU
/// engine's KV pool is sized for the prompt, known only after tokenizing).
pub enum VerbModel {
    Cpu(Arc<LoadedModel>),
    Gpu {
        dev: Arc<CudaDevice>,
        setup: Box<GpuSetup>,
    },
}

impl VerbModel {
    /// Loads the model of `model` (or `--synthetic`) for `device`.
    pub fn load(device: Device, model: &ModelArgs, dev_args: &VerbDeviceArgs) -> Result<Self> {
        tokio::task::block_in_place(|| match device {
            Device::Cpu => Ok(VerbModel::Cpu(load_model(model)?)),
            Device::Cuda(dev) => {
                let setup = GpuSetup::load(
                    &dev,
                    model,
                    dev_args.synthetic.as_deref(),
                    usize::MAX,
                    dev_args.gpu_chunk.max(1),
                )?;
                Ok(VerbModel::Gpu {
                    dev,
                    setup: Box::new(setup),
                })
            }
        })
    }

    /// The tokenizer and chat template (`None` for a synthetic model).
    pub fn text(&self) -> Option<&Arc<LoadedModel>> {
        match self {
            VerbModel::Cpu(m) => Some(m),
            VerbModel::Gpu { setup, .. } => setup.loaded.as_ref(),
        }
    }

    /// The synthetic model, if that is what runs.
    pub fn synthetic(&self) -> Option<&SyntheticModel> {
        match self {
            VerbModel::Cpu(_) => None,
            VerbModel::Gpu { setup, .. } => setup.synthetic.as_ref(),
        }
    }

    /// Most positions of one sequence.
    pub fn max_positions(&self) -> usize {
        match self {
            VerbModel::Cpu(m) => m.model.config().max_context,
            VerbModel::Gpu { setup, .. } => setup.model.max_positions(),
        }
    }

    /// Connects the engine to the daemon at `addr`; a GPU engine gets a KV
    /// pool for one sequence of `positions` tokens.
    pub async fn connect(
        self,
        addr: &str,
        options: ClientOptions,
        model: &ModelArgs,
        dev_args: &VerbDeviceArgs,
        positions: usize,
        policy: LoadPolicy,
    ) -> Result<VerbEngine> {
        let client = Client::connect_with(addr, options).await?;
        match self {
            VerbModel::Cpu(m) => {
                let mut o = model.engine_options();
                o.load_policy = policy;
                Ok(VerbEngine::Cpu(Box::new(
                    Engine::connect(m, client, &o).await?,
                )))
            }
            VerbModel::Gpu { dev, setup } => {
                let setup = *setup;
                let bt = model.block_tokens;
                if bt == 0 {
                    return Err(EngineError::InvalidRequest(
                        "--block-tokens must be at least 1".into(),
                    ));
                }
                let positions = positions.clamp(1, setup.model.max_positions());
                let pool = setup.model.kv_pool(bt, positions.div_ceil(bt) + 1)?;
                let kv = GpuKvOptions {
                    region_socket: dev_args.kv_region_socket.clone(),
                    mempool_socket: model.mempool_socket.clone(),
                };
                let engine = GpuEngine::connect(
                    Arc::clone(&setup.model),
                    pool,
                    client,
                    setup.spec.clone(),
                    &kv,
                )
                .await?
                .with_load_policy(policy);
                if let Some(note) = engine.store().and_then(|s| s.path_note()) {
                    eprintln!("note: {note}");
                }
                Ok(VerbEngine::Gpu(Box::new(GpuVerbEngine {
                    engine,
                    loaded: setup.loaded,
                    device: format!("cuda:{}", dev.info().ordinal),
                })))
            }
        }
    }
}

/// The GPU engine with the model's text side.
pub struct GpuVerbEngine {
    engine: GpuEngine,
    loaded: Option<Arc<LoadedModel>>,
    device: String,
}

/// A connected engine of either device.
pub enum VerbEngine {
    Cpu(Box<Engine>),
    Gpu(Box<GpuVerbEngine>),
}

/// What a prefill did, on either device.
#[derive(Debug)]
pub struct VerbPrefill {
    pub handoff: Handoff,
    pub reused_tokens: usize,
    pub computed_tokens: usize,
    pub stored_blocks: usize,
    pub timings: PrefillTimings,
    /// Last-position logits, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// What a decode did, on either device.
#[derive(Debug)]
pub struct VerbDecoded {
    /// Generated tokens, the hand-off's first token first.
    pub tokens: Vec<u32>,
    pub loaded_tokens: usize,
    pub recomputed_tokens: usize,
    /// The greedy token the decode engine's own pass over the prompt picks:
    /// the hand-off's first token when both engines agree.
    pub prompt_next_token: u32,
    pub stopped_at_eos: bool,
    pub stored_blocks: usize,
    pub load_time: Duration,
    pub generate_time: Duration,
}

impl VerbEngine {
    /// `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        match self {
            VerbEngine::Cpu(_) => "cpu".into(),
            VerbEngine::Gpu(g) => g.device.clone(),
        }
    }

    /// How blocks move between the engine and the daemon.
    pub fn kv_path(&self) -> &'static str {
        match self {
            VerbEngine::Cpu(e) => match e.store().is_some_and(|s| s.uses_shared_memory()) {
                true => KvPath::SharedMemory.name(),
                false => KvPath::Inline.name(),
            },
            VerbEngine::Gpu(g) => g.engine.store().map_or(KvPath::Inline, |s| s.path()).name(),
        }
    }

    /// The tokenizer and chat template (`None` for a synthetic model).
    pub fn text(&self) -> Option<&Arc<LoadedModel>> {
        match self {
            VerbEngine::Cpu(e) => Some(e.model()),
            VerbEngine::Gpu(g) => g.loaded.as_ref(),
        }
    }

    fn is_eos(&self, id: u32) -> bool {
        self.text().is_some_and(|m| m.tokenizer.is_eos(id))
    }

    /// Prefill `tokens` (`progress` shows the CPU engine's chunks); with
    /// `logits`, the last position's logits too. On the GPU they come from
    /// running the computed part of the prompt again over the same cached
    /// prefix: the same passes as the prefill's.
    pub async fn prefill(
        &self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
        logits: bool,
    ) -> Result<VerbPrefill> {
        match self {
            VerbEngine::Cpu(e) => {
                let p = e.prefill(tokens, progress).await?;
                Ok(VerbPrefill {
                    handoff: p.handoff,
                    reused_tokens: p.reused_tokens,
                    computed_tokens: p.computed_tokens,
                    stored_blocks: p.stored_blocks,
                    timings: p.timings,
                    logits: logits.then_some(p.logits),
                })
            }
            VerbEngine::Gpu(g) => {
                let mut p = g.engine.prefill(tokens).await?;
                let logits = match logits {
                    false => None,
                    true => {
                        let reused = p.reused_tokens;
                        p.seq.truncate(reused);
                        let l = tokio::task::block_in_place(|| {
                            g.engine.model().forward(&tokens[reused..], &mut p.seq)
                        })?;
                        if argmax(&l) != p.handoff.first_token {
                            eprintln!(
                                "note: the logits' greedy token {} is not the prefill's first token {}",
                                argmax(&l),
                                p.handoff.first_token
                            );
                        }
                        Some(l)
                    }
                };
                Ok(VerbPrefill {
                    handoff: p.handoff,
                    reused_tokens: p.reused_tokens,
                    computed_tokens: p.computed_tokens,
                    stored_blocks: p.stored_blocks,
                    timings: p.timings,
                    logits,
                })
            }
        }
    }

    /// Decode from `handoff`: load its blocks, recompute the rest of the
    /// prompt, generate up to `max_tokens` calling `on_token` (false stops).
    pub async fn decode(
        &self,
        handoff: &Handoff,
        params: SamplingParams,
        max_tokens: usize,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<VerbDecoded> {
        match self {
            VerbEngine::Cpu(e) => {
                let d = e.decode(handoff, params, max_tokens, on_token).await?;
                Ok(VerbDecoded {
                    prompt_next_token: argmax(&d.prompt_logits),
                    tokens: d.tokens,
                    loaded_tokens: d.loaded_tokens,
                    recomputed_tokens: d.recomputed_tokens,
                    stopped_at_eos: d.stopped_at_eos,
                    stored_blocks: d.stored_blocks,
                    load_time: d.load_time,
                    generate_time: d.generate_time,
                })
            }
            VerbEngine::Gpu(g) => {
                let is_eos = |id: u32| self.is_eos(id);
                let d = g
                    .engine
                    .decode(handoff, params, max_tokens, &is_eos, on_token)
                    .await?;
                Ok(VerbDecoded {
                    tokens: d.tokens,
                    loaded_tokens: d.loaded_tokens,
                    recomputed_tokens: d.recomputed_tokens,
                    prompt_next_token: d.prompt_next_token,
                    stopped_at_eos: d.stopped_at_eos,
                    stored_blocks: d.stored_blocks,
                    load_time: d.load_time,
                    generate_time: d.generate_time,
                })
            }
        }
    }
}

/// A check that the model's text side exists (not a synthetic model).
pub fn need_text<'a>(m: Option<&'a Arc<LoadedModel>>, what: &str) -> Result<&'a Arc<LoadedModel>> {
    m.ok_or_else(|| {
        EngineError::InvalidRequest(format!(
            "{what} needs a real model's tokenizer; a --synthetic model has none"
        ))
    })
}
