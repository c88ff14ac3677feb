//! A Llama-architecture forward pass on candle (CPU) over an explicit paged KV cache.
//!
//! RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP, with
//! tied or separate output embeddings. Weights come from a GGUF file (quantized
//! matmuls as candle supports them) or from safetensors + `config.json`.
//!
//! The KV of every position lives in a [`PagedKv`] in f16 and attention always reads it
//! back from there (from its exact f32 widening, kept beside the pages, so a decode step
//! converts only its own row), also for the positions computed in the same call. So the
//! keys and values a forward pass attends to are the same whether they were computed
//! just now or loaded from kvstrata: a cached prefix changes nothing but the time it
//! takes.
//!
//! GGUF files written by llama.cpp store the query and key projections permuted for the
//! interleaved ("GPT-J") rotary layout, safetensors checkpoints for the half-split
//! ("NeoX") layout; [`RopeStyle`] records which one the weights need.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::kv::PagedKv;

/// Which rotary-embedding layout the query/key weights expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs of adjacent dimensions rotate together (llama.cpp's GGUF layout).
    Interleaved,
    /// Dimension `i` rotates with `i + head_dim/2` (Hugging Face checkpoints).
    HalfSplit,
}

/// The hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    /// The longest context the model was trained for; prompts beyond it are refused.
    pub max_context: usize,
    pub rope_style: RopeStyle,
}

impl LlamaConfig {
    /// Bytes of f16 KV one token takes across all layers (K and V).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.num_layers * 2 * self.num_kv_heads * self.head_dim * 2
    }

    fn from_gguf(ct: &Content) -> Result<Self> {
        let arch = meta_str(ct, "general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::Metadata(format!(
                "general.architecture is {arch:?}; only \"llama\" models are supported"
            )));
        }
        let hidden = meta_usize(ct, "llama.embedding_length")?;
        let heads = meta_usize(ct, "llama.attention.head_count")?;
        let kv_heads = match ct.metadata.get("llama.attention.head_count_kv") {
            Some(v) => {
                v.to_u32()
                    .map_err(meta_err("llama.attention.head_count_kv"))? as usize
            }
            None => heads,
        };
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !hidden.is_multiple_of(heads)
        {
            return Err(EngineError::Metadata(format!(
                "head counts do not fit: hidden {hidden}, heads {heads}, kv heads {kv_heads}"
            )));
        }
        let head_dim = hidden / heads;
        let rope_dims = match ct.metadata.get("llama.rope.dimension_count") {
            Some(v) => v.to_u32().map_err(meta_err("llama.rope.dimension_count"))? as usize,
            None => head_dim,
        };
        if rope_dims != head_dim {
            return Err(EngineError::Metadata(format!(
                "partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
            )));
        }
        let vocab_size = match ct.metadata.get("llama.vocab_size") {
            Some(v) => v.to_u32().map_err(meta_err("llama.vocab_size"))? as usize,
            None => match ct.metadata.get("tokenizer.ggml.tokens") {
                Some(v) => v.to_vec().map_err(meta_err("tokenizer.ggml.tokens"))?.len(),
                None => return Err(EngineError::Metadata("no vocabulary size".into())),
            },
        };
        Ok(LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: meta_usize(ct, "llama.feed_forward_length")?,
            num_layers: meta_usize(ct, "llama.block_count")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rope_theta: match ct.metadata.get("llama.rope.freq_base") {
                Some(v) => v.to_f32().map_err(meta_err("llama.rope.freq_base"))?,
                None => 10_000.0,
            },
            rms_eps: match ct.metadata.get("llama.attention.layer_norm_rms_epsilon") {
                Some(v) => v
                    .to_f32()
                    .map_err(meta_err("llama.attention.layer_norm_rms_epsilon"))?
                    as f64,
                None => 1e-5,
            },
            max_context: match ct.metadata.get("llama.context_length") {
                Some(v) => v.to_u32().map_err(meta_err("llama.context_length"))? as usize,
                None => 2048,
            },
            rope_style: RopeStyle::Interleaved,
        })
    }
}

fn meta_err(key: &'static str) -> impl Fn(candle_core::Error) -> EngineError {
    move |e| EngineError::Metadata(format!("{key}: {e}"))
}

fn meta_str<'a>(ct: &'a Content, key: &'static str) -> Result<&'a str> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_string().map_err(meta_err(key))?.as_str()),
        None => Err(EngineError::Metadata(format!("missing key {key}"))),
    }
}

fn meta_usize(ct: &Content, key: &'static str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(Value::U64(v)) => Ok(*v as usize),
        Some(v) => Ok(v.to_u32().map_err(meta_err(key))? as usize),
        None => Err(EngineError::Metadata(format!("missing key {key}"))),
    }
}

/// The `config.json` fields of a Hugging Face Llama checkpoint that the engine reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f32>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// A loaded Llama-family model, ready to run forward passes.
pub struct LlamaModel {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Where a model was loaded from, for namespaces and logs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// A short name: the GGUF file stem or the checkpoint folder name.
    pub model_id: String,
    /// The file or folder it came from.
    pub path: PathBuf,
    /// Bytes of weights read.
    pub weight_bytes: u64,
}

/// Turns a GGUF weight into a matmul operand.
///
/// By default weights are dequantized to f32 once at load: candle's CPU kernels for
/// several GGUF types (Q4_1 among them, the default model's) are scalar loops, and f32
/// GEMM is several times faster for prefill; the cost is memory (4 bytes a weight, about
/// 430 MB for the default model). `KVSTRATA_QUANTIZED_MATMUL=1` keeps them quantized.
fn matmul_weight(q: QTensor, device: &Device) -> Result<QMatMul> {
    if keep_quantized() {
        return Ok(QMatMul::from_qtensor(q)?);
    }
    Ok(QMatMul::Tensor(q.dequantize(device)?))
}

fn keep_quantized() -> bool {
    std::env::var("KVSTRATA_QUANTIZED_MATMUL").is_ok_and(|v| !v.is_empty() && v != "0")
}

impl LlamaModel {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Load a GGUF file whose metadata was already read into `ct`.
    pub fn from_gguf(ct: &Content, file: &mut BufReader<File>, path: &Path) -> Result<Self> {
        let config = LlamaConfig::from_gguf(ct)?;
        let device = Device::Cpu;
        let bad = |reason: String| EngineError::BadModel {
            path: path.to_path_buf(),
            reason,
        };
        let mut tensor = |name: &str| -> Result<QTensor> {
            ct.tensor(file, name, &device)
                .map_err(|e| bad(format!("tensor {name}: {e}")))
        };
        let embed_q = tensor("token_embd.weight")?;
        let embed = embed_q.dequantize(&device)?;
        let output = if ct.tensor_infos.contains_key("output.weight") {
            matmul_weight(tensor("output.weight")?, &device)?
        } else if keep_quantized() {
            QMatMul::from_qtensor(embed_q)?
        } else {
            QMatMul::Tensor(embed.clone())
        };
        let norm = tensor("output_norm.weight")?.dequantize(&device)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: tensor(&format!("{p}.attn_norm.weight"))?.dequantize(&device)?,
                wq: matmul_weight(tensor(&format!("{p}.attn_q.weight"))?, &device)?,
                wk: matmul_weight(tensor(&format!("{p}.attn_k.weight"))?, &device)?,
                wv: matmul_weight(tensor(&format!("{p}.attn_v.weight"))?, &device)?,
                wo: matmul_weight(tensor(&format!("{p}.attn_output.weight"))?, &device)?,
                ffn_norm: tensor(&format!("{p}.ffn_norm.weight"))?.dequantize(&device)?,
                w_gate: matmul_weight(tensor(&format!("{p}.ffn_gate.weight"))?, &device)?,
                w_up: matmul_weight(tensor(&format!("{p}.ffn_up.weight"))?, &device)?,
                w_down: matmul_weight(tensor(&format!("{p}.ffn_down.weight"))?, &device)?,
            });
        }
        Self::assemble(config, embed, layers, norm, output, device)
    }

    /// Load a Hugging Face Llama checkpoint: `config.json` and `*.safetensors` in `dir`.
    pub fn from_safetensors_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| EngineError::io(format!("reading {}", cfg_path.display()), e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::BadModel {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(EngineError::BadModel {
                path: cfg_path,
                reason: "rope_scaling is not supported".into(),
            });
        }
        let kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        if hf.num_attention_heads == 0
            || kv_heads == 0
            || !hf.num_attention_heads.is_multiple_of(kv_heads)
        {
            return Err(EngineError::BadModel {
                path: cfg_path,
                reason: "head counts do not fit".into(),
            });
        }
        let config = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: kv_heads,
            head_dim,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            max_context: hf.max_position_embeddings.unwrap_or(2048),
            rope_style: RopeStyle::HalfSplit,
        };
        let device = Device::Cpu;
        let mut tensors = std::collections::HashMap::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::io(format!("listing {}", dir.display()), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::BadModel {
                path: dir.to_path_buf(),
                reason: "no *.safetensors files".into(),
            });
        }
        for f in &files {
            let loaded = candle_core::safetensors::load(f, &device)?;
            tensors.extend(loaded);
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let t = tensors.remove(name).ok_or_else(|| EngineError::BadModel {
                path: dir.to_path_buf(),
                reason: format!("missing tensor {name}"),
            })?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let output = if hf.tie_word_embeddings.unwrap_or(false) {
            QMatMul::Tensor(embed.clone())
        } else {
            QMatMul::Tensor(take("lm_head.weight")?)
        };
        let norm = take("model.norm.weight")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                wq: QMatMul::Tensor(take(&format!("{p}.self_attn.q_proj.weight"))?),
                wk: QMatMul::Tensor(take(&format!("{p}.self_attn.k_proj.weight"))?),
                wv: QMatMul::Tensor(take(&format!("{p}.self_attn.v_proj.weight"))?),
                wo: QMatMul::Tensor(take(&format!("{p}.self_attn.o_proj.weight"))?),
                ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                w_gate: QMatMul::Tensor(take(&format!("{p}.mlp.gate_proj.weight"))?),
                w_up: QMatMul::Tensor(take(&format!("{p}.mlp.up_proj.weight"))?),
                w_down: QMatMul::Tensor(take(&format!("{p}.mlp.down_proj.weight"))?),
            });
        }
        Self::assemble(config, embed, layers, norm, output, device)
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: QMatMul,
        device: Device,
    ) -> Result<Self> {
        let (vocab, hidden) = embed.dims2()?;
        if vocab != config.vocab_size || hidden != config.hidden_size {
            return Err(EngineError::Metadata(format!(
                "embedding is {vocab}x{hidden}, config says {}x{}",
                config.vocab_size, config.hidden_size
            )));
        }
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), &device)?;
        let positions = Tensor::arange(0u32, config.max_context as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((config.max_context, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(LlamaModel {
            cos: freqs.cos()?.contiguous()?,
            sin: freqs.sin()?.contiguous()?,
            config,
            embed,
            layers,
            norm,
            output,
            device,
        })
    }

    /// Run `tokens` at positions `kv.len()..`, appending their keys and values to `kv`,
    /// and return the logits of the last position (`[vocab]`, f32).
    ///
    /// `kv` must hold exactly the positions before `tokens` (computed or loaded).
    pub fn forward(&self, tokens: &[u32], kv: &mut PagedKv) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let n = tokens.len();
        let start = kv.len();
        if n == 0 {
            return Err(EngineError::InvalidRequest("no tokens to run".into()));
        }
        if start + n > cfg.max_context {
            return Err(EngineError::InvalidRequest(format!(
                "context of {} tokens exceeds the model's {}",
                start + n,
                cfg.max_context
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        kv.reserve_tokens(n)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?; // [1, n, hidden]
        let cos = self.cos.narrow(0, start, n)?;
        let sin = self.sin.narrow(0, start, n)?;
        let mask = causal_mask(n, start, &self.device)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32)?;
            let attn = self.attention(li, layer, &h, start, &cos, &sin, &mask, kv)?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        kv.commit_tokens(n)?;
        let last = x.narrow(1, n - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.rms_eps as f32)?;
        let logits = self.output.forward(&last)?.flatten_all()?;
        Ok(logits.to_vec1::<f32>()?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        start: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        kv: &mut PagedKv,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (_, n, _) = h.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = |t: Tensor, count: usize| -> candle_core::Result<Tensor> {
            t.reshape((1, n, count, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(layer.wq.forward(h)?, nh)?;
        let k = heads(layer.wk.forward(h)?, nkv)?;
        let v = heads(layer.wv.forward(h)?, nkv)?;
        let (q, k) = match cfg.rope_style {
            RopeStyle::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
            RopeStyle::HalfSplit => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
        };
        // Store the new positions as f16 in the pages: [n, kv_heads, head_dim] per layer.
        let to_rows = |t: &Tensor| -> candle_core::Result<Vec<half::f16>> {
            t.squeeze(0)?
                .transpose(0, 1)?
                .to_dtype(DType::F16)?
                .flatten_all()?
                .to_vec1::<half::f16>()
        };
        kv.write_layer(li, start, &to_rows(&k)?, &to_rows(&v)?)?;
        // Attend over everything in the pages, including what was just written (their
        // f32 widening: no conversion of the context per step).
        let total = start + n;
        let (k_all, v_all) = kv.layer_f32(li, total)?;
        let k_all = Tensor::from_vec(k_all, (nkv, total, hd), &self.device)?; // [nkv, total, hd]
        let v_all = Tensor::from_vec(v_all, (nkv, total, hd), &self.device)?;
        let group = nh / nkv;
        // Heads h*group .. h*group+group share kv head h: fold them into the row axis.
        let q = q.reshape((nkv, group * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k_all.t()?)? * scale)?; // [nkv, group*n, total]
        let scores = scores
            .reshape((nkv, group, n, total))?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, group * n, total))?;
        let out = probs.matmul(&v_all)?; // [nkv, group*n, hd]
        let out = out
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .reshape((1, n, nh * hd))?;
        Ok(layer.wo.forward(&out)?)
    }
}

/// `[n, start + n]` additive mask: query `i` (position `start + i`) sees keys `0..=start + i`.
fn causal_mask(n: usize, start: usize, device: &Device) -> Result<Tensor> {
    let total = start + n;
    let mut m = vec![0f32; n * total];
    for i in 0..n {
        for j in (start + i + 1)..total {
            m[i * total + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (n, total), device)?)
}

/// The index of the largest logit (greedy decoding); ties go to the lower id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest absolute difference between two logit vectors (for tolerance checks).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(
        if a.len() == b.len() {
            0.0
        } else {
            f32::INFINITY
        },
        f32::max,
    )
}
