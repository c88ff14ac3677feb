//! Model weights on the GPU, 16-bit (bf16 or f16), in the layout the forward
//! pass wants: per layer the q, k and v projections fused into one
//! `[q rows | k rows | v rows]` matrix and gate/up into one `[gate | up]`
//! matrix (one matrix product each), norms in f32.
//!
//! Three sources: host weights ([`GpuWeights::upload`], e.g. a GGUF file
//! dequantized at load by [`host_weights_from_gguf`]), or a synthetic model
//! generated straight on the device ([`GpuWeights::synthetic`]; no host copy of
//! an 8B model is ever made).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file;

use super::device::{CudaDevice, DevMem};
use super::error::CudaError;
use super::reference::{HostLayer, HostWeights, Storage, to_storage};
use crate::model::LlamaConfig;
use crate::synthetic::{Part, SyntheticModel};

/// One layer on the device.
#[derive(Debug)]
pub struct GpuLayer {
    pub attn_norm: DevMem,
    pub wqkv: DevMem,
    pub wo: DevMem,
    pub ffn_norm: DevMem,
    pub w_gate_up: DevMem,
    pub w_down: DevMem,
}

/// A model's weights on the device.
#[derive(Debug)]
pub struct GpuWeights {
    pub storage: Storage,
    pub embed: DevMem,
    /// `None`: tied to the embedding.
    pub lm_head: Option<DevMem>,
    pub final_norm: DevMem,
    pub layers: Vec<GpuLayer>,
}

/// Element counts of each matrix of `config`.
struct Shapes {
    qkv: usize,
    o: usize,
    gate_up: usize,
    down: usize,
    embed: usize,
}

fn shapes(c: &LlamaConfig) -> Shapes {
    let qd = c.num_heads * c.head_dim;
    let kvd = c.num_kv_heads * c.head_dim;
    Shapes {
        qkv: (qd + 2 * kvd) * c.hidden_size,
        o: c.hidden_size * qd,
        gate_up: 2 * c.intermediate_size * c.hidden_size,
        down: c.hidden_size * c.intermediate_size,
        embed: c.vocab_size * c.hidden_size,
    }
}

impl GpuWeights {
    /// The output projection's device address.
    pub fn output_ptr(&self) -> u64 {
        self.lm_head.as_ref().unwrap_or(&self.embed).ptr()
    }

    /// Bytes of weights on the device.
    pub fn bytes(&self) -> u64 {
        let mut b = self.embed.bytes() + self.final_norm.bytes();
        b += self.lm_head.as_ref().map_or(0, |m| m.bytes());
        for l in &self.layers {
            b += l.attn_norm.bytes()
                + l.wqkv.bytes()
                + l.wo.bytes()
                + l.ffn_norm.bytes()
                + l.w_gate_up.bytes()
                + l.w_down.bytes();
        }
        b as u64
    }

    /// Copies `host` to the device after checking every size against `config`.
    pub fn upload(
        dev: &Arc<CudaDevice>,
        config: &LlamaConfig,
        host: &HostWeights,
    ) -> Result<Self, CudaError> {
        let s = shapes(config);
        let check = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(CudaError::Weights(format!(
                    "{what}: {got} values, the config wants {want}"
                )))
            }
        };
        check("embedding", host.embed.len(), s.embed)?;
        if let Some(h) = &host.lm_head {
            check("output", h.len(), s.embed)?;
        }
        check("final norm", host.final_norm.len(), config.hidden_size)?;
        check("layers", host.layers.len(), config.num_layers)?;
        let put16 = |v: &[u16]| -> Result<DevMem, CudaError> {
            let m = dev.alloc(v.len() * 2)?;
            dev.upload(m.ptr(), v)?;
            Ok(m)
        };
        let put32 = |v: &[f32]| -> Result<DevMem, CudaError> {
            let m = dev.alloc(v.len() * 4)?;
            dev.upload(m.ptr(), v)?;
            Ok(m)
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for (i, l) in host.layers.iter().enumerate() {
            check(&format!("layer {i} qkv"), l.wqkv.len(), s.qkv)?;
            check(&format!("layer {i} o"), l.wo.len(), s.o)?;
            check(&format!("layer {i} gate/up"), l.w_gate_up.len(), s.gate_up)?;
            check(&format!("layer {i} down"), l.w_down.len(), s.down)?;
            check(
                &format!("layer {i} attn norm"),
                l.attn_norm.len(),
                config.hidden_size,
            )?;
            check(
                &format!("layer {i} ffn norm"),
                l.ffn_norm.len(),
                config.hidden_size,
            )?;
            layers.push(GpuLayer {
                attn_norm: put32(&l.attn_norm)?,
                wqkv: put16(&l.wqkv)?,
                wo: put16(&l.wo)?,
                ffn_norm: put32(&l.ffn_norm)?,
                w_gate_up: put16(&l.w_gate_up)?,
                w_down: put16(&l.w_down)?,
            });
        }
        let w = GpuWeights {
            storage: host.storage,
            embed: put16(&host.embed)?,
            lm_head: host.lm_head.as_deref().map(put16).transpose()?,
            final_norm: put32(&host.final_norm)?,
            layers,
        };
        dev.synchronize()?;
        Ok(w)
    }

    /// Generates `model`'s seeded weights on the device (`kvs_synthetic_*`): the
    /// same values [`SyntheticModel::host_weights`] makes on the CPU.
    pub fn synthetic(
        dev: &Arc<CudaDevice>,
        model: &SyntheticModel,
        storage: Storage,
    ) -> Result<Self, CudaError> {
        let c = &model.config;
        let sh = shapes(c);
        // Fills `mem` from element `at` with the tensor `part` of `layer`.
        let fill = |mem: &DevMem, at: usize, layer: Option<usize>, part: Part| {
            let t = model.tensor(layer, part);
            let widen = part.is_norm();
            let elem = if widen { 4 } else { 2 };
            // SAFETY: `mem` was allocated below for every part written into it.
            unsafe {
                dev.synthetic(
                    storage,
                    widen,
                    mem.ptr() + (at * elem) as u64,
                    t.len() as u64,
                    t.key,
                    t.scale,
                    t.offset,
                )
            }
        };
        let h = c.hidden_size;
        let qd = c.num_heads * c.head_dim * h;
        let kvd = c.num_kv_heads * c.head_dim * h;
        let gate = c.intermediate_size * h;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let l = Some(i);
            let layer = GpuLayer {
                attn_norm: dev.alloc(h * 4)?,
                wqkv: dev.alloc(sh.qkv * 2)?,
                wo: dev.alloc(sh.o * 2)?,
                ffn_norm: dev.alloc(h * 4)?,
                w_gate_up: dev.alloc(sh.gate_up * 2)?,
                w_down: dev.alloc(sh.down * 2)?,
            };
            fill(&layer.attn_norm, 0, l, Part::AttnNorm)?;
            fill(&layer.wqkv, 0, l, Part::Q)?;
            fill(&layer.wqkv, qd, l, Part::K)?;
            fill(&layer.wqkv, qd + kvd, l, Part::V)?;
            fill(&layer.wo, 0, l, Part::O)?;
            fill(&layer.ffn_norm, 0, l, Part::FfnNorm)?;
            fill(&layer.w_gate_up, 0, l, Part::Gate)?;
            fill(&layer.w_gate_up, gate, l, Part::Up)?;
            fill(&layer.w_down, 0, l, Part::Down)?;
            layers.push(layer);
        }
        let embed = dev.alloc(sh.embed * 2)?;
        fill(&embed, 0, None, Part::Embed)?;
        let lm_head = if model.tied {
            None
        } else {
            let m = dev.alloc(sh.embed * 2)?;
            fill(&m, 0, None, Part::LmHead)?;
            Some(m)
        };
        let final_norm = dev.alloc(h * 4)?;
        fill(&final_norm, 0, None, Part::FinalNorm)?;
        dev.synchronize()?;
        Ok(GpuWeights {
            storage,
            embed,
            lm_head,
            final_norm,
            layers,
        })
    }
}

/// Reads a Llama-family GGUF file's weights, dequantized (candle) and rounded to
/// `storage`, in the GPU layout (fused q/k/v and gate/up). The rotary layout of
/// the q/k rows is the file's (llama.cpp: interleaved); `config` says which.
pub fn host_weights_from_gguf(
    path: &Path,
    config: &LlamaConfig,
    storage: Storage,
) -> Result<HostWeights, CudaError> {
    let bad = |e: String| CudaError::Weights(format!("{}: {e}", path.display()));
    let mut reader = BufReader::new(File::open(path).map_err(|e| bad(e.to_string()))?);
    let ct = gguf_file::Content::read(&mut reader).map_err(|e| bad(e.to_string()))?;
    let dev = Device::Cpu;
    let mut f32s = |name: &str| -> Result<Vec<f32>, CudaError> {
        let q = ct
            .tensor(&mut reader, name, &dev)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        q.dequantize(&dev)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| bad(format!("tensor {name}: {e}")))
    };
    let to16 =
        |v: Vec<f32>| -> Vec<u16> { v.into_iter().map(|x| to_storage(x, storage)).collect() };
    let embed = to16(f32s("token_embd.weight")?);
    let lm_head = if ct.tensor_infos.contains_key("output.weight") {
        Some(to16(f32s("output.weight")?))
    } else {
        None
    };
    let final_norm = f32s("output_norm.weight")?;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = format!("blk.{i}");
        let mut wqkv = to16(f32s(&format!("{p}.attn_q.weight"))?);
        wqkv.extend(to16(f32s(&format!("{p}.attn_k.weight"))?));
        wqkv.extend(to16(f32s(&format!("{p}.attn_v.weight"))?));
        let mut w_gate_up = to16(f32s(&format!("{p}.ffn_gate.weight"))?);
        w_gate_up.extend(to16(f32s(&format!("{p}.ffn_up.weight"))?));
        layers.push(HostLayer {
            attn_norm: f32s(&format!("{p}.attn_norm.weight"))?,
            wqkv,
            wo: to16(f32s(&format!("{p}.attn_output.weight"))?),
            ffn_norm: f32s(&format!("{p}.ffn_norm.weight"))?,
            w_gate_up,
            w_down: to16(f32s(&format!("{p}.ffn_down.weight"))?),
        });
    }
    Ok(HostWeights {
        storage,
        embed,
        lm_head,
        final_norm,
        layers,
    })
}
