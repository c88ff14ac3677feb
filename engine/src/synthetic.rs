//! Synthetic-weights models: real geometries, seeded random weights.
//!
//! For performance work where real weights are not at hand (the lent GPU
//! machines reach nothing outside): `llama3-8b`, `qwen3-8b` and
//! `llama3-70b-tp8-shard` have the layer count, head counts, head dim, hidden,
//! intermediate and vocabulary sizes of those models, so TTFT and KV transfer
//! numbers are measured at the sizes users run. **Their text is meaningless**:
//! the weights are random, so are the tokens they produce. They run the Llama
//! architecture (RMSNorm, half-split rotary embeddings without rope scaling,
//! grouped-query attention, SwiGLU): Qwen3's per-head q/k norms are left out
//! (a negligible share of the compute), and the 70B tensor-parallel shard is one
//! GPU's share of the heads and of the MLP with no all-reduce between them.
//!
//! Weight element `i` of a tensor is a pure function of (seed, tensor, `i`)
//! (`reference::synthetic`, `kvs_synthetic_*` on the GPU, bit-identical), so
//! the GPU generates an 8B model in place in milliseconds and the CPU makes the
//! same weights for the small test geometries (`tiny`, `small`), which is how
//! the GPU forward pass is checked against the CPU engine. Each synthetic model
//! has its own namespace fingerprint (name, seed, storage type, geometry), so its
//! blocks never mix with a real model's.

use std::collections::HashMap;
use std::path::Path;

use kvstrata_types::{Dtype, NamespaceSpec};

use crate::cuda::reference::{self, HostLayer, HostWeights, Storage, from_storage, splitmix64};
use crate::error::{EngineError, Result};
use crate::model::{LlamaConfig, LlamaModel, RopeStyle};

/// The seed used unless one is given.
pub const DEFAULT_SEED: u64 = 0x6b76_7374_7261_7461; // "kvstrata"

/// Largest model (in weights) the CPU makes host weights for.
pub const MAX_HOST_PARAMS: usize = 64 << 20;

/// The names [`SyntheticModel::preset`] knows.
pub const PRESETS: &[&str] = &[
    "llama3-8b",
    "qwen3-8b",
    "llama3-70b-tp8-shard",
    "small",
    "tiny",
];

/// One tensor of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Embed,
    LmHead,
    FinalNorm,
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Part {
    /// Norm weights are kept in f32 (their values are still 16-bit exact).
    pub fn is_norm(self) -> bool {
        matches!(self, Part::FinalNorm | Part::AttnNorm | Part::FfnNorm)
    }

    fn tag(self) -> u64 {
        self as u64 + 1
    }
}

/// How one tensor's values are made: `offset + scale * (2u - 1)` over the stream
/// of `key` (see `reference::synthetic`), `rows × cols` values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorSpec {
    pub key: u64,
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
    pub offset: f32,
}

impl TensorSpec {
    /// Values in the tensor.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A synthetic model: a name, a geometry, a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticModel {
    pub name: String,
    pub config: LlamaConfig,
    pub seed: u64,
    /// Output projection tied to the embedding.
    pub tied: bool,
}

#[allow(clippy::too_many_arguments)]
fn geometry(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    theta: f32,
    max_context: usize,
) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rope_theta: theta,
        rms_eps: 1e-5,
        max_context,
        rope_style: RopeStyle::HalfSplit,
    }
}

impl SyntheticModel {
    /// A known geometry by name ([`PRESETS`]), with `seed`.
    pub fn preset(name: &str, seed: u64) -> Result<Self> {
        let (config, tied) = match name {
            // Meta-Llama-3-8B: 32 layers, 32 heads over 8 KV heads of 128.
            "llama3-8b" => (
                geometry(128_256, 4096, 14_336, 32, 32, 8, 128, 500_000.0, 131_072),
                false,
            ),
            // Qwen3-8B: 36 layers, 32 heads over 8 KV heads of 128.
            "qwen3-8b" => (
                geometry(151_936, 4096, 12_288, 36, 32, 8, 128, 1_000_000.0, 131_072),
                false,
            ),
            // One of 8 tensor-parallel shards of Llama-3-70B: 80 layers, 8 of
            // the 64 heads and 1 of the 8 KV heads, 1/8 of the MLP.
            "llama3-70b-tp8-shard" => (
                geometry(128_256, 8192, 3584, 80, 8, 1, 128, 500_000.0, 131_072),
                false,
            ),
            // Test geometries: small enough for the CPU engine.
            "small" => (geometry(2048, 256, 688, 4, 8, 2, 32, 10_000.0, 8192), false),
            // Odd sizes on purpose (head dim 14, 3 layers, 6 heads over 2).
            "tiny" => (geometry(301, 72, 100, 3, 6, 2, 14, 10_000.0, 4096), true),
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "unknown synthetic model {other:?} (known: {})",
                    PRESETS.join(", ")
                )));
            }
        };
        Ok(SyntheticModel {
            name: name.to_string(),
            config,
            seed,
            tied,
        })
    }

    /// `synthetic-<name>`: the model id of its namespace.
    pub fn model_id(&self) -> String {
        format!("synthetic-{}", self.name)
    }

    /// Weights in the model.
    pub fn params(&self) -> usize {
        let c = &self.config;
        let qd = c.num_heads * c.head_dim;
        let kvd = c.num_kv_heads * c.head_dim;
        let per_layer = (qd + 2 * kvd) * c.hidden_size
            + c.hidden_size * qd
            + 3 * c.intermediate_size * c.hidden_size
            + 2 * c.hidden_size;
        let embed = c.vocab_size * c.hidden_size;
        per_layer * c.num_layers + embed * if self.tied { 1 } else { 2 } + c.hidden_size
    }

    /// How tensor `part` of `layer` (`None` for the model-wide ones) is made.
    /// Projections have variance 1 / fan-in; norms lie in [0.75, 1.25].
    pub fn tensor(&self, layer: Option<usize>, part: Part) -> TensorSpec {
        let c = &self.config;
        let (h, qd, kvd) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let (rows, cols) = match part {
            Part::Embed | Part::LmHead => (c.vocab_size, h),
            Part::FinalNorm | Part::AttnNorm | Part::FfnNorm => (1, h),
            Part::Q => (qd, h),
            Part::K | Part::V => (kvd, h),
            Part::O => (h, qd),
            Part::Gate | Part::Up => (c.intermediate_size, h),
            Part::Down => (h, c.intermediate_size),
        };
        let (scale, offset) = if part.is_norm() {
            (0.25, 1.0)
        } else if part == Part::Embed {
            (1.0, 0.0)
        } else {
            ((3.0 / cols as f32).sqrt(), 0.0)
        };
        let layer_tag = layer.map_or(0, |l| l as u64 + 1);
        let key = splitmix64(self.seed ^ splitmix64((layer_tag << 8) | part.tag()));
        TensorSpec {
            key,
            rows,
            cols,
            scale,
            offset,
        }
    }

    /// The fingerprint of the namespace: xxh3-128 of the name, seed, storage
    /// type and geometry.
    pub fn fingerprint(&self, storage: Storage) -> [u8; 16] {
        let text = format!(
            "kvstrata-synthetic-v1:{}:{}:{:?}:{:?}:tied={}",
            self.name, self.seed, storage, self.config, self.tied
        );
        xxhash_rust::xxh3::xxh3_128(text.as_bytes()).to_le_bytes()
    }

    /// The kvstrata namespace of this model's KV (f16 pages, layer-major).
    pub fn namespace_spec(&self, storage: Storage, block_tokens: usize) -> NamespaceSpec {
        let c = &self.config;
        let mut spec = NamespaceSpec::layer_major(
            self.model_id(),
            c.num_layers as u32,
            c.num_kv_heads as u32,
            c.head_dim as u32,
            Dtype::F16,
            block_tokens as u32,
        );
        spec.model_fingerprint = self.fingerprint(storage).to_vec();
        spec
    }

    fn check_host_size(&self) -> Result<()> {
        if self.params() > MAX_HOST_PARAMS {
            return Err(EngineError::InvalidRequest(format!(
                "synthetic {} has {} weights; the CPU makes at most {MAX_HOST_PARAMS} (use the GPU)",
                self.name,
                self.params()
            )));
        }
        Ok(())
    }

    fn values(&self, layer: Option<usize>, part: Part, storage: Storage) -> Vec<u16> {
        let t = self.tensor(layer, part);
        reference::synthetic(t.key, t.len(), t.scale, t.offset, storage)
    }

    fn values_f32(&self, layer: Option<usize>, part: Part, storage: Storage) -> Vec<f32> {
        self.values(layer, part, storage)
            .into_iter()
            .map(|v| from_storage(v, storage))
            .collect()
    }

    /// The weights in host memory, in the GPU's layout (small geometries only).
    pub fn host_weights(&self, storage: Storage) -> Result<HostWeights> {
        self.check_host_size()?;
        let layers = (0..self.config.num_layers)
            .map(|i| {
                let l = Some(i);
                let mut wqkv = self.values(l, Part::Q, storage);
                wqkv.extend(self.values(l, Part::K, storage));
                wqkv.extend(self.values(l, Part::V, storage));
                let mut w_gate_up = self.values(l, Part::Gate, storage);
                w_gate_up.extend(self.values(l, Part::Up, storage));
                HostLayer {
                    attn_norm: self.values_f32(l, Part::AttnNorm, storage),
                    wqkv,
                    wo: self.values(l, Part::O, storage),
                    ffn_norm: self.values_f32(l, Part::FfnNorm, storage),
                    w_gate_up,
                    w_down: self.values(l, Part::Down, storage),
                }
            })
            .collect();
        Ok(HostWeights {
            storage,
            embed: self.values(None, Part::Embed, storage),
            lm_head: (!self.tied).then(|| self.values(None, Part::LmHead, storage)),
            final_norm: self.values_f32(None, Part::FinalNorm, storage),
            layers,
        })
    }

    /// Writes the weights as a Hugging Face style checkpoint (`config.json`,
    /// `model.safetensors`, f32 holding exactly the 16-bit values) into `dir`.
    pub fn write_checkpoint(&self, dir: &Path, storage: Storage) -> Result<()> {
        self.check_host_size()?;
        let c = &self.config;
        let dev = candle_core::Device::Cpu;
        let mut tensors = HashMap::new();
        let mut put = |name: String, layer: Option<usize>, part: Part| -> Result<()> {
            let t = self.tensor(layer, part);
            let v = self.values_f32(layer, part, storage);
            let shape = if part.is_norm() {
                vec![t.cols]
            } else {
                vec![t.rows, t.cols]
            };
            tensors.insert(name, candle_core::Tensor::from_vec(v, shape, &dev)?);
            Ok(())
        };
        put("model.embed_tokens.weight".into(), None, Part::Embed)?;
        if !self.tied {
            put("lm_head.weight".into(), None, Part::LmHead)?;
        }
        put("model.norm.weight".into(), None, Part::FinalNorm)?;
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let l = Some(i);
            put(format!("{p}.input_layernorm.weight"), l, Part::AttnNorm)?;
            put(format!("{p}.self_attn.q_proj.weight"), l, Part::Q)?;
            put(format!("{p}.self_attn.k_proj.weight"), l, Part::K)?;
            put(format!("{p}.self_attn.v_proj.weight"), l, Part::V)?;
            put(format!("{p}.self_attn.o_proj.weight"), l, Part::O)?;
            put(
                format!("{p}.post_attention_layernorm.weight"),
                l,
                Part::FfnNorm,
            )?;
            put(format!("{p}.mlp.gate_proj.weight"), l, Part::Gate)?;
            put(format!("{p}.mlp.up_proj.weight"), l, Part::Up)?;
            put(format!("{p}.mlp.down_proj.weight"), l, Part::Down)?;
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_eps,
            "max_position_embeddings": c.max_context,
            "tie_word_embeddings": self.tied,
        });
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string())
            .map_err(|e| EngineError::io(format!("writing {}", path.display()), e))
    }

    /// The CPU engine's model over these weights (small geometries only): the
    /// checkpoint is written to a temporary folder and loaded from there.
    pub fn cpu_model(&self, storage: Storage) -> Result<LlamaModel> {
        let dir =
            tempfile::tempdir().map_err(|e| EngineError::io("creating a temporary folder", e))?;
        self.write_checkpoint(dir.path(), storage)?;
        let model = LlamaModel::from_safetensors_dir(dir.path())?;
        if model.config() != &self.config {
            return Err(EngineError::Metadata(format!(
                "the written checkpoint reads back as {:?}",
                model.config()
            )));
        }
        Ok(model)
    }

    /// A deterministic prompt of `n` token ids (seeded; meaningless, like the text).
    pub fn prompt(&self, n: usize, salt: u64) -> Vec<u32> {
        (0..n as u64)
            .map(|i| {
                (splitmix64(self.seed ^ salt.wrapping_mul(0x100) ^ i)
                    % self.config.vocab_size as u64) as u32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_real_geometries() {
        let m = SyntheticModel::preset("llama3-8b", DEFAULT_SEED).unwrap();
        assert_eq!(m.config.num_layers, 32);
        assert_eq!(m.config.num_kv_heads, 8);
        // About 8.0 billion weights, 16 GB in bf16.
        assert!(
            (7_900_000_000..8_100_000_000).contains(&m.params()),
            "{}",
            m.params()
        );
        let q = SyntheticModel::preset("qwen3-8b", DEFAULT_SEED).unwrap();
        assert!(
            (8_000_000_000..8_300_000_000).contains(&q.params()),
            "{}",
            q.params()
        );
        assert!(SyntheticModel::preset("gpt-5", 1).is_err());
        for name in PRESETS {
            let m = SyntheticModel::preset(name, 1).unwrap();
            assert_eq!(m.config.num_heads % m.config.num_kv_heads, 0, "{name}");
        }
        // The big ones refuse to be made on the CPU.
        assert!(m.host_weights(Storage::Bf16).is_err());
    }

    #[test]
    fn fingerprints_differ_per_name_seed_and_storage() {
        let a = SyntheticModel::preset("small", 1).unwrap();
        let b = SyntheticModel::preset("small", 2).unwrap();
        let c = SyntheticModel::preset("tiny", 1).unwrap();
        let fa = a.fingerprint(Storage::Bf16);
        assert_eq!(fa, a.fingerprint(Storage::Bf16));
        assert_ne!(fa, b.fingerprint(Storage::Bf16));
        assert_ne!(fa, c.fingerprint(Storage::Bf16));
        assert_ne!(fa, a.fingerprint(Storage::F16));
        let spec = a.namespace_spec(Storage::Bf16, 16);
        assert_eq!(spec.model_fingerprint, fa.to_vec());
    }

    #[test]
    fn tensors_have_distinct_streams() {
        let m = SyntheticModel::preset("tiny", 9).unwrap();
        let mut keys = std::collections::HashSet::new();
        for layer in [None, Some(0), Some(1), Some(2)] {
            for part in [
                Part::Embed,
                Part::LmHead,
                Part::FinalNorm,
                Part::AttnNorm,
                Part::Q,
                Part::K,
                Part::V,
                Part::O,
                Part::FfnNorm,
                Part::Gate,
                Part::Up,
                Part::Down,
            ] {
                assert!(keys.insert(m.tensor(layer, part).key));
            }
        }
        let w = m.host_weights(Storage::Bf16).unwrap();
        assert!(w.lm_head.is_none());
        assert_eq!(w.layers.len(), 3);
        let norms: Vec<f32> = w.layers[1].ffn_norm.clone();
        assert!(norms.iter().all(|v| (0.75..=1.25).contains(v)));
        assert_ne!(w.layers[0].wqkv, w.layers[1].wqkv);
    }
}
